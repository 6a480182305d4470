// PrometheusMetrics: the Metrics of metrics.h on prometheus-cpp (registry and text format), the
// only code that includes its headers or libmicrohttpd's. Serves GET /metrics over HTTP when given
// a listen address, on GNU libmicrohttpd: a pool of threads each multiplexing many connections, a
// connection limit, and a deadline for reading each request and one for writing each response.
// (Not prometheus-cpp's civetweb exposer: civetweb's threads have 100 KiB stacks, fixed when
// Debian built it, and glibc carves the process's static TLS out of them; OpenBLAS's and the CUDA
// libraries' TLS, linked here through the engine, leave too little or none. docs/OPERATIONS.md.)
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/coordinator/metrics.h"

namespace qcal::coordinator {

struct PrometheusMetricsOptions {
  // "host:port" to serve GET /metrics on (an IPv6 host in brackets; port 0 picks a free port), or
  // "" for no endpoint. Default: "" (none).
  std::string listen;
  // Threads serving the endpoint. Each multiplexes its connections, so a slow or stalled client
  // holds a connection slot, never a thread; a scrape renders on one of them. Default: 4.
  int http_threads = 4;
  // Connections open at once over all threads. Beyond it, new connections wait in the kernel's
  // listen backlog until a slot frees. Default: 64.
  int http_max_connections = 64;
  // From accept until the request head is complete; a connection still sending its head then is
  // closed. Checked every 100 ms. Default: 5 s.
  absl::Duration http_request_timeout = absl::Seconds(5);
  // From the complete request head until the whole response is sent; a client that reads too
  // slowly (or not at all) is then cut off. Checked every 100 ms. Default: 10 s.
  absl::Duration http_response_timeout = absl::Seconds(10);

  // InvalidArgument naming the field when a value is out of range.
  absl::Status Validate() const;
};

class PrometheusMetrics final : public Metrics {
 public:
  // Starts the /metrics endpoint when `options.listen` is set. Errors name the address.
  static absl::StatusOr<std::unique_ptr<PrometheusMetrics>> Create(
      const PrometheusMetricsOptions& options);
  ~PrometheusMetrics() override;

  // The bound HTTP port, 0 without an endpoint.
  int port() const;
  // The current metrics in the Prometheus text format.
  std::string Text() const;

  void SetJobs(const std::map<std::string, int>& by_state) override;
  void ObserveJobDuration(const std::string& final_state, double seconds) override;
  void ObserveStage(const std::string& stage, double seconds) override;
  void SetBlocks(int64_t done, int64_t total) override;
  void AddBlockCommitted() override;
  void SetCalibrationTokensPerSecond(double tokens_per_second) override;
  void SetHessianFlopsPerSecond(double flops_per_second) override;
  void ObserveLayer(double solve_seconds, double rel_error_rtn, double rel_error,
                    double rel_error_er) override;
  void SetWorkerLeases(int leases) override;
  void AddLeaseExpiry() override;
  void AddTaskRetry() override;
  void ObserveRpc(const std::string& method, const std::string& code, double seconds) override;
  void ObserveStoreWrite(double seconds, int64_t bytes, bool ok) override;
  void SetStoreWritable(bool writable) override;
  void SetDeviceMemory(int64_t bytes) override;
  void SetJobPeakMemory(int64_t rss_bytes, int64_t device_bytes) override;
  void AddExchange(int rank, int64_t bytes, double wait_seconds) override;
  void ObserveBlockExchange(int rank, int64_t bytes, double wait_seconds) override;

 private:
  struct Impl;
  explicit PrometheusMetrics(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcal::coordinator
