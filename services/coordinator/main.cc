// qcal-coordinator: the job API (gRPC), job state on RocksDB, worker leases and /metrics. Flags
// map onto CoordinatorOptions and PrometheusMetricsOptions here and nowhere else. SIGTERM or
// SIGINT shut it down gracefully.
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/cli_parse.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "nlohmann/json.hpp"
#include "services/common/fault_injection.h"
#include "services/common/rpc.h"
#include "services/common/server_limit_flags.h"
#include "services/common/shutdown_signal.h"
#include "services/coordinator/auth.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/grpc_services.h"
#include "services/coordinator/prometheus_metrics.h"
#include "services/coordinator/rocks_store.h"
#include "services/coordinator/store_check.h"

namespace qcal::coordinator {
namespace {

struct Flags {
  std::string listen = "127.0.0.1:50051";
  std::string metrics_listen = "127.0.0.1:9464";
  double metrics_request_timeout_seconds = 5;
  double metrics_response_timeout_seconds = 10;
  std::string port_file;
  std::string auth_token_file;
  rpc::ServerTlsOptions tls;
  double lease_seconds = 10;
  double heartbeat_seconds = 2;
  double store_reopen_seconds = 2;
  rpc::ServerLimits grpc_limits;
  bool verbose = false;
};

// Writes {"grpc_port": N, "metrics_port": M} atomically (tests and scripts read it).
absl::Status WritePortFile(const std::string& path, int grpc_port, int metrics_port) {
  nlohmann::ordered_json j;
  j["grpc_port"] = grpc_port;
  j["metrics_port"] = metrics_port;
  const std::string tmp = path + ".tmp";
  QCAL_RETURN_IF_ERROR(WriteStringToFile(tmp, j.dump() + "\n"));
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat(path, ": ", ec.message()));
  return absl::OkStatus();
}

absl::Status Run(const Flags& flags, CoordinatorOptions options,
                 PrometheusMetricsOptions metrics_options) {
  options.scheduler.lease = absl::Seconds(flags.lease_seconds);
  options.heartbeat_interval = absl::Seconds(flags.heartbeat_seconds);
  options.store_reopen_interval = absl::Seconds(flags.store_reopen_seconds);
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_RETURN_IF_ERROR(Annotate(flags.grpc_limits.Validate(), "--grpc-* flags"));

  service::ShutdownSignal& shutdown = service::ShutdownSignal::Install();
  QCAL_ASSIGN_OR_RETURN(auto faults, service::FaultInjector::FromEnv("coordinator"));
  std::unique_ptr<Authenticator> auth = std::make_unique<Authenticator>();
  if (!flags.auth_token_file.empty()) {
    QCAL_ASSIGN_OR_RETURN(auth, Authenticator::FromTokenFile(flags.auth_token_file));
  }
  QCAL_ASSIGN_OR_RETURN(auto creds, rpc::CreateServerCredentials(flags.tls));
  metrics_options.listen = flags.metrics_listen;
  metrics_options.http_request_timeout = absl::Seconds(flags.metrics_request_timeout_seconds);
  metrics_options.http_response_timeout = absl::Seconds(flags.metrics_response_timeout_seconds);
  QCAL_ASSIGN_OR_RETURN(auto metrics, PrometheusMetrics::Create(metrics_options));
  RealClock clock;
  const std::string store_dir = (std::filesystem::path(options.data_dir) / "store").string();
  StoreOpener opener = [store_dir]() -> absl::StatusOr<std::unique_ptr<KvStore>> {
    QCAL_ASSIGN_OR_RETURN(std::unique_ptr<RocksStore> s, RocksStore::Open({store_dir}));
    return std::unique_ptr<KvStore>(std::move(s));
  };
  QCAL_ASSIGN_OR_RETURN(auto coordinator,
                        Coordinator::Create(options, opener, &clock, metrics.get(), faults.get()));

  QuantGrpcService quant(coordinator.get(), auth.get(), metrics.get());
  WorkerGrpcService workers(coordinator.get(), auth.get(), metrics.get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(flags.listen, creds, &port);
  builder.SetMaxReceiveMessageSize(rpc::kMaxMessageBytes);
  builder.SetMaxSendMessageSize(rpc::kMaxMessageBytes);
  flags.grpc_limits.Apply(builder);
  builder.RegisterService(&quant);
  builder.RegisterService(&workers);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", flags.listen));
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  coordinator->SetServingCallback([health](bool serving) {
    health->SetServingStatus(serving);
    health->SetServingStatus("qcal.v1.QuantService", serving);
  });
  spdlog::info("qcal-coordinator: listening on port {} (metrics port {}), auth {}, TLS {}", port,
               metrics->port(), auth->enabled() ? "on" : "off",
               flags.tls.cert.empty() ? "off" : "on");
  if (!flags.port_file.empty()) {
    QCAL_RETURN_IF_ERROR(WritePortFile(flags.port_file, port, metrics->port()));
  }

  std::atomic<bool> stop{false};
  std::thread ticker([&] {
    while (!stop.load()) {
      coordinator->Tick();
      absl::SleepFor(absl::Milliseconds(100));
    }
  });
  std::thread signal_waiter([&] {
    const int sig = shutdown.Wait();
    spdlog::info("qcal-coordinator: signal {}, shutting down", sig);
    coordinator->Shutdown();
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  });
  server->Wait();
  stop.store(true);
  ticker.join();
  signal_waiter.join();
  return absl::OkStatus();
}

// --check-store: 0 when consistent, 1 with problems (listed in the JSON), 2 when it cannot run.
int CheckStoreMain(const std::string& data_dir) {
  if (data_dir.empty()) {
    std::fprintf(stderr, "qcal-coordinator: error: --check-store needs --data-dir\n");
    return 2;
  }
  RocksStoreOptions o;
  o.dir = (std::filesystem::path(data_dir) / "store").string();
  o.read_only = true;
  absl::StatusOr<std::unique_ptr<RocksStore>> store = RocksStore::Open(o);
  absl::StatusOr<StoreCheckResult> result =
      store.ok() ? CheckStore(**store, data_dir) : store.status();
  if (!result.ok()) {
    std::fprintf(stderr, "qcal-coordinator: error: %s\n",
                 std::string(result.status().message()).c_str());
    return 2;
  }
  std::printf("%s\n", result->ToJson().c_str());
  return result->ok() ? 0 : 1;
}

}  // namespace
}  // namespace qcal::coordinator

