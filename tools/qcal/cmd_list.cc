// qcal list: every job, oldest first, one line each (or {"jobs": [...]} with --json).
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/common/job_spec.h"
#include "services/common/quant_client.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct ListArgs {
  ConnectionFlags connection;
  std::string state;
  bool json = false;
};

absl::Status RunList(const ListArgs& a) {
  v1::JobState filter = v1::JOB_STATE_UNSPECIFIED;
  if (!a.state.empty()) {
    std::string upper = a.state;
    std::transform(upper.begin(), upper.end(), upper.begin(),
                   [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    if (!v1::JobState_Parse(absl::StrCat("JOB_STATE_", upper), &filter) ||
        filter == v1::JOB_STATE_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--state \"", a.state, "\" is not one of queued, running, succeeded, failed, cancelled"));
    }
  }
  QCAL_ASSIGN_OR_RETURN(auto client, service::QuantClient::Open(ToClientOptions(a.connection)));
  QCAL_ASSIGN_OR_RETURN(std::vector<v1::Job> jobs, client->List(filter));
  if (a.json) {
    nlohmann::ordered_json j;
    j["jobs"] = nlohmann::ordered_json::array();
    for (const v1::Job& job : jobs) j["jobs"].push_back(service::JobToJson(job));
    std::printf("%s\n", j.dump().c_str());
    return absl::OkStatus();
  }
  for (const v1::Job& job : jobs) {
    std::printf("%-20s %-9s %3d/%-3d %-16s %s\n", job.job_id().c_str(),
                service::JobStateName(job.state()).c_str(), job.blocks_done(), job.num_blocks(),
                job.client().c_str(), job.spec().output_name().c_str());
  }
  return absl::OkStatus();
}

}  // namespace

RunFn AddList(CLI::App& app) {
  auto a = std::make_shared<ListArgs>();
  AddConnectionFlags(app, a->connection);
  app.add_option("--state", a->state, "Only jobs in this state (queued, running, ...)");
  app.add_flag("--json", a->json, "Print {\"jobs\": [...]} as one JSON object");
  return [a] { return RunList(*a); };
}

}  // namespace qcal::cli
