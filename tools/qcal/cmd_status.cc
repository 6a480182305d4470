// qcal status JOB: one job's state, progress, gang (rank, worker, peer address, chunks, owned
// linears) while it runs, and result (or the job as JSON with --json).
#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/common/quant_client.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct StatusArgs {
  ConnectionFlags connection;
  std::string job_id;
  bool json = false;
};

absl::Status RunStatus(const StatusArgs& a) {
  QCAL_ASSIGN_OR_RETURN(auto client, service::QuantClient::Open(ToClientOptions(a.connection)));
  QCAL_ASSIGN_OR_RETURN(v1::Job job, client->Get(a.job_id));
  if (a.json) {
    std::printf("%s\n", service::JobToJson(job).dump().c_str());
    return absl::OkStatus();
  }
  std::printf("%s %s (%s)  blocks %d/%d  checkpoint %d  attempts %d  output %s\n",
              job.job_id().c_str(), service::JobStateName(job.state()).c_str(),
              service::JobStageName(job.stage()).c_str(), job.blocks_done(), job.num_blocks(),
              job.checkpoint_block(), job.attempts(), job.spec().output_name().c_str());
  if (job.gang_size() > 0) {
    std::printf("gang epoch %llu, %d worker%s:\n",
                static_cast<unsigned long long>(job.gang_epoch()), job.gang_size(),
                job.gang_size() == 1 ? "" : "s");
    for (const v1::GangMember& m : job.gang()) {
      std::printf("  rank %-2d %-12s %-21s chunks [%d,%d)  linears %s\n", m.rank(),
                  m.worker_id().c_str(), m.peer_address().empty() ? "-" : m.peer_address().c_str(),
                  m.chunk_begin(), m.chunk_end(), service::OwnedLinearsText(m).c_str());
    }
  }
  if (job.has_result()) {
    std::printf("perplexity %.4f (full precision %.4f)\n", job.result().perplexity(),
                job.result().perplexity_fp());
  }
  if (!job.error().empty()) std::printf("error: %s\n", job.error().c_str());
  return absl::OkStatus();
}

}  // namespace

RunFn AddStatus(CLI::App& app) {
  auto a = std::make_shared<StatusArgs>();
  AddConnectionFlags(app, a->connection);
  app.add_option("job", a->job_id, "Job id")->required();
  app.add_flag("--json", a->json, "Print the job as one JSON object");
  return [a] { return RunStatus(*a); };
}

}  // namespace qcal::cli
