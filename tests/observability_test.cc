// End to end, the monitoring that deploy/ ships: a real Prometheus (Debian's binary) scrapes a real
// qforge-scheduler, two qforge-workers and a qforge-server, with deploy/prometheus/qforge-rules.yml loaded, while
// a quantize job runs and completions are served. Then every query of every panel of deploy/grafana/*.json
// (template variables substituted as Grafana would) is evaluated through Prometheus's HTTP API and must return at
// least one series with a finite value (a panel of NaNs draws nothing), and so must every recording rule; a
// healthy cluster fires no alert.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/formats/json.h"
#include "gtest/gtest.h"
#include "qforge/v1/inference.grpc.pb.h"
#include "tests/cluster.h"
#include "tests/http_client.h"
#include "tests/server_process.h"

namespace qforge {
namespace {

namespace v1 = qforge::v1;
using formats::Json;

constexpr char kPrometheus[] = "/usr/bin/prometheus";
const std::string kGrafanaDir = std::string(QFORGE_SOURCE_DIR) + "/deploy/grafana";
const std::string kRules = std::string(QFORGE_SOURCE_DIR) + "/deploy/prometheus/qforge-rules.yml";

// One query of a dashboard panel.
struct PanelQuery {
  std::string where;  // "qforge-serving.json: Tokens per second [A]"
  std::string expr;   // with template variables substituted
};

// What Grafana puts in for its variables. The ranges cover the whole test (Prometheus runs for well under five
// minutes), so a rate sees every increase since the first scrape; $model is the "All" value (allValue ".*").
std::string SubstituteVariables(std::string expr) {
  static const std::vector<std::pair<std::string, std::string>> kValues = {
      {"${__rate_interval}", "5m"}, {"$__rate_interval", "5m"}, {"${__range_s}", "300"}, {"$__range_s", "300"},
      {"${__range}", "5m"},         {"$__range", "5m"},         {"${__interval}", "5s"}, {"$__interval", "5s"},
      {"${model}", ".*"},           {"$model", ".*"}};
  for (const auto& [name, value] : kValues) {
    for (size_t at; (at = expr.find(name)) != std::string::npos;) expr.replace(at, name.size(), value);
  }
  return expr;
}

void CollectPanelQueries(const std::string& file, const Json& panels, std::vector<PanelQuery>* out) {
  if (!panels.is_array()) return;
  for (const Json& panel : panels.array()) {
    const Json* title = panel.Find("title");
    if (const Json* targets = panel.Find("targets"); targets != nullptr && targets->is_array()) {
      for (const Json& target : targets->array()) {
        const Json* expr = target.Find("expr");
        const Json* ref = target.Find("refId");
        if (expr == nullptr || !expr->is_string()) continue;
        out->push_back({file + ": " + (title != nullptr && title->is_string() ? title->string_value() : "?") + " [" +
                            (ref != nullptr && ref->is_string() ? ref->string_value() : "?") + "]",
                        SubstituteVariables(expr->string_value())});
      }
    }
    if (const Json* nested = panel.Find("panels"); nested != nullptr) CollectPanelQueries(file, *nested, out);
  }
}

// Every panel query of every dashboard, and the label_values(METRIC, LABEL) queries of their variables.
struct Dashboards {
  std::vector<PanelQuery> queries;
  std::vector<std::pair<std::string, std::string>> label_values;  // (metric, label)
  std::vector<std::string> files;
};

Dashboards ReadDashboards() {
  Dashboards d;
  std::vector<std::filesystem::path> paths;
  for (const auto& entry : std::filesystem::directory_iterator(kGrafanaDir)) {
    if (entry.path().extension() == ".json") paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());
  const std::regex label_values(R"(^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$)");
  for (const auto& path : paths) {
    const std::string file = path.filename().string();
    d.files.push_back(file);
    auto json = formats::ParseJson(testing::ReadFile(path.string()));
    EXPECT_TRUE(json.ok()) << file << ": " << json.status();
    if (!json.ok()) continue;
    const Json* schema = json->Find("schemaVersion");
    EXPECT_TRUE(schema != nullptr && schema->is_number() && schema->number_value() >= 36) << file;
    // A Prometheus datasource variable, so the dashboard imports into any Grafana.
    bool datasource_variable = false;
    if (const Json* list = json->Find("templating") ? json->Find("templating")->Find("list") : nullptr;
        list != nullptr && list->is_array()) {
      for (const Json& v : list->array()) {
        const Json* type = v.Find("type");
        const Json* query = v.Find("query");
        if (type == nullptr || !type->is_string()) continue;
        if (type->string_value() == "datasource" && query != nullptr && query->is_string() &&
            query->string_value() == "prometheus") {
          datasource_variable = true;
        }
        if (type->string_value() == "query") {
          const Json* q = query != nullptr && query->is_object() ? query->Find("query") : query;
          const std::string text = q != nullptr && q->is_string() ? q->string_value() : "";
          std::smatch m;
          if (std::regex_match(text, m, label_values)) {
            d.label_values.emplace_back(m[1], m[2]);
          } else {
            ADD_FAILURE() << file << ": variable query '" << text << "' is not label_values(METRIC, LABEL)";
          }
        }
      }
    }
    EXPECT_TRUE(datasource_variable) << file << " has no Prometheus datasource variable";
    const size_t before = d.queries.size();
    if (const Json* panels = json->Find("panels"); panels != nullptr) CollectPanelQueries(file, *panels, &d.queries);
    EXPECT_GT(d.queries.size(), before) << file << " has no panel queries";
  }
  return d;
}

// The names of the recording rules in the rules file ("record: NAME" lines).
std::vector<std::string> RecordingRules() {
  std::vector<std::string> names;
  std::istringstream in(testing::ReadFile(kRules));
  const std::regex record(R"(^\s*-?\s*record:\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*$)");
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_match(line, m, record)) names.push_back(m[1]);
  }
  return names;
}

