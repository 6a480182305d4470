// The weight quantizer grid (DESIGN.md section 3, "Quantizer grid"): how a group of weights is
// fitted to a scale and zero point, and how a weight maps to its integer code and back.
//
// These are the rules every quantizer in qcal applies (RTN, GPTQ on the CPU and on the GPU, the
// fake-quant forward, export), so they live in one header-only file that host and CUDA code both
// compile: every function is QCAL_HOST_DEVICE (kernels/host_device.h) and the file depends on
// nothing else beyond <cmath>, <cstdint> and <cstring> (no Abseil, no containers, no
// common/dtype.h). The fp32 -> fp16 rounding of a scale is therefore done here with integer bit
// arithmetic; tests check it against common/dtype.h's RoundToHalf.
//
// Summary of the rules (b bits, maxq = 2^b - 1 (4 for the balanced grid), round() = round half to
// even):
//   xmin = min(min y, 0) * clip_min, xmax = max(max y, 0) * clip_max, where y = w (uniform grid)
//          or y = sign(w)|w|^(1/3) (cuberoot grid); xmin == xmax (all zero) -> xmin = -1, xmax = 1.
//   asymmetric: s = h((xmax - xmin) / maxq), z = round(-xmin / s); if z == 0: z = 1,
//               s = h(xmax / (maxq - 1)) (GPTQ v1 files cannot store a zero point of 0).
//   symmetric:  s = h(2 max(|xmin|, |xmax|) / maxq), z = 2^(b-1) (balanced: s = h(a / 2), z = 2,
//               the five levels -2s..2s).
//   h(x) rounds to the nearest fp16 value (ties to even) and clamps to >= 2^-14 (fp16's smallest
//   normal); z is always computed from the rounded s.
//   code:  q = clamp(round(y / s) + z, 0, maxq);  value: y^ = s (q - z), w^ = y^ (uniform) or
//   y^ * y^ * y^ (cuberoot), evaluated in the caller's precision T.
// The balanced grid (ABQ bit balance, b = 2 only) is the uniform grid with maxq = 4: five levels
// 0..4, s = h((xmax - xmin) / 4), z = round(-xmin / s), and s = h(xmax / 3) when z rounds to 0. Its
// codes need three bits (CodeBits): exports store them as 3-bit GPTQ v1 codes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/host_device.h"

