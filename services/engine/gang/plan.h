// The plan of one job attempt across a gang of W workers (DESIGN section 2, step 2, and section
// 7): which calibration chunks each worker holds, and which worker solves (owns) each linear.
// A pure function of the model's shapes, the sample count and W, so that the coordinator, every
// worker and the tests compute the same plan.
//
// Chunks: the N samples form C = ceil(N / kCalibChunk) chunks of kCalibChunk samples (the last
// may be short). Rank r holds the contiguous range [r·C / W, (r + 1)·C / W) (integer division):
// balanced, and empty for some ranks when W > C.
//
// Owners: the seven linears are bin-packed by cost d_out · d_in² (the solve's work): in order of
// decreasing cost (ties to the lower linear index, forward order), each goes to the rank with the
// least cost so far (ties to the lower rank). The same for every block: blocks share shapes.
//
// A statistic shared by several linears (the q/k/v input, the gate/up input) is completed at the
// lowest rank among its consumers' owners (StatOwner) and sent from there to the other owners.
//
// Mixture-of-experts models (docs/MOE.md): an MoE block's attention linears have the owners above;
// its expert units (NumExpertUnits: routed experts, then the shared expert) are owned whole, each
// unit's three linears by one rank, which completes both of its statistics. Units are bin-packed
// by the same rule with cost Σ d_out · d_in² over their three linears, each rank starting from the
// cost of the attention linears it owns (ties to the lower unit index, then the lower rank).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/hf_config.h"
#include "services/engine/model.h"

namespace qcal::engine {

// Chunks [begin, end).
struct ChunkRange {
  int begin = 0;
  int end = 0;
  int size() const { return end - begin; }
  bool operator==(const ChunkRange&) const = default;
};

struct GangPlan {
  // The gang epoch of this attempt: messages under another epoch are refused.
  uint64_t epoch = 0;
  // This worker's rank (0-based) and the gang's size W.
  int rank = 0;
  int world = 1;
  // C: chunks of the whole calibration set.
  int total_chunks = 0;
  // Per rank.
  std::vector<ChunkRange> chunks;
  // Per linear, in forward order (LinearKind): the owning rank.
  std::array<int, kNumLinears> owners{};
  // MoE models: per expert unit, the rank owning its three linears; empty for a dense model.
  std::vector<int> expert_owners;

  const ChunkRange& local() const { return chunks[static_cast<size_t>(rank)]; }
  int OwnerOf(LinearKind k) const { return owners[static_cast<int>(k)]; }
  bool Owns(LinearKind k) const { return OwnerOf(k) == rank; }
  // The owner of expert unit u (0 <= u < expert_owners.size()).
  int ExpertOwner(int unit) const { return expert_owners[static_cast<size_t>(unit)]; }
  // The owner of linear `id` of a block of `config`: OwnerOf(id.kind) for a dense linear, the
  // owner of its expert unit for an expert's (-1 when the plan has no such unit).
  int LinearOwner(const ModelConfig& config, LinearId id) const;
  // The rank completing `input`'s statistics: the lowest owner among its consumers.
  int StatOwner(LinearInput input) const;
  // The ranks that own a consumer of `input`, ascending, without repeats.
  std::vector<int> ConsumerOwners(LinearInput input) const;
  // Internal consistency: world >= 1, rank in range, the ranges tile [0, total_chunks) in rank
  // order, owners in range. InvalidArgument naming the fault otherwise.
  absl::Status Validate() const;
  bool operator==(const GangPlan&) const = default;
};

// C for N samples.
int NumChunks(int samples);
// The contiguous chunk ranges of `world` ranks over `total_chunks` chunks.
std::vector<ChunkRange> SplitChunks(int total_chunks, int world);
// The owners of the seven linears among `world` ranks (see above).
std::array<int, kNumLinears> AssignOwners(const ModelConfig& config, int world);
// The owners of an MoE model's expert units given the linears' owners (see above); empty for a
// dense model.
std::vector<int> AssignExpertOwners(const ModelConfig& config, int world,
                                    const std::array<int, kNumLinears>& owners);
// The whole plan for `rank`. world >= 1, 0 <= rank < world, samples >= 1.
GangPlan MakeGangPlan(const ModelConfig& config, int samples, int world, int rank, uint64_t epoch);

}  // namespace qcal::engine
