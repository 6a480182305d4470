#include "services/common/quant_client.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status.h"
#include "services/common/job_spec.h"

namespace qcal::service {

absl::StatusOr<std::unique_ptr<QuantClient>> QuantClient::Open(const rpc::ClientOptions& options) {
  auto c = std::unique_ptr<QuantClient>(new QuantClient());
  QCAL_ASSIGN_OR_RETURN(c->connection_, rpc::Connection::Open(options));
  c->stub_ = v1::QuantService::NewStub(c->connection_->channel());
  return c;
}

absl::StatusOr<v1::SubmitJobResponse> QuantClient::Submit(const v1::SubmitJobRequest& request) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::SubmitJobResponse response;
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->SubmitJob(&context, request, &response)));
  return response;
}

absl::StatusOr<v1::Job> QuantClient::Get(const std::string& job_id) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->GetJob(&context, request, &job)));
  return job;
}

absl::StatusOr<std::vector<v1::Job>> QuantClient::List(v1::JobState state) {
  std::vector<v1::Job> jobs;
  v1::ListJobsRequest request;
  request.set_state(state);
  request.set_page_size(1000);
  for (;;) {
    grpc::ClientContext context;
    connection_->Prepare(&context);
    v1::ListJobsResponse response;
    QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->ListJobs(&context, request, &response)));
    jobs.insert(jobs.end(), response.jobs().begin(), response.jobs().end());
    if (response.next_page_token().empty()) return jobs;
    request.set_page_token(response.next_page_token());
  }
}

absl::StatusOr<v1::Job> QuantClient::Cancel(const std::string& job_id) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::CancelJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->CancelJob(&context, request, &job)));
  return job;
}

absl::StatusOr<v1::Job> QuantClient::Watch(
    const std::string& job_id, const std::function<void(const v1::ProgressEvent&)>& on_event,
    absl::Duration patience) {
  absl::Time last_contact = absl::Now();
  absl::Status last_error;
  while (absl::Now() - last_contact < patience) {
    grpc::ClientContext context;
    connection_->Prepare(&context, absl::Seconds(60));
    v1::WatchJobRequest request;
    request.set_job_id(job_id);
    std::unique_ptr<grpc::ClientReader<v1::ProgressEvent>> reader =
        stub_->WatchJob(&context, request);
    v1::ProgressEvent event;
    bool final = false;
    while (reader->Read(&event)) {
      last_contact = absl::Now();
      on_event(event);
      final = IsFinal(event.state());
    }
    const absl::Status s = rpc::FromGrpcStatus(reader->Finish());
    if (final || s.ok()) {
      absl::StatusOr<v1::Job> job = Get(job_id);
      if (job.ok() && IsFinal(job->state())) return job;
      if (!job.ok() && !absl::IsUnavailable(job.status())) return job.status();
      continue;
    }
    if (!absl::IsUnavailable(s) && !absl::IsDeadlineExceeded(s)) return s;
    last_error = s;
    if (absl::IsDeadlineExceeded(s)) {
      last_contact = absl::Now();  // a quiet job (a long block), not a lost coordinator
    } else {
      absl::SleepFor(absl::Milliseconds(500));
    }
  }
  return absl::UnavailableError(
      absl::StrCat("lost the coordinator while watching ", job_id, ": ", last_error.message()));
}

}  // namespace qcal::service
