#include "services/worker/peer/peer_server.h"

#include <unistd.h>

#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "qcal/v1/peer_service.grpc.pb.h"
#include "services/common/rpc.h"

namespace qcal::worker {

using engine::MessageKey;
using engine::MessageKind;

rpc::ServerLimits PeerServerLimits() {
  rpc::ServerLimits limits;
  limits.max_connection_age_grace = absl::InfiniteDuration();
  return limits;
}

absl::Status PeerServerOptions::Validate() const {
  std::string host;
  int port = 0;
  QCAL_RETURN_IF_ERROR(rpc::ParseHostPort(listen, &host, &port));
  QCAL_RETURN_IF_ERROR(limits.Validate());
  if (max_payload_bytes < 0) {
    return absl::InvalidArgumentError("max_payload_bytes must be >= 0");
  }
  return absl::OkStatus();
}

v1::PeerMessageKey ToProto(const MessageKey& key) {
  v1::PeerMessageKey p;
  p.set_block(key.block);
  p.set_step(key.step);
  p.set_kind(static_cast<int>(key.kind));
  p.set_item(key.item);
  p.set_from(key.from);
  return p;
}

MessageKey FromProto(const v1::PeerMessageKey& p) {
  MessageKey key;
  key.block = p.block();
  key.step = p.step();
  key.kind = static_cast<MessageKind>(p.kind());
  key.item = p.item();
  key.from = p.from();
  return key;
}

std::string AdvertiseAddress(const std::string& advertise, const std::string& bound) {
  if (!advertise.empty()) return advertise;
  std::string host;
  int port = 0;
  if (!rpc::ParseHostPort(bound, &host, &port).ok()) return bound;
  if (host != "0.0.0.0" && host != "[::]" && host != "::" && !host.empty()) return bound;
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return bound;
  return absl::StrCat(name, ":", port);
}

namespace {

// Range checks of a key that do not depend on the plan (INVALID_ARGUMENT).
absl::Status CheckKeyShape(const v1::PeerMessageKey& key) {
  if (key.kind() < 0 || key.kind() > static_cast<int>(MessageKind::kTokenCounts)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown message kind ", key.kind()));
  }
  // The gradient pass's partials, retraining's messages and an MoE block's token counts have steps
  // of their own, and only they; an expert unit's partials and layers have one step per unit
  // (checked against the plan on delivery).
  const auto kind = static_cast<MessageKind>(key.kind());
  const bool gradient = kind == MessageKind::kOacPartials;
  const bool retrain = kind == MessageKind::kRetrainBase || kind == MessageKind::kRetrainSamples ||
                       kind == MessageKind::kRetrained;
  const bool routing = kind == MessageKind::kTokenCounts;
  const bool expert = (kind == MessageKind::kPartials || kind == MessageKind::kLayer) &&
                      key.step() >= engine::kStepFirstExpert;
  const int own_step = gradient  ? engine::kStepGradientPass
                       : retrain ? engine::kStepRetrain
                       : routing ? engine::kStepRouting
                                 : -1;
  if (key.block() < 0 || key.step() < 0 ||
      (own_step >= 0 ? key.step() != own_step : !expert && key.step() > engine::kStepBoundary)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad block ", key.block(), " or step ", key.step()));
  }
  int items = 1;
  switch (static_cast<MessageKind>(key.kind())) {
    case MessageKind::kPartials:
    case MessageKind::kStatistic:
      items = engine::kNumLinearInputs;
      break;
    case MessageKind::kLayer:
    case MessageKind::kOacPartials:
    case MessageKind::kRetrainBase:
    case MessageKind::kRetrained:
      items = engine::kNumLinears;
      break;
    case MessageKind::kRetrainSamples:  // a chunk index, checked against the plan on delivery
      items = std::numeric_limits<int>::max();
      break;
    case MessageKind::kControl:
    case MessageKind::kTokenCounts:
      break;
  }
  if (key.item() < 0 || key.item() >= items) {
    return absl::InvalidArgumentError(absl::StrCat("item ", key.item(), " out of range"));
  }
  // An expert unit's statistics are its gate/up and down inputs, its layers gate, up and down.
  const int first_item = kind == MessageKind::kPartials
                             ? static_cast<int>(engine::LinearInput::kGateUp)
                             : static_cast<int>(engine::LinearKind::kGate);
  if (expert && key.item() < first_item) {
    return absl::InvalidArgumentError(
        absl::StrCat("item ", key.item(), " is no expert's (step ", key.step(), ")"));
  }
  return absl::OkStatus();
}

}  // namespace

// The gRPC face: reads the stream, leaves every decision to PeerServer.
class PeerServer::Service final : public v1::PeerService::Service {
 public:
  explicit Service(PeerServer* server) : server_(server) {}

