// GPTQ (OPTQ) on the CPU: quantizes a weight matrix column by column, spreading each column's
// rounding error over the columns not yet quantized so that the layer output error
// ||(W - W^) X^T|| stays small (DESIGN.md section 3, "GPTQ (OPTQ)"). The algorithm, its lazy
// batches, groups and determinism are specified by the CPU reference it runs,
// kernels/cpu/quant_ref.h (GptqFactorize, then GptqSolve); this is the engine's one-call form of
// it.
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
