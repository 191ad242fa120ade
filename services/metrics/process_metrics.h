// Scrape-time metrics about the qforge process itself: resident memory and energy.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "services/metrics/energy.h"
#include "services/metrics/registry.h"

namespace qforge::metrics {

// VmRSS from /proc/self/status, in bytes. Unavailable when the file cannot be read, NotFound when it has no
// VmRSS line (kernel threads, or not Linux).
absl::StatusOr<uint64_t> ProcessResidentBytes();

// Adds a collector that sets, at every scrape:
//   qforge_process_resident_bytes                 gauge
//   qforge_energy_joules_total{source="..."}      counter, meter->joules()
//   qforge_power_watts{source="..."}              gauge, joules used since the previous scrape (or since this
//                                                 call, for the first) divided by the seconds in between
// The energy pair is left out when `meter` is null. `meter` must outlive the registry's last Render.
void RegisterProcessCollectors(Registry& registry, EnergyMeter* meter);

}  // namespace qforge::metrics
