#include "services/worker/gang.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::worker {

absl::StatusOr<engine::GangPlan> PlanFromProto(const v1::GangPlan& proto, int num_samples) {
  engine::GangPlan plan;
  plan.epoch = proto.gang_epoch();
  plan.rank = proto.rank();
  plan.world = proto.world();
  plan.total_chunks = proto.total_chunks();
  if (proto.members_size() != proto.world()) {
    return absl::InvalidArgumentError(absl::StrCat("gang plan lists ", proto.members_size(),
                                                   " members for a gang of ", proto.world()));
  }
  plan.owners.fill(-1);
  for (const v1::GangMember& m : proto.members()) {
    if (m.rank() < 0 || m.rank() >= proto.world()) {
      return absl::InvalidArgumentError(
          absl::StrCat("gang member rank ", m.rank(), " out of range"));
    }
    plan.chunks.resize(static_cast<size_t>(proto.world()));
    plan.chunks[static_cast<size_t>(m.rank())] = {m.chunk_begin(), m.chunk_end()};
    for (int k : m.owned_linears()) {
      if (k < 0 || k >= engine::kNumLinears || plan.owners[static_cast<size_t>(k)] != -1) {
        return absl::InvalidArgumentError(
            absl::StrCat("gang plan: linear ", k, " has no single owner"));
      }
      plan.owners[static_cast<size_t>(k)] = m.rank();
    }
    for (int u : m.owned_expert_units()) {
      // Units are numbered from 0; the members' lists together name each exactly once.
      if (u < 0 || u >= (1 << 20)) {
        return absl::InvalidArgumentError(absl::StrCat("gang plan: expert unit ", u));
      }
      if (static_cast<size_t>(u) >= plan.expert_owners.size()) {
        plan.expert_owners.resize(static_cast<size_t>(u) + 1, -1);
      }
      if (plan.expert_owners[static_cast<size_t>(u)] != -1) {
        return absl::InvalidArgumentError(
            absl::StrCat("gang plan: expert unit ", u, " has no single owner"));
      }
      plan.expert_owners[static_cast<size_t>(u)] = m.rank();
    }
  }
  for (size_t u = 0; u < plan.expert_owners.size(); ++u) {
    if (plan.expert_owners[u] == -1) {
      return absl::InvalidArgumentError(
          absl::StrCat("gang plan: expert unit ", u, " has no owner"));
    }
  }
  QCAL_RETURN_IF_ERROR(plan.Validate());
  if (plan.total_chunks != engine::NumChunks(num_samples)) {
    return absl::InvalidArgumentError(
        absl::StrCat("gang plan has ", plan.total_chunks, " chunks for ", num_samples, " samples"));
  }
  return plan;
}

std::vector<std::string> PeerAddresses(const v1::GangPlan& proto) {
  std::vector<std::string> out(static_cast<size_t>(proto.members_size()));
  for (const v1::GangMember& m : proto.members()) {
    if (m.rank() >= 0 && m.rank() < proto.members_size()) {
      out[static_cast<size_t>(m.rank())] = m.peer_address();
    }
  }
  return out;
}

absl::Status FaultingTransport::Note(absl::Status s) {
  if (!s.ok() && first_error_.ok()) first_error_ = s;
  return s;
}

absl::Status FaultingTransport::Send(int to, const engine::MessageKey& key, std::string payload) {
  if (key.kind == engine::MessageKind::kPartials || key.kind == engine::MessageKind::kStatistic) {
    QCAL_RETURN_IF_ERROR(faults_->Hit("exchange", key.block));
    if (key.step >= engine::kStepFirstExpert) {
      QCAL_RETURN_IF_ERROR(faults_->Hit("expert", key.block));
    }
  } else if (key.kind == engine::MessageKind::kLayer) {
    QCAL_RETURN_IF_ERROR(faults_->Hit("solve", key.block));
  } else if (key.kind == engine::MessageKind::kOacPartials) {
    QCAL_RETURN_IF_ERROR(faults_->Hit("gradient", key.block));
  }
  return Note(inner_->Send(to, key, std::move(payload)));
}

absl::StatusOr<std::string> FaultingTransport::Receive(const engine::MessageKey& key,
                                                       absl::Duration timeout) {
  absl::StatusOr<std::string> r = inner_->Receive(key, timeout);
  if (!r.ok()) Note(r.status()).IgnoreError();
  return r;
}

}  // namespace qcal::worker
