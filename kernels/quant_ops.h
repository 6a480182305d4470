// Plain data of the backends' weight-quantization ops (Backend::GptqFactorize, GptqSolve,
// QuantizeRtn, OutputError): the solve options, the factored Hessian that the consumers of one
// linear input share, and a quantized weight whose tensors stay on the backend's device.
//
// The algorithm these ops run is the CPU reference's, kernels/cpu/quant_ref.h (dead and outlier
// columns, act-order, damping with retries, U = upper Cholesky factor of H^-1, lazy blocks cut
// before a group that would straddle a block end); the grid rules are quant_grid.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/tensor.h"
#include "kernels/quant_grid.h"

namespace qcal::kernels {

// OK when bits is 2..8, group_size is -1 or >= 1, the grid is known and the balanced grid has
// bits 2; otherwise InvalidArgument naming the recipe key. Shared by the CPU quantizers and the
// backend ops.
inline absl::Status ValidateQuantSpec(const QuantSpec& spec) {
  if (spec.bits < 2 || spec.bits > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights.bits must be in 2..8, got ", spec.bits));
  }
  if (spec.group_size == 0 || spec.group_size < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights.group_size must be -1 or >= 1, got ", spec.group_size));
  }
  if (spec.grid != GridKind::kUniform && spec.grid != GridKind::kCuberoot &&
      spec.grid != GridKind::kBalanced) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights.grid has unknown value ", static_cast<int>(spec.grid)));
  }
  if (spec.grid == GridKind::kBalanced && spec.bits != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights.grid balanced requires weights.bits 2, got ", spec.bits));
  }
  return absl::OkStatus();
}

// The GPTQ options of one solve; the same keys, meanings and defaults as engine::GptqOptions.
struct GptqSolveOptions {
  // Damping lambda: H += lambda * mean(diag H) * I; retried with 10x and 100x when the
  // factorization fails (not retried when 0). >= 0. Default: 0.01.
  double damp = 0.01;
  // Lazy-batch width in columns, >= 1. Default: 128.
  int block_size = 128;
  // Visit columns by decreasing diag H (stable sort). Default: false.
  bool act_order = false;
  // Input columns taken out like dead columns (H row/column -> identity's, W column -> 0). Each
  // in [0, n); duplicates allowed. Default: none.
  std::vector<int32_t> outlier_columns;
  // Also return the Cholesky factor of the damped Hessian as a whitening factor for error
  // reconstruction (GptqFactor::whitening), where it is one: no dead or outlier columns and the
  // first damping succeeded, so that the factored matrix is exactly P(H + δI)Pᵀ with
  // CholeskyWhitening's δ = damp · mean(diag H). Backends that do not reconstruct on the device
  // leave it undefined. Default: false.
  bool keep_whitening = false;
};

// The factored Hessian of one linear input: everything of the solve that does not depend on W.
struct GptqFactor {
  int64_t n = 0;
  // F32 [n, n] on the device: the upper triangle (row-major, visiting order) is U with
  // UᵀU = (damped H in visiting order)⁻¹; the strict lower triangle is 0.
  Tensor u;
  // Visiting order: perm[p] = the original column visited at position p.
  std::vector<int32_t> perm;
  // Whether perm is act-order's (solves then record it, as QuantizedLinear::perm does).
  bool act_order = false;
  // Per original column: 1 when dead (H_jj == 0) or an outlier column.
  std::vector<uint8_t> removed;
  int dead_columns = 0;       // columns with H_jj == 0
  int outlier_columns = 0;    // distinct outlier columns that were not also dead
  double damp_used = 0;       // lambda of the successful factorization
  int cholesky_failures = 0;  // failed factorizations before the success (0..2)
  // Only when asked (GptqSolveOptions::keep_whitening) and where it applies, else undefined and
  // empty: F32 [n, n] on the device, row-major lower triangular (strict upper triangle 0), the
  // Cholesky factor S of the damped Hessian with its rows and columns in `whitening_order`:
  // S·Sᵀ = (H + δI)[order, order], δ = whitening_delta. Error reconstruction takes it with that
  // order (LowRankOptions::whitening_order) in place of CholeskyWhitening's factor: every square
  // root of H + δI gives the same whitened errors and factors (OPERATIONS.md, "Which whitening
  // factor the GPU uses").
  Tensor whitening;
  std::vector<int32_t> whitening_order;
  double whitening_delta = 0;
};

// Steps 1-2 of every backend's GptqFactorize, on the host: marks dead columns (H_jj == 0) and the
// outlier columns in f.removed (with their counts), sets f.perm to the visiting order (act-order:
// decreasing effective diagonal, stable), and returns the mean of the effective diagonal (a
// removed column counts as 1) in double, which damping scales. `diag(j)` is H_jj in the
// backend's precision. InvalidArgument for an outlier column outside [0, n).
template <typename DiagFn>
absl::StatusOr<double> PlanGptqColumns(int64_t n, DiagFn diag, const GptqSolveOptions& options,
                                       GptqFactor& f) {
  using T = decltype(diag(int64_t{0}));
  f.removed.assign(static_cast<size_t>(n), 0);
  for (int64_t j = 0; j < n; ++j) {
    if (diag(j) == T(0)) {
      f.removed[j] = 1;
      ++f.dead_columns;
    }
  }
  for (int32_t c : options.outlier_columns) {
    if (c < 0 || c >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("outlier column ", c, " is out of range [0, ", n, ")"));
    }
    if (!f.removed[c]) {
      f.removed[c] = 1;
      ++f.outlier_columns;
    }
  }
  auto effective = [&](int64_t j) { return f.removed[j] ? T(1) : diag(j); };
  f.perm.resize(static_cast<size_t>(n));
  std::iota(f.perm.begin(), f.perm.end(), 0);
  if (options.act_order) {
    std::stable_sort(f.perm.begin(), f.perm.end(),
                     [&](int32_t a, int32_t b) { return effective(a) > effective(b); });
  }
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(effective(j));
  return sum / static_cast<double>(n);
}

