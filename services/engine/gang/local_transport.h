// A Transport connecting the W ranks of one gang inside one process (tests, and a local gang of
// threads): shared mailboxes, one per rank. A message is delivered, or refused with the receiver's
// reasons of the contract (transport.h), when it is sent; Receive waits for it.
//
// Refusals (FAILED_PRECONDITION, naming DescribeKey and both ranks): a sender under another gang
// epoch than the receiver's; kPartials to a rank that does not complete that statistic
// (GangPlan::StatOwner); kStatistic from a rank that does not complete it; kLayer from a rank that
// does not own that linear; kOacPartials to a rank that does not own that linear. Also refused: a
// rank outside the gang or this rank itself as the receiver, a key whose `from` is not this rank,
// an item outside its kind's range (INVALID_ARGUMENT), and a message already delivered and not yet
// received (ALREADY_EXISTS).
//
// Thread safety: every method may be called from any thread; one rank's transport is meant for
// that rank's thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "services/engine/gang/plan.h"
#include "services/engine/gang/transport.h"

namespace qcal::engine {

class LocalTransport final : public Transport {
 public:
  // The transports of all plan.world ranks (index: rank), connected to each other under
  // plan.epoch. `plan` is any rank's plan (they share epoch, chunks and owners); it must be valid.
  static std::vector<std::unique_ptr<LocalTransport>> Connect(const GangPlan& plan);
  // Another transport for this rank on the same mailboxes whose messages carry `epoch` (a stale
  // member, for tests of the refusal).
  std::unique_ptr<LocalTransport> WithEpoch(uint64_t epoch) const;

  absl::Status Send(int to, const MessageKey& key, std::string payload) override;
  absl::StatusOr<std::string> Receive(const MessageKey& key, absl::Duration timeout) override;
  int64_t bytes_sent() const override { return bytes_sent_.load(); }
  double receive_wait_seconds() const override { return wait_seconds_.load(); }

 private:
  struct Mailboxes;
  LocalTransport(std::shared_ptr<Mailboxes> boxes, int rank, uint64_t epoch)
      : boxes_(std::move(boxes)), rank_(rank), epoch_(epoch) {}

  std::shared_ptr<Mailboxes> boxes_;
  const int rank_;
  const uint64_t epoch_;
  std::atomic<int64_t> bytes_sent_{0};
  std::atomic<double> wait_seconds_{0};
};

}  // namespace qcal::engine
