// Error reconstruction by whitening SVD against the oracles of DESIGN.md section 3 ("Error
// reconstruction (ASER)"), in float64, on random data and on stories260k's real calibration inputs:
// the residual identity, never worse than plain SVD or LQER, full rank exact, the rank rules, and
// outlier extraction.
#include "services/engine/aser/error_reconstruction.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/engine/aser/activation_stats.h"
#include "services/engine/quant/gptq.h"
#include "services/engine/quant/quantized_linear.h"
#include "tests/engine/aser/aser_test_util.h"

namespace qcal::engine {
namespace {

using qcal::testing::CorrelatedActivations;
using qcal::testing::Gram;
using qcal::testing::HeavyTailedWeights;

// A layer with its calibration input: W, the RTN-dequantized Ŵ, X [tokens][d_in] and G = XᵀX.
struct Layer {
  int64_t d_out = 0, d_in = 0, tokens = 0;
  std::vector<double> w, w_hat, x, gram;
  std::vector<double> mean_abs;  // mean |X_tj| per channel
};

std::vector<double> RtnDequantized(const std::vector<double>& w, int64_t d_out, int64_t d_in,
                                   int bits, int group_size) {
  QuantSpec spec;
  spec.bits = bits;
  spec.group_size = group_size;
  auto q = QuantizeRtn<double>(w.data(), d_out, d_in, spec);
  QCAL_CHECK(q.ok());
  const std::vector<float> deq = q->Dequantized();
  return std::vector<double>(deq.begin(), deq.end());
}

std::vector<double> MeanAbs(const std::vector<double>& x, int64_t tokens, int64_t d_in) {
  std::vector<double> m(static_cast<size_t>(d_in), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < d_in; ++j) m[j] += std::fabs(x[t * d_in + j]) / double(tokens);
  }
  return m;
}

Layer RandomLayer(int64_t d_out, int64_t d_in, int64_t tokens, uint64_t seed) {
  Layer l;
  l.d_out = d_out;
  l.d_in = d_in;
  l.tokens = tokens;
  l.w = HeavyTailedWeights<double>(d_out, d_in, seed);
  l.w_hat = RtnDequantized(l.w, d_out, d_in, 3, 16);
  l.x = CorrelatedActivations(tokens, d_in, 3, seed + 1);
  l.gram = Gram<double>(l.x, tokens, d_in);
  l.mean_abs = MeanAbs(l.x, tokens, d_in);
  return l;
}

// R = E − L_A L_B in double.
template <typename T>
std::vector<double> Residual(const Layer& l, const LowRankCorrection<T>& c) {
  std::vector<double> r(static_cast<size_t>(l.d_out * l.d_in));
  for (int64_t o = 0; o < l.d_out; ++o) {
    for (int64_t j = 0; j < l.d_in; ++j) {
      double ab = 0;
      for (int64_t i = 0; i < c.rank; ++i)
        ab += double(c.a[o * c.rank + i]) * double(c.b[i * l.d_in + j]);
      r[o * l.d_in + j] = (l.w[o * l.d_in + j] - l.w_hat[o * l.d_in + j]) - ab;
    }
  }
  return r;
}

// ‖R S‖_F with S applied by plain loops (not the library's BLAS path).
double WhitenedNorm(const std::vector<double>& r, const WhiteningFactor& s, int64_t d_out,
                    int64_t d_in) {
  double sum = 0;
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j = 0; j < d_in; ++j) {
      double v = 0;
      switch (s.kind) {
        case Whitening::kCholesky:
          for (int64_t p = j; p < d_in; ++p) v += r[o * d_in + p] * s.factor[p * d_in + j];
          break;
        case Whitening::kDiagonal:
          v = r[o * d_in + j] * s.factor[j];
          break;
        case Whitening::kNone:
          v = r[o * d_in + j];
          break;
      }
      sum += v * v;
    }
  }
  return std::sqrt(sum);
}

// ‖R Xᵀ‖_F.
double OutputNorm(const std::vector<double>& r, const Layer& l) {
  double sum = 0;
  for (int64_t o = 0; o < l.d_out; ++o) {
    for (int64_t t = 0; t < l.tokens; ++t) {
      double v = 0;
      for (int64_t j = 0; j < l.d_in; ++j) v += r[o * l.d_in + j] * l.x[t * l.d_in + j];
      sum += v * v;
    }
  }
  return std::sqrt(sum);
}

