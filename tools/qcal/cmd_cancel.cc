// qcal cancel JOB: cancels a job (at once when queued, at the next block boundary when running)
// and prints its state after the request (or the job as JSON with --json).
#include <cstdio>
#include <memory>
#include <string>

#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/common/quant_client.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct CancelArgs {
  ConnectionFlags connection;
  std::string job_id;
  bool json = false;
};

absl::Status RunCancel(const CancelArgs& a) {
  QCAL_ASSIGN_OR_RETURN(auto client, service::QuantClient::Open(ToClientOptions(a.connection)));
  QCAL_ASSIGN_OR_RETURN(v1::Job job, client->Cancel(a.job_id));
  if (a.json) {
    std::printf("%s\n", service::JobToJson(job).dump().c_str());
  } else {
    std::printf("%s %s%s\n", job.job_id().c_str(), service::JobStateName(job.state()).c_str(),
                job.cancel_requested() && job.state() == v1::JOB_STATE_RUNNING
                    ? " (stops at the next block boundary)"
                    : "");
  }
  return absl::OkStatus();
}

}  // namespace

RunFn AddCancel(CLI::App& app) {
  auto a = std::make_shared<CancelArgs>();
  AddConnectionFlags(app, a->connection);
  app.add_option("job", a->job_id, "Job id")->required();
  app.add_flag("--json", a->json, "Print the job as one JSON object");
  return [a] { return RunCancel(*a); };
}

}  // namespace qcal::cli
