// HttpServer on Boost.Beast.
//
// Threading model: an io_context run by `threads` I/O threads does every socket operation asynchronously,
// each connection on its own strand (accepting, parsing, writing, timeouts). Handlers never run on those
// threads: a handler may block for minutes (a completion stream writes a chunk per generated token), so a
// parsed request is handed to a handler thread from a pool that grows on demand up to
// max_concurrent_handlers and reuses idle threads. A blocked handler therefore holds only its own thread, a
// slow stream never stalls another connection's I/O, and idle keep-alive connections cost no thread at all
// (which a thread-per-connection server could not say). The writer bridges the two sides: each call posts
// the write to the connection's strand and waits for its completion, so handlers get a plain blocking API
// while every socket call stays on the strand.
//
// Disconnects: HTTP/1.1 clients send nothing while they wait for a response, so during a handler no read is
// pending; ClientGone() asks the kernel instead (poll(2) for POLLRDHUP / POLLHUP / POLLERR without waiting).
// That notices a client that went away before the next write would fail, e.g. during a long prefill.

#include "services/http/http_server.h"

#include <poll.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <future>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "boost/asio/dispatch.hpp"
#include "boost/asio/executor_work_guard.hpp"
#include "boost/asio/io_context.hpp"
#include "boost/asio/ip/tcp.hpp"
#include "boost/asio/post.hpp"
#include "boost/asio/steady_timer.hpp"
#include "boost/asio/strand.hpp"
#include "boost/asio/write.hpp"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"

namespace qforge::http {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

// Beast's default header limit; larger headers get 431.
constexpr uint32_t kMaxHeaderBytes = 8 * 1024;
// After an error response on a connection whose request body may be unread, the server reads (and drops)
// up to this much for up to kLingerSeconds before closing. Closing with unread bytes in the receive buffer
// makes the kernel send a reset, which can destroy the error response before the client reads it.
constexpr size_t kLingerMaxBytes = 4 << 20;
constexpr int kLingerSeconds = 2;

std::string ToStd(beast::string_view s) { return std::string(s.data(), s.size()); }

std::string Lower(beast::string_view s) {
  std::string out(s.data(), s.size());
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          static const char kHex[] = "0123456789abcdef";
          out += "\\u00";
          out += kHex[(c >> 4) & 0xf];
          out += kHex[c & 0xf];
        } else {
          out += c;
        }
    }
  }
  return out;
}

std::string ErrorBody(const std::string& message) { return "{\"error\": \"" + JsonEscape(message) + "\"}"; }

bool HasLineBreak(const std::string& s) { return s.find_first_of("\r\n") != std::string::npos; }

// Threads for handlers: grows on demand up to `max_tasks` and reuses idle threads, so a burst of streams
// gets a thread each and later requests do not pay for thread creation.
class HandlerPool {
 public:
  explicit HandlerPool(int max_tasks) : max_tasks_(max_tasks) {}
  ~HandlerPool() { Stop(); }

  // False when `max_tasks` tasks are already queued or running, or after Stop.
  bool TrySubmit(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || active_ >= max_tasks_) return false;
    ++active_;
    queue_.push_back(std::move(task));
    if (idle_ < static_cast<int>(queue_.size())) {
      threads_.emplace_back([this] { Loop(); });
    } else {
      cv_.notify_one();
    }
    return true;
  }

  // Runs every queued task to completion, then joins the threads.
  void Stop() {
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      cv_.notify_all();
      threads.swap(threads_);
    }
    for (std::thread& t : threads) t.join();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      ++idle_;
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      --idle_;
      if (queue_.empty()) return;  // stopping, nothing left to run
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      task();
      task = nullptr;  // drops the captured connection outside the lock
      lock.lock();
      --active_;
    }
  }

  const int max_tasks_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::vector<std::thread> threads_;
  int idle_ = 0;
  int active_ = 0;  // queued + running
  bool stopping_ = false;
};

struct Routes {
  // path -> method -> handler
  std::map<std::string, std::map<std::string, Handler>> by_path;
};

class Session;

// What sessions need from the server; outlives every session's use of it (Shutdown joins first).
struct ServerState {
  net::io_context ioc;
  Routes routes;
  HttpServerOptions options;
  std::atomic<bool> stopping{false};
  std::unique_ptr<HandlerPool> pool;

