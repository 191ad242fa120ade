// HttpServer over real sockets on 127.0.0.1, driven by a small synchronous Beast client. Handlers that must
// block wait on a Gate the test opens, so every ordering below is forced by the test, not by sleeps; the
// gates' bounded waits only keep a broken server from hanging the test run.
#include "services/http/http_server.h"

#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "boost/asio/connect.hpp"
#include "boost/asio/io_context.hpp"
#include "boost/asio/ip/tcp.hpp"
#include "boost/asio/write.hpp"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"
#include "gtest/gtest.h"

namespace qforge::http {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

// Longest a test waits for something that should happen promptly.
constexpr auto kPatience = std::chrono::seconds(30);

class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kPatience, [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

using Response = bhttp::response<bhttp::string_body>;

// One client connection. Calls report socket errors through ok() / error() rather than throwing.
class Client {
 public:
  explicit Client(int port) : socket_(ioc_) {
    socket_.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec_);
  }

  bool ok() const { return !ec_; }
  beast::error_code error() const { return ec_; }

  void Write(const std::string& method, const std::string& target, const std::string& body = "",
             const std::vector<std::pair<std::string, std::string>>& headers = {}, unsigned version = 11) {
    bhttp::request<bhttp::string_body> req;
    req.method_string(method);
    req.target(target);
    req.version(version);
    req.set(bhttp::field::host, "127.0.0.1");
    for (const auto& [name, value] : headers) req.set(name, value);
    req.body() = body;
    req.prepare_payload();
    bhttp::write(socket_, req, ec_);
  }

  void WriteRaw(const std::string& bytes) { net::write(socket_, net::buffer(bytes), ec_); }

  Response Read() {
    Response res;
    bhttp::read(socket_, buffer_, res, ec_);
    return res;
  }

  Response Call(const std::string& method, const std::string& target, const std::string& body = "",
                const std::vector<std::pair<std::string, std::string>>& headers = {}) {
    Write(method, target, body, headers);
    if (!ok()) return {};
    return Read();
  }

  // Streamed responses: the header, then one chunk at a time as it arrives.
  bhttp::response_parser<bhttp::empty_body>& StartStream() {
    stream_.emplace();
    stream_->body_limit(boost::none);
    // The parser keeps a reference to the callback, so it lives in the client.
    on_chunk_ = [this](std::uint64_t remain, beast::string_view body, beast::error_code&) {
      partial_.append(body.data(), body.size());
      if (remain == body.size()) {
        chunks_.push_back(std::move(partial_));
        partial_.clear();
      }
      return body.size();
    };
    stream_->on_chunk_body(on_chunk_);
    bhttp::read_header(socket_, buffer_, *stream_, ec_);
    return *stream_;
  }

  // The next complete chunk; nullopt at the end of the stream or on an error (then !ok()).
  std::optional<std::string> NextChunk() {
    while (chunks_.empty() && !stream_->is_done()) {
      bhttp::read_some(socket_, buffer_, *stream_, ec_);
      if (ec_) return std::nullopt;
    }
    if (chunks_.empty()) return std::nullopt;
    std::string chunk = std::move(chunks_.front());
    chunks_.erase(chunks_.begin());
    return chunk;
  }
  bool StreamDone() const { return stream_.has_value() && stream_->is_done(); }

  // Reads raw bytes until the server closes the connection.
  std::string ReadToEof() {
    std::string all(static_cast<const char*>(buffer_.data().data()), buffer_.size());
    buffer_.consume(buffer_.size());
    char buf[4096];
    for (;;) {
      const size_t n = socket_.read_some(net::buffer(buf), ec_);
      all.append(buf, n);
      if (ec_) return all;
    }
  }

  void Close() {
    beast::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

 private:
  net::io_context ioc_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
  beast::error_code ec_;
  std::function<size_t(std::uint64_t, beast::string_view, beast::error_code&)> on_chunk_;
  std::optional<bhttp::response_parser<bhttp::empty_body>> stream_;
  std::vector<std::string> chunks_;
  std::string partial_;
};

std::string Header(const Response& res, bhttp::field field) {
  const auto it = res.find(field);
  return it == res.end() ? "" : std::string(it->value());
}

class HttpServerTest : public ::testing::Test {
 protected:
  void StartServer(HttpServerOptions options = {}) {
    server_.Route("GET", "/hello", [](const Request&, ResponseWriter& w) { w.Send(200, "text/plain", "hello"); });
    server_.Route("POST", "/echo", [](const Request& r, ResponseWriter& w) {
      w.Send(200, "application/octet-stream", r.body);
    });
    const absl::Status started = server_.Start(options);
    ASSERT_TRUE(started.ok()) << started;
    ASSERT_GT(server_.port(), 0);
  }

  HttpServer server_;
};

TEST_F(HttpServerTest, RoutesAndRequestFields) {
  Request seen;
  server_.Route("PUT", "/inspect", [&seen](const Request& r, ResponseWriter& w) {
    seen = r;
    w.Send(201, "application/json", "{}");
  });
  StartServer();
  Client client(server_.port());
  ASSERT_TRUE(client.ok()) << client.error().message();

  Response hello = client.Call("GET", "/hello");
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(hello.result_int(), 200);
  EXPECT_EQ(hello.body(), "hello");
  EXPECT_EQ(Header(hello, bhttp::field::content_type), "text/plain");

  Response put = client.Call("PUT", "/inspect?a=1&b=two", "payload", {{"X-Custom-Thing", "Value"}});
  ASSERT_TRUE(client.ok());
  EXPECT_EQ(put.result_int(), 201);
  EXPECT_EQ(seen.method, "PUT");
  EXPECT_EQ(seen.target, "/inspect?a=1&b=two");
  EXPECT_EQ(seen.path, "/inspect");
  EXPECT_EQ(seen.query, "a=1&b=two");
  EXPECT_EQ(seen.body, "payload");
  EXPECT_EQ(seen.headers["x-custom-thing"], "Value");
  EXPECT_EQ(seen.headers["host"], "127.0.0.1");
  EXPECT_EQ(seen.headers["content-length"], "7");
}

TEST_F(HttpServerTest, RepeatedHeadersAreJoined) {
  std::string accept;
  server_.Route("GET", "/h", [&accept](const Request& r, ResponseWriter& w) {
    accept = r.headers.at("accept");
    w.Send(200, "text/plain", "");
  });
  StartServer();
  Client client(server_.port());
  client.WriteRaw("GET /h HTTP/1.1\r\nHost: x\r\nAccept: a/b\r\nAccept: c/d\r\n\r\n");
  Response res = client.Read();
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(res.result_int(), 200);
  EXPECT_EQ(accept, "a/b, c/d");
}

TEST_F(HttpServerTest, UnknownPathIs404WithJsonError) {
  StartServer();
  Client client(server_.port());
  Response res = client.Call("GET", "/nope");
  ASSERT_TRUE(client.ok());
  EXPECT_EQ(res.result_int(), 404);
  EXPECT_EQ(Header(res, bhttp::field::content_type), "application/json");
  EXPECT_EQ(res.body(), R"({"error": "not found"})");
  // The connection survives an error for a well-formed request.
  Response again = client.Call("GET", "/hello");
  ASSERT_TRUE(client.ok());
  EXPECT_EQ(again.body(), "hello");
}

TEST_F(HttpServerTest, OtherMethodIs405WithAllow) {
  server_.Route("DELETE", "/hello", [](const Request&, ResponseWriter& w) { w.Send(204, "text/plain", ""); });
  StartServer();
  Client client(server_.port());
  Response res = client.Call("POST", "/hello", "x");
  ASSERT_TRUE(client.ok());
  EXPECT_EQ(res.result_int(), 405);
  EXPECT_EQ(Header(res, bhttp::field::allow), "DELETE, GET");
  EXPECT_EQ(res.body(), R"({"error": "method not allowed"})");
}

TEST_F(HttpServerTest, BodyOverLimitIs413AndAtLimitIsServed) {
  HttpServerOptions options;
  options.max_body_bytes = 1024;
  StartServer(options);
  {
    Client client(server_.port());
    Response res = client.Call("POST", "/echo", std::string(1024, 'a'));
    ASSERT_TRUE(client.ok());
    EXPECT_EQ(res.result_int(), 200);
    EXPECT_EQ(res.body().size(), 1024u);
  }
  {
    // Refused from the Content-Length alone, before the body is read.
    Client client(server_.port());
    Response res = client.Call("POST", "/echo", std::string(1025, 'a'));
    ASSERT_TRUE(client.ok()) << client.error().message();
    EXPECT_EQ(res.result_int(), 413);
    EXPECT_EQ(res.body(), R"({"error": "request body too large"})");
    EXPECT_FALSE(res.keep_alive());
  }
  {
    // A chunked body has no length up front: refused once the chunks pass the limit.
    Client client(server_.port());
    client.WriteRaw("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "300\r\n" + std::string(0x300, 'b') + "\r\n" + "300\r\n" + std::string(0x300, 'c') + "\r\n0\r\n\r\n");
    Response res = client.Read();
    ASSERT_TRUE(client.ok()) << client.error().message();
    EXPECT_EQ(res.result_int(), 413);
  }
}

TEST_F(HttpServerTest, MalformedRequestIs400) {
  StartServer();
  for (const std::string bad : {"THIS IS NOT HTTP\r\n\r\n", "GET /hello HTTP/1.1\r\nNo colon here\r\n\r\n",
                                "GET /hello HTTP/9.x\r\n\r\n",
                                "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"}) {
    Client client(server_.port());
    client.WriteRaw(bad);
    Response res = client.Read();
    ASSERT_TRUE(client.ok()) << bad << ": " << client.error().message();
    EXPECT_EQ(res.result_int(), 400) << bad;
    EXPECT_EQ(Header(res, bhttp::field::content_type), "application/json");
    EXPECT_NE(res.body().find(R"({"error": "malformed request)"), std::string::npos) << res.body();
  }
}

TEST_F(HttpServerTest, OversizedHeadersAre431) {
  StartServer();
  Client client(server_.port());
  client.WriteRaw("GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(16 * 1024, 'z') + "\r\n\r\n");
  Response res = client.Read();
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(res.result_int(), 431);
}

TEST_F(HttpServerTest, HandlerWithoutResponseIs500) {
  server_.Route("GET", "/silent", [](const Request&, ResponseWriter&) {});
  server_.Route("GET", "/bad-status", [](const Request&, ResponseWriter& w) {
    EXPECT_FALSE(w.Send(42, "text/plain", "x"));
    EXPECT_FALSE(w.Send(204, "text/plain", "a body a 204 cannot have"));
    EXPECT_FALSE(w.Send(200, "text/plain\r\nX-Injected: 1", "x"));
  });
  StartServer();
  Client client(server_.port());
  for (const char* path : {"/silent", "/bad-status"}) {
    Response res = client.Call("GET", path);
    ASSERT_TRUE(client.ok());
    EXPECT_EQ(res.result_int(), 500) << path;
    EXPECT_EQ(res.body(), R"({"error": "handler sent no response"})");
  }
}

TEST_F(HttpServerTest, KeepAliveServesTwoRequestsOnOneConnection) {
  StartServer();
  Client client(server_.port());
  Response first = client.Call("GET", "/hello");
  ASSERT_TRUE(client.ok());
  EXPECT_TRUE(first.keep_alive());
  Response second = client.Call("POST", "/echo", "again");
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(second.body(), "again");
  EXPECT_TRUE(second.keep_alive());

  // A client that asks to close gets Connection: close and then the end of the connection.
  Response last = client.Call("GET", "/hello", "", {{"Connection", "close"}});
  ASSERT_TRUE(client.ok());
  EXPECT_FALSE(last.keep_alive());
  EXPECT_EQ(client.ReadToEof(), "");
  EXPECT_EQ(client.error(), net::error::eof);
}

TEST_F(HttpServerTest, ExpectContinueGetsGoAhead) {
  StartServer();
  Client client(server_.port());
  client.WriteRaw("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
  Response interim = client.Read();
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(interim.result_int(), 100);
  client.WriteRaw("hello");
  Response res = client.Read();
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(res.result_int(), 200);
  EXPECT_EQ(res.body(), "hello");
}

TEST_F(HttpServerTest, SseStreamIsReadIncrementally) {
  Gate second_event;
  std::promise<bool> end_ok;
  server_.Route("GET", "/events", [&](const Request&, ResponseWriter& w) {
    ASSERT_TRUE(w.StartStream(200, "text/event-stream"));
    EXPECT_FALSE(w.Send(200, "text/plain", "too late"));
    EXPECT_TRUE(w.WriteChunk("data: one\n\n"));
    // The client must see the first event while this handler is still blocked here.
    EXPECT_TRUE(second_event.Wait());
    EXPECT_TRUE(w.WriteChunk(""));  // writes nothing, does not end the stream
    EXPECT_TRUE(w.WriteChunk("data: two\n\n"));
    end_ok.set_value(w.EndStream());
    EXPECT_FALSE(w.WriteChunk("data: after the end\n\n"));
  });
  StartServer();
  Client client(server_.port());
  client.Write("GET", "/events");
  auto& head = client.StartStream();
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(head.get().result_int(), 200);
  EXPECT_TRUE(head.get().chunked());
  EXPECT_EQ(std::string(head.get()[bhttp::field::content_type]), "text/event-stream");
  EXPECT_EQ(std::string(head.get()[bhttp::field::cache_control]), "no-cache");

  EXPECT_EQ(client.NextChunk(), "data: one\n\n");
  EXPECT_FALSE(client.StreamDone());
  second_event.Open();
  EXPECT_EQ(client.NextChunk(), "data: two\n\n");
  EXPECT_EQ(client.NextChunk(), std::nullopt);
  EXPECT_TRUE(client.ok()) << client.error().message();
  EXPECT_TRUE(client.StreamDone());
  EXPECT_TRUE(end_ok.get_future().get());

  // A cleanly ended stream leaves the connection reusable.
  Response after = client.Call("GET", "/hello");
  ASSERT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(after.body(), "hello");
}

TEST_F(HttpServerTest, Http10StreamIsCloseDelimited) {
  server_.Route("GET", "/old", [](const Request&, ResponseWriter& w) {
    w.StartStream(200, "text/plain");
    w.WriteChunk("ab");
    w.WriteChunk("cd");
    w.EndStream();
  });
  StartServer();
  Client client(server_.port());
  client.Write("GET", "/old", "", {}, /*version=*/10);
  const std::string raw = client.ReadToEof();
  EXPECT_EQ(client.error(), net::error::eof);
  EXPECT_EQ(raw.find("Transfer-Encoding"), std::string::npos) << raw;
  ASSERT_GE(raw.size(), 4u);
  EXPECT_EQ(raw.substr(raw.size() - 4), "abcd") << raw;
  EXPECT_EQ(raw.rfind("HTTP/1.0 200", 0), 0u) << raw;
}

TEST_F(HttpServerTest, ClientDisconnectMidStreamFailsWriteChunk) {
  Gate client_closed;
  struct Outcome {
    bool write_failed = false;
    bool gone = false;
    bool gone_before = true;
  };
  std::promise<Outcome> outcome;
  server_.Route("GET", "/forever", [&](const Request&, ResponseWriter& w) {
    Outcome o;
    w.StartStream(200, "text/event-stream");
    o.gone_before = w.ClientGone();  // the client closes only after it has the first chunk
    w.WriteChunk("data: first\n\n");
    client_closed.Wait();
    // Writing on after the client left: the disconnect must surface as a failed write, not go unnoticed.
    for (int i = 0; i < 100000; ++i) {
      if (!w.WriteChunk("data: more\n\n")) {
        o.write_failed = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    o.gone = w.ClientGone();
    outcome.set_value(o);
  });
  StartServer();
  {
    Client client(server_.port());
    client.Write("GET", "/forever");
    client.StartStream();
    EXPECT_EQ(client.NextChunk(), "data: first\n\n");
    client.Close();
  }
  client_closed.Open();
  std::future<Outcome> result = outcome.get_future();
  ASSERT_EQ(result.wait_for(kPatience), std::future_status::ready);
  const Outcome o = result.get();
  EXPECT_FALSE(o.gone_before);
  EXPECT_TRUE(o.write_failed);
  EXPECT_TRUE(o.gone);

  // The server goes on serving.
  Client next(server_.port());
  Response res = next.Call("GET", "/hello");
  ASSERT_TRUE(next.ok()) << next.error().message();
  EXPECT_EQ(res.body(), "hello");
}

TEST_F(HttpServerTest, ClientGoneNoticedWithoutWriting) {
  // A handler still computing its first token (no bytes written yet) learns that the client left.
  Gate client_closed;
  std::promise<bool> entered;
  std::promise<bool> noticed;
  server_.Route("POST", "/prefill", [&](const Request&, ResponseWriter& w) {
    entered.set_value(w.ClientGone());
    client_closed.Wait();
    bool gone = false;
    for (int i = 0; i < 30000 && !gone; ++i) {
      gone = w.ClientGone();
      if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    noticed.set_value(gone);
  });
  StartServer();
  {
    Client client(server_.port());
    client.Write("POST", "/prefill", "prompt");
    ASSERT_TRUE(client.ok());
    std::future<bool> gone_at_start = entered.get_future();
    ASSERT_EQ(gone_at_start.wait_for(kPatience), std::future_status::ready);
    EXPECT_FALSE(gone_at_start.get());
    client.Close();
  }
  client_closed.Open();
  std::future<bool> result = noticed.get_future();
  ASSERT_EQ(result.wait_for(kPatience), std::future_status::ready);
  EXPECT_TRUE(result.get());
}

TEST_F(HttpServerTest, SlowStreamsDoNotBlockAFastRequest) {
  constexpr int kStreams = 6;  // more than the I/O threads
  Gate finish;
  server_.Route("GET", "/slow", [&](const Request&, ResponseWriter& w) {
    w.StartStream(200, "text/event-stream");
    w.WriteChunk("data: started\n\n");
    finish.Wait();
    w.WriteChunk("data: finished\n\n");
    w.EndStream();
  });
  HttpServerOptions options;
  options.threads = 2;
  StartServer(options);

  std::vector<std::unique_ptr<Client>> streams;
  for (int i = 0; i < kStreams; ++i) {
    streams.push_back(std::make_unique<Client>(server_.port()));
    streams.back()->Write("GET", "/slow");
    streams.back()->StartStream();
    // Each stream's handler is now running and blocked.
    ASSERT_EQ(streams.back()->NextChunk(), "data: started\n\n") << i;
  }
  Client fast(server_.port());
  Response res = fast.Call("GET", "/hello");
  ASSERT_TRUE(fast.ok()) << fast.error().message();
  EXPECT_EQ(res.body(), "hello");
  // Every stream is still open, waiting.
  for (const auto& s : streams) EXPECT_FALSE(s->StreamDone());

  finish.Open();
  for (const auto& s : streams) {
    EXPECT_EQ(s->NextChunk(), "data: finished\n\n");
    EXPECT_EQ(s->NextChunk(), std::nullopt);
    EXPECT_TRUE(s->StreamDone());
  }
}

TEST_F(HttpServerTest, HandlerLimitAnswers503) {
  Gate finish;
  std::promise<void> entered;
  server_.Route("GET", "/hold", [&](const Request&, ResponseWriter& w) {
    entered.set_value();
    finish.Wait();
    w.Send(200, "text/plain", "held");
  });
  HttpServerOptions options;
  options.max_concurrent_handlers = 1;
  StartServer(options);
  Client holder(server_.port());
  holder.Write("GET", "/hold");
  ASSERT_EQ(entered.get_future().wait_for(kPatience), std::future_status::ready);
  Client other(server_.port());
  Response refused = other.Call("GET", "/hello");
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(refused.result_int(), 503);
  finish.Open();
  EXPECT_EQ(holder.Read().body(), "held");
  // The slot frees when the handler's thread returns, which may be just after the client has its response:
  // the same connection is served again once it has.
  int status = 0;
  for (int i = 0; i < 30000 && status != 200; ++i) {
    Response again = other.Call("GET", "/hello");
    ASSERT_TRUE(other.ok()) << other.error().message();
    status = again.result_int();
    if (status != 200) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(status, 200);
}

TEST_F(HttpServerTest, ShutdownDuringStreamStopsTheStream) {
  struct Outcome {
    bool write_failed = false;
    bool gone = false;
  };
  std::promise<Outcome> outcome;
  server_.Route("GET", "/forever", [&](const Request&, ResponseWriter& w) {
    w.StartStream(200, "text/event-stream");
    w.WriteChunk("data: first\n\n");
    Outcome o;
    for (int i = 0; i < 100000; ++i) {
      if (!w.WriteChunk("data: tick\n\n")) {
        o.write_failed = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    o.gone = w.ClientGone();
    outcome.set_value(o);
  });
  StartServer();
  const int port = server_.port();
  Client client(port);
  client.Write("GET", "/forever");
  client.StartStream();
  ASSERT_EQ(client.NextChunk(), "data: first\n\n");

  server_.Shutdown();  // returns only once the handler has returned
  std::future<Outcome> result = outcome.get_future();
  ASSERT_EQ(result.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  const Outcome o = result.get();
  EXPECT_TRUE(o.write_failed);
  EXPECT_TRUE(o.gone);

  // The client sees the stream break off (no final chunk), not a clean end.
  while (client.NextChunk().has_value()) {
  }
  EXPECT_FALSE(client.StreamDone());
  EXPECT_FALSE(client.ok());
  // Nobody listens any more.
  Client late(port);
  EXPECT_FALSE(late.ok());
  server_.Shutdown();  // idempotent
}

TEST_F(HttpServerTest, ShutdownLetsAWholeResponseHandlerFinish) {
  Gate finish;
  std::promise<void> entered;
  server_.Route("GET", "/work", [&](const Request&, ResponseWriter& w) {
    entered.set_value();
    finish.Wait();
    w.Send(200, "text/plain", "done");
  });
  StartServer();
  const int port = server_.port();
  Client idle(port);  // an idle keep-alive connection: closed by Shutdown
  ASSERT_EQ(idle.Call("GET", "/hello").body(), "hello");
  Client client(port);
  client.Write("GET", "/work");
  ASSERT_EQ(entered.get_future().wait_for(kPatience), std::future_status::ready);

  std::thread stopper([this] { server_.Shutdown(); });
  // Shutdown has begun once the listener is gone; only then let the handler answer.
  bool refused = false;
  for (int i = 0; i < 30000 && !refused; ++i) {
    Client probe(port);
    refused = !probe.ok();
    if (!refused) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(refused);
  finish.Open();
  Response res = client.Read();
  EXPECT_TRUE(client.ok()) << client.error().message();
  EXPECT_EQ(res.body(), "done");
  EXPECT_FALSE(res.keep_alive());
  stopper.join();
  EXPECT_EQ(idle.ReadToEof(), "");
  EXPECT_FALSE(idle.ok());
}

TEST(HttpServerStartTest, ReportsBadOptionsAndBusyPorts) {
  HttpServer first;
  ASSERT_TRUE(first.Start({}).ok());
  HttpServer second;
  HttpServerOptions same_port;
  same_port.port = first.port();
  const absl::Status busy = second.Start(same_port);
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
  EXPECT_EQ(first.Start({}).code(), absl::StatusCode::kFailedPrecondition);

  HttpServer third;
  HttpServerOptions bad_address;
  bad_address.address = "not an address";
  EXPECT_EQ(third.Start(bad_address).code(), absl::StatusCode::kInvalidArgument);
  HttpServerOptions no_threads;
  no_threads.threads = 0;
  EXPECT_EQ(third.Start(no_threads).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge::http
