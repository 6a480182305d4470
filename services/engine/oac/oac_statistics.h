// Output-adaptive statistics of one linear (DESIGN section 3, "Output-adaptive calibration"): the
// Hessian H_oac = Σ_n X_nᵀ(Γ_nΓ_nᵀ)X_n (sample-wise) or H_tok = Σ_t ‖g_t‖²·x_t x_tᵀ (per token),
// and optionally the diagonal Fisher F = Σ_n G_n ⊙ G_n (G_n = Γ_nᵀX_n), where X_n [L, d_in] are the
// linear's inputs and Γ_n = ∂ℓ_n/∂Y_n [L, d_out] its output gradients for calibration sample n in
// the full-precision model. Sums are kept unnormalised: GPTQ's damping is relative to the mean
// diagonal, so the ×2/n of DESIGN section 3 changes no code (the report records the kind).
//
// The per-sample accumulations are backend ops composed here (Gemm, GemmLower, MirrorLower,
// AccumulateGram, ScaleRowsByNorm, AccumulateSquares), so they run on the device that holds X
// and Γ.
//
// Files. One linear's statistics are persisted as a safetensors file (common/safetensors_writer):
// "hessian_upper" F32 [n(n+1)/2], the upper triangle row by row (row i holds H[i, i..n-1]), and,
// when formed, "fisher" F32 [d_out, d_in]; metadata {"qcal_oac": "1", "kind": <recipe name>,
// "n": "<d_in>"}. Written to a temporary name, fsynced and renamed: a reader never sees half a
// file.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "common/tensor.h"
#include "kernels/backend.h"
#include "services/engine/gang/reduction.h"
#include "services/engine/model.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

struct LinearOac {
  Tensor hessian;  // F32 [d_in, d_in], full (both triangles), on the host or the backend's device
  Tensor fisher;   // F32 [d_out, d_in], or undefined when not formed
};
using BlockOac = std::array<LinearOac, kNumLinears>;  // LinearKind order

// The contribution of the samples in x [rows, d_in] and dy [rows, d_out] (rows = samples ·
// seq_len, sample-major: one chunk's rows), on the backend holding them: h += Σ_n X_nᵀ(Γ_nΓ_nᵀ)X_n
// over the samples (kOutputAdaptive) or h += Xᵀdiag(‖g_t‖²)X over all rows (kOutputAdaptiveToken).
// h is F32 [d_in, d_in], symmetric on entry and on return (the sample-wise products accumulate
// the lower triangle, Backend::GemmLower, and one MirrorLower completes it). x_op and dy_op, when
// given, are x and dy already in the GEMM operand dtype (BF16 copies under bf16 compute, made once
// by the caller and shared: q, k and v read one x); the sample-wise products read them instead of
// rounding x and dy again. The chunk's samples go through batched products (Backend::GemmBatched):
// P_n = Γ_nΓ_nᵀ for every sample at once, then Z_n = P_nX_n, then one XᵀZ over the chunk's rows.
// InvalidArgument for kLayer, bad shapes, or rows not a multiple of seq_len.
absl::Status AccumulateOacHessian(kernels::Backend& be, HessianKind kind, const Tensor& x,
                                  const Tensor& dy, int64_t seq_len, Tensor& h,
                                  const Tensor* x_op = nullptr, const Tensor* dy_op = nullptr);
// f += Σ_n (Γ_nᵀX_n) ⊙ (Γ_nᵀX_n) over the samples of x and dy (as above); f is F32 [d_out, d_in].
absl::Status AccumulateFisher(kernels::Backend& be, const Tensor& x, const Tensor& dy,
                              int64_t seq_len, Tensor& f);

// The canonical reduction's combine: left.hessian += right.hessian (and the Fisher), on `be`.
Combine<LinearOac> LinearOacCombine(kernels::Backend& be);

// Bytes of one linear's file (header aside), and of every linear of the model: what the gradient
// pass persists (DESIGN section 2, "Memory": ≈ 0.45 GB a block at 7B without the Fisher).
int64_t LinearOacBytes(int64_t d_out, int64_t d_in, bool fisher);
int64_t ModelOacBytes(const ModelConfig& config, bool fisher);

// Writes `oac` (host tensors) to `path` as described above; returns the file's sha256 (hex).
absl::StatusOr<std::string> WriteLinearOac(const std::string& path, HessianKind kind,
                                           const LinearOac& oac);
// Reads a file written by WriteLinearOac into host tensors (the Hessian unpacked to both
// triangles). DataLoss naming the file when it is malformed, of another kind, or its shapes are
// not d_in (and d_out for a Fisher); `expected_sha256` (hex), when not empty, must match.
absl::StatusOr<LinearOac> ReadLinearOac(const std::string& path, HessianKind kind, int64_t d_out,
                                        int64_t d_in, const std::string& expected_sha256 = "");

// A persisted linear's statistics: what a job commits and resumes from (DESIGN section 2, step 4:
// the gradient pass is job state).
struct OacFile {
  int block = 0;
  LinearKind kind = LinearKind::kQ;
  std::string path;    // absolute path of the file (WriteLinearOac)
  std::string sha256;  // hex
  int64_t bytes = 0;
};

// Supplies the statistics of linear `kind` of block b to the solve (BlockRunner), as host or
// device tensors.
using OacSource = std::function<absl::StatusOr<LinearOac>(int block, LinearKind kind)>;

}  // namespace qcal::engine
