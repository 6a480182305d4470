// The CPU backend's training ops (Backend::ClippedFakeQuant, ClippedFakeQuantBackward, AdamWStep,
// SquaredError, WeightedSquaredError) against their references (kernels/cpu/train_ref.h), bit for
// bit, and ExpF32 (kernels/train_math.h) against the correctly rounded e^x.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/train_ref.h"
#include "kernels/train_math.h"
#include "kernels/train_ops.h"
#include "tests/kernels/train_test_cases.h"

namespace qcal::kernels {
namespace {

using kernel_tests::FirstBitDifference;
using kernel_tests::TrainCase;
using kernel_tests::TrainCases;

class CpuTrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    BackendOptions options;
    options.threads = 3;  // rows split over threads: the references' results do not depend on it
    auto be = CreateBackend(options);
    ASSERT_TRUE(be.ok()) << be.status();
    be_ = std::move(*be);
  }
  Tensor Zeros(const Shape& shape) { return *be_->Alloc(DType::kF32, shape); }
  std::unique_ptr<Backend> be_;
};

TEST_F(CpuTrainTest, SupportsTheTrainingOps) { EXPECT_TRUE(be_->SupportsOp(Op::kTrain)); }

TEST_F(CpuTrainTest, ClippedFakeQuantIsTheReference) {
  for (const TrainCase& c : TrainCases()) {
    SCOPED_TRACE(c.name);
    const ClipTensors layout = kernel_tests::ToClipTensors(*be_, c.layout);
    Tensor w_hat = Zeros(c.w.shape());
    ASSERT_TRUE(be_->ClippedFakeQuant(c.w, layout, c.gamma, c.beta, w_hat).ok());
    std::vector<float> expected(c.w.numel());
    ref::ClippedFakeQuant(c.w.data<float>(), c.layout.view(), c.gamma.data<float>(),
                          c.beta.data<float>(), expected.data());
    EXPECT_EQ(FirstBitDifference(w_hat.data<float>(), expected.data(), c.w.numel()), -1);
    Tensor in_place = c.w.Clone();  // w_hat aliasing w
    ASSERT_TRUE(be_->ClippedFakeQuant(in_place, layout, c.gamma, c.beta, in_place).ok());
    EXPECT_EQ(FirstBitDifference(in_place.data<float>(), expected.data(), c.w.numel()), -1);
    // The export's re-rounding reproduces the forward exactly.
    auto q = ref::QuantizeClipped(c.w.data<float>(), c.layout, c.gamma.data<float>(),
                                  c.beta.data<float>());
    ASSERT_TRUE(q.ok()) << q.status();
    const std::vector<float> deq = q->Dequantized();
    EXPECT_EQ(FirstBitDifference(deq.data(), expected.data(), c.w.numel()), -1);
  }
}

TEST_F(CpuTrainTest, ClippedFakeQuantBackwardIsTheReference) {
  for (const TrainCase& c : TrainCases()) {
    SCOPED_TRACE(c.name);
    const ClipTensors layout = kernel_tests::ToClipTensors(*be_, c.layout);
    const int64_t nl = c.gamma.numel(), n = c.w.numel();
    std::vector<float> eg(nl), eb(nl), ew(n);
    ref::ClippedFakeQuantBackward(c.w.data<float>(), c.layout.view(), c.gamma.data<float>(),
                                  c.beta.data<float>(), c.dy.data<float>(), eg.data(), eb.data(),
                                  ew.data());
    for (bool with_dw : {true, false}) {
      SCOPED_TRACE(with_dw ? "with d_w" : "without d_w");
      Tensor dg = Zeros(c.gamma.shape()), db = Zeros(c.gamma.shape()), dw = Zeros(c.w.shape());
      ASSERT_TRUE(be_->ClippedFakeQuantBackward(c.w, layout, c.gamma, c.beta, c.dy, dg, db,
                                                with_dw ? &dw : nullptr)
                      .ok());
      EXPECT_EQ(FirstBitDifference(dg.data<float>(), eg.data(), nl), -1);
      EXPECT_EQ(FirstBitDifference(db.data<float>(), eb.data(), nl), -1);
      if (with_dw) {
        EXPECT_EQ(FirstBitDifference(dw.data<float>(), ew.data(), n), -1);
      }
    }
  }
}

