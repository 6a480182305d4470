// The worker's side of a gang (DESIGN section 7): the plan a task carries, as the engine's
// GangPlan, and the Transport the engine exchanges over, wrapped so that fault injection can stop
// or kill the process at exact exchange points (stages "exchange": a statistic's partials or a
// completed statistic about to go out; "expert": an MoE block's expert unit's partials about to go
// to the unit's owner (after "exchange"); "solve": an owner about to send a layer it solved;
// "gradient": the gradient pass's partials of a block about to go to a linear's owner).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "qcal/v1/worker_service.pb.h"
#include "services/common/fault_injection.h"
#include "services/engine/gang/plan.h"
#include "services/engine/gang/transport.h"

namespace qcal::worker {

// The engine's plan from a task's GangPlan (validated: ranges tile the chunks, every linear and
// every expert unit 0..U-1 named by the members has exactly one owner). `num_samples` must give
// the plan's chunk count; JobSession::Open checks U against the model.
absl::StatusOr<engine::GangPlan> PlanFromProto(const v1::GangPlan& proto, int num_samples);

// The peers' addresses, by rank.
std::vector<std::string> PeerAddresses(const v1::GangPlan& proto);

// Forwards to `inner`, hitting the fault points first, and remembers the first exchange that
// failed (so that the task can tell a failed exchange from a failed job). Both must outlive it.
// Used from the thread that runs the task.
class FaultingTransport final : public engine::Transport {
 public:
  FaultingTransport(engine::Transport* inner, service::FaultInjector* faults)
      : inner_(inner), faults_(faults) {}
  absl::Status Send(int to, const engine::MessageKey& key, std::string payload) override;
  absl::StatusOr<std::string> Receive(const engine::MessageKey& key,
                                      absl::Duration timeout) override;
  int64_t bytes_sent() const override { return inner_->bytes_sent(); }
  double receive_wait_seconds() const override { return inner_->receive_wait_seconds(); }
  // OK until a Send or Receive failed; then that error.
  const absl::Status& first_error() const { return first_error_; }

 private:
  absl::Status Note(absl::Status s);

  engine::Transport* const inner_;
  service::FaultInjector* const faults_;
  absl::Status first_error_;
};

}  // namespace qcal::worker
