#include "services/worker/peer/grpc_transport.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "common/status.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace qcal::worker {

absl::Status GrpcTransportOptions::Validate() const {
  if (timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the peer send timeout must be > 0");
  }
  if (timeout_per_mib < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the peer send timeout per MiB must be >= 0");
  }
  if (chunk_bytes < 1 || chunk_bytes > static_cast<int64_t>(rpc::kChunkBytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer chunk bytes ", chunk_bytes, " outside [1, ", rpc::kChunkBytes, "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GrpcTransport>> GrpcTransport::Create(
    const std::string& job_id, const engine::GangPlan& plan, const std::vector<std::string>& peers,
    PeerServer* mailbox, const GrpcTransportOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_RETURN_IF_ERROR(plan.Validate());
  if (job_id.empty()) return absl::InvalidArgumentError("peer transport: empty job id");
  if (mailbox == nullptr) return absl::InvalidArgumentError("peer transport: no local server");
  if (static_cast<int>(peers.size()) != plan.world) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer transport: ", peers.size(), " addresses for a gang of ", plan.world));
  }
  auto t = std::unique_ptr<GrpcTransport>(new GrpcTransport());
  t->job_id_ = job_id;
  t->plan_ = plan;
  t->peers_ = peers;
  t->mailbox_ = mailbox;
  t->options_ = options;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(rpc::kMaxMessageBytes);
  args.SetMaxSendMessageSize(rpc::kMaxMessageBytes);
  // Reconnect quickly to a peer that is still starting or restarting.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  rpc::SetClientKeepalive(args);
  for (int r = 0; r < plan.world; ++r) {
    const std::string& address = peers[static_cast<size_t>(r)];
    if (r == plan.rank || t->stubs_.count(address) != 0) continue;
    std::string host;
    int port = 0;
    QCAL_RETURN_IF_ERROR(rpc::ParseHostPort(address, &host, &port));
    t->stubs_[address] = v1::PeerService::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
  }
  return t;
}

absl::Status GrpcTransport::DeliverOnce(int to, const v1::PeerHeader& header,
                                        const std::string& payload, absl::Time deadline) const {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(deadline));
  v1::DeliverResponse response;
  v1::PeerService::Stub& stub = *stubs_.at(peers_[static_cast<size_t>(to)]);
  std::unique_ptr<grpc::ClientWriter<v1::PeerChunk>> writer = stub.Deliver(&context, &response);
  v1::PeerChunk chunk;
  *chunk.mutable_header() = header;
  // A failed Write means the stream is over (the receiver refused or went away): Finish says why.
  bool ok = writer->Write(chunk);
  const size_t step = static_cast<size_t>(options_.chunk_bytes);
  for (size_t offset = 0; ok && offset < payload.size(); offset += step) {
    chunk.set_data(payload.data() + offset, std::min(step, payload.size() - offset));
    ok = writer->Write(chunk);
  }
  if (ok) writer->WritesDone();
  return rpc::FromGrpcStatus(writer->Finish());
}

absl::Status GrpcTransport::Send(int to, const engine::MessageKey& key, std::string payload) {
  if (to < 0 || to >= plan_.world || to == plan_.rank) {
    return absl::InvalidArgumentError(
        absl::StrCat("send to rank ", to, " from rank ", plan_.rank, " of ", plan_.world));
  }
  if (key.from != plan_.rank) {
    return absl::InvalidArgumentError(
        absl::StrCat("send of ", engine::DescribeKey(key), " by rank ", plan_.rank));
  }
  v1::PeerHeader header;
  header.set_job_id(job_id_);
  header.set_gang_epoch(plan_.epoch);
  *header.mutable_key() = ToProto(key);
  header.set_size(static_cast<int64_t>(payload.size()));
  header.set_sha256(Sha256Hex(payload));

  const absl::Time start = absl::Now();
  const absl::Time deadline = start + options_.timeout +
                              options_.timeout_per_mib * (static_cast<double>(payload.size()) /
                                                          static_cast<double>(1 << 20));
  const std::string& address = peers_[static_cast<size_t>(to)];
  absl::Duration backoff = absl::Milliseconds(20);
  absl::Status last;  // the last UNAVAILABLE, which says more than the final DEADLINE_EXCEEDED
  for (int attempts = 1;; ++attempts) {
    const absl::Status s = DeliverOnce(to, header, payload, deadline);
    if (s.ok()) {
      bytes_sent_.fetch_add(static_cast<int64_t>(payload.size()));
      return absl::OkStatus();
    }
    if (s.code() != absl::StatusCode::kUnavailable &&
        s.code() != absl::StatusCode::kDeadlineExceeded) {
      return absl::Status(s.code(), absl::StrCat("sending ", engine::DescribeKey(key), " to rank ",
                                                 to, " at ", address, ": ", s.message()));
    }
    if (s.code() == absl::StatusCode::kUnavailable || last.ok()) last = s;
    const absl::Time now = absl::Now();
    if (s.code() == absl::StatusCode::kDeadlineExceeded || now >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "sending ", engine::DescribeKey(key), " to rank ", to, " at ", address,
          ": gave up after ", attempts, " attempts in ", absl::FormatDuration(now - start),
          "; last error ", absl::StatusCodeToString(last.code()), ": ", last.message()));
    }
    // The task was dropped or replaced meanwhile (a re-plan): stop retrying at once.
    if (!mailbox_->RunsTask(job_id_, plan_.epoch)) {
      return absl::CancelledError(absl::StrCat("sending ", engine::DescribeKey(key), " to rank ",
                                               to, ": this worker no longer runs job ", job_id_,
                                               " under gang epoch ", plan_.epoch));
    }
    absl::SleepFor(std::min(backoff, deadline - now));
    backoff = std::min(backoff * 2, absl::Seconds(1));
  }
}

absl::StatusOr<std::string> GrpcTransport::Receive(const engine::MessageKey& key,
                                                   absl::Duration timeout) {
  if (!mailbox_->RunsTask(job_id_, plan_.epoch)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "receiving ", engine::DescribeKey(key), ": the local peer server does not run ", "job ",
        job_id_, " under gang epoch ", plan_.epoch));
  }
  const absl::Time start = absl::Now();
  absl::StatusOr<std::string> r = mailbox_->Receive(key, timeout);
  receive_wait_nanos_.fetch_add(absl::ToInt64Nanoseconds(absl::Now() - start));
  return r;
}

double GrpcTransport::receive_wait_seconds() const {
  return static_cast<double>(receive_wait_nanos_.load()) * 1e-9;
}

}  // namespace qcal::worker
