// The worker's side of the internal peer service (DESIGN section 7): a gRPC server for
// qcal.v1.PeerService and the mailbox it fills. Peers Deliver the messages of the engine's
// Transport (services/engine/gang/transport.h) here; the local GrpcTransport takes them out with
// Receive.
//
// Delivery. One Deliver stream carries one message: a PeerHeader, then the payload in pieces of at
// most rpc::kChunkBytes (3.5 MiB). The header is checked before the payload is read, and again,
// with the payload's size and sha256, when it is complete. Answers:
//   OK                   the message is in the mailbox (or it was already there, or already
//                        received, with the same sha256: a resent message is accepted once);
//   UNAVAILABLE          not ready: this worker has no task yet, or runs the job under an older
//                        gang epoch than the message's (gang epochs only grow). The sender retries
//                        until its deadline, so a peer that is merely slower to open its task does
//                        not fail the attempt;
//   FAILED_PRECONDITION  refused for good, with the reason: another job; an older ("stale") gang
//                        epoch; a sender outside the gang or equal to this rank; kPartials to a
//                        rank that is not the statistic's owner (GangPlan::StatOwner); kStatistic
//                        from a rank that is not its owner, or (except at kStepSmoothing, whose
//                        statistics go to every rank) to a rank that owns none of its consumers;
//                        kLayer from a rank that does not own that linear; kControl from a rank
//                        other than 0; at an MoE block's expert step (engine::ExpertStep),
//                        kPartials to a rank that does not own the expert unit
//                        (GangPlan::ExpertOwner), kLayer from one that does not, or a unit the
//                        plan does not have; a key already delivered with another payload;
//   INVALID_ARGUMENT     a malformed stream (no header first, a second header, a key out of range,
//                        a piece over rpc::kChunkBytes);
//   RESOURCE_EXHAUSTED   a payload over PeerServerOptions::max_payload_bytes;
//   DATA_LOSS            the payload's size or sha256 differs from the header's.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "qcal/v1/peer_service.pb.h"
#include "services/common/rpc.h"
#include "services/engine/gang/plan.h"
#include "services/engine/gang/transport.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace qcal::worker {

// The default connection limits of a peer server (see PeerServerOptions::limits).
rpc::ServerLimits PeerServerLimits();

struct PeerServerOptions {
  // host:port to listen on; port 0 picks a free one (see PeerServer::address()).
  // Default: "127.0.0.1:0".
  std::string listen = "127.0.0.1:0";
  // Largest payload of one message, bytes. Larger ones get RESOURCE_EXHAUSTED.
  // Default: 16 GiB (the largest layer of a 70B model is about 0.2 GiB quantized).
  int64_t max_payload_bytes = int64_t{16} << 30;
  // Connection limits (keepalive enforcement, idle and age limits, streams per connection).
  // Default: rpc::ServerLimits's, except that a connection past its maximum age keeps its
  // deliveries in flight as long as they take (no grace limit: a message may take minutes, and
  // peers are not behind a load balancer that the age limit would rebalance).
  rpc::ServerLimits limits = PeerServerLimits();

  absl::Status Validate() const;
};

// The message in transit: the PeerHeader <-> engine::MessageKey mapping.
v1::PeerMessageKey ToProto(const engine::MessageKey& key);
engine::MessageKey FromProto(const v1::PeerMessageKey& key);

// What peers should dial: `advertise` when set, else `bound` (a PeerServer's address()) with a
// wildcard host (0.0.0.0, [::], empty) replaced by this machine's hostname.
std::string AdvertiseAddress(const std::string& advertise, const std::string& bound);

class PeerServer {
 public:
  // Counters since Start, for metrics and tests.
  struct Stats {
    int64_t messages = 0;     // messages accepted into the mailbox
    int64_t data_chunks = 0;  // payload pieces of those messages
    int64_t bytes = 0;        // payload bytes of those messages
  };

  // Binds and starts serving (no task yet: every delivery is not ready). UNAVAILABLE naming the
  // address when it cannot listen there.
  static absl::StatusOr<std::unique_ptr<PeerServer>> Start(const PeerServerOptions& options);
  // Shuts the server down (in-flight deliveries are cancelled) and wakes waiting Receives.
  ~PeerServer();

  // The bound address, host:port with the port chosen (for listen "127.0.0.1:0":
  // "127.0.0.1:40123").
  const std::string& address() const { return address_; }

  // Accepts messages of `job_id` under `plan.epoch`, as rank plan.rank of the gang. Replaces the
  // previous task: its undelivered messages are dropped and its waiting Receives get CANCELLED.
  // INVALID_ARGUMENT when the plan is inconsistent (GangPlan::Validate) or job_id is empty.
  absl::Status SetTask(const std::string& job_id, const engine::GangPlan& plan);
  // Back to no task (deliveries are not ready); waiting Receives get CANCELLED.
  void ClearTask();
  // Whether the current task is `job_id` under gang epoch `epoch`.
  bool RunsTask(const std::string& job_id, uint64_t epoch) const;

  // Waits up to `timeout` for message `key` of the current task and takes it out of the mailbox.
  // DEADLINE_EXCEEDED naming the key after `timeout`; CANCELLED when the task is cleared or
  // replaced meanwhile; FAILED_PRECONDITION without a task.
  absl::StatusOr<std::string> Receive(const engine::MessageKey& key, absl::Duration timeout);

  Stats stats() const;

 private:
  class Service;

  PeerServer() = default;
  // The checks of a header against the current task (see the file comment). OK when the message
  // may be delivered; *duplicate is set when the same message is already here (accept, drop).
  absl::Status Check(const v1::PeerHeader& header, bool* duplicate) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Deliver(const v1::PeerHeader& header, std::string payload, int64_t chunks);

  PeerServerOptions options_;
  std::string address_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;

  mutable absl::Mutex mu_;
  absl::CondVar arrived_;
  // Bumped by SetTask and ClearTask, so that waiting Receives notice.
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool has_task_ ABSL_GUARDED_BY(mu_) = false;
  std::string job_id_ ABSL_GUARDED_BY(mu_);
  engine::GangPlan plan_ ABSL_GUARDED_BY(mu_);
  std::map<engine::MessageKey, std::string> mailbox_ ABSL_GUARDED_BY(mu_);
  // sha256 of every message accepted under this task, received or not (duplicate detection).
  std::map<engine::MessageKey, std::string> accepted_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qcal::worker