ErrorReconstructionOptions Rank(int rank) {
  ErrorReconstructionOptions o;
  o.rank = rank;
  return o;
}

LowRankCorrection<double> Fit(const Layer& l, const WhiteningFactor& s, int rank) {
  auto c = ReconstructError<double>(l.w.data(), l.w_hat.data(), l.d_out, l.d_in, s, Rank(rank));
  QCAL_CHECK(c.ok());
  return *std::move(c);
}

absl::StatusOr<WhiteningFactor> Cholesky(const Layer& l, double damp) {
  return CholeskyWhitening<double>(l.gram.data(), l.d_in, damp);
}

WhiteningFactor Diagonal(const Layer& l) {
  auto s = DiagonalWhitening(l.mean_abs);
  QCAL_CHECK(s.ok());
  return *std::move(s);
}

// Every oracle of DESIGN.md section 3 on one layer, at the given ranks.
void CheckOracles(const Layer& l, const std::vector<int>& ranks) {
  const int64_t k = std::min(l.d_out, l.d_in);
  auto damped_or = Cholesky(l, 0.01), exact_or = Cholesky(l, 0.0);
  ASSERT_TRUE(damped_or.ok()) << damped_or.status();
  ASSERT_TRUE(exact_or.ok()) << exact_or.status();
  const WhiteningFactor &damped = *damped_or, &exact = *exact_or;
  EXPECT_GT(damped.delta, 0);
  EXPECT_EQ(exact.delta, 0);
  for (int r : ranks) {
    SCOPED_TRACE("rank " + std::to_string(r));
    // Residual identity for the damped S, and error_before = ‖E S‖.
    const auto c = Fit(l, damped, r);
    const double tol = 1e-9 * c.error_before;
    EXPECT_NEAR(WhitenedNorm(Residual(l, c), damped, l.d_out, l.d_in), c.error_after, tol);
    EXPECT_NEAR(WhitenedNorm(Residual(l, LowRankCorrection<double>{}), damped, l.d_out, l.d_in),
                c.error_before, tol);
    // Never worse than plain SVD of E (or LQER) in that norm.
    const auto plain = Fit(l, IdentityWhitening(l.d_in), r);
    const auto lqer = Fit(l, Diagonal(l), r);
    EXPECT_LE(c.error_after, WhitenedNorm(Residual(l, plain), damped, l.d_out, l.d_in) + tol);
    EXPECT_LE(c.error_after, WhitenedNorm(Residual(l, lqer), damped, l.d_out, l.d_in) + tol);

    // δ = 0: the whitened norm is the output error ‖(E − L_A L_B) Xᵀ‖, and whitening is never
    // worse than LQER's diagonal scaling or plain SVD there.
    const auto c0 = Fit(l, exact, r);
    const double out0 = OutputNorm(Residual(l, c0), l);
    EXPECT_NEAR(out0, c0.error_after, 1e-8 * c0.error_before);
    EXPECT_LE(out0, OutputNorm(Residual(l, lqer), l) * (1 + 1e-9));
    EXPECT_LE(out0, OutputNorm(Residual(l, plain), l) * (1 + 1e-9));
  }
  // Full rank leaves no error, in every metric.
  for (const WhiteningFactor& s : {damped, exact, Diagonal(l), IdentityWhitening(l.d_in)}) {
    const auto full = Fit(l, s, static_cast<int>(k));
    EXPECT_EQ(full.rank, k);
    EXPECT_EQ(full.error_after, 0.0);
    double e2 = 0, r2 = 0;
    const std::vector<double> r = Residual(l, full);
    for (size_t i = 0; i < r.size(); ++i) {
      e2 += (l.w[i] - l.w_hat[i]) * (l.w[i] - l.w_hat[i]);
      r2 += r[i] * r[i];
    }
    EXPECT_LT(std::sqrt(r2 / e2), 1e-9);  // S is invertible: L_A L_B is E itself
    EXPECT_LT(WhitenedNorm(r, s, l.d_out, l.d_in), 1e-9 * full.error_before);
  }
}