  std::mutex sessions_mu;
  std::vector<std::weak_ptr<Session>> sessions;
  size_t sessions_pruned_at = 0;

  void Register(const std::shared_ptr<Session>& session) {
    std::lock_guard<std::mutex> lock(sessions_mu);
    if (sessions.size() >= 2 * sessions_pruned_at + 64) {
      std::erase_if(sessions, [](const std::weak_ptr<Session>& w) { return w.expired(); });
      sessions_pruned_at = sessions.size();
    }
    sessions.push_back(session);
  }
  std::vector<std::shared_ptr<Session>> LiveSessions() {
    std::lock_guard<std::mutex> lock(sessions_mu);
    std::vector<std::shared_ptr<Session>> live;
    for (const auto& w : sessions) {
      if (auto s = w.lock()) live.push_back(std::move(s));
    }
    return live;
  }
};

class Writer;

// One connection. Every member is touched only on the connection's strand, except through
// Session::WriteAndWait (which posts to it) and the immutable fd_ / flags noted below.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, ServerState* server) : stream_(std::move(socket)), server_(server) {
    beast::error_code ec;
    // Streams send a token or so per chunk; Nagle's algorithm would hold each one back for an ACK.
    stream_.socket().set_option(tcp::no_delay(true), ec);
    fd_ = stream_.socket().native_handle();
  }

  void Start() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->DoRead(); });
  }

  // From Shutdown: idle connections close now; a stream's socket is shut down so that its pending and later
  // writes fail (the fd stays open until the handler is done, so ClientGone's poll never sees a reused fd);
  // a handler still computing a whole response is left to send it.
  void OnServerStopping() {
    net::post(stream_.get_executor(), [self = shared_from_this()] {
      switch (self->phase_) {
        case Phase::kReading:
        case Phase::kLingering:
          self->Close();
          break;
        case Phase::kStreaming: {
          beast::error_code ec;
          self->stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
          break;
        }
        case Phase::kHandling:
        case Phase::kWritingError:
        case Phase::kClosed:
          break;
      }
    });
  }

  // From Shutdown once no handler runs any more.
  void ForceClose() {
    net::post(stream_.get_executor(), [self = shared_from_this()] { self->Close(); });
  }

  // Called on a handler thread: runs `start(done)` on the strand (which must start one async write and call
  // done with its result) and blocks until done. Returns the write's error, if any.
  beast::error_code WriteAndWait(std::function<void(std::function<void(beast::error_code)>)> start,
                                 std::optional<bool> streaming_phase = std::nullopt) {
    auto promise = std::make_shared<std::promise<beast::error_code>>();
    std::future<beast::error_code> result = promise->get_future();
    net::post(stream_.get_executor(), [self = shared_from_this(), start = std::move(start), promise,
                                       streaming_phase] {
      if (self->phase_ == Phase::kClosed || !self->stream_.socket().is_open()) {
        promise->set_value(net::error::not_connected);
        return;
      }
      if (streaming_phase.has_value()) self->phase_ = *streaming_phase ? Phase::kStreaming : Phase::kHandling;
      self->stream_.expires_after(std::chrono::seconds(self->server_->options.write_timeout_seconds));
      start([promise](beast::error_code ec) { promise->set_value(ec); });
    });
    return result.get();
  }

  // Called on the handler thread after the handler returned: read the next request or close.
  void AfterResponse(bool reusable) {
    net::post(stream_.get_executor(), [self = shared_from_this(), reusable] {
      if (self->phase_ == Phase::kClosed) return;
      if (reusable && !self->server_->stopping.load()) {
        self->DoRead();
      } else if (self->server_->stopping.load()) {
        self->Close();
      } else {
        self->LingerAndClose();
      }
    });
  }

  beast::tcp_stream& stream() { return stream_; }
  int fd() const { return fd_; }
  ServerState* server() const { return server_; }

 private:
  enum class Phase { kReading, kHandling, kStreaming, kWritingError, kLingering, kClosed };

  void DoRead() {
    if (server_->stopping.load()) {
      Close();
      return;
    }
    phase_ = Phase::kReading;
    parser_.emplace();
    parser_->body_limit(server_->options.max_body_bytes);
    parser_->header_limit(kMaxHeaderBytes);
    stream_.expires_after(std::chrono::seconds(server_->options.idle_timeout_seconds));
    bhttp::async_read_header(stream_, buffer_, *parser_,
                             [self = shared_from_this()](beast::error_code ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(beast::error_code ec) {
    if (ec) return OnReadError(ec);
    const auto& msg = parser_->get();
    version_ = msg.version();
    // "Expect: 100-continue": the client waits for a go-ahead before sending the body. Give it only when the
    // request would be served; otherwise answer now and close rather than read a body we would refuse.
    const auto expect = msg.find(bhttp::field::expect);
    if (expect != msg.end() && Lower(expect->value()) == "100-continue" && !parser_->is_done()) {
      const std::string target = ToStd(msg.target());
      const std::string path = target.substr(0, target.find('?'));
      int status = 0;
      std::string allow;
      if (!FindHandler(ToStd(msg.method_string()), path, &status, &allow)) {
        return WriteError(status, status == 404 ? "not found" : "method not allowed", false, allow);
      }
      auto cont = std::make_shared<bhttp::response<bhttp::empty_body>>(bhttp::status::continue_, version_);
      bhttp::async_write(stream_, *cont, [self = shared_from_this(), cont](beast::error_code ec, size_t) {
        if (ec) return self->Close();
        self->ReadBody();
      });
      return;
    }
    ReadBody();
  }

  void ReadBody() {
    if (parser_->is_done()) return OnRequest();
    stream_.expires_after(std::chrono::seconds(server_->options.idle_timeout_seconds));
    bhttp::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->OnReadError(ec);
      self->OnRequest();
    });
  }

  void OnReadError(beast::error_code ec) {
    // The client closed (between requests or in the middle of one), the connection broke, timed out, or
    // Shutdown closed it: nobody to answer.
    if (ec == bhttp::error::end_of_stream || ec == bhttp::error::partial_message ||
        ec.category() != bhttp::make_error_code(bhttp::error::bad_target).category()) {
      return Close();
    }
    if (version_ < 10) version_ = 11;
    if (ec == bhttp::error::body_limit) return WriteError(413, "request body too large", false);
    if (ec == bhttp::error::header_limit) return WriteError(431, "request headers too large", false);
    WriteError(400, "malformed request: " + ec.message(), false);
  }

  // Looks up the route; on failure sets *status (404 or 405) and *allow (the path's methods, for 405).
  const Handler* FindHandler(const std::string& method, const std::string& path, int* status,
                             std::string* allow) const {
    const auto by_method = server_->routes.by_path.find(path);
    if (by_method == server_->routes.by_path.end()) {
      *status = 404;
      return nullptr;
    }
    const auto handler = by_method->second.find(method);
    if (handler == by_method->second.end()) {
      std::vector<std::string> methods;
      for (const auto& [m, h] : by_method->second) methods.push_back(m);
      *allow = absl::StrJoin(methods, ", ");
      *status = 405;
      return nullptr;
    }
    return &handler->second;
  }

  void OnRequest();

  void WriteError(int status, const std::string& message, bool keep_alive, const std::string& allow = "") {
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>(static_cast<bhttp::status>(status),
                                                                       version_);
    res->set(bhttp::field::content_type, "application/json");
    if (!allow.empty()) res->set(bhttp::field::allow, allow);
    res->body() = ErrorBody(message);
    res->keep_alive(keep_alive && !server_->stopping.load());
    res->prepare_payload();
    phase_ = Phase::kWritingError;
    stream_.expires_after(std::chrono::seconds(server_->options.write_timeout_seconds));
    bhttp::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec) return self->Close();
      if (res->keep_alive()) return self->DoRead();
      if (self->server_->stopping.load()) return self->Close();
      self->LingerAndClose();
    });
  }

  // Half-closes, then reads and drops what the client still sends (bounded) before closing; see
  // kLingerMaxBytes.
  void LingerAndClose() {
    phase_ = Phase::kLingering;
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    if (ec) return Close();
    lingered_bytes_ = 0;
    stream_.expires_after(std::chrono::seconds(kLingerSeconds));
    DoLinger();
  }

  void DoLinger() {
    stream_.async_read_some(net::buffer(scratch_), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->lingered_bytes_ += n;
      if (ec || self->lingered_bytes_ > kLingerMaxBytes || self->phase_ != Phase::kLingering) {
        return self->Close();
      }
      self->DoLinger();
    });
  }

  void Close() {
    if (phase_ == Phase::kClosed) return;
    phase_ = Phase::kClosed;
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.close();
  }

  beast::tcp_stream stream_;
  ServerState* const server_;
  int fd_ = -1;  // set once in the constructor; read by ClientGone on handler threads
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  unsigned version_ = 11;
  Phase phase_ = Phase::kReading;
  std::array<char, 4096> scratch_{};
  size_t lingered_bytes_ = 0;
};