// A Prometheus process with its config, rules and storage under `dir`; killed and reaped on destruction.
class Prometheus {
 public:
  Prometheus(const std::string& dir, const std::string& config) : dir_(dir) {
    std::ofstream(dir + "/prometheus.yml") << config;
    port_ = testing::PickFreePort();
    pid_ = testing::Spawn({kPrometheus, "--config.file=" + dir + "/prometheus.yml", "--storage.tsdb.path=" + dir + "/tsdb",
                           "--web.listen-address=127.0.0.1:" + std::to_string(port_)},
                          dir + "/prometheus.log");
  }
  ~Prometheus() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 250; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  bool exited() {
    if (pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == pid_) pid_ = 0;  // reaped: never wait on it again
    return pid_ <= 0;
  }
  std::string log() const { return testing::ReadFile(dir_ + "/prometheus.log"); }

  // data.result of an instant query; nullopt (with the reason in *error) when the query fails.
  std::optional<Json::Array> Query(const std::string& promql, std::string* error = nullptr) {
    return Result(testing::HttpRequest(port_, "GET", "/api/v1/query?query=" + testing::UrlEncode(promql)), error);
  }
  // data of /api/v1/label/LABEL/values restricted to series of `metric`.
  std::optional<Json::Array> LabelValues(const std::string& metric, const std::string& label) {
    return Result(testing::HttpRequest(port_, "GET", "/api/v1/label/" + label + "/values?match[]=" +
                                                     testing::UrlEncode(metric)),
                  nullptr);
  }

 private:
  static std::optional<Json::Array> Result(const testing::HttpResponse& r, std::string* error) {
    auto json = formats::ParseJson(r.body);
    const Json* status = json.ok() ? json->Find("status") : nullptr;
    if (r.status != 200 || status == nullptr || !status->is_string() || status->string_value() != "success") {
      if (error != nullptr) *error = "HTTP " + std::to_string(r.status) + ": " + r.body;
      return std::nullopt;
    }
    const Json* data = json->Find("data");
    const Json* result = data != nullptr && data->is_object() ? data->Find("result") : data;
    if (result == nullptr || !result->is_array()) {
      if (error != nullptr) *error = "no result array: " + r.body;
      return std::nullopt;
    }
    return result->array();
  }

