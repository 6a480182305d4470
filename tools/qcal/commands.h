// Subcommands of the qcal CLI. Each Add* function declares its options on `app` and returns the
// function that runs it. Conventions (DESIGN section 6): stdout carries only the result; logs and
// progress go to stderr; errors are one line naming the file, key or value at fault; exit 0 on
// success, 1 on error.
#pragma once

#include <functional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace qcal::cli {

using RunFn = std::function<absl::Status()>;

RunFn AddEval(CLI::App& app);
RunFn AddGenerate(CLI::App& app);
RunFn AddSynth(CLI::App& app);
RunFn AddQuantize(CLI::App& app);
RunFn AddBench(CLI::App& app);

// --device, --compute-dtype and --threads, shared by every command that computes.
struct DeviceFlags {
  std::string device = "auto";        // auto: cuda when a GPU is present, else cpu
  std::string compute_dtype = "f32";  // f32 | bf16
  int threads = 0;                    // 0: number of cores
  void Add(CLI::App& app);
  absl::StatusOr<kernels::BackendOptions> ToOptions() const;
};

// Prints a one-line error to stderr and returns the process exit code for it.
int ReportError(const absl::Status& status);

}  // namespace qcal::cli
