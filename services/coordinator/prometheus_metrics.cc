#include "services/coordinator/prometheus_metrics.h"

#include <netdb.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace qcal::coordinator {

namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// Durations from 1 ms to ~4.6 h, ×3 steps.
Histogram::BucketBoundaries SecondsBuckets() {
  Histogram::BucketBoundaries b;
  for (double v = 0.001; v < 20000; v *= 3) b.push_back(v);
  return b;
}

// Bytes from 1 KiB to ~69 GiB, ×4 steps.
Histogram::BucketBoundaries ByteBuckets() {
  Histogram::BucketBoundaries b;
  for (double v = 1024; v < 1e11; v *= 4) b.push_back(v);
  return b;
}

std::string RankLabel(int rank) { return std::to_string(rank); }

// Relative errors from 1e-4 to 1.
Histogram::BucketBoundaries ErrorBuckets() {
  return {1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0};
}

const char* const kStates[] = {"queued", "running", "succeeded", "failed", "cancelled"};
// The bounded label values, created up front so that every series exists from the start.
const char* const kFinalStates[] = {"succeeded", "failed", "cancelled"};
const char* const kStages[] = {"gradient", "block", "checkpoint", "finish"};
const char* const kMethods[] = {
    "SubmitJob",        "GetJob",       "ListJobs",    "CancelJob",   "WatchJob",
    "RegisterWorker",   "Heartbeat",    "AcquireTask", "CommitBlock", "UploadActivations",
    "FetchResume",      "CompleteTask", "FailTask",    "AbandonTask", "UploadGradientFile",
    "FetchGradientPass"};

// A minimal HTTP/1.0 server for GET /metrics on one thread. prometheus-cpp's own exposer
// (civetweb) runs handlers on 100 KiB thread stacks, which the static TLS of this process's
// libraries (gRPC, OpenBLAS, ...) leaves too small: scrapes crashed in printf. Scrapes are rare
// and small, so one thread with a normal stack serving connections in turn is enough.
class MetricsHttpServer {
 public:
  using Render = std::function<std::string()>;

  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& address,
                                                                  Render render) {
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics address \"", address, "\" is not host:port"));
    }
    std::string host = address.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
      host = host.substr(1, host.size() - 2);
    const std::string port = address.substr(colon + 1);
    addrinfo hints = {};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* ai = nullptr;
    if (getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &ai) != 0 ||
        ai == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics address \"", address, "\" does not resolve"));
    }
    const int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    const bool ok = fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
                    bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 16) == 0;
    const int err = errno;
    freeaddrinfo(ai);
    if (!ok) {
      if (fd >= 0) close(fd);
      return absl::UnavailableError(
          absl::StrCat("metrics endpoint ", address, " cannot listen: ", std::strerror(err)));
    }
    sockaddr_storage bound = {};
    socklen_t len = sizeof(bound);
    getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
    auto server = std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer());
    server->fd_ = fd;
    server->wake_ = eventfd(0, EFD_CLOEXEC);
    server->port_ =
        ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    server->render_ = std::move(render);
    server->thread_ = std::thread([s = server.get()] { s->Serve(); });
    return server;
  }

  ~MetricsHttpServer() {
    const uint64_t one = 1;
    if (write(wake_, &one, sizeof(one)) < 0) spdlog::warn("metrics: cannot wake the server");
    thread_.join();
    close(fd_);
    close(wake_);
  }

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  void Serve() {
    for (;;) {
      pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_, POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents != 0) return;
      const int conn = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      Handle(conn);
      close(conn);
    }
  }

  // Reads the request head (2 s at most) and answers it.
  void Handle(int conn) {
    std::string head;
    char buf[4096];
    while (head.find("\r\n\r\n") == std::string::npos && head.size() < 16384) {
      pollfd p = {conn, POLLIN, 0};
      if (poll(&p, 1, 2000) <= 0) return;
      const ssize_t n = read(conn, buf, sizeof(buf));
      if (n <= 0) return;
      head.append(buf, static_cast<size_t>(n));
    }
    const bool metrics = head.rfind("GET /metrics ", 0) == 0 || head.rfind("GET /metrics?", 0) == 0;
    const std::string body = metrics ? render_() : "not found\n";
    const std::string response = absl::StrCat(
        "HTTP/1.0 ", metrics ? "200 OK" : "404 Not Found",
        "\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: ",
        body.size(), "\r\nConnection: close\r\n\r\n", body);
    size_t off = 0;
    while (off < response.size()) {
      const ssize_t n = send(conn, response.data() + off, response.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }

  int fd_ = -1;
  int wake_ = -1;
  int port_ = 0;
  Render render_;
  std::thread thread_;
};

}  // namespace

