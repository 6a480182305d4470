// RTN, the QuantizedLinear layout and OutputError.
#include "services/engine/quant/quantized_linear.h"

#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "tests/engine/quant/quant_test_data.h"

namespace qcal::engine {
namespace {

using testing::HeavyTailedWeights;

QuantSpec Spec(int bits, int group_size, bool symmetric = false) {
  QuantSpec spec;
  spec.bits = bits;
  spec.group_size = group_size;
  spec.symmetric = symmetric;
  return spec;
}

TEST(Rtn, EveryGroupFittedOnItsOwnColumnsWithShorterLastGroup) {
  const int64_t d_out = 5, d_in = 10;
  const std::vector<float> w = HeavyTailedWeights<float>(d_out, d_in, 1);
  const QuantSpec spec = Spec(3, 4);
  auto q = QuantizeRtn(w.data(), d_out, d_in, spec);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->group_size, 4);
  EXPECT_EQ(q->n_groups, 3);  // columns 0-3, 4-7, 8-9
  EXPECT_EQ(q->g_idx, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 1, 2, 2}));
  EXPECT_TRUE(q->perm.empty());
  ASSERT_EQ(q->scales.size(), 15u);
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t k = 0; k < 3; ++k) {
      const int64_t j0 = 4 * k, n = k == 2 ? 2 : 4;
      const GroupParams p = kernels::FitGroup(w.data() + o * d_in + j0, n, 1, spec);
      EXPECT_EQ(q->scales[k * d_out + o], p.scale);
      EXPECT_EQ(q->zeros[k * d_out + o], p.zero);
      for (int64_t j = j0; j < j0 + n; ++j) {
        EXPECT_EQ(q->codes[o * d_in + j], kernels::QuantizeCode(w[o * d_in + j], p, spec));
      }
    }
  }
  // The short last group is fitted on its 2 columns alone: shifting a column of group 1 by a large
  // amount leaves group 2's parameters unchanged.
  std::vector<float> w2 = w;
  w2[7] += 100.0f;
  auto q2 = QuantizeRtn(w2.data(), d_out, d_in, spec);
  ASSERT_TRUE(q2.ok());
  EXPECT_EQ(q2->scales[2 * d_out], q->scales[2 * d_out]);
  EXPECT_NE(q2->scales[1 * d_out], q->scales[1 * d_out]);
}

TEST(Rtn, GroupSizeAtLeastDinIsOneGroupPerRow) {
  const int64_t d_out = 7, d_in = 172;
  const std::vector<float> w = HeavyTailedWeights<float>(d_out, d_in, 2);
  auto ref = QuantizeRtn(w.data(), d_out, d_in, Spec(4, -1));
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(ref->group_size, d_in);
  EXPECT_EQ(ref->n_groups, 1);
  for (int g : {172, 173, 4096}) {
    auto q = QuantizeRtn(w.data(), d_out, d_in, Spec(4, g));
    ASSERT_TRUE(q.ok());
    EXPECT_EQ(q->group_size, d_in);
    EXPECT_EQ(q->codes, ref->codes) << g;
    EXPECT_EQ(q->scales, ref->scales) << g;
    EXPECT_EQ(q->zeros, ref->zeros) << g;
    EXPECT_EQ(q->g_idx, std::vector<int32_t>(d_in, 0));
  }
  auto narrower = QuantizeRtn(w.data(), d_out, d_in, Spec(4, 171));
  ASSERT_TRUE(narrower.ok());
  EXPECT_EQ(narrower->n_groups, 2);
}

TEST(Rtn, DequantizedIsScaleTimesCodeMinusZeroThroughGidx) {
  const int64_t d_out = 3, d_in = 40;
  const std::vector<float> w = HeavyTailedWeights<float>(d_out, d_in, 3);
  auto q = QuantizeRtn(w.data(), d_out, d_in, Spec(4, 16));
  ASSERT_TRUE(q.ok());
  // RTN's own error bound: half a step, plus what rounding s to fp16 (down by at most 2^-11
  // relative) costs at the top of the range, 15 * 2^-11 steps at 4 bits.
  std::vector<float> deq = q->Dequantized();
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j = 0; j < d_in; ++j) {
      const float s = q->scales[q->g_idx[j] * d_out + o];
      EXPECT_LE(std::fabs(deq[o * d_in + j] - w[o * d_in + j]), 0.51f * s);
    }
  }
  // Reassigning columns to groups (as act-order does) must change which parameters are used.
  q->g_idx[0] = 2;
  q->g_idx[39] = 0;
  deq = q->Dequantized();
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j : {int64_t{0}, int64_t{39}}) {
      const int64_t k = q->g_idx[j] * d_out + o;
      EXPECT_EQ(deq[o * d_in + j],
                q->scales[k] * static_cast<float>(q->codes[o * d_in + j] - q->zeros[k]));
    }
  }
}

