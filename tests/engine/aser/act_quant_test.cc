// Activation fake-quantization (DESIGN.md section 3, "Activation quantization"): the scalar
// reference on hand-computed rows, and the CPU backend against it bit for bit.
#include <cmath>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/ref_ops.h"
#include "tests/engine/aser/aser_test_util.h"

namespace qcal::kernels {
namespace {

using qcal::testing::CpuBackend;
using qcal::testing::TestRng;

std::vector<float> Ref(const std::vector<float>& x, int64_t width, int bits) {
  std::vector<float> out(x.size());
  ref::ActQuant(x.data(), static_cast<int64_t>(x.size()) / width, width, bits, out.data());
  return out;
}

TEST(ActQuantRefTest, HandComputedRowsRoundHalfToEven) {
  // 8 bits: qmax 127, amax 127, so s = 1 and the codes are round-half-even of x itself.
  EXPECT_EQ(Ref({127, 2.5f, 3.5f, -2.5f, 0.5f, -1.5f, 1.49f}, 7, 8),
            (std::vector<float>{127, 2, 4, -2, 0, -2, 1}));
  // 4 bits: qmax 7, amax 14, s = 2: x / s = 7, 0.5, 1.5, 2.5, -3.5, -0.25.
  EXPECT_EQ(Ref({14, 1, 3, 5, -7, -0.5f}, 6, 4), (std::vector<float>{14, 0, 4, 4, -8, 0}));
  // Two rows get their own scales: s = 7/7 = 1 and s = 70/7 = 10.
  EXPECT_EQ(Ref({7, 2.5f, 70, 25}, 2, 4), (std::vector<float>{7, 2, 70, 20}));
}

TEST(ActQuantRefTest, ZeroRowGivesZeros) {
  // 3 bits: qmax 3, s = 1 on the second row.
  EXPECT_EQ(Ref({0, 0, 0, 3, -1, 0.5f}, 3, 3), (std::vector<float>{0, 0, 0, 3, -1, 0}));
  // A subnormal amax whose scale underflows to 0 gives 0 too.
  const float tiny = std::ldexp(1.0f, -149);
  EXPECT_EQ(Ref({tiny, -tiny}, 2, 8), (std::vector<float>{0, 0}));
}

TEST(ActQuantRefTest, GridPropertiesOnRandomRows) {
  TestRng rng(11);
  for (int bits = 2; bits <= 8; ++bits) {
    const float qmax = float((1 << (bits - 1)) - 1);
    const int64_t width = 37;
    std::vector<float> x(5 * width);
    for (float& v : x) v = float(rng.StudentT3());
    const std::vector<float> out = Ref(x, width, bits);
    for (int64_t r = 0; r < 5; ++r) {
      float amax = 0;
      for (int64_t j = 0; j < width; ++j) amax = std::max(amax, std::fabs(x[r * width + j]));
      const float s = amax / qmax;
      float out_max = 0;
      for (int64_t j = 0; j < width; ++j) {
        const float q = out[r * width + j] / s;
        EXPECT_NEAR(q, std::nearbyint(q), 1e-3) << "off the grid, bits " << bits;
        EXPECT_LE(std::fabs(q), qmax + 1e-3);
        EXPECT_LE(std::fabs(out[r * width + j] - x[r * width + j]), 0.5f * s * (1 + 1e-5f));
        out_max = std::max(out_max, std::fabs(out[r * width + j]));
      }
      EXPECT_NEAR(out_max, amax, 1e-6 * amax) << "the largest entry keeps its value";
    }
  }
}

TEST(ActQuantCpuTest, MatchesRefBitForBit) {
  auto backend = CpuBackend();
  ASSERT_TRUE(backend->SupportsOp(Op::kActQuant));
  TestRng rng(5);
  for (int64_t width : {1, 7, 173}) {
    for (int64_t rows : {1, 3, 513}) {
      std::vector<float> x(static_cast<size_t>(rows * width));
      for (float& v : x) v = float(rng.StudentT3() * 3);
      for (int64_t j = 0; j < width; ++j) x[j] = 0.0f;  // row 0: s = 0
      for (int bits = 4; bits <= 8; ++bits) {
        const Tensor in = Tensor::FromVector(x, {rows, width});
        Tensor out = Tensor::Zeros(DType::kF32, {rows, width});
        ASSERT_TRUE(backend->ActQuant(in, bits, out).ok());
        const std::vector<float> expected = Ref(x, width, bits);
        ASSERT_EQ(std::memcmp(out.data<float>(), expected.data(), expected.size() * 4), 0)
            << rows << "x" << width << " bits " << bits;
        // In place (out aliases x) gives the same bits.
        Tensor inplace = in.Clone();
        ASSERT_TRUE(backend->ActQuant(inplace, bits, inplace).ok());
        ASSERT_EQ(std::memcmp(inplace.data<float>(), expected.data(), expected.size() * 4), 0);
      }
    }
  }
}

TEST(ActQuantCpuTest, RejectsBadArguments) {
  auto backend = CpuBackend();
  const Tensor x = Tensor::FromVector({1, 2, 3, 4}, {2, 2});
  Tensor out = Tensor::Zeros(DType::kF32, {2, 2});
  EXPECT_EQ(backend->ActQuant(x, 1, out).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend->ActQuant(x, 9, out).code(), absl::StatusCode::kInvalidArgument);
  Tensor wrong = Tensor::Zeros(DType::kF32, {4});
  EXPECT_EQ(backend->ActQuant(x, 8, wrong).code(), absl::StatusCode::kInvalidArgument);
  Tensor ints = Tensor::Zeros(DType::kI32, {2, 2});
  EXPECT_EQ(backend->ActQuant(ints, 8, out).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qcal::kernels
