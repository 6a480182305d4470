// Parity of the CUDA backend's error-reconstruction ops (CholeskyWhitening, ReconstructError) with
// the CPU reference of services/engine/aser/error_reconstruction.h (float64, LAPACK), on layers
// whose error is real: W heavy-tailed, Ŵ = the device's RTN of W, G = XᵀX of correlated
// activations with outlier channels. Both sides get the same fp32 whitening factor, so what is
// compared is the SVD path: kFull against the CPU; kRandomized against kFull. Skips without a GPU.
#include "kernels/cuda/cuda_low_rank.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/small_svd_ref.h"
#include "kernels/cuda/cuda_backend.h"
#include "services/engine/aser/activation_stats.h"
#include "services/engine/aser/error_reconstruction.h"
#include "tests/engine/quant/quant_test_data.h"
#include "tests/kernels/cuda/cuda_test_fixture.h"

namespace qcal::kernels {
namespace {

using engine::WhiteningFactor;

// kFull (cusolverDnXgesvd, double) against LAPACK (double) from the same fp32 inputs: both are
// backward stable, so each σ_i agrees to about 1e-13 · σ_1; the bound allows that absolute term
// (exact zeros from a dead channel) on top of 1e-4 relative.
constexpr double kSigmaRelBound = 1e-4;
constexpr double kSigmaAbsBound = 1e-10;  // times σ_1
// error_before and error_after: sums of the same σ², both in double.
constexpr double kErrorRelBound = 1e-6;
// L_A·L_B against the CPU's (factors may differ in sign; products may not): ‖ΔP‖_F / ‖P‖_F. Both
// are products of fp32-rounded factors (about 1e-7 each), and singular vectors near the rank cut
// move by rounding / gap.
constexpr double kProductBound = 1e-4;
// The whitened residual of the returned fp32 factors, ‖(E − L_A L_B) S‖_F, against error_after:
// |difference| <= this · error_before (the CPU test's bound for its fp32 factors); at full rank,
// where every one of the 64 directions carries its rounding, 1e-4.
constexpr double kResidualBound = 1e-5;
constexpr double kFullRankResidualBound = 1e-4;
// kRandomized (oversample 16, 2 power iterations) against kFull: error_after at most 1% above;
// on a decaying spectrum the r leading σ within 1e-3 relative.
constexpr double kRandomizedErrorRatio = 1.01;
constexpr double kRandomizedSigmaBound = 1e-3;
// GPU Cholesky (double, rounded to fp32) against the CPU's (double): ‖ΔS‖_F / ‖S‖_F.
constexpr double kWhiteningBound = 1e-6;

enum class Kind { kCholesky, kDiagonal, kNone };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kCholesky:
      return "cholesky";
    case Kind::kDiagonal:
      return "diagonal";
    case Kind::kNone:
      return "none";
  }
  return "?";
}

// A layer: w, w_hat (RTN on the device), the Gram matrix and the mean |x| of its inputs (host).
struct Layer {
  int64_t d_out = 0, d_in = 0;
  std::vector<float> w, w_hat, gram, mean_abs;
};

class CudaLowRankTest : public CudaBackendTest {
 protected:
  // W heavy-tailed, Ŵ its 3-bit RTN (group 16) on the device, X [tokens, d_in] correlated with 3
  // outlier channels; channel `dead` (if >= 0) gets no signal (mean |x| = 0, G row and column 0).
  Layer MakeLayer(int64_t d_out, int64_t d_in, int64_t tokens, uint64_t seed, int dead = -1) {
    Layer l;
    l.d_out = d_out;
    l.d_in = d_in;
    l.w = testing::HeavyTailedWeights<float>(d_out, d_in, seed);
    QuantSpec spec;
    spec.bits = 3;
    spec.group_size = 16;
    auto q = be_->QuantizeRtn(Upload(l.w, {d_out, d_in}), spec);
    EXPECT_TRUE(q.ok()) << q.status();
    if (q.ok()) l.w_hat = Download(q->dequantized);
    std::vector<double> x = testing::CorrelatedActivations(tokens, d_in, 3, seed + 1);
    if (dead >= 0) {
      for (int64_t t = 0; t < tokens; ++t) x[t * d_in + dead] = 0;
    }
    l.gram = testing::Gram<float>(x, tokens, d_in);
    l.mean_abs.assign(d_in, 0.0f);
    for (int64_t j = 0; j < d_in; ++j) {
      double sum = 0;
      for (int64_t t = 0; t < tokens; ++t) sum += std::fabs(x[t * d_in + j]);
      l.mean_abs[j] = static_cast<float>(sum / tokens);
    }
    return l;
  }

  // The device whitening factor of `kind` (undefined for kNone) and the same values as the CPU's
  // WhiteningFactor.
  void Whitening(const Layer& l, Kind kind, Tensor* device, WhiteningFactor* cpu) {
    const int64_t n = l.d_in;
    if (kind == Kind::kNone) {
      *device = Tensor();
      *cpu = engine::IdentityWhitening(n);
      return;
    }
    if (kind == Kind::kDiagonal) {
      *device = Upload(l.mean_abs, {n});
      auto s = engine::DiagonalWhitening(std::vector<double>(l.mean_abs.begin(), l.mean_abs.end()));
      ASSERT_TRUE(s.ok()) << s.status();
      *cpu = *s;
      return;
    }
    auto s = be_->CholeskyWhitening(Upload(l.gram, {n, n}), 0.01);
    ASSERT_TRUE(s.ok()) << s.status();
    *device = *s;
    const std::vector<float> host = Download(*s);
    cpu->kind = engine::Whitening::kCholesky;
    cpu->d_in = n;
    cpu->factor.assign(host.begin(), host.end());
  }

  // l.w := ŵ + Σ_t c(t)·g_t h_tᵀ, g_t and h_t Gaussian over sqrt(d_out) and sqrt(d_in) (TestRng
  // `seed`: g before h, term by term).
  template <typename Coefficient>
  void AddLowRankError(Layer& l, int64_t terms, uint64_t seed, Coefficient c) {
    testing::TestRng rng(seed);
    std::vector<double> e(l.d_out * l.d_in, 0.0);
    for (int64_t t = 0; t < terms; ++t) {
      std::vector<double> g(l.d_out), h(l.d_in);
      for (double& v : g) v = rng.Normal() / std::sqrt(double(l.d_out));
      for (double& v : h) v = rng.Normal() / std::sqrt(double(l.d_in));
      const double ct = c(t);
      for (int64_t o = 0; o < l.d_out; ++o) {
        for (int64_t j = 0; j < l.d_in; ++j) e[o * l.d_in + j] += ct * g[o] * h[j];
      }
    }
    for (size_t i = 0; i < e.size(); ++i) l.w[i] = l.w_hat[i] + static_cast<float>(e[i]);
  }

