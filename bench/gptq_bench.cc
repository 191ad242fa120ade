// GPTQ time for one linear layer (default 4096 x 4096, the size) on synthetic calibration inputs
// (default 128 samples x 2048 tokens), at each thread count in one run so the times compare as ratios.
// The Hessian is accumulated once (timed separately: that is calibration's cost, not GPTQ's); then, per thread
// count t, OpenBLAS gets t threads (Cholesky factorisations, lazy-batch GEMM) and GptqQuantize a pool of t
// (the in-block column pass split over rows). Also checks that every thread count gives identical codes and
// prints GPTQ's and RTN's layer-output error so a fast-but-wrong run would show.
// Flags: --rows N --cols N --samples N --tokens N --bits B --group G --act-order --threads 1,2
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "core/base/half.h"
#include "core/base/thread_pool.h"
#include "core/calib/stats.h"
#include "core/quant/gptq.h"
#include "core/quant/packing.h"

namespace {

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

// xorshift64* with an Irwin-Hall(4) approximate unit Gaussian: a billion draws must take seconds, not minutes,
// and the bench needs inputs with the right structure, not exact normality.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1DULL;
  }
  float Uniform() { return static_cast<float>(Next() >> 40) * (1.0f / 16777216.0f); }
  float Gauss() { return (Uniform() + Uniform() + Uniform() + Uniform() - 2.0f) * 1.7320508f; }
};

// Decoded kQInt values for the result (for the error check).
std::vector<float> Decode(const qforge::quant::GptqResult& r, int64_t rows, int64_t cols, int bits, int group,
                          bool symmetric) {
  const int64_t g = group > 0 ? group : cols, groups = cols / g;
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t k = i * groups + c / g;
      const float scale = qforge::HalfToFloat(r.scales[k]);
      const int zero = symmetric ? 1 << (bits - 1) : r.zeros[k];
      out[i * cols + c] = scale * static_cast<float>(r.codes[i * cols + c] - zero);
    }
  }
  return out;
}

