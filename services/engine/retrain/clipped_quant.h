// The weight quantizer with learnable clipping that block retraining trains (DESIGN section 3,
// "Retraining"): the fake-quant forward, its straight-through-estimator (STE) backward, and the
// re-rounding of the trained clipping into an ordinary quantized linear for export.
//
// Engine-level names for the kernels' definitions: the layout is kernels::ClipLayout
// (kernels/train_ops.h), the rules of the forward and the STE backward are kernels/train_math.h's,
// and the host implementations are the CPU references kernels/cpu/train_ref.h (T = float is what
// the CPU backend's ops run and the CUDA kernels are tested against; T = double is what the
// float64 oracles of tests/engine/retrain run). The trainer itself calls the backend ops
// (Backend::ClippedFakeQuant, ClippedFakeQuantBackward).
//
// Only the uniform grid (weights.grid uniform; the recipe enforces it with a retrain section).
#pragma once

#include "kernels/cpu/train_ref.h"
#include "kernels/train_math.h"
#include "kernels/train_ops.h"

namespace qcal::engine {

using ClipLayout = kernels::ClipLayout;
// σ(x) = 1 / (1 + e^−x) in T (float: kernels::ExpF32, the same bits on every backend).
using kernels::Sigmoid;
// The export's re-rounding: its Dequantized() equals ClippedFakeQuant<float> bit for bit.
using kernels::ref::QuantizeClipped;

// w_hat [d_out, d_in] = the clipped fake-quant of w (kernels::ref::ClippedFakeQuant). The layout
// must be valid (Validate) and w finite.
template <typename T>
void ClippedFakeQuant(const T* w, const ClipLayout& layout, const T* gamma, const T* beta,
                      T* w_hat) {
  kernels::ref::ClippedFakeQuant(w, layout.view(), gamma, beta, w_hat);
}

// The STE gradients (kernels::ref::ClippedFakeQuantBackward): d_gamma, d_beta [d_out, n_groups]
// and, when d_w is not null, dw [d_out, d_in], all overwritten.
template <typename T>
void ClippedFakeQuantBackward(const T* w, const ClipLayout& layout, const T* gamma, const T* beta,
                              const T* d_w_hat, T* d_gamma, T* d_beta, T* d_w) {
  kernels::ref::ClippedFakeQuantBackward(w, layout.view(), gamma, beta, d_w_hat, d_gamma, d_beta,
                                         d_w);
}

}  // namespace qcal::engine