namespace qcal::kernels {

// The set of representable values.
enum class GridKind : int32_t {
  kUniform,   // y = w: 2^b evenly spaced levels.
  kCuberoot,  // y = sign(w)|w|^(1/3) is quantized uniformly; w^ = y^3, so levels are denser near 0.
  kBalanced,  // ABQ bit balance, bits = 2 only: y = w on five evenly spaced levels (codes 0..4).
};

// One linear's weight quantizer. Plain data; engine code validates it (ValidateQuantSpec).
struct QuantSpec {
  // Bits per code, 2..8 (2 for the balanced grid, whose codes are stored in 3: CodeBits). Default:
  // 4.
  int bits = 4;
  // Input columns per group (per output row). -1: one group per row; a value >= d_in is the same
  // as -1. Default: 128.
  int group_size = 128;
  // Symmetric grid (z = 2^(b-1)) instead of the asymmetric min/max fit. Default: false.
  bool symmetric = false;
  // Default: uniform.
  GridKind grid = GridKind::kUniform;
};

// The fitted parameters of one group of one output row.
struct GroupParams {
  // Step of the grid; always an fp16 value >= 2^-14 (exactly representable in fp16), or +inf when
  // the group's range overflows fp16 (callers report that as an error).
  float scale = 1;
  // Zero point, 1..maxq for asymmetric grids, 2^(b-1) for symmetric ones.
  int32_t zero = 0;
};

// fp16's smallest positive normal value, 2^-14: the lower bound of every scale.
inline constexpr float kMinScale = 6.103515625e-05f;

// The largest code: 2^bits - 1, or 4 for the balanced grid.
QCAL_HOST_DEVICE inline int32_t MaxCode(const QuantSpec& spec) {
  return spec.grid == GridKind::kBalanced ? 4 : (1 << spec.bits) - 1;
}

// Bits needed to store a code (0..MaxCode): 3 for the balanced grid, otherwise bits.
QCAL_HOST_DEVICE inline int CodeBits(const QuantSpec& spec) {
  return spec.grid == GridKind::kBalanced ? 3 : spec.bits;
}

// The effective group width g for a linear with d_in input columns (d_in for group_size -1 or
// group_size >= d_in). The last group of a row may be shorter than g.
QCAL_HOST_DEVICE inline int64_t EffectiveGroupSize(const QuantSpec& spec, int64_t d_in) {
  return (spec.group_size <= 0 || spec.group_size >= d_in) ? d_in : spec.group_size;
}

// Number of groups per row, ceil(d_in / g).
QCAL_HOST_DEVICE inline int64_t NumGroups(const QuantSpec& spec, int64_t d_in) {
  const int64_t g = EffectiveGroupSize(spec, d_in);
  return (d_in + g - 1) / g;
}

// h(x): the fp16 value nearest to x (ties to even), clamped to at least kMinScale. Defined for
// x >= 0 (a scale): values below 2^-14 give kMinScale, values >= 65520 give +inf, NaN stays NaN.
// The result is exactly representable in fp16.
QCAL_HOST_DEVICE inline float RoundScaleToHalf(float x) {
  if (!(x >= kMinScale)) return x != x ? x : kMinScale;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (bits >= 0x477ff000u) return INFINITY;  // >= 65520 rounds past fp16's largest finite value
  // Keep 10 of fp32's 23 mantissa bits, ties to even; a carry moves into the exponent correctly.
  bits += 0xfffu + ((bits >> 13) & 1u);
  bits &= ~0x1fffu;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// h(x) for a double, rounded once from the double (no intermediate rounding to fp32).
QCAL_HOST_DEVICE inline float RoundScaleToHalf(double x) {
  if (!(x >= static_cast<double>(kMinScale))) return x != x ? static_cast<float>(x) : kMinScale;
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (bits >= 0x40effe0000000000ull) return INFINITY;  // >= 65520
  // Keep 10 of fp64's 52 mantissa bits, ties to even.
  bits += 0x1ffffffffffull + ((bits >> 42) & 1u);
  bits &= ~0x3ffffffffffull;
  double out;
  std::memcpy(&out, &bits, sizeof out);
  return static_cast<float>(out);  // exact: an fp16 value
}

// round(x) with ties to even, independent of the floating-point environment's rounding mode.
// On the device, rint (one cvt.rni: ties to even, no rounding-mode state there) with the sign of
// a zero result fixed to the floor form's, which gives −0 only for x = −0 (x in [−0.5, 0) gives
// f + 1 = +0): the same value for every input and the same bits for every input but NaN (a NaN
// either way, whose sign and payload may differ), in 3 instructions instead of a branchy sequence
// whose tie case calls fmod.
template <typename T>
QCAL_HOST_DEVICE inline T RoundHalfEven(T x) {
#ifdef __CUDA_ARCH__
  const T r = rint(x);
  return r == T(0) && x != T(0) ? T(0) : r;
#else
  const T f = std::floor(x);
  const T frac = x - f;  // exact for every finite x
  if (frac > T(0.5)) return f + T(1);
  if (frac < T(0.5)) return f;
  return std::fmod(f, T(2)) == T(0) ? f : f + T(1);
#endif
}

// y(w): the value the uniform grid is laid over (w itself, or its signed cube root).
template <typename T>
QCAL_HOST_DEVICE inline T GridValue(T w, GridKind grid) {
  return grid == GridKind::kCuberoot ? std::cbrt(w) : w;
}

// The range of a group's grid values: xmin = min(min y, 0) and xmax = max(max y, 0), NaNs skipped.
// Only strict comparisons move it away from +0, so it never holds -0 and the result does not
// depend on the order in which the values (or partial ranges of disjoint parts) are added: a
// warp may fit a group in parallel and get the bits of the sequential loop.
template <typename T>
struct GridRange {
  T xmin = 0;
  T xmax = 0;
};

template <typename T>
QCAL_HOST_DEVICE inline void ExtendRange(GridRange<T>* r, T y) {
  if (y < r->xmin) r->xmin = y;
  if (y > r->xmax) r->xmax = y;
}

// Adds the partial range b (of a disjoint part of the same group) to r.
template <typename T>
QCAL_HOST_DEVICE inline void JoinRange(GridRange<T>* r, const GridRange<T>& b) {
  if (b.xmin < r->xmin) r->xmin = b.xmin;
  if (b.xmax > r->xmax) r->xmax = b.xmax;
}

// The parameters of a group with range r. clip_min and clip_max scale xmin and xmax (learned
// clipping; 1 = no clipping).
template <typename T>
QCAL_HOST_DEVICE inline GroupParams FitRange(GridRange<T> r, const QuantSpec& spec,
                                             float clip_min = 1.0f, float clip_max = 1.0f) {
  T xmin = r.xmin * static_cast<T>(clip_min);
  T xmax = r.xmax * static_cast<T>(clip_max);
  if (xmin == xmax) {
    xmin = T(-1);
    xmax = T(1);
  }
  const int32_t maxq = MaxCode(spec);
  GroupParams p;
  if (spec.symmetric) {
    const T a = -xmin > xmax ? -xmin : xmax;
    p.scale = RoundScaleToHalf(T(2) * a / static_cast<T>(maxq));
    p.zero = 1 << (spec.bits - 1);
    return p;
  }
  p.scale = RoundScaleToHalf((xmax - xmin) / static_cast<T>(maxq));
  // -xmin / s <= maxq (1 + 2^-11) < maxq + 0.5 for finite inputs; the bound only guards NaN.
  const T z = RoundHalfEven(-xmin / static_cast<T>(p.scale));
  p.zero = z <= static_cast<T>(maxq) ? static_cast<int32_t>(z) : maxq;
  if (p.zero == 0) {
    p.zero = 1;
    p.scale = RoundScaleToHalf(xmax / static_cast<T>(maxq - 1));
  }
  return p;
}

// Fits one group: the n weights w[0], w[stride], ..., w[(n-1)*stride], computing in T (FitRange
// of their range). Non-finite weights never cause undefined behaviour but give meaningless
// parameters: callers validate their inputs.
template <typename T>
QCAL_HOST_DEVICE inline GroupParams FitGroup(const T* w, int64_t n, int64_t stride,
                                             const QuantSpec& spec, float clip_min = 1.0f,
                                             float clip_max = 1.0f) {
  GridRange<T> r;
  for (int64_t i = 0; i < n; ++i) ExtendRange(&r, GridValue(w[i * stride], spec.grid));
  return FitRange(r, spec, clip_min, clip_max);
}

// The code of weight w: clamp(round(y(w) / s) + z, 0, maxq), computed in T.
template <typename T>
QCAL_HOST_DEVICE inline int32_t QuantizeCode(T w, const GroupParams& p, const QuantSpec& spec) {
  const T maxq = static_cast<T>(MaxCode(spec));
  const T q =
      RoundHalfEven(GridValue(w, spec.grid) / static_cast<T>(p.scale)) + static_cast<T>(p.zero);
  if (!(q > T(0))) return 0;  // also maps NaN to 0
  if (q > maxq) return static_cast<int32_t>(maxq);
  return static_cast<int32_t>(q);
}

// The value of code q: y^ = s (q - z) in T, cubed ((y^ y^) y^) for the cuberoot grid. In fp32 this
// is exactly what a reader of exported scales (fp16 -> fp32) and codes computes.
template <typename T>
QCAL_HOST_DEVICE inline T Dequantize(int32_t q, const GroupParams& p, const QuantSpec& spec) {
  const T y = static_cast<T>(p.scale) * static_cast<T>(q - p.zero);
  return spec.grid == GridKind::kCuberoot ? y * y * y : y;
}

}  // namespace qcal::kernels
