#include "services/metrics/energy.h"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <vector>

namespace qforge::metrics {
namespace {

// The few NVML entry points used, declared from the public NVML API reference (no NVIDIA headers needed):
// every call returns nvmlReturn_t, an enum whose NVML_SUCCESS is 0, and devices are opaque handles.
using NvmlReturn = int;
using NvmlDevice = struct NvmlDeviceOpaque*;
using NvmlInitFn = NvmlReturn (*)();                                   // nvmlInit_v2
using NvmlShutdownFn = NvmlReturn (*)();                               // nvmlShutdown
using NvmlDeviceGetCountFn = NvmlReturn (*)(unsigned int*);            // nvmlDeviceGetCount_v2
using NvmlDeviceGetHandleByIndexFn = NvmlReturn (*)(unsigned int, NvmlDevice*);  // ..._v2
using NvmlDeviceGetTotalEnergyConsumptionFn = NvmlReturn (*)(NvmlDevice, unsigned long long*);  // mJ
constexpr NvmlReturn kNvmlSuccess = 0;

std::optional<uint64_t> ReadCounter(const std::filesystem::path& path) {
  std::ifstream in(path);
  uint64_t v = 0;
  if (!(in >> v)) return std::nullopt;
  return v;
}

std::optional<std::string> ReadWord(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::string s;
  if (!(in >> s)) return std::nullopt;
  return s;
}

// A monotonic total from a counter that wraps at `max` (RAPL) or restarts (an NVML driver reload).
struct WrappingCounter {
  uint64_t last = 0;
  uint64_t max = 0;  // 0: unknown, a decrease means a restart from 0
  uint64_t total = 0;

