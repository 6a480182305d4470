// The arithmetic of block retraining's ops (DESIGN section 3, "Retraining (ApiQ and
// saliency-aware)"): one group of the clipped fake quantizer, forward and STE backward, and one
// element of AdamW. Header-only and QCAL_HOST_DEVICE like kernels/quant_grid.h, so that the CPU
// references (kernels/cpu/train_ref.h, which loop over rows and groups and call these functions)
// and the CUDA kernels (kernels/cuda/clipped_quant*.cu: SteLanes threads per group, sharing its
// weights; adamw.cu: a thread per element) run the same code. Every operation is a separately
// rounded IEEE operation in T: the CUDA files that include this header are compiled with
// -fmad=false (no fused multiply-add), divisions and square roots are IEEE (no fast math), and the
// CPU references are built with -ffp-contract=off (kernels/cpu/CMakeLists.txt), so for T = float
// the two backends give the same bits.
//
// Clipped fake quantizer, per output row o and group k (the columns of the group: positions
// k·g .. k·g + g − 1, mapped to columns through `perm` when there is one), with clip_max =
// σ(γ[o,k]) and clip_min = σ(β[o,k]): the group is fitted as kernels/quant_grid.h's FitGroup does
// with those clip factors (xmin = min(min w, 0)·clip_min, xmax = max(max w, 0)·clip_max — or the
// solver's grid span clipped, see ClipView::grid_scales — the fp16-rounded scale, the zero point
// from the rounded scale, the z = 0 fallback, the symmetric rule), and ŵ = s·(clamp(round(w/s) + z,
// 0, maxq) − z). For T = float, no grid and the same clip factors the codes, scales and zeros are
// FitGroup<float>/QuantizeCode<float>'s bit for bit.
//
// STE backward. round() of w/s and of the zero point, and the fp16 rounding of the scale, pass
// gradients as the identity; clamp passes them where 0 <= round(w/s) + z <= maxq (bounds
// included, as PyTorch's clamp) and blocks them elsewhere; min and max pass them to the weight
// that attains them. Equivalently the backward is the exact derivative of the surrogate in which
// every rounding offset (round(x) − x), the clamp mask and the branch taken (degenerate range,
// z = 0 fallback, which of −xmin and xmax is larger when symmetric) are frozen at the current
// point. Inside the clamp range the surrogate is ŵ = w + s·r (r = round(w/s) − w/s), so ∂ŵ/∂s = r;
// a clamped weight is ŵ = s·C + xmin − s·r_z (C its clamped code, r_z the zero point's offset), so
// ∂ŵ/∂s = C − r_z and ∂ŵ/∂xmin = 1. A group whose clipped range is empty (all weights zero) has
// constant parameters: no clipping gradient.
//
// The order of the group's STE sums (SteLanes): `lanes` partial sums, partial l over the group's
// positions p ≡ l (mod lanes) in increasing order, then added as a pairwise tree (for h = lanes/2,
// ..., 1: partial[l] += partial[l + h] for l < h), which is what a butterfly of `lanes` GPU lanes
// computes (addition commutes, so every lane ends with the same bits). A group's lanes thus share
// its serial work, and the CPU reference runs the same order. Before 2026-12-04 the sums ran over
// the positions in order (lanes = 1, which the order still is for groups of fewer than 32).
//
// Only the uniform grid (the layout's Validate enforces it).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/quant_grid.h"

namespace qcal::kernels {

// One linear's clipping layout as plain pointers (host memory for the references, device memory
// for the CUDA kernels); kernels/train_ops.h's ClipLayout owns host arrays and ClipTensors device
// ones. Logits γ, β are [d_out, n_groups], group k of row o at o·n_groups + k.
struct ClipView {
  int64_t d_out = 0;
  int64_t d_in = 0;
  QuantSpec spec;
  // [d_in]: act-order's visiting order (perm[p] = the original column at position p), or null
  // (identity). Groups are runs of g positions in this order, as GPTQ forms them.
  const int32_t* perm = nullptr;
  // [n_groups, d_out] each, or null: the solver's grid. With it the unclipped range of group
  // (o, k) is that grid's span, [−z·s, (maxq − z)·s] (symmetric: ±maxq·s/2), instead of
  // [min(min w, 0), max(max w, 0)], and no gradient reaches w through the range.
  const float* grid_scales = nullptr;
  const int32_t* grid_zeros = nullptr;