  // kFull and kRandomized of l at `rank` with `kind`'s whitening (its CPU copy into cpu_s).
  void FullAndRandomized(const Layer& l, Kind kind, int64_t rank, LowRankTensors* full,
                         LowRankTensors* rnd, WhiteningFactor* cpu_s) {
    Tensor s;
    Whitening(l, kind, &s, cpu_s);
    const Tensor w = Upload(l.w, {l.d_out, l.d_in}), w_hat = Upload(l.w_hat, {l.d_out, l.d_in});
    LowRankOptions options;
    options.rank = static_cast<int>(rank);
    options.svd = SvdMethod::kFull;
    auto f = be_->ReconstructError(w, w_hat, s, options);
    ASSERT_TRUE(f.ok()) << f.status();
    options.svd = SvdMethod::kRandomized;
    auto r = be_->ReconstructError(w, w_hat, s, options);
    ASSERT_TRUE(r.ok()) << r.status();
    *full = std::move(*f);
    *rnd = std::move(*r);
  }
};

std::vector<double> ToDouble(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// P = a·b in double, a [d_out, r], b [r, d_in].
template <typename A, typename B>
std::vector<double> Product(const std::vector<A>& a, const std::vector<B>& b, int64_t d_out,
                            int64_t d_in, int64_t r) {
  std::vector<double> p(d_out * d_in, 0.0);
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t i = 0; i < r; ++i) {
      const double ai = a[o * r + i];
      for (int64_t j = 0; j < d_in; ++j) p[o * d_in + j] += ai * double(b[i * d_in + j]);
    }
  }
  return p;
}

double RelativeDifference(const std::vector<double>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// ‖(E − P) S‖_F in double with S applied by plain loops.
double WhitenedResidual(const Layer& l, const std::vector<double>& p, const WhiteningFactor& s) {
  const int64_t d_out = l.d_out, n = l.d_in;
  double sum = 0;
  std::vector<double> row(n);
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j = 0; j < n; ++j) {
      row[j] = double(l.w[o * n + j]) - double(l.w_hat[o * n + j]) - p[o * n + j];
    }
    for (int64_t j = 0; j < n; ++j) {
      double v = 0;
      switch (s.kind) {
        case engine::Whitening::kCholesky:
          for (int64_t i = j; i < n; ++i) v += row[i] * s.factor[i * n + j];  // (R S)_j, S lower
          break;
        case engine::Whitening::kDiagonal:
          v = row[j] * s.factor[j];
          break;
        case engine::Whitening::kNone:
          v = row[j];
          break;
      }
      sum += v * v;
    }
  }
  return std::sqrt(sum);
}

TEST_F(CudaLowRankTest, FullMatchesCpuReference) {
  EXPECT_TRUE(be_->SupportsSolverOp(SolverOp::kErrorReconstruction));
  struct Case {
    int64_t d_out, d_in, rank;
  };
  // Tall (Mᵀ factored through a transposed copy), wide, square, size 1.
  const Case cases[] = {{172, 64, 8}, {96, 200, 16}, {64, 64, 5}, {1, 1, 1}};
  uint64_t seed = 10;
  for (const Case& c : cases) {
    const Layer l = MakeLayer(c.d_out, c.d_in, 3 * c.d_in + 8, seed++, c.d_in > 4 ? 4 : -1);
    for (Kind kind : {Kind::kCholesky, Kind::kDiagonal, Kind::kNone}) {
      SCOPED_TRACE(::testing::Message()
                   << c.d_out << "x" << c.d_in << " rank " << c.rank << " " << KindName(kind));
      Tensor s;
      WhiteningFactor cpu_s;
      Whitening(l, kind, &s, &cpu_s);
      engine::ErrorReconstructionOptions cpu_options;
      cpu_options.rank = static_cast<int>(c.rank);
      auto cpu = engine::ReconstructError<double>(ToDouble(l.w).data(), ToDouble(l.w_hat).data(),
                                                  c.d_out, c.d_in, cpu_s, cpu_options);
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      LowRankOptions options;
      options.rank = static_cast<int>(c.rank);
      options.svd = SvdMethod::kFull;
      auto gpu = be_->ReconstructError(Upload(l.w, {c.d_out, c.d_in}),
                                       Upload(l.w_hat, {c.d_out, c.d_in}), s, options);
      ASSERT_TRUE(gpu.ok()) << gpu.status();
      ASSERT_EQ(gpu->rank, cpu->rank);
      EXPECT_EQ(gpu->a.shape(), (Shape{c.d_out, c.rank}));
      EXPECT_EQ(gpu->b.shape(), (Shape{c.rank, c.d_in}));
      ASSERT_EQ(gpu->singular_values.size(), cpu->singular_values.size());
      const double sigma1 = cpu->singular_values[0];
      for (size_t i = 0; i < cpu->singular_values.size(); ++i) {
        const double want = cpu->singular_values[i], got = gpu->singular_values[i];
        EXPECT_LE(std::fabs(got - want), kSigmaRelBound * want + kSigmaAbsBound * sigma1)
            << "sigma " << i << ": gpu " << got << " cpu " << want;
      }
      EXPECT_NEAR(gpu->error_before, cpu->error_before, kErrorRelBound * cpu->error_before);
      EXPECT_NEAR(gpu->error_after, cpu->error_after, kErrorRelBound * cpu->error_before);

      const std::vector<float> a = Download(gpu->a), b = Download(gpu->b);
      const std::vector<double> p = Product(a, b, c.d_out, c.d_in, c.rank);
      const std::vector<double> p_cpu = Product(cpu->a, cpu->b, c.d_out, c.d_in, c.rank);
      EXPECT_LE(RelativeDifference(p, p_cpu), kProductBound);
      const double residual = WhitenedResidual(l, p, cpu_s);
      EXPECT_NEAR(residual, gpu->error_after, kResidualBound * gpu->error_before);
      if (kind == Kind::kDiagonal && c.d_in > 4) {
        for (int64_t i = 0; i < c.rank; ++i) EXPECT_EQ(b[i * c.d_in + 4], 0.0f) << "row " << i;
      }
    }
  }
}

TEST_F(CudaLowRankTest, RandomizedIsCloseToFullOnRealErrors) {
  // A whitened RTN error: a few large σ from the correlated and outlier channels, then a slowly
  // decaying tail.
  struct Case {
    int64_t d_out, d_in, rank;
  };
  const Case cases[] = {{384, 256, 32}, {200, 520, 16}};
  uint64_t seed = 30;
  for (const Case& c : cases) {
    const Layer l = MakeLayer(c.d_out, c.d_in, 2 * c.d_in, seed++);
    for (Kind kind : {Kind::kCholesky, Kind::kDiagonal}) {
      SCOPED_TRACE(::testing::Message() << c.d_out << "x" << c.d_in << " " << KindName(kind));
      LowRankTensors full, rnd;
      WhiteningFactor cpu_s;
      FullAndRandomized(l, kind, c.rank, &full, &rnd, &cpu_s);
      if (HasFatalFailure()) return;
      EXPECT_EQ(rnd.singular_values.size(), static_cast<size_t>(c.rank));
      EXPECT_NEAR(rnd.error_before, full.error_before, kErrorRelBound * full.error_before);
      EXPECT_GE(rnd.error_after, full.error_after * (1 - kErrorRelBound));
      EXPECT_LE(rnd.error_after, kRandomizedErrorRatio * full.error_after)
          << "randomized " << rnd.error_after << " full " << full.error_after;
      // The reported error is what the fp32 factors achieve.
      const std::vector<double> p =
          Product(Download(rnd.a), Download(rnd.b), c.d_out, c.d_in, c.rank);
      EXPECT_NEAR(WhitenedResidual(l, p, cpu_s), rnd.error_after,
                  kResidualBound * rnd.error_before);
    }
  }
}

