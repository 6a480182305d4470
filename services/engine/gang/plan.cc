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

std::array<int, kNumLinears> AssignOwners(const ModelConfig& config, int world) {
  std::array<double, kNumLinears> cost{};
  for (int i = 0; i < kNumLinears; ++i) {
    const auto [d_out, d_in] = LinearShape(config, static_cast<LinearKind>(i));
    cost[static_cast<size_t>(i)] =
        static_cast<double>(d_out) * static_cast<double>(d_in) * static_cast<double>(d_in);
  }
  std::array<int, kNumLinears> order;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return cost[static_cast<size_t>(a)] > cost[static_cast<size_t>(b)];
  });
  std::vector<double> load(static_cast<size_t>(std::max(world, 1)), 0.0);
  std::array<int, kNumLinears> owners{};
  for (int i : order) {
    const size_t r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    owners[static_cast<size_t>(i)] = static_cast<int>(r);
    load[r] += cost[static_cast<size_t>(i)];
  }
  return owners;
}

GangPlan MakeGangPlan(const ModelConfig& config, int samples, int world, int rank, uint64_t epoch) {
  GangPlan plan;
  plan.epoch = epoch;
  plan.rank = rank;
  plan.world = world;
  plan.total_chunks = NumChunks(samples);
  plan.chunks = SplitChunks(plan.total_chunks, world);
  plan.owners = AssignOwners(config, world);
  return plan;
}

}  // namespace qcal::engine