TEST_F(CpuTrainTest, AdamWStepIsTheReference) {
  kernel_tests::Random rng(7);
  AdamWOptions o;
  o.lr = 3e-3;
  o.weight_decay = 0.05;
  for (int64_t n : {1, 37, 1000}) {
    SCOPED_TRACE(n);
    Tensor p = rng.Floats({n}), m = Zeros({n}), v = Zeros({n});
    std::vector<float> ep(p.data<float>(), p.data<float>() + n), em(n, 0.0f), ev(n, 0.0f);
    for (int64_t t = 1; t <= 3; ++t) {
      const Tensor g = rng.Floats({n}, 0.1f);
      ASSERT_TRUE(be_->AdamWStep(p, g, m, v, t, o).ok());
      ref::AdamWStep(ep.data(), g.data<float>(), em.data(), ev.data(), n, t, o);
      EXPECT_EQ(FirstBitDifference(p.data<float>(), ep.data(), n), -1) << "step " << t;
      EXPECT_EQ(FirstBitDifference(m.data<float>(), em.data(), n), -1) << "step " << t;
      EXPECT_EQ(FirstBitDifference(v.data<float>(), ev.data(), n), -1) << "step " << t;
    }
  }
}

TEST_F(CpuTrainTest, LossTermsAreTheReference) {
  kernel_tests::Random rng(9);
  for (const Shape& shape : {Shape{1, 1}, Shape{7, 45}, Shape{33, 130}}) {
    SCOPED_TRACE(ShapeString(shape));
    const Tensor y = rng.Floats(shape), t = rng.Floats(shape), f = rng.Floats(shape, 2.0f);
    const int64_t n = y.numel();
    std::vector<float> edy(n);
    const double esum = ref::SquaredError(y.data<float>(), t.data<float>(), n, 0.25f, edy.data());
    Tensor dy = Zeros(shape);
    auto sum = be_->SquaredError(y, t, 0.25f, &dy);
    ASSERT_TRUE(sum.ok()) << sum.status();
    EXPECT_EQ(*sum, esum);
    EXPECT_EQ(FirstBitDifference(dy.data<float>(), edy.data(), n), -1);
    auto no_grad = be_->SquaredError(y, t, 0.25f, nullptr);
    ASSERT_TRUE(no_grad.ok());
    EXPECT_EQ(*no_grad, esum);

    for (bool weighted : {true, false}) {
      SCOPED_TRACE(weighted ? "F given" : "F = 1");
      const Tensor g0 = rng.Floats(shape);
      std::vector<float> e1(g0.data<float>(), g0.data<float>() + n), e2(n, 0.0f);
      const double ew = ref::WeightedSquaredError(y.data<float>(), t.data<float>(),
                                                  weighted ? f.data<float>() : nullptr, shape[0],
                                                  shape[1], 0.3f, e1.data(), e2.data(), 2.5);
      Tensor g1 = g0.Clone(), g2 = Zeros(shape);
      auto wsum = be_->WeightedSquaredError(y, t, weighted ? f : Tensor(), 0.3f, &g1, &g2, 2.5);
      ASSERT_TRUE(wsum.ok()) << wsum.status();
      EXPECT_EQ(*wsum, ew);
      EXPECT_EQ(FirstBitDifference(g1.data<float>(), e1.data(), n), -1);
      EXPECT_EQ(FirstBitDifference(g2.data<float>(), e2.data(), n), -1);
    }
  }
}

