// The weight quantizer with learnable clipping that block retraining trains (DESIGN section 3,
// "Retraining"): the fake-quant forward, its straight-through-estimator (STE) backward, and the
// re-rounding of the trained clipping into an ordinary quantized linear for export.
//
// Engine-level host code, templated on the element type: T = float is what the trainer runs (and
// the specification a future CUDA kernel is tested against, like the kernels/cpu `_ref` twins);
// T = double is what the float64 oracles run (tests/engine/retrain).
//
// Forward, per output row o and group k (the columns of the group: k·g .. k·g + g − 1, or with
// act-order perm[k·g] .. perm[k·g + g − 1]), with clip_max = σ(γ[o,k]) and clip_min = σ(β[o,k]):
// the group is fitted exactly as kernels/quant_grid.h's FitGroup does with those clip factors
// (xmin = min(min w, 0)·clip_min, xmax = max(max w, 0)·clip_max — or the solver's grid span
// clipped, see ClipLayout::grid_scales — the fp16-rounded scale, the
// zero point from the rounded scale, the z = 0 fallback, the symmetric rule), and
// ŵ = s·(clamp(round(w/s) + z, 0, maxq) − z). For T = float, no grid and the same clip factors the
// codes, scales and zeros are FitGroup<float>/QuantizeCode<float>'s bit for bit, so the export's
// re-rounding (QuantizeClipped) reproduces the trained forward exactly.
//
// STE backward. round() of w/s and of the zero point, and the fp16 rounding of the scale, pass
// gradients as the identity; clamp passes them where 0 <= round(w/s) + z <= maxq (bounds
// included, as PyTorch's clamp) and blocks them elsewhere; min and max pass them to the weight
// that attains them. Equivalently the backward is the exact derivative of the surrogate in which
// every rounding offset (round(x) − x), the clamp mask and the branch taken (degenerate range,
// z = 0 fallback, which of −xmin and xmax is larger when symmetric) are frozen at the current
// point — what the oracles differentiate numerically. Inside the clamp range the surrogate is
// ŵ = w + s·r (r = round(w/s) − w/s), so ∂ŵ/∂s = r; a clamped weight is ŵ = s·C + xmin − s·r_z
// (C its clamped code, r_z the zero point's offset), so ∂ŵ/∂s = C − r_z and ∂ŵ/∂xmin = 1. A group
// whose clipped range is empty (all weights zero) has constant parameters: no clipping gradient.
//
// Only the uniform grid (weights.grid uniform; the recipe enforces it with a retrain section).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/quant_ref.h"
#include "kernels/quant_grid.h"

namespace qcal::engine {

// The shape of one linear's clipping logits: [d_out, n_groups], group k of row o at
// o·n_groups + k, with g = EffectiveGroupSize(spec, d_in). `perm`, when not empty, is act-order's
// visiting order (perm[p] = the original column at position p, a permutation of 0..d_in − 1):
// groups are runs of g positions in that order, as GPTQ forms them.
struct ClipLayout {
  int64_t d_out = 0;
  int64_t d_in = 0;
  kernels::QuantSpec spec;
  std::vector<int32_t> perm;
  // The solver's grid, [n_groups, d_out] as kernels::QuantizedLinear stores it, or empty. With it
  // the unclipped range of group (o, k) is that grid's span, [−z·s, (maxq − z)·s] (symmetric:
  // ±maxq·s/2), instead of [min(min w, 0), max(max w, 0)]: unclipped (σ = 1) the fit then returns
  // exactly the solver's s and z, so Q(W̃) with GPTQ's pre-rounding values W̃ reproduces GPTQ's
  // codes (GPTQ fits a group on its values at the group's first column, which later columns'
  // errors change: W̃'s own min/max would not give GPTQ's grid). The range is then constant: no
  // gradient reaches w through it.
  std::vector<float> grid_scales;
  std::vector<int32_t> grid_zeros;
  bool has_grid() const { return !grid_scales.empty(); }

  int64_t group_size() const { return kernels::EffectiveGroupSize(spec, d_in); }
  int64_t n_groups() const { return kernels::NumGroups(spec, d_in); }
  int64_t num_logits() const { return d_out * n_groups(); }
  // OK for a valid uniform spec, a positive shape, a perm that is empty or a permutation of
  // 0..d_in − 1, and a grid that is empty or [n_groups, d_out] scales >= 2^-14 (finite) and zeros
  // in 0..maxq; otherwise InvalidArgument naming the value.
  absl::Status Validate() const;
};

// σ(x) = 1 / (1 + e^−x) in T.
template <typename T>
T Sigmoid(T x);

// w_hat [d_out, d_in] = the clipped fake-quant of w [d_out, d_in] (row-major) with the logits
// gamma (clip of the max) and beta (clip of the min), each [d_out, n_groups]. The layout must be
// valid (Validate) and w finite.
template <typename T>
void ClippedFakeQuant(const T* w, const ClipLayout& layout, const T* gamma, const T* beta,
                      T* w_hat);

// The STE gradients for dŵ = d_w_hat [d_out, d_in]: d_gamma and d_beta [d_out, n_groups]
// (overwritten) and, when d_w is not null, dw [d_out, d_in] (overwritten; through the direct path
// and through the group's min and max).
template <typename T>
void ClippedFakeQuantBackward(const T* w, const ClipLayout& layout, const T* gamma, const T* beta,
                              const T* d_w_hat, T* d_gamma, T* d_beta, T* d_w);

// The export's re-rounding (DESIGN section 3): w quantized on the clipped grid (scales and zeros
// fitted on the clipped range), in float. Its Dequantized() equals ClippedFakeQuant<float> bit for
// bit. Errors (InvalidArgument): an invalid layout, a non-finite weight or logit (naming row and
// column), a group whose range overflows an fp16 scale.
absl::StatusOr<kernels::QuantizedLinear> QuantizeClipped(const float* w, const ClipLayout& layout,
                                                         const float* gamma, const float* beta);

}  // namespace qcal::engine
