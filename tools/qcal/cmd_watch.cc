// qcal watch: follows a job's progress events until it is final. A live progress bar on a
// terminal, one plain line per event otherwise (stderr either way); stdout gets the final state
// (or the job as JSON). Exit 0 only when the job SUCCEEDED. Also home of ProgressPrinter.
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/common/quant_client.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

std::string FormatEta(double seconds) {
  if (seconds < 0) return "--:--";
  const int s = static_cast<int>(seconds + 0.5);
  return s >= 3600 ? absl::StrFormat("%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60)
                   : absl::StrFormat("%d:%02d", s / 60, s % 60);
}

}  // namespace

ProgressPrinter::ProgressPrinter() : tty_(isatty(STDERR_FILENO) == 1) {}

void ProgressPrinter::Print(const v1::ProgressEvent& e) {
  const std::string stage = service::JobStageName(e.stage());
  const std::string state = service::JobStateName(e.state());
  const std::string block = e.stage() == v1::JOB_STAGE_QUANTIZING && e.block() >= 0
                                ? absl::StrCat(" block ", e.block() + 1)
                                : "";
  const std::string rate =
      e.tokens_per_second() > 0 ? absl::StrFormat("  %.0f tok/s", e.tokens_per_second()) : "";
  if (tty_) {
    // A new plan (start or re-plan) names the gang: keep it on its own line above the bar.
    if (e.message().find("gang epoch ") != std::string::npos) {
      std::fprintf(stderr, "\r\033[K%s\n", e.message().c_str());
    }
    constexpr int kWidth = 24;
    const int filled = e.num_blocks() > 0 ? kWidth * e.blocks_done() / e.num_blocks() : 0;
    std::string bar(filled, '#');
    bar.append(kWidth - filled, '-');
    std::fprintf(stderr, "\r\033[K[%s] %d/%d blocks  %s%s  ETA %s%s  %s", bar.c_str(),
                 e.blocks_done(), e.num_blocks(), stage.c_str(), block.c_str(),
                 FormatEta(e.eta_seconds()).c_str(), rate.c_str(), state.c_str());
    drawn_ = true;
  } else {
    std::fprintf(stderr, "%s %s %s%s %d/%d eta %s%s: %s\n", e.job_id().c_str(), state.c_str(),
                 stage.c_str(), block.c_str(), e.blocks_done(), e.num_blocks(),
                 FormatEta(e.eta_seconds()).c_str(), rate.c_str(), e.message().c_str());
  }
  std::fflush(stderr);
}

void ProgressPrinter::Finish() {
  if (drawn_) std::fprintf(stderr, "\n");
  drawn_ = false;
}

absl::Status FinalJobStatus(const v1::Job& job) {
  if (job.state() == v1::JOB_STATE_SUCCEEDED) return absl::OkStatus();
  return absl::AbortedError(absl::StrCat("job ", job.job_id(), " ",
                                         service::JobStateName(job.state()),
                                         job.error().empty() ? "" : ": ", job.error()));
}

namespace {

struct WatchArgs {
  ConnectionFlags connection;
  std::string job_id;
  bool json = false;
};

absl::Status RunWatch(const WatchArgs& a) {
  QCAL_ASSIGN_OR_RETURN(auto client, service::QuantClient::Open(ToClientOptions(a.connection)));
  ProgressPrinter printer;
  QCAL_ASSIGN_OR_RETURN(
      v1::Job job, client->Watch(a.job_id, [&](const v1::ProgressEvent& e) { printer.Print(e); }));
  printer.Finish();
  if (a.json) {
    std::printf("%s\n", service::JobToJson(job).dump().c_str());
  } else {
    std::printf("%s\n", service::JobStateName(job.state()).c_str());
  }
  return FinalJobStatus(job);
}

}  // namespace

RunFn AddWatch(CLI::App& app) {
  auto a = std::make_shared<WatchArgs>();
  AddConnectionFlags(app, a->connection);
  app.add_option("job", a->job_id, "Job id")->required();
  app.add_flag("--json", a->json, "Print the final job as one JSON object");
  return [a] { return RunWatch(*a); };
}

}  // namespace qcal::cli
