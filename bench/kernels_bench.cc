// MatMulRows throughput per weight format: decode (n = 1 token) and batches / prompts (n = 8, 16, 32
// tokens) on a 4096 x 4096 matrix, for each ISA the CPU has. bytes/s counts the encoded weight bytes streamed.
// BM_ExpertMatMul, BM_ExpertMatMulStreamed: qmoe against q4_k on expert-sized matrices (docs/moe.md).
#include <benchmark/benchmark.h>

#include <atomic>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/base/thread_pool.h"
#include "core/kernels/kernels.h"
#include "core/kernels/qmoe.h"
#include "core/quant/quant_method.h"

namespace qforge {
namespace {

constexpr int64_t kRows = 4096;
constexpr int64_t kCols = 4096;

struct FormatSpec {
  const char* label;
  const char* method;
  quant::QuantParams params;
};

const std::vector<FormatSpec>& Specs() {
  static const std::vector<FormatSpec> specs = {
      {"f32", nullptr, {}},
      {"f16", "f16", {}},
      {"q8_0", "q8_0", {}},
      {"q4_0", "q4_0", {}},
      {"q4_k", "q4_k", {}},
      {"qint4_g128_sym", "rtn", {4, 128, true, false}},
      {"qint8_pc_sym", "rtn", {8, 0, true, false}},
      {"qint3_g128_asym", "rtn", {3, 128, false, false}},
      {"nf4_b64_dq", "nf4", {4, 64, true, true}},
      {"w8a8", "smoothquant", {8, 0, true, false}},  // int8 activations per token inside the matmul
  };
  return specs;
}

const std::vector<float>& Weights() {
  static const std::vector<float> w = [] {
    std::mt19937 rng(1);
    std::normal_distribution<float> d(0.0f, 0.02f);
    std::vector<float> v(static_cast<size_t>(kRows * kCols));
    for (auto& x : v) x = d(rng);
    return v;
  }();
  return w;
}

// Encoded once per format and cached across benchmarks.
const Tensor& Matrix(int spec_index) {
  static std::map<int, Tensor> cache;
  auto it = cache.find(spec_index);
  if (it != cache.end()) return it->second;
  const FormatSpec& s = Specs()[spec_index];
  Tensor t;
  if (s.method == nullptr) {
    t = Tensor::FromFloats("w", {kRows, kCols}, Weights());
  } else {
    const quant::QuantMethod* m = quant::FindMethod(s.method);
    const quant::QuantParams p = s.params;  // the ggml methods and f16 ignore params
    ThreadPool pool(2);
    // smoothquant's encoder reads no statistics but refuses to run without them; the others ignore them.
    calib::LayerStats stats;
    stats.cols = kCols;
    auto format = m->OutputFormat(p, kRows, kCols);
    auto bytes = m->Quantize(Weights().data(), kRows, kCols, p, &pool, &stats);
    if (!format.ok() || !bytes.ok()) std::abort();
    t = Tensor::FromBytes("w", {kRows, kCols}, *format, std::move(*bytes));
  }
  return cache.emplace(spec_index, std::move(t)).first->second;
}

void BM_MatMulRows(benchmark::State& state) {
  const int spec = static_cast<int>(state.range(0));
  const int64_t n = state.range(1);
  const auto isa = static_cast<kernels::Isa>(state.range(2));
  if (kernels::SetIsa(isa) != isa) {
    state.SkipWithError("ISA not supported on this CPU");
    return;
  }
  const Tensor& w = Matrix(spec);
  std::vector<float> x(static_cast<size_t>(n * kCols), 0.5f), y(static_cast<size_t>(n * kRows));
  for (auto _ : state) {
    if (!kernels::MatMulRows(w, 0, kRows, x.data(), n, y.data(), kRows).ok()) state.SkipWithError("MatMulRows failed");
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(w.nbytes));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(Specs()[spec].label) + " " + (n == 1 ? "decode" : "batch") + " " + kernels::IsaName(isa));
  kernels::SetIsa(kernels::DetectIsa());
}

void Args(benchmark::internal::Benchmark* b) {
  for (int spec = 0; spec < static_cast<int>(Specs().size()); ++spec) {
    for (int64_t n : {1, 8, 16, 32, 128}) {
      for (int isa : {0, 1, 2}) b->Args({spec, n, isa});
    }
  }
}

BENCHMARK(BM_MatMulRows)->Apply(Args)->ArgNames({"fmt", "n", "isa"})->Unit(benchmark::kMillisecond)->UseRealTime();

// Expert matmuls, one token's worth, with int8 activations (the runtime's default). qmoe: random trits with 88 %
// zeros on the qmoe method's dictionary; q4_k: Gaussian weights.
// BM_ExpertMatMul: 24 matrices of 256 x 256 (the trained MoE's: 4 layers x 2 routed experts x gate, up, down),
// which stay in cache, so the time is the kernels' arithmetic; n tokens: 1 (decode), 2 and 4 (a few sequences
// served at once, which qmoe's selection walks the words once for), 8 and 128 (qmoe's Q4_K tiles).
// BM_ExpertMatMulStreamed: 32 matrices of 6144 x 2048 (the up projection of the 1.6 T SwitchTransformer-c2048
// description, scheduler/model_description.h), 400 M weights: 226 MB as q4_k, far past the last-level cache, so
// each token streams its experts from memory, QMoE's case. One matrix is encoded and its bytes copied (the memory
// traffic is that of distinct experts; setting up 32 encodings would take minutes).
struct ExpertSet {
  int64_t rows, cols;
  int count;
};
constexpr ExpertSet kCachedExperts{256, 256, 24};
constexpr ExpertSet kStreamedExperts{6144, 2048, 32};

const std::vector<Tensor>& Experts(const ExpertSet& set, bool qmoe) {
  static std::map<std::tuple<int64_t, int64_t, int, bool>, std::vector<Tensor>> cache;
  const auto key = std::make_tuple(set.rows, set.cols, set.count, qmoe);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  std::vector<Tensor> experts;
  std::mt19937 rng(2);
  const int64_t n = set.rows * set.cols;
  const bool copies = set.count > 1 && n > (int64_t{1} << 20);
  for (int e = 0; e < set.count; ++e) {
    if (copies && e > 0) {
      const Tensor& w = experts.front();
      experts.push_back(Tensor::FromBytes("e", {set.rows, set.cols}, w.format,
                                          std::vector<uint8_t>(w.data, w.data + w.nbytes)));
      continue;
    }
    if (qmoe) {
      std::uniform_real_distribution<double> u(0, 1);
      std::vector<uint8_t> codes(static_cast<size_t>(n));
      for (auto& c : codes) c = u(rng) < 0.88 ? 1 : (u(rng) < 0.5 ? 0 : 2);
      const std::vector<uint16_t> scales(static_cast<size_t>(set.rows), 0x2000);
      auto enc = kernels::qmoe::Encode(codes.data(), scales.data(), set.rows, set.cols,
                                       kernels::qmoe::ZeroCodeFor(0.88));
      if (!enc.ok()) std::abort();
      experts.push_back(Tensor::FromBytes("e", {set.rows, set.cols}, enc->format, std::move(enc->bytes)));
    } else {
      std::normal_distribution<float> d(0.0f, 0.02f);
      std::vector<float> w(static_cast<size_t>(n));
      for (auto& x : w) x = d(rng);
      const quant::QuantMethod* m = quant::FindMethod("q4_k");
      auto format = m->OutputFormat(m->DefaultParams(), set.rows, set.cols);
      auto bytes = m->Quantize(w.data(), set.rows, set.cols, m->DefaultParams(), nullptr, nullptr);
      if (!format.ok() || !bytes.ok()) std::abort();
      experts.push_back(Tensor::FromBytes("e", {set.rows, set.cols}, *format, std::move(*bytes)));
    }
  }
  return cache.emplace(key, std::move(experts)).first->second;
}

void RunExperts(benchmark::State& state, const ExpertSet& set) {
  const bool qmoe = state.range(0) != 0;
  const int64_t n = state.range(1);
  // Each matrix's rows split over the threads, one contiguous range each in whole 16-row groups (the qmoe
  // decoder's tile).
  ThreadPool pool(static_cast<int>(state.range(2)));
  const std::vector<Tensor>& experts = Experts(set, qmoe);
  std::vector<float> x(static_cast<size_t>(n * set.cols)), y(static_cast<size_t>(n * set.rows));
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0, 1);
  for (auto& v : x) v = g(rng);
  kernels::MatMulInput in;
  size_t bytes = 0;
  for (const Tensor& w : experts) bytes += w.nbytes;
  for (auto _ : state) {
    for (const Tensor& w : experts) {
      std::atomic<bool> ok{kernels::PrepareInput(w, x.data(), n, kernels::ActivationMode::kInt8, &in).ok()};
      pool.ParallelFor(
          set.rows, 16,
          [&](int64_t begin, int64_t end) {
            if (!kernels::MatMulRows(w, begin, end, in, y.data(), set.rows).ok()) ok = false;
          },
          16);
      if (!ok) state.SkipWithError("MatMulRows failed");
    }
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] =
      benchmark::Counter(static_cast<double>(bytes), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(qmoe ? "qmoe" : "q4_k") + " x" + std::to_string(set.count) + " experts " +
                 std::to_string(set.rows) + "x" + std::to_string(set.cols));
}

void BM_ExpertMatMul(benchmark::State& state) { RunExperts(state, kCachedExperts); }
void BM_ExpertMatMulStreamed(benchmark::State& state) { RunExperts(state, kStreamedExperts); }

BENCHMARK(BM_ExpertMatMul)
    ->ArgsProduct({{0, 1}, {1, 2, 4, 8, 128}, {1, 2}})
    ->ArgNames({"qmoe", "n", "threads"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_ExpertMatMulStreamed)
    ->ArgsProduct({{0, 1}, {1}, {1, 2}})
    ->ArgNames({"qmoe", "n", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace qforge

BENCHMARK_MAIN();
