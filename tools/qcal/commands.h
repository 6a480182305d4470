// Subcommands of the qcal CLI. Each Add* function declares its options on `app` and returns the
// function that runs it. Conventions (DESIGN section 6): stdout carries only the result; logs and
// progress go to stderr; errors are one line naming the file, key or value at fault; exit 0 on
// success, 1 on error.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace qcal::v1 {
class Job;
class ProgressEvent;
}  // namespace qcal::v1
namespace qcal::rpc {
struct ClientOptions;
}  // namespace qcal::rpc

namespace qcal::cli {

using RunFn = std::function<absl::Status()>;

RunFn AddEval(CLI::App& app);
RunFn AddGenerate(CLI::App& app);
RunFn AddSynth(CLI::App& app);
RunFn AddTokenize(CLI::App& app);
RunFn AddQuantize(CLI::App& app);
RunFn AddBench(CLI::App& app);

// The service subcommands (built when QCAL_SERVICE is on): they talk to a qcal-coordinator.
RunFn AddSubmit(CLI::App& app);
RunFn AddStatus(CLI::App& app);
RunFn AddList(CLI::App& app);
RunFn AddCancel(CLI::App& app);
RunFn AddWatch(CLI::App& app);

// How the service subcommands reach the coordinator (flags shared by all of them).
struct ConnectionFlags {
  std::string coordinator = "127.0.0.1:50051";  // host:port
  std::string tls_ca;                           // CA of the server certificate (PEM): TLS on
  std::string tls_cert;                         // client certificate and key (PEM): mTLS
  std::string tls_key;
  std::string tls_server_name;  // name in the server certificate, when not the address's host
  std::string token_file;       // file holding the bearer token
  std::string client_id;        // sent as x-qcal-client
  double timeout_seconds = 30;  // deadline of each call
};
// Declares --coordinator, --tls-*, --token-file, --client-id and --timeout-seconds.
void AddConnectionFlags(CLI::App& app, ConnectionFlags& flags);
rpc::ClientOptions ToClientOptions(const ConnectionFlags& flags);

// Job progress on stderr: a live bar (block i/N, stage, ETA, tokens/s) redrawn in place when
// stderr is a terminal, else one plain line per event.
class ProgressPrinter {
 public:
  ProgressPrinter();
  void Print(const v1::ProgressEvent& event);
  // Ends the bar's line.
  void Finish();

 private:
  bool tty_ = false;
  bool drawn_ = false;
};

// OK for a SUCCEEDED job; otherwise an error naming the job, its state and its error.
absl::Status FinalJobStatus(const v1::Job& job);

// A CLI11 check for seeds and counts parsed into unsigned integers, which CLI11 itself would let
// wrap ("-1" becomes 2^64 − 1): digits only, else "must be a non-negative integer, got V".
CLI::Validator NonNegativeInteger();

// --device, --compute-dtype and --threads, shared by every command that computes.
struct DeviceFlags {
  std::string device = "auto";        // auto: cuda when a GPU is present, else cpu
  std::string compute_dtype = "f32";  // f32 | bf16
  int threads = 0;                    // 0: number of cores
  void Add(CLI::App& app);
  absl::StatusOr<kernels::BackendOptions> ToOptions() const;
};

// --kernels and --abq-kernel of eval and generate: how a quantized checkpoint's linears run.
struct KernelFlags {
  std::string mode = "dequant";   // --kernels: dequant | abq
  std::string abq_kernel = "b1";  // b1 | int8 | a16, with --kernels abq
  CLI::Option* abq_kernel_option = nullptr;
  void Add(CLI::App& app);
  // nullopt for --kernels dequant; for abq the kernel, once PlanAbqInference has accepted the
  // checkpoint in `model_dir` with `act_bits` (0: the checkpoint's). Runs on the host only, before
  // any device is touched. Errors: --abq-kernel without --kernels abq, and the plan's refusals.
  absl::StatusOr<std::optional<kernels::AbqKernel>> Check(const std::string& model_dir,
                                                          int act_bits) const;
};

// Prints a one-line error to stderr and returns the process exit code for it.
int ReportError(const absl::Status& status);

}  // namespace qcal::cli