TEST_F(CudaLowRankTest, RandomizedFindsTheLeadingSingularValuesOfADecayingSpectrum) {
  // E = Σ_i exp(-i/10) g_i h_iᵀ (Gaussian g, h), added to an RTN-quantized W.
  const int64_t d_out = 300, d_in = 200, terms = 120, rank = 16;
  Layer l = MakeLayer(d_out, d_in, 2 * d_in, 50);
  AddLowRankError(l, terms, 51, [](int64_t t) { return 0.05 * std::exp(-double(t) / 10); });
  for (Kind kind : {Kind::kNone, Kind::kCholesky}) {
    SCOPED_TRACE(KindName(kind));
    LowRankTensors full, rnd;
    WhiteningFactor cpu_s;
    FullAndRandomized(l, kind, rank, &full, &rnd, &cpu_s);
    if (HasFatalFailure()) return;
    ASSERT_EQ(rnd.singular_values.size(), static_cast<size_t>(rank));
    for (int64_t i = 0; i < rank; ++i) {
      EXPECT_NEAR(rnd.singular_values[i], full.singular_values[i],
                  kRandomizedSigmaBound * full.singular_values[i])
          << "sigma " << i;
    }
    EXPECT_LE(rnd.error_after, kRandomizedErrorRatio * full.error_after);
    const std::vector<double> p_full =
        Product(Download(full.a), Download(full.b), d_out, d_in, rank);
    const std::vector<double> p_rnd = Product(Download(rnd.a), Download(rnd.b), d_out, d_in, rank);
    EXPECT_LE(RelativeDifference(p_rnd, p_full), 1e-2);
  }
}

TEST_F(CudaLowRankTest, RandomizedHandlesAnErrorOfLowerRankThanTheSketch) {
  // E of exact rank 3, sketched with k = 8 + 16 columns: every sketch Y = A Ω has rank 3, its Gram
  // is singular, and CholeskyQR2 must hand the QR to Householder (a CholeskyQR on it would divide
  // by round-off pivots). The result must still be E's exact factorization.
  const int64_t d_out = 120, d_in = 96, true_rank = 3, rank = 8;
  Layer l = MakeLayer(d_out, d_in, 2 * d_in, 70);
  const double c = 0.01 * std::sqrt(double(d_out * d_in));  // entries of E about 0.01
  AddLowRankError(l, true_rank, 71, [c](int64_t) { return c; });
  for (Kind kind : {Kind::kNone, Kind::kCholesky}) {
    SCOPED_TRACE(KindName(kind));
    LowRankTensors full, rnd;
    WhiteningFactor cpu_s;
    FullAndRandomized(l, kind, rank, &full, &rnd, &cpu_s);
    if (HasFatalFailure()) return;
    ASSERT_EQ(rnd.singular_values.size(), static_cast<size_t>(rank));
    for (int64_t i = 0; i < true_rank; ++i) {
      EXPECT_NEAR(rnd.singular_values[i], full.singular_values[i],
                  kSigmaRelBound * full.singular_values[i])
          << "sigma " << i;
    }
    for (double sigma : rnd.singular_values) EXPECT_TRUE(std::isfinite(sigma));
    // What is left is the fp32 rounding of W = Ŵ + E, far below E.
    EXPECT_LE(rnd.error_after, 1e-3 * rnd.error_before);
    const std::vector<double> p = Product(Download(rnd.a), Download(rnd.b), d_out, d_in, rank);
    EXPECT_NEAR(WhitenedResidual(l, p, cpu_s), rnd.error_after, kResidualBound * rnd.error_before);
  }
}

TEST_F(CudaLowRankTest, RankIsClampedAndFullRankIsExact) {
  const Layer l = MakeLayer(172, 64, 200, 60);
  Tensor s;
  WhiteningFactor cpu_s;
  Whitening(l, Kind::kCholesky, &s, &cpu_s);
  const Tensor w = Upload(l.w, {172, 64}), w_hat = Upload(l.w_hat, {172, 64});
  for (SvdMethod method : {SvdMethod::kFull, SvdMethod::kRandomized}) {
    SCOPED_TRACE(method == SvdMethod::kFull ? "full" : "randomized");
    LowRankOptions options;
    options.rank = 1000;
    options.svd = method;
    auto out = be_->ReconstructError(w, w_hat, s, options);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->rank, 64);
    EXPECT_EQ(out->a.shape(), (Shape{172, 64}));
    EXPECT_EQ(out->b.shape(), (Shape{64, 64}));
    EXPECT_EQ(out->singular_values.size(), 64u);
    EXPECT_LE(out->error_after, 1e-6 * out->error_before);
    const std::vector<double> p = Product(Download(out->a), Download(out->b), 172, 64, 64);
    EXPECT_LE(WhitenedResidual(l, p, cpu_s), kFullRankResidualBound * out->error_before);
  }
}

TEST_F(CudaLowRankTest, ResultsAreBitIdenticalRunToRun) {
  const Layer l = MakeLayer(150, 330, 400, 70);
  const Tensor w = Upload(l.w, {150, 330}), w_hat = Upload(l.w_hat, {150, 330});
  const Tensor gram = Upload(l.gram, {330, 330});
  for (SvdMethod method : {SvdMethod::kRandomized, SvdMethod::kFull}) {
    std::vector<float> a[2], b[2], s[2];
    std::vector<double> sigma[2];
    double after[2];
    for (int run = 0; run < 2; ++run) {
      auto whitening = be_->CholeskyWhitening(gram, 0.01);
      ASSERT_TRUE(whitening.ok()) << whitening.status();
      LowRankOptions options;
      options.rank = 24;
      options.svd = method;
      options.seed = 7;
      auto out = be_->ReconstructError(w, w_hat, *whitening, options);
      ASSERT_TRUE(out.ok()) << out.status();
      s[run] = Download(*whitening);
      a[run] = Download(out->a);
      b[run] = Download(out->b);
      sigma[run] = out->singular_values;
      after[run] = out->error_after;
    }
    EXPECT_EQ(s[0], s[1]);
    EXPECT_EQ(a[0], a[1]);
    EXPECT_EQ(b[0], b[1]);
    EXPECT_EQ(sigma[0], sigma[1]);
    EXPECT_EQ(after[0], after[1]);
  }
}

