// The small square SVD's reference (kernels/cpu/small_svd_ref.h, one-sided Jacobi) against
// LAPACK's dgesvd: singular values, the reconstruction A = UΣVᵀ, orthogonality, the order, and
// rank-deficient, tied, odd-sized and non-finite inputs. The CUDA kernel is checked against this
// reference bit for bit in tests/kernels/cuda/cuda_low_rank_test.cc.
#include "kernels/cpu/small_svd_ref.h"

#include <gtest/gtest.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/small_svd.h"

namespace qcal::kernels {
namespace {

using ref::SmallSvd;
using ref::SmallSvdResult;

// Named bounds, relative to the largest singular value (double rounding is 1.1e-16; a converged
// sweep leaves pairs orthogonal to kSmallSvdTolerance).
constexpr double kSigmaBound = 1e-13;
constexpr double kReconstructionBound = 1e-13;
constexpr double kOrthogonalityBound = 1e-13;

std::vector<double> RandomMatrix(int64_t k, uint32_t seed, bool upper) {
  std::mt19937_64 gen(seed);
  std::vector<double> a(static_cast<size_t>(k * k), 0.0);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < k; ++i) {
      if (upper && i > j) continue;
      a[j * k + i] = static_cast<double>(gen() >> 11) * 0x1.0p-53 * 2.0 - 1.0;
    }
  }
  return a;
}

std::vector<double> LapackSigma(std::vector<double> a, int64_t k) {
  std::vector<double> sigma(static_cast<size_t>(k)), superb(static_cast<size_t>(k));
  const lapack_int n = static_cast<lapack_int>(k);
  EXPECT_EQ(LAPACKE_dgesvd(LAPACK_COL_MAJOR, 'N', 'N', n, n, a.data(), n, sigma.data(), nullptr, 1,
                           nullptr, 1, superb.data()),
            0);
  return sigma;
}

// Checks every property of a converged result against a (column-major [k, k]).
void ExpectValidSvd(const std::vector<double>& a, int64_t k, const SmallSvdResult& s) {
  ASSERT_TRUE(s.converged);
  ASSERT_TRUE(s.finite);
  const double top = s.sigma[0];
  for (int64_t j = 1; j < k; ++j) EXPECT_GE(s.sigma[j - 1], s.sigma[j]) << "order at " << j;
  const std::vector<double> expected = LapackSigma(a, k);
  for (int64_t j = 0; j < k; ++j) {
    EXPECT_LE(std::fabs(s.sigma[j] - expected[j]), kSigmaBound * std::max(top, 1e-300))
        << "sigma " << j;
  }
  double residual = 0, norm = 0;
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      for (int64_t l = 0; l < k; ++l) x += s.u[l * k + i] * s.sigma[l] * s.v[l * k + j];
      residual += (x - a[j * k + i]) * (x - a[j * k + i]);
      norm += a[j * k + i] * a[j * k + i];
    }
  }
  EXPECT_LE(std::sqrt(residual), kReconstructionBound * std::max(std::sqrt(norm), 1e-300));
  double worst_v = 0, worst_u = 0;
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t q = 0; q < k; ++q) {
      double vv = 0, uu = 0;
      for (int64_t i = 0; i < k; ++i) {
        vv += s.v[p * k + i] * s.v[q * k + i];
        uu += s.u[p * k + i] * s.u[q * k + i];
      }
      worst_u = std::max(worst_u, std::fabs(uu - (p == q ? 1.0 : 0.0)));
      // V's columns are orthonormal where σ is above round-off.
      if (s.sigma[p] > 1e-8 * top && s.sigma[q] > 1e-8 * top) {
        worst_v = std::max(worst_v, std::fabs(vv - (p == q ? 1.0 : 0.0)));
      }
    }
  }
  EXPECT_LE(worst_v, kOrthogonalityBound);
  EXPECT_LE(worst_u, kOrthogonalityBound);
}

TEST(SmallSvdRefTest, MatchesLapackOnRandomAndOddSizes) {
  for (int64_t k : {1, 2, 3, 7, 16, 17, 33}) {
    SCOPED_TRACE(k);
    const std::vector<double> a = RandomMatrix(k, 11 + static_cast<uint32_t>(k), false);
    ExpectValidSvd(a, k, SmallSvd(a, k));
  }
}

