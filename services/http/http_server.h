// A small HTTP/1.1 server for qforge's serving endpoints (OpenAI-style completions, /metrics): exact-path
// routes, keep-alive, and streamed responses in chunked transfer encoding (server-sent events) whose handler
// learns when the client has gone away. Boost.Beast does the wire work inside http_server.cc; this header
// stays free of Boost so including it is cheap.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"

namespace qforge::http {

struct Request {
  std::string method;  // "GET", "POST", ... as sent
  std::string target;  // path?query, as sent
  std::string path;    // target up to '?', not percent-decoded
  std::string query;   // target after '?', empty when there is none
  std::string body;
  // Names in lower case. A header sent more than once is joined with ", " (RFC 9110 field combination).
  std::map<std::string, std::string> headers;
};

// A response, either whole (Send) or streamed (StartStream, WriteChunk..., EndStream). Each call blocks until
// its bytes are handed to the kernel (or the write fails or times out) and returns false when they could not
// be delivered. Send / StartStream / WriteChunk / EndStream are for one thread at a time (normally the
// handler's); ClientGone may be asked from any thread, even while a write is pending. The writer is valid
// until the handler returns.
class ResponseWriter {
 public:
  virtual ~ResponseWriter() = default;
  // A whole response with Content-Length. At most one response per request: a second Send or a Send after
  // StartStream returns false.
  virtual bool Send(int status, const std::string& content_type, const std::string& body) = 0;
  // Starts a streamed response (chunked for HTTP/1.1 clients; close-delimited for HTTP/1.0 ones).
  virtual bool StartStream(int status, const std::string& content_type) = 0;
  // One piece of the stream. Empty data writes nothing and returns !ClientGone(). False once the client has
  // gone away or the server is shutting down: stop producing then.
  virtual bool WriteChunk(const std::string& data) = 0;
  // Ends the stream cleanly. A handler that returns without EndStream leaves the stream truncated (no final
  // chunk, connection closed), which is how a handler signals that the stream broke off.
  virtual bool EndStream() = 0;
  // True when the client closed or reset the connection, a write failed, or (for a stream) the server is
  // shutting down. Cheap (one poll(2) without waiting, no lock): a handler may call it before each token.
  virtual bool ClientGone() const = 0;
};

using Handler = std::function<void(const Request&, ResponseWriter&)>;

struct HttpServerOptions {
  std::string address = "127.0.0.1";
  int port = 0;  // 0 = pick a free one; port() says which
  // Threads doing socket I/O and parsing. Handlers do not run on them (see max_concurrent_handlers).
  int threads = 2;
  size_t max_body_bytes = 1 << 20;  // larger request bodies get 413
  // Handlers running at once, each on its own thread; a request beyond this gets 503.
  int max_concurrent_handlers = 256;
  // A connection that sends no (complete) request for this long is closed.
  int idle_timeout_seconds = 60;
  // A response write (or one chunk) that the client does not take within this long fails and closes the
  // connection, so a client that stopped reading cannot pin a handler forever.
  int write_timeout_seconds = 30;
};

class HttpServer {
 public:
  HttpServer();
  ~HttpServer();  // Shutdown()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Exact-path routes, registered before Start (later calls are ignored). A second handler for the same
  // method and path replaces the first. Unknown path: 404; known path, other method: 405 (with Allow); body
  // over max_body_bytes: 413; malformed request: 400; headers over 8 KiB: 431; too many handlers running:
  // 503; a handler that returns without responding: 500. Each with a short JSON body {"error": "..."}.
  void Route(const std::string& method, const std::string& path, Handler handler);

  // Binds and listens, then serves on its own threads until Shutdown. port() is the bound port. Errors:
  // InvalidArgument for a bad address or option, Unavailable when the address cannot be bound,
  // FailedPrecondition when already started.
  absl::Status Start(const HttpServerOptions& options);
  int port() const;

  // Stops accepting and closes idle connections; in-flight handlers run to completion (a whole response is
  // still delivered, with Connection: close; a stream's writes fail from now on so its handler stops), then
  // joins every thread. Idempotent. Must not be called from a handler.
  void Shutdown();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qforge::http
