// BlockBackward and LossBackward on the CPU backend in float: the recomputed forward is
// bit-identical to Model::BlockForward, the tap sees every linear in backward order, and the input
// and weight gradients agree with central differences of the float forward (a loose sanity bound;
// the float64 oracles are tests/kernels/grad_ref_test.cc and the lead's block oracle).
#include "services/engine/oac/block_backward.h"

#include <cmath>
#include <map>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/oac/oac_test_util.h"

namespace qcal::engine {
namespace {

using ::qcal::testing::OacConfig;
using ::qcal::testing::OacRandomModel;
using ::qcal::testing::OacVariant;
using ::qcal::testing::RandomTensor;
using ::qcal::testing::TestRng;
using ::qcal::testing::Values;

constexpr SeqShape kShape{2, 7, 0};  // two sequences of 7 tokens (past the window of 3)

double Dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += double(a.data<float>()[i]) * b.data<float>()[i];
  return s;
}

// <r, BlockForward(x) − x>: the block's residual branches only, so that the identity path does
// not dominate the comparison.
double BranchLoss(Model& model, int b, const Tensor& x, const Tensor& r) {
  Tensor h = x.Clone();
  QCAL_CHECK(model.BlockForward(b, h, kShape).ok());
  double s = 0;
  for (int64_t i = 0; i < h.numel(); ++i) {
    s += double(r.data<float>()[i]) * (double(h.data<float>()[i]) - x.data<float>()[i]);
  }
  return s;
}

class BlockBackwardTest : public ::testing::TestWithParam<OacVariant> {
 protected:
  void SetUp() override {
    be_ = testing::OacCpuBackend();
    model_ = OacRandomModel(OacConfig(GetParam(), 2), be_.get(), 17);
    TestRng rng(5);
    const int64_t rows = int64_t{kShape.batch} * kShape.seq_len;
    x_ = RandomTensor(rng, {rows, model_->config().hidden_size}, 1.0);
    r_ = RandomTensor(rng, {rows, model_->config().hidden_size}, 1.0);
  }
  std::unique_ptr<kernels::Backend> be_;
  std::unique_ptr<Model> model_;
  Tensor x_, r_;
};

TEST_P(BlockBackwardTest, RecomputedInputsAreTheForwardsBitForBit) {
  std::map<LinearInput, std::vector<float>> forward;
  Tensor h = x_.Clone();
  ASSERT_TRUE(model_
                  ->BlockForward(1, h, kShape, nullptr,
                                 [&](LinearInput in, const Tensor& x) {
                                   forward[in] = Values(x);
                                   return absl::OkStatus();
                                 })
                  .ok());
  const Tensor before = x_.Clone();
  std::vector<LinearKind> order;
  auto d = BlockBackward(
      *model_, 1, x_, kShape, r_,
      [&](LinearKind kind, const Tensor& x, const Tensor& dy, const Tensor&, const Tensor&) {
        order.push_back(kind);
        EXPECT_EQ(Values(x), forward[InputOf(kind)]) << LinearName(kind);
        EXPECT_EQ(dy.dim(0), x.dim(0));
        return absl::OkStatus();
      });
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(order, (std::vector<LinearKind>{LinearKind::kDown, LinearKind::kUp, LinearKind::kGate,
                                            LinearKind::kO, LinearKind::kV, LinearKind::kK,
                                            LinearKind::kQ}));
  EXPECT_EQ(Values(x_), Values(before));  // the input is not modified
}

TEST_P(BlockBackwardTest, InputGradientMatchesCentralDifferences) {
  auto d = BlockBackward(*model_, 0, x_, kShape, r_);
  ASSERT_TRUE(d.ok()) << d.status();
  // The branches' gradient: d_input − d_output.
  Tensor branch = d->Clone();
  for (int64_t i = 0; i < branch.numel(); ++i) branch.data<float>()[i] -= r_.data<float>()[i];
  TestRng rng(11);
  const float eps = 1e-2f;
  for (int trial = 0; trial < 4; ++trial) {
    Tensor u = RandomTensor(rng, x_.shape(), 1.0);
    Tensor plus = x_.Clone(), minus = x_.Clone();
    for (int64_t i = 0; i < u.numel(); ++i) {
      plus.data<float>()[i] += eps * u.data<float>()[i];
      minus.data<float>()[i] -= eps * u.data<float>()[i];
    }
    const double fd =
        (BranchLoss(*model_, 0, plus, r_) - BranchLoss(*model_, 0, minus, r_)) / (2.0 * eps);
    const double analytic = Dot(branch, u);
    EXPECT_NEAR(fd, analytic, 2e-2 * std::max(1.0, std::abs(analytic)))
        << "trial " << trial << ": finite difference " << fd << ", backward " << analytic;
  }
}

TEST_P(BlockBackwardTest, TapGivesEachWeightGradient) {
  // G = dyᵀ x is ∂<r, f(x)>/∂W for each linear: compare with central differences along a random
  // direction of W.
  std::map<LinearKind, Tensor> grad;
  auto d = BlockBackward(
      *model_, 0, x_, kShape, r_,
      [&](LinearKind kind, const Tensor& x, const Tensor& dy, const Tensor&, const Tensor&) {
        Tensor g = Tensor::Zeros(DType::kF32, {dy.dim(1), x.dim(1)});
        for (int64_t o = 0; o < dy.dim(1); ++o) {
          for (int64_t i = 0; i < x.dim(1); ++i) {
            double s = 0;
            for (int64_t t = 0; t < x.dim(0); ++t) {
              s += double(dy.data<float>()[t * dy.dim(1) + o]) * x.data<float>()[t * x.dim(1) + i];
            }
            g.data<float>()[o * x.dim(1) + i] = float(s);
          }
        }
        grad[kind] = g;
        return absl::OkStatus();
      });
  ASSERT_TRUE(d.ok()) << d.status();
  TestRng rng(23);
  const float eps = 1e-2f;
  for (LinearKind kind : kAllLinears) {
    Tensor& w = model_->block(0).at(kind).weight;
    const Tensor saved = w.Clone();
    Tensor u = RandomTensor(rng, w.shape(), 1.0 / std::sqrt(double(w.dim(1))));
    auto loss_at = [&](float sign) {
      for (int64_t i = 0; i < w.numel(); ++i) {
        w.data<float>()[i] = saved.data<float>()[i] + sign * eps * u.data<float>()[i];
      }
      return BranchLoss(*model_, 0, x_, r_);
    };
    const double fd = (loss_at(1) - loss_at(-1)) / (2.0 * eps);
    for (int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = saved.data<float>()[i];
    const double analytic = Dot(grad[kind], u);
    EXPECT_NEAR(fd, analytic, 2e-2 * std::max(1.0, std::abs(analytic)))
        << LinearName(kind) << ": finite difference " << fd << ", tap " << analytic;
  }
}

TEST_P(BlockBackwardTest, LossHeadMatchesNllAndCentralDifferences) {
  const int64_t rows = x_.dim(0);
  std::vector<int32_t> targets(rows);
  for (int64_t r = 0; r < rows; ++r)
    targets[r] = (r % kShape.seq_len == kShape.seq_len - 1) ? -1 : int32_t((r * 7 + 3) % 37);
  auto head = LossBackward(*model_, x_, targets);
  ASSERT_TRUE(head.ok()) << head.status();
  // The loss: the summed NLL of the rows with a target, from the model's own logits in double.
  auto logits = model_->Logits(x_);
  ASSERT_TRUE(logits.ok());
  const int64_t v = model_->config().vocab_size;
  double want = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    const float* l = logits->data<float>() + r * v;
    double mx = -INFINITY, sum = 0;
    for (int64_t c = 0; c < v; ++c) mx = std::max(mx, double(l[c]));
    for (int64_t c = 0; c < v; ++c) sum += std::exp(double(l[c]) - mx);
    want += mx + std::log(sum) - l[targets[r]];
  }
  EXPECT_NEAR(head->loss, want, 1e-5 * want);
  TestRng rng(3);
  const float eps = 1e-2f;
  for (int trial = 0; trial < 3; ++trial) {
    Tensor u = RandomTensor(rng, x_.shape(), 1.0);
    Tensor plus = x_.Clone(), minus = x_.Clone();
    for (int64_t i = 0; i < u.numel(); ++i) {
      plus.data<float>()[i] += eps * u.data<float>()[i];
      minus.data<float>()[i] -= eps * u.data<float>()[i];
    }
    const double fd =
        (LossBackward(*model_, plus, targets)->loss - LossBackward(*model_, minus, targets)->loss) /
        (2.0 * eps);
    const double analytic = Dot(head->d_hidden, u);
    EXPECT_NEAR(fd, analytic, 2e-2 * std::max(1.0, std::abs(analytic)));
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, BlockBackwardTest,
                         ::testing::Values(OacVariant::kLlama, OacVariant::kQwen3,
                                           OacVariant::kSlidingYarn),
                         [](const ::testing::TestParamInfo<OacVariant>& info) {
                           switch (info.param) {
                             case OacVariant::kLlama:
                               return "Llama";
                             case OacVariant::kQwen3:
                               return "Qwen3";
                             case OacVariant::kSlidingYarn:
                               return "SlidingYarn";
                           }
                           return "";
                         });

TEST(BlockBackwardErrorsTest, RefusesBadShapesQuantizedLinearsAndBadTargets) {
  auto be = testing::OacCpuBackend();
  auto model = OacRandomModel(OacConfig(OacVariant::kLlama, 1), be.get(), 1);
  TestRng rng(1);
  Tensor x = RandomTensor(rng, {14, 24}, 1.0);
  Tensor short_x = RandomTensor(rng, {13, 24}, 1.0);
  EXPECT_EQ(BlockBackward(*model, 0, short_x, kShape, x).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BlockBackward(*model, 0, x, SeqShape{2, 7, 3}, x).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> bad(14, 0);
  bad[5] = 37;
  EXPECT_THAT(LossBackward(*model, x, bad).status().message(),
              ::testing::HasSubstr("target 37 of row 5"));
  model->block(0).at(LinearKind::kUp).act_bits = 8;
  EXPECT_THAT(BlockBackward(*model, 0, x, kShape, x).status().message(),
              ::testing::HasSubstr("model.layers.0.mlp.up_proj"));
}

}  // namespace
}  // namespace qcal::engine
