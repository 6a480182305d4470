// The CPU reference of the weight-quantization ops (Backend::QuantizeRtn, GptqFactorize, GptqSolve,
// OutputError): round to nearest, GPTQ (OPTQ) as a factorization of the Hessian that the consumers
// of one linear input share and a column loop per weight, and the layer output error. It is the
// specification the CUDA solver is tested against, what the CPU backend's solver ops run, and
// what the engine's quantizers (services/engine/quant) are.
//
// GPTQ (DESIGN.md section 3, "GPTQ (OPTQ)"). H is the input Gram matrix (any positive multiple of
// XᵀX: every step below is invariant to its scale).
//   1. Dead columns (H_jj = 0) and the requested outlier columns are taken out: their H row and
//      column become the identity's and W[:, j] = 0, so they neither receive nor spread error and
//      quantize to exactly 0. Groups keep the original column indices.
//   2. Act-order (optional): columns are visited by decreasing diag H (stable: ties keep the lower
//      index first, the diagonal taken after step 1 and before damping); groups are consecutive
//      runs of g columns in that order, and g_idx records each original column's group.
//   3. Damping: H += damp * mean(diag H) * I.
//   4. U = upper Cholesky factor of H^-1 (potrf, potri, potrf in the precision T).
//   5. For each column i in visiting order: q_i = Q(w_i), e = (w_i - w^_i) / U_ii, and every later
//      column j takes w_j -= e U_ij.
// Steps 1-4 depend on H only (GptqFactorize); step 5 is GptqSolve.
//
// Lazy batches. Step 5 is done in blocks of `block_size` columns. Inside a block the update of
// step 5 is applied at once to the block's own columns only (a rank-1 update of a narrow panel),
// and the errors e are collected in E [d_out][block]. At the end of the block all later columns
// take W[:, end:] -= E U[block, end:] in one GEMM. The result is the same as step 5 up to rounding.
//
// Groups. A group's scale and zero point are fitted when the visit reaches its first column, on
// the group's current values: every error from earlier columns must already be in them. Inside a
// block that holds for the block's own columns; a group that starts inside a block but extends past
// its end would miss the pending lazy update of its later columns, so the block is cut short just
// before such a group: the cut applies the pending update (the "flush") to every later column,
// and the group then starts the next block. With g a multiple of the block size or the block size
// a multiple of g (the usual 128/128, 32/128) no block is ever cut.
//
// Determinism. Given U, rows of W are independent: each row's column loop reads only that row and
// U. The column loop runs one row per OpenMP iteration, each row start to finish on one thread with
// a fixed order of operations, so its bits do not depend on the number of threads or on
// scheduling. The block-end update is one BLAS GEMM over all rows whose shapes do not depend on the
// thread count either; its bits depend at most on the BLAS library's own thread count, which a job
// records (DESIGN.md section 7). Identical inputs therefore give identical codes, scales and zeros,
// and a factor computed once gives every weight it is solved for the bits of a solve that
// factored on its own.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/quant_grid.h"
#include "kernels/quant_ops.h"

namespace qcal::kernels {

// The result of quantizing one weight matrix W [d_out][d_in] on the host, as every quantizer
// produces it and the exporter consumes it. Group k of output row o covers the input columns j
// with g_idx[j] == k; its parameters are scales/zeros[k * d_out + o].
struct QuantizedLinear {
  int64_t d_out = 0;
  int64_t d_in = 0;
  QuantSpec spec;
  // Effective group width g (d_in when there is one group per row).
  int64_t group_size = 0;
  // Groups per row, ceil(d_in / g).
  int64_t n_groups = 0;
  // [d_out][d_in] codes in 0..MaxCode(spec) (2^bits - 1; 4 for the balanced grid), original column
  // order.
  std::vector<uint8_t> codes;
  // [n_groups][d_out] scales, each an fp16 value >= 2^-14 (exported as fp16 without rounding).
  std::vector<float> scales;
  // [n_groups][d_out] zero points.
  std::vector<int32_t> zeros;
  // [d_in] group of each original column: j / g, or with act-order (position of j in the
  // permutation) / g.
  std::vector<int32_t> g_idx;
  // Act-order permutation, perm[p] = original column at position p; empty without act-order.
  std::vector<int32_t> perm;