int main(int argc, char** argv) {
  using qcal::coordinator::CoordinatorOptions;
  CLI::App app{"qcal-coordinator: the qcal job service (gRPC API, RocksDB job state, /metrics)"};
  qcal::coordinator::Flags flags;
  CoordinatorOptions options;
  qcal::coordinator::PrometheusMetricsOptions metrics_options;
  app.add_option("--listen", flags.listen, "gRPC address host:port (port 0: any free port)");
  app.add_option("--data-dir", options.data_dir, "State directory (RocksDB store, checkpoints)")
      ->required();
  app.add_option("--input-root", options.input_root,
                 "Job inputs are confined beneath this (required to serve)");
  app.add_option("--output-root", options.output_root,
                 "Outputs are created under this (required to serve)");
  bool check_store = false;
  app.add_flag("--check-store", check_store,
               "Check the store under --data-dir (read-only, coordinator stopped) and the files "
               "it references; print the result as JSON and exit 1 on any inconsistency");
  app.add_option("--metrics-listen", flags.metrics_listen,
                 "/metrics HTTP address host:port (\"\" disables)");
  app.add_option("--metrics-threads", metrics_options.http_threads,
                 "/metrics server threads (default 4)")
      ->check(CLI::PositiveNumber);
  app.add_option("--metrics-max-connections", metrics_options.http_max_connections,
                 "/metrics connections open at once (default 64)")
      ->check(CLI::PositiveNumber);
  app.add_option("--metrics-request-timeout-seconds", flags.metrics_request_timeout_seconds,
                 "/metrics: a connection must send its request head within this (default 5)")
      ->check(CLI::PositiveNumber);
  app.add_option("--metrics-response-timeout-seconds", flags.metrics_response_timeout_seconds,
                 "/metrics: the response must be sent within this, or it is cut (default 10)")
      ->check(CLI::PositiveNumber);
  app.add_option("--port-file", flags.port_file,
                 "Write {\"grpc_port\", \"metrics_port\"} as JSON here once listening");
  app.add_option("--lease-seconds", flags.lease_seconds, "Worker lease duration (default 10)")
      ->check(CLI::PositiveNumber);
  app.add_option("--heartbeat-seconds", flags.heartbeat_seconds,
                 "Worker heartbeat interval, less than the lease (default 2)")
      ->check(CLI::PositiveNumber);
  app.add_option("--max-attempts", options.scheduler.max_attempts,
                 "A job that loses its worker this many times fails (default 5)")
      ->check(CLI::PositiveNumber);
  app.add_option("--max-active-jobs-per-client", options.max_active_jobs_per_client,
                 "Quota of QUEUED + RUNNING jobs per client (default 64)")
      ->check(CLI::PositiveNumber);
  app.add_option("--checkpoint-every", options.checkpoint_every,
                 "Activation checkpoint every N blocks; 0: workers keep it under 5% (default 0)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--store-reopen-seconds", flags.store_reopen_seconds,
                 "Retry period for reopening the store after a write error (default 2)")
      ->check(CLI::PositiveNumber);
  qcal::rpc::AddServerLimitFlags(app, "grpc-", &flags.grpc_limits);
  app.add_option("--auth-token-file", flags.auth_token_file,
                 "Bearer tokens, lines \"subject token\"; turns auth on");
  app.add_option("--tls-cert", flags.tls.cert, "Server certificate chain (PEM); turns TLS on");
  app.add_option("--tls-key", flags.tls.key, "Server private key (PEM)");
  app.add_option("--tls-client-ca", flags.tls.client_ca,
                 "CA for client certificates (PEM); turns mTLS on");
  app.add_flag("-v,--verbose", flags.verbose, "Verbose logging");
  if (const std::optional<int> status =
          qcal::ParseCommandLine(app, argc, argv, "qcal-coordinator")) {
    return *status;
  }
  qcal::InitLogging(flags.verbose);
  if (check_store) return qcal::coordinator::CheckStoreMain(options.data_dir);
  absl::Status s = qcal::coordinator::Run(flags, options, metrics_options);
  if (!s.ok()) {
    std::fprintf(stderr, "qcal-coordinator: error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