TEST_F(CpuTrainTest, TrainingOpsRejectBadOperands) {
  const TrainCase c = kernel_tests::MakeTrainCase(4, 20, 4, 8, false, true, true, 3);
  ClipTensors layout = kernel_tests::ToClipTensors(*be_, c.layout);
  Tensor w_hat = Zeros(c.w.shape());
  Tensor small = Zeros({4, 19});
  EXPECT_EQ(be_->ClippedFakeQuant(c.w, layout, c.gamma, c.beta, small).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->ClippedFakeQuant(small, layout, c.gamma, c.beta, w_hat).code(),
            absl::StatusCode::kInvalidArgument);
  ClipTensors no_zeros = layout;
  no_zeros.grid_zeros = Tensor();
  EXPECT_EQ(be_->ClippedFakeQuant(c.w, no_zeros, c.gamma, c.beta, w_hat).code(),
            absl::StatusCode::kInvalidArgument);
  ClipTensors f32_perm = layout;
  f32_perm.perm = Zeros({20});
  EXPECT_EQ(be_->ClippedFakeQuant(c.w, f32_perm, c.gamma, c.beta, w_hat).code(),
            absl::StatusCode::kInvalidArgument);
  ClipTensors cuberoot = layout;
  cuberoot.spec.grid = GridKind::kCuberoot;
  EXPECT_EQ(be_->ClippedFakeQuant(c.w, cuberoot, c.gamma, c.beta, w_hat).code(),
            absl::StatusCode::kInvalidArgument);
  Tensor dg = Zeros({4, 2});
  EXPECT_EQ(
      be_->ClippedFakeQuantBackward(c.w, layout, c.gamma, c.beta, c.dy, dg, dg, nullptr).code(),
      absl::StatusCode::kInvalidArgument);

  Tensor p = Zeros({5}), g = Zeros({5}), m = Zeros({5}), v = Zeros({4});
  EXPECT_EQ(be_->AdamWStep(p, g, m, v, 1, AdamWOptions()).code(),
            absl::StatusCode::kInvalidArgument);
  v = Zeros({5});
  EXPECT_EQ(be_->AdamWStep(p, g, m, v, 0, AdamWOptions()).code(),
            absl::StatusCode::kInvalidArgument);
  AdamWOptions bad;
  bad.beta2 = 1.0;
  EXPECT_EQ(be_->AdamWStep(p, g, m, v, 1, bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->SquaredError(p, Zeros({6}), 1.0f, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->WeightedSquaredError(p, p, Tensor(), 1.0f, nullptr, nullptr, 0.0).status().code(),
            absl::StatusCode::kInvalidArgument);  // rank 1
}

// ExpF32 is the correctly rounded e^x (long double reference, 64-bit significand) on a sample of
// floats over its whole finite range, and saturates like expf.
TEST(ExpF32Test, IsCorrectlyRoundedAndSaturates) {
  int64_t checked = 0, wrong = 0;
  for (float x = -103.9f; x < 88.7f; x = std::nextafter(x + 0.00731f, 100.0f)) {
    ++checked;
    wrong += ExpF32(x) != static_cast<float>(std::exp(static_cast<long double>(x)));
  }
  EXPECT_GT(checked, 20000);
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(ExpF32(0.0f), 1.0f);
  EXPECT_TRUE(std::isfinite(ExpF32(88.72283f)));  // e^x just below FLT_MAX
  EXPECT_EQ(ExpF32(88.7229f), std::numeric_limits<float>::infinity());
  EXPECT_EQ(ExpF32(200.0f), std::numeric_limits<float>::infinity());
  EXPECT_EQ(ExpF32(-200.0f), 0.0f);
  EXPECT_TRUE(std::isnan(ExpF32(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(Sigmoid(40.0f), 1.0f);
  EXPECT_EQ(Sigmoid(0.0f), 0.5f);
}

}  // namespace
}  // namespace qcal::kernels
