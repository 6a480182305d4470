// qcal-worker: runs quantization jobs for a qcal-coordinator (one job at a time). Flags map onto
// WorkerOptions here and nowhere else. SIGTERM or SIGINT stop it at the next block boundary.
#include <cstdio>
#include <optional>
#include <string>
#include <thread>

#include "CLI/CLI.hpp"
#include "common/cli_parse.h"
#include "common/logging.h"
#include "common/status.h"
#include "services/common/fault_injection.h"
#include "services/common/server_limit_flags.h"
#include "services/common/shutdown_signal.h"
#include "services/worker/worker.h"

namespace qcal::worker {
namespace {

absl::Status Run(WorkerOptions options, double timeout_seconds, double peer_timeout_seconds) {
  options.coordinator.timeout = absl::Seconds(timeout_seconds);
  options.peer_timeout = absl::Seconds(peer_timeout_seconds);
  service::ShutdownSignal& shutdown = service::ShutdownSignal::Install();
  QCAL_ASSIGN_OR_RETURN(auto faults, service::FaultInjector::FromEnv("worker"));
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<Worker> worker, Worker::Create(options, faults.get()));
  std::thread signal_waiter([&] {
    const int sig = shutdown.Wait();
    if (sig == 0) return;  // Run() ended on its own
    spdlog::info("qcal-worker: signal {}, stopping", sig);
    worker->Stop();
  });
  const absl::Status s = worker->Run();
  shutdown.Wake();
  signal_waiter.join();
  return s;
}

}  // namespace
}  // namespace qcal::worker

int main(int argc, char** argv) {
  CLI::App app{"qcal-worker: runs qcal quantization jobs for a coordinator"};
  qcal::worker::WorkerOptions o;
  double timeout_seconds = 30;
  double peer_timeout_seconds = 120;
  bool verbose = false;
  app.add_option("--coordinator", o.coordinator.address, "Coordinator address host:port")
      ->required();
  app.add_option("--input-root", o.input_root, "The coordinator's --input-root tree")->required();
  app.add_option("--output-root", o.output_root, "The coordinator's --output-root tree")
      ->required();
  app.add_option("--device", o.device, "Backend device: cpu (default), cuda or cuda:N");
  app.add_option("--threads", o.threads, "CPU threads (default: number of cores)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--scratch-dir", o.scratch_dir,
                 "Staging for activation checkpoints (default $TMPDIR)");
  app.add_option("--timeout-seconds", timeout_seconds,
                 "Deadline of each coordinator call (default 30)")
      ->check(CLI::PositiveNumber);
  app.add_option("--peer-listen", o.peer_listen,
                 "Address of the internal peer service, host:port (default 127.0.0.1:0)");
  app.add_option("--peer-advertise", o.peer_advertise,
                 "host:port peers dial (default: the bound --peer-listen address, a wildcard "
                 "host replaced by the hostname)");
  app.add_option("--peer-timeout-seconds", peer_timeout_seconds,
                 "Give a gang attempt up when a message to a peer takes longer, retries included "
                 "(plus 0.1 s per MiB; default 120)")
      ->check(CLI::PositiveNumber);
  qcal::rpc::AddServerLimitFlags(app, "peer-grpc-", &o.peer_limits);
  app.add_option("--token-file", o.coordinator.token_file, "File holding the bearer token");
  app.add_option("--tls-ca", o.coordinator.tls_ca,
                 "CA of the coordinator's certificate (PEM); TLS on");
  app.add_option("--tls-cert", o.coordinator.tls_cert, "Client certificate (PEM) for mTLS");
  app.add_option("--tls-key", o.coordinator.tls_key, "Client private key (PEM) for mTLS");
  app.add_option("--tls-server-name", o.coordinator.tls_server_name,
                 "Name expected in the coordinator's certificate");
  app.add_flag("-v,--verbose", verbose, "Verbose logging");
  if (const std::optional<int> status = qcal::ParseCommandLine(app, argc, argv, "qcal-worker")) {
    return *status;
  }
  qcal::InitLogging(verbose);
  absl::Status s = qcal::worker::Run(o, timeout_seconds, peer_timeout_seconds);
  if (!s.ok()) {
    std::fprintf(stderr, "qcal-worker: error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