struct PrometheusMetrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<MetricsHttpServer> http;  // declared after the registry: stopped before it dies

  prometheus::Family<prometheus::Gauge>& jobs =
      BuildGauge().Name("qcal_jobs").Help("Jobs per state").Register(*registry);
  prometheus::Family<Histogram>& job_duration =
      BuildHistogram()
          .Name("qcal_job_duration_seconds")
          .Help("Seconds from submit to the final state, by final state")
          .Register(*registry);
  prometheus::Family<Histogram>& stage_duration =
      BuildHistogram()
          .Name("qcal_stage_duration_seconds")
          .Help("Wall time of job stages: gradient, block, checkpoint, finish")
          .Register(*registry);
  prometheus::Gauge& blocks_done = BuildGauge()
                                       .Name("qcal_job_blocks_done")
                                       .Help("Committed blocks, summed over active jobs")
                                       .Register(*registry)
                                       .Add({});
  prometheus::Gauge& blocks_total = BuildGauge()
                                        .Name("qcal_job_blocks_total")
                                        .Help("Blocks of the models, summed over active jobs")
                                        .Register(*registry)
                                        .Add({});
  prometheus::Counter& blocks_committed = BuildCounter()
                                              .Name("qcal_blocks_committed_total")
                                              .Help("Blocks committed (first commits)")
                                              .Register(*registry)
                                              .Add({});
  prometheus::Gauge& tokens_per_second =
      BuildGauge()
          .Name("qcal_calibration_tokens_per_second")
          .Help("Calibration tokens per second through the last committed block")
          .Register(*registry)
          .Add({});
  prometheus::Gauge& hessian_flops_per_second =
      BuildGauge()
          .Name("qcal_hessian_flops_per_second")
          .Help(
              "Useful floating-point operations per second of the last committed block's "
              "Hessian accumulation")
          .Register(*registry)
          .Add({});
  Histogram& solve_seconds = BuildHistogram()
                                 .Name("qcal_layer_solve_seconds")
                                 .Help("Per-layer solve time, seconds")
                                 .Register(*registry)
                                 .Add({}, SecondsBuckets());
  prometheus::Family<Histogram>& layer_error =
      BuildHistogram()
          .Name("qcal_layer_rel_error")
          .Help("Per-layer relative output error: kind=rtn (plain RTN), kind=recipe (the recipe)")
          .Register(*registry);
  prometheus::Gauge& leases = BuildGauge()
                                  .Name("qcal_worker_leases")
                                  .Help("Live worker leases")
                                  .Register(*registry)
                                  .Add({});
  prometheus::Counter& lease_expiries = BuildCounter()
                                            .Name("qcal_lease_expiries_total")
                                            .Help("Worker leases that expired")
                                            .Register(*registry)
                                            .Add({});
  prometheus::Counter& task_retries = BuildCounter()
                                          .Name("qcal_task_retries_total")
                                          .Help("Job attempts after the first")
                                          .Register(*registry)
                                          .Add({});
  prometheus::Family<Histogram>& rpc_duration = BuildHistogram()
                                                    .Name("qcal_rpc_duration_seconds")
                                                    .Help("Server-side RPC latency by method")
                                                    .Register(*registry);
  prometheus::Family<prometheus::Counter>& rpcs = BuildCounter()
                                                      .Name("qcal_rpcs_total")
                                                      .Help("RPCs by method and status code")
                                                      .Register(*registry);
  Histogram& store_write_seconds = BuildHistogram()
                                       .Name("qcal_store_write_seconds")
                                       .Help("Synced store write latency, seconds")
                                       .Register(*registry)
                                       .Add({}, SecondsBuckets());
  prometheus::Counter& store_write_bytes = BuildCounter()
                                               .Name("qcal_store_write_bytes_total")
                                               .Help("Bytes written to the store")
                                               .Register(*registry)
                                               .Add({});
  prometheus::Counter& store_write_errors = BuildCounter()
                                                .Name("qcal_store_write_errors_total")
                                                .Help("Failed store writes")
                                                .Register(*registry)
                                                .Add({});
  prometheus::Gauge& store_writable = BuildGauge()
                                          .Name("qcal_store_writable")
                                          .Help("1 while the store accepts writes, else 0")
                                          .Register(*registry)
                                          .Add({});
  prometheus::Gauge& device_memory = BuildGauge()
                                         .Name("qcal_device_memory_bytes")
                                         .Help("Accelerator memory in use, summed over workers")
                                         .Register(*registry)
                                         .Add({});
  prometheus::Gauge& job_peak_rss = BuildGauge()
                                        .Name("qcal_job_peak_rss_bytes")
                                        .Help("Peak host RSS of the last job to succeed")
                                        .Register(*registry)
                                        .Add({});
  prometheus::Family<prometheus::Counter>& exchange_bytes =
      BuildCounter()
          .Name("qcal_exchange_bytes_total")
          .Help("Peer exchange payload bytes sent, by gang rank")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& reduction_wait =
      BuildCounter()
          .Name("qcal_reduction_wait_seconds_total")
          .Help("Seconds gang members waited for partials, statistics and layers, by gang rank")
          .Register(*registry);
  prometheus::Family<Histogram>& block_exchange_bytes =
      BuildHistogram()
          .Name("qcal_block_exchange_bytes")
          .Help("Peer exchange bytes one gang rank sent for one block")
          .Register(*registry);
  prometheus::Family<Histogram>& block_reduction_wait =
      BuildHistogram()
          .Name("qcal_block_reduction_wait_seconds")
          .Help("Seconds one gang rank waited at reductions in one block")
          .Register(*registry);
  prometheus::Gauge& job_peak_device = BuildGauge()
                                           .Name("qcal_job_peak_device_memory_bytes")
                                           .Help("Peak device memory of the last job to succeed")
                                           .Register(*registry)
                                           .Add({});
};

