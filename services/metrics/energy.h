// Energy used by the machine qforge runs on, for joules-per-token accounting: read from the CPU packages'
// RAPL counters or the GPUs' NVML counters where the process can read them, otherwise estimated from a
// configured power draw and the busy time the caller reports. source() says which, so an estimate is never
// mistaken for a reading.
#pragma once

#include <memory>
#include <string>

namespace qforge::metrics {

struct EnergyOptions {
  // Watts assumed while busy when nothing can be read; 0 makes the estimate 0.
  double estimate_watts = 0;
  // Where the powercap tree is; tests point it at a fake one.
  std::string powercap_root = "/sys/class/powercap";
  // The NVML library to dlopen; empty disables NVML (tests do, so a GPU machine behaves like any other).
  std::string nvml_library = "libnvidia-ml.so.1";
};

// Chooses its source once, at construction, in this order:
//  - "rapl": every top-level package domain under powercap_root (intel-rapl:N whose name starts with
//    "package"; subdomains such as core/dram, and psys, would count the same energy twice) has a readable
//    energy_uj and max_energy_range_uj. The counters wrap at max_energy_range_uj; joules() adds the
//    wrapped-around part, so it needs calling at least once per wrap period (tens of minutes at full load:
//    every scrape is ample).
//  - "nvml": libnvidia-ml loads, initialises and at least one GPU reports
//    nvmlDeviceGetTotalEnergyConsumption (Volta and later).
//  - "estimate": estimate_watts x the seconds passed to AddBusySeconds.
// Recent kernels make energy_uj readable by root only, so an unprivileged service usually estimates.
// Thread-safe.
class EnergyMeter {
 public:
  explicit EnergyMeter(EnergyOptions options);
  ~EnergyMeter();
  EnergyMeter(const EnergyMeter&) = delete;
  EnergyMeter& operator=(const EnergyMeter&) = delete;

  std::string source() const;  // "rapl", "nvml" or "estimate"
  // Busy time (e.g. seconds spent in forward passes) for the estimate; ignored by the readings. Negative or
  // NaN values are ignored.
  void AddBusySeconds(double s);
  // Joules since construction. A domain or GPU whose read fails this time keeps its last value and catches
  // up on the next successful read.
  double joules();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qforge::metrics