TEST_F(CudaLowRankTest, CholeskyWhiteningMatchesCpu) {
  uint64_t seed = 80;
  for (auto [n, tokens] : {std::pair<int64_t, int64_t>{1, 4}, {37, 20}, {300, 900}, {513, 1100}}) {
    for (double damp : {0.01, 0.1}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " damp " << damp);
      const std::vector<double> x = testing::CorrelatedActivations(tokens, n, 2, seed++);
      std::vector<float> gram = testing::Gram<float>(x, tokens, n);
      auto cpu = engine::CholeskyWhitening<float>(gram.data(), n, damp);
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      // Only the upper triangle is read.
      for (int64_t i = 1; i < n; ++i) gram[i * n] = std::numeric_limits<float>::quiet_NaN();
      auto gpu = be_->CholeskyWhitening(Upload(gram, {n, n}), damp);
      ASSERT_TRUE(gpu.ok()) << gpu.status();
      EXPECT_EQ(gpu->shape(), (Shape{n, n}));
      const std::vector<float> s = Download(*gpu);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = i + 1; j < n; ++j) ASSERT_EQ(s[i * n + j], 0.0f) << i << ", " << j;
      }
      EXPECT_LE(RelativeDifference(ToDouble(s), cpu->factor), kWhiteningBound);
    }
  }
}

