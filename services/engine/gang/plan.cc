#include "services/engine/gang/plan.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/text_data.h"

namespace qcal::engine {

int GangPlan::StatOwner(LinearInput input) const {
  int best = world;
  for (LinearKind k : ConsumersOf(input)) best = std::min(best, OwnerOf(k));
  return best;
}

int GangPlan::LinearOwner(const ModelConfig& config, LinearId id) const {
  if (id.expert == kNoExpert) return OwnerOf(id.kind);
  const int unit = ExpertUnitOf(config, id.expert);
  return unit >= 0 && unit < static_cast<int>(expert_owners.size()) ? ExpertOwner(unit) : -1;
}

std::vector<int> GangPlan::ConsumerOwners(LinearInput input) const {
  std::vector<int> ranks;
  for (LinearKind k : ConsumersOf(input)) ranks.push_back(OwnerOf(k));
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  return ranks;
}

absl::Status GangPlan::Validate() const {
  if (world < 1) return absl::InvalidArgumentError(absl::StrCat("gang of ", world, " workers"));
  if (rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " outside a gang of ", world));
  }
  if (static_cast<int>(chunks.size()) != world) {
    return absl::InvalidArgumentError(
        absl::StrCat("plan has ", chunks.size(), " chunk ranges for ", world, " workers"));
  }
  int next = 0;
  for (int r = 0; r < world; ++r) {
    const ChunkRange& c = chunks[static_cast<size_t>(r)];
    if (c.begin != next || c.end < c.begin) {
      return absl::InvalidArgumentError(absl::StrCat("chunk range of rank ", r, " [", c.begin, ", ",
                                                     c.end, ") does not follow chunk ", next));
    }
    next = c.end;
  }
  if (next != total_chunks) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk ranges cover ", next, " of ", total_chunks, " chunks"));
  }
  for (int i = 0; i < kNumLinears; ++i) {
    if (owners[static_cast<size_t>(i)] < 0 || owners[static_cast<size_t>(i)] >= world) {
      return absl::InvalidArgumentError(absl::StrCat("owner of linear ", i, " outside the gang"));
    }
  }
  for (size_t u = 0; u < expert_owners.size(); ++u) {
    if (expert_owners[u] < 0 || expert_owners[u] >= world) {
      return absl::InvalidArgumentError(
          absl::StrCat("owner of expert unit ", u, " outside the gang"));
    }
  }
  return absl::OkStatus();
}

int NumChunks(int samples) { return (samples + kCalibChunk - 1) / kCalibChunk; }

std::vector<ChunkRange> SplitChunks(int total_chunks, int world) {
  std::vector<ChunkRange> out;
  for (int r = 0; r < world; ++r) {
    const int64_t begin = int64_t{r} * total_chunks / world;
    const int64_t end = int64_t{r + 1} * total_chunks / world;
    out.push_back({static_cast<int>(begin), static_cast<int>(end)});
  }
  return out;
}

namespace {

double SolveCost(const std::pair<int64_t, int64_t>& shape) {
  const auto [d_out, d_in] = shape;
  return static_cast<double>(d_out) * static_cast<double>(d_in) * static_cast<double>(d_in);
}

// The bin-packing rule: items in order of decreasing cost (ties to the lower index), each to the
// rank with the least load so far (ties to the lower rank); `load` holds the ranks' starting loads.
std::vector<int> BinPack(const std::vector<double>& cost, std::vector<double> load) {
  std::vector<int> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return cost[static_cast<size_t>(a)] > cost[static_cast<size_t>(b)];
  });
  std::vector<int> owners(cost.size(), 0);
  for (int i : order) {
    const size_t r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    owners[static_cast<size_t>(i)] = static_cast<int>(r);
    load[r] += cost[static_cast<size_t>(i)];
  }
  return owners;
}

}  // namespace

std::array<int, kNumLinears> AssignOwners(const ModelConfig& config, int world) {
  std::vector<double> cost;
  for (int i = 0; i < kNumLinears; ++i) {
    cost.push_back(SolveCost(LinearShape(config, static_cast<LinearKind>(i))));
  }
  const std::vector<int> packed =
      BinPack(cost, std::vector<double>(static_cast<size_t>(std::max(world, 1)), 0.0));
  std::array<int, kNumLinears> owners{};
  std::copy(packed.begin(), packed.end(), owners.begin());
  return owners;
}

std::vector<int> AssignExpertOwners(const ModelConfig& config, int world,
                                    const std::array<int, kNumLinears>& owners) {
  if (!config.moe()) return {};
  std::vector<double> load(static_cast<size_t>(std::max(world, 1)), 0.0);
  for (LinearKind k : {LinearKind::kQ, LinearKind::kK, LinearKind::kV, LinearKind::kO}) {
    load[static_cast<size_t>(owners[static_cast<size_t>(k)])] += SolveCost(LinearShape(config, k));
  }
  // Any MoE block gives the units' shapes (every MoE block has the same).
  int moe_block = 0;
  while (moe_block + 1 < config.num_layers && !config.IsMoeBlock(moe_block)) ++moe_block;
  std::vector<double> cost;
  for (int u = 0; u < NumExpertUnits(config); ++u) {
    double c = 0;
    for (LinearKind k : {LinearKind::kGate, LinearKind::kUp, LinearKind::kDown}) {
      c += SolveCost(LinearShape(config, moe_block, LinearId(k, ExpertOfUnit(config, u))));
    }
    cost.push_back(c);
  }
  return BinPack(cost, std::move(load));
}

GangPlan MakeGangPlan(const ModelConfig& config, int samples, int world, int rank, uint64_t epoch) {
  GangPlan plan;
  plan.epoch = epoch;
  plan.rank = rank;
  plan.world = world;
  plan.total_chunks = NumChunks(samples);
  plan.chunks = SplitChunks(plan.total_chunks, world);
  plan.owners = AssignOwners(config, world);
  plan.expert_owners = AssignExpertOwners(config, world, plan.owners);
  return plan;
}

}  // namespace qcal::engine
