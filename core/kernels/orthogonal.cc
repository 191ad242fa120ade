#include "core/kernels/orthogonal.h"

#include <cmath>

namespace qforge::kernels {

uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::Next() {
  state_ += 0x9e3779b97f4a7c15ULL;
  return Mix64(state_);
}

double SplitMix64::Uniform() {
  // (k + 0.5) / 2^53 for k in [0, 2^53): exact in fp64, strictly inside (0, 1).
  const uint64_t k = Next() >> 11;
  return (static_cast<double>(k) + 0.5) * 0x1.0p-53;
}

double DeterministicLog(double x) {
  int e = 0;
  double m = std::frexp(x, &e);  // exact: x = m * 2^e, m in [0.5, 1)
  if (m < 0x1.6a09e667f3bcdp-1) {  // sqrt(1/2): keep m in [sqrt(1/2), sqrt(2)) so |t| <= 0.172
    m *= 2.0;
    e -= 1;
  }
  // ln m = 2 atanh(t), t = (m - 1) / (m + 1); t^2 <= 0.0295, so 12 odd terms leave < 1e-18.
  const double t = (m - 1.0) / (m + 1.0);
  const double t2 = t * t;
  double sum = 0;
  for (int k = 23; k >= 1; k -= 2) sum = sum * t2 + 1.0 / k;
  constexpr double kLn2 = 0x1.62e42fefa39efp-1;
  return static_cast<double>(e) * kLn2 + 2.0 * t * sum;
}

double SplitMix64::Gaussian() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u, v, s;
  do {
    u = 2.0 * Uniform() - 1.0;
    v = 2.0 * Uniform() - 1.0;
    s = u * u + v * v;
  } while (s >= 1.0 || s == 0.0);
  const double f = std::sqrt(-2.0 * DeterministicLog(s) / s);
  spare_ = v * f;
  has_spare_ = true;
  return u * f;
}

std::vector<double> RandomOrthogonal(int64_t n, uint64_t seed) {
  const size_t nn = static_cast<size_t>(n);
  std::vector<double> g(nn * nn);
  SplitMix64 rng(seed);
  for (double& v : g) v = rng.Gaussian();
  // Householder QR in place: column k's reflector v_k (unit, stored in vs) maps g[k:, k] to alpha_k e_k.
  std::vector<double> vs(nn * nn, 0.0);  // row k: v_k, zero before k
  std::vector<double> sign(nn, 1.0);     // sign of R_kk
  for (int64_t k = 0; k < n; ++k) {
    double norm2 = 0;
    for (int64_t i = k; i < n; ++i) norm2 += g[i * n + k] * g[i * n + k];
    const double norm = std::sqrt(norm2);
    const double x0 = g[k * n + k];
    // alpha = -sign(x0) |x|: v = x - alpha e_k never cancels.
    const double alpha = x0 >= 0 ? -norm : norm;
    double* v = &vs[k * n];
    for (int64_t i = k; i < n; ++i) v[i] = g[i * n + k];
    v[k] -= alpha;
    double vn2 = 0;
    for (int64_t i = k; i < n; ++i) vn2 += v[i] * v[i];
    sign[k] = alpha >= 0 ? 1.0 : -1.0;
    if (vn2 == 0) continue;  // column already e_k-aligned (measure zero for Gaussian input)
    const double inv = 1.0 / std::sqrt(vn2);
    for (int64_t i = k; i < n; ++i) v[i] *= inv;
    // g[k:, j] -= 2 v (v · g[k:, j]) for the remaining columns.
    for (int64_t j = k; j < n; ++j) {
      double dot = 0;
      for (int64_t i = k; i < n; ++i) dot += v[i] * g[i * n + j];
      dot *= 2.0;
      for (int64_t i = k; i < n; ++i) g[i * n + j] -= dot * v[i];
    }
  }
  // Q = H_0 H_1 ... H_{n-1}: applied to I from the right-most reflector on.
  std::vector<double> q(nn * nn, 0.0);
  for (int64_t i = 0; i < n; ++i) q[i * n + i] = 1.0;
  for (int64_t k = n - 1; k >= 0; --k) {
    const double* v = &vs[k * n];
    for (int64_t j = 0; j < n; ++j) {
      double dot = 0;
      for (int64_t i = k; i < n; ++i) dot += v[i] * q[i * n + j];
      dot *= 2.0;
      for (int64_t i = k; i < n; ++i) q[i * n + j] -= dot * v[i];
    }
  }
  // Q diag(sign(R_kk)): the factorisation with a positive diagonal of R, whose Q is Haar.
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) q[i * n + j] *= sign[j];
  }
  return q;
}

