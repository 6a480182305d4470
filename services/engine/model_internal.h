// What model.cc (names, shapes, the forward) and model_load.cc (reading a checkpoint, block
// residency) share. Internal to those two files.
#pragma once

#include "absl/status/statusor.h"
#include "common/tensor.h"
#include "kernels/backend.h"

namespace qcal::engine::model_internal {

// Converts a host tensor of dtype F32, F16 or BF16 into the F32 host tensor `dst` (same count).
void ConvertInto(const Tensor& src, Tensor& dst);

// Places a host tensor on the backend (a no-op for a host backend).
absl::StatusOr<Tensor> Place(kernels::Backend& be, const Tensor& host);

}  // namespace qcal::engine::model_internal
