// Plain data of block retraining's backend ops (Backend::ClippedFakeQuant,
// ClippedFakeQuantBackward, AdamWStep; DESIGN section 3, "Retraining (ApiQ and saliency-aware)"):
// the clipping layout of one linear (host form ClipLayout, device form ClipTensors) and the AdamW
// options. The arithmetic is kernels/train_math.h; the CPU references kernels/cpu/train_ref.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/tensor.h"
#include "kernels/quant_grid.h"
#include "kernels/train_math.h"

namespace qcal::kernels {

// The shape of one linear's clipping logits, with its arrays on the host: [d_out, n_groups],
// group k of row o at o·n_groups + k, with g = EffectiveGroupSize(spec, d_in). `perm`, when not
// empty, is act-order's visiting order (perm[p] = the original column at position p, a
// permutation of 0..d_in − 1): groups are runs of g positions in that order, as GPTQ forms them.
struct ClipLayout {
  int64_t d_out = 0;
  int64_t d_in = 0;
  QuantSpec spec;
  std::vector<int32_t> perm;
  // The solver's grid, [n_groups, d_out] as QuantizedLinear stores it, or empty. With it the
  // unclipped range of group (o, k) is that grid's span, [−z·s, (maxq − z)·s] (symmetric:
  // ±maxq·s/2), instead of [min(min w, 0), max(max w, 0)]: unclipped (σ = 1) the fit then returns
  // exactly the solver's s and z, so Q(W̃) with GPTQ's pre-rounding values W̃ reproduces GPTQ's
  // codes (GPTQ fits a group on its values at the group's first column, which later columns'
  // errors change: W̃'s own min/max would not give GPTQ's grid). The range is then constant: no
  // gradient reaches w through it.
  std::vector<float> grid_scales;
  std::vector<int32_t> grid_zeros;
  bool has_grid() const { return !grid_scales.empty(); }

  int64_t group_size() const { return EffectiveGroupSize(spec, d_in); }
  int64_t n_groups() const { return NumGroups(spec, d_in); }
  int64_t num_logits() const { return d_out * n_groups(); }
  // OK for a valid uniform spec, a positive shape, a perm that is empty or a permutation of
  // 0..d_in − 1, and a grid that is empty or [n_groups, d_out] scales >= 2^-14 (finite) and zeros
  // in 0..maxq; otherwise InvalidArgument naming the value. (Defined in kernels/cpu/train_ref.cc.)
  absl::Status Validate() const;
  // The layout over this object's arrays (valid while it lives and is not modified).
  ClipView view() const {
    ClipView v;
    v.d_out = d_out;
    v.d_in = d_in;
    v.spec = spec;
    v.perm = perm.empty() ? nullptr : perm.data();
    v.grid_scales = grid_scales.empty() ? nullptr : grid_scales.data();
    v.grid_zeros = grid_zeros.empty() ? nullptr : grid_zeros.data();
    return v;
  }
};

// A ClipLayout whose arrays live on a backend's device (the backend ops' argument). The layout
// must be valid (ClipLayout::Validate of its host form): the ops check tensor shapes and dtypes,
// not the permutation's or the grid's values.
struct ClipTensors {
  int64_t d_out = 0;
  int64_t d_in = 0;
  QuantSpec spec;
  Tensor perm;         // I32 [d_in], or undefined (no act-order)
  Tensor grid_scales;  // F32 [n_groups, d_out], or undefined (no solver grid)
  Tensor grid_zeros;   // I32 [n_groups, d_out]; defined exactly when grid_scales is
  int64_t n_groups() const { return NumGroups(spec, d_in); }
  // The layout over the tensors' memory (pointers into the device's memory).
  ClipView view() const {
    ClipView v;
    v.d_out = d_out;
    v.d_in = d_in;
    v.spec = spec;
    v.perm = perm.defined() ? perm.data<int32_t>() : nullptr;
    v.grid_scales = grid_scales.defined() ? grid_scales.data<float>() : nullptr;
    v.grid_zeros = grid_zeros.defined() ? grid_zeros.data<int32_t>() : nullptr;
    return v;
  }
};

// OK when t is a tensor of `dtype` and exactly `shape` on `device`; otherwise InvalidArgument
// naming op and what. (The training ops' operand check; defined in kernels/cpu/train_ref.cc.)
absl::Status CheckTrainOperand(const Tensor& t, DType dtype, const Shape& shape, Device device,
                               const char* op, const char* what);
// The clipped fake quantizer's operands: a valid uniform spec and a positive shape, the layout's
// tensors undefined or I32 [d_in] (perm), F32 and I32 [n_groups, d_out] (the grid, both or
// neither), w F32 [d_out, d_in] and the logits F32 [d_out, n_groups], all on `device`; otherwise
// InvalidArgument naming op and the operand.
absl::Status CheckClipOperands(const ClipTensors& layout, const Tensor& w, const Tensor& gamma,
                               const Tensor& beta, Device device, const char* op);
// The STE backward's operands: CheckClipOperands, d_w_hat F32 like w, d_gamma and d_beta F32 like
// gamma, and d_w (when given) F32 like w, all on `device`.
absl::Status CheckClipBackwardOperands(const ClipTensors& layout, const Tensor& w,
                                       const Tensor& gamma, const Tensor& beta,
                                       const Tensor& d_w_hat, const Tensor& d_gamma,
                                       const Tensor& d_beta, const Tensor* d_w, Device device,
                                       const char* op);

// AdamW (Loshchilov and Hutter) as PyTorch's torch.optim.AdamW computes it (the optimizer of
// block retraining).
struct AdamWOptions {
  // Learning rate, > 0. Default: 5e-4 (retrain.lr_lora's default).
  double lr = 5.0e-4;
  // Decay rates of the first and second moment estimates, in [0, 1). Defaults: 0.9, 0.999.
  double beta1 = 0.9;
  double beta2 = 0.999;
  // Added to the square root of the second moment, > 0. Default: 1e-8.
  double eps = 1.0e-8;
  // Decoupled weight decay, >= 0. Default: 0.1 (retrain.weight_decay's default).
  double weight_decay = 0.1;
  // OK when every field is finite and in range; otherwise InvalidArgument naming the field.
  // (Defined in kernels/cpu/train_ref.cc.)
  absl::Status Validate() const;
};

// The scalars of AdamW step t (1-based), computed in double and rounded to T once: 1 − lr·wd,
// the betas and 1 − beta, lr / (1 − beta1^t), sqrt(1 − beta2^t), eps.
template <typename T>
AdamWCoefficients<T> AdamWCoefficientsOf(const AdamWOptions& o, int64_t t) {
  AdamWCoefficients<T> c;
  const double t_d = static_cast<double>(t);
  c.decay = static_cast<T>(1.0 - o.lr * o.weight_decay);
  c.beta1 = static_cast<T>(o.beta1);
  c.beta2 = static_cast<T>(o.beta2);
  c.one_minus_beta1 = static_cast<T>(1.0 - o.beta1);
  c.one_minus_beta2 = static_cast<T>(1.0 - o.beta2);
  c.step_size = static_cast<T>(o.lr / (1.0 - std::pow(o.beta1, t_d)));
  c.bias2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(o.beta2, t_d)));
  c.eps = static_cast<T>(o.eps);
  return c;
}

}  // namespace qcal::kernels
