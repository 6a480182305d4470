// Element types and the exact conversions between fp32 and the 16-bit float formats.
//
// Conversions round to nearest, ties to even, and handle subnormals, infinities and NaN, so that
// bf16/fp16 values written by qcal are bit-identical to those of PyTorch's `.to(dtype)`.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace qcal {

enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kF64, kU8 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// Safetensors spelling: "F32", "F16", "BF16", "I32", "F64", "U8".
const char* DTypeName(DType dtype);
absl::StatusOr<DType> ParseDType(const std::string& safetensors_name);

inline float Bf16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// Rounds an fp32 value to the nearest bf16 value (ties to even) and returns it as fp32.
inline float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
// Rounds an fp32 value to the nearest fp16 value (ties to even) and returns it as fp32.
inline float RoundToHalf(float f) { return HalfToFloat(FloatToHalf(f)); }

// The smallest positive normal fp16 value, 2^-14.
inline constexpr float kHalfMinNormal = 6.103515625e-05f;

}  // namespace qcal
