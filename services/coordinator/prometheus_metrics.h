// PrometheusMetrics: the Metrics of metrics.h on prometheus-cpp (registry and text format), the
// only code that includes its headers. Serves GET /metrics over HTTP when given a listen address
// (its own small server; see the .cc for why not prometheus-cpp's civetweb exposer).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "services/coordinator/metrics.h"

namespace qcal::coordinator {

class PrometheusMetrics final : public Metrics {
 public:
  // `listen`: "host:port" for the /metrics endpoint (port 0 picks a free port), or "" for none.
  // Errors name the address.
  static absl::StatusOr<std::unique_ptr<PrometheusMetrics>> Create(const std::string& listen);
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