  QCAL_HOST_DEVICE bool has_grid() const { return grid_scales != nullptr; }
  QCAL_HOST_DEVICE int64_t group_size() const { return EffectiveGroupSize(spec, d_in); }
  QCAL_HOST_DEVICE int64_t n_groups() const { return NumGroups(spec, d_in); }
  QCAL_HOST_DEVICE int64_t num_logits() const { return d_out * n_groups(); }
  // The original column at position `pos`.
  QCAL_HOST_DEVICE int64_t column(int64_t pos) const { return perm ? perm[pos] : pos; }
};

// e^x rounded to float, the same bits on every host and device: computed in double by Cody-Waite
// reduction (x = k·ln2 + r, |r| <= ln2/2), a degree-13 Taylor polynomial of e^r (truncation below
// 5e-18 relative) and an exact scaling by 2^k, each operation separately rounded, then rounded
// once to float. The double result is within a few units of 2^-52 relative of e^x, so the float is
// the correctly rounded e^x except where e^x lies within about 1e-15 relative of a rounding
// boundary. NaN stays NaN; x > 88.8 gives +inf, x < −104 gives 0 (both beyond float's range).
QCAL_HOST_DEVICE inline float ExpF32(float x) {
  if (x != x) return x;
  if (x > 88.8f) return INFINITY;
  if (x < -104.0f) return 0.0f;
  const double xd = x;
  const double k = std::floor(xd * 1.4426950408889634 + 0.5);
  // ln 2 = kLn2Hi + kLn2Lo with kLn2Hi's low 21 bits zero: k·kLn2Hi is exact for |k| < 2^21.
  const double kLn2Hi = 0.6931471803691238;
  const double kLn2Lo = 1.9082149292705877e-10;
  const double r = (xd - k * kLn2Hi) - k * kLn2Lo;
  double p = 1.6059043836821613e-10;  // 1/13!
  p = p * r + 2.08767569878681e-09;
  p = p * r + 2.505210838544172e-08;
  p = p * r + 2.755731922398589e-07;
  p = p * r + 2.7557319223985893e-06;
  p = p * r + 2.48015873015873e-05;
  p = p * r + 0.0001984126984126984;
  p = p * r + 0.001388888888888889;
  p = p * r + 0.008333333333333333;
  p = p * r + 0.041666666666666664;
  p = p * r + 0.16666666666666666;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^k as a double (k in [−151, 129]: a normal double).
  const uint64_t bits = static_cast<uint64_t>(static_cast<int64_t>(k) + 1023) << 52;
  double two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return static_cast<float>(p * two_k);
}

// σ(x) = 1 / (1 + e^−x) in T: in float with ExpF32 (identical on every backend), in double with
// std::exp (the float64 oracles).
template <typename T>
QCAL_HOST_DEVICE inline T Sigmoid(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / (1.0f + ExpF32(-x));
  } else {
    return T(1) / (T(1) + std::exp(-x));
  }
}

// Which rule of the grid fitted a group: the STE backward differentiates that rule.
enum class ClipBranch : int32_t {
  kDegenerate,    // clipped range empty: xmin = −1, xmax = 1, constant parameters
  kAsymmetric,    // s from (xmax − xmin), z = round(−xmin / s)
  kZeroFallback,  // z rounded to 0: z = 1, s from xmax alone
  kSymmetricMin,  // symmetric, a = −xmin
  kSymmetricMax,  // symmetric, a = xmax
};

// One group's fit with everything the backward needs.
template <typename T>
struct ClipGroupFit {
  GroupParams p;
  ClipBranch branch = ClipBranch::kDegenerate;
  T xmin0 = 0, xmax0 = 0;  // unclipped range: min(min w, 0), max(max w, 0) or the grid's span
  T cmin = 1, cmax = 1;    // σ(β), σ(γ)
  int64_t argmin = -1;     // column attaining xmin0 (< 0), else −1
  int64_t argmax = -1;     // column attaining xmax0 (> 0), else −1
  T z_offset = 0;          // kAsymmetric: round(z_raw) − z_raw (the zero point's STE offset)
};