TEST(Rtn, FloatAndDoubleAgreeOnExactData) {
  // Multiples of 1/64 in a small range: every intermediate is exact in both precisions.
  const int64_t d_out = 4, d_in = 64;
  testing::TestRng rng(4);
  std::vector<float> wf(d_out * d_in);
  for (float& v : wf) v = static_cast<float>(std::floor(rng.Normal() * 64)) / 64;
  const std::vector<double> wd(wf.begin(), wf.end());
  auto qf = QuantizeRtn(wf.data(), d_out, d_in, Spec(3, 16));
  auto qd = QuantizeRtn(wd.data(), d_out, d_in, Spec(3, 16));
  ASSERT_TRUE(qf.ok() && qd.ok());
  EXPECT_EQ(qf->codes, qd->codes);
  EXPECT_EQ(qf->scales, qd->scales);
}

TEST(Rtn, RejectsBadInput) {
  std::vector<float> w(6, 0.5f);
  EXPECT_EQ(QuantizeRtn(w.data(), 2, 3, Spec(1, -1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeRtn(w.data(), 2, 3, Spec(9, -1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto bad_group = QuantizeRtn(w.data(), 2, 3, Spec(4, 0));
  EXPECT_EQ(bad_group.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_group.status().message().find("group_size"), std::string::npos);
  EXPECT_FALSE(QuantizeRtn(w.data(), 2, 3, Spec(4, -2)).ok());
  EXPECT_FALSE(QuantizeRtn(w.data(), 0, 3, Spec(4, -1)).ok());
  w[5] = NAN;
  auto nan = QuantizeRtn(w.data(), 2, 3, Spec(4, -1));
  EXPECT_EQ(nan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(nan.status().message().find("weight[1, 2]"), std::string::npos) << nan.status();
  w[5] = 1e6f;  // range 1e6 / 3 overflows an fp16 scale at 2 bits
  auto overflow = QuantizeRtn(w.data(), 2, 3, Spec(2, -1));
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(overflow.status().message().find("row 1"), std::string::npos) << overflow.status();
  EXPECT_TRUE(QuantizeRtn(w.data(), 2, 3, Spec(8, -1)).ok());  // 1e6 / 255 fits
}

TEST(OutputError, MatchesDirectProductWithActivations) {
  const int64_t d_out = 70, d_in = 33, tokens = 50;
  const std::vector<double> x = testing::CorrelatedActivations(tokens, d_in, 2, 5);
  const std::vector<float> gram = testing::Gram<float>(x, tokens, d_in);
  const std::vector<float> w = HeavyTailedWeights<float>(d_out, d_in, 6);
  auto q = QuantizeRtn(w.data(), d_out, d_in, Spec(3, 8));
  ASSERT_TRUE(q.ok());
  const std::vector<float> w_hat = q->Dequantized();
  double direct = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t o = 0; o < d_out; ++o) {
      double y = 0;
      for (int64_t j = 0; j < d_in; ++j) {
        y += (static_cast<double>(w[o * d_in + j]) - w_hat[o * d_in + j]) * x[t * d_in + j];
      }
      direct += y * y;
    }
  }
  direct = std::sqrt(direct);
  const double got = OutputError(w.data(), w_hat.data(), gram.data(), d_out, d_in);
  EXPECT_GT(direct, 0);
  EXPECT_NEAR(got, direct, 1e-6 * direct);  // the Gram matrix itself is rounded to fp32
  EXPECT_EQ(OutputError(w.data(), w.data(), gram.data(), d_out, d_in), 0.0);
  // Only the upper triangle of G is read.
  std::vector<float> upper = gram;
  for (int64_t a = 0; a < d_in; ++a) {
    for (int64_t b = 0; b < a; ++b) upper[a * d_in + b] = NAN;
  }
  EXPECT_EQ(OutputError(w.data(), w_hat.data(), upper.data(), d_out, d_in), got);
}

}  // namespace
}  // namespace qcal::engine