// The ResponseWriter handed to a handler; lives on the handler's thread.
class Writer final : public ResponseWriter {
 public:
  Writer(std::shared_ptr<Session> session, unsigned version, bool keep_alive)
      : session_(std::move(session)), version_(version), keep_alive_(keep_alive), chunked_(version >= 11) {}

  bool Send(int status, const std::string& content_type, const std::string& body) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != State::kNone || !ValidStatus(status) || HasLineBreak(content_type)) return false;
    if (!StatusAllowsBody(status) && !body.empty()) return false;
    std::shared_ptr<bhttp::response<bhttp::string_body>> res;
    try {
      res = std::make_shared<bhttp::response<bhttp::string_body>>(static_cast<bhttp::status>(status), version_);
      res->set(bhttp::field::content_type, content_type);
      res->body() = body;
      res->keep_alive(keep_alive_ && !session_->server()->stopping.load());
      res->prepare_payload();
    } catch (const std::exception&) {
      return false;
    }
    const beast::error_code ec = session_->WriteAndWait([s = session_, res](auto done) {
      bhttp::async_write(s->stream(), *res, [res, done](beast::error_code ec, size_t) { done(ec); });
    });
    reusable_ = !ec && res->keep_alive();
    return Settle(ec, State::kSent);
  }

  bool StartStream(int status, const std::string& content_type) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != State::kNone || !ValidStatus(status) || !StatusAllowsBody(status) ||
        HasLineBreak(content_type) || session_->server()->stopping.load()) {
      return false;
    }
    struct Head {
      bhttp::response<bhttp::empty_body> res;
      std::optional<bhttp::response_serializer<bhttp::empty_body>> serializer;
    };
    auto head = std::make_shared<Head>();
    try {
      head->res = bhttp::response<bhttp::empty_body>(static_cast<bhttp::status>(status), version_);
      head->res.set(bhttp::field::content_type, content_type);
      // A live stream is never worth caching (and proxies must not buffer it).
      head->res.set(bhttp::field::cache_control, "no-cache");
      if (chunked_) {
        head->res.chunked(true);
        head->res.keep_alive(keep_alive_);
      } else {
        head->res.keep_alive(false);  // HTTP/1.0: the body ends when the connection does
      }
      head->serializer.emplace(head->res);
    } catch (const std::exception&) {
      return false;
    }
    const beast::error_code ec = session_->WriteAndWait(
        [s = session_, head](auto done) {
          bhttp::async_write_header(s->stream(), *head->serializer,
                                    [head, done](beast::error_code ec, size_t) { done(ec); });
        },
        /*streaming_phase=*/true);
    stream_keep_alive_ = head->res.keep_alive();
    return Settle(ec, State::kStreaming);
  }

  bool WriteChunk(const std::string& data) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != State::kStreaming) return false;
    if (Gone()) {
      state_ = State::kFailed;
      return false;
    }
    if (data.empty()) return true;  // an empty chunk would end the stream
    auto payload = std::make_shared<std::string>(data);
    const bool chunked = chunked_;
    const beast::error_code ec = session_->WriteAndWait([s = session_, payload, chunked](auto done) {
      auto on_written = [payload, done](beast::error_code ec, size_t) { done(ec); };
      if (chunked) {
        net::async_write(s->stream(), bhttp::make_chunk(net::buffer(*payload)), std::move(on_written));
      } else {
        net::async_write(s->stream(), net::buffer(*payload), std::move(on_written));
      }
    });
    return Settle(ec, State::kStreaming);
  }

  bool EndStream() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != State::kStreaming) return false;
    if (Gone()) {
      state_ = State::kFailed;
      return false;
    }
    if (!chunked_) {
      state_ = State::kStreamEnded;  // close-delimited: AfterResponse closes the connection
      return true;
    }
    const beast::error_code ec = session_->WriteAndWait(
        [s = session_](auto done) {
          net::async_write(s->stream(), bhttp::make_chunk_last(),
                           [done](beast::error_code ec, size_t) { done(ec); });
        },
        /*streaming_phase=*/false);
    reusable_ = !ec && stream_keep_alive_ && !session_->server()->stopping.load();
    return Settle(ec, State::kStreamEnded);
  }

  // Lock-free, so another thread (an engine deciding whether to cancel) may ask while a write is pending.
  bool ClientGone() const override { return Gone(); }

  // After the handler returned: answers for a handler that did not, then hands the connection back.
  void Finish(bool handler_threw) {
    bool unanswered;
    {
      std::lock_guard<std::mutex> lock(mu_);
      unanswered = state_ == State::kNone;
    }
    if (unanswered) {
      const bool stopping = session_->server()->stopping.load();
      const int status = stopping ? 503 : 500;
      const std::string message = stopping       ? "server shutting down"
                                  : handler_threw ? "handler failed"
                                                  : "handler sent no response";
      Send(status, "application/json", ErrorBody(message));
    }
    std::lock_guard<std::mutex> lock(mu_);
    session_->AfterResponse(reusable_ && (state_ == State::kSent || state_ == State::kStreamEnded));
  }

 private:
  enum class State { kNone, kSent, kStreaming, kStreamEnded, kFailed };

  static bool ValidStatus(int status) { return status >= 200 && status <= 599; }
  static bool StatusAllowsBody(int status) { return status != 204 && status != 304; }

  bool Settle(beast::error_code ec, State on_success) {
    if (ec) {
      gone_.store(true);
      state_ = State::kFailed;
      return false;
    }
    state_ = on_success;
    return true;
  }

  // Once true, stays true: a handler may ask again after its write failed. A client that half-closes its
  // side after sending the request (rare for HTTP clients) counts as gone too.
  bool Gone() const {
    if (gone_.load()) return true;
    if (state_.load() == State::kStreaming && session_->server()->stopping.load()) {
      gone_.store(true);
      return true;
    }
    pollfd p{};
    p.fd = session_->fd();
    p.events = POLLRDHUP;
    if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0) gone_.store(true);
    return gone_.load();
  }

  const std::shared_ptr<Session> session_;
  const unsigned version_;
  const bool keep_alive_;
  const bool chunked_;
  std::mutex mu_;  // one response call at a time
  std::atomic<State> state_{State::kNone};
  mutable std::atomic<bool> gone_{false};
  bool reusable_ = false;
  bool stream_keep_alive_ = false;
};