// A column-major [rows, cols] matrix with orthonormal columns (LAPACK's QR of Gaussian draws).
std::vector<double> Orthonormal(int64_t rows, int64_t cols, std::mt19937_64& gen) {
  std::normal_distribution<double> normal;
  std::vector<double> x(static_cast<size_t>(rows * cols));
  for (double& value : x) value = normal(gen);
  std::vector<double> tau(static_cast<size_t>(cols));
  const lapack_int m = static_cast<lapack_int>(rows), n = static_cast<lapack_int>(cols);
  EXPECT_EQ(LAPACKE_dgeqrf(LAPACK_COL_MAJOR, m, n, x.data(), m, tau.data()), 0);
  EXPECT_EQ(LAPACKE_dorgqr(LAPACK_COL_MAJOR, m, n, n, x.data(), m, tau.data()), 0);
  return x;
}

// The shape error reconstruction factors: the triangle R of the QR of Bᵀ = V Σ Uᵀ [n, k],
// k = 64 + 16, Σ spread over `decades` orders of magnitude.
std::vector<double> SketchTriangle(int64_t k, int64_t n, double decades, uint32_t seed) {
  std::mt19937_64 gen(seed);
  const std::vector<double> u = Orthonormal(k, k, gen), v = Orthonormal(n, k, gen);
  std::vector<double> bt(static_cast<size_t>(n * k), 0.0);
  for (int64_t l = 0; l < k; ++l) {
    const double sigma = std::pow(10.0, -decades * static_cast<double>(l) / k);
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t i = 0; i < n; ++i) bt[j * n + i] += v[l * n + i] * sigma * u[l * k + j];
    }
  }
  std::vector<double> tau(static_cast<size_t>(k));
  const lapack_int m = static_cast<lapack_int>(n), c = static_cast<lapack_int>(k);
  EXPECT_EQ(LAPACKE_dgeqrf(LAPACK_COL_MAJOR, m, c, bt.data(), m, tau.data()), 0);
  std::vector<double> r(static_cast<size_t>(k * k), 0.0);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i <= j; ++i) r[j * k + i] = bt[j * n + i];
  }
  return r;
}

TEST(SmallSvdRefTest, MatchesLapackOnSketchTrianglesInFewSweeps) {
  const int64_t k = 80;
  for (double decades : {1.0, 3.0, 8.0}) {
    SCOPED_TRACE(decades);
    const std::vector<double> r = SketchTriangle(k, 512, decades, 5);
    const SmallSvdResult s = SmallSvd(r, k);
    ExpectValidSvd(r, k, s);
    // Rotating R's rows (kernels/small_svd.h): 9 sweeps measured at n = 4096; R's columns took
    // up to 23.
    EXPECT_LE(s.sweeps, 12);
  }
}

// A random triangle (ill-conditioned, its columns of very different lengths).
TEST(SmallSvdRefTest, MatchesLapackOnARandomTriangle) {
  const int64_t k = 80;
  const std::vector<double> a = RandomMatrix(k, 7, true);
  ExpectValidSvd(a, k, SmallSvd(a, k));
}

// Above kSmallSvdSharedMaxK (112) the CUDA kernel works in global memory; the reference has one
// path, checked here at the size the GPU test uses for that path.
TEST(SmallSvdRefTest, MatchesLapackAboveTheSharedMemorySize) {
  const int64_t k = 120;
  const std::vector<double> a = RandomMatrix(k, 17, true);
  ExpectValidSvd(a, k, SmallSvd(a, k));
}

TEST(SmallSvdRefTest, RankDeficientInputHasZeroSingularValuesAndAnOrthogonalU) {
  const int64_t k = 10;
  std::vector<double> a = RandomMatrix(k, 23, false);
  for (int64_t i = 0; i < k; ++i) {
    a[3 * k + i] = 0.0;                 // a zero column
    a[7 * k + i] = 2.0 * a[1 * k + i];  // a dependent column
  }
  // A zero row too: its σ is exactly 0 and its v is 0.
  std::vector<double> b = a;
  for (int64_t j = 0; j < k; ++j) b[j * k + 5] = 0.0;
  const SmallSvdResult t = SmallSvd(b, k);
  ExpectValidSvd(b, k, t);
  EXPECT_EQ(t.sigma[k - 1], 0.0);
  for (int64_t i = 0; i < k; ++i) EXPECT_EQ(t.v[(k - 1) * k + i], 0.0) << "v of σ = 0";
  const SmallSvdResult s = SmallSvd(a, k);
  ExpectValidSvd(a, k, s);
  EXPECT_LE(s.sigma[k - 2], 1e-14 * s.sigma[0]);
  EXPECT_LE(s.sigma[k - 1], 1e-14 * s.sigma[0]);
}

