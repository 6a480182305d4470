// Logging goes to stderr through spdlog; stdout is reserved for command results.
#pragma once

#include "spdlog/spdlog.h"

namespace qcal {

// Routes the default spdlog logger to stderr with a compact pattern. Idempotent.
void InitLogging(bool verbose = false);

}  // namespace qcal
