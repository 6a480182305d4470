// Activation smoothing (DESIGN.md section 3, "Smoothing"): per-channel scales m that move
// activation outliers of a linear input into the consumers' weights, (X·diag(m)⁻¹)(W·diag(m))ᵀ =
// XWᵀ, and their exact folding into a block's weights, so that the full-precision block computes
// the same function.
//
// Scales. For an input with channels j, a_j = max|X_tj| (ActivationStats, BOS excluded) and w_j =
// the maximum of |W[:, j]| over the stacked rows of every consumer; both are clamped to >=
// kSmoothingFloor before use. m_j = a_j^α / w_j^(1−α), computed in double and rounded to fp32.
//   SmoothQuant: every channel gets its m_j.
//   ASER: only the f = outlier_channels channels with the largest a_j·w_j get m_j (ties: the lower
//     channel first); every other channel keeps m_j = 1. Those f channels are "extracted": the
//     caller zeroes them in the part of W' that is quantized and error reconstruction restores them
//     (see error_reconstruction.h).
//   o_proj input (GQA): o channel c = h·d_h + i is a copy of v_proj output row
//     k(c) = kv(h)·d_h + i, kv(h) = h / n_rep. Scales are tied per v row: m̃_k from ã_k = max a and
//     w̃_k = max w over the n_rep tied channels, and m_c = m̃_k(c). ASER ranks the v rows by the max
//     of a_c·w_c over their tied channels, takes the top ⌊f / n_rep⌋, and extracts all their tied
//     channels (at most f).
//
// Folding (exact in real arithmetic; in fp32 each folded value is one correctly rounded product or
// quotient, two for up_proj weights under both the gate/up and the down fold):
//   q/k/v input:    input_layernorm /= m;          q, k, v columns *= m.
//   o input:        v_proj rows (and bias) /= m̃;   o_proj columns *= m (= m̃ of their v row).
//   gate/up input:  post_attention_layernorm /= m; gate, up columns *= m.
//   down input:     up_proj rows (and bias) /= m;  down_proj columns *= m.
// The down fold is exact because silu(g)·(u/m) = (silu(g)·u)/m; the o fold because attention output
// is linear in V. Compute all four inputs' scales from the same unsmoothed block (its weights and
// first full-precision statistics) and then fold: the o fold changes v rows, which the q/k/v weight
// maxima read, and the down fold changes up rows, which the gate/up maxima read.
// Nothing is folded into q_proj or k_proj rows, nor into Qwen3's q_norm / k_norm: those norms act
// on the q/k_proj outputs, which the q/k/v-input fold leaves unchanged (only the product X·Wᵀ is
// re-associated), so the fold stays exact with them; the attention variants (rope scaling, sliding
// windows, q/k biases) sit on the same unchanged outputs.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "common/tensor.h"
#include "kernels/backend.h"
#include "services/engine/aser/activation_stats.h"
#include "services/engine/model.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// a_j and w_j are clamped to at least this before the scale formula and the ASER ranking.
inline constexpr double kSmoothingFloor = 1e-5;

struct SmoothingOptions {
  // Which channels are scaled (see the file comment): kSmoothQuant or kAser. Default: kSmoothQuant.
  SmoothingMethod method = SmoothingMethod::kSmoothQuant;
  // Migration strength α, in [0, 1]. Default: 0.5.
  double alpha = 0.5;
  // ASER only: f, the channels smoothed and extracted per input, >= 0 and at most the input's
  // width. Ignored by SmoothQuant. Default: 32.
  int outlier_channels = 32;

  // InvalidArgument naming the key (smoothing.alpha, smoothing.outlier_channels) when out of range.
  absl::Status Validate() const;
};

// The smoothing of one linear input.
struct SmoothingScales {
  // [width] m_j per input channel of the consumers (1 where untouched). Empty: no smoothing.
  std::vector<float> m;
  // o_proj input only: [kv_dim] m̃_k per v_proj output row (1 where untouched); empty otherwise.
  std::vector<float> v_rows;
  // ASER only: the extracted consumer input columns, ascending; empty for SmoothQuant.
  std::vector<int32_t> outliers;
};