TEST(SmallSvdRefTest, TiedSingularValuesKeepTheLowerColumnFirst) {
  // 2·I: orthogonal from the start, so no rotation, and every σ is 2 in the original order.
  const int64_t k = 5;
  std::vector<double> a(k * k, 0.0);
  for (int64_t j = 0; j < k; ++j) a[j * k + j] = 2.0;
  const SmallSvdResult s = SmallSvd(a, k);
  ASSERT_TRUE(s.converged);
  EXPECT_EQ(s.sweeps, 1);
  for (int64_t j = 0; j < k; ++j) {
    EXPECT_EQ(s.sigma[j], 2.0);
    EXPECT_EQ(s.v[j * k + j], 1.0);
    EXPECT_EQ(s.u[j * k + j], 1.0);
  }
}

TEST(SmallSvdRefTest, NonFiniteInputIsReported) {
  const int64_t k = 6;
  std::vector<double> a = RandomMatrix(k, 29, false);
  a[2 * k + 4] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(SmallSvd(a, k).finite);
  a[2 * k + 4] = std::numeric_limits<double>::infinity();
  EXPECT_FALSE(SmallSvd(a, k).finite);
}

TEST(SmallSvdRefTest, RotationZeroesThePairsInnerProduct) {
  const double x[2] = {3.0, -1.0}, y[2] = {2.5, 0.25};
  double c = 0, s = 0;
  const double alpha = x[0] * x[0] + x[1] * x[1], beta = y[0] * y[0] + y[1] * y[1];
  ASSERT_TRUE(SmallSvdRotation(alpha, beta, x[0] * y[0] + x[1] * y[1], 0.0, &c, &s));
  EXPECT_NEAR(c * c + s * s, 1.0, 1e-15);
  double p[2] = {x[0], x[1]}, q[2] = {y[0], y[1]};
  SmallSvdRotate(c, s, &p[0], &q[0]);
  SmallSvdRotate(c, s, &p[1], &q[1]);
  EXPECT_LE(std::fabs(p[0] * q[0] + p[1] * q[1]), 1e-15 * alpha);
  // Already orthogonal: no rotation.
  EXPECT_FALSE(SmallSvdRotation(1.0, 1.0, 1e-17, 0.0, &c, &s));
  // A negligible column: no rotation however parallel.
  EXPECT_FALSE(SmallSvdRotation(1.0, 1e-30, 1e-15, 1e-28, &c, &s));
  EXPECT_TRUE(SmallSvdRotation(1.0, 1e-30, 1e-15, 1e-31, &c, &s));
}

// Every pair of columns meets exactly once a sweep, odd k included (the bye).
TEST(SmallSvdRefTest, TournamentMeetsEveryPairOnce) {
  for (int k : {2, 5, 8, 81}) {
    const int kk = k + (k & 1);
    std::vector<int> met(static_cast<size_t>(k * k), 0);
    for (int round = 0; round < kk - 1; ++round) {
      std::vector<int> used(static_cast<size_t>(kk), 0);
      for (int i = 0; i < kk / 2; ++i) {
        const int p = SmallSvdSlotColumn(i, round, kk);
        const int q = SmallSvdSlotColumn(kk - 1 - i, round, kk);
        ASSERT_EQ(used[p]++, 0);
        ASSERT_EQ(used[q]++, 0);
        if (p < k && q < k) ++met[std::min(p, q) * k + std::max(p, q)];
      }
    }
    for (int64_t p = 0; p < k; ++p) {
      for (int64_t q = p + 1; q < k; ++q)
        EXPECT_EQ(met[p * k + q], 1) << k << ": " << p << "," << q;
    }
  }
}

}  // namespace
}  // namespace qcal::kernels