TEST(ErrorReconstructionTest, OraclesOnRandomLayers) {
  CheckOracles(RandomLayer(40, 56, 300, 1), {1, 5, 17});
  CheckOracles(RandomLayer(70, 24, 200, 2), {1, 8, 23});
}

TEST(ErrorReconstructionTest, WhiteningBeatsPlainSvdStrictlyOnOutlierInputs) {
  // Not only "never worse": with outlier channels in X, the whitened fit is clearly better.
  const Layer l = RandomLayer(40, 56, 300, 3);
  auto exact = Cholesky(l, 0.0);
  ASSERT_TRUE(exact.ok());
  const auto white = Fit(l, *exact, 8);
  const auto plain = Fit(l, IdentityWhitening(l.d_in), 8);
  EXPECT_LT(white.error_after, 0.9 * OutputNorm(Residual(l, plain), l));
}

TEST(ErrorReconstructionTest, RankIsClampedAndFactorsAreShaped) {
  const Layer l = RandomLayer(30, 20, 100, 4);
  auto s = Cholesky(l, 0.01);
  ASSERT_TRUE(s.ok());
  const auto c = Fit(l, *s, 1000);
  EXPECT_EQ(c.rank, 20);
  EXPECT_EQ(c.a.size(), 30u * 20u);
  EXPECT_EQ(c.b.size(), 20u * 20u);
  EXPECT_EQ(c.singular_values.size(), 20u);
  EXPECT_TRUE(std::is_sorted(c.singular_values.rbegin(), c.singular_values.rend()));
  EXPECT_EQ(c.extra_params(), 20 * 50);
}

TEST(ErrorReconstructionTest, FloatFactorsReachTheExactErrorUpToRounding) {
  const Layer l = RandomLayer(40, 56, 300, 5);
  auto s = Cholesky(l, 0.01);
  ASSERT_TRUE(s.ok());
  const std::vector<float> w(l.w.begin(), l.w.end()), w_hat(l.w_hat.begin(), l.w_hat.end());
  auto c = ReconstructError<float>(w.data(), w_hat.data(), l.d_out, l.d_in, *s, Rank(6));
  ASSERT_TRUE(c.ok()) << c.status();
  Layer lf = l;  // E from the fp32 weights
  lf.w.assign(w.begin(), w.end());
  lf.w_hat.assign(w_hat.begin(), w_hat.end());
  EXPECT_NEAR(WhitenedNorm(Residual(lf, *c), *s, l.d_out, l.d_in), c->error_after,
              1e-5 * c->error_before);
}

// ---- The rank rule ----

TEST(ChooseRankTest, EnergyRule) {
  // σ² = 16, 4, 1, 1, 0.25 (total 22.25).
  const std::vector<double> sigma = {4, 2, 1, 1, 0.5};
  ErrorReconstructionOptions o = Rank(kAutoRank);
  o.max_extra_params = 1.0;
  const std::vector<std::pair<double, int64_t>> cases = {
      {0.7, 1}, {16 / 22.25, 1}, {0.72, 2}, {0.9, 3}, {0.95, 4}, {0.99, 5}, {1.0, 5}};
  for (const auto& [energy, expected] : cases) {
    o.energy = energy;
    EXPECT_EQ(ChooseRank(sigma, 100, 100, o), expected) << energy;
  }
  o.energy = 0.5;  // reaching the target exactly counts
  EXPECT_EQ(ChooseRank({1, 1}, 100, 100, o), 1);
  o.energy = 1.0;  // trailing zeros are not needed
  EXPECT_EQ(ChooseRank({2, 0, 0}, 100, 100, o), 1);
  EXPECT_EQ(ChooseRank({0, 0, 0}, 100, 100, o), 1);  // nothing to keep: rank 1
}