TEST_F(CudaLowRankTest, CholeskyWhiteningFailsLikeTheCpuWhenNotPositiveDefinite) {
  const int64_t n = 24;
  std::vector<float> g(n * n, 0.0f);
  for (int64_t j = 0; j < n; ++j) g[j * n + j] = j == 5 ? -1.0f : 1.0f;
  auto cpu = engine::CholeskyWhitening<float>(g.data(), n, 0.0);
  auto gpu = be_->CholeskyWhitening(Upload(g, {n, n}), 0.0);
  ASSERT_FALSE(cpu.ok());
  ASSERT_FALSE(gpu.ok());
  EXPECT_EQ(gpu.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(gpu.status().message(), cpu.status().message());
  EXPECT_NE(gpu.status().message().find("leading minor 6 of 24"), std::string::npos)
      << gpu.status();
  const std::vector<float> zeros(n * n, 0.0f);
  EXPECT_EQ(be_->CholeskyWhitening(Upload(zeros, {n, n}), 0.01).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(CudaLowRankTest, BadInputIsInvalidArgument) {
  const int64_t d_out = 6, n = 16;
  const Layer l = MakeLayer(d_out, n, 40, 90);
  const Tensor w = Upload(l.w, {d_out, n}), w_hat = Upload(l.w_hat, {d_out, n});
  auto s = be_->CholeskyWhitening(Upload(l.gram, {n, n}), 0.01);
  ASSERT_TRUE(s.ok()) << s.status();
  LowRankOptions options;
  options.rank = 4;
  auto expect_invalid = [](const absl::Status& status, const std::string& names) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_NE(status.message().find(names), std::string::npos) << status;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();

  auto bad = l.w;
  bad[2 * n + 5] = nan;
  expect_invalid(be_->ReconstructError(Upload(bad, {d_out, n}), w_hat, *s, options).status(),
                 "weight[2, 5]");
  expect_invalid(be_->ReconstructError(w, Upload(bad, {d_out, n}), *s, options).status(),
                 "quantized weight[2, 5]");
  expect_invalid(be_->ReconstructError(w, Upload(l.w, {n, d_out}), *s, options).status(), "w_hat");
  expect_invalid(be_->ReconstructError(w, Tensor(), *s, options).status(), "w_hat");
  expect_invalid(
      be_->ReconstructError(Tensor::FromVector(l.w, {d_out, n}), w_hat, *s, options).status(),
      "expected a non-empty CUDA F32 matrix");

  // Whitening: wrong shape, non-finite lower triangle (the strict upper one is not read), a zero
  // pivot, a negative diagonal scale.
  expect_invalid(be_->ReconstructError(w, w_hat, Upload(l.mean_abs, {n / 2, 2}), options).status(),
                 "whitening factor");
  auto s_host = Download(*s);
  auto s_bad = s_host;
  s_bad[9 * n + 3] = nan;
  expect_invalid(be_->ReconstructError(w, w_hat, Upload(s_bad, {n, n}), options).status(),
                 "whitening[9, 3]");
  s_bad = s_host;
  s_bad[3 * n + 9] = nan;
  EXPECT_TRUE(be_->ReconstructError(w, w_hat, Upload(s_bad, {n, n}), options).ok());
  s_bad = s_host;
  s_bad[7 * n + 7] = 0.0f;
  expect_invalid(be_->ReconstructError(w, w_hat, Upload(s_bad, {n, n}), options).status(),
                 "whitening[7, 7]");
  auto diag_bad = l.mean_abs;
  diag_bad[3] = -1.0f;
  expect_invalid(be_->ReconstructError(w, w_hat, Upload(diag_bad, {n}), options).status(),
                 "channel 3");

  LowRankOptions bad_options = options;
  bad_options.rank = 0;
  expect_invalid(be_->ReconstructError(w, w_hat, *s, bad_options).status(),
                 "error_reconstruction.rank");
  bad_options = options;
  bad_options.oversample = -1;
  expect_invalid(be_->ReconstructError(w, w_hat, *s, bad_options).status(), "oversample");
  bad_options = options;
  bad_options.power_iterations = -1;
  expect_invalid(be_->ReconstructError(w, w_hat, *s, bad_options).status(), "power_iterations");

  // CholeskyWhitening: non-finite upper triangle, bad damp, non-square.
  auto g_bad = l.gram;
  g_bad[3 * n + 9] = std::numeric_limits<float>::infinity();
  expect_invalid(be_->CholeskyWhitening(Upload(g_bad, {n, n}), 0.01).status(), "gram[3, 9]");
  expect_invalid(be_->CholeskyWhitening(Upload(l.gram, {n, n}), -0.5).status(), "damp");
  expect_invalid(be_->CholeskyWhitening(Upload(l.gram, {n, n}), std::nan("")).status(), "damp");
  expect_invalid(be_->CholeskyWhitening(Upload(l.gram, {n / 2, 2 * n}), 0.01).status(),
                 "not square");
}

// GPTQ's factor of the damped Gram matrix as the whitening factor (GptqSolveOptions::
// keep_whitening): S·Sᵀ equals (G + δI)[order, order] to fp32 Cholesky's backward error, with
// δ = float(damp · mean diag G) and order = the reversed visiting order; reconstruction with it
// (E's columns gathered, L_B's scattered back) reaches CholeskyWhitening's errors; the randomized
// SVD's thin products (gram_error_sq) give the formed path's factors, with GPTQ's factor and with
// CholeskyWhitening's and its δ (WhiteningDelta). d_in = 1100 takes the panel products. Where GPTQ
// does not factor exactly G + δI (dead or outlier columns), or when not asked, no factor is kept;
// bad orders and options are refused.
TEST_F(CudaLowRankTest, GptqFactorServesAsTheWhiteningFactor) {
  // fp32 Cholesky: ‖S·Sᵀ − A‖_F <= this · ‖A‖_F (backward error about √n·u at these sizes).
  constexpr double kFactorBound = 2e-5;
  // Against CholeskyWhitening's factor (double, rounded): every σ_i within this · σ_1, and the
  // errors within this · error_before (both factors square to G + δI within fp32 rounding).
  constexpr double kAgainstCholeskyBound = 1e-3;
  // Thin against formed products (double, other association): σ within this · σ_1, L_A·L_B within
  // kThinProductBound relative; error_before within OutputError's TF32 bound.
  constexpr double kThinSigmaBound = 1e-9;
  constexpr double kThinProductBound = 1e-6;
  constexpr double kOutputErrorBound = 5e-4;
  struct Case {
    int64_t d_out, d_in;
    bool act_order;
  };
  uint64_t seed = 120;
  for (const Case& c : {Case{96, 200, false}, Case{96, 200, true}, Case{150, 1100, true}}) {
    SCOPED_TRACE(::testing::Message()
                 << c.d_out << "x" << c.d_in << (c.act_order ? " act-order" : ""));
    const int64_t n = c.d_in, rank = 16;
    const Layer l = MakeLayer(c.d_out, n, n + 100, seed++);
    const Tensor gram = Upload(l.gram, {n, n});
    GptqSolveOptions gopt;
    gopt.act_order = c.act_order;
    gopt.keep_whitening = true;
    auto f = be_->GptqFactorize(gram, gopt);
    ASSERT_TRUE(f.ok()) << f.status();
    ASSERT_TRUE(f->whitening.defined());
    ASSERT_EQ(f->whitening.shape(), (Shape{n, n}));
    ASSERT_EQ(f->whitening_order.size(), static_cast<size_t>(n));
    for (int64_t p = 0; p < n; ++p) ASSERT_EQ(f->whitening_order[p], f->perm[n - 1 - p]) << p;
    double diag_sum = 0;
    for (int64_t j = 0; j < n; ++j) diag_sum += l.gram[j * n + j];
    EXPECT_EQ(f->whitening_delta, double(float(0.01 * diag_sum / double(n))));

    // S·Sᵀ against (G + δI)[order, order] (G's upper triangle), strict upper triangle 0.
    const std::vector<float> s = Download(f->whitening);
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (j > i) {
          ASSERT_EQ(s[i * n + j], 0.0f) << i << ", " << j;
          continue;
        }
        double v = 0;
        for (int64_t t = 0; t <= j; ++t) v += double(s[i * n + t]) * double(s[j * n + t]);
        const int64_t a = std::min(f->whitening_order[i], f->whitening_order[j]);
        const int64_t b = std::max(f->whitening_order[i], f->whitening_order[j]);
        const double want = double(l.gram[a * n + b]) + (i == j ? f->whitening_delta : 0.0);
        num += (v - want) * (v - want) * (i == j ? 1 : 2);
        den += want * want * (i == j ? 1 : 2);
      }
    }
    EXPECT_LE(std::sqrt(num / den), kFactorBound);

    const Tensor w = Upload(l.w, {c.d_out, n}), w_hat = Upload(l.w_hat, {c.d_out, n});
    auto chol = be_->CholeskyWhitening(gram, 0.01);
    ASSERT_TRUE(chol.ok()) << chol.status();
    WhiteningFactor cpu_s;
    cpu_s.kind = engine::Whitening::kCholesky;
    cpu_s.d_in = n;
    const std::vector<float> chol_host = Download(*chol);
    cpu_s.factor.assign(chol_host.begin(), chol_host.end());
    for (SvdMethod method : {SvdMethod::kFull, SvdMethod::kRandomized}) {
      SCOPED_TRACE(method == SvdMethod::kFull ? "full" : "randomized");
      LowRankOptions options;
      options.rank = static_cast<int>(rank);
      options.svd = method;
      auto ref = be_->ReconstructError(w, w_hat, *chol, options);
      ASSERT_TRUE(ref.ok()) << ref.status();
      options.whitening_order = f->whitening_order;
      auto got = be_->ReconstructError(w, w_hat, f->whitening, options);
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(got->singular_values.size(), ref->singular_values.size());
      const double sigma1 = ref->singular_values[0];
      for (size_t i = 0; i < ref->singular_values.size(); ++i) {
        EXPECT_NEAR(got->singular_values[i], ref->singular_values[i],
                    kAgainstCholeskyBound * sigma1)
            << "sigma " << i;
      }
      EXPECT_NEAR(got->error_before, ref->error_before, kAgainstCholeskyBound * ref->error_before);
      EXPECT_NEAR(got->error_after, ref->error_after, kAgainstCholeskyBound * ref->error_before);
      // L_B's columns are back in natural order: the residual, whitened by the natural-order
      // factor, is the reported error.
      const std::vector<double> p = Product(Download(got->a), Download(got->b), c.d_out, n, rank);
      EXPECT_NEAR(WhitenedResidual(l, p, cpu_s), got->error_after,
                  kAgainstCholeskyBound * got->error_before);
      if (method != SvdMethod::kRandomized) continue;

      // The same, forming no E·S: ‖E·Xᵀ‖² from OutputError.
      auto output_error = be_->OutputError(w, w_hat, gram);
      ASSERT_TRUE(output_error.ok()) << output_error.status();
      LowRankOptions thin = options;
      thin.gram_error_sq = *output_error * *output_error;
      thin.whitening_delta = f->whitening_delta;
      auto implicit = be_->ReconstructError(w, w_hat, f->whitening, thin);
      ASSERT_TRUE(implicit.ok()) << implicit.status();
      ASSERT_EQ(implicit->singular_values.size(), got->singular_values.size());
      for (size_t i = 0; i < got->singular_values.size(); ++i) {
        EXPECT_NEAR(implicit->singular_values[i], got->singular_values[i],
                    kThinSigmaBound * got->singular_values[0])
            << "sigma " << i;
      }
      EXPECT_LE(RelativeDifference(
                    Product(Download(implicit->a), Download(implicit->b), c.d_out, n, rank), p),
                kThinProductBound);
      EXPECT_NEAR(implicit->error_before, got->error_before, kOutputErrorBound * got->error_before);
      const double before_sq = got->error_before * got->error_before;
      EXPECT_NEAR(implicit->error_after * implicit->error_after,
                  got->error_after * got->error_after, 2.5 * kOutputErrorBound * before_sq);

      // CholeskyWhitening's factor in natural order with its δ (WhiteningDelta): the same against
      // its formed path.
      auto delta = be_->WhiteningDelta(gram, 0.01);
      ASSERT_TRUE(delta.ok()) << delta.status();
      EXPECT_EQ(*delta, 0.01 * (diag_sum / double(n)));
      LowRankOptions natural;
      natural.rank = static_cast<int>(rank);
      natural.gram_error_sq = thin.gram_error_sq;
      natural.whitening_delta = *delta;
      auto chol_thin = be_->ReconstructError(w, w_hat, *chol, natural);
      ASSERT_TRUE(chol_thin.ok()) << chol_thin.status();
      for (size_t i = 0; i < ref->singular_values.size(); ++i) {
        EXPECT_NEAR(chol_thin->singular_values[i], ref->singular_values[i],
                    kThinSigmaBound * ref->singular_values[0])
            << "sigma " << i;
      }
      EXPECT_LE(RelativeDifference(
                    Product(Download(chol_thin->a), Download(chol_thin->b), c.d_out, n, rank),
                    Product(Download(ref->a), Download(ref->b), c.d_out, n, rank)),
                kThinProductBound);
      EXPECT_NEAR(chol_thin->error_before, ref->error_before,
                  kOutputErrorBound * ref->error_before);
    }
  }
  EXPECT_EQ(be_->WhiteningDelta(Upload(std::vector<float>(6, 1.0f), {2, 3}), 0.01).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->WhiteningDelta(Upload(std::vector<float>(4, 1.0f), {2, 2}), -1).status().code(),
            absl::StatusCode::kInvalidArgument);

  // None kept: not asked, an outlier column, a dead column.
  const int64_t n = 64;
  Layer l = MakeLayer(32, n, 200, 140);
  GptqSolveOptions gopt;
  auto plain = be_->GptqFactorize(Upload(l.gram, {n, n}), gopt);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->whitening.defined());
  EXPECT_TRUE(plain->whitening_order.empty());
  gopt.keep_whitening = true;
  gopt.outlier_columns = {5};
  auto outlier = be_->GptqFactorize(Upload(l.gram, {n, n}), gopt);
  ASSERT_TRUE(outlier.ok()) << outlier.status();
  EXPECT_FALSE(outlier->whitening.defined());
  gopt.outlier_columns.clear();
  const Layer dead = MakeLayer(32, n, 200, 141, /*dead=*/7);
  auto with_dead = be_->GptqFactorize(Upload(dead.gram, {n, n}), gopt);
  ASSERT_TRUE(with_dead.ok()) << with_dead.status();
  EXPECT_EQ(with_dead->dead_columns, 1);
  EXPECT_FALSE(with_dead->whitening.defined());

  // Bad orders and options.
  auto kept = be_->GptqFactorize(Upload(l.gram, {n, n}), gopt);
  ASSERT_TRUE(kept.ok()) << kept.status();
  ASSERT_TRUE(kept->whitening.defined());
  const Tensor w = Upload(l.w, {32, n}), w_hat = Upload(l.w_hat, {32, n});
  auto expect_invalid = [](const absl::StatusOr<LowRankTensors>& r, const std::string& names) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(names), std::string::npos) << r.status();
  };
  LowRankOptions options;
  options.rank = 4;
  options.whitening_order = kept->whitening_order;
  options.whitening_order[3] = options.whitening_order[4];
  expect_invalid(be_->ReconstructError(w, w_hat, kept->whitening, options), "repeats");
  options.whitening_order[3] = static_cast<int32_t>(n);
  expect_invalid(be_->ReconstructError(w, w_hat, kept->whitening, options), "out of range");
  options.whitening_order.assign(kept->whitening_order.begin(), kept->whitening_order.end() - 1);
  expect_invalid(be_->ReconstructError(w, w_hat, kept->whitening, options), "entries");
  options.whitening_order = kept->whitening_order;
  expect_invalid(be_->ReconstructError(w, w_hat, Upload(l.mean_abs, {n}), options),
                 "needs a Cholesky whitening factor");
  options.whitening_order.clear();
  options.gram_error_sq = 1.0;
  options.svd = SvdMethod::kFull;
  expect_invalid(be_->ReconstructError(w, w_hat, kept->whitening, options), "gram_error_sq");
  options.svd = SvdMethod::kRandomized;
  expect_invalid(be_->ReconstructError(w, w_hat, Tensor(), options), "gram_error_sq");
  options.gram_error_sq = std::nan("");
  expect_invalid(be_->ReconstructError(w, w_hat, kept->whitening, options), "must be finite");
  options.gram_error_sq = 1.0;
  options.whitening_delta = -1e-3;
  expect_invalid(be_->ReconstructError(w, w_hat, kept->whitening, options), "whitening_delta");
}

