// Integration-test harness: real qcal-coordinator and qcal-worker processes on loopback (port 0,
// ports read from the coordinator's --port-file), a test model tree, the `qcal quantize` baseline,
// and output comparison. Every wait is bounded.
//
// The model is stories260k from ../shared when present (5 blocks), else the synthetic tiny model
// (2 blocks), so the tests also run on a machine without ../shared; a cluster may ask for the
// synthetic tiny model of another architecture instead (a mixture-of-experts family, say).
#pragma once

#include <sys/types.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "qcal/v1/types.pb.h"
#include "services/common/quant_client.h"

namespace qcal::testing {

// A child process with stdout and stderr appended to a log file. Killed (SIGKILL) and reaped on
// destruction if still running.
class Process {
 public:
  static std::unique_ptr<Process> Start(const std::string& path,
                                        const std::vector<std::string>& args,
                                        const std::map<std::string, std::string>& env,
                                        const std::string& log_path);
  ~Process();
  pid_t pid() const { return pid_; }
  // Sends `sig`; no-op once reaped.
  void Signal(int sig);
  // Waits up to `timeout` for the process to end. True when it ended; then exited()/exit_code()/
  // term_signal() describe how.
  bool Wait(absl::Duration timeout);
  bool running();
  bool exited() const { return exited_; }
  int exit_code() const { return exit_code_; }
  int term_signal() const { return term_signal_; }
  const std::string& log_path() const { return log_path_; }
  std::string LogTail(size_t bytes = 4000) const;

 private:
  Process() = default;
  pid_t pid_ = -1;
  bool reaped_ = false;
  bool exited_ = false;
  int exit_code_ = -1;
  int term_signal_ = 0;
  std::string log_path_;
};

// The job inputs of the integration tests.
struct TestModel {
  std::string model;  // relative to the input root
  std::string calib;  // relative
  std::string eval;   // relative
  int num_blocks = 0;
};

// A coordinator, its workers and the shared trees, all under one temp dir.
class Cluster {
 public:
  // Creates <tmp>/{input,output,data,logs}; the model goes to input/ (copied, not linked: the
  // input root confines symlinks). `synth_arch` (`qcal synth --arch`, e.g. "qwen2_moe"): the
  // synthetic tiny checkpoint of that architecture (2 blocks), written once per process.
  explicit Cluster(const std::string& name, const std::string& synth_arch = "");
  ~Cluster();

  const std::string& root() const { return root_; }
  const std::string& input_root() const { return input_; }
  const std::string& output_root() const { return output_; }
  const std::string& data_dir() const { return data_; }
  const TestModel& model() const { return model_; }

  // Starts a coordinator (port 0 the first time, the same port after a restart so that workers
  // find it again) and waits for its port file. Extra flags (replacing the defaults they name)
  // and environment (QCAL_FAULT) apply to this start only. Test defaults: lease 2 s, heartbeat
  // 0.25 s, store reopen 1 s.
  void StartCoordinator(const std::vector<std::string>& extra_args = {},
                        const std::map<std::string, std::string>& env = {});
  Process* coordinator() { return coordinator_.get(); }
  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  std::string address() const;

  // Starts a worker with --threads 1 (plus extra flags / environment).
  Process* StartWorker(const std::vector<std::string>& extra_args = {},
                       const std::map<std::string, std::string>& env = {});

  // A client identifying as `client_id`, with `token_file` (default: the one UseToken set).
  std::unique_ptr<service::QuantClient> Client(const std::string& client_id = "test",
                                               const std::string& token_file = "");
  // The bearer token file the harness's own clients (WaitFinal, ...) send when auth is on.
  void UseToken(const std::string& token_file) { token_file_ = token_file; }
  // TLS files the harness's clients use (CA of the server; client certificate and key for mTLS).
  void UseTls(const std::string& ca, const std::string& cert, const std::string& key) {
    tls_ca_ = ca;
    tls_cert_ = cert;
    tls_key_ = key;
  }

  // The spec the tests submit: GPTQ 4-bit g32 with 8-bit activations, ASER smoothing (4 outlier
  // channels) and rank-8 error reconstruction, 16 samples × 64 tokens, seed 7, threads 1,
  // evaluation on 4 windows of 64.
  v1::JobSpec Spec(const std::string& output_name) const;
  // The recipe file of Spec() (for the CLI and `qcal quantize`).
  std::string RecipePath() const;
  // Spec() with `recipe_yaml`, `samples` samples of 32 tokens and workers {min, max}: the jobs of
  // the many-workers tests (chunks of 8 samples split among the gang).
  v1::JobSpec GangSpec(const std::string& output_name, const char* recipe_yaml, int samples,
                       int min_workers, int max_workers) const;
  // Submits `spec` (a test failure when refused) and returns the job id ("" when refused).
  std::string SubmitSpec(const v1::JobSpec& spec);

  // Polls GetJob until the job is final or `timeout` passes; fails at once if the coordinator
  // died.
  absl::StatusOr<v1::Job> WaitFinal(const std::string& job_id, absl::Duration timeout);
  // Polls until the job's state is `state`.
  bool WaitState(const std::string& job_id, v1::JobState state, absl::Duration timeout);

  // Logs of every process started, for failure messages.
  std::string Logs() const;

 private:
  std::string root_, input_, output_, data_, logs_;
  TestModel model_;
  std::unique_ptr<Process> coordinator_;
  std::vector<std::unique_ptr<Process>> workers_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  int starts_ = 0;
  std::string token_file_;
  std::string tls_ca_, tls_cert_, tls_key_;
};

// `qcal quantize` of Cluster::Spec()'s job into `out` (local mode, same recipe, seed, threads).
// Computed once per process (the first caller's cluster provides the inputs).
std::string LocalBaseline(const Cluster& cluster);

// Empty when `a` and `b` hold the same files with the same bytes, qcal_run.json aside; else a
// description of the first difference.
std::string CompareOutputs(const std::string& a, const std::string& b);

// GET http://127.0.0.1:port/path; the body, or an error.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);
// One value of a metric in the coordinator's /metrics text ("name" or "name{labels}"), -1 when
// absent or unreadable.
double Metric(Cluster& c, const std::string& series);
// A free loopback TCP port (bound and released).
int FreePort();
// Waits up to 30 s until the coordinator counts `n` worker leases (a test failure otherwise).
void WaitForWorkers(Cluster& c, int n);
// `qcal quantize --workers N` of a many-workers job (Cluster::GangSpec with `recipe_yaml` and
// `samples`) on the cluster's inputs, into a fresh directory; returns its output directory.
std::string LocalGangRun(const Cluster& c, const char* recipe_yaml, int samples, int workers);

}  // namespace qcal::testing
