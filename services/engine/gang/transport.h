// How the workers of a gang talk to each other during a block (DESIGN section 2, step 3, and
// section 7): messages of bytes, each named by a MessageKey, sent by one rank to another under the
// gang epoch of the plan. The engine only sees this interface; the worker's implementation goes
// over the internal gRPC peer service (services/worker/peer/), in chunks of at most 3.5 MiB, and a
// GPU-direct one (NCCL) can sit behind the same interface. LocalTransport (local_transport.h)
// connects the ranks of one process, for tests.
//
// What travels, per block (see exchange.h for the payloads):
//   kPartials   a rank's partial statistics of one step and item (the aligned subtrees of the
//               canonical reduction it holds), to the item's statistic owner;
//   kStatistic  a completed statistic, from its owner to the other owners of its consumers;
//   kLayer      a solved linear (its artifact and report), from its owner to every other rank;
//   kControl    small decisions one rank makes for all (for example whether to checkpoint at this
//               boundary), from rank 0 to every other rank;
//   kOacPartials the gradient pass's partial output-adaptive statistics of one linear (step
//               kStepGradientPass, item the LinearKind), to the linear's owner, which completes
//               the canonical reduction and persists the result.
// Retraining (step kStepRetrain; recipes with a retrain section; DESIGN section 2, step 3.4), the
// trainer being rank 0 (kRetrainRank):
//   kRetrainBase    a solved linear's frozen base W̃ (and Fisher, saliency), from its owner to the
//                   trainer (item the LinearKind);
//   kRetrainSamples one chunk's quantized-path block inputs and full-precision targets, from the
//                   rank holding it to the trainer (item the global chunk index);
//   kRetrained      a retrained linear (artifact and report, as kLayer), from the trainer to every
//                   other rank (item the LinearKind).
// Mixture-of-experts blocks (docs/MOE.md), after the attention groups:
//   kTokenCounts    a rank's tokens routed to each expert over its chunks (step kStepRouting, item
//                   0; num_experts little-endian int64), to every other rank;
//   kPartials / kLayer at step ExpertStep(u): expert unit u's partial statistics (item the
//                   LinearInput, kGateUp or kDown) to the unit's owner (GangPlan::ExpertOwner),
//                   and its solved linears (item the LinearKind) from the owner to every other
//                   rank.
// A receiver refuses (FAILED_PRECONDITION) a message under another gang epoch or for another job,
// kPartials it does not own the statistic of, kStatistic from a rank that does not own it,
// kLayer from a rank that does not own that linear (an expert step: that unit), kOacPartials of a
// linear it does not own,
// kRetrainBase and kRetrainSamples when it is not the trainer (and kRetrainBase from a rank that
// does not own the linear), and kRetrained from a rank that is not the trainer.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace qcal::engine {

enum class MessageKind {
  kPartials = 0,
  kStatistic = 1,
  kLayer = 2,
  kControl = 3,
  kOacPartials = 4,
  kRetrainBase = 5,
  kRetrainSamples = 6,
  kRetrained = 7,
  kTokenCounts = 8
};

// The steps of a block that exchange messages.
inline constexpr int kStepSmoothing = 0;  // smoothing statistics of the full-precision block
// 1 + LinearInput: the statistics (and solved layers) of that sub-layer group. Without
// true_sequential the four groups still use their own steps.
inline constexpr int StepOf(int linear_input) { return 1 + linear_input; }
inline constexpr int kStepBoundary = 5;  // control messages at the end of the block
// The gradient pass (DESIGN section 2, step 4), before the block loop: kOacPartials of the
// pass's block `block`.
inline constexpr int kStepGradientPass = 6;
// Retraining of block `block`, after its last group is installed and pushed.
inline constexpr int kStepRetrain = 7;
// The rank that trains every block (the lowest-index gang member).
inline constexpr int kRetrainRank = 0;
// Mixture-of-experts blocks: the token counts, then one step per expert unit u.
inline constexpr int kStepRouting = 8;
inline constexpr int kStepFirstExpert = 9;
inline constexpr int ExpertStep(int unit) { return kStepFirstExpert + unit; }

struct MessageKey {
  int block = 0;
  int step = 0;
  MessageKind kind = MessageKind::kPartials;
  // kPartials / kStatistic: the LinearInput index (kStepSmoothing: the LinearInput index too);
  // kLayer, kOacPartials, kRetrainBase, kRetrained: the LinearKind index; kRetrainSamples: the
  // global chunk index; kControl: 0.
  int item = 0;
  // The sending rank.
  int from = 0;
  auto tie() const { return std::make_tuple(block, step, static_cast<int>(kind), item, from); }
  bool operator<(const MessageKey& o) const { return tie() < o.tie(); }
  bool operator==(const MessageKey& o) const { return tie() == o.tie(); }
};

// "block 3 step 2 layer 4 from rank 1", for errors.
std::string DescribeKey(const MessageKey& key);

class Transport {
 public:
  virtual ~Transport() = default;
  // Delivers `payload` to rank `to` (not this rank) under `key` (key.from is this rank). Returns
  // once the receiver holds it. Errors: the receiver refused it (FAILED_PRECONDITION, with its
  // reason), it could not be reached before the deadline (DEADLINE_EXCEEDED / UNAVAILABLE).
  virtual absl::Status Send(int to, const MessageKey& key, std::string payload) = 0;
  // The payload of the message `key` sent to this rank, waiting up to `timeout` for it to arrive
  // (DEADLINE_EXCEEDED naming the key after that). Each message is received once.
  virtual absl::StatusOr<std::string> Receive(const MessageKey& key, absl::Duration timeout) = 0;
  // Payload bytes this rank has sent (framing excluded), and seconds spent in Receive waiting.
  virtual int64_t bytes_sent() const = 0;
  virtual double receive_wait_seconds() const = 0;
};

}  // namespace qcal::engine
