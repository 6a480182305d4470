#include <cmath>

#include "common/status.h"
#include "kernels/hash_random.h"
#include "services/engine/bench_internal.h"

namespace qcal::engine::bench_internal {
namespace {

// A [d_out, d_in] linear uniform in [-a, a) with a = sqrt(3 / d_in), from stream `seed`.
absl::StatusOr<Tensor> DrawLinear(kernels::Backend& be, int64_t d_out, int64_t d_in,
                                  uint64_t seed) {
  const float a = std::sqrt(3.0f / static_cast<float>(d_in));
  return Uniform(be, {d_out, d_in}, seed, -a, a);
}

}  // namespace

uint64_t StreamSeed(uint64_t seed, int block, int tensor) {
  return kernels::HashBits(seed, (static_cast<uint64_t>(block) + 1) * 64 + tensor);
}

absl::StatusOr<Tensor> Uniform(kernels::Backend& be, const Shape& shape, uint64_t seed, float lo,
                               float hi) {
  QCAL_ASSIGN_OR_RETURN(Tensor t, be.Alloc(DType::kF32, shape));
  QCAL_RETURN_IF_ERROR(be.FillUniform(t, seed, lo, hi));
  return t;
}

absl::Status DrawNorms(kernels::Backend& be, const ModelConfig& c, uint64_t seed, int b,
                       BlockWeights& w) {
  QCAL_ASSIGN_OR_RETURN(w.input_norm,
                        Uniform(be, {c.hidden_size}, StreamSeed(seed, b, 0), 0.8f, 1.2f));
  QCAL_ASSIGN_OR_RETURN(w.post_attention_norm,
                        Uniform(be, {c.hidden_size}, StreamSeed(seed, b, 1), 0.8f, 1.2f));
  if (c.qk_norm) {
    QCAL_ASSIGN_OR_RETURN(w.q_norm, Uniform(be, {c.head_dim}, StreamSeed(seed, b, 9), 0.8f, 1.2f));
    QCAL_ASSIGN_OR_RETURN(w.k_norm, Uniform(be, {c.head_dim}, StreamSeed(seed, b, 10), 0.8f, 1.2f));
  }
  return absl::OkStatus();
}

LinearDraw LinearDrawOf(const ModelConfig& c, uint64_t seed, int b, LinearKind k) {
  const auto [d_out, d_in] = LinearShape(c, k);
  return {d_out, d_in, StreamSeed(seed, b, 2 + static_cast<int>(k)),
          std::sqrt(3.0f / static_cast<float>(d_in))};
}

absl::StatusOr<BlockWeights> DrawBlock(kernels::Backend& be, const ModelConfig& c, uint64_t seed,
                                       int b) {
  BlockWeights w;
  QCAL_RETURN_IF_ERROR(DrawNorms(be, c, seed, b, w));
  for (LinearKind k : kAllLinears) {
    if (!HasDenseLinear(c, b, k)) continue;  // an MoE block's MLP is its experts'
    const LinearDraw d = LinearDrawOf(c, seed, b, k);
    QCAL_ASSIGN_OR_RETURN(w.at(k).weight, Uniform(be, {d.d_out, d.d_in}, d.seed, -d.a, d.a));
  }
  if (!c.IsMoeBlock(b)) return w;
  QCAL_ASSIGN_OR_RETURN(w.moe.router,
                        DrawLinear(be, c.num_experts, c.hidden_size, StreamSeed(seed, b, 11)));
  const uint64_t expert_seed = StreamSeed(seed, b, 12);
  w.moe.experts.resize(c.num_experts);
  constexpr LinearKind kExpertLinears[] = {LinearKind::kGate, LinearKind::kUp, LinearKind::kDown};
  for (int u = 0; u < NumExpertUnits(c); ++u) {
    const int expert = ExpertOfUnit(c, u);
    for (int i = 0; i < 3; ++i) {
      const LinearId id(kExpertLinears[i], expert);
      const auto [d_out, d_in] = LinearShape(c, b, id);
      QCAL_ASSIGN_OR_RETURN(
          w.at(id).weight,
          DrawLinear(be, d_out, d_in, kernels::HashBits(expert_seed, uint64_t(u) * 3 + i)));
    }
  }
  if (c.shared_expert_intermediate_size > 0) {
    QCAL_ASSIGN_OR_RETURN(w.moe.shared_expert_gate,
                          DrawLinear(be, 1, c.hidden_size, StreamSeed(seed, b, 13)));
  }
  return w;
}

}  // namespace qcal::engine::bench_internal
