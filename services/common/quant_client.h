// A client of the public QuantService for the CLI and tests: each call with the connection's
// deadline and metadata; Watch follows a job across stream deadlines and coordinator restarts.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "qcal/v1/quant_service.grpc.pb.h"
#include "services/common/rpc.h"

namespace qcal::service {

class QuantClient {
 public:
  static absl::StatusOr<std::unique_ptr<QuantClient>> Open(const rpc::ClientOptions& options);

  absl::StatusOr<v1::SubmitJobResponse> Submit(const v1::SubmitJobRequest& request);
  absl::StatusOr<v1::Job> Get(const std::string& job_id);
  // Every job (all pages), oldest first; `state` filters unless JOB_STATE_UNSPECIFIED.
  absl::StatusOr<std::vector<v1::Job>> List(v1::JobState state);
  absl::StatusOr<v1::Job> Cancel(const std::string& job_id);
  // Calls on_event for each progress event until the job is final, then returns it. Streams are
  // reopened (each has a 60 s deadline) while the coordinator is unreachable for less than
  // `patience`; UNAVAILABLE after that.
  absl::StatusOr<v1::Job> Watch(const std::string& job_id,
                                const std::function<void(const v1::ProgressEvent&)>& on_event,
                                absl::Duration patience = absl::Seconds(60));

 private:
  QuantClient() = default;
  std::unique_ptr<rpc::Connection> connection_;
  std::unique_ptr<v1::QuantService::Stub> stub_;
};

}  // namespace qcal::service