// A quantized weight W [d_out, d_in] whose tensors live on the backend's device.
struct QuantizedTensors {
  int64_t d_out = 0;
  int64_t d_in = 0;
  int64_t group_size = 0;      // effective g (kernels::EffectiveGroupSize)
  int64_t n_groups = 0;        // ceil(d_in / g)
  Tensor codes;                // U8 [d_out, d_in]: codes 0..2^bits-1, original column order
  Tensor scales;               // F32 [n_groups, d_out]: fp16 values >= 2^-14
  Tensor zeros;                // I32 [n_groups, d_out]
  Tensor dequantized;          // F32 [d_out, d_in]: s (q - z) through g_idx, as QuantizedLinear
  std::vector<int32_t> g_idx;  // [d_in] (host): group of each original column
  std::vector<int32_t> perm;   // act-order permutation (host); empty without act-order
  // F32 [d_out, d_in] on the device, original column order, only when the solve was asked to
  // record it (GptqSolve's record_pre_round): W̃, the value each weight had when its column was
  // rounded (GPTQ's updated weight; removed columns 0). Rounding W̃ on the solve's own scales and
  // zeros gives its codes exactly (QuantizeCode(W̃_ij) = codes_ij): retraining's frozen base
  // (DESIGN section 3, "Retraining"). Undefined otherwise.
  Tensor pre_round;
};

// Error reconstruction on the device (DESIGN section 3; the reference is
// services/engine/aser/error_reconstruction.h): a rank-r factorization L_A·L_B of E = w − w_hat in
// the metric of a whitening factor S, from the SVD of E·S.
enum class SvdMethod {
  kFull,        // the full SVD of E·S (cuSOLVER gesvd/gesvdj): the reference on the device
  kRandomized,  // a randomized SVD of E·S (range finder with power iterations): the fast path
};

struct LowRankOptions {
  // r >= 1, clamped to min(d_out, d_in). No default: 0 is invalid.
  int rank = 0;
  SvdMethod svd = SvdMethod::kRandomized;
  // Randomized only: extra sketch columns p (the sketch has min(r + p, min(d_out, d_in)) columns),
  // >= 0. Default: 16.
  int oversample = 16;
  // Randomized only: power (subspace) iterations q, >= 0. Default: 2.
  int power_iterations = 2;
  // Randomized only: seed of the Gaussian test matrix (results are deterministic for a given
  // seed, device kind and library). Default: 0.
  uint64_t seed = 0;
  // A Cholesky whitening factor only: when not empty, S factors the Gram matrix with its columns
  // in this order (S·Sᵀ = (G + δI)[order, order], as GptqFactor::whitening), a permutation of
  // [0, d_in). E's columns are taken in that order and L_B's put back, so the result is that of
  // the factor in natural order. Default: empty (S·Sᵀ = G + δI).
  std::vector<int32_t> whitening_order;
  // Randomized with a Cholesky factor only: when >= 0, ‖E·Xᵀ‖_F² = tr(E·G·Eᵀ) as the caller
  // measured it (Backend::OutputError squared) and whitening_delta = the δ of S·Sᵀ = G + δI. Then
  // ‖E·S‖_F² = gram_error_sq + δ‖E‖_F², and the range finder applies S by thin products
  // (Sᵀ·(Eᵀ·Z), E·(S·Y)) instead of forming E·S: error_before then has OutputError's accuracy.
  // Default: -1 (E·S is formed).
  double gram_error_sq = -1;
  double whitening_delta = 0;
};

// A fitted correction whose factors live on the backend's device.
struct LowRankTensors {
  int64_t d_out = 0;
  int64_t d_in = 0;
  int64_t rank = 0;
  Tensor a;  // F32 [d_out, rank]: L_A = U_r Σ_r (the PEFT adapter's lora_B)
  Tensor b;  // F32 [rank, d_in]: L_B = V_rᵀ S⁻¹ (the PEFT adapter's lora_A)
  // The leading singular values of E·S (host, descending): all min(d_out, d_in) with kFull, the
  // `rank` computed ones with kRandomized.
  std::vector<double> singular_values;
  // ‖E·S‖_F, and sqrt(max(0, ‖E·S‖_F² − Σ_{i<=r} σ_i²)): the whitened error before and after.
  double error_before = 0;
  double error_after = 0;
};

// Per-channel statistics of one chunk of a linear's input (the smoothing statistics of DESIGN
// section 3), on the host.
struct ChannelStats {
  std::vector<float> max_abs;   // [width]: max |x_tj| over the counted rows (0 if none)
  std::vector<double> sum_abs;  // [width]: Σ |x_tj| over the counted rows
  int64_t tokens = 0;           // rows counted: those that are not a sample's first (BOS)
  int64_t skipped = 0;          // BOS rows skipped
  // The first column holding a NaN or an infinity in any row (BOS rows included); -1 if none.
  int64_t first_bad_column = -1;
};

}  // namespace qcal::kernels
