// The CPU references of block retraining's ops (DESIGN section 3, "Retraining (ApiQ and
// saliency-aware)"): the clipped fake quantizer's forward and STE backward (kernels/train_math.h
// for the rules), the export's re-rounding of the trained clipping, AdamW, and the trainer's two
// losses with their gradients. Templated where the float64 oracles (tests/engine/retrain) need
// T = double; T = float is what the CPU backend runs (Backend::ClippedFakeQuant, ...) and the
// specification the CUDA kernels are tested against. Rows (elements for AdamW) run in parallel,
// each computed start to finish by one thread: results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/cpu/quant_ref.h"
#include "kernels/train_math.h"
#include "kernels/train_ops.h"

namespace qcal::kernels::ref {

// w_hat [d_out, d_in] = the clipped fake-quant of w [d_out, d_in] (row-major) with the logits
// gamma (clip of the max) and beta (clip of the min), each [d_out, n_groups]: ClippedFakeQuantGroup
// for every row and group. The layout must be valid (ClipLayout::Validate) and w finite.
template <typename T>
void ClippedFakeQuant(const T* w, const ClipView& layout, const T* gamma, const T* beta, T* w_hat);

// The STE gradients for dŵ = d_w_hat [d_out, d_in]: d_gamma and d_beta [d_out, n_groups]
// (overwritten) and, when d_w is not null, dw [d_out, d_in] (overwritten; through the direct path
// and through the group's min and max): ClippedFakeQuantBackwardGroup for every row and group.
template <typename T>
void ClippedFakeQuantBackward(const T* w, const ClipView& layout, const T* gamma, const T* beta,
                              const T* d_w_hat, T* d_gamma, T* d_beta, T* d_w);

// The export's re-rounding (DESIGN section 3): w quantized on the clipped grid (scales and zeros
// fitted on the clipped range), in float. Its Dequantized() equals ClippedFakeQuant<float> bit for
// bit. Errors (InvalidArgument): an invalid layout, a non-finite weight or logit (naming row and
// column), a group whose range overflows an fp16 scale.
absl::StatusOr<QuantizedLinear> QuantizeClipped(const float* w, const ClipLayout& layout,
                                                const float* gamma, const float* beta);

// AdamW step t (1-based) for n parameters p with gradients g and moments m, v (zero before step
// 1): AdamWElement with AdamWCoefficientsOf<T>(options, t) for every element.
template <typename T>
void AdamWStep(T* p, const T* g, T* m, T* v, int64_t n, int64_t t, const AdamWOptions& options);

// Σ_e (y_e − t_e)² over n elements, each difference and square in double, summed in element
// order; when dy is not null, dy_e = scale·(y_e − t_e) in float (overwritten; may alias y or t).
double SquaredError(const float* y, const float* t, int64_t n, float scale, float* dy);

// total + Σ_e F_e·d_e² with d_e = x_e − r_e in float, for rows × width elements: F_e·d_e·d_e in
// double, summed per row in element order, the rows' sums added to `total` one by one in row
// order. Also g = (scale·F_e)·d_e in float is added to g1_e and to g2_e (either may be null).
// f null means F = 1.
double WeightedSquaredError(const float* x, const float* r, const float* f, int64_t rows,
                            int64_t width, float scale, float* g1, float* g2, double total);

}  // namespace qcal::kernels::ref
