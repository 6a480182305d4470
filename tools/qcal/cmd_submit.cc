// qcal submit: sends a job to a qcal-coordinator (DESIGN section 7). Paths are relative to the
// coordinator's input root; the recipe file is read here and sent as fields. Prints the job id
// (or the job as JSON); with --wait, follows the job and exits 0 only when it SUCCEEDED.
// Also home of the connection flags every service subcommand shares.
#include <cstdio>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/common/quant_client.h"
#include "services/engine/recipe.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {

void AddConnectionFlags(CLI::App& app, ConnectionFlags& f) {
  app.add_option("--coordinator", f.coordinator,
                 "Coordinator address host:port (default 127.0.0.1:50051)");
  app.add_option("--tls-ca", f.tls_ca, "CA of the coordinator's certificate (PEM); turns TLS on");
  app.add_option("--tls-cert", f.tls_cert, "Client certificate (PEM), for mTLS");
  app.add_option("--tls-key", f.tls_key, "Client private key (PEM), for mTLS");
  app.add_option("--tls-server-name", f.tls_server_name, "Name expected in the server certificate");
  app.add_option("--token-file", f.token_file, "File holding the bearer token");
  app.add_option("--client-id", f.client_id,
                 "Identify as this client (x-qcal-client) when auth is off");
  app.add_option("--timeout-seconds", f.timeout_seconds, "Deadline of each call (default 30)")
      ->check(CLI::PositiveNumber);
}

rpc::ClientOptions ToClientOptions(const ConnectionFlags& f) {
  rpc::ClientOptions o;
  o.address = f.coordinator;
  o.tls_ca = f.tls_ca;
  o.tls_cert = f.tls_cert;
  o.tls_key = f.tls_key;
  o.tls_server_name = f.tls_server_name;
  o.token_file = f.token_file;
  o.client_id = f.client_id;
  o.timeout = absl::Seconds(f.timeout_seconds);
  return o;
}

namespace {

struct SubmitArgs {
  ConnectionFlags connection;
  v1::JobSpec spec;
  std::string recipe_path;
  int samples = 0, seq_len = 0, threads = 0, eval_seq_len = 0, eval_max_windows = 0;
  uint64_t seed = 0;
  std::string eval_text, idempotency_key, workers;
  bool overwrite = false, wait = false, json = false;
  CLI::App* app = nullptr;
};

absl::Status RunSubmit(SubmitArgs& a) {
  v1::SubmitJobRequest request;
  v1::JobSpec& spec = *request.mutable_spec();
  spec = a.spec;
  QCAL_ASSIGN_OR_RETURN(engine::Recipe recipe, engine::LoadRecipeFile(a.recipe_path));
  *spec.mutable_recipe() = service::RecipeToProto(recipe);
  spec.set_samples(a.samples);
  spec.set_seq_len(a.seq_len);
  // Unset options stay unset: the coordinator applies the documented defaults.
  if (a.app->count("--seed") > 0) spec.set_seed(a.seed);
  if (a.app->count("--threads") > 0) spec.set_threads(a.threads);
  if (!a.workers.empty()) {
    // N, or MIN:MAX; the coordinator checks the range (1 <= MIN <= MAX <= 64).
    const size_t colon = a.workers.find(':');
    int min = 0, max = 0;
    const bool ok = colon == std::string::npos
                        ? absl::SimpleAtoi(a.workers, &min) && (max = min, true)
                        : absl::SimpleAtoi(a.workers.substr(0, colon), &min) &&
                              absl::SimpleAtoi(a.workers.substr(colon + 1), &max);
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("--workers \"", a.workers, "\" is not N or MIN:MAX"));
    }
    spec.mutable_workers()->set_min(min);
    spec.mutable_workers()->set_max(max);
  }
  if (!a.eval_text.empty()) spec.set_eval_text(a.eval_text);
  if (a.app->count("--eval-seq-len") > 0) spec.set_eval_seq_len(a.eval_seq_len);
  if (a.app->count("--eval-max-windows") > 0) spec.set_eval_max_windows(a.eval_max_windows);
  if (a.overwrite) spec.set_overwrite(true);
  request.set_idempotency_key(a.idempotency_key);

  QCAL_ASSIGN_OR_RETURN(auto client, service::QuantClient::Open(ToClientOptions(a.connection)));
  QCAL_ASSIGN_OR_RETURN(v1::SubmitJobResponse submitted, client->Submit(request));
  const v1::Job& job = submitted.job();
  if (!a.wait) {
    if (a.json) {
      std::printf("%s\n", service::JobToJson(job).dump().c_str());
    } else {
      std::printf("%s\n", job.job_id().c_str());
    }
    return absl::OkStatus();
  }
  if (!a.json) {
    std::printf("%s\n", job.job_id().c_str());
    std::fflush(stdout);
  }
  ProgressPrinter printer;
  QCAL_ASSIGN_OR_RETURN(
      v1::Job final_job,
      client->Watch(job.job_id(), [&](const v1::ProgressEvent& e) { printer.Print(e); }));
  printer.Finish();
  if (a.json) std::printf("%s\n", service::JobToJson(final_job).dump().c_str());
  return FinalJobStatus(final_job);
}

}  // namespace

RunFn AddSubmit(CLI::App& app) {
  auto a = std::make_shared<SubmitArgs>();
  a->app = &app;
  AddConnectionFlags(app, a->connection);
  app.add_option_function<std::string>(
         "--model", [a](const std::string& v) { a->spec.set_model(v); },
         "Model directory, relative to the input root")
      ->required();
  app.add_option("--recipe", a->recipe_path, "Recipe YAML (read here, sent as fields)")->required();
  app.add_option_function<std::string>(
         "--calib", [a](const std::string& v) { a->spec.set_calib(v); },
         "Calibration text, relative to the input root")
      ->required();
  app.add_option("--samples", a->samples, "Number of calibration samples N")
      ->required()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--seq-len", a->seq_len, "Calibration sample length L in tokens (BOS included)")
      ->required()
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--seed", a->seed, "Calibration sampling seed (default 0)")
      ->check(NonNegativeInteger());
  app.add_option("--threads", a->threads,
                 "Threads the job runs with (default: the first worker's --threads)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--workers", a->workers,
                 "Workers sharing the job: N, or MIN:MAX (it starts with MIN free matching "
                 "workers and takes up to MAX; default 1)");
  app.add_option_function<std::string>(
         "--output-name", [a](const std::string& v) { a->spec.set_output_name(v); },
         "Output directory name, created under the output root")
      ->required();
  app.add_option("--eval-text", a->eval_text, "Evaluation text, relative to the input root");
  app.add_option("--eval-seq-len", a->eval_seq_len, "Evaluation window length (default: --seq-len)")
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--eval-max-windows", a->eval_max_windows,
                 "Evaluate only the first K windows (default: all)");
  app.add_flag("--overwrite", a->overwrite, "Replace an existing output of that name");
  app.add_option("--idempotency-key", a->idempotency_key,
                 "Resubmitting with the same key and spec returns the same job");
  app.add_flag("--wait", a->wait,
               "Follow the job (progress on stderr); exit 0 only if it SUCCEEDED");
  app.add_flag("--json", a->json, "Print the job as one JSON object instead of its id");
  return [a] { return RunSubmit(*a); };
}

}  // namespace qcal::cli