int64_t KroneckerSplit(int64_t n) {
  int64_t best = 1;
  for (int64_t a = 1; a * a <= n; ++a) {
    if (n % a == 0) best = a;
  }
  return best;
}

void KroneckerOrthogonal::Apply(const double* x, double* y, double* tmp) const {
  // tmp = X Bᵀ (rows of X against rows of B), y = A tmp.
  for (int64_t i = 0; i < a; ++i) {
    const double* xi = x + i * b;
    for (int64_t j = 0; j < b; ++j) {
      const double* bj = &B[j * b];
      double s = 0;
      for (int64_t l = 0; l < b; ++l) s += xi[l] * bj[l];
      tmp[i * b + j] = s;
    }
  }
  for (int64_t i = 0; i < a; ++i) {
    double* yi = y + i * b;
    for (int64_t j = 0; j < b; ++j) yi[j] = 0;
    for (int64_t k = 0; k < a; ++k) {
      const double aik = A[i * a + k];
      const double* tk = tmp + k * b;
      for (int64_t j = 0; j < b; ++j) yi[j] += aik * tk[j];
    }
  }
}

void KroneckerOrthogonal::ApplyTranspose(const double* x, double* y, double* tmp) const {
  // tmp = X B, y = Aᵀ tmp.
  for (int64_t i = 0; i < a; ++i) {
    const double* xi = x + i * b;
    double* ti = tmp + i * b;
    for (int64_t j = 0; j < b; ++j) ti[j] = 0;
    for (int64_t l = 0; l < b; ++l) {
      const double xl = xi[l];
      const double* bl = &B[l * b];
      for (int64_t j = 0; j < b; ++j) ti[j] += xl * bl[j];
    }
  }
  for (int64_t i = 0; i < a; ++i) {
    double* yi = y + i * b;
    for (int64_t j = 0; j < b; ++j) yi[j] = 0;
    for (int64_t k = 0; k < a; ++k) {
      const double aki = A[k * a + i];
      const double* tk = tmp + k * b;
      for (int64_t j = 0; j < b; ++j) yi[j] += aki * tk[j];
    }
  }
}

std::vector<double> KroneckerOrthogonal::Dense() const {
  const int64_t m = n();
  std::vector<double> q(static_cast<size_t>(m * m));
  for (int64_t i1 = 0; i1 < a; ++i1) {
    for (int64_t i2 = 0; i2 < b; ++i2) {
      for (int64_t k1 = 0; k1 < a; ++k1) {
        for (int64_t k2 = 0; k2 < b; ++k2) q[(i1 * b + i2) * m + k1 * b + k2] = A[i1 * a + k1] * B[i2 * b + k2];
      }
    }
  }
  return q;
}

KroneckerOrthogonal MakeKroneckerOrthogonal(int64_t a, int64_t b, uint64_t seed, uint64_t side) {
  // Four independent streams per tensor: (side 0 = output / U, side 1 = input / V) x (A, B).
  constexpr uint64_t kSalt = 0x51e7c0de5eedULL;
  KroneckerOrthogonal k;
  k.a = a;
  k.b = b;
  k.A = RandomOrthogonal(a, Mix64(seed ^ (kSalt * (2 * side + 1))));
  k.B = RandomOrthogonal(b, Mix64(seed ^ (kSalt * (2 * side + 2))));
  return k;
}

}  // namespace qforge::kernels