  grpc::Status Deliver(grpc::ServerContext* context, grpc::ServerReader<v1::PeerChunk>* reader,
                       v1::DeliverResponse* response) override {
    v1::PeerChunk chunk;
    if (!reader->Read(&chunk) || !chunk.has_header()) {
      return rpc::ToGrpcStatus(absl::InvalidArgumentError("Deliver must start with a header"));
    }
    const v1::PeerHeader header = chunk.header();
    if (absl::Status s = CheckKeyShape(header.key()); !s.ok()) return rpc::ToGrpcStatus(s);
    if (header.size() < 0) {
      return rpc::ToGrpcStatus(absl::InvalidArgumentError("negative payload size"));
    }
    if (header.size() > server_->options_.max_payload_bytes) {
      return rpc::ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat("payload of ", header.size(), " bytes exceeds the limit of ",
                       server_->options_.max_payload_bytes)));
    }
    // Refuse before reading the payload where possible.
    {
      absl::MutexLock lock(&server_->mu_);
      bool duplicate = false;
      if (absl::Status s = server_->Check(header, &duplicate); !s.ok()) {
        return rpc::ToGrpcStatus(s);
      }
    }
    std::string payload;
    payload.reserve(static_cast<size_t>(header.size()));
    int64_t chunks = 0;
    while (reader->Read(&chunk)) {
      if (!chunk.has_data()) {
        return rpc::ToGrpcStatus(absl::InvalidArgumentError("Deliver: a second header"));
      }
      if (chunk.data().size() > rpc::kChunkBytes) {
        return rpc::ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
            "Deliver: a piece of ", chunk.data().size(), " bytes exceeds ", rpc::kChunkBytes)));
      }
      if (static_cast<int64_t>(payload.size() + chunk.data().size()) > header.size()) {
        return rpc::ToGrpcStatus(absl::DataLossError(
            absl::StrCat("payload runs past its declared ", header.size(), " bytes")));
      }
      payload += chunk.data();
      ++chunks;
    }
    if (context->IsCancelled()) {
      return rpc::ToGrpcStatus(absl::CancelledError("the sender went away"));
    }
    return rpc::ToGrpcStatus(server_->Deliver(header, std::move(payload), chunks));
  }

 private:
  PeerServer* const server_;
};

absl::StatusOr<std::unique_ptr<PeerServer>> PeerServer::Start(const PeerServerOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  auto server = std::unique_ptr<PeerServer>(new PeerServer());
  server->options_ = options;
  server->service_ = std::make_unique<Service>(server.get());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(rpc::kMaxMessageBytes);
  builder.SetMaxSendMessageSize(rpc::kMaxMessageBytes);
  // A second worker on the same port must fail, not share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  options.limits.Apply(builder);
  builder.RegisterService(server->service_.get());
  server->server_ = builder.BuildAndStart();
  if (!server->server_ || port == 0) {
    return absl::UnavailableError(absl::StrCat("peer service cannot listen on ", options.listen));
  }
  std::string host;
  int requested = 0;
  QCAL_RETURN_IF_ERROR(rpc::ParseHostPort(options.listen, &host, &requested));
  server->address_ = absl::StrCat(host, ":", port);
  return server;
}

PeerServer::~PeerServer() {
  ClearTask();
  // In-flight deliveries are cancelled after 1 s; the server goes before the mailbox it fills.
  if (server_ == nullptr) return;  // Start failed
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server_.reset();
}

