#include "services/engine/gang/local_transport.h"

#include <chrono>
#include <map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace qcal::engine {

struct LocalTransport::Mailboxes {
  explicit Mailboxes(GangPlan p) : plan(std::move(p)) {}
  const GangPlan plan;
  absl::Mutex mu;
  // Delivered, not yet received: by receiving rank and key.
  std::map<std::pair<int, MessageKey>, std::string> pending ABSL_GUARDED_BY(mu);
};

std::vector<std::unique_ptr<LocalTransport>> LocalTransport::Connect(const GangPlan& plan) {
  auto boxes = std::make_shared<Mailboxes>(plan);
  std::vector<std::unique_ptr<LocalTransport>> out;
  for (int r = 0; r < plan.world; ++r) {
    out.push_back(std::unique_ptr<LocalTransport>(new LocalTransport(boxes, r, plan.epoch)));
  }
  return out;
}

std::unique_ptr<LocalTransport> LocalTransport::WithEpoch(uint64_t epoch) const {
  return std::unique_ptr<LocalTransport>(new LocalTransport(boxes_, rank_, epoch));
}

absl::Status LocalTransport::Send(int to, const MessageKey& key, std::string payload) {
  const GangPlan& plan = boxes_->plan;
  const std::string what = absl::StrCat(DescribeKey(key), " to rank ", to);
  if (to < 0 || to >= plan.world || to == rank_ || key.from != rank_) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank_, " cannot send ", what, " in a gang of ", plan.world));
  }
  const bool per_input = key.kind == MessageKind::kPartials || key.kind == MessageKind::kStatistic;
  const bool per_linear =
      key.kind == MessageKind::kLayer || key.kind == MessageKind::kOacPartials ||
      key.kind == MessageKind::kRetrainBase || key.kind == MessageKind::kRetrained;
  const bool per_chunk = key.kind == MessageKind::kRetrainSamples;
  const int items = per_input    ? kNumLinearInputs
                    : per_linear ? kNumLinears
                    : per_chunk  ? plan.total_chunks
                                 : 1;
  if (key.item < 0 || key.item >= items) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": no such item"));
  }
  auto refuse = [&](const std::string& why) {
    return absl::FailedPreconditionError(absl::StrCat("rank ", to, " refuses ", what, ": ", why));
  };
  if (epoch_ != plan.epoch) {
    return refuse(absl::StrCat("sent under gang epoch ", epoch_, ", not ", plan.epoch));
  }
  const bool expert_step = key.step >= kStepFirstExpert;
  if (expert_step) {
    const int unit = key.step - kStepFirstExpert;
    if (unit >= static_cast<int>(plan.expert_owners.size()) ||
        (key.kind != MessageKind::kPartials && key.kind != MessageKind::kLayer)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": no such expert message"));
    }
    const int owner = plan.ExpertOwner(unit);
    if (key.kind == MessageKind::kPartials && to != owner) {
      return refuse(absl::StrCat("it does not own that expert (rank ", owner, " does)"));
    }
    if (key.kind == MessageKind::kLayer && key.from != owner) {
      return refuse(absl::StrCat("the sender does not own that expert (rank ", owner, " does)"));
    }
  } else if (per_input) {
    const int owner = plan.StatOwner(static_cast<LinearInput>(key.item));
    if (key.kind == MessageKind::kPartials && to != owner) {
      return refuse(absl::StrCat("it does not complete that statistic (rank ", owner, " does)"));
    }
    if (key.kind == MessageKind::kStatistic && key.from != owner) {
      return refuse(
          absl::StrCat("the sender does not complete that statistic (rank ", owner, " does)"));
    }
  }
  if (key.kind == MessageKind::kLayer && !expert_step) {
    const int owner = plan.OwnerOf(static_cast<LinearKind>(key.item));
    if (key.from != owner) {
      return refuse(absl::StrCat("the sender does not own that linear (rank ", owner, " does)"));
    }
  }
  if (key.kind == MessageKind::kOacPartials) {
    const int owner = plan.OwnerOf(static_cast<LinearKind>(key.item));
    if (to != owner) {
      return refuse(absl::StrCat("it does not own that linear (rank ", owner, " does)"));
    }
  }
  if ((key.kind == MessageKind::kRetrainBase || key.kind == MessageKind::kRetrainSamples) &&
      to != kRetrainRank) {
    return refuse(absl::StrCat("it does not train the block (rank ", kRetrainRank, " does)"));
  }
  if (key.kind == MessageKind::kRetrainBase &&
      key.from != plan.OwnerOf(static_cast<LinearKind>(key.item))) {
    return refuse("the sender does not own that linear");
  }
  if (key.kind == MessageKind::kRetrained && key.from != kRetrainRank) {
    return refuse(
        absl::StrCat("the sender does not train the block (rank ", kRetrainRank, " does)"));
  }
  const int64_t bytes = static_cast<int64_t>(payload.size());
  {
    absl::MutexLock lock(&boxes_->mu);
    if (!boxes_->pending.emplace(std::make_pair(to, key), std::move(payload)).second) {
      return absl::AlreadyExistsError(absl::StrCat(what, " was already delivered"));
    }
  }
  bytes_sent_ += bytes;
  return absl::OkStatus();
}

absl::StatusOr<std::string> LocalTransport::Receive(const MessageKey& key, absl::Duration timeout) {
  const auto start = std::chrono::steady_clock::now();
  const std::pair<int, MessageKey> slot(rank_, key);
  Mailboxes& boxes = *boxes_;
  absl::MutexLock lock(&boxes.mu);
  auto arrived = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(boxes.mu) {
    return boxes.pending.count(slot) > 0;
  };
  const bool found = boxes.mu.AwaitWithTimeout(absl::Condition(&arrived), timeout);
  wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!found) {
    return absl::DeadlineExceededError(absl::StrCat(
        "rank ", rank_, " waited ", absl::FormatDuration(timeout), " for ", DescribeKey(key)));
  }
  auto it = boxes.pending.find(slot);
  std::string payload = std::move(it->second);
  boxes.pending.erase(it);
  return payload;
}

}  // namespace qcal::engine
