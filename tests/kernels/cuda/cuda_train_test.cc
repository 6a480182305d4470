// Parity of the CUDA backend's training ops with their CPU references (kernels/cpu/train_ref.h):
// ClippedFakeQuant, ClippedFakeQuantBackward and AdamWStep bit for bit (the references' own code,
// kernels/train_math.h, compiled without fused multiply-add); SquaredError and
// WeightedSquaredError's fp32 gradients bit for bit and their double sums within
// kLossSumBound relative (the device adds them in another order), identical run to run. Skips
// without a GPU.
#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/train_ref.h"
#include "kernels/train_ops.h"
#include "tests/kernels/cuda/cuda_test_fixture.h"
#include "tests/kernels/train_test_cases.h"

namespace qcal::kernels {
namespace {

using kernel_tests::FirstBitDifference;
using kernel_tests::TrainCase;
using kernel_tests::TrainCases;

// Double sums of at most ~1e5 non-negative terms in two orders: each partial sum is exact to
// 2^-53 relative, so the totals differ by far less than this.
constexpr double kLossSumBound = 1e-12;

class CudaTrainTest : public CudaBackendTest {
 protected:
  Tensor Up(const Tensor& host) {
    auto t = be_->ToDevice(host);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : Tensor();
  }
  Tensor Zeros(const Shape& shape) {
    auto t = be_->Alloc(DType::kF32, shape);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : Tensor();
  }
};

TEST_F(CudaTrainTest, SupportsTheTrainingOps) { EXPECT_TRUE(be_->SupportsOp(Op::kTrain)); }

TEST_F(CudaTrainTest, ClippedFakeQuantIsBitIdenticalToReference) {
  for (const TrainCase& c : TrainCases()) {
    SCOPED_TRACE(c.name);
    const ClipTensors layout = kernel_tests::ToClipTensors(*be_, c.layout);
    Tensor w_hat = Zeros(c.w.shape());
    ASSERT_TRUE(be_->ClippedFakeQuant(Up(c.w), layout, Up(c.gamma), Up(c.beta), w_hat).ok());
    std::vector<float> expected(c.w.numel());
    ref::ClippedFakeQuant(c.w.data<float>(), c.layout.view(), c.gamma.data<float>(),
                          c.beta.data<float>(), expected.data());
    const std::vector<float> got = Download(w_hat);
    const int64_t at = FirstBitDifference(got.data(), expected.data(), c.w.numel());
    EXPECT_EQ(at, -1) << "gpu " << (at >= 0 ? got[at] : 0.0f) << " cpu "
                      << (at >= 0 ? expected[at] : 0.0f);
    // In place (w_hat aliasing w) gives the same bits.
    Tensor in_place = Up(c.w);
    ASSERT_TRUE(be_->ClippedFakeQuant(in_place, layout, Up(c.gamma), Up(c.beta), in_place).ok());
    EXPECT_EQ(FirstBitDifference(Download(in_place).data(), expected.data(), c.w.numel()), -1);
  }
}

// A BF16 w_hat holds the F32 values rounded to nearest even (what the GEMMs' operand conversion
// makes of them), so the trainer's forward and backward see the same operands either way.
TEST_F(CudaTrainTest, ClippedFakeQuantToBf16RoundsTheReference) {
  for (const TrainCase& c : TrainCases()) {
    SCOPED_TRACE(c.name);
    const ClipTensors layout = kernel_tests::ToClipTensors(*be_, c.layout);
    auto w_hat = be_->Alloc(DType::kBF16, c.w.shape());
    ASSERT_TRUE(w_hat.ok()) << w_hat.status();
    ASSERT_TRUE(be_->ClippedFakeQuant(Up(c.w), layout, Up(c.gamma), Up(c.beta), *w_hat).ok());
    std::vector<float> expected(c.w.numel());
    ref::ClippedFakeQuant(c.w.data<float>(), c.layout.view(), c.gamma.data<float>(),
                          c.beta.data<float>(), expected.data());
    auto host = be_->ToHost(*w_hat);
    ASSERT_TRUE(host.ok()) << host.status();
    int64_t first_difference = -1;
    for (int64_t e = 0; e < c.w.numel() && first_difference < 0; ++e) {
      if (host->data<uint16_t>()[e] != FloatToBf16(expected[e])) first_difference = e;
    }
    EXPECT_EQ(first_difference, -1);
  }
}

TEST_F(CudaTrainTest, ClippedFakeQuantBackwardIsBitIdenticalToReference) {
  for (const TrainCase& c : TrainCases()) {
    SCOPED_TRACE(c.name);
    const ClipTensors layout = kernel_tests::ToClipTensors(*be_, c.layout);
    const int64_t nl = c.gamma.numel(), n = c.w.numel();
    std::vector<float> eg(nl), eb(nl), ew(n);
    ref::ClippedFakeQuantBackward(c.w.data<float>(), c.layout.view(), c.gamma.data<float>(),
                                  c.beta.data<float>(), c.dy.data<float>(), eg.data(), eb.data(),
                                  ew.data());
    const Tensor w = Up(c.w), gamma = Up(c.gamma), beta = Up(c.beta), dy = Up(c.dy);
    for (bool with_dw : {true, false}) {
      SCOPED_TRACE(with_dw ? "with d_w" : "without d_w");
      Tensor dg = Zeros(c.gamma.shape()), db = Zeros(c.gamma.shape()), dw = Zeros(c.w.shape());
      ASSERT_TRUE(
          be_->ClippedFakeQuantBackward(w, layout, gamma, beta, dy, dg, db, with_dw ? &dw : nullptr)
              .ok());
      EXPECT_EQ(FirstBitDifference(Download(dg).data(), eg.data(), nl), -1);
      EXPECT_EQ(FirstBitDifference(Download(db).data(), eb.data(), nl), -1);
      if (with_dw) {
        EXPECT_EQ(FirstBitDifference(Download(dw).data(), ew.data(), n), -1);
      }
    }
  }
}

TEST_F(CudaTrainTest, AdamWStepIsBitIdenticalToReference) {
  kernel_tests::Random rng(7);
  AdamWOptions o;
  o.lr = 3e-3;
  o.weight_decay = 0.05;
  for (int64_t n : {1, 37, 100003}) {
    SCOPED_TRACE(n);
    const Tensor p0 = rng.Floats({n});
    Tensor p = Up(p0), m = Zeros({n}), v = Zeros({n});
    std::vector<float> ep(p0.data<float>(), p0.data<float>() + n), em(n, 0.0f), ev(n, 0.0f);
    for (int64_t t = 1; t <= 3; ++t) {
      const Tensor g = rng.Floats({n}, 0.1f);
      ASSERT_TRUE(be_->AdamWStep(p, Up(g), m, v, t, o).ok());
      ref::AdamWStep(ep.data(), g.data<float>(), em.data(), ev.data(), n, t, o);
      EXPECT_EQ(FirstBitDifference(Download(p).data(), ep.data(), n), -1) << "step " << t;
      EXPECT_EQ(FirstBitDifference(Download(m).data(), em.data(), n), -1) << "step " << t;
      EXPECT_EQ(FirstBitDifference(Download(v).data(), ev.data(), n), -1) << "step " << t;
    }
  }
}

TEST_F(CudaTrainTest, LossTermsMatchReference) {
  kernel_tests::Random rng(9);
  for (const Shape& shape : {Shape{1, 1}, Shape{7, 45}, Shape{33, 130}, Shape{300, 1001}}) {
    SCOPED_TRACE(ShapeString(shape));
    const Tensor y = rng.Floats(shape), t = rng.Floats(shape), f = rng.Floats(shape, 2.0f);
    const int64_t n = y.numel();
    std::vector<float> edy(n);
    const double esum = ref::SquaredError(y.data<float>(), t.data<float>(), n, 0.25f, edy.data());
    const Tensor yd = Up(y), td = Up(t), fd = Up(f);
    Tensor dy = Zeros(shape);
    auto sum = be_->SquaredError(yd, td, 0.25f, &dy);
    ASSERT_TRUE(sum.ok()) << sum.status();
    EXPECT_LE(std::abs(*sum - esum), kLossSumBound * esum) << *sum << " vs " << esum;
    EXPECT_EQ(FirstBitDifference(Download(dy).data(), edy.data(), n), -1);
    auto again = be_->SquaredError(yd, td, 0.25f, nullptr);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*again, *sum);  // deterministic

    for (bool weighted : {true, false}) {
      SCOPED_TRACE(weighted ? "F given" : "F = 1");
      const Tensor g0 = rng.Floats(shape);
      std::vector<float> e1(g0.data<float>(), g0.data<float>() + n), e2(n, 0.0f);
      const double ew = ref::WeightedSquaredError(y.data<float>(), t.data<float>(),
                                                  weighted ? f.data<float>() : nullptr, shape[0],
                                                  shape[1], 0.3f, e1.data(), e2.data(), 2.5);
      Tensor g1 = Up(g0), g2 = Zeros(shape);
      auto wsum = be_->WeightedSquaredError(yd, td, weighted ? fd : Tensor(), 0.3f, &g1, &g2, 2.5);
      ASSERT_TRUE(wsum.ok()) << wsum.status();
      EXPECT_LE(std::abs(*wsum - ew), kLossSumBound * std::abs(ew)) << *wsum << " vs " << ew;
      EXPECT_EQ(FirstBitDifference(Download(g1).data(), e1.data(), n), -1);
      EXPECT_EQ(FirstBitDifference(Download(g2).data(), e2.data(), n), -1);
      auto wagain =
          be_->WeightedSquaredError(yd, td, weighted ? fd : Tensor(), 0.3f, nullptr, nullptr, 2.5);
      ASSERT_TRUE(wagain.ok());
      EXPECT_EQ(*wagain, *wsum);  // deterministic
    }
  }
}

TEST_F(CudaTrainTest, TrainingOpsRejectBadOperands) {
  const TrainCase c = kernel_tests::MakeTrainCase(4, 20, 4, 8, false, true, true, 3);
  const ClipTensors layout = kernel_tests::ToClipTensors(*be_, c.layout);
  const Tensor w = Up(c.w), gamma = Up(c.gamma), beta = Up(c.beta);
  Tensor w_hat = Zeros(c.w.shape());
  // Host operands, a misshapen output.
  EXPECT_EQ(be_->ClippedFakeQuant(c.w, layout, gamma, beta, w_hat).code(),
            absl::StatusCode::kInvalidArgument);
  Tensor small = Zeros({4, 19});
  EXPECT_EQ(be_->ClippedFakeQuant(w, layout, gamma, beta, small).code(),
            absl::StatusCode::kInvalidArgument);
  Tensor p = Zeros({5}), g = Zeros({5}), m = Zeros({5}), v = Zeros({4});
  EXPECT_EQ(be_->AdamWStep(p, g, m, v, 1, AdamWOptions()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->SquaredError(p, Zeros({6}), 1.0f, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qcal::kernels