  void Update(uint64_t now) {
    if (now >= last) {
      total += now - last;
    } else if (max > 0 && last <= max) {
      total += (max - last) + now;  // wrapped past max_energy_range_uj back to 0
    } else {
      total += now;
    }
    last = now;
  }
};

struct RaplDomain {
  std::filesystem::path energy_file;
  WrappingCounter counter;
};

// Top-level package domains (intel-rapl:N with name package-N), or nullopt unless every one is readable.
std::optional<std::vector<RaplDomain>> OpenRapl(const std::string& root) {
  std::error_code ec;
  std::vector<std::filesystem::path> dirs;
  for (const auto& entry : std::filesystem::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    const std::string prefix = "intel-rapl:";
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string index = name.substr(prefix.size());
    // "intel-rapl:0:1" is a subdomain (core, uncore, dram) inside package 0.
    if (index.empty() || !std::all_of(index.begin(), index.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      continue;
    }
    const std::optional<std::string> domain_name = ReadWord(entry.path() / "name");
    // psys (the whole SoC platform) also contains the packages.
    if (!domain_name.has_value() || domain_name->rfind("package", 0) != 0) continue;
    dirs.push_back(entry.path());
  }
  if (ec || dirs.empty()) return std::nullopt;
  std::sort(dirs.begin(), dirs.end());
  std::vector<RaplDomain> domains;
  for (const auto& dir : dirs) {
    const std::optional<uint64_t> energy = ReadCounter(dir / "energy_uj");
    const std::optional<uint64_t> range = ReadCounter(dir / "max_energy_range_uj");
    if (!energy.has_value() || !range.has_value() || *range == 0) return std::nullopt;
    RaplDomain d;
    d.energy_file = dir / "energy_uj";
    d.counter.last = *energy;
    d.counter.max = *range;
    domains.push_back(std::move(d));
  }
  return domains;
}

struct Nvml {
  void* library = nullptr;
  NvmlShutdownFn shutdown = nullptr;
  NvmlDeviceGetTotalEnergyConsumptionFn energy = nullptr;
  struct Gpu {
    NvmlDevice handle;
    WrappingCounter counter;  // mJ
  };
  std::vector<Gpu> gpus;

  ~Nvml() {
    if (shutdown != nullptr) shutdown();
    if (library != nullptr) dlclose(library);
  }
};

std::unique_ptr<Nvml> OpenNvml(const std::string& library) {
  if (library.empty()) return nullptr;
  auto nvml = std::make_unique<Nvml>();
  nvml->library = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (nvml->library == nullptr) return nullptr;
  const auto init = reinterpret_cast<NvmlInitFn>(dlsym(nvml->library, "nvmlInit_v2"));
  const auto shutdown = reinterpret_cast<NvmlShutdownFn>(dlsym(nvml->library, "nvmlShutdown"));
  const auto count = reinterpret_cast<NvmlDeviceGetCountFn>(dlsym(nvml->library, "nvmlDeviceGetCount_v2"));
  const auto by_index =
      reinterpret_cast<NvmlDeviceGetHandleByIndexFn>(dlsym(nvml->library, "nvmlDeviceGetHandleByIndex_v2"));
  nvml->energy = reinterpret_cast<NvmlDeviceGetTotalEnergyConsumptionFn>(
      dlsym(nvml->library, "nvmlDeviceGetTotalEnergyConsumption"));
  if (init == nullptr || shutdown == nullptr || count == nullptr || by_index == nullptr ||
      nvml->energy == nullptr || init() != kNvmlSuccess) {
    return nullptr;
  }
  nvml->shutdown = shutdown;  // initialised: from here on the destructor shuts NVML down
  unsigned int devices = 0;
  if (count(&devices) != kNvmlSuccess) return nullptr;
  for (unsigned int i = 0; i < devices; ++i) {
    Nvml::Gpu gpu{};
    unsigned long long mj = 0;
    // GPUs before Volta do not report energy; they are left out rather than counted as zero.
    if (by_index(i, &gpu.handle) != kNvmlSuccess || nvml->energy(gpu.handle, &mj) != kNvmlSuccess) continue;
    gpu.counter.last = mj;
    nvml->gpus.push_back(gpu);
  }
  if (nvml->gpus.empty()) return nullptr;
  return nvml;
}

}  // namespace

struct EnergyMeter::Impl {
  EnergyOptions options;
  mutable std::mutex mu;
  std::optional<std::vector<RaplDomain>> rapl;
  std::unique_ptr<Nvml> nvml;
  double busy_seconds = 0;
};

EnergyMeter::EnergyMeter(EnergyOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  impl_->rapl = OpenRapl(impl_->options.powercap_root);
  if (!impl_->rapl.has_value()) impl_->nvml = OpenNvml(impl_->options.nvml_library);
}

EnergyMeter::~EnergyMeter() = default;

std::string EnergyMeter::source() const {
  if (impl_->rapl.has_value()) return "rapl";
  if (impl_->nvml != nullptr) return "nvml";
  return "estimate";
}

void EnergyMeter::AddBusySeconds(double s) {
  if (!(s >= 0) || std::isinf(s)) return;
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->busy_seconds += s;
}

double EnergyMeter::joules() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->rapl.has_value()) {
    uint64_t microjoules = 0;
    for (RaplDomain& d : *impl_->rapl) {
      const std::optional<uint64_t> now = ReadCounter(d.energy_file);
      if (now.has_value()) d.counter.Update(*now);
      microjoules += d.counter.total;
    }
    return static_cast<double>(microjoules) * 1e-6;
  }
  if (impl_->nvml != nullptr) {
    uint64_t millijoules = 0;
    for (Nvml::Gpu& gpu : impl_->nvml->gpus) {
      unsigned long long now = 0;
      if (impl_->nvml->energy(gpu.handle, &now) == kNvmlSuccess) gpu.counter.Update(now);
      millijoules += gpu.counter.total;
    }
    return static_cast<double>(millijoules) * 1e-3;
  }
  return impl_->options.estimate_watts * impl_->busy_seconds;
}

}  // namespace qforge::metrics
