// The grid rules of kernels/quant_grid.h against DESIGN.md section 3 ("Quantizer grid"), and its
// bit-arithmetic fp16 rounding against common/dtype.h.
#include "kernels/quant_grid.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "tests/engine/quant/quant_test_data.h"

namespace qcal::kernels {
namespace {

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// h(x) built on the independent implementation in common/dtype.h.
float ExpectedScale(float x) { return std::max(RoundToHalf(x), kHalfMinNormal); }

TEST(RoundScaleToHalf, MatchesDtypeRoundToHalfAcrossFloats) {
  EXPECT_EQ(kMinScale, kHalfMinNormal);
  int64_t checked = 0;
  for (uint64_t b = 0; b <= 0x7f800000u; b += 97) {
    const float x = FromBits(static_cast<uint32_t>(b));
    ASSERT_EQ(Bits(RoundScaleToHalf(x)), Bits(ExpectedScale(x))) << "x = " << x;
    ++checked;
  }
  EXPECT_GT(checked, 20000000);
}

TEST(RoundScaleToHalf, TiesGoToEven) {
  // Every midpoint between consecutive normal fp16 values, and its float neighbours.
  for (uint16_t h = 0x0400; h < 0x7bff; ++h) {
    const float lo = HalfToFloat(h), hi = HalfToFloat(static_cast<uint16_t>(h + 1));
    const float mid = lo + (hi - lo) / 2;  // exact: fp16 has 11 significant bits, fp32 24
    const float even = (h & 1) ? hi : lo;
    ASSERT_EQ(RoundScaleToHalf(mid), even) << "h = " << h;
    ASSERT_EQ(RoundScaleToHalf(std::nextafter(mid, 0.0f)), lo);
    ASSERT_EQ(RoundScaleToHalf(std::nextafter(mid, INFINITY)), hi);
    ASSERT_EQ(RoundScaleToHalf(static_cast<double>(mid)), even);
  }
}

TEST(RoundScaleToHalf, ClampsAndOverflows) {
  EXPECT_EQ(RoundScaleToHalf(0.0f), kHalfMinNormal);
  EXPECT_EQ(RoundScaleToHalf(1e-30f), kHalfMinNormal);
  EXPECT_EQ(RoundScaleToHalf(std::ldexp(1.0f, -20)), kHalfMinNormal);  // an fp16 subnormal
  EXPECT_EQ(RoundScaleToHalf(0.0), kHalfMinNormal);
  EXPECT_EQ(RoundScaleToHalf(65504.0f), 65504.0f);
  EXPECT_EQ(RoundScaleToHalf(65519.0f), 65504.0f);
  EXPECT_TRUE(std::isinf(RoundScaleToHalf(65520.0f)));
  EXPECT_EQ(RoundScaleToHalf(65519.0), 65504.0f);
  EXPECT_TRUE(std::isinf(RoundScaleToHalf(65520.0)));
  EXPECT_TRUE(std::isnan(RoundScaleToHalf(NAN)));
}

TEST(RoundScaleToHalf, DoubleRoundsOnce) {
  // Every float value gives the same result through either overload.
  for (uint64_t b = 0x30000000u; b <= 0x47800000u; b += 1009) {
    const float x = FromBits(static_cast<uint32_t>(b));
    ASSERT_EQ(RoundScaleToHalf(static_cast<double>(x)), RoundScaleToHalf(x)) << "x = " << x;
  }
  // 1 + 2^-11 + 2^-40 is just above the midpoint of 1 and 1 + 2^-10; through fp32 it would first
  // become the midpoint itself and then round (to even) down to 1.
  const double x = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  EXPECT_EQ(RoundScaleToHalf(static_cast<float>(x)), 1.0f);
  EXPECT_EQ(RoundScaleToHalf(x), 1.0f + std::ldexp(1.0f, -10));
  EXPECT_EQ(RoundScaleToHalf(1.0 + std::ldexp(1.0, -11)), 1.0f);
  EXPECT_EQ(RoundScaleToHalf(1.0 + 3 * std::ldexp(1.0, -11)), 1.0f + std::ldexp(1.0f, -9));
}

template <typename T>
void CheckRoundHalfEven() {
  EXPECT_EQ(RoundHalfEven(T(0.5)), T(0));
  EXPECT_EQ(RoundHalfEven(T(1.5)), T(2));
  EXPECT_EQ(RoundHalfEven(T(2.5)), T(2));
  EXPECT_EQ(RoundHalfEven(T(3.5)), T(4));
  EXPECT_EQ(RoundHalfEven(T(-0.5)), T(0));
  EXPECT_EQ(RoundHalfEven(T(-1.5)), T(-2));
  EXPECT_EQ(RoundHalfEven(T(-2.5)), T(-2));
  EXPECT_EQ(RoundHalfEven(T(2.4999)), T(2));
  EXPECT_EQ(RoundHalfEven(T(2.5001)), T(3));
  EXPECT_EQ(RoundHalfEven(T(-7.25)), T(-7));
  EXPECT_EQ(RoundHalfEven(T(1e20)), T(1e20));
}

TEST(RoundHalfEven, TiesToEvenFloatAndDouble) {
  CheckRoundHalfEven<float>();
  CheckRoundHalfEven<double>();
}

// The DESIGN rules written out directly, on top of dtype.h's rounding and std::nearbyint (the
// default rounding mode is to nearest, ties to even), in fp32 like FitGroup<float>.
GroupParams ReferenceFit(const std::vector<float>& w, const QuantSpec& spec, float clip_min = 1,
                         float clip_max = 1) {
  float xmin = 0, xmax = 0;
  for (float v : w) {
    const float y = spec.grid == GridKind::kCuberoot ? std::cbrt(v) : v;
    xmin = std::min(xmin, y);
    xmax = std::max(xmax, y);
  }
  xmin *= clip_min;
  xmax *= clip_max;
  if (xmin == xmax) xmin = -1, xmax = 1;
  const float maxq = static_cast<float>((1 << spec.bits) - 1);
  if (spec.symmetric) {
    return {ExpectedScale(2 * std::max(-xmin, xmax) / maxq), 1 << (spec.bits - 1)};
  }
  GroupParams p{ExpectedScale((xmax - xmin) / maxq), 0};
  p.zero = static_cast<int32_t>(std::nearbyint(-xmin / p.scale));
  if (p.zero == 0) p = {ExpectedScale(xmax / (maxq - 1)), 1};
  return p;
}

TEST(FitGroup, MatchesReferenceOnRandomGroups) {
  testing::TestRng rng(11);
  int z_from_rounded_scale_matters = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    QuantSpec spec;
    spec.bits = 2 + trial % 7;
    spec.symmetric = trial % 5 == 0;
    spec.grid = trial % 7 == 3 ? GridKind::kCuberoot : GridKind::kUniform;
    const int n = 1 + static_cast<int>(rng.Uniform() * 40);
    const double offset = rng.Uniform() < 0.2 ? 1.5 : 0.0;  // some all-positive groups
    const double mag = std::pow(10.0, -5 + 7 * rng.Uniform());
    std::vector<float> w(n);
    for (float& v : w) v = static_cast<float>(mag * (rng.Normal() + offset));
    const float clip_min = trial % 3 == 0 ? static_cast<float>(0.5 + 0.5 * rng.Uniform()) : 1.0f;
    const float clip_max = trial % 3 == 0 ? static_cast<float>(0.5 + 0.5 * rng.Uniform()) : 1.0f;
    const GroupParams got = FitGroup(w.data(), n, 1, spec, clip_min, clip_max);
    const GroupParams want = ReferenceFit(w, spec, clip_min, clip_max);
    ASSERT_EQ(got.scale, want.scale) << "trial " << trial;
    ASSERT_EQ(got.zero, want.zero) << "trial " << trial;
    ASSERT_EQ(RoundToHalf(got.scale), got.scale);
    ASSERT_GE(got.scale, kHalfMinNormal);
    ASSERT_GE(got.zero, 1);
    ASSERT_LE(got.zero, (1 << spec.bits) - 1);
    if (!spec.symmetric && spec.grid == GridKind::kUniform && clip_min == 1.0f) {
      // Count groups where z from the unrounded scale would differ: the rule is exercised.
      float xmin = 0, xmax = 0;
      for (float v : w) xmin = std::min(xmin, v), xmax = std::max(xmax, v);
      const float raw = (xmax - xmin) / static_cast<float>((1 << spec.bits) - 1);
      if (got.zero > 1 && std::nearbyint(-xmin / raw) != got.zero) ++z_from_rounded_scale_matters;
    }
  }
  EXPECT_GT(z_from_rounded_scale_matters, 0);
}

TEST(FitGroup, AsymmetricByHand) {
  QuantSpec spec;  // 4 bits, asymmetric
  const float w[] = {-1.0f, 0.5f, 2.75f};
  const GroupParams p = FitGroup(w, 3, 1, spec);
  EXPECT_EQ(p.scale, 0.25f);  // 3.75 / 15, exact in fp16
  EXPECT_EQ(p.zero, 4);
  // A scale that fp16 must round: 1.3 / 15; z = round(0.3 / s) from the rounded s.
  const float w2[] = {-0.3f, 1.0f};
  const GroupParams p2 = FitGroup(w2, 2, 1, spec);
  const float raw = (1.0f - -0.3f) / 15;
  EXPECT_EQ(p2.scale, RoundToHalf(raw));
  EXPECT_NE(p2.scale, raw);
  EXPECT_EQ(p2.zero, 3);
}

TEST(FitGroup, AllZeroGroupUsesMinusOneToOne) {
  QuantSpec spec;
  const float zeros[] = {0.0f, 0.0f, -0.0f};
  const GroupParams p = FitGroup(zeros, 3, 1, spec);
  EXPECT_EQ(p.scale, RoundToHalf(2.0f / 15));
  EXPECT_EQ(p.zero, 8);  // round(1 / 0.13330078) = round(7.50...) = 8
  EXPECT_EQ(Dequantize<float>(QuantizeCode(0.0f, p, spec), p, spec), 0.0f);
  spec.symmetric = true;
  const GroupParams ps = FitGroup(zeros, 3, 1, spec);
  EXPECT_EQ(ps.scale, RoundToHalf(2.0f / 15));
  EXPECT_EQ(ps.zero, 8);
}

TEST(FitGroup, AllPositiveGroupNeverHasZeroPointZero) {
  for (int bits = 2; bits <= 8; ++bits) {
    QuantSpec spec;
    spec.bits = bits;
    const float w[] = {0.5f, 1.0f, 2.0f};
    const GroupParams p = FitGroup(w, 3, 1, spec);
    // xmin = 0 gives z = round(0) = 0, so z = 1 and s = xmax / (2^b - 2).
    EXPECT_EQ(p.zero, 1) << bits;
    EXPECT_EQ(p.scale, RoundToHalf(2.0f / static_cast<float>((1 << bits) - 2))) << bits;
    // The largest weight still lands on (about) the top code, not clamped far below it.
    const int32_t top = QuantizeCode(2.0f, p, spec);
    EXPECT_EQ(top, (1 << bits) - 1) << bits;
    EXPECT_NEAR(Dequantize<float>(top, p, spec), 2.0f, 2.0f / 1024) << bits;
  }
  // A positive group with a tiny negative weight also rounds z to 0.
  QuantSpec spec;
  const float w[] = {-1e-4f, 1.0f, 3.0f};
  const GroupParams p = FitGroup(w, 3, 1, spec);
  EXPECT_EQ(p.zero, 1);
  EXPECT_EQ(p.scale, RoundToHalf(3.0f / 14));
  // All negative: z = maxq.
  const float neg[] = {-1.0f, -3.0f};
  EXPECT_EQ(FitGroup(neg, 2, 1, spec).zero, 15);
}

TEST(FitGroup, Symmetric) {
  QuantSpec spec;
  spec.symmetric = true;
  const float w[] = {-3.0f, 1.0f};
  GroupParams p = FitGroup(w, 2, 1, spec);
  EXPECT_EQ(p.scale, RoundToHalf(6.0f / 15));
  EXPECT_EQ(p.zero, 8);
  spec.bits = 3;
  const float w2[] = {0.5f, 2.0f};  // all positive: still a = 2, z = 4
  p = FitGroup(w2, 2, 1, spec);
  EXPECT_EQ(p.scale, RoundToHalf(4.0f / 7));
  EXPECT_EQ(p.zero, 4);
}

TEST(FitGroup, ClipFactorsScaleTheRange) {
  QuantSpec spec;
  const float w[] = {-2.0f, 4.0f};
  const GroupParams p = FitGroup(w, 2, 1, spec, 0.5f, 0.25f);  // range [-1, 1]
  EXPECT_EQ(p.scale, RoundToHalf(2.0f / 15));
  EXPECT_EQ(p.zero, 8);
  EXPECT_EQ(QuantizeCode(4.0f, p, spec), 15);  // clipped weights saturate
  EXPECT_EQ(QuantizeCode(-2.0f, p, spec), 0);
}

TEST(FitGroup, StrideSelectsAColumn) {
  QuantSpec spec;
  const float m[] = {-1.0f, 9.0f, 0.5f, 9.0f, 2.75f, 9.0f};  // column 0 of a [3][2] matrix
  const GroupParams p = FitGroup(m, 3, 2, spec);
  EXPECT_EQ(p.scale, 0.25f);
  EXPECT_EQ(p.zero, 4);
}

TEST(QuantizeCode, RoundsHalfToEvenAndClamps) {
  QuantSpec spec;
  const GroupParams p{0.25f, 4};
  EXPECT_EQ(QuantizeCode(0.125f, p, spec), 4);   // 0.5 -> 0
  EXPECT_EQ(QuantizeCode(0.375f, p, spec), 6);   // 1.5 -> 2
  EXPECT_EQ(QuantizeCode(0.625f, p, spec), 6);   // 2.5 -> 2
  EXPECT_EQ(QuantizeCode(-0.375f, p, spec), 2);  // -1.5 -> -2
  EXPECT_EQ(QuantizeCode(-0.625f, p, spec), 2);  // -2.5 -> -2
  EXPECT_EQ(QuantizeCode(0.6251, p, spec), 7);   // double, just above the tie
  EXPECT_EQ(QuantizeCode(100.0f, p, spec), 15);
  EXPECT_EQ(QuantizeCode(-100.0f, p, spec), 0);
  EXPECT_EQ(QuantizeCode(1e30f, GroupParams{kMinScale, 1}, spec), 15);
  spec.bits = 2;
  EXPECT_EQ(QuantizeCode(100.0, GroupParams{0.25f, 1}, spec), 3);
}

TEST(Dequantize, IsScaleTimesCodeMinusZero) {
  QuantSpec spec;
  spec.bits = 8;
  const GroupParams p{RoundToHalf(0.0123f), 131};
  for (int32_t q = 0; q < 256; ++q) {
    ASSERT_EQ(Dequantize<float>(q, p, spec), p.scale * static_cast<float>(q - 131));
    ASSERT_EQ(Dequantize<double>(q, p, spec), static_cast<double>(p.scale) * (q - 131));
  }
}

TEST(Cuberoot, FitsOnCubeRootsAndCubesBack) {
  QuantSpec spec;
  spec.bits = 3;
  spec.grid = GridKind::kCuberoot;
  const float w[] = {-8.0f, 0.001f, 1.0f, 27.0f};  // y = -2, 0.1, 1, 3
  const GroupParams p = FitGroup(w, 4, 1, spec);
  EXPECT_EQ(p.scale, RoundToHalf((std::cbrt(27.0f) - std::cbrt(-8.0f)) / 7));
  EXPECT_EQ(p.zero, 3);  // round(2 / 0.714) = round(2.8)
  for (float v : w) {
    const int32_t q = QuantizeCode(v, p, spec);
    EXPECT_EQ(q, static_cast<int32_t>(std::nearbyint(std::cbrt(v) / p.scale)) + 3);
    const float y = p.scale * static_cast<float>(q - p.zero);
    EXPECT_EQ(Dequantize<float>(q, p, spec), y * y * y);
  }
  EXPECT_LT(Dequantize<float>(0, p, spec), 0.0f);
}

// The balanced grid: five levels 0..4, s = (xmax - xmin)/4, codes stored in 3 bits.
TEST(Balanced, FiveLevelsByHand) {
  QuantSpec spec;
  spec.bits = 2;
  spec.grid = GridKind::kBalanced;
  EXPECT_EQ(MaxCode(spec), 4);
  EXPECT_EQ(CodeBits(spec), 3);
  {
    const float w[] = {-1.0f, -0.3f, 0.2f, 3.0f};  // s = 4/4 = 1, z = round(1) = 1
    const GroupParams p = FitGroup(w, 4, 1, spec);
    EXPECT_EQ(p.scale, 1.0f);
    EXPECT_EQ(p.zero, 1);
    const int32_t want[] = {0, 1, 1, 4};
    for (int i = 0; i < 4; ++i) EXPECT_EQ(QuantizeCode(w[i], p, spec), want[i]) << i;
    EXPECT_EQ(QuantizeCode(100.0f, p, spec), 4);  // clamped at the fifth level
    EXPECT_EQ(Dequantize<float>(4, p, spec), 3.0f);
  }
  {
    // All positive: z rounds to 0, so z = 1 and s = xmax / 3.
    const float w[] = {0.5f, 2.0f, 3.0f};
    const GroupParams p = FitGroup(w, 3, 1, spec);
    EXPECT_EQ(p.zero, 1);
    EXPECT_EQ(p.scale, 1.0f);
    EXPECT_EQ(QuantizeCode(3.0f, p, spec), 4);
    EXPECT_EQ(QuantizeCode(0.5f, p, spec), 1);  // round(0.5) = 0 (ties to even)
  }
  {
    // All negative: z = 4, the top code is zero.
    const float w[] = {-4.0f, -1.0f};
    const GroupParams p = FitGroup(w, 2, 1, spec);
    EXPECT_EQ(p.scale, 1.0f);
    EXPECT_EQ(p.zero, 4);
    EXPECT_EQ(QuantizeCode(-4.0f, p, spec), 0);
    EXPECT_EQ(QuantizeCode(0.0f, p, spec), 4);
  }
  {
    // Symmetric: s = 2a/4, z = 2, levels -2s..2s.
    spec.symmetric = true;
    const float w[] = {-1.0f, 0.3f, 2.0f};
    const GroupParams p = FitGroup(w, 3, 1, spec);
    EXPECT_EQ(p.scale, 1.0f);
    EXPECT_EQ(p.zero, 2);
    EXPECT_EQ(QuantizeCode(-1.0f, p, spec), 1);
    EXPECT_EQ(QuantizeCode(2.0f, p, spec), 4);
    EXPECT_EQ(QuantizeCode(-5.0f, p, spec), 0);
    EXPECT_EQ(Dequantize<float>(0, p, spec), -2.0f);
  }
  // Random groups: every code is in 0..4 and the error is at most s/2 inside the range (plus the
  // fp16 rounding of s: 0.51 s).
  spec.symmetric = false;
  uint32_t state = 12345;
  for (int trial = 0; trial < 200; ++trial) {
    float w[37];
    for (float& v : w) {
      state = state * 1664525u + 1013904223u;
      v = static_cast<float>(static_cast<int32_t>(state >> 8) - (1 << 23)) / (1 << 23);
    }
    const GroupParams p = FitGroup(w, 37, 1, spec);
    for (float v : w) {
      const int32_t q = QuantizeCode(v, p, spec);
      ASSERT_GE(q, 0);
      ASSERT_LE(q, 4);
      ASSERT_LE(std::fabs(Dequantize<float>(q, p, spec) - v), 0.51f * p.scale);
    }
  }
}

TEST(GroupLayout, EffectiveGroupSizeAndCount) {
  QuantSpec spec;
  spec.group_size = 32;
  EXPECT_EQ(EffectiveGroupSize(spec, 172), 32);
  EXPECT_EQ(NumGroups(spec, 172), 6);  // the last group holds 12 columns
  spec.group_size = -1;
  EXPECT_EQ(EffectiveGroupSize(spec, 172), 172);
  EXPECT_EQ(NumGroups(spec, 172), 1);
  spec.group_size = 172;
  EXPECT_EQ(NumGroups(spec, 172), 1);
  spec.group_size = 4096;
  EXPECT_EQ(EffectiveGroupSize(spec, 172), 172);
  EXPECT_EQ(NumGroups(spec, 172), 1);
  EXPECT_EQ(MaxCode(spec), 15);
}

}  // namespace
}  // namespace qcal::kernels
