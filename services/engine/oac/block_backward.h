// The backward pass of one transformer block and of the loss head (DESIGN section 2, step 4), on
// the model's backend, for the gradient pass (services/engine/oac/gradient_pass.h).
//
// BlockBackward recomputes the block's internals from its input (the same ops, in the same order,
// as Model::BlockForward, so the recomputed activations are bit-identical to the forward's), then
// back-propagates: residual MLP (down, silu·mul, gate/up, post-attention norm), residual attention
// (o, attention, RoPE, Qwen3's q/k norms, q/k/v, input norm). The full-precision model only: no
// low-rank branch or activation quantization (the gradient pass runs before any quantization).
//
// Oracles (tests/engine/oac): every op against central differences in float64
// (kernels/cpu/ref_grad.h), a whole block in float64 against central differences, and this
// float implementation against the float64 block.
#pragma once

#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor.h"
#include "services/engine/model.h"

namespace qcal::engine {

// Sees each linear's input x [rows, d_in] and output gradient dy = ∂ℓ/∂y [rows, d_out] while both
// are live, in backward order (down, up, gate, o, v, k, q). q, k and v (and gate, up) see the same
// x but their own dy. x_op and dy_op are the same values as GEMM operands: BF16 copies when the
// backend computes in bf16 (each converted once: q, k and v share one x_op, and the block's own
// input-gradient product reads dy_op), else x and dy themselves.
using GradTap = std::function<absl::Status(LinearKind kind, const Tensor& x, const Tensor& dy,
                                           const Tensor& x_op, const Tensor& dy_op)>;

// ∂ℓ/∂input for block b (resident) given input [batch·seq_len, hidden] (the block's input, not
// modified) and d_output = ∂ℓ/∂(block output) of the same shape. No KV cache (shape.offset 0).
absl::StatusOr<Tensor> BlockBackward(Model& model, int b, const Tensor& input,
                                     const SeqShape& shape, const Tensor& d_output,
                                     const GradTap& tap = nullptr);

struct HeadGradient {
  double loss = 0;  // Σ over rows with a target of the next-token NLL (double)
  Tensor d_hidden;  // ∂loss/∂hidden [rows, hidden] on the backend
};
// The loss head on the last block's output `hidden` [rows, hidden]: final RMSNorm, lm_head, the
// NLL of targets[r] (−1: no prediction at row r), and its gradient. Rows are processed in slices
// so that the logits of a slice stay under a bounded size (vocab × rows × 4 bytes).
absl::StatusOr<HeadGradient> LossBackward(Model& model, const Tensor& hidden,
                                          const std::vector<int32_t>& targets);

}  // namespace qcal::engine