// The partial sums of a group of g columns (the order above): the largest power of two not above
// g/16, in [1, 32] (groups of 64: 4 lanes of 16 weights).
QCAL_HOST_DEVICE constexpr int SteLanes(int64_t g) {
  int lanes = 1;
  while (lanes < 32 && lanes * 32 <= g) lanes *= 2;
  return lanes;
}

// A group's unclipped range from its weights: lo = min(min w, 0), hi = max(max w, 0), and the
// first position attaining lo < 0 (hi > 0), else −1.
template <typename T, typename Pos = int64_t>
struct GroupRange {
  T lo = 0, hi = 0;
  Pos lo_pos = -1, hi_pos = -1;
};

// Adds the weight at position `pos` (positions added in increasing order).
template <typename T, typename Pos>
QCAL_HOST_DEVICE inline void AddToRange(T v, Pos pos, GroupRange<T, Pos>& r) {
  if (v < r.lo) r.lo = v, r.lo_pos = pos;
  if (v > r.hi) r.hi = v, r.hi_pos = pos;
}

// The range of the union of two disjoint sets of positions, each summarized by AddToRange: the
// same as AddToRange over the union in position order (extremes are exact; ties go to the first
// position). Symmetric in a and b, so a butterfly of lanes agrees on it.
template <typename T, typename Pos>
QCAL_HOST_DEVICE inline GroupRange<T, Pos> MergeRanges(GroupRange<T, Pos> a,
                                                       const GroupRange<T, Pos>& b) {
  if (b.lo < a.lo || (b.lo == a.lo && b.lo_pos >= 0 && b.lo_pos < a.lo_pos)) {
    a.lo = b.lo, a.lo_pos = b.lo_pos;
  }
  if (b.hi > a.hi || (b.hi == a.hi && b.hi_pos >= 0 && b.hi_pos < a.hi_pos)) {
    a.hi = b.hi, a.hi_pos = b.hi_pos;
  }
  return a;
}

// FitGroup (kernels/quant_grid.h) of group k of row o with the clip factors σ(gamma), σ(beta) in
// T, recording the branch, from the group's range (ignored with the solver's grid).
template <typename T>
QCAL_HOST_DEVICE inline ClipGroupFit<T> FitClippedRange(const GroupRange<T>& range,
                                                        const ClipView& layout, int64_t o,
                                                        int64_t k, T gamma, T beta) {
  const QuantSpec& spec = layout.spec;
  ClipGroupFit<T> f;
  if (layout.has_grid()) {
    const T s = static_cast<T>(layout.grid_scales[k * layout.d_out + o]);
    const T maxq = static_cast<T>(MaxCode(spec));
    if (spec.symmetric) {
      f.xmax0 = maxq * s / T(2);
      f.xmin0 = -f.xmax0;
    } else {
      const T z = static_cast<T>(layout.grid_zeros[k * layout.d_out + o]);
      f.xmin0 = -z * s;
      f.xmax0 = (maxq - z) * s;
    }
  } else {
    f.xmin0 = range.lo;
    f.xmax0 = range.hi;
    f.argmin = range.lo_pos >= 0 ? layout.column(range.lo_pos) : -1;
    f.argmax = range.hi_pos >= 0 ? layout.column(range.hi_pos) : -1;
  }
  f.cmin = Sigmoid(beta);
  f.cmax = Sigmoid(gamma);
  T xmin = f.xmin0 * f.cmin, xmax = f.xmax0 * f.cmax;
  const bool degenerate = xmin == xmax;
  if (degenerate) xmin = T(-1), xmax = T(1);
  const int32_t maxq = MaxCode(spec);
  if (spec.symmetric) {
    const bool use_min = -xmin > xmax;
    f.p.scale = RoundScaleToHalf(T(2) * (use_min ? -xmin : xmax) / static_cast<T>(maxq));
    f.p.zero = 1 << (spec.bits - 1);
    f.branch = degenerate ? ClipBranch::kDegenerate
                          : (use_min ? ClipBranch::kSymmetricMin : ClipBranch::kSymmetricMax);
    return f;
  }
  f.p.scale = RoundScaleToHalf((xmax - xmin) / static_cast<T>(maxq));
  const T z_raw = -xmin / static_cast<T>(f.p.scale);
  const T z = RoundHalfEven(z_raw);
  f.p.zero = z <= static_cast<T>(maxq) ? static_cast<int32_t>(z) : maxq;
  f.z_offset = static_cast<T>(f.p.zero) - z_raw;
  f.branch = degenerate ? ClipBranch::kDegenerate : ClipBranch::kAsymmetric;
  if (f.p.zero == 0) {
    f.p.zero = 1;
    f.p.scale = RoundScaleToHalf(xmax / static_cast<T>(maxq - 1));
    if (!degenerate) f.branch = ClipBranch::kZeroFallback;
  }
  return f;
}

