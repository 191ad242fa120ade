// Seeded random orthogonal matrices and Kronecker products of two of them: the incoherence transforms of
// QuIP (Chee et al. 2023, docs/calibrated.md "QuIP"). The quantizer (core/quant) builds a tensor's factors
// from a 64-bit seed and stores only the seed; the runtime (core/runtime, core/kernels) regenerates them.
// So everything here is bit-reproducible on any IEEE-754 machine: our own RNG (splitmix64), our own
// logarithm (no libm transcendental, whose last bit differs between libms), our own Householder QR, all in
// fp64 with only +, -, *, / and sqrt (correctly rounded by IEEE) and compiled without FMA contraction.
#pragma once

#include <cstdint>
#include <vector>

namespace qforge::kernels {

// splitmix64 (Steele, Lea, Flood 2014): state += golden gamma, then a bijective finaliser.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  // Uniform in (0, 1): 53 random bits, never 0 (the polar method divides by a log of it).
  double Uniform();
  // A standard normal deviate by Marsaglia's polar method (Box–Muller without sin/cos); pairs are cached.
  double Gaussian();

 private:
  uint64_t state_;
  bool has_spare_ = false;
  double spare_ = 0;
};

// The splitmix64 finaliser alone, for deriving independent seeds.
uint64_t Mix64(uint64_t x);

// Natural logarithm of x > 0 from +, *, / and frexp only (error a few ulp): deterministic everywhere.
double DeterministicLog(double x);

// A Haar-distributed n x n orthogonal matrix, row-major: Q of the QR factorisation of an n x n standard
// Gaussian matrix (filled row by row from SplitMix64(seed)), with the signs fixed so that R's diagonal is
// positive (without the fix Q is not Haar). Householder reflections in fp64.
std::vector<double> RandomOrthogonal(int64_t n, uint64_t seed);

// The factor a of n = a * b that QuIP's two-factor transform uses: the largest divisor of n that is
// <= sqrt(n) (1 when n is prime, i.e. one n x n factor).
int64_t KroneckerSplit(int64_t n);

// Q = A ⊗ B for orthogonal A [a, a] and B [b, b] (row-major). Q x for x of length a*b is vec(A X Bᵀ) with
// X = x viewed as [a, b] row-major: O(ab(a+b)) instead of O((ab)^2).
struct KroneckerOrthogonal {
  int64_t a = 1, b = 1;
  std::vector<double> A, B;

  int64_t n() const { return a * b; }
  // y = (A ⊗ B) x. `tmp` holds a*b doubles. x and y must not alias.
  void Apply(const double* x, double* y, double* tmp) const;
  // y = (A ⊗ B)ᵀ x = (Aᵀ ⊗ Bᵀ) x.
  void ApplyTranspose(const double* x, double* y, double* tmp) const;
  // The dense matrix (tests, small sizes only).
  std::vector<double> Dense() const;
};

// The factors of a tensor side of length n = a * b from a seed: A from Mix64(seed ^ salt_a), B from
// Mix64(seed ^ salt_b) (salts in orthogonal.cc), a as given (a must divide n).
KroneckerOrthogonal MakeKroneckerOrthogonal(int64_t a, int64_t b, uint64_t seed, uint64_t side);

}  // namespace qforge::kernels
