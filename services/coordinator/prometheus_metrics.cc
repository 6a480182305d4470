#include "services/coordinator/prometheus_metrics.h"

#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string_view>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
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

// GET /metrics on GNU libmicrohttpd (see the header for why not civetweb). MHD runs a pool of
// threads, each polling its share of the connections, so a slow client costs a connection slot and
// never blocks a thread. MHD's own connection timeout counts inactivity only (a byte a second
// resets it), so deadlines are ours: every open connection is listed with the time by which it
// must have sent its request head, then the time by which its response must be out, and a reaper
// thread shuts down the socket of any connection past its deadline; MHD then sees the socket fail
// and closes the connection itself.
class MetricsHttpServer {
 public:
  using Render = std::function<std::string()>;

  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const PrometheusMetricsOptions& options, Render render) {
    QCAL_ASSIGN_OR_RETURN(const int fd, Listen(options.listen));
    sockaddr_storage bound = {};
    socklen_t len = sizeof(bound);
    getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
    auto server = std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer(options));
    server->port_ =
        ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    server->render_ = std::move(render);
    // MHD takes the listening socket and closes it in MHD_stop_daemon.
    server->daemon_ = MHD_start_daemon(
        MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG, 0, nullptr, nullptr,
        &MetricsHttpServer::HandleRequest, server.get(), MHD_OPTION_LISTEN_SOCKET, fd,
        MHD_OPTION_THREAD_POOL_SIZE, static_cast<unsigned>(options.http_threads),
        MHD_OPTION_CONNECTION_LIMIT, static_cast<unsigned>(options.http_max_connections),
        MHD_OPTION_THREAD_STACK_SIZE, kThreadStackBytes, MHD_OPTION_NOTIFY_CONNECTION,
        &MetricsHttpServer::NotifyConnection, server.get(), MHD_OPTION_EXTERNAL_LOGGER,
        &MetricsHttpServer::Log, nullptr, MHD_OPTION_END);
    if (server->daemon_ == nullptr) {
      // Not closed here: MHD may have closed it already, and the number may be someone else's.
      return absl::UnavailableError(
          absl::StrCat("metrics endpoint ", options.listen, ": libmicrohttpd did not start"));
    }
    server->reaper_ = std::thread([s = server.get()] { s->Reap(); });
    return server;
  }

  ~MetricsHttpServer() {
    if (daemon_ != nullptr) MHD_stop_daemon(daemon_);
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    if (reaper_.joinable()) reaper_.join();
  }

  int port() const { return port_; }

 private:
  // Pool threads get their own stack size rather than the RLIMIT_STACK default, and one far above
  // the static TLS glibc carves out of it (about 230 KiB with the CUDA libraries).
  static constexpr size_t kThreadStackBytes = size_t{2} << 20;

  // The send buffer of every connection (accepted sockets inherit the listener's), fixed rather
  // than autotuned up to net.ipv4.tcp_wmem's 4 MiB: clients that stop reading then pin at most
  // this much kernel memory each (Linux doubles the figure for bookkeeping). A scrape of the
  // coordinator is ~40 KiB, so it fits whole.
  static constexpr int kSendBufferBytes = 256 << 10;

  struct Open {
    int fd;
    absl::Time deadline;
    bool cut;
  };

  explicit MetricsHttpServer(const PrometheusMetricsOptions& options)
      : request_timeout_(options.http_request_timeout),
        response_timeout_(options.http_response_timeout) {}

  // A bound, listening, non-blocking socket for "host:port".
  static absl::StatusOr<int> Listen(const std::string& address) {
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
    const int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    const int one = 1;
    const int sndbuf = kSendBufferBytes;
    const bool ok = fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
                    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)) == 0 &&
                    bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0;
    const int err = errno;
    freeaddrinfo(ai);
    if (!ok) {
      if (fd >= 0) close(fd);
      return absl::UnavailableError(
          absl::StrCat("metrics endpoint ", address, " cannot listen: ", std::strerror(err)));
    }
    return fd;
  }

  static void NotifyConnection(void* cls, MHD_Connection* connection, void** /*socket_context*/,
                               MHD_ConnectionNotificationCode code) {
    auto* self = static_cast<MetricsHttpServer*>(cls);
    absl::MutexLock lock(&self->mu_);
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
      const MHD_ConnectionInfo* info =
          MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
      if (info == nullptr) return;
      self->open_[connection] = {info->connect_fd, absl::Now() + self->request_timeout_, false};
    } else {
      // MHD closes the socket only after this returns, so the reaper (under the same mutex)
      // never shuts down a descriptor that has been reused.
      self->open_.erase(connection);
    }
  }

  static MHD_Result HandleRequest(void* cls, MHD_Connection* connection, const char* url,
                                  const char* method, const char* /*version*/,
                                  const char* /*upload_data*/, size_t* upload_data_size,
                                  void** request_state) {
    auto* self = static_cast<MetricsHttpServer*>(cls);
    if (*request_state == nullptr) {  // the head is in: the response deadline starts
      *request_state = self;
      absl::MutexLock lock(&self->mu_);
      auto it = self->open_.find(connection);
      if (it != self->open_.end()) it->second.deadline = absl::Now() + self->response_timeout_;
      return MHD_YES;
    }
    *upload_data_size = 0;  // a request body is ignored
    const std::string_view path(url);
    const bool get = std::strcmp(method, MHD_HTTP_METHOD_GET) == 0 ||
                     std::strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    unsigned status = MHD_HTTP_OK;
    std::shared_ptr<const std::string> body;
    if (path != "/metrics") {
      status = MHD_HTTP_NOT_FOUND;
      body = std::make_shared<const std::string>("not found\n");
    } else if (!get) {
      status = MHD_HTTP_METHOD_NOT_ALLOWED;
      body = std::make_shared<const std::string>("method not allowed\n");
    } else {
      body = self->SharedRender();
    }
    // The response holds a reference to the text (scrapes sharing a render share its bytes too);
    // MHD never writes to the buffer.
    auto* held = new std::shared_ptr<const std::string>(std::move(body));
    MHD_Response* response = MHD_create_response_from_buffer_with_free_callback_cls(
        (*held)->size(), const_cast<char*>((*held)->data()),
        [](void* p) { delete static_cast<std::shared_ptr<const std::string>*>(p); }, held);
    if (response == nullptr) {
      delete held;
      return MHD_NO;
    }
    MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8");
    // One request per connection: the deadlines then bound a connection's whole life.
    MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
      MHD_add_response_header(response, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    const MHD_Result queued = MHD_queue_response(connection, status, response);
    MHD_destroy_response(response);
    return queued;
  }

  // Concurrent scrapes share one render: one that arrives while a render is under way takes its
  // result. A burst of scrapes then costs about one render, not one each.
  std::shared_ptr<const std::string> SharedRender() {
    {
      absl::MutexLock lock(&render_mu_);
      if (rendering_) {
        const RenderWait wait = {this, renders_};
        render_mu_.Await(absl::Condition(&RenderWait::Done, &wait));
        return last_render_;
      }
      rendering_ = true;
    }
    auto text = std::make_shared<const std::string>(render_());
    absl::MutexLock lock(&render_mu_);
    last_render_ = text;
    ++renders_;
    rendering_ = false;
    return text;
  }

  struct RenderWait {
    const MetricsHttpServer* server;
    uint64_t seen;
    static bool Done(const RenderWait* w) { return w->server->renders_ != w->seen; }
  };

  static void Log(void* /*cls*/, const char* format, va_list args) {
    char line[512];
    std::vsnprintf(line, sizeof(line), format, args);
    std::string_view text(line);
    while (!text.empty() && text.back() == '\n') text.remove_suffix(1);
    spdlog::debug("metrics http: {}", text);
  }

  void Reap() {
    absl::MutexLock lock(&mu_);
    while (!mu_.AwaitWithTimeout(absl::Condition(&stopping_), kReapInterval)) {
      const absl::Time now = absl::Now();
      for (auto& [connection, open] : open_) {
        if (open.cut || now < open.deadline) continue;
        shutdown(open.fd, SHUT_RDWR);
        open.cut = true;
      }
    }
  }

  static constexpr absl::Duration kReapInterval = absl::Milliseconds(100);

  const absl::Duration request_timeout_;
  const absl::Duration response_timeout_;
  int port_ = 0;
  Render render_;
  absl::Mutex render_mu_;
  bool rendering_ ABSL_GUARDED_BY(render_mu_) = false;
  uint64_t renders_ ABSL_GUARDED_BY(render_mu_) = 0;
  std::shared_ptr<const std::string> last_render_ ABSL_GUARDED_BY(render_mu_);
  MHD_Daemon* daemon_ = nullptr;
  absl::Mutex mu_;
  absl::flat_hash_map<MHD_Connection*, Open> open_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread reaper_;
};

}  // namespace

struct PrometheusMetrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<MetricsHttpServer> http;

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
// The server goes first, while the registry its renders read is whole.
PrometheusMetrics::~PrometheusMetrics() { impl_->http.reset(); }

absl::Status PrometheusMetricsOptions::Validate() const {
  if (http_threads < 1) return absl::InvalidArgumentError("metrics: http_threads must be >= 1");
  if (http_max_connections < http_threads) {
    return absl::InvalidArgumentError(
        "metrics: http_max_connections must be at least http_threads (each thread gets a share)");
  }
  if (http_request_timeout <= absl::ZeroDuration() ||
      http_response_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("metrics: HTTP timeouts must be positive");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<PrometheusMetrics>> PrometheusMetrics::Create(
    const PrometheusMetricsOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
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
  if (!options.listen.empty()) {
    PrometheusMetrics* m = metrics.get();
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http =
        MetricsHttpServer::Start(options, [m] { return m->Text(); });
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
