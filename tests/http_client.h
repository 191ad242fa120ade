// A minimal blocking HTTP/1.1 client over a loopback socket for the end-to-end tests: one request per
// connection (Connection: close), the body de-chunked, and optionally a stream read piece by piece.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>

namespace qforge::testing {

// Percent-encodes everything but RFC 3986's unreserved characters (for query strings such as PromQL).
inline std::string UrlEncode(const std::string& s) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '_' || c == '-' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

struct HttpResponse {
  int status = 0;
  std::string headers;  // raw header block
  std::string body;     // de-chunked
};

// Sends `method path` with `body` to 127.0.0.1:port. `on_data` (optional) sees the raw bytes as they arrive and
// may return false to close the connection early (a client that goes away mid-stream).
inline HttpResponse HttpRequest(int port, const std::string& method, const std::string& path,
                                const std::string& body = "",
                                const std::function<bool(const std::string&)>& on_data = nullptr) {
  HttpResponse r;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{60, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return r;
  }
  std::string req = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n";
  if (!body.empty() || method == "POST") {
    req += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  req += "\r\n" + body;
  for (size_t off = 0; off < req.size();) {
    const ssize_t n = send(fd, req.data() + off, req.size() - off, MSG_NOSIGNAL);
    if (n <= 0) break;
    off += static_cast<size_t>(n);
  }
  std::string raw;
  char buf[16384];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    raw.append(buf, static_cast<size_t>(n));
    if (on_data && !on_data(std::string(buf, static_cast<size_t>(n)))) break;
  }
  close(fd);
  const size_t head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos || raw.size() < 12) return r;
  r.status = std::stoi(raw.substr(9, 3));
  r.headers = raw.substr(0, head_end);
  std::string rest = raw.substr(head_end + 4);
  if (r.headers.find("chunked") == std::string::npos) {
    r.body = rest;
    return r;
  }
  for (size_t pos = 0; pos < rest.size();) {
    const size_t eol = rest.find("\r\n", pos);
    if (eol == std::string::npos) break;
    const size_t len = std::stoul(rest.substr(pos, eol - pos), nullptr, 16);
    if (len == 0 || eol + 2 + len > rest.size()) break;
    r.body += rest.substr(eol + 2, len);
    pos = eol + 2 + len + 2;
  }
  return r;
}

// Prometheus text -> {"name{labels}": value}, comments skipped.
inline std::map<std::string, double> ParseSamples(const std::string& text) {
  std::map<std::string, double> samples;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return samples;
}

// `promtool check metrics` on `text` (Debian's prometheus package); the scratch file goes in `dir`.
inline bool PromtoolAccepts(const std::string& text, const std::string& dir) {
  const std::string file = dir + "/promtool-input.txt";
  std::ofstream(file) << text;
  const std::string cmd = "promtool check metrics < " + file + " > " + file + ".out 2>&1";
  return std::system(cmd.c_str()) == 0;
}

}  // namespace qforge::testing