absl::Status PeerServer::SetTask(const std::string& job_id, const engine::GangPlan& plan) {
  if (job_id.empty()) return absl::InvalidArgumentError("SetTask: empty job id");
  QCAL_RETURN_IF_ERROR(plan.Validate());
  absl::MutexLock lock(&mu_);
  ++generation_;
  has_task_ = true;
  job_id_ = job_id;
  plan_ = plan;
  mailbox_.clear();
  accepted_.clear();
  arrived_.SignalAll();
  return absl::OkStatus();
}

void PeerServer::ClearTask() {
  absl::MutexLock lock(&mu_);
  ++generation_;
  has_task_ = false;
  job_id_.clear();
  mailbox_.clear();
  accepted_.clear();
  arrived_.SignalAll();
}

bool PeerServer::RunsTask(const std::string& job_id, uint64_t epoch) const {
  absl::MutexLock lock(&mu_);
  return has_task_ && job_id_ == job_id && plan_.epoch == epoch;
}

absl::Status PeerServer::Check(const v1::PeerHeader& header, bool* duplicate) const {
  *duplicate = false;
  if (!has_task_) {
    return absl::UnavailableError(
        absl::StrCat("not ready: no task here yet (message for job ", header.job_id(), ")"));
  }
  const int rank = plan_.rank;
  if (header.job_id() != job_id_) {
    return absl::FailedPreconditionError(
        absl::StrCat("rank ", rank, " runs job ", job_id_, ", not job ", header.job_id()));
  }
  if (header.gang_epoch() < plan_.epoch) {
    return absl::FailedPreconditionError(absl::StrCat("stale gang epoch ", header.gang_epoch(),
                                                      ", the gang runs under ", plan_.epoch));
  }
  if (header.gang_epoch() > plan_.epoch) {
    return absl::UnavailableError(absl::StrCat("not ready: gang epoch ", header.gang_epoch(),
                                               " not opened yet, rank ", rank, " runs under ",
                                               plan_.epoch));
  }
  const MessageKey key = FromProto(header.key());
  const std::string what = engine::DescribeKey(key);
  if (key.from < 0 || key.from >= plan_.world || key.from == rank) {
    return absl::FailedPreconditionError(absl::StrCat(what, " to rank ", rank, ": sender outside ",
                                                      "the gang of ", plan_.world,
                                                      " or equal to the receiver"));
  }
  if (key.step >= engine::kStepFirstExpert &&
      (key.kind == MessageKind::kPartials || key.kind == MessageKind::kLayer)) {
    // An expert unit's: its partials go to the unit's owner, its solved linears come from it.
    const int unit = key.step - engine::kStepFirstExpert;
    if (unit >= static_cast<int>(plan_.expert_owners.size())) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": the plan has ", plan_.expert_owners.size(), " expert units"));
    }
    const int owner = plan_.ExpertOwner(unit);
    if (key.kind == MessageKind::kPartials && owner != rank) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, ": rank ", rank, " does not own that expert unit (rank ", owner, " does)"));
    }
    if (key.kind == MessageKind::kLayer && key.from != owner) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": the sender does not own that expert unit (rank ", owner, " does)"));
    }
  } else {
    switch (key.kind) {
      case MessageKind::kPartials: {
        const int owner = plan_.StatOwner(static_cast<engine::LinearInput>(key.item));
        if (owner != rank) {
          return absl::FailedPreconditionError(absl::StrCat(
              what, ": rank ", rank, " does not own that statistic (rank ", owner, " does)"));
        }
        break;
      }
      case MessageKind::kStatistic: {
        const auto input = static_cast<engine::LinearInput>(key.item);
        const int owner = plan_.StatOwner(input);
        if (key.from != owner) {
          return absl::FailedPreconditionError(absl::StrCat(
              what, ": the sender does not own that statistic (rank ", owner, " does)"));
        }
        if (key.step != engine::kStepSmoothing) {
          bool consumer = false;
          for (int r : plan_.ConsumerOwners(input)) consumer = consumer || r == rank;
          if (!consumer) {
            return absl::FailedPreconditionError(
                absl::StrCat(what, ": rank ", rank, " owns no consumer of that statistic"));
          }
        }
        break;
      }
      case MessageKind::kLayer: {
        const int owner = plan_.OwnerOf(static_cast<engine::LinearKind>(key.item));
        if (key.from != owner) {
          return absl::FailedPreconditionError(
              absl::StrCat(what, ": the sender does not own that linear (rank ", owner, " does)"));
        }
        break;
      }
      case MessageKind::kOacPartials: {
        const int owner = plan_.OwnerOf(static_cast<engine::LinearKind>(key.item));
        if (owner != rank) {
          return absl::FailedPreconditionError(absl::StrCat(
              what, ": rank ", rank, " does not own that linear (rank ", owner, " does)"));
        }
        break;
      }
      case MessageKind::kTokenCounts:  // every rank sends its counts to every other
        break;
      case MessageKind::kControl:
        if (key.from != 0) {
          return absl::FailedPreconditionError(
              absl::StrCat(what, ": control messages come from rank 0 only"));
        }
        break;
      case MessageKind::kRetrainBase:
      case MessageKind::kRetrainSamples: {
        if (rank != engine::kRetrainRank) {
          return absl::FailedPreconditionError(absl::StrCat(what, ": rank ", rank,
                                                            " does not train the block (rank ",
                                                            engine::kRetrainRank, " does)"));
        }
        if (key.kind == MessageKind::kRetrainBase &&
            key.from != plan_.OwnerOf(static_cast<engine::LinearKind>(key.item))) {
          return absl::FailedPreconditionError(
              absl::StrCat(what, ": the sender does not own that linear"));
        }
        if (key.kind == MessageKind::kRetrainSamples) {
          const engine::ChunkRange& held = plan_.chunks[static_cast<size_t>(key.from)];
          if (key.item < held.begin || key.item >= held.end) {
            return absl::FailedPreconditionError(
                absl::StrCat(what, ": the sender does not hold that chunk"));
          }
        }
        break;
      }
      case MessageKind::kRetrained:
        if (key.from != engine::kRetrainRank) {
          return absl::FailedPreconditionError(absl::StrCat(
              what, ": retrained linears come from rank ", engine::kRetrainRank, " only"));
        }
        break;
    }
  }
  const auto seen = accepted_.find(key);
  if (seen != accepted_.end()) {
    if (seen->second != header.sha256()) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": already delivered with another payload"));
    }
    *duplicate = true;
  }
  return absl::OkStatus();
}

