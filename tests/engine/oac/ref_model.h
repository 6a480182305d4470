// A float64 reference of the model's forward and backward passes, for the gradient pass's
// oracles: the same architecture as engine::Model (RMSNorm, q/k/v with optional biases, Qwen3's
// per-head q/k norms, RoPE with scaling, causal GQA attention with an optional sliding window,
// o_proj residual, SiLU-gated MLP residual, final norm, lm_head, next-token NLL), composed from the
// templated scalar references of kernels/cpu/ref_grad.h at T = double. It is independent of the
// backends and of services/engine/oac: the backward is checked against central differences of the
// forward, and the engine's float implementation against the backward.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "common/hf_config.h"
#include "services/engine/model.h"

namespace qcal::testing {

// One linear's input x [rows, d_in] and output gradient dy [rows, d_out] from RefModel's backward.
struct RefLinearGrad {
  std::vector<double> x, dy;
};

class RefModel {
 public:
  // Copies the weights of `model` (every block resident, host tensors) into float64.
  explicit RefModel(const engine::Model& model);

  const ModelConfig& config() const { return c_; }
  // Linear `kind` of block b, row-major [d_out, d_in]: the tests perturb it in place.
  std::vector<double>& weight(int b, engine::LinearKind kind) {
    return blocks_[b].w[static_cast<int>(kind)];
  }
  int64_t d_out(engine::LinearKind kind) const;
  int64_t d_in(engine::LinearKind kind) const;

  // Block b on x [batch·seq_len, hidden]: the block output.
  std::vector<double> BlockForward(int b, const std::vector<double>& x, int batch,
                                   int seq_len) const;
  // ∂<d_out, BlockForward(x)>/∂x, and every linear's (x, dy) (LinearKind order) when `grads` is
  // set.
  std::vector<double> BlockBackward(
      int b, const std::vector<double>& x, const std::vector<double>& d_output, int batch,
      int seq_len, std::array<RefLinearGrad, engine::kNumLinears>* grads = nullptr) const;

  // Every linear's (x, dy) of every block (block-major, LinearKind order) for the gradient of the
  // summed next-token NLL of ids [batch·seq_len] through the whole model.
  std::vector<std::array<RefLinearGrad, engine::kNumLinears>> LossGrads(
      const std::vector<int32_t>& ids, int batch, int seq_len) const;

  // The summed next-token NLL of each of the `batch` samples of ids [batch·seq_len] (position t
  // predicts token t + 1 of its sample).
  std::vector<double> SampleLosses(const std::vector<int32_t>& ids, int batch, int seq_len) const;

 private:
  struct Block {
    std::vector<double> input_norm, post_attention_norm, q_norm, k_norm;
    std::array<std::vector<double>, engine::kNumLinears> w, bias;  // bias empty: none
  };
  // Everything the backward needs from the forward of one block.
  struct Trace {
    std::vector<double> x, xn, q_pre, k_pre, q, k, v, attn, h1, h1n, gate, up, mlp, out;
  };
  // The next-token targets of ids: position t predicts token t + 1 of its sample, the last -1.
  static std::vector<int32_t> Targets(const std::vector<int32_t>& ids, int seq_len);
  Trace Forward(int b, const std::vector<double>& x, int batch, int seq_len) const;
  // y = x·Wᵀ (+ bias) for linear `kind` of block b.
  std::vector<double> Project(int b, engine::LinearKind kind, const std::vector<double>& x,
                              int64_t rows) const;

  ModelConfig c_;
  std::vector<Block> blocks_;
  std::vector<double> embed_, final_norm_, lm_head_;
};

}  // namespace qcal::testing