void Session::OnRequest() {
  bhttp::request<bhttp::string_body> msg = parser_->release();
  parser_.reset();
  version_ = msg.version();
  const bool keep_alive = msg.keep_alive();

  auto request = std::make_shared<Request>();
  request->method = ToStd(msg.method_string());
  request->target = ToStd(msg.target());
  const size_t q = request->target.find('?');
  request->path = request->target.substr(0, q);
  if (q != std::string::npos) request->query = request->target.substr(q + 1);
  for (const auto& field : msg) {
    std::string name = Lower(field.name_string());
    auto [it, inserted] = request->headers.emplace(std::move(name), ToStd(field.value()));
    if (!inserted) absl::StrAppend(&it->second, ", ", ToStd(field.value()));
  }
  request->body = std::move(msg.body());

  int status = 0;
  std::string allow;
  const Handler* handler = FindHandler(request->method, request->path, &status, &allow);
  if (handler == nullptr) {
    return WriteError(status, status == 404 ? "not found" : "method not allowed", keep_alive, allow);
  }
  phase_ = Phase::kHandling;
  auto writer = std::make_shared<Writer>(shared_from_this(), version_, keep_alive);
  const bool submitted = server_->pool->TrySubmit([handler, request, writer] {
    bool threw = false;
    try {
      (*handler)(*request, *writer);
    } catch (const std::exception& e) {
      // Handlers report errors as responses; one that throws is a bug, but it must not take the server down.
      std::cerr << "qforge http: handler for " << request->path << " threw: " << e.what() << "\n";
      threw = true;
    } catch (...) {
      threw = true;
    }
    writer->Finish(threw);
  });
  if (!submitted) {
    if (server_->stopping.load()) return Close();
    WriteError(503, "too many requests in flight", keep_alive);
  }
}

}  // namespace

