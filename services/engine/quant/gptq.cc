#include "services/engine/quant/gptq.h"

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {

absl::Status GptqOptions::Validate() const {
  if (!std::isfinite(damp) || damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("gptq.damp must be >= 0, got ", damp));
  }
  if (block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gptq.block_size must be >= 1, got ", block_size));
  }
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<QuantizedLinear> QuantizeGptq(const T* w, const T* h, int64_t d_out, int64_t d_in,
                                             const QuantSpec& spec, const GptqOptions& options,
                                             GptqStats* stats) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  // The weight's checks before the Hessian's, as the errors have always come.
  QCAL_RETURN_IF_ERROR(kernels::ref::CheckGptqWeight(w, d_out, d_in, spec));
  kernels::GptqSolveOptions solve;
  solve.damp = options.damp;
  solve.block_size = options.block_size;
  solve.act_order = options.act_order;
  solve.outlier_columns = options.outlier_columns;
  kernels::GptqFactor factor;
  std::vector<T> u(static_cast<size_t>(d_in * d_in));
  const absl::Status factored = kernels::ref::GptqFactorize(h, d_in, solve, u.data(), &factor);
  if (stats && (factored.ok() || absl::IsFailedPrecondition(factored))) {
    stats->dead_columns = factor.dead_columns;
    stats->outlier_columns = factor.outlier_columns;
    stats->damp_used = factor.damp_used;
    stats->cholesky_failures = factor.cholesky_failures;
  }
  QCAL_RETURN_IF_ERROR(factored);
  return kernels::ref::GptqSolve(w, d_out, factor, u.data(), spec, options.block_size);
}

template absl::StatusOr<QuantizedLinear> QuantizeGptq<float>(const float*, const float*, int64_t,
                                                             int64_t, const QuantSpec&,
                                                             const GptqOptions&, GptqStats*);
template absl::StatusOr<QuantizedLinear> QuantizeGptq<double>(const double*, const double*, int64_t,
                                                              int64_t, const QuantSpec&,
                                                              const GptqOptions&, GptqStats*);

}  // namespace qcal::engine