TEST(ChooseRankTest, BudgetFloorAndClamp) {
  const std::vector<double> flat(64, 1.0);
  ErrorReconstructionOptions o = Rank(kAutoRank);
  o.energy = 0.9;            // would need 58 of 64
  o.max_extra_params = 0.1;  // 0.1·64·64 = 409.6 over 128 per rank: 3
  EXPECT_EQ(ChooseRank(flat, 64, 64, o), 3);
  o.min_rank = 8;  // ASER's outlier_channels win over the budget
  EXPECT_EQ(ChooseRank(flat, 64, 64, o), 8);
  o.min_rank = 100;  // then the clamp to min(d_out, d_in)
  EXPECT_EQ(ChooseRank(flat, 64, 64, o), 64);
  o.min_rank = 0;
  o.max_extra_params = 0.2;  // budget exactly one rank: 0.2·10·10 = 20 = 1·(10 + 10)
  EXPECT_EQ(ChooseRank(std::vector<double>(10, 1.0), 10, 10, o), 1);
  o.max_extra_params = 0.1;  // budget below one rank: still 1
  EXPECT_EQ(ChooseRank(std::vector<double>(4, 1.0), 4, 4, o), 1);
  o.energy = 0.5;  // energy smaller than the budget: energy decides (32 of 64)
  o.max_extra_params = 1.0;
  EXPECT_EQ(ChooseRank(flat, 64, 64, o), 32);
  // Fixed ranks ignore the rule and clamp.
  EXPECT_EQ(ChooseRank(flat, 64, 64, Rank(7)), 7);
  EXPECT_EQ(ChooseRank(flat, 80, 64, Rank(99)), 64);
}

// MaxRank bounds ChooseRank whatever the spectrum, and the leading values plus one carrying the
// rest of the total give ChooseRank's answer on the full spectrum whenever it is <= MaxRank (the
// device's rank auto).
TEST(ChooseRankTest, MaxRankBoundsTheRuleAndTheLeadingValuesSuffice) {
  ErrorReconstructionOptions o = Rank(kAutoRank);
  o.max_extra_params = 0.1;
  EXPECT_EQ(MaxRank(64, 64, o), 3);
  o.min_rank = 8;
  EXPECT_EQ(MaxRank(64, 64, o), 8);
  o.min_rank = 100;
  EXPECT_EQ(MaxRank(64, 64, o), 64);
  o.min_rank = 0;
  o.max_extra_params = 0.01;  // below one rank: still 1
  EXPECT_EQ(MaxRank(8, 8, o), 1);
  EXPECT_EQ(MaxRank(64, 64, Rank(7)), 7);
  EXPECT_EQ(MaxRank(80, 64, Rank(99)), 64);

  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t d_out = 20 + trial % 37, d_in = 30 + trial % 23;
    const int64_t k = std::min(d_out, d_in);
    std::vector<double> sigma(static_cast<size_t>(k));
    double v = 1.0;
    for (double& x : sigma) x = (v *= 0.5 + 0.5 * u(rng));
    ErrorReconstructionOptions a = Rank(kAutoRank);
    a.energy = 0.05 + 0.95 * u(rng);
    a.max_extra_params = 0.02 + 0.98 * u(rng);
    a.min_rank = static_cast<int>(trial % 5);
    const int64_t m = MaxRank(d_out, d_in, a);
    const int64_t r = ChooseRank(sigma, d_out, d_in, a);
    EXPECT_LE(r, m);
    std::vector<double> lead(sigma.begin(), sigma.begin() + m);
    double total = 0, kept = 0;
    for (double x : sigma) total += x * x;
    for (double x : lead) kept += x * x;
    lead.push_back(std::sqrt(std::max(0.0, total - kept)));
    EXPECT_EQ(std::min(ChooseRank(lead, d_out, d_in, a), m), r) << "trial " << trial;
  }
}

TEST(ChooseRankTest, AutoRankInReconstructError) {
  // E = diag(4, 2, 1, 1, 0.5, 0, 0, 0) in an 8 x 40 layer, S = I: the spectrum is known exactly.
  // The budget allows 0.5·320 / 48 = 3.33 -> 3 ranks, energy 0.9 asks for 3.
  std::vector<double> w(320, 0.0), w_hat(320, 0.0);
  const double d[] = {4, 2, 1, 1, 0.5, 0, 0, 0};
  for (int i = 0; i < 8; ++i) w[i * 40 + i] = d[i];
  ErrorReconstructionOptions o = Rank(kAutoRank);
  o.energy = 0.9;
  o.max_extra_params = 0.5;
  auto c = ReconstructError<double>(w.data(), w_hat.data(), 8, 40, IdentityWhitening(40), o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rank, 3);
  ASSERT_EQ(c->singular_values.size(), 8u);
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(c->singular_values[i], d[i], 1e-14);
  o.max_extra_params = 0.2;  // 64 / 48 -> 1 rank
  auto capped = ReconstructError<double>(w.data(), w_hat.data(), 8, 40, IdentityWhitening(40), o);
  ASSERT_TRUE(capped.ok());
  EXPECT_EQ(capped->rank, 1);
  EXPECT_NEAR(capped->error_after, std::sqrt(6.25), 1e-14);
  EXPECT_NEAR(c->error_after, std::sqrt(1.25), 1e-14);
  EXPECT_NEAR(c->error_before, std::sqrt(22.25), 1e-14);
}