struct HttpServer::Impl {
  ServerState state;
  std::optional<tcp::acceptor> acceptor;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::vector<std::thread> io_threads;
  std::mutex lifecycle_mu;
  bool started = false;
  bool stopped = false;
  std::atomic<int> port{0};  // no lock: a handler may ask while Shutdown holds lifecycle_mu

  void DoAccept() {
    acceptor->async_accept(net::make_strand(state.ioc), [this](beast::error_code ec, tcp::socket socket) {
      if (state.stopping.load() || ec == net::error::operation_aborted) return;
      if (ec) {
        // Out of file descriptors or similar: the next accept may succeed once connections close.
        std::cerr << "qforge http: accept failed: " << ec.message() << "\n";
        auto timer = std::make_shared<net::steady_timer>(acceptor->get_executor(), std::chrono::milliseconds(50));
        timer->async_wait([this, timer](beast::error_code) {
          if (!state.stopping.load()) DoAccept();
        });
        return;
      }
      auto session = std::make_shared<Session>(std::move(socket), &state);
      state.Register(session);
      session->Start();
      DoAccept();
    });
  }

  void RunIo() {
    for (;;) {
      try {
        state.ioc.run();
        return;
      } catch (const std::exception& e) {
        std::cerr << "qforge http: I/O thread caught: " << e.what() << "\n";
      }
    }
  }
};