// The positions of group k: [k·g, min((k + 1)·g, d_in)).
QCAL_HOST_DEVICE inline int64_t GroupEnd(const ClipView& layout, int64_t k) {
  const int64_t end = (k + 1) * layout.group_size();
  return end < layout.d_in ? end : layout.d_in;
}

// FitClippedRange of group k of row o (`row` is that row of w, [d_in]), its range scanned here.
template <typename T>
QCAL_HOST_DEVICE inline ClipGroupFit<T> FitClippedGroup(const T* row, const ClipView& layout,
                                                        int64_t o, int64_t k, T gamma, T beta) {
  GroupRange<T> range;
  if (!layout.has_grid()) {
    for (int64_t pos = k * layout.group_size(); pos < GroupEnd(layout, k); ++pos) {
      AddToRange(row[layout.column(pos)], pos, range);
    }
  }
  return FitClippedRange(range, layout, o, k, gamma, beta);
}

// ŵ of group k of row o: out[j] for the group's columns j (`row` and `out` are row o of w and ŵ).
template <typename T>
QCAL_HOST_DEVICE inline void ClippedFakeQuantGroup(const T* row, const ClipView& layout, int64_t o,
                                                   int64_t k, T gamma, T beta, T* out) {
  const ClipGroupFit<T> f = FitClippedGroup(row, layout, o, k, gamma, beta);
  for (int64_t pos = k * layout.group_size(); pos < GroupEnd(layout, k); ++pos) {
    const int64_t j = layout.column(pos);
    out[j] = Dequantize<T>(QuantizeCode(row[j], f.p, layout.spec), f.p, layout.spec);
  }
}

// A group's STE sums: Σ ∂ŵ/∂s·dy (gs) and the clamped weights' direct ∂ŵ/∂xmin·dy (g_xmin).
template <typename T>
struct SteSums {
  T gs = 0, g_xmin = 0;
};

// Adds the STE terms of one weight w with output gradient dy to `sums`, and returns its direct
// gradient ∂ŵ/∂w·dy (dy inside the clamp range, 0 outside).
template <typename T>
QCAL_HOST_DEVICE inline T AddSteTerms(T w, T dy, const ClipGroupFit<T>& f, const QuantSpec& spec,
                                      SteSums<T>& sums) {
  const T maxq = static_cast<T>(MaxCode(spec));
  const T s = static_cast<T>(f.p.scale), z = static_cast<T>(f.p.zero);
  const T ratio = w / s;
  const T rounded = RoundHalfEven(ratio);
  const T code = rounded + z;
  if (code >= T(0) && code <= maxq) {
    sums.gs += dy * (rounded - ratio);
    return dy;
  }
  const T clamped = code < T(0) ? T(0) : maxq;
  if (f.branch == ClipBranch::kAsymmetric) {
    sums.gs += dy * (clamped - f.z_offset);
    sums.g_xmin += dy;
  } else {
    sums.gs += dy * (clamped - z);
  }
  return T(0);
}

// The pairwise tree over `lanes` partial sums (the order above), in place; returns the total.
template <typename T>
QCAL_HOST_DEVICE inline SteSums<T> SteTreeSum(SteSums<T>* partial, int lanes) {
  for (int h = lanes / 2; h >= 1; h /= 2) {
    for (int l = 0; l < h; ++l) {
      partial[l].gs += partial[l + h].gs;
      partial[l].g_xmin += partial[l + h].g_xmin;
    }
  }
  return partial[0];
}

