// Helpers shared by the quantizers of this folder (RTN, GPTQ); not part of the engine's interface.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/status.h"
#include "services/engine/quant/quantized_linear.h"

namespace qcal::engine::internal {

// A QuantizedLinear with validated spec and shape, sized buffers (codes, scales, zeros zeroed) and
// g_idx[j] = j / g. Errors: invalid spec, non-positive shape.
absl::StatusOr<QuantizedLinear> NewQuantizedLinear(int64_t d_out, int64_t d_in,
                                                   const QuantSpec& spec);

// InvalidArgument naming `what`[row, col] and its value for the first non-finite entry of the
// row-major matrix `values` [rows][cols]. Instantiated for float and double.
template <typename T>
absl::Status CheckFinite(const T* values, int64_t rows, int64_t cols, const char* what);

// The error for a group whose fitted scale is not a finite fp16 value.
absl::Status ScaleOverflowError(int64_t row, int64_t group);

}  // namespace qcal::engine::internal