absl::Status PeerServer::Deliver(const v1::PeerHeader& header, std::string payload,
                                 int64_t chunks) {
  if (static_cast<int64_t>(payload.size()) != header.size()) {
    return absl::DataLossError(
        absl::StrCat("payload of ", payload.size(), " bytes, header says ", header.size()));
  }
  if (Sha256Hex(payload) != header.sha256()) {
    return absl::DataLossError("payload sha256 differs from the header's");
  }
  absl::MutexLock lock(&mu_);
  // The task may have changed while the payload travelled: check again.
  bool duplicate = false;
  QCAL_RETURN_IF_ERROR(Check(header, &duplicate));
  if (duplicate) return absl::OkStatus();
  const MessageKey key = FromProto(header.key());
  accepted_[key] = header.sha256();
  mailbox_[key] = std::move(payload);
  ++stats_.messages;
  stats_.data_chunks += chunks;
  stats_.bytes += header.size();
  arrived_.SignalAll();
  return absl::OkStatus();
}

absl::StatusOr<std::string> PeerServer::Receive(const MessageKey& key, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  if (!has_task_) {
    return absl::FailedPreconditionError(
        absl::StrCat("receiving ", engine::DescribeKey(key), ": no task"));
  }
  const uint64_t generation = generation_;
  for (;;) {
    if (generation_ != generation) {
      return absl::CancelledError(
          absl::StrCat("receiving ", engine::DescribeKey(key), ": the task was cleared"));
    }
    auto it = mailbox_.find(key);
    if (it != mailbox_.end()) {
      std::string payload = std::move(it->second);
      mailbox_.erase(it);
      return payload;
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("no ", engine::DescribeKey(key), " within ", absl::FormatDuration(timeout)));
    }
    arrived_.WaitWithDeadline(&mu_, deadline);
  }
}

PeerServer::Stats PeerServer::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace qcal::worker
