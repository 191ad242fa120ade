// A stand-in for libnvidia-ml.so.1 for energy_test: the five NVML entry points EnergyMeter uses, with the
// signatures of the public NVML API, over counters the test sets through the qforge_fake_nvml_* functions.
// Three GPUs; the third reports NVML_ERROR_NOT_SUPPORTED for energy, as pre-Volta GPUs do.
#include <atomic>

namespace {

constexpr int kSuccess = 0;
constexpr int kInvalidArgument = 2;  // NVML_ERROR_INVALID_ARGUMENT
constexpr int kNotSupported = 3;     // NVML_ERROR_NOT_SUPPORTED
constexpr unsigned kGpus = 3;

struct Gpu {
  std::atomic<unsigned long long> millijoules{0};
  bool supports_energy = true;
};
Gpu gpus[kGpus];
std::atomic<int> initialised{0};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int nvmlInit_v2() {
  gpus[2].supports_energy = false;
  ++initialised;
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlShutdown() {
  --initialised;
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlDeviceGetCount_v2(unsigned* count) {
  *count = kGpus;
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlDeviceGetHandleByIndex_v2(unsigned index, void** device) {
  if (index >= kGpus) return kInvalidArgument;
  *device = &gpus[index];
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlDeviceGetTotalEnergyConsumption(void* device,
                                                                                unsigned long long* mj) {
  Gpu* gpu = static_cast<Gpu*>(device);
  if (!gpu->supports_energy) return kNotSupported;
  *mj = gpu->millijoules.load();
  return kSuccess;
}

__attribute__((visibility("default"))) void qforge_fake_nvml_set_energy(unsigned index, unsigned long long mj) {
  gpus[index].millijoules.store(mj);
}

// NVML sessions open (init minus shutdown).
__attribute__((visibility("default"))) int qforge_fake_nvml_sessions() { return initialised.load(); }

}  // extern "C"