// A group's clipping gradients from its summed STE terms: d_gamma and d_beta, and what the
// weights attaining the unclipped max and min (f.argmax, f.argmin) add to their direct gradients.
template <typename T>
struct SteGrads {
  T d_gamma = 0, d_beta = 0;
  T w_max = 0, w_min = 0;
};

template <typename T>
QCAL_HOST_DEVICE inline SteGrads<T> FinishSte(const ClipGroupFit<T>& f, const QuantSpec& spec,
                                              const SteSums<T>& sums) {
  const T maxq = static_cast<T>(MaxCode(spec));
  const T gs = sums.gs;
  T g_xmin = sums.g_xmin, g_xmax = 0;
  // The scale's dependence on the clipped range (the fp16 rounding passes gradients as is).
  switch (f.branch) {
    case ClipBranch::kDegenerate:
      g_xmin = 0;
      break;
    case ClipBranch::kAsymmetric:
      g_xmax += gs / maxq;
      g_xmin -= gs / maxq;
      break;
    case ClipBranch::kZeroFallback:
      g_xmax += gs / (maxq - T(1));
      break;
    case ClipBranch::kSymmetricMin:
      g_xmin -= T(2) * gs / maxq;
      break;
    case ClipBranch::kSymmetricMax:
      g_xmax += T(2) * gs / maxq;
      break;
  }
  SteGrads<T> r;
  r.d_gamma = g_xmax * f.xmax0 * f.cmax * (T(1) - f.cmax);
  r.d_beta = g_xmin * f.xmin0 * f.cmin * (T(1) - f.cmin);
  r.w_max = g_xmax * f.cmax;
  r.w_min = g_xmin * f.cmin;
  return r;
}

// The STE gradients of group k of row o for dŵ = dy (row o of d_w_hat): *d_gamma and *d_beta
// (the group's logits, overwritten) and, when dw (row o of d_w) is not null, dw[j] for the group's
// columns (overwritten; through the direct path and through the group's min and max). The sums
// run in the lanes' order above.
template <typename T>
QCAL_HOST_DEVICE inline void ClippedFakeQuantBackwardGroup(const T* row, const ClipView& layout,
                                                           int64_t o, int64_t k, T gamma, T beta,
                                                           const T* dy, T* d_gamma, T* d_beta,
                                                           T* dw) {
  const ClipGroupFit<T> f = FitClippedGroup(row, layout, o, k, gamma, beta);
  const int64_t first = k * layout.group_size();
  const int lanes = SteLanes(layout.group_size());
  SteSums<T> partial[32];
  for (int64_t pos = first; pos < GroupEnd(layout, k); ++pos) {
    const int64_t j = layout.column(pos);
    const T direct = AddSteTerms(row[j], dy[j], f, layout.spec, partial[(pos - first) % lanes]);
    if (dw) dw[j] = direct;
  }
  const SteGrads<T> r = FinishSte(f, layout.spec, SteTreeSum(partial, lanes));
  *d_gamma = r.d_gamma;
  *d_beta = r.d_beta;
  if (dw) {
    if (f.argmax >= 0) dw[f.argmax] += r.w_max;
    if (f.argmin >= 0) dw[f.argmin] += r.w_min;
  }
}

// The per-step scalars of AdamW in T (kernels/train_ops.h's AdamWCoefficientsOf computes them in
// double from the options and the step, rounded to T once).
template <typename T>
struct AdamWCoefficients {
  T decay = 1;  // 1 − lr·weight_decay
  T beta1 = 0, beta2 = 0;
  T one_minus_beta1 = 1, one_minus_beta2 = 1;
  T step_size = 0;   // lr / (1 − beta1^t)
  T bias2_sqrt = 1;  // sqrt(1 − beta2^t)
  T eps = 0;
};

// One element of AdamW, in T, in the order written:
//   p ← p·decay; m ← beta1·m + (1 − beta1)·g; v ← beta2·v + ((1 − beta2)·g)·g;
//   p ← p − (step_size·m) / (sqrt(v) / bias2_sqrt + eps).
template <typename T>
QCAL_HOST_DEVICE inline void AdamWElement(T& p, T g, T& m, T& v, const AdamWCoefficients<T>& c) {
  p *= c.decay;
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
  p -= c.step_size * m / (std::sqrt(v) / c.bias2_sqrt + c.eps);
}

}  // namespace qcal::kernels