PrometheusMetrics::PrometheusMetrics(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PrometheusMetrics::~PrometheusMetrics() = default;

absl::StatusOr<std::unique_ptr<PrometheusMetrics>> PrometheusMetrics::Create(
    const std::string& listen) {
  auto impl = std::make_unique<Impl>();
  for (const char* s : kStates) impl->jobs.Add({{"state", s}}).Set(0);
  for (const char* k : {"rtn", "recipe"}) impl->layer_error.Add({{"kind", k}}, ErrorBuckets());
  for (const char* s : kFinalStates) impl->job_duration.Add({{"state", s}}, SecondsBuckets());
  for (const char* s : kStages) impl->stage_duration.Add({{"stage", s}}, SecondsBuckets());
  for (const char* m : kMethods) {
    impl->rpc_duration.Add({{"method", m}}, SecondsBuckets());
    impl->rpcs.Add({{"method", m}, {"code", "OK"}});
  }
  impl->store_writable.Set(1);
  impl->exchange_bytes.Add({{"rank", "0"}});
  impl->reduction_wait.Add({{"rank", "0"}});
  impl->block_exchange_bytes.Add({{"rank", "0"}}, ByteBuckets());
  impl->block_reduction_wait.Add({{"rank", "0"}}, SecondsBuckets());
  auto metrics = std::unique_ptr<PrometheusMetrics>(new PrometheusMetrics(std::move(impl)));
  if (!listen.empty()) {
    PrometheusMetrics* m = metrics.get();
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http =
        MetricsHttpServer::Start(listen, [m] { return m->Text(); });
    if (!http.ok()) return http.status();
    m->impl_->http = *std::move(http);
  }
  return metrics;
}

int PrometheusMetrics::port() const { return impl_->http ? impl_->http->port() : 0; }

std::string PrometheusMetrics::Text() const {
  return prometheus::TextSerializer().Serialize(impl_->registry->Collect());
}

void PrometheusMetrics::SetJobs(const std::map<std::string, int>& by_state) {
  for (const char* s : kStates) {
    auto it = by_state.find(s);
    impl_->jobs.Add({{"state", s}}).Set(it == by_state.end() ? 0 : it->second);
  }
}

void PrometheusMetrics::ObserveJobDuration(const std::string& final_state, double seconds) {
  impl_->job_duration.Add({{"state", final_state}}, SecondsBuckets()).Observe(seconds);
}

void PrometheusMetrics::ObserveStage(const std::string& stage, double seconds) {
  impl_->stage_duration.Add({{"stage", stage}}, SecondsBuckets()).Observe(seconds);
}

void PrometheusMetrics::SetBlocks(int64_t done, int64_t total) {
  impl_->blocks_done.Set(static_cast<double>(done));
  impl_->blocks_total.Set(static_cast<double>(total));
}

void PrometheusMetrics::AddBlockCommitted() { impl_->blocks_committed.Increment(); }

void PrometheusMetrics::SetCalibrationTokensPerSecond(double tokens_per_second) {
  impl_->tokens_per_second.Set(tokens_per_second);
}

void PrometheusMetrics::SetHessianFlopsPerSecond(double flops_per_second) {
  impl_->hessian_flops_per_second.Set(flops_per_second);
}

void PrometheusMetrics::ObserveLayer(double solve_seconds, double rel_error_rtn, double rel_error,
                                     double rel_error_er) {
  impl_->solve_seconds.Observe(solve_seconds);
  impl_->layer_error.Add({{"kind", "rtn"}}, ErrorBuckets()).Observe(rel_error_rtn);
  impl_->layer_error.Add({{"kind", "recipe"}}, ErrorBuckets()).Observe(rel_error);
  if (rel_error_er >= 0) {
    impl_->layer_error.Add({{"kind", "reconstructed"}}, ErrorBuckets()).Observe(rel_error_er);
  }
}

void PrometheusMetrics::SetWorkerLeases(int leases) { impl_->leases.Set(leases); }
void PrometheusMetrics::AddLeaseExpiry() { impl_->lease_expiries.Increment(); }
void PrometheusMetrics::AddTaskRetry() { impl_->task_retries.Increment(); }

void PrometheusMetrics::ObserveRpc(const std::string& method, const std::string& code,
                                   double seconds) {
  impl_->rpc_duration.Add({{"method", method}}, SecondsBuckets()).Observe(seconds);
  impl_->rpcs.Add({{"method", method}, {"code", code}}).Increment();
}

void PrometheusMetrics::ObserveStoreWrite(double seconds, int64_t bytes, bool ok) {
  impl_->store_write_seconds.Observe(seconds);
  if (ok) {
    impl_->store_write_bytes.Increment(static_cast<double>(bytes));
  } else {
    impl_->store_write_errors.Increment();
  }
}

void PrometheusMetrics::SetStoreWritable(bool writable) {
  impl_->store_writable.Set(writable ? 1 : 0);
}
void PrometheusMetrics::SetDeviceMemory(int64_t bytes) {
  impl_->device_memory.Set(static_cast<double>(bytes));
}

void PrometheusMetrics::SetJobPeakMemory(int64_t rss_bytes, int64_t device_bytes) {
  impl_->job_peak_rss.Set(static_cast<double>(rss_bytes));
  impl_->job_peak_device.Set(static_cast<double>(device_bytes));
}

void PrometheusMetrics::AddExchange(int rank, int64_t bytes, double wait_seconds) {
  impl_->exchange_bytes.Add({{"rank", RankLabel(rank)}}).Increment(static_cast<double>(bytes));
  impl_->reduction_wait.Add({{"rank", RankLabel(rank)}}).Increment(wait_seconds);
}

void PrometheusMetrics::ObserveBlockExchange(int rank, int64_t bytes, double wait_seconds) {
  impl_->block_exchange_bytes.Add({{"rank", RankLabel(rank)}}, ByteBuckets())
      .Observe(static_cast<double>(bytes));
  impl_->block_reduction_wait.Add({{"rank", RankLabel(rank)}}, SecondsBuckets())
      .Observe(wait_seconds);
}

}  // namespace qcal::coordinator
