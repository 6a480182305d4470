// GPTQ (OPTQ) on the CPU: quantizes a weight matrix column by column, spreading each column's
// rounding error over the columns not yet quantized so that the layer output error
// ||(W - W^) X^T|| stays small (DESIGN.md section 3, "GPTQ (OPTQ)"). It is the reference for the
// CUDA solver.
//
// Algorithm. H is the input Gram matrix (any positive multiple of X^T X: every step below is
// invariant to its scale).
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
// records (DESIGN.md section 7). Identical inputs therefore give identical codes, scales and zeros.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "services/engine/quant/quantized_linear.h"

namespace qcal::engine {

struct GptqOptions {
  // Damping lambda: H += lambda * mean(diag H) * I before the inversion. >= 0. Default: 0.01.
  double damp = 0.01;
  // Lazy-batch width in columns, >= 1. Default: 128.
  int block_size = 128;
  // Visit columns by decreasing diag H (stable sort). Default: false.
  bool act_order = false;
  // Input columns to take out like dead columns (ASER's extracted outlier channels): H row and
  // column set to the identity's before damping, W column zeroed. Each in [0, d_in); duplicates
  // are allowed. Default: none.
  std::vector<int32_t> outlier_columns;

  // OK when damp is finite and >= 0 and block_size >= 1; otherwise InvalidArgument naming the key.
  absl::Status Validate() const;
};

// What the solver did, for the report and for tests.
struct GptqStats {
  // Columns with H_jj == 0 in the input (zeroed).
  int dead_columns = 0;
  // Distinct outlier columns that were not also dead (zeroed).
  int outlier_columns = 0;
  // The damping lambda of the successful factorization (damp, 10 damp or 100 damp); on failure,
  // the last lambda tried.
  double damp_used = 0;
  // Factorizations that failed: 0..2 before a success; 3 (1 with damp = 0) when all failed.
  int cholesky_failures = 0;
};

// Quantizes W row-major [d_out][d_in] with the Gram matrix H row-major [d_in][d_in] (only its
// upper triangle, j >= i, is read), in precision T (float or double: the Cholesky factorizations,
// the error updates and the group fits all run in T). `stats`, when given, is filled once the
// factorization has been attempted (on success and on any later failure).
//
// When a Cholesky factorization of the damped H or of its inverse fails (H not positive definite
// enough), it is retried with the damping multiplied by 10, at most twice more; damp = 0 is not
// retried (10 x 0 is 0). Errors: InvalidArgument for an invalid spec, options or shape, an outlier
// column out of range, a non-finite weight or H entry, a non-finite error during the solve or a
// group range overflowing an fp16 scale; FailedPrecondition when H stays not positive definite.
template <typename T>
absl::StatusOr<QuantizedLinear> QuantizeGptq(const T* w, const T* h, int64_t d_out, int64_t d_in,
                                             const QuantSpec& spec, const GptqOptions& options,
                                             GptqStats* stats = nullptr);

}  // namespace qcal::engine