  // The dequantized weights [d_out][d_in] in fp32: w^ = s (q - z) (cubed for the cuberoot grid),
  // with s and z taken through g_idx. Identical to what a reader of the exported tensors computes.
  std::vector<float> Dequantized() const;
};

namespace ref {

// OK for a valid spec, a positive shape [d_out, d_in] within the BLAS index range (int) and finite
// weights (w row-major [d_out][d_in]); otherwise InvalidArgument naming the key, the shape or the
// first non-finite weight[row, column]. T is float or double. GptqSolve's checks, in order.
template <typename T>
absl::Status CheckGptqWeight(const T* w, int64_t d_out, int64_t d_in, const QuantSpec& spec);

// RTN: every group of every row fitted and rounded on its own (FitGroup/QuantizeCode in precision
// T, float or double). w is row-major [d_out][d_in]. Rows run in parallel, each on one thread:
// the result does not depend on the thread count.
// Errors (InvalidArgument): an invalid spec or shape, a non-finite weight (naming row and column),
// a group whose range overflows an fp16 scale (the first such row).
template <typename T>
absl::StatusOr<QuantizedLinear> QuantizeRtn(const T* w, int64_t d_out, int64_t d_in,
                                            const QuantSpec& spec);

// GPTQ steps 1-4 on h, row-major [n][n] (only the upper triangle, j >= i, is read): fills `factor`
// (all but its tensor `u`) and u, row-major [n][n] in precision T (float or double): U in the upper
// triangle, in visiting order, 0 below it. When a Cholesky factorization fails (H not positive
// definite enough) it is retried with the damping multiplied by 10, at most twice more; damp = 0
// is not retried. Errors: InvalidArgument for damp negative or not finite, n < 1 or beyond the
// BLAS index range, a non-finite H entry (naming hessian[i, j]) or an outlier column out of range;
// FailedPrecondition when H stays not positive definite. `factor` is complete on success and on
// FailedPrecondition (damp_used is then the last lambda tried, cholesky_failures the attempts).
template <typename T>
absl::Status GptqFactorize(const T* h, int64_t n, const GptqSolveOptions& options, T* u,
                           GptqFactor* factor);

// GPTQ step 5: quantizes w, row-major [d_out][factor.n], with a factorization from GptqFactorize
// (u its U, in the same precision T) in lazy blocks of block_size columns. Errors
// (InvalidArgument): those of CheckGptqWeight, block_size < 1, a factor of another size, a
// non-finite error during the solve (naming row and column), a group range overflowing an fp16
// scale. pre_round, when not null, receives W̃ row-major [d_out][factor.n] in original column
// order: each weight's value when its column was rounded (removed columns 0), so that
// QuantizeCode(W̃_ij) on the row's group parameters is codes_ij.
template <typename T>
absl::StatusOr<QuantizedLinear> GptqSolve(const T* w, int64_t d_out, const GptqFactor& factor,
                                          const T* u, const QuantSpec& spec, int block_size,
                                          std::vector<T>* pre_round = nullptr);

// The layer output error ||(W - W^) X^T||_F computed from the Gram matrix G = X^T X [d_in][d_in]:
// sqrt(trace(E G E^T)) with E = W - W^ (E = W when w_hat is null), in double precision. Only the
// upper triangle of G (j >= i) is read. Needs d_in^2 doubles of scratch memory. Deterministic for
// a given BLAS thread count.
double OutputError(const float* w, const float* w_hat, const float* gram, int64_t d_out,
                   int64_t d_in);

}  // namespace ref
}  // namespace qcal::kernels
