// End to end: a Registry served on /metrics by qforge_http, scraped by a real Prometheus server (Debian's
// prometheus package) every second, and read back through Prometheus's query API.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "boost/asio/io_context.hpp"
#include "boost/asio/ip/tcp.hpp"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"
#include "gtest/gtest.h"
#include "services/http/http_server.h"
#include "services/metrics/energy.h"
#include "services/metrics/process_metrics.h"
#include "services/metrics/registry.h"
#include "tests/http_client.h"

namespace qforge::metrics {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

constexpr char kPrometheus[] = "/usr/bin/prometheus";

// A GET to 127.0.0.1:port; nullopt when the connection or the exchange fails.
std::optional<bhttp::response<bhttp::string_body>> Get(int port, const std::string& target) {
  net::io_context ioc;
  tcp::socket socket(ioc);
  beast::error_code ec;
  socket.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
  if (ec) return std::nullopt;
  bhttp::request<bhttp::empty_body> req(bhttp::verb::get, target, 11);
  req.set(bhttp::field::host, "127.0.0.1");
  req.keep_alive(false);
  bhttp::write(socket, req, ec);
  if (ec) return std::nullopt;
  beast::flat_buffer buffer;
  bhttp::response<bhttp::string_body> res;
  bhttp::read(socket, buffer, res, ec);
  if (ec) return std::nullopt;
  return res;
}

// The value of the first sample in an instant-query answer:
// {"status":"success","data":{"resultType":"vector","result":[{"metric":{...},"value":[<time>,"<value>"]}]}}
std::optional<std::string> FirstValue(const std::string& json) {
  if (json.find("\"status\":\"success\"") == std::string::npos) return std::nullopt;
  const size_t value = json.find("\"value\":[");
  if (value == std::string::npos) return std::nullopt;
  const size_t comma = json.find(",\"", value);
  if (comma == std::string::npos) return std::nullopt;
  const size_t end = json.find('"', comma + 2);
  if (end == std::string::npos) return std::nullopt;
  return json.substr(comma + 2, end - comma - 2);
}

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A prometheus process with its config and storage in a temp dir; killed and reaped on destruction.
class PrometheusProcess {
 public:
  PrometheusProcess(int target_port) {
    dir_ = std::filesystem::temp_directory_path() / ("qforge_prometheus_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ / "data");
    std::ofstream(dir_ / "prometheus.yml") << "global:\n"
                                              "  scrape_interval: 1s\n"
                                              "  scrape_timeout: 1s\n"
                                              "scrape_configs:\n"
                                              "  - job_name: qforge\n"
                                              "    static_configs:\n"
                                              "      - targets: ['127.0.0.1:"
                                           << target_port << "']\n";
    web_port_ = FreePort();
    const std::vector<std::string> argv = {
        kPrometheus,
        "--config.file=" + (dir_ / "prometheus.yml").string(),
        "--storage.tsdb.path=" + (dir_ / "data").string(),
        "--web.listen-address=127.0.0.1:" + std::to_string(web_port_),
    };
    const std::string log = (dir_ / "prometheus.log").string();
    pid_ = ::fork();
    if (pid_ == 0) {
      FILE* f = std::fopen(log.c_str(), "a");
      if (f != nullptr) {
        ::dup2(::fileno(f), 1);
        ::dup2(::fileno(f), 2);
      }
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
  }

  ~PrometheusProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      bool reaped = false;
      for (int i = 0; i < 500 && !reaped; ++i) {
        reaped = ::waitpid(pid_, &status, WNOHANG) == pid_;
        if (!reaped) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (!reaped) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
      }
    }
    std::filesystem::remove_all(dir_);
  }

  bool exited() {
    int status = 0;
    return pid_ <= 0 || ::waitpid(pid_, &status, WNOHANG) == pid_;
  }
  std::string log() const { return ReadFile(dir_ / "prometheus.log"); }

  // The first sample of an instant query, or nullopt while there is none (or Prometheus is not up yet).
  std::optional<std::string> Query(const std::string& promql) {
    auto res = Get(web_port_, "/api/v1/query?query=" + testing::UrlEncode(promql));
    if (!res.has_value() || res->result_int() != 200) return std::nullopt;
    return FirstValue(res->body());
  }

 private:
  std::filesystem::path dir_;
  int web_port_ = 0;
  pid_t pid_ = -1;
};

TEST(PrometheusScrapeTest, RealPrometheusScrapesMetricsEndpoint) {
  ASSERT_TRUE(std::filesystem::exists(kPrometheus)) << "install Debian's prometheus package "
                                                       "(scripts/install-deps.sh)";
  Registry registry;
  Counter* requests = *registry.GetCounter("qforge_test_requests_total", "Requests in this test.",
                                           {{"route", "/v1/completions"}});
  requests->Inc(3);
  Histogram* latency = *registry.GetHistogram("qforge_test_latency_seconds", "Latency in this test.",
                                              {0.1, 1}, {{"route", "/v1/completions"}});
  latency->Observe(0.05);
  latency->Observe(0.5);
  EnergyOptions estimate;
  estimate.powercap_root = "/nonexistent";
  estimate.nvml_library = "";
  estimate.estimate_watts = 50;
  EnergyMeter meter(estimate);
  meter.AddBusySeconds(2);  // 100 J
  RegisterProcessCollectors(registry, &meter);

  http::HttpServer server;
  server.Route("GET", "/metrics", [&registry](const http::Request&, http::ResponseWriter& w) {
    w.Send(200, kTextContentType, registry.Render());
  });
  ASSERT_TRUE(server.Start({}).ok());

  auto own = Get(server.port(), "/metrics");
  ASSERT_TRUE(own.has_value());
  EXPECT_EQ(std::string((*own)[bhttp::field::content_type]), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_NE(own->body().find("qforge_test_requests_total{route=\"/v1/completions\"} 3\n"), std::string::npos);

  PrometheusProcess prometheus(server.port());
  // Bounded wait: Prometheus starts, then scrapes every second.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::optional<std::string> up, requests_seen, latency_count, energy;
  while (std::chrono::steady_clock::now() < deadline) {
    ASSERT_FALSE(prometheus.exited()) << "prometheus exited:\n" << prometheus.log();
    up = prometheus.Query("up{job=\"qforge\"}");
    requests_seen = prometheus.Query("qforge_test_requests_total{route=\"/v1/completions\"}");
    latency_count = prometheus.Query("qforge_test_latency_seconds_bucket{le=\"0.1\"}");
    energy = prometheus.Query("qforge_energy_joules_total{source=\"estimate\"}");
    if (up == "1" && requests_seen.has_value() && latency_count.has_value() && energy.has_value()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  EXPECT_EQ(up, "1") << prometheus.log();
  EXPECT_EQ(requests_seen, "3") << prometheus.log();
  EXPECT_EQ(latency_count, "1");
  EXPECT_EQ(energy, "100");
  // Prometheus took every sample the endpoint exposes: the counter, 5 histogram lines (2 buckets, +Inf, sum,
  // count), resident bytes, energy and power.
  EXPECT_EQ(prometheus.Query("scrape_samples_scraped{job=\"qforge\"}"), "9");
  server.Shutdown();
}

}  // namespace
}  // namespace qforge::metrics