HttpServer::HttpServer() : impl_(std::make_unique<Impl>()) {}

HttpServer::~HttpServer() { Shutdown(); }

void HttpServer::Route(const std::string& method, const std::string& path, Handler handler) {
  std::lock_guard<std::mutex> lock(impl_->lifecycle_mu);
  if (impl_->started) return;
  impl_->state.routes.by_path[path][method] = std::move(handler);
}

absl::Status HttpServer::Start(const HttpServerOptions& options) {
  std::lock_guard<std::mutex> lock(impl_->lifecycle_mu);
  if (impl_->started) return absl::FailedPreconditionError("HttpServer already started");
  if (options.threads < 1 || options.max_concurrent_handlers < 1 || options.port < 0 || options.port > 65535 ||
      options.idle_timeout_seconds < 1 || options.write_timeout_seconds < 1) {
    return absl::InvalidArgumentError("HttpServer: threads, max_concurrent_handlers and timeouts must be >= 1, "
                                      "port in [0, 65535]");
  }
  beast::error_code ec;
  const net::ip::address address = net::ip::make_address(options.address, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("HttpServer: bad address '", options.address, "'"));
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(options.port));

  Impl& impl = *impl_;
  impl.state.options = options;
  impl.acceptor.emplace(net::make_strand(impl.state.ioc));
  const std::string where = absl::StrCat(options.address, ":", options.port);
  impl.acceptor->open(endpoint.protocol(), ec);
  if (!ec) impl.acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl.acceptor->bind(endpoint, ec);
  if (!ec) impl.acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    impl.acceptor.reset();
    return absl::UnavailableError(absl::StrCat("HttpServer: cannot listen on ", where, ": ", ec.message()));
  }
  impl.port.store(impl.acceptor->local_endpoint(ec).port());
  impl.state.pool = std::make_unique<HandlerPool>(options.max_concurrent_handlers);
  impl.work.emplace(net::make_work_guard(impl.state.ioc));
  net::post(impl.acceptor->get_executor(), [&impl] { impl.DoAccept(); });
  for (int i = 0; i < options.threads; ++i) impl.io_threads.emplace_back([&impl] { impl.RunIo(); });
  impl.started = true;
  return absl::OkStatus();
}

int HttpServer::port() const { return impl_->port.load(); }

void HttpServer::Shutdown() {
  std::lock_guard<std::mutex> lock(impl_->lifecycle_mu);
  Impl& impl = *impl_;
  if (!impl.started || impl.stopped) return;
  impl.stopped = true;
  impl.state.stopping.store(true);
  std::promise<void> acceptor_closed;
  net::post(impl.acceptor->get_executor(), [&impl, &acceptor_closed] {
    beast::error_code ec;
    impl.acceptor->close(ec);
    acceptor_closed.set_value();
  });
  // After this no session can be added: the acceptor is closed on its strand.
  acceptor_closed.get_future().wait();
  for (const auto& session : impl.state.LiveSessions()) session->OnServerStopping();
  impl.state.pool->Stop();  // in-flight handlers finish; their connections then close
  for (const auto& session : impl.state.LiveSessions()) session->ForceClose();
  impl.work.reset();
  for (std::thread& t : impl.io_threads) t.join();
  impl.io_threads.clear();
}

}  // namespace qforge::http
