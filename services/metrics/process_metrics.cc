#include "services/metrics/process_metrics.h"

#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/status/status.h"

namespace qforge::metrics {

absl::StatusOr<uint64_t> ProcessResidentBytes() {
  std::ifstream in("/proc/self/status");
  if (!in) return absl::UnavailableError("cannot read /proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) != 0) continue;
    std::istringstream fields(line.substr(6));
    uint64_t kib = 0;
    std::string unit;
    if (!(fields >> kib >> unit) || unit != "kB") {
      return absl::InternalError("unexpected VmRSS line in /proc/self/status: " + line);
    }
    return kib * 1024;
  }
  return absl::NotFoundError("/proc/self/status has no VmRSS line");
}

void RegisterProcessCollectors(Registry& registry, EnergyMeter* meter) {
  struct PreviousScrape {
    double joules = 0;
    std::chrono::steady_clock::time_point time;
  };
  auto previous = std::make_shared<PreviousScrape>();
  if (meter != nullptr) {
    previous->joules = meter->joules();
    previous->time = std::chrono::steady_clock::now();
  }
  // Render runs collectors one at a time, so `previous` needs no lock.
  registry.AddCollector([meter, previous](Registry& r) {
    if (absl::StatusOr<uint64_t> rss = ProcessResidentBytes(); rss.ok()) {
      absl::StatusOr<Gauge*> gauge =
          r.GetGauge("qforge_process_resident_bytes", "Resident set size of the qforge process (VmRSS).");
      if (gauge.ok()) (*gauge)->Set(static_cast<double>(*rss));
    }
    if (meter == nullptr) return;
    const double joules = meter->joules();
    const auto now = std::chrono::steady_clock::now();
    const Labels labels = {{"source", meter->source()}};
    absl::StatusOr<Counter*> energy = r.GetCounter(
        "qforge_energy_joules_total",
        "Energy used since the meter started. source=rapl or nvml: hardware counters; source=estimate: "
        "configured watts times busy seconds, not a measurement.",
        labels);
    if (energy.ok()) (*energy)->Inc(joules - (*energy)->value());
    absl::StatusOr<Gauge*> power = r.GetGauge(
        "qforge_power_watts", "Average power since the previous scrape, from the same source as the energy.",
        labels);
    const double seconds = std::chrono::duration<double>(now - previous->time).count();
    if (power.ok() && seconds > 0) (*power)->Set((joules - previous->joules) / seconds);
    previous->joules = joules;
    previous->time = now;
  });
}

}  // namespace qforge::metrics
