// EnergyMeter on a fake powercap tree (the layout of /sys/class/powercap), in estimate mode, and on real NVML
// where the machine has it; the process collectors.
#include "services/metrics/energy.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "services/metrics/process_metrics.h"
#include "services/metrics/registry.h"

namespace qforge::metrics {
namespace {

class FakePowercap {
 public:
  FakePowercap() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = std::filesystem::temp_directory_path() /
            (std::string("qforge_powercap_") + info->name() + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  ~FakePowercap() { std::filesystem::remove_all(root_); }

  void Domain(const std::string& dir, const std::string& name, uint64_t energy_uj, uint64_t max_uj) {
    std::filesystem::create_directories(root_ / dir);
    Write(dir + "/name", name + "\n");
    SetEnergy(dir, energy_uj);
    Write(dir + "/max_energy_range_uj", std::to_string(max_uj) + "\n");
  }
  void SetEnergy(const std::string& dir, uint64_t energy_uj) {
    Write(dir + "/energy_uj", std::to_string(energy_uj) + "\n");
  }
  void Write(const std::string& relative, const std::string& content) {
    std::ofstream out(root_ / relative, std::ios::trunc);
    out << content;
  }

  EnergyOptions Options() const {
    EnergyOptions o;
    o.powercap_root = root_.string();
    o.nvml_library = "";  // a GPU machine must not turn these into NVML tests
    o.estimate_watts = 100;
    return o;
  }

 private:
  std::filesystem::path root_;
};

constexpr uint64_t kRange = 262143328850;  // a real package's max_energy_range_uj

TEST(EnergyMeterTest, ReadsTopLevelPackageDomains) {
  FakePowercap tree;
  tree.Domain("intel-rapl:0", "package-0", 1000000, kRange);
  tree.Domain("intel-rapl:1", "package-1", 5000000, kRange);
  // Inside package 0 (core), the whole platform (psys) and the MMIO copy of package 0: all would count
  // energy twice.
  tree.Domain("intel-rapl:0:0", "core", 7, kRange);
  tree.Domain("intel-rapl:2", "psys", 9, kRange);
  tree.Domain("intel-rapl-mmio:0", "package-0", 11, kRange);

  EnergyMeter meter(tree.Options());
  EXPECT_EQ(meter.source(), "rapl");
  EXPECT_EQ(meter.joules(), 0);
  tree.SetEnergy("intel-rapl:0", 3500000);   // +2.5 J
  tree.SetEnergy("intel-rapl:1", 5250000);   // +0.25 J
  tree.SetEnergy("intel-rapl:0:0", 9000000000);
  tree.SetEnergy("intel-rapl:2", 9000000000);
  tree.SetEnergy("intel-rapl-mmio:0", 9000000000);
  meter.AddBusySeconds(1000);  // ignored by a reading
  EXPECT_DOUBLE_EQ(meter.joules(), 2.75);
  EXPECT_DOUBLE_EQ(meter.joules(), 2.75);  // nothing new
}

TEST(EnergyMeterTest, HandlesWraparound) {
  FakePowercap tree;
  tree.Domain("intel-rapl:0", "package-0", kRange - 1500000, kRange);
  EnergyMeter meter(tree.Options());
  ASSERT_EQ(meter.source(), "rapl");
  tree.SetEnergy("intel-rapl:0", kRange - 500000);  // +1 J
  EXPECT_DOUBLE_EQ(meter.joules(), 1.0);
  tree.SetEnergy("intel-rapl:0", 2000000);  // +0.5 J to the top, wraps, +2 J from 0
  EXPECT_DOUBLE_EQ(meter.joules(), 3.5);
  tree.SetEnergy("intel-rapl:0", 2250000);
  EXPECT_DOUBLE_EQ(meter.joules(), 3.75);
}

TEST(EnergyMeterTest, UnreadableDomainKeepsItsLastValue) {
  FakePowercap tree;
  tree.Domain("intel-rapl:0", "package-0", 0, kRange);
  EnergyMeter meter(tree.Options());
  ASSERT_EQ(meter.source(), "rapl");
  tree.Write("intel-rapl:0/energy_uj", "garbage\n");
  EXPECT_EQ(meter.joules(), 0);
  tree.SetEnergy("intel-rapl:0", 4000000);
  EXPECT_DOUBLE_EQ(meter.joules(), 4.0);
}

TEST(EnergyMeterTest, EstimatesWithoutRaplOrNvml) {
  FakePowercap empty;
  EnergyMeter meter(empty.Options());  // 100 W
  EXPECT_EQ(meter.source(), "estimate");
  EXPECT_EQ(meter.joules(), 0);
  meter.AddBusySeconds(1.5);
  meter.AddBusySeconds(0.5);
  meter.AddBusySeconds(-3);  // ignored
  EXPECT_DOUBLE_EQ(meter.joules(), 200.0);
}

TEST(EnergyMeterTest, UnreadableRaplFallsBackToEstimate) {
  FakePowercap tree;
  tree.Domain("intel-rapl:0", "package-0", 1, kRange);
  tree.Domain("intel-rapl:1", "package-1", 1, kRange);
  // One package's counter cannot be read (as when energy_uj is root-only): half the packages would
  // undercount, so the meter estimates instead.
  tree.Write("intel-rapl:1/energy_uj", "");
  EnergyOptions options = tree.Options();
  EXPECT_EQ(EnergyMeter(options).source(), "estimate");
  // A library that is not there leaves the estimate too.
  options.nvml_library = "/nonexistent/libnvidia-ml.so.1";
  EXPECT_EQ(EnergyMeter(options).source(), "estimate");
}

TEST(EnergyMeterTest, ReadsNvmlThroughTheLibrary) {
  // The stand-in library: GPUs 0 and 1 report energy, GPU 2 does not (and is left out, not counted as 0).
  void* fake = dlopen(QFORGE_FAKE_NVML_PATH, RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(fake, nullptr) << dlerror();
  const auto set_energy = reinterpret_cast<void (*)(unsigned, unsigned long long)>(
      dlsym(fake, "qforge_fake_nvml_set_energy"));
  const auto sessions = reinterpret_cast<int (*)()>(dlsym(fake, "qforge_fake_nvml_sessions"));
  ASSERT_NE(set_energy, nullptr);
  ASSERT_NE(sessions, nullptr);
  set_energy(0, 1000);
  set_energy(1, 5000);
  FakePowercap empty;
  EnergyOptions options = empty.Options();
  options.nvml_library = QFORGE_FAKE_NVML_PATH;
  {
    EnergyMeter meter(options);
    ASSERT_EQ(meter.source(), "nvml");
    EXPECT_EQ(sessions(), 1);
    EXPECT_EQ(meter.joules(), 0);
    set_energy(0, 3500);  // +2.5 J
    set_energy(1, 5250);  // +0.25 J
    meter.AddBusySeconds(1000);  // ignored by a reading
    EXPECT_DOUBLE_EQ(meter.joules(), 2.75);
    // A driver reload restarts GPU 0's counter from 0: what it reports now is new energy.
    set_energy(0, 100);
    EXPECT_DOUBLE_EQ(meter.joules(), 2.85);
  }
  EXPECT_EQ(sessions(), 0);  // the meter shut NVML down
  // RAPL, when readable, comes first.
  FakePowercap tree;
  tree.Domain("intel-rapl:0", "package-0", 0, kRange);
  EnergyOptions both = tree.Options();
  both.nvml_library = QFORGE_FAKE_NVML_PATH;
  EXPECT_EQ(EnergyMeter(both).source(), "rapl");
  dlclose(fake);
}

TEST(EnergyMeterTest, ReadsNvmlWhereAvailable) {
  void* probe = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (probe == nullptr) GTEST_SKIP() << "no libnvidia-ml.so.1 on this machine";
  dlclose(probe);
  FakePowercap empty;
  EnergyOptions options = empty.Options();
  options.nvml_library = "libnvidia-ml.so.1";
  EnergyMeter meter(options);
  if (meter.source() != "nvml") GTEST_SKIP() << "NVML loads but reports no GPU energy counter";
  const double first = meter.joules();
  EXPECT_GE(first, 0);
  EXPECT_GE(meter.joules(), first);
}

TEST(ProcessMetricsTest, ResidentBytesFollowsAllocation) {
  absl::StatusOr<uint64_t> before = ProcessResidentBytes();
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_GT(*before, 0u);
  constexpr size_t kBytes = 64 << 20;
  std::vector<char> touched(kBytes, 1);  // written, so resident
  absl::StatusOr<uint64_t> after = ProcessResidentBytes();
  ASSERT_TRUE(after.ok());
  EXPECT_GE(*after, *before + kBytes * 9 / 10) << touched[kBytes / 2];
}

TEST(ProcessMetricsTest, CollectorsExportMemoryEnergyAndPower) {
  FakePowercap tree;
  tree.Domain("intel-rapl:0", "package-0", 0, kRange);
  EnergyMeter meter(tree.Options());
  ASSERT_EQ(meter.source(), "rapl");
  Registry registry;
  RegisterProcessCollectors(registry, &meter);
  tree.SetEnergy("intel-rapl:0", 30000000);  // 30 J
  const std::string text = registry.Render();
  EXPECT_NE(text.find("# TYPE qforge_process_resident_bytes gauge\nqforge_process_resident_bytes "),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("# TYPE qforge_energy_joules_total counter\nqforge_energy_joules_total{source=\"rapl\"} 30\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("# TYPE qforge_power_watts gauge\nqforge_power_watts{source=\"rapl\"} "), std::string::npos)
      << text;
  Gauge* power = *registry.GetGauge("qforge_power_watts",
                                    "Average power since the previous scrape, from the same source as the energy.",
                                    {{"source", "rapl"}});
  EXPECT_GT(power->value(), 0);
  // Nothing used between two scrapes: no power, and the counter stands still.
  registry.Render();
  EXPECT_EQ(power->value(), 0);
  tree.SetEnergy("intel-rapl:0", 31000000);
  EXPECT_NE(registry.Render().find("qforge_energy_joules_total{source=\"rapl\"} 31\n"), std::string::npos);
  EXPECT_GT(power->value(), 0);

  Registry without_meter;
  RegisterProcessCollectors(without_meter, nullptr);
  const std::string memory_only = without_meter.Render();
  EXPECT_NE(memory_only.find("qforge_process_resident_bytes "), std::string::npos);
  EXPECT_EQ(memory_only.find("energy"), std::string::npos);
}

}  // namespace
}  // namespace qforge::metrics