int Fail(const std::string& why) {
  std::fprintf(stderr, "qforge_gptq_bench: %s\n", why.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 4096, cols = 4096, samples = 128, tokens = 2048;
  int bits = 4, group = 128;
  bool act_order = false;
  std::vector<int> thread_counts = {1, 2};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](int64_t* out) {
      return i + 1 < argc && absl::SimpleAtoi(argv[++i], out) && *out > 0;
    };
    int64_t v = 0;
    bool ok = true;
    if (a == "--rows") ok = value(&rows);
    else if (a == "--cols") ok = value(&cols);
    else if (a == "--samples") ok = value(&samples);
    else if (a == "--tokens") ok = value(&tokens);
    else if (a == "--bits") ok = value(&v) && (bits = static_cast<int>(v), true);
    else if (a == "--group") ok = i + 1 < argc && absl::SimpleAtoi(argv[++i], &group) && group >= 0;
    else if (a == "--act-order") act_order = true;
    else if (a == "--threads") {
      thread_counts.clear();
      ok = i + 1 < argc;
      for (absl::string_view t : absl::StrSplit(ok ? argv[++i] : "", ',')) {
        int n = 0;
        ok = ok && absl::SimpleAtoi(t, &n) && n > 0;
        thread_counts.push_back(n);
      }
    } else {
      return Fail("unknown flag " + a + " (--rows --cols --samples --tokens --bits --group --act-order --threads)");
    }
    if (!ok) return Fail("bad value for " + a);
  }

  // Inputs with the structure real layer inputs have: per-channel magnitudes spread over two orders (a few
  // loud channels), plus a shared 16-dimensional component that correlates all channels (H far from diagonal).
  constexpr int kShared = 16;
  Rng rng{0x9E3779B97F4A7C15ULL};
  std::vector<float> sigma(static_cast<size_t>(cols)), mix(static_cast<size_t>(kShared * cols));
  for (int64_t c = 0; c < cols; ++c) sigma[c] = (c % 97 == 0 ? 20.0f : 1.0f) * (0.3f + rng.Uniform());
  for (float& m : mix) m = 0.5f * rng.Gauss();
  auto start = std::chrono::steady_clock::now();
  const int max_threads = *std::max_element(thread_counts.begin(), thread_counts.end());
  openblas_set_num_threads(max_threads);
  qforge::calib::StatsAccumulator acc(cols);
  std::vector<float> x(static_cast<size_t>(tokens * cols));
  float u[kShared];
  for (int64_t s = 0; s < samples; ++s) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (float& e : u) e = rng.Gauss();
      float* row = &x[t * cols];
      for (int64_t c = 0; c < cols; ++c) row[c] = sigma[c] * rng.Gauss();
      for (int k = 0; k < kShared; ++k) {
        const float* m = &mix[k * cols];
        for (int64_t c = 0; c < cols; ++c) row[c] += u[k] * m[c];
      }
    }
    acc.Add(x.data(), tokens);
  }
  const qforge::calib::LayerStats stats = acc.Finish();
  const double accumulate_s = Seconds(start);

  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& e : w) e = 0.02f * rng.Gauss();
  std::printf("GPTQ %lld x %lld, %d-bit g%d%s, %lld x %lld calibration tokens\n", static_cast<long long>(rows),
              static_cast<long long>(cols), bits, group, act_order ? " act-order" : "", static_cast<long long>(samples),
              static_cast<long long>(tokens));
  std::printf("Hessian accumulation (%d OpenBLAS threads, not part of GPTQ): %.2f s\n", max_threads, accumulate_s);

  qforge::quant::GptqOptions o;
  o.bits = bits;
  o.group = group;
  o.act_order = act_order;
  std::vector<uint8_t> first_codes;
  double first_s = 0;
  std::printf("| threads | GPTQ s | speedup vs first | codes identical |\n|---|---|---|---|\n");
  qforge::quant::GptqResult last;
  for (const int t : thread_counts) {
    openblas_set_num_threads(t);
    qforge::ThreadPool pool(t);
    o.pool = &pool;
    start = std::chrono::steady_clock::now();
    auto r = qforge::quant::GptqQuantize(w.data(), rows, cols, stats.hessian.data(), o);
    const double s = Seconds(start);
    if (!r.ok()) return Fail(std::string(r.status().message()));
    const bool identical = first_codes.empty() || r->codes == first_codes;
    if (first_codes.empty()) {
      first_codes = r->codes;
      first_s = s;
    }
    std::printf("| %d | %.2f | %.2fx | %s |\n", t, s, first_s / s, identical ? "yes" : "NO");
    last = std::move(*r);
  }

  // Sanity: GPTQ must beat round-to-nearest on the layer-output error these inputs define.
  const std::vector<float> gptq = Decode(last, rows, cols, bits, group, true);
  std::vector<float> rtn(static_cast<size_t>(rows * cols));
  const int64_t g = group > 0 ? group : cols;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < cols / g; ++k) {
      const float* seg = &w[i * cols + k * g];
      const qforge::quant::QIntGrid q = qforge::quant::ChooseQIntGrid(seg, g, bits, true);
      for (int64_t c = 0; c < g; ++c) {
        rtn[i * cols + k * g + c] = qforge::quant::QIntValue(qforge::quant::QIntCode(seg[c], q), q);
      }
    }
  }
  double e_gptq = 0, e_rtn = 0, ref = 0;
  qforge::quant::LayerOutputError(w.data(), gptq.data(), rows, cols, stats.hessian.data(), &e_gptq, &ref);
  qforge::quant::LayerOutputError(w.data(), rtn.data(), rows, cols, stats.hessian.data(), &e_rtn, &ref);
  std::printf("layer-output rel err: GPTQ %.4f, RTN %.4f\n", std::sqrt(e_gptq / ref), std::sqrt(e_rtn / ref));
  return 0;
}
