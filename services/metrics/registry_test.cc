// Registry rendering against golden text written from the exposition format spec
// (https://prometheus.io/docs/instrumenting/exposition_formats/, "Text format details"), validation, and
// concurrency; then `promtool check metrics` on a registry using every type.
#include "services/metrics/registry.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "services/metrics/energy.h"
#include "services/metrics/process_metrics.h"

namespace qforge::metrics {
namespace {

template <typename T>
T* Ok(absl::StatusOr<T*> v) {
  EXPECT_TRUE(v.ok()) << v.status();
  return v.ok() ? *v : nullptr;
}

TEST(RegistryTest, CounterRendersExactly) {
  Registry r;
  // Label order at the call does not matter; the series renders with its labels sorted by name.
  Ok(r.GetCounter("http_requests_total", "The total number of HTTP requests.",
                  {{"method", "post"}, {"code", "200"}}))
      ->Inc(1027);
  Ok(r.GetCounter("http_requests_total", "The total number of HTTP requests.",
                  {{"code", "400"}, {"method", "post"}}))
      ->Inc(3);
  EXPECT_EQ(r.Render(),
            "# HELP http_requests_total The total number of HTTP requests.\n"
            "# TYPE http_requests_total counter\n"
            "http_requests_total{code=\"200\",method=\"post\"} 1027\n"
            "http_requests_total{code=\"400\",method=\"post\"} 3\n");
}

TEST(RegistryTest, GaugeRendersExactly) {
  Registry r;
  Gauge* depth = Ok(r.GetGauge("qforge_queue_depth", "Requests waiting."));
  depth->Set(4);
  depth->Add(-6.5);
  EXPECT_EQ(depth->value(), -2.5);
  Ok(r.GetGauge("metric_without_timestamp_and_labels", "Minimalistic line."))->Set(12.47);
  EXPECT_EQ(r.Render(),
            "# HELP metric_without_timestamp_and_labels Minimalistic line.\n"
            "# TYPE metric_without_timestamp_and_labels gauge\n"
            "metric_without_timestamp_and_labels 12.47\n"
            "# HELP qforge_queue_depth Requests waiting.\n"
            "# TYPE qforge_queue_depth gauge\n"
            "qforge_queue_depth -2.5\n");
}

TEST(RegistryTest, HistogramRendersCumulativeBucketsSumAndCount) {
  Registry r;
  Histogram* h = Ok(r.GetHistogram("qforge_request_seconds", "Request latency.", {0.25, 0.5, 1, 2},
                                   {{"model", "stories"}}));
  // A value equal to a bound belongs to that bucket (le = "less than or equal").
  for (double v : {0.125, 0.25, 0.5, 0.75, 1.5, 3.0, 8.0}) h->Observe(v);
  h->Observe(std::nan(""));  // ignored
  Ok(r.GetHistogram("qforge_idle_seconds", "Nothing observed yet.", ExponentialBuckets(1, 10, 2)));
  EXPECT_EQ(r.Render(),
            "# HELP qforge_idle_seconds Nothing observed yet.\n"
            "# TYPE qforge_idle_seconds histogram\n"
            "qforge_idle_seconds_bucket{le=\"1\"} 0\n"
            "qforge_idle_seconds_bucket{le=\"10\"} 0\n"
            "qforge_idle_seconds_bucket{le=\"+Inf\"} 0\n"
            "qforge_idle_seconds_sum 0\n"
            "qforge_idle_seconds_count 0\n"
            "# HELP qforge_request_seconds Request latency.\n"
            "# TYPE qforge_request_seconds histogram\n"
            "qforge_request_seconds_bucket{model=\"stories\",le=\"0.25\"} 2\n"
            "qforge_request_seconds_bucket{model=\"stories\",le=\"0.5\"} 3\n"
            "qforge_request_seconds_bucket{model=\"stories\",le=\"1\"} 4\n"
            "qforge_request_seconds_bucket{model=\"stories\",le=\"2\"} 5\n"
            "qforge_request_seconds_bucket{model=\"stories\",le=\"+Inf\"} 7\n"
            "qforge_request_seconds_sum{model=\"stories\"} 14.125\n"
            "qforge_request_seconds_count{model=\"stories\"} 7\n");
  EXPECT_EQ(h->CumulativeCounts(), (std::vector<uint64_t>{2, 3, 4, 5, 7}));
  EXPECT_EQ(h->sum(), 14.125);
}

TEST(RegistryTest, EscapesLabelValuesAndHelp) {
  Registry r;
  // The spec's own example of escaping in label values.
  Ok(r.GetGauge("msdos_file_access_time_seconds", "Last access.\nA \\ backslash and \"quotes\" stay.",
                {{"path", "C:\\DIR\\FILE.TXT"}, {"error", "Cannot find file:\n\"FILE.TXT\""}}))
      ->Set(1.458255915e9);
  EXPECT_EQ(r.Render(),
            "# HELP msdos_file_access_time_seconds Last access.\\nA \\\\ backslash and \"quotes\" stay.\n"
            "# TYPE msdos_file_access_time_seconds gauge\n"
            "msdos_file_access_time_seconds{error=\"Cannot find file:\\n\\\"FILE.TXT\\\"\","
            "path=\"C:\\\\DIR\\\\FILE.TXT\"} 1.458255915e+09\n");
}

TEST(RegistryTest, FamiliesSortedByNameAndSeriesByLabels) {
  Registry r;
  Ok(r.GetGauge("zeta_value", "Z.", {{"k", "b"}}))->Set(2);
  Ok(r.GetGauge("zeta_value", "Z.", {{"k", "a"}}))->Set(1);
  Ok(r.GetCounter("alpha_total", "A."))->Inc();
  EXPECT_EQ(r.Render(),
            "# HELP alpha_total A.\n# TYPE alpha_total counter\nalpha_total 1\n"
            "# HELP zeta_value Z.\n# TYPE zeta_value gauge\nzeta_value{k=\"a\"} 1\nzeta_value{k=\"b\"} 2\n");
}

TEST(RegistryTest, FormatsValuesAsGoDoes) {
  EXPECT_EQ(FormatValue(0), "0");
  EXPECT_EQ(FormatValue(-0.0), "-0");
  EXPECT_EQ(FormatValue(1), "1");
  EXPECT_EQ(FormatValue(-1), "-1");
  EXPECT_EQ(FormatValue(0.1), "0.1");
  EXPECT_EQ(FormatValue(1027), "1027");
  EXPECT_EQ(FormatValue(123456), "123456");
  EXPECT_EQ(FormatValue(1e6), "1e+06");
  EXPECT_EQ(FormatValue(1234567), "1.234567e+06");
  EXPECT_EQ(FormatValue(-3982045), "-3.982045e+06");
  EXPECT_EQ(FormatValue(0.0001), "0.0001");
  EXPECT_EQ(FormatValue(0.00001), "1e-05");
  EXPECT_EQ(FormatValue(1.5e-5), "1.5e-05");
  EXPECT_EQ(FormatValue(1e100), "1e+100");
  EXPECT_EQ(FormatValue(5e-324), "5e-324");
  EXPECT_EQ(FormatValue(0.30000000000000004), "0.30000000000000004");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatValue(std::nan("")), "NaN");
}

TEST(RegistryTest, SameNameAndLabelsReturnSameObject) {
  Registry r;
  Counter* a = Ok(r.GetCounter("x_total", "X.", {{"a", "1"}, {"b", "2"}}));
  Counter* b = Ok(r.GetCounter("x_total", "X.", {{"b", "2"}, {"a", "1"}}));
  Counter* other = Ok(r.GetCounter("x_total", "X.", {{"a", "1"}, {"b", "3"}}));
  EXPECT_EQ(a, b);
  EXPECT_NE(a, other);
  // Many more series do not move the first one.
  for (int i = 0; i < 1000; ++i) Ok(r.GetCounter("x_total", "X.", {{"a", std::to_string(i)}}));
  EXPECT_EQ(Ok(r.GetCounter("x_total", "X.", {{"b", "2"}, {"a", "1"}})), a);
}

TEST(RegistryTest, RejectsInvalidNamesLabelsAndHelp) {
  Registry r;
  for (const std::string bad : {"", "1abc", "has-dash", "has space", "recording:rule", "__reserved", "ümlaut"}) {
    EXPECT_EQ(r.GetGauge(bad, "h").status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(r.GetCounter("requests", "h").status().code(), absl::StatusCode::kInvalidArgument);  // no _total
  EXPECT_EQ(r.GetGauge("ok_name", "").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.GetGauge("ok_name", "bad \xff utf-8").status().code(), absl::StatusCode::kInvalidArgument);
  for (const std::string bad : {"", "1x", "a-b", "__name__"}) {
    EXPECT_EQ(r.GetGauge("ok_name", "h", {{bad, "v"}}).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(r.GetGauge("ok_name", "h", {{"a", "1"}, {"a", "2"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Overlong '/', a lone surrogate, beyond U+10FFFF, truncated sequence.
  for (const std::string bad : {"\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x82"}) {
    EXPECT_EQ(r.GetGauge("ok_name", "h", {{"v", bad}}).status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(r.GetGauge("ok_name", "h", {{"v", "naïve ☃ 𝄞"}}).ok());
  EXPECT_EQ(r.GetHistogram("lat_seconds", "h", {1, 2}, {{"le", "1"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.GetHistogram("lat_seconds", "h", {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.GetHistogram("lat_seconds", "h", {2, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.GetHistogram("lat_seconds", "h", {1, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.GetHistogram("lat_seconds", "h", {1, std::nan("")}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.GetHistogram("lat_seconds", "h", ExponentialBuckets(0, 2, 3)).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A trailing +Inf is the implied last bucket.
  Histogram* with_inf =
      Ok(r.GetHistogram("lat_seconds", "h", {1, 2, std::numeric_limits<double>::infinity()}));
  EXPECT_EQ(with_inf->bounds(), (std::vector<double>{1, 2}));
  EXPECT_EQ(Ok(r.GetHistogram("lat_seconds", "h", {1, 2})), with_inf);
  // Nothing invalid was registered.
  EXPECT_EQ(r.Render().find("requests"), std::string::npos);
}

TEST(RegistryTest, RejectsMixedTypesHelpAndBuckets) {
  Registry r;
  ASSERT_TRUE(r.GetCounter("jobs_total", "Jobs.").ok());
  EXPECT_EQ(r.GetGauge("jobs_total", "Jobs.").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.GetHistogram("jobs_total", "Jobs.", {1}).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.GetCounter("jobs_total", "Other help.").status().code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(r.GetHistogram("wait_seconds", "W.", {1, 2}).ok());
  EXPECT_EQ(r.GetHistogram("wait_seconds", "W.", {1, 3}, {{"a", "b"}}).status().code(),
            absl::StatusCode::kAlreadyExists);
  // Sample names must not collide either way round.
  EXPECT_EQ(r.GetGauge("wait_seconds_count", "C.").status().code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(r.GetGauge("size_bytes_sum", "S.").ok());
  EXPECT_EQ(r.GetHistogram("size_bytes", "S.", {1}).status().code(), absl::StatusCode::kAlreadyExists);
}

TEST(RegistryTest, ConcurrentUpdatesAddUpExactly) {
  Registry r;
  constexpr int kThreads = 8;
  constexpr int kPerThread = 100000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&r, t] {
      // Every thread looks the metrics up itself, racing on creation too.
      Counter* c = Ok(r.GetCounter("ops_total", "Ops."));
      Gauge* g = Ok(r.GetGauge("level", "Level."));
      Histogram* h = Ok(r.GetHistogram("size_bytes", "Sizes.", {10, 100}));
      for (int i = 0; i < kPerThread; ++i) {
        c->Inc();
        g->Add(t % 2 == 0 ? 2 : -1);
        h->Observe(i % 3 == 0 ? 5 : 50);
      }
    });
  }
  // Scrapes while the updates run must not disturb them.
  for (int i = 0; i < 20; ++i) r.Render();
  for (auto& t : threads) t.join();
  EXPECT_EQ(Ok(r.GetCounter("ops_total", "Ops."))->value(), double{kThreads} * kPerThread);
  EXPECT_EQ(Ok(r.GetGauge("level", "Level."))->value(), double{kThreads / 2} * kPerThread);
  Histogram* h = Ok(r.GetHistogram("size_bytes", "Sizes.", {10, 100}));
  const uint64_t small_per_thread = (kPerThread + 2) / 3;
  EXPECT_EQ(h->CumulativeCounts(), (std::vector<uint64_t>{kThreads * small_per_thread,
                                                          uint64_t{kThreads} * kPerThread,
                                                          uint64_t{kThreads} * kPerThread}));
  EXPECT_EQ(h->sum(), kThreads * (5.0 * small_per_thread + 50.0 * (kPerThread - small_per_thread)));
}

TEST(RegistryTest, CounterIgnoresDecrements) {
  Registry r;
  Counter* c = Ok(r.GetCounter("c_total", "C."));
  c->Inc(2.5);
  c->Inc(-1);
  c->Inc(std::nan(""));
  EXPECT_EQ(c->value(), 2.5);
}

TEST(RegistryTest, CollectorsRunAtEveryRender) {
  Registry r;
  int scrapes = 0;
  r.AddCollector([&scrapes](Registry& reg) {
    ++scrapes;
    Ok(reg.GetGauge("scrapes_seen", "Renders so far."))->Set(scrapes);
  });
  EXPECT_NE(r.Render().find("scrapes_seen 1\n"), std::string::npos);
  EXPECT_NE(r.Render().find("scrapes_seen 2\n"), std::string::npos);
}

TEST(RegistryTest, ExponentialBuckets) {
  EXPECT_EQ(ExponentialBuckets(1, 2, 4), (std::vector<double>{1, 2, 4, 8}));
  EXPECT_EQ(ExponentialBuckets(0.001, 10, 3).size(), 3u);
  EXPECT_TRUE(ExponentialBuckets(0, 2, 3).empty());
  EXPECT_TRUE(ExponentialBuckets(1, 1, 3).empty());
  EXPECT_TRUE(ExponentialBuckets(1, 2, 0).empty());
}

// Runs `promtool check metrics` on `text`; returns its exit code and puts what it printed in *output.
int PromtoolCheck(const std::string& text, std::string* output) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("qforge_promtool_" + std::to_string(::getpid()) + ".txt")).string();
  {
    std::ofstream out(path);
    out << text;
  }
  const std::string command = "/usr/bin/promtool check metrics < " + path + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return -1;
  char buf[4096];
  size_t n;
  output->clear();
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) output->append(buf, n);
  const int status = ::pclose(pipe);
  std::filesystem::remove(path);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(PromtoolTest, AcceptsEveryTypeWithLabels) {
  ASSERT_TRUE(std::filesystem::exists("/usr/bin/promtool")) << "install Debian's prometheus package "
                                                               "(scripts/install-deps.sh)";
  Registry r;
  Ok(r.GetCounter("qforge_requests_total", "Requests served, by route and status code.",
                  {{"route", "/v1/completions"}, {"code", "200"}}))
      ->Inc(41);
  Ok(r.GetCounter("qforge_generated_tokens_total", "Tokens generated.", {{"model", "stories260K"}}))->Inc(1e6);
  Ok(r.GetGauge("qforge_active_streams", "Streams open right now.", {{"model", "stories260K"}}))->Set(3);
  Ok(r.GetGauge("qforge_model_info", "Loaded model; the value is always 1.",
                {{"model", "a \"quoted\"\nname\\"}, {"encoding", "q4_k"}}))
      ->Set(1);
  Histogram* latency = Ok(r.GetHistogram("qforge_request_duration_seconds", "Request latency.",
                                         ExponentialBuckets(0.001, 4, 8), {{"route", "/v1/completions"}}));
  for (double v : {0.0005, 0.02, 0.3, 7.0, 100.0}) latency->Observe(v);
  Ok(r.GetHistogram("qforge_prompt_tokens", "Prompt length in tokens.", {16, 64, 256}))->Observe(40);
  EnergyOptions no_hardware;
  no_hardware.powercap_root = "/nonexistent";
  no_hardware.nvml_library = "";
  no_hardware.estimate_watts = 65;
  EnergyMeter meter(no_hardware);
  meter.AddBusySeconds(2);
  RegisterProcessCollectors(r, &meter);
  const std::string text = r.Render();

  std::string output;
  EXPECT_EQ(PromtoolCheck(text, &output), 0) << output << "\n--- input:\n" << text;
  EXPECT_EQ(output, "") << "\n--- input:\n" << text;

  // The check is not vacuous: promtool does flag what the registry refuses to produce.
  EXPECT_NE(PromtoolCheck("# HELP requests Requests.\n# TYPE requests counter\nrequests 1\n", &output), 0);
  EXPECT_NE(output.find("_total"), std::string::npos) << output;
}

}  // namespace
}  // namespace qforge::metrics
