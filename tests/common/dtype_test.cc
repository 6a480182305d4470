// Tests of the fp32 <-> fp16/bf16 conversions in common/dtype.h.
//
// The fp16 and bf16 grids are small enough to test exhaustively: every bit pattern is decoded and
// checked against an independent formula, re-encoded, and the midpoint between every pair of
// neighbours is rounded (ties to even) and nudged one fp32 ulp either way.
#include "common/dtype.h"

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"

namespace qcal {
namespace {

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint32_t ToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

bool IsHalfNan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0; }
bool IsBf16Nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x007fu) != 0; }

// The value of an fp16 bit pattern from the IEEE 754 binary16 definition, in double.
double HalfValue(uint16_t h) {
  const double sign = (h & 0x8000u) ? -1.0 : 1.0;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  if (exp == 31) return mant == 0 ? sign * INFINITY : NAN;
  return sign * std::ldexp(1024 + mant, exp - 25);
}

TEST(HalfTest, DecodesEveryBitPatternExactly) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    const double want = HalfValue(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
    } else {
      EXPECT_EQ(static_cast<double>(f), want) << std::hex << h;
      EXPECT_EQ(std::signbit(f), (h & 0x8000u) != 0) << std::hex << h;
    }
  }
}

TEST(HalfTest, RoundTripsEveryBitPattern) {
  int nans = 0;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const uint16_t back = FloatToHalf(HalfToFloat(bits));
    if (IsHalfNan(bits)) {
      EXPECT_TRUE(IsHalfNan(back)) << std::hex << h;
      ++nans;
    } else {
      EXPECT_EQ(back, bits) << std::hex << h;
    }
  }
  EXPECT_EQ(nans, 2 * 1023);
}

// Between every pair of neighbouring finite fp16 values (and between 65504 and the overflow
// threshold 65536): the exact midpoint rounds to the neighbour with an even mantissa, and one fp32
// ulp off the midpoint rounds to the nearer neighbour. Negative values mirror positive ones.
TEST(HalfTest, RoundsEveryMidpointToNearestEven) {
  for (uint32_t lo = 0; lo < 0x7c00u; ++lo) {
    const uint32_t hi = lo + 1;  // 0x7c00 (inf) stands for 65536 above the largest finite value
    const double a = HalfValue(static_cast<uint16_t>(lo));
    const double b = hi == 0x7c00u ? 65536.0 : HalfValue(static_cast<uint16_t>(hi));
    const float mid = static_cast<float>((a + b) / 2);  // exact: 12 significant bits
    ASSERT_EQ(static_cast<double>(mid), (a + b) / 2);
    const uint16_t even = static_cast<uint16_t>((lo & 1u) ? hi : lo);
    for (const float sign : {1.0f, -1.0f}) {
      const uint16_t s = sign < 0 ? 0x8000u : 0;
      EXPECT_EQ(FloatToHalf(sign * mid), s | even) << std::hex << lo;
      EXPECT_EQ(FloatToHalf(sign * std::nextafter(mid, 0.0f)), s | lo) << std::hex << lo;
      EXPECT_EQ(FloatToHalf(sign * std::nextafter(mid, INFINITY)), s | hi) << std::hex << lo;
    }
  }
}

TEST(HalfTest, TiesToEvenCases) {
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);      // 1 + half ulp -> 1
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02u);  // odd neighbour loses
  EXPECT_EQ(FloatToHalf(2049.0f), 0x6800u);                           // 2048 (spacing 2 here)
  EXPECT_EQ(FloatToHalf(2051.0f), 0x6802u);                           // 2052
  EXPECT_EQ(FloatToHalf(-2051.0f), 0xe802u);
  // 2047.5 -> 2048 carries from the mantissa into the exponent.
  EXPECT_EQ(FloatToHalf(2047.5f), 0x6800u);
  EXPECT_EQ(RoundToHalf(0.1f), 0.0999755859375f);
}

TEST(HalfTest, Subnormals) {
  const float min_sub = std::ldexp(1.0f, -24);
  EXPECT_EQ(FloatToHalf(min_sub), 0x0001u);
  EXPECT_EQ(HalfToFloat(0x0001u), min_sub);
  EXPECT_EQ(FloatToHalf(1023 * min_sub), 0x03ffu);  // largest subnormal
  EXPECT_EQ(HalfToFloat(0x03ffu), 1023 * min_sub);
  EXPECT_EQ(FloatToHalf(min_sub / 2), 0x0000u);      // tie between 0 and min_sub -> 0
  EXPECT_EQ(FloatToHalf(3 * min_sub / 2), 0x0002u);  // tie between 1 and 2 -> 2
  EXPECT_EQ(FloatToHalf(std::nextafter(min_sub / 2, 1.0f)), 0x0001u);
  EXPECT_EQ(FloatToHalf(-min_sub), 0x8001u);
  EXPECT_EQ(FloatToHalf(1e-10f), 0x0000u);
  EXPECT_EQ(FloatToHalf(-1e-10f), 0x8000u);
  EXPECT_EQ(FloatToHalf(FromBits(0x00000001u)), 0x0000u);  // fp32 subnormal underflows
  // The smallest normal and the boundary with the subnormals.
  EXPECT_EQ(kHalfMinNormal, std::ldexp(1.0f, -14));
  EXPECT_EQ(FloatToHalf(kHalfMinNormal), 0x0400u);
  EXPECT_EQ(HalfToFloat(0x0400u), kHalfMinNormal);
  EXPECT_EQ(FloatToHalf(kHalfMinNormal - min_sub / 2), 0x0400u);  // tie 0x3ff/0x400 -> even
}

