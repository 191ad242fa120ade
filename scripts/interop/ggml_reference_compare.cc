// qforge's ggml encoders (core/kernels/ggml_kernels.h) against ggml's own reference quantizers, compiled from a ggml
// source tree by scripts/check-ggml-reference.sh (not part of the build or CI). 400 rows of 4096 floats of eight
// kinds (Gaussian, uniform, outliers, all positive, all negative, zero sub-blocks, ties, constant blocks with tiny
// values; scales 1e-4 .. 1e2), every block compared byte for byte. --perturb changes one input element per row on
// qforge's side only: the negative control, which must report differences. Exit status: the number of types with
// a differing block.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>
#include "core/kernels/ggml_kernels.h"
extern "C" {
void quantize_row_q4_0_ref(const float*, void*, int64_t);
void quantize_row_q4_1_ref(const float*, void*, int64_t);
void quantize_row_q5_0_ref(const float*, void*, int64_t);
void quantize_row_q5_1_ref(const float*, void*, int64_t);
void quantize_row_q8_0_ref(const float*, void*, int64_t);
void quantize_row_q2_K_ref(const float*, void*, int64_t);
void quantize_row_q3_K_ref(const float*, void*, int64_t);
void quantize_row_q4_K_ref(const float*, void*, int64_t);
void quantize_row_q5_K_ref(const float*, void*, int64_t);
void quantize_row_q6_K_ref(const float*, void*, int64_t);
size_t quantize_iq4_nl(const float*, void*, int64_t, int64_t, const float*);
size_t quantize_iq4_xs(const float*, void*, int64_t, int64_t, const float*);
}
using Enc = void (*)(const float*, int64_t, uint8_t*);
struct Case { const char* name; int block, bytes; Enc ours; void (*ref)(const float*, void*, int64_t); bool iq; };
static void RefIq4nl(const float* x, void* y, int64_t k) { quantize_iq4_nl(x, y, 1, k, nullptr); }
static void RefIq4xs(const float* x, void* y, int64_t k) { quantize_iq4_xs(x, y, 1, k, nullptr); }
int main(int argc, char** argv) {
  using namespace qforge::kernels;
  const bool perturb = argc > 1 && std::string(argv[1]) == "--perturb";
  const Case cases[] = {
      {"q8_0", 32, 34, QuantizeRowQ8_0, quantize_row_q8_0_ref}, {"q4_0", 32, 18, QuantizeRowQ4_0, quantize_row_q4_0_ref},
      {"q4_1", 32, 20, QuantizeRowQ4_1, quantize_row_q4_1_ref}, {"q5_0", 32, 22, QuantizeRowQ5_0, quantize_row_q5_0_ref},
      {"q5_1", 32, 24, QuantizeRowQ5_1, quantize_row_q5_1_ref}, {"q2_k", 256, 84, QuantizeRowQ2_K, quantize_row_q2_K_ref},
      {"q3_k", 256, 110, QuantizeRowQ3_K, quantize_row_q3_K_ref}, {"q4_k", 256, 144, QuantizeRowQ4_K, quantize_row_q4_K_ref},
      {"q5_k", 256, 176, QuantizeRowQ5_K, quantize_row_q5_K_ref}, {"q6_k", 256, 210, QuantizeRowQ6_K, quantize_row_q6_K_ref},
      {"iq4_nl", 32, 18, QuantizeRowIQ4_NL, RefIq4nl}, {"iq4_xs", 256, 136, QuantizeRowIQ4_XS, RefIq4xs},
  };
  const int64_t n = 4096;
  std::mt19937 rng(1234);
  std::vector<std::vector<float>> rows;
  for (int r = 0; r < 400; ++r) {
    std::vector<float> x(n);
    const int kind = r % 8;
    std::normal_distribution<float> g(0.0f, 1.0f);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const float scale = std::pow(10.0f, static_cast<float>(r % 7) - 4.0f);
    for (int64_t i = 0; i < n; ++i) {
      float v = 0;
      switch (kind) {
        case 0: v = g(rng); break;
        case 1: v = u(rng); break;
        case 2: v = g(rng) * (i % 97 == 0 ? 20.0f : 1.0f); break;  // outliers
        case 3: v = std::fabs(g(rng)) + 0.5f; break;               // all positive
        case 4: v = -std::fabs(g(rng)); break;                     // all negative
        case 5: v = (i / 16) % 5 == 0 ? 0.0f : g(rng); break;      // zero sub-blocks
        case 6: v = std::round(g(rng) * 4) / 4; break;             // few distinct values, ties
        case 7: v = (i / 256) % 3 == 0 ? 1.0f : g(rng) * 1e-3f; break;  // constant blocks, tiny values
      }
      x[i] = v * scale;
    }
    rows.push_back(x);
  }
  int bad_types = 0;
  for (const Case& c : cases) {
    int64_t blocks = 0, differ = 0;
    std::string first;
    for (size_t r = 0; r < rows.size(); ++r) {
      const size_t nb = n / c.block;
      std::vector<uint8_t> a(nb * c.bytes), b(nb * c.bytes);
      std::vector<float> xo = rows[r]; if (perturb) xo[5] *= 1.5f; c.ours(xo.data(), n, a.data());
      c.ref(rows[r].data(), b.data(), n);
      for (size_t k = 0; k < nb; ++k) {
        ++blocks;
        if (std::memcmp(a.data() + k * c.bytes, b.data() + k * c.bytes, c.bytes) != 0) {
          if (differ == 0) first = "row " + std::to_string(r) + " block " + std::to_string(k);
          ++differ;
        }
      }
    }
    std::printf("%-7s %8lld blocks, %6lld differ %s\n", c.name, (long long)blocks, (long long)differ, first.c_str());
    bad_types += differ != 0;
  }
  return bad_types;
}
