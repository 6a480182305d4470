// The clipped fake quantizer (services/engine/retrain/clipped_quant.h) and AdamW (adamw.h):
// the forward against the grid rules of kernels/quant_grid.h bit for bit, the export's re-rounding
// against the forward, the STE backward against central differences of its frozen surrogate in
// float64, and AdamW against hand-computed steps.
#include "services/engine/retrain/clipped_quant.h"

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant_ref.h"
#include "services/engine/retrain/adamw.h"
#include "tests/engine/retrain/frozen_surrogate.h"

namespace qcal::engine {
namespace {

using kernels::GroupParams;
using kernels::QuantSpec;

QuantSpec Spec(int bits, int group_size, bool symmetric) {
  QuantSpec s;
  s.bits = bits;
  s.group_size = group_size;
  s.symmetric = symmetric;
  return s;
}

ClipLayout Layout(int64_t d_out, int64_t d_in, const QuantSpec& spec, bool permuted,
                  std::mt19937& rng) {
  ClipLayout l;
  l.d_out = d_out;
  l.d_in = d_in;
  l.spec = spec;
  if (permuted) {
    l.perm.resize(d_in);
    std::iota(l.perm.begin(), l.perm.end(), 0);
    std::shuffle(l.perm.begin(), l.perm.end(), rng);
  }
  return l;
}

template <typename T>
std::vector<T> Uniform(int64_t n, double lo, double hi, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(u(rng));
  return v;
}

// Weights with the groups' special cases: row 1 all positive (the z = 0 fallback), row 2 all zero
// (the empty range), row 3 with an outlier per group (clamped codes under clipping).
std::vector<double> SpecialWeights(int64_t d_out, int64_t d_in, std::mt19937& rng) {
  std::vector<double> w = Uniform<double>(d_out * d_in, -1, 1, rng);
  for (int64_t j = 0; j < d_in; ++j) {
    w[1 * d_in + j] = std::abs(w[1 * d_in + j]) + 0.05;
    w[2 * d_in + j] = 0;
    if (j % 5 == 0) w[3 * d_in + j] *= 6;
  }
  return w;
}

// A solver's grid for the layout: fp16 scales and zeros as a solver produces them (asymmetric
// 1..maxq, the z = 0 fallback's 1 included; symmetric 2^(b−1)).
void RandomGrid(ClipLayout& l, std::mt19937& rng) {
  const int32_t maxq = kernels::MaxCode(l.spec);
  std::uniform_real_distribution<float> s(0.01f, 0.5f);
  std::uniform_int_distribution<int32_t> z(1, maxq);
  const size_t n = static_cast<size_t>(l.n_groups() * l.d_out);
  l.grid_scales.resize(n);
  l.grid_zeros.resize(n);
  for (size_t i = 0; i < n; ++i) {
    l.grid_scales[i] = kernels::RoundScaleToHalf(s(rng));
    l.grid_zeros[i] = l.spec.symmetric ? 1 << (l.spec.bits - 1) : z(rng);
  }
  l.grid_zeros[0] = l.spec.symmetric ? l.grid_zeros[0] : maxq;  // the edge z = maxq
}

// Unclipped (σ = 1) on the solver's grid, the fit returns exactly the solver's scales and zeros
// and the codes are QuantizeCode of w on them: GPTQ's codes for its pre-rounding values W̃. On
// RTN's grid of W itself, exactly RTN.
TEST(ClippedQuantTest, UnclippedGridSpanReproducesTheSolversGrid) {
  std::mt19937 rng(5);
  for (int bits : {2, 3, 4, 8}) {
    for (bool sym : {false, true}) {
      for (bool permuted : {false, true}) {
        ClipLayout l = Layout(7, 45, Spec(bits, 16, sym), permuted, rng);
        RandomGrid(l, rng);
        ASSERT_TRUE(l.Validate().ok()) << l.Validate();
        const std::vector<float> w = Uniform<float>(l.d_out * l.d_in, -1, 1, rng);
        const std::vector<float> one(l.num_logits(), 40.0f);
        auto q = QuantizeClipped(w.data(), l, one.data(), one.data());
        ASSERT_TRUE(q.ok()) << q.status();
        EXPECT_EQ(q->scales, l.grid_scales) << "bits " << bits << " sym " << sym;
        EXPECT_EQ(q->zeros, l.grid_zeros) << "bits " << bits << " sym " << sym;
        for (int64_t o = 0; o < l.d_out; ++o) {
          for (int64_t j = 0; j < l.d_in; ++j) {
            const int64_t k = q->g_idx[j];
            const GroupParams p{l.grid_scales[k * l.d_out + o], l.grid_zeros[k * l.d_out + o]};
            ASSERT_EQ(q->codes[o * l.d_in + j],
                      kernels::QuantizeCode(w[o * l.d_in + j], p, l.spec));
          }
        }
      }
    }
  }
  ClipLayout l = Layout(5, 40, Spec(3, 16, false), false, rng);
  const std::vector<float> w = Uniform<float>(l.d_out * l.d_in, -2, 1, rng);
  auto rtn = kernels::ref::QuantizeRtn<float>(w.data(), l.d_out, l.d_in, l.spec);
  ASSERT_TRUE(rtn.ok());
  l.grid_scales = rtn->scales;
  l.grid_zeros = rtn->zeros;
  const std::vector<float> one(l.num_logits(), 40.0f);
  auto q = QuantizeClipped(w.data(), l, one.data(), one.data());
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->codes, rtn->codes);
  EXPECT_EQ(q->scales, rtn->scales);
  l.grid_zeros.pop_back();
  EXPECT_FALSE(l.Validate().ok());
}

// The forward is FitGroup/QuantizeCode/Dequantize with clip factors σ(β), σ(γ), bit for bit in
// float, and QuantizeClipped's codes dequantize to exactly the forward.
TEST(ClippedQuantTest, ForwardIsTheGridRulesWithClipFactors) {
  std::mt19937 rng(1);
  for (int bits : {2, 3, 4, 8}) {
    for (bool sym : {false, true}) {
      for (bool permuted : {false, true}) {
        const ClipLayout l = Layout(6, 37, Spec(bits, 8, sym), permuted, rng);
        std::vector<double> wd = SpecialWeights(l.d_out, l.d_in, rng);
        std::vector<float> w(wd.begin(), wd.end());
        const std::vector<float> gamma = Uniform<float>(l.num_logits(), -1, 5, rng);
        const std::vector<float> beta = Uniform<float>(l.num_logits(), -1, 5, rng);
        std::vector<float> w_hat(w.size());
        ClippedFakeQuant<float>(w.data(), l, gamma.data(), beta.data(), w_hat.data());
        const int64_t g = l.group_size();
        for (int64_t o = 0; o < l.d_out; ++o) {
          for (int64_t k = 0; k < l.n_groups(); ++k) {
            std::vector<float> group;
            std::vector<int64_t> cols;
            for (int64_t p = k * g; p < std::min((k + 1) * g, l.d_in); ++p) {
              cols.push_back(l.perm.empty() ? p : l.perm[p]);
              group.push_back(w[o * l.d_in + cols.back()]);
            }
            const int64_t i = o * l.n_groups() + k;
            const GroupParams p = kernels::FitGroup<float>(group.data(), group.size(), 1, l.spec,
                                                           Sigmoid(beta[i]), Sigmoid(gamma[i]));
            for (size_t c = 0; c < cols.size(); ++c) {
              const float expected =
                  kernels::Dequantize<float>(kernels::QuantizeCode(group[c], p, l.spec), p, l.spec);
              ASSERT_EQ(w_hat[o * l.d_in + cols[c]], expected)
                  << "bits " << bits << " sym " << sym << " row " << o << " col " << cols[c];
            }
          }
        }
        auto q = QuantizeClipped(w.data(), l, gamma.data(), beta.data());
        ASSERT_TRUE(q.ok()) << q.status();
        const std::vector<float> deq = q->Dequantized();
        ASSERT_EQ(0, std::memcmp(deq.data(), w_hat.data(), w.size() * sizeof(float)));
        EXPECT_EQ(q->perm, l.perm);
      }
    }
  }
}

// Logits large enough that σ rounds to 1 in float: the clipped grid is the plain grid, and the
// re-rounding gives RTN's codes, scales and zeros.
TEST(ClippedQuantTest, SaturatedLogitsGiveRtn) {
  std::mt19937 rng(2);
  const ClipLayout l = Layout(5, 40, Spec(3, 16, false), false, rng);
  const std::vector<float> w = Uniform<float>(l.d_out * l.d_in, -2, 1, rng);
  const std::vector<float> big(l.num_logits(), 40.0f);
  ASSERT_EQ(Sigmoid(40.0f), 1.0f);
  auto clipped = QuantizeClipped(w.data(), l, big.data(), big.data());
  auto rtn = kernels::ref::QuantizeRtn<float>(w.data(), l.d_out, l.d_in, l.spec);
  ASSERT_TRUE(clipped.ok() && rtn.ok());
  EXPECT_EQ(clipped->codes, rtn->codes);
  EXPECT_EQ(clipped->scales, rtn->scales);
  EXPECT_EQ(clipped->zeros, rtn->zeros);
  EXPECT_EQ(clipped->g_idx, rtn->g_idx);
  // σ(4) clips: some codes move.
  const std::vector<float> four(l.num_logits(), 4.0f);
  auto clipped4 = QuantizeClipped(w.data(), l, four.data(), four.data());
  ASSERT_TRUE(clipped4.ok());
  EXPECT_NE(clipped4->scales, rtn->scales);
}

TEST(ClippedQuantTest, InvalidInputsNameTheValue) {
  std::mt19937 rng(3);
  ClipLayout l = Layout(2, 8, Spec(2, 4, false), false, rng);
  std::vector<float> w(16, 0.5f), logits(l.num_logits(), 4.0f);
  w[9] = NAN;
  auto q = QuantizeClipped(w.data(), l, logits.data(), logits.data());
  ASSERT_FALSE(q.ok());
  EXPECT_NE(std::string(q.status().message()).find("[1, 1]"), std::string::npos) << q.status();
  w[9] = 0.5f;
  logits[3] = INFINITY;
  q = QuantizeClipped(w.data(), l, logits.data(), logits.data());
  EXPECT_FALSE(q.ok());
  l.perm = {0, 1, 2, 3, 4, 5, 6, 6};
  EXPECT_FALSE(l.Validate().ok());
  l.perm.clear();
  l.spec.grid = kernels::GridKind::kCuberoot;
  EXPECT_FALSE(l.Validate().ok());
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// ∂/∂γ, ∂/∂β and ∂/∂w of <u, ŵ> from the STE backward equal central differences of the frozen
// surrogate (float64), for every branch: asymmetric, the z = 0 fallback, the empty range,
// symmetric, clamped codes, act-order groups.
TEST(ClippedQuantTest, SteBackwardIsTheDerivativeOfTheFrozenSurrogate) {
  std::mt19937 rng(4);
  int64_t clamped_codes = 0;
  for (int bits : {2, 3, 4}) {
    for (bool sym : {false, true}) {
      for (int variant : {0, 1, 2}) {  // plain, act-order groups, the solver's grid
        ClipLayout l = Layout(5, 21, Spec(bits, 8, sym), variant == 1, rng);
        if (variant == 2) RandomGrid(l, rng);
        const std::vector<double> w = SpecialWeights(l.d_out, l.d_in, rng);
        std::vector<double> gamma = Uniform<double>(l.num_logits(), -1, 5, rng);
        std::vector<double> beta = Uniform<double>(l.num_logits(), -1, 5, rng);
        const std::vector<double> u = Uniform<double>(w.size(), -1, 1, rng);
        std::vector<double> w_hat(w.size()), dg(gamma.size()), db(beta.size()), dw(w.size());
        ClippedFakeQuant<double>(w.data(), l, gamma.data(), beta.data(), w_hat.data());
        ClippedFakeQuantBackward<double>(w.data(), l, gamma.data(), beta.data(), u.data(),
                                         dg.data(), db.data(), dw.data());
        const FrozenSurrogate f(w, l, gamma, beta);
        const std::vector<double> at_point = f(w, gamma, beta);
        for (size_t i = 0; i < w.size(); ++i) ASSERT_NEAR(at_point[i], w_hat[i], 1e-12) << i;
        const double h = 1e-6;
        auto check = [&](std::vector<double>& x, const std::vector<double>& grad,
                         const char* what) {
          for (size_t i = 0; i < x.size(); ++i) {
            const double keep = x[i];
            x[i] = keep + h;
            const double up = Dot(u, f(w, gamma, beta));
            x[i] = keep - h;
            const double down = Dot(u, f(w, gamma, beta));
            x[i] = keep;
            const double fd = (up - down) / (2 * h);
            ASSERT_NEAR(grad[i], fd, 1e-7 * (1 + std::abs(fd)))
                << what << "[" << i << "] bits " << bits << " sym " << sym;
          }
        };
        check(gamma, dg, "gamma");
        check(beta, db, "beta");
        std::vector<double> wv = w;
        for (size_t i = 0; i < wv.size(); ++i) {
          const double keep = wv[i];
          wv[i] = keep + h;
          const double up = Dot(u, f(wv, gamma, beta));
          wv[i] = keep - h;
          const double down = Dot(u, f(wv, gamma, beta));
          wv[i] = keep;
          ASSERT_NEAR(dw[i], (up - down) / (2 * h), 1e-6) << "w[" << i << "]";
        }
        // The empty-range row has no clipping gradient (without a grid: its weights are 0).
        for (int64_t k = 0; k < l.n_groups() && !l.has_grid(); ++k) {
          EXPECT_EQ(dg[2 * l.n_groups() + k], 0.0);
          EXPECT_EQ(db[2 * l.n_groups() + k], 0.0);
        }
        clamped_codes += f.clamped_count();
      }
    }
  }
  EXPECT_GT(clamped_codes, 0);
}

// A hand-computed first step: m̂ = g and v̂ = g², so p1 = p0·(1 − lr·wd) − lr·g/(|g| + eps); then
// a second step against the formulas written out, and float against double.
TEST(AdamWTest, StepsMatchHandComputation) {
  AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.1;
  ASSERT_TRUE(o.Validate().ok());
  std::vector<double> p = {0.5, -1.25, 0.0, 2.0}, m(4, 0), v(4, 0);
  const std::vector<double> g1 = {0.3, -0.02, 1e-9, 0.0};
  const std::vector<double> p0 = p;
  AdamWStep<double>(p.data(), g1.data(), m.data(), v.data(), 4, 1, o);
  for (int i = 0; i < 4; ++i) {
    const double expected = p0[i] * (1 - 1e-3) - 1e-2 * g1[i] / (std::abs(g1[i]) + 1e-8);
    EXPECT_NEAR(p[i], expected, 1e-15) << i;
  }
  EXPECT_DOUBLE_EQ(p[3], 2.0 * (1 - 1e-3));  // zero gradient: the decay alone
  const std::vector<double> g2 = {-0.1, 0.04, 0.5, 1.0};
  const std::vector<double> p1 = p;
  AdamWStep<double>(p.data(), g2.data(), m.data(), v.data(), 4, 2, o);
  for (int i = 0; i < 4; ++i) {
    const double m2 = 0.9 * (0.1 * g1[i]) + 0.1 * g2[i];
    const double v2 = 0.999 * (0.001 * g1[i] * g1[i]) + 0.001 * g2[i] * g2[i];
    const double m_hat = m2 / (1 - 0.81), v_hat = v2 / (1 - 0.999 * 0.999);
    const double expected = p1[i] * (1 - 1e-3) - 1e-2 * m_hat / (std::sqrt(v_hat) + 1e-8);
    EXPECT_NEAR(p[i], expected, 1e-14) << i;
  }
  std::vector<float> pf = {0.5f, -1.25f, 0.0f, 2.0f}, mf(4, 0), vf(4, 0);
  const std::vector<float> g1f(g1.begin(), g1.end()), g2f(g2.begin(), g2.end());
  AdamWStep<float>(pf.data(), g1f.data(), mf.data(), vf.data(), 4, 1, o);
  AdamWStep<float>(pf.data(), g2f.data(), mf.data(), vf.data(), 4, 2, o);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(pf[i], p[i], 1e-6) << i;
  o.lr = 0;
  EXPECT_FALSE(o.Validate().ok());
}

}  // namespace
}  // namespace qcal::engine
