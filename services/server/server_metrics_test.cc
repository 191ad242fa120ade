// The server's memory-over-time counter, on an InferenceServer in this process with a synthetic model:
// qforge_model_memory_byte_seconds_total grows by the bytes held times the time between scrapes, in the served
// and the fp16 series alike, and counts nothing for the time a model was not loaded.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <thread>

#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "gtest/gtest.h"
#include "services/server/server.h"

namespace qforge::server {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// "name{labels}" -> value of every sample in Registry::Render's text.
std::map<std::string, double> Samples(const std::string& text) {
  std::map<std::string, double> samples;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return samples;
}

constexpr char kServed[] = "qforge_model_memory_byte_seconds_total{model=\"tiny@file\",weights=\"served\"}";
constexpr char kFp16[] = "qforge_model_memory_byte_seconds_total{model=\"tiny@file\",weights=\"fp16\"}";

TEST(ServerMetricsTest, MemoryByteSecondsGrowWithTheBytesHeldAndSkipTimeUnloaded) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("qforge-server-metrics-" + std::to_string(getpid()))).string();
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/tiny.gguf";
  ASSERT_TRUE(formats::WriteGguf(MakeSyntheticModel(TinyTestConfig(), 3, /*with_vocab=*/true), path).ok());

  ServerOptions options;
  options.grpc_address = "127.0.0.1:0";
  options.http_port = 0;
  auto server = InferenceServer::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  metrics::Registry& metrics = (*server)->metrics();
  auto model = (*server)->registry().Load("tiny", "file", path, "");
  ASSERT_TRUE(model.ok()) << model.status();
  const double served_bytes = static_cast<double>((*model)->weight_bytes);
  const double fp16_bytes = static_cast<double>((*model)->fp16_bytes);
  ASSERT_GT(served_bytes, 0);
  ASSERT_NE(served_bytes, fp16_bytes);  // f32 weights: the two series must differ

  // Between two scrapes the counter advances by bytes x the time between its collector runs, which lies
  // between the end of the first scrape and the start of the second, and their start and end.
  const Clock::time_point before_first = Clock::now();
  auto first = Samples(metrics.Render());
  const Clock::time_point after_first = Clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const Clock::time_point before_second = Clock::now();
  auto second = Samples(metrics.Render());
  const Clock::time_point after_second = Clock::now();
  ASSERT_TRUE(first.count(kServed) && first.count(kFp16));
  const double served_delta = second[kServed] - first[kServed];
  EXPECT_GE(served_delta, served_bytes * Seconds(before_second - after_first));
  EXPECT_LE(served_delta, served_bytes * Seconds(after_second - before_first));
  EXPECT_NEAR((second[kFp16] - first[kFp16]) / served_delta, fp16_bytes / served_bytes, 1e-9);

  // Unloaded for 400 ms, then loaded again: the counter keeps its value (it is a counter) and the next scrape
  // adds only the time since the reload, not the gap.
  ASSERT_TRUE((*server)->registry().Unload("tiny", "file").ok());
  const double at_unload = Samples(metrics.Render())[kServed];
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  const Clock::time_point before_reload = Clock::now();
  ASSERT_TRUE((*server)->registry().Load("tiny", "file", path, "").ok());
  auto after_reload = Samples(metrics.Render());
  const double since_reload = Seconds(Clock::now() - before_reload);
  EXPECT_GE(after_reload[kServed], at_unload);
  EXPECT_LE(after_reload[kServed] - at_unload, served_bytes * since_reload);
  EXPECT_LT(since_reload, 0.4) << "the reload was too slow for this test to tell the gap apart";

  (*server)->Shutdown(0);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace qforge::server
