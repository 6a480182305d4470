// Helpers that several of BlockRunner's implementation files share (block_runner.cc defines them).
// Not part of the runner's interface: only services/engine/driver/block_*.cc include this.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "common/tensor.h"

namespace qcal::engine::driver_internal {

// InvalidArgument naming `what` when the host F32 tensor holds a NaN or an Inf.
absl::Status CheckFinite(const Tensor& host, const std::string& what);

}  // namespace qcal::engine::driver_internal