// tr(R·G·Rᵀ) in double for R = w − w_hat − p (p [d_out, d_in] or empty), G's upper triangle.
double GramErrorSq(const Layer& l, const std::vector<double>& p) {
  const int64_t n = l.d_in;
  double sum = 0;
  std::vector<double> row(n);
  for (int64_t o = 0; o < l.d_out; ++o) {
    for (int64_t j = 0; j < n; ++j) {
      row[j] = double(l.w[o * n + j]) - double(l.w_hat[o * n + j]) - (p.empty() ? 0 : p[o * n + j]);
    }
    for (int64_t i = 0; i < n; ++i) {
      double v = 0;
      for (int64_t j = 0; j < n; ++j) {
        v += double(l.gram[std::min(i, j) * n + std::max(i, j)]) * row[j];
      }
      sum += row[i] * v;
    }
  }
  return sum;
}

// LowRankOutputError (thin products from ‖E·Xᵀ‖²) against the corrected weight's error. The
// result is a difference from ‖E·Xᵀ‖², so its rounding is relative to that, and both bounds are on
// squares: given the exact ‖E·Xᵀ‖², the squared result is within 1e-5 · ‖E·Xᵀ‖² of the double
// reference's (1 x 1 at full rank leaves a true residual of ~1e-16 and fp32 rounding); given
// OutputError's (TF32: within 5e-4 in value, so about 1e-3 in square), within 5e-3 · ‖E·Xᵀ‖² of
// OutputError of w_hat + a·b squared (two TF32 measurements; measured on an H100 before E was
// formed first: 2.2e-3 at 150 x 1100). Bad shapes and error_sq are refused.
TEST_F(CudaLowRankTest, LowRankOutputErrorMatchesTheCorrectedWeight) {
  constexpr double kExactBound = 1e-5;
  constexpr double kTf32Bound = 5e-3;
  struct Case {
    int64_t d_out, d_in, rank;
  };
  uint64_t seed = 160;
  for (const Case& c : {Case{96, 200, 8}, Case{150, 1100, 16}, Case{1, 1, 1}}) {
    SCOPED_TRACE(::testing::Message() << c.d_out << "x" << c.d_in << " rank " << c.rank);
    const Layer l = MakeLayer(c.d_out, c.d_in, c.d_in + 50, seed++);
    const Tensor w = Upload(l.w, {c.d_out, c.d_in}), w_hat = Upload(l.w_hat, {c.d_out, c.d_in});
    const Tensor gram = Upload(l.gram, {c.d_in, c.d_in});
    auto s = be_->CholeskyWhitening(gram, 0.01);
    ASSERT_TRUE(s.ok()) << s.status();
    LowRankOptions options;
    options.rank = static_cast<int>(c.rank);
    auto lr = be_->ReconstructError(w, w_hat, *s, options);
    ASSERT_TRUE(lr.ok()) << lr.status();
    const std::vector<double> p =
        Product(Download(lr->a), Download(lr->b), c.d_out, c.d_in, lr->rank);
    const double want_sq = std::max(0.0, GramErrorSq(l, p)), before_sq = GramErrorSq(l, {});
    auto exact = be_->LowRankOutputError(w, w_hat, lr->a, lr->b, gram, before_sq);
    ASSERT_TRUE(exact.ok()) << exact.status();
    EXPECT_NEAR(*exact * *exact, want_sq, kExactBound * before_sq);

    auto before = be_->OutputError(w, w_hat, gram);
    ASSERT_TRUE(before.ok()) << before.status();
    auto thin = be_->LowRankOutputError(w, w_hat, lr->a, lr->b, gram, *before * *before);
    ASSERT_TRUE(thin.ok()) << thin.status();
    Tensor w_eff = Upload(l.w_hat, {c.d_out, c.d_in});
    ASSERT_TRUE(be_->AddLowRank(lr->a, lr->b, w_eff).ok());
    auto formed = be_->OutputError(w, w_eff, gram);
    ASSERT_TRUE(formed.ok()) << formed.status();
    EXPECT_NEAR(*thin * *thin, *formed * *formed, kTf32Bound * *before * *before);
    EXPECT_LT(*thin, *before);
  }

  const Layer l = MakeLayer(8, 16, 40, 170);
  const Tensor w = Upload(l.w, {8, 16}), w_hat = Upload(l.w_hat, {8, 16});
  const Tensor gram = Upload(l.gram, {16, 16});
  const Tensor a = Upload(std::vector<float>(8 * 2, 0.5f), {8, 2});
  const Tensor b = Upload(std::vector<float>(2 * 16, 0.25f), {2, 16});
  auto expect_invalid = [](const absl::StatusOr<double>& r, const std::string& names) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(names), std::string::npos) << r.status();
  };
  expect_invalid(
      be_->LowRankOutputError(w, w_hat, a, Upload(std::vector<float>(2 * 15), {2, 15}), gram, 1.0),
      "do not match");
  expect_invalid(be_->LowRankOutputError(w, w_hat, b, a, gram, 1.0), "do not match");
  expect_invalid(be_->LowRankOutputError(w, w_hat, a, b, gram, -1.0), "finite and >= 0");
  expect_invalid(be_->LowRankOutputError(w, w_hat, a, b, gram, std::nan("")), "finite and >= 0");
}