  std::string dir_;
  int port_ = 0;
  pid_t pid_ = 0;
};

// The value of an instant-query sample ({"metric": {...}, "value": [time, "V"]}); NaN when malformed.
double SampleValue(const Json& sample) {
  const Json* value = sample.Find("value");
  if (value == nullptr || !value->is_array() || value->array().size() != 2 || !value->array()[1].is_string()) {
    return std::nan("");
  }
  return std::strtod(value->array()[1].string_value().c_str(), nullptr);  // Prometheus writes "NaN", "+Inf" too
}

TEST(ObservabilityTest, EveryDashboardPanelAndRecordingRuleHasDataFromARealCluster) {
  // The files' structure is checked even where Prometheus is missing.
  const Dashboards dashboards = ReadDashboards();
  ASSERT_GE(dashboards.files.size(), 2u) << "dashboards in " << kGrafanaDir;
  const std::vector<std::string> records = RecordingRules();
  ASSERT_GE(records.size(), 5u) << kRules;
  if (!std::filesystem::exists(kPrometheus)) GTEST_SKIP() << "needs Debian's prometheus package";

  const std::string dir = testing::TempDir("observability");
  // Declared before the processes, so it runs after they are gone. A failed run keeps the logs for reading.
  struct RemoveOnSuccess {
    std::string dir;
    ~RemoveOnSuccess() {
      if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
    }
  } remove_on_success{dir};
  testing::Cluster cluster(dir + "/cluster", {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  const int worker_ports[2] = {testing::PickFreePort(), testing::PickFreePort()};
  cluster.StartWorker("w1", 1, worker_ports[0]);
  cluster.StartWorker("w2", 1, worker_ports[1]);
  testing::ServerProcess server(dir, {"--scheduler", cluster.address()});
  ASSERT_GT(server.http_port(), 0);

  // The scrape jobs are named as k8s/monitoring's PodMonitors name them, which the rules rely on.
  auto target = [](int port) { return "'127.0.0.1:" + std::to_string(port) + "'"; };
  std::ostringstream config;
  config << "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
         << "rule_files:\n  - " << kRules << "\n"
         << "scrape_configs:\n"
         << "  - job_name: qforge-scheduler\n    static_configs:\n      - targets: ["
         << target(cluster.scheduler_metrics_port()) << "]\n"
         << "  - job_name: qforge-worker\n    static_configs:\n      - targets: [" << target(worker_ports[0]) << ", "
         << target(worker_ports[1]) << "]\n"
         << "  - job_name: qforge-server\n    static_configs:\n      - targets: [" << target(server.http_port()) << "]\n";
  Prometheus prometheus(dir, config.str());

  // Bounded waits throughout: each polls until its condition holds or its deadline passes.
  auto wait_for = [&](int seconds, const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (std::chrono::steady_clock::now() < deadline) {
      if (prometheus.exited()) return false;
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    return false;
  };
  // All four targets scraped successfully before the load starts, so rates see it happen.
  ASSERT_TRUE(wait_for(30, [&] {
    auto up = prometheus.Query("up == 1");
    return up.has_value() && up->size() == 4;
  })) << prometheus.log();

  // Load: a quantize job over both workers, then completions against the version it made.
  v1::SubmitJobRequest submit;
  submit.set_source_uri(testing::Stories260KPath());
  submit.set_output_name("stories");
  submit.mutable_recipe()->mutable_defaults()->set_method("q8_0");
  std::string job_id;
  ASSERT_TRUE(cluster.Submit(submit, &job_id).ok());
  ASSERT_EQ(cluster.WaitJob(job_id, 60).progress().state(), v1::JOB_STATE_SUCCEEDED);
  {
    v1::LoadModelResponse loaded;
    const grpc::Status s = server.LoadStored("stories", "1", testing::Tok512Path(), &loaded);
    ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << server.log();
  }
  // Completions go on while the queries are evaluated, so rate() windows always hold fresh increases.
  std::atomic<bool> stop_load{false};
  std::atomic<int> completions{0};
  std::thread load([&] {
    const std::string body = R"({"model": "stories@1", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0})";
    while (!stop_load) {
      if (testing::HttpRequest(server.http_port(), "POST", "/v1/completions", body).status == 200) ++completions;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  struct JoinOnExit {
    std::atomic<bool>& stop;
    std::thread& t;
    ~JoinOnExit() {
      stop = true;
      t.join();
    }
  } join_load{stop_load, load};

  // Every panel query and every recording rule returns a series (recording rules run every second).
  std::map<std::string, std::string> missing;  // where -> last answer
  auto all_have_series = [&] {
    missing.clear();
    for (const PanelQuery& q : dashboards.queries) {
      std::string error;
      auto result = prometheus.Query(q.expr, &error);
      if (!result.has_value() || result->empty()) {
        missing[q.where] = q.expr + " -> " + (result ? "no series" : error);
      } else if (std::none_of(result->begin(), result->end(), [](const Json& s) { return std::isfinite(SampleValue(s)); })) {
        missing[q.where] = q.expr + " -> only NaN / Inf";  // a panel that draws nothing
      }
    }
    for (const std::string& record : records) {
      auto result = prometheus.Query(record);
      if (!result.has_value() || result->empty()) {
        missing["recording rule " + record] = "no series";
      } else if (std::none_of(result->begin(), result->end(), [](const Json& s) { return std::isfinite(SampleValue(s)); })) {
        missing["recording rule " + record] = "only NaN / Inf";
      }
    }
    for (const auto& [metric, label] : dashboards.label_values) {
      auto values = prometheus.LabelValues(metric, label);
      if (!values.has_value() || values->empty()) missing["variable label_values(" + metric + ", " + label + ")"] = "empty";
    }
    return missing.empty();
  };
  const bool complete = wait_for(40, all_have_series);
  for (const auto& [where, why] : missing) ADD_FAILURE() << where << ": " << why;
  ASSERT_TRUE(complete) << prometheus.log();
  EXPECT_GT(completions.load(), 0);
  EXPECT_GE(dashboards.queries.size(), 30u);

  // The GiB-hours panels rest on the byte-seconds counter: it grows at the rate of the bytes held.
  double ratio = 0;
  EXPECT_TRUE(wait_for(20, [&] {
    auto r = prometheus.Query(
        "sum(rate(qforge_model_memory_byte_seconds_total{weights=\"served\"}[10s])) / sum(qforge_model_weight_bytes)");
    ratio = r.has_value() && r->size() == 1 ? SampleValue((*r)[0]) : 0;
    return ratio > 0.8 && ratio < 1.25;
  })) << "byte-seconds rate / bytes held = " << ratio;
  // Both workers report utilisation; the job ran on them, so at least one was busy.
  auto utilisation = prometheus.Query("instance:qforge_worker_utilisation:rate5m");
  ASSERT_TRUE(utilisation.has_value());
  EXPECT_EQ(utilisation->size(), 2u);
  double busiest = 0;
  for (const Json& s : *utilisation) busiest = std::max(busiest, SampleValue(s));
  EXPECT_GT(busiest, 0);
  EXPECT_LE(busiest, 1.0);
  // A healthy cluster raises no alert.
  auto firing = prometheus.Query("ALERTS{alertstate=\"firing\"}");
  ASSERT_TRUE(firing.has_value());
  EXPECT_TRUE(firing->empty()) << firing->size() << " alerts firing";
}

}  // namespace
}  // namespace qforge