TEST(HalfTest, OverflowAndSpecials) {
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bffu);
  EXPECT_EQ(HalfToFloat(0x7bffu), 65504.0f);
  EXPECT_EQ(FloatToHalf(65519.996f), 0x7bffu);  // just below the rounding threshold 65520
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00u);    // ties to even: 65536 is not finite -> inf
  EXPECT_EQ(FloatToHalf(1e6f), 0x7c00u);
  EXPECT_EQ(FloatToHalf(-1e6f), 0xfc00u);
  EXPECT_EQ(FloatToHalf(FLT_MAX), 0x7c00u);
  EXPECT_EQ(FloatToHalf(INFINITY), 0x7c00u);
  EXPECT_EQ(FloatToHalf(-INFINITY), 0xfc00u);
  EXPECT_EQ(HalfToFloat(0x7c00u), INFINITY);
  EXPECT_EQ(HalfToFloat(0xfc00u), -INFINITY);
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000u);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000u);
  EXPECT_TRUE(IsHalfNan(FloatToHalf(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(IsHalfNan(FloatToHalf(FromBits(0x7f800001u))));  // NaN payload below fp16's bits
  EXPECT_TRUE(IsHalfNan(FloatToHalf(FromBits(0xffc00000u))));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7e00u)));
  EXPECT_TRUE(std::isnan(RoundToHalf(NAN)));
}

TEST(Bf16Test, RoundTripsEveryBitPattern) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f = Bf16ToFloat(bits);
    EXPECT_EQ(ToBits(f), h << 16) << std::hex << h;
    const uint16_t back = FloatToBf16(f);
    if (IsBf16Nan(bits)) {
      EXPECT_TRUE(IsBf16Nan(back)) << std::hex << h;
    } else {
      EXPECT_EQ(back, bits) << std::hex << h;
    }
  }
}

// bf16 is the top half of fp32, so the midpoint between neighbours b and b+1 is b<<16 | 0x8000.
// Covers subnormals, every binade and the overflow of the largest finite value to infinity.
TEST(Bf16Test, RoundsEveryMidpointToNearestEven) {
  for (uint32_t lo = 0; lo < 0x7f80u; ++lo) {
    const uint32_t hi = lo + 1;
    const uint32_t mid = (lo << 16) | 0x8000u;
    const uint32_t even = (lo & 1u) ? hi : lo;
    for (const uint32_t sign : {0u, 0x80000000u}) {
      const uint16_t s = static_cast<uint16_t>(sign >> 16);
      EXPECT_EQ(FloatToBf16(FromBits(sign | mid)), s | even) << std::hex << lo;
      EXPECT_EQ(FloatToBf16(FromBits(sign | (mid - 1))), s | lo) << std::hex << lo;
      EXPECT_EQ(FloatToBf16(FromBits(sign | (mid + 1))), s | hi) << std::hex << lo;
    }
  }
}

TEST(Bf16Test, RneCasesAndSpecials) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80u);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)), 0x3f80u);  // 1 + 2^-8: tie -> even (1.0)
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)), 0x3f82u);  // tie with odd low neighbour -> up
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001u)), 0x3f81u);  // just above the tie -> up
  EXPECT_EQ(FloatToBf16(FromBits(0x3f807fffu)), 0x3f80u);  // just below -> down
  EXPECT_EQ(FloatToBf16(FromBits(0x3fffffffu)), 0x4000u);  // carry into the exponent
  EXPECT_EQ(FloatToBf16(FLT_MAX), 0x7f80u);                // rounds past the largest finite
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7f7fffu)), 0x7f7fu);
  EXPECT_EQ(FloatToBf16(INFINITY), 0x7f80u);
  EXPECT_EQ(FloatToBf16(-INFINITY), 0xff80u);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000u);
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload sits only in the discarded low bits must stay NaN, not become infinity.
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(FromBits(0x7f800001u))));
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(FromBits(0xff800001u))));
  EXPECT_EQ(RoundToBf16(3.14159265f), 3.140625f);
}

TEST(DTypeTest, NamesSizesAndParsing) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kI32, DType::kF64, DType::kU8}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok()) << DTypeName(d);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kI32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kU8), 1u);
  auto bad = ParseDType("F8_E4M3");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("F8_E4M3"), std::string::npos);
  EXPECT_FALSE(ParseDType("f32").ok());  // names are case-sensitive, as in safetensors
}

}  // namespace
}  // namespace qcal
