// Subcommands of the qcal CLI. Each Add* function declares its options on `app` and returns the
// function that runs it. Conventions (DESIGN section 6): stdout carries only the result; logs and
// progress go to stderr; errors are one line naming the file, key or value at fault; exit 0 on
// success, 1 on error.
#pragma once

#include <functional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"

namespace qcal::cli {

using RunFn = std::function<absl::Status()>;

RunFn AddEval(CLI::App& app);
RunFn AddGenerate(CLI::App& app);
RunFn AddSynth(CLI::App& app);
RunFn AddQuantize(CLI::App& app);

// Prints a one-line error to stderr and returns the process exit code for it.
int ReportError(const absl::Status& status);

}  // namespace qcal::cli