// AddLowRank against the double product on the host, at odd sizes and rank 1; bad shapes are
// refused.
TEST_F(CudaLowRankTest, AddLowRankMatchesHostProduct) {
  for (const auto& [d_out, d_in, r] :
       {std::tuple<int64_t, int64_t, int64_t>{37, 71, 5}, {1, 9, 1}, {130, 257, 16}}) {
    SCOPED_TRACE(::testing::Message() << d_out << "x" << d_in << " rank " << r);
    const std::vector<float> a = testing::HeavyTailedWeights<float>(d_out, r, 11);
    const std::vector<float> b = testing::HeavyTailedWeights<float>(r, d_in, 12);
    const std::vector<float> w = testing::HeavyTailedWeights<float>(d_out, d_in, 13);
    Tensor dw = Upload(w, {d_out, d_in});
    ASSERT_TRUE(be_->AddLowRank(Upload(a, {d_out, r}), Upload(b, {r, d_in}), dw).ok());
    std::vector<double> ref = Product(a, b, d_out, d_in, r);
    for (int64_t i = 0; i < d_out * d_in; ++i) ref[i] += w[i];
    EXPECT_LE(RelativeDifference(ToDouble(Download(dw)), ref), 1e-6);
  }
  Tensor w = Upload(std::vector<float>(12, 0.0f), {3, 4});
  const absl::Status bad = be_->AddLowRank(Upload(std::vector<float>(6, 1.0f), {3, 2}),
                                           Upload(std::vector<float>(6, 1.0f), {2, 3}), w);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
}

// The smoothing statistics of a chunk on the device against engine::ActivationStats (the host
// reference): max |x| bit-identical, Σ|x| to double rounding, the same counts; non-finite values
// found in any row, BOS rows included; a bad shape refused.
TEST_F(CudaLowRankTest, ChannelAbsStatsMatchesActivationStats) {
  for (const auto& [samples, seq_len, width] :
       {std::tuple<int64_t, int64_t, int64_t>{3, 37, 301}, {8, 512, 96}, {1, 1, 5}}) {
    SCOPED_TRACE(::testing::Message() << samples << " x " << seq_len << " x " << width);
    const int64_t rows = samples * seq_len;
    std::vector<float> x = testing::HeavyTailedWeights<float>(rows, width, 21);
    x[0] = 1e4f;  // a BOS row's outlier must not count
    engine::ActivationStats ref(width);
    ASSERT_TRUE(ref.Accumulate(x.data(), rows, width, seq_len).ok());
    auto got = be_->ChannelAbsStats(Upload(x, {rows, width}), seq_len);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->tokens, ref.tokens());
    EXPECT_EQ(got->skipped, ref.skipped());
    EXPECT_EQ(got->first_bad_column, -1);
    EXPECT_EQ(got->max_abs, ref.max_abs());
    ASSERT_EQ(got->sum_abs.size(), ref.sum_abs().size());
    for (int64_t j = 0; j < width; ++j) {
      EXPECT_NEAR(got->sum_abs[j], ref.sum_abs()[j], 1e-12 * std::fabs(ref.sum_abs()[j]) + 1e-300)
          << "column " << j;
    }
    x[(rows - 1) * width + width - 1] = std::numeric_limits<float>::infinity();
    if (seq_len > 1) x[seq_len * (samples - 1) * width + 2 % width] = std::nanf("");
    auto bad = be_->ChannelAbsStats(Upload(x, {rows, width}), seq_len);
    ASSERT_TRUE(bad.ok()) << bad.status();
    EXPECT_EQ(bad->first_bad_column, seq_len > 1 ? 2 % width : width - 1);
  }
  auto wrong = be_->ChannelAbsStats(Upload(std::vector<float>(10, 1.0f), {5, 2}), 2);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument) << wrong.status();

  // seq_len 0: every row counts (a weight's column maxima).
  const std::vector<float> w = testing::HeavyTailedWeights<float>(70, 33, 22);
  auto cols = be_->ChannelAbsStats(Upload(w, {70, 33}), 0);
  ASSERT_TRUE(cols.ok()) << cols.status();
  EXPECT_EQ(cols->tokens, 70);
  EXPECT_EQ(cols->skipped, 0);
  for (int64_t j = 0; j < 33; ++j) {
    float m = 0;
    for (int64_t r = 0; r < 70; ++r) m = std::max(m, std::fabs(w[r * 33 + j]));
    EXPECT_EQ(cols->max_abs[j], m) << "column " << j;
  }
}