// w_j = max over every row of every consumer of |W[o, j]|. `consumers` are host fp32 matrices
// [d_out_c, width] with the same width. Errors: no consumer, a width mismatch, a non-host or
// non-fp32 tensor, a non-finite weight.
absl::StatusOr<std::vector<float>> WeightColumnMax(const std::vector<Tensor>& consumers);

// Scales of an input read by `consumers` (q/k/v, gate/up, down), from act_max = a [width].
// Errors: invalid options, act_max size != width, non-finite or negative a, f > width (ASER),
// the errors of WeightColumnMax.
absl::StatusOr<SmoothingScales> ComputeSmoothingScales(const std::vector<float>& act_max,
                                                       const std::vector<Tensor>& consumers,
                                                       const SmoothingOptions& options);

// The same from the consumers' column maxima w_max = WeightColumnMax(consumers) (computed
// wherever the weights are, e.g. Backend::ChannelAbsStats on a device). Errors: as above, with a
// w_max entry that is negative or not finite.
absl::StatusOr<SmoothingScales> ComputeSmoothingScalesFromMax(const std::vector<float>& act_max,
                                                              const std::vector<float>& w_max,
                                                              const SmoothingOptions& options);

// Scales of the o_proj input with GQA tying: act_max [num_heads·head_dim], o_proj a host fp32
// [d_out, num_heads·head_dim] matrix, head_dim = width / num_heads. Fills m, v_rows (kv_dim =
// num_kv_heads·head_dim) and, for ASER, the extracted o_proj columns. Errors: as
// ComputeSmoothingScales, plus num_heads not a positive multiple of num_kv_heads or not dividing
// the width.
absl::StatusOr<SmoothingScales> ComputeOProjSmoothingScales(const std::vector<float>& act_max,
                                                            const Tensor& o_proj, int num_heads,
                                                            int num_kv_heads,
                                                            const SmoothingOptions& options);

// The same from o_proj's column maxima w_max.
absl::StatusOr<SmoothingScales> ComputeOProjSmoothingScalesFromMax(
    const std::vector<float>& act_max, const std::vector<float>& w_max, int num_heads,
    int num_kv_heads, const SmoothingOptions& options);

// The smoothing of a whole block, indexed by LinearInput.
struct BlockSmoothing {
  std::array<SmoothingScales, kNumLinearInputs> inputs;
  SmoothingScales& at(LinearInput in) { return inputs[static_cast<int>(in)]; }
  const SmoothingScales& at(LinearInput in) const { return inputs[static_cast<int>(in)]; }
};

// Scales of every input of `block` (weights on `backend`, copied to the host to read) whose entry
// of `stats` is non-null; the others stay empty (not smoothed). stats are the block's
// full-precision statistics, indexed by LinearInput. Errors: a statistics width that does not match
// its consumers, and those of the Compute* functions (annotated with the input's name).
absl::StatusOr<BlockSmoothing> ComputeBlockSmoothing(
    kernels::Backend& backend, const BlockWeights& block, const ModelConfig& config,
    const std::array<const ActivationStats*, kNumLinearInputs>& stats,
    const SmoothingOptions& options);

// Whether the smoothing work runs on the backend's device: its statistics (ChannelAbsStats), the
// weights' checks and column maxima, the fold (ScaleColumns, DivideRows) and ASER's column
// zeroing. Otherwise weights and activations are copied to the host for it. A host backend keeps
// the host path even with the ops (the CPU backend has them): the results would be the same bits,
// and the host path's errors name the row and column of a non-finite value.
bool SmoothingOnDevice(kernels::Backend& backend);

// Folds every non-empty input of `smoothing` into `block` (see the file comment), replacing the
// affected tensors by new ones on `backend`. All checks run before any tensor is replaced, so on an
// error the block is unchanged. Errors (InvalidArgument): a scale vector whose size does not match
// the weights, a scale that is not finite and > 0, v_rows missing for a smoothed o input, an o
// input scale m_c that differs from v_rows of its v row (untied scales cannot be folded).
absl::Status FoldBlockSmoothing(kernels::Backend& backend, const ModelConfig& config,
                                const BlockSmoothing& smoothing, BlockWeights& block);

}  // namespace qcal::engine
