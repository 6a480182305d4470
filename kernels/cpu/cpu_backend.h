// The CPU backend: OpenBLAS GEMMs and OpenMP loops over rows. Results do not depend on timing;
// with a fixed thread count they are bit-identical run to run.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace qcal::kernels {

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options);

// Sets the thread count for OpenBLAS and OpenMP (0 = number of cores); returns the count used.
int SetCpuThreads(int threads);

}  // namespace qcal::kernels