// ---- Errors ----

TEST(ErrorReconstructionTest, RejectsBadInputs) {
  const Layer l = RandomLayer(8, 12, 6, 6);  // fewer tokens than channels
  auto singular = CholeskyWhitening<double>(l.gram.data(), l.d_in, 0.0);
  EXPECT_EQ(singular.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(singular.status().message().find("raise damp"), std::string::npos);
  EXPECT_TRUE(CholeskyWhitening<double>(l.gram.data(), l.d_in, 0.01).ok());
  const std::vector<double> zeros(144, 0.0);
  EXPECT_EQ(CholeskyWhitening<double>(zeros.data(), 12, 0.01).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(CholeskyWhitening<double>(l.gram.data(), l.d_in, -1).ok());
  EXPECT_FALSE(DiagonalWhitening({1, -1}).ok());

  const WhiteningFactor s = IdentityWhitening(l.d_in);
  auto fit = [&](const ErrorReconstructionOptions& o, const WhiteningFactor& sf) {
    return ReconstructError<double>(l.w.data(), l.w_hat.data(), l.d_out, l.d_in, sf, o)
        .status()
        .code();
  };
  EXPECT_EQ(fit(Rank(0), s), absl::StatusCode::kInvalidArgument);
  ErrorReconstructionOptions bad_energy = Rank(kAutoRank);
  bad_energy.energy = 0;
  EXPECT_EQ(fit(bad_energy, s), absl::StatusCode::kInvalidArgument);
  ErrorReconstructionOptions bad_budget = Rank(kAutoRank);
  bad_budget.max_extra_params = 1.5;
  EXPECT_EQ(fit(bad_budget, s), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fit(Rank(2), IdentityWhitening(11)), absl::StatusCode::kInvalidArgument);
  std::vector<double> nan_w = l.w;
  nan_w[5] = NAN;
  EXPECT_EQ(ReconstructError<double>(nan_w.data(), l.w_hat.data(), l.d_out, l.d_in, s, Rank(2))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- Outlier extraction ----

TEST(OutlierExtractionTest, QuantizedPartIsZeroAndTheErrorCarriesWholeColumns) {
  Layer l = RandomLayer(24, 32, 200, 7);
  const std::vector<int32_t> outliers = {3, 17, 17};
  for (int64_t o = 0; o < l.d_out; ++o) l.w[o * l.d_in + 17] *= 60;  // a smoothed outlier column
  const std::vector<float> w(l.w.begin(), l.w.end());
  auto normal = ZeroColumns(w.data(), l.d_out, l.d_in, outliers);
  ASSERT_TRUE(normal.ok());
  QuantSpec spec;
  spec.bits = 3;
  spec.group_size = 16;
  GptqOptions gopt;
  gopt.outlier_columns = outliers;
  const std::vector<float> gram(l.gram.begin(), l.gram.end());
  auto gptq = QuantizeGptq<float>(w.data(), gram.data(), l.d_out, l.d_in, spec, gopt);
  ASSERT_TRUE(gptq.ok()) << gptq.status();
  auto rtn = QuantizeRtn<float>(normal->data(), l.d_out, l.d_in, spec);
  ASSERT_TRUE(rtn.ok());
  for (const std::vector<float>& w_hat : {gptq->Dequantized(), rtn->Dequantized()}) {
    for (int64_t o = 0; o < l.d_out; ++o) {
      for (int32_t c : {3, 17}) {
        EXPECT_EQ((*normal)[o * l.d_in + c], 0.0f);
        EXPECT_EQ(w_hat[o * l.d_in + c], 0.0f);  // so E = W' − Ŵ holds W' whole there
      }
    }
    // E = E_out + E_normal where E_out (the two extracted columns) has rank 2, so a rank-2
    // correction leaves at most the quantization error of the normal part, ‖E_normal S‖.
    auto s = Cholesky(l, 0.01);
    ASSERT_TRUE(s.ok());
    auto c = ReconstructError<float>(w.data(), w_hat.data(), l.d_out, l.d_in, *s, Rank(2));
    ASSERT_TRUE(c.ok());
    std::vector<double> e_normal(w_hat.size());
    for (size_t i = 0; i < e_normal.size(); ++i) e_normal[i] = double((*normal)[i]) - w_hat[i];
    const double normal_error = WhitenedNorm(e_normal, *s, l.d_out, l.d_in);
    EXPECT_LE(c->error_after, normal_error * (1 + 1e-9));
    EXPECT_GT(c->error_before, 3 * normal_error) << "the extracted columns dominate E";
  }
  EXPECT_FALSE(ZeroColumns(w.data(), l.d_out, l.d_in, {32}).ok());
  EXPECT_FALSE(ZeroColumns(w.data(), l.d_out, l.d_in, {-1}).ok());
}

// ---- Real calibration statistics ----

// stories260k block 0 on 8 calibration samples of 128 tokens: every linear's E = W − RTN(W)
// (3 bits, groups of 32) against its real input X (BOS rows included in G; LQER's s from the
// BOS-excluded statistics).
TEST(ErrorReconstructionTest, OraclesOnStories260kCalibrationInputs) {
  QCAL_REQUIRE_SHARED();
  auto backend = qcal::testing::CpuBackend();
  constexpr int kSamples = 8, kSeqLen = 128;
  auto samples = qcal::testing::StoriesCalibration(kSamples, kSeqLen);
  ASSERT_TRUE(samples.ok()) << samples.status();
  auto model = Model::Load(qcal::testing::StoriesDir(), backend.get());
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<int> ids;
  for (const auto& s : *samples) ids.insert(ids.end(), s.begin(), s.end());
  auto hidden = (*model)->Embed(ids);
  ASSERT_TRUE(hidden.ok());
  auto x = qcal::testing::ForwardCapturing(**model, 0, *hidden, SeqShape{kSamples, kSeqLen, 0});
  ASSERT_TRUE(x.ok());

  for (LinearKind kind : kAllLinears) {
    SCOPED_TRACE(LinearName(kind));
    const Tensor& xin = (*x)[static_cast<int>(InputOf(kind))];
    auto w = backend->ToHost((*model)->block(0).at(kind).weight);
    ASSERT_TRUE(w.ok());
    Layer l;
    l.d_out = w->dim(0);
    l.d_in = w->dim(1);
    l.tokens = xin.dim(0);
    l.w.assign(w->data<float>(), w->data<float>() + w->numel());
    l.w_hat = RtnDequantized(l.w, l.d_out, l.d_in, 3, 32);
    l.x.assign(xin.data<float>(), xin.data<float>() + xin.numel());
    l.gram = Gram<double>(l.x, l.tokens, l.d_in);
    ActivationStats stats(l.d_in);
    ASSERT_TRUE(stats.Accumulate(xin.data<float>(), l.tokens, l.d_in, kSeqLen).ok());
    l.mean_abs = stats.MeanAbs();
    CheckOracles(l, {4, 16});

    // For the record: relative output error ‖(E − L_A L_B)Xᵀ‖ / ‖W Xᵀ‖ at rank 8, δ = 0.
    auto exact = Cholesky(l, 0.0);
    ASSERT_TRUE(exact.ok());
    Layer zero = l;
    std::fill(zero.w_hat.begin(), zero.w_hat.end(), 0.0);
    const double base = OutputNorm(Residual(zero, LowRankCorrection<double>{}), l);
    const double rtn = OutputNorm(Residual(l, LowRankCorrection<double>{}), l) / base;
    const double white = OutputNorm(Residual(l, Fit(l, *exact, 8)), l) / base;
    const double lqer = OutputNorm(Residual(l, Fit(l, Diagonal(l), 8)), l) / base;
    const double plain = OutputNorm(Residual(l, Fit(l, IdentityWhitening(l.d_in), 8)), l) / base;
    RecordProperty(LinearName(kind), absl::StrCat("rtn3 ", rtn, " +plain ", plain, " +lqer ", lqer,
                                                  " +whitening ", white));
  }
}

}  // namespace
}  // namespace qcal::engine