// ChannelAbsStatsInto leaves ChannelAbsStats' totals on the device, bit for bit, in the row of a
// wider tensor it is given (the smoothing pass keeps a row a chunk); outputs of the wrong size are
// refused.
TEST_F(CudaLowRankTest, ChannelAbsStatsIntoLeavesTheSameTotalsOnTheDevice) {
  const int64_t samples = 4, seq_len = 37, width = 301, rows = samples * seq_len;
  std::vector<float> x = testing::HeavyTailedWeights<float>(rows, width, 23);
  x[5 * width + 7] = std::nanf("");
  const Tensor xd = Upload(x, {rows, width});
  auto want = be_->ChannelAbsStats(xd, seq_len);
  ASSERT_TRUE(want.ok()) << want.status();
  auto m = be_->Alloc(DType::kF32, {3, width});
  auto s = be_->Alloc(DType::kF64, {3, width});
  auto f = be_->Alloc(DType::kI32, {3, width});
  ASSERT_TRUE(m.ok() && s.ok() && f.ok());
  Tensor mr = m->Rows(1, 2), sr = s->Rows(1, 2), fr = f->Rows(1, 2);
  ASSERT_TRUE(be_->ChannelAbsStatsInto(xd, seq_len, mr, sr, fr).ok());
  const std::vector<float> got_m = Download<float>(*m);
  const std::vector<double> got_s = Download<double>(*s);
  const std::vector<int32_t> got_f = Download<int32_t>(*f);
  for (int64_t j = 0; j < width; ++j) {  // bits compared: column 7's sum is a NaN
    EXPECT_EQ(std::memcmp(&got_m[width + j], &want->max_abs[j], sizeof(float)), 0)
        << "column " << j;
    EXPECT_EQ(std::memcmp(&got_s[width + j], &want->sum_abs[j], sizeof(double)), 0)
        << "column " << j;
    EXPECT_EQ(got_f[width + j], j == 7 ? 1 : 0) << "column " << j;
    EXPECT_EQ(got_m[j], 0.0f);  // the other rows untouched (Alloc zeroes)
  }
  EXPECT_EQ(want->first_bad_column, 7);
  const absl::Status wrong = be_->ChannelAbsStatsInto(xd, seq_len, *m, sr, fr);
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument) << wrong;
}

// The smoothing fold's scalings on the device give the host loops' bits (one IEEE product or
// quotient per element); mismatched scales are refused.
TEST_F(CudaLowRankTest, ScaleColumnsAndDivideRowsMatchTheHostBitForBit) {
  const int64_t rows = 131, cols = 77;
  const std::vector<float> w = testing::HeavyTailedWeights<float>(rows, cols, 31);
  std::vector<float> m_cols = testing::HeavyTailedWeights<float>(1, cols, 32);
  std::vector<float> m_rows = testing::HeavyTailedWeights<float>(1, rows, 33);
  for (float& v : m_cols) v = std::fabs(v) + 0.01f;
  for (float& v : m_rows) v = std::fabs(v) + 0.01f;
  std::vector<float> scaled = w, divided = w;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      scaled[r * cols + j] *= m_cols[j];
      divided[r * cols + j] /= m_rows[r];
    }
  }
  Tensor a = Upload(w, {rows, cols}), b = Upload(w, {rows, cols});
  ASSERT_TRUE(be_->ScaleColumns(a, Upload(m_cols, {cols})).ok());
  ASSERT_TRUE(be_->DivideRows(b, Upload(m_rows, {rows})).ok());
  EXPECT_EQ(Download(a), scaled);
  EXPECT_EQ(Download(b), divided);
  // A vector is rows of one (a bias).
  Tensor bias = Upload(m_cols, {cols});
  ASSERT_TRUE(be_->DivideRows(bias, Upload(m_cols, {cols})).ok());
  EXPECT_EQ(Download(bias), std::vector<float>(cols, 1.0f));
  EXPECT_EQ(be_->ScaleColumns(a, Upload(m_rows, {rows})).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->DivideRows(a, Upload(m_cols, {cols})).code(), absl::StatusCode::kInvalidArgument);
}

// Positions where the doubles' bit patterns differ.
int64_t BitMismatches(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return -1;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    bad += std::memcmp(&got[i], &want[i], sizeof(double)) != 0;
  return bad;
}

// The device's k x k Jacobi SVD (kernels/cuda/small_svd.cu, what kRandomized runs on its triangle)
// equals ref::SmallSvd bit for bit: u, sigma, v and the sweeps, at size 1, odd and even k, the
// shared-memory limit (kSmallSvdSharedMaxK = 112) and above it (global memory), graded triangles
// like the sketch's R, and a rank-deficient input; a non-finite input is reported.
TEST_F(CudaLowRankTest, SmallSvdEqualsTheCpuReferenceBitForBit) {
  // bits: whether u, sigma and v must match (not with a NaN, whose σ ranks collide).
  auto check = [](const std::vector<double>& a, int64_t k, const std::string& what,
                  bool bits = true) {
    SCOPED_TRACE(what);
    const ref::SmallSvdResult want = ref::SmallSvd(a, k);
    auto got = cuda::SmallSvdOnDevice(a, k, /*device=*/0);
    if (!got.ok()) {
      ADD_FAILURE() << got.status();
      return want;
    }
    EXPECT_EQ(got->sweeps, want.sweeps);
    EXPECT_EQ(got->converged, want.converged);
    EXPECT_EQ(got->finite, want.finite);
    if (!bits) return want;
    EXPECT_EQ(BitMismatches(got->sigma, want.sigma), 0);
    EXPECT_EQ(BitMismatches(got->u, want.u), 0);
    EXPECT_EQ(BitMismatches(got->v, want.v), 0);
    return want;
  };
  for (int64_t k : {1, 2, 7, 17, 80, 112, 113, 130}) {
    std::mt19937_64 gen(static_cast<uint64_t>(k));
    std::uniform_real_distribution<double> uniform(-1.0, 1.0);
    std::vector<double> a(static_cast<size_t>(k * k), 0.0);
    for (int64_t j = 0; j < k; ++j) {
      const double scale = std::pow(10.0, -3.0 * static_cast<double>(j) / static_cast<double>(k));
      for (int64_t i = 0; i <= j; ++i) a[j * k + i] = uniform(gen) * scale;
    }
    const ref::SmallSvdResult want = check(a, k, "graded triangle, k = " + std::to_string(k));
    EXPECT_TRUE(want.converged && want.finite);
  }
  // Rank-deficient: a zero row and a dependent column.
  const int64_t k = 24;
  std::mt19937_64 gen(3);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  std::vector<double> a(static_cast<size_t>(k * k));
  for (double& value : a) value = uniform(gen);
  for (int64_t i = 0; i < k; ++i) a[9 * k + i] = 0.5 * a[2 * k + i];
  for (int64_t j = 0; j < k; ++j) a[j * k + 4] = 0.0;
  check(a, k, "rank-deficient");
  a[5 * k + 7] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(check(a, k, "NaN", /*bits=*/false).finite);
  EXPECT_EQ(cuda::SmallSvdOnDevice({}, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qcal::kernels
