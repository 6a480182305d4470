// The engine's Transport (services/engine/gang/transport.h) over the internal gRPC peer service:
// Send delivers to the peer's PeerServer (peer_server.h), Receive takes from the local one.
//
// Send: one Deliver stream per message (a PeerHeader with size and sha256, then pieces of at most
// chunk_bytes), under a deadline of timeout + timeout_per_mib per MiB of payload. UNAVAILABLE,
// whether the peer cannot be reached or is not ready (no task yet, or a newer gang epoch than it
// has opened), is retried with backoff (20 ms doubling to 1 s) until that deadline; then the send
// fails with DEADLINE_EXCEEDED, naming the peer's rank and address and the last error. Any other
// error, a refusal (FAILED_PRECONDITION) above all, is returned at once with the same code and the
// receiver's reason, prefixed by the key and the peer.
//
// Use: the worker opens the job's task on its PeerServer (SetTask) before it creates the
// transport, and clears it after the attempt; the transport does not own the server.
//
// Thread safety: Send and Receive may be called from several threads at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "qcal/v1/peer_service.grpc.pb.h"
#include "services/common/rpc.h"
#include "services/engine/gang/plan.h"
#include "services/engine/gang/transport.h"
#include "services/worker/peer/peer_server.h"

namespace qcal::worker {

struct GrpcTransportOptions {
  // Deadline of one Send, retries included, before the payload's share. Default: 120 s.
  absl::Duration timeout = absl::Seconds(120);
  // Added to a Send's deadline per MiB of payload (a floor of 10 MiB/s). Default: 100 ms.
  absl::Duration timeout_per_mib = absl::Milliseconds(100);
  // Payload bytes per PeerChunk; at most rpc::kChunkBytes. Default: rpc::kChunkBytes (3.5 MiB).
  int64_t chunk_bytes = static_cast<int64_t>(rpc::kChunkBytes);

  absl::Status Validate() const;
};

class GrpcTransport final : public engine::Transport {
 public:
  // `peers[r]` is the host:port of rank r's peer service (this rank's own entry is not dialled).
  // `mailbox` is this worker's PeerServer and must outlive the transport. INVALID_ARGUMENT for an
  // inconsistent plan, a peer list of the wrong size, or bad options. Does not connect yet.
  static absl::StatusOr<std::unique_ptr<GrpcTransport>> Create(
      const std::string& job_id, const engine::GangPlan& plan,
      const std::vector<std::string>& peers, PeerServer* mailbox,
      const GrpcTransportOptions& options);

  // Retries UNAVAILABLE (and a receiver not ready yet) until the deadline; gives up at once with
  // CANCELLED when the local peer server stops running this job and epoch (the task was dropped).
  absl::Status Send(int to, const engine::MessageKey& key, std::string payload) override;
  // Delegates to the mailbox; FAILED_PRECONDITION when it does not run this job and gang epoch.
  absl::StatusOr<std::string> Receive(const engine::MessageKey& key,
                                      absl::Duration timeout) override;
  int64_t bytes_sent() const override { return bytes_sent_.load(); }
  double receive_wait_seconds() const override;

 private:
  GrpcTransport() = default;
  // One Deliver stream, finished by `deadline`.
  absl::Status DeliverOnce(int to, const v1::PeerHeader& header, const std::string& payload,
                           absl::Time deadline) const;

  std::string job_id_;
  engine::GangPlan plan_;
  std::vector<std::string> peers_;
  PeerServer* mailbox_ = nullptr;
  GrpcTransportOptions options_;
  // One channel and stub per distinct peer address, made in Create; stubs are thread-safe.
  std::map<std::string, std::unique_ptr<v1::PeerService::Stub>> stubs_;

  std::atomic<int64_t> bytes_sent_{0};
  std::atomic<int64_t> receive_wait_nanos_{0};
};

}  // namespace qcal::worker
