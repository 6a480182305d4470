// Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE; docs/MOE.md): the checkpoint names of
// an MoE block's tensors and the token routing rule, as transformers computes them.
//
// Routing (transformers 5: MixtralTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter): the router
// logits x · Wᵀ ([rows, E], fp32) go through a softmax in fp32; each row keeps its top k
// probabilities in decreasing order, equal values with the lower expert index first (torch.topk's
// order); with renormalisation (Mixtral always, Qwen only with norm_topk_prob) the k kept values
// are divided by their fp32 sum. An expert's output for a token is scaled by that weight and the
// experts' outputs are summed into the token's MLP output in increasing expert order
// (transformers' index_add_ loop over the experts hit).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/hf_config.h"

namespace qcal::engine {

enum class LinearKind;

// Checkpoint names of block b's MoE tensors (the routed experts' linears: kind kGate, kUp or
// kDown):
//   mixtral:    model.layers.{b}.block_sparse_moe.gate.weight [E, hidden];
//               ...block_sparse_moe.experts.{j}.w1 (gate), w3 (up), w2 (down);
//   qwen*_moe:  model.layers.{b}.mlp.gate.weight [E, hidden];
//               ...mlp.experts.{j}.{gate,up,down}_proj;
//               qwen2_moe: ...mlp.shared_expert.{gate,up,down}_proj and
//               ...mlp.shared_expert_gate.weight [1, hidden].
// Prefixes are without ".weight".
std::string RouterWeightName(const ModelConfig& config, int block);
std::string ExpertLinearPrefix(const ModelConfig& config, int block, int expert, LinearKind kind);
std::string SharedExpertPrefix(int block, LinearKind kind);
std::string SharedExpertGateWeightName(int block);

// The experts chosen for `rows` tokens and their weights, row-major [rows, top_k] in the top-k
// order (decreasing probability).
struct Routing {
  int64_t rows = 0;
  int top_k = 0;
  std::vector<int32_t> experts;
  std::vector<float> weights;

  int expert(int64_t row, int slot) const { return experts[row * top_k + slot]; }
  float weight(int64_t row, int slot) const { return weights[row * top_k + slot]; }
  // The rows routed to expert e, ascending, with their weights: the tokens the expert computes
  // (and, in phase 2, the tokens its statistics are taken on).
  void RowsOf(int e, std::vector<int32_t>* rows_out, std::vector<float>* weights_out) const;
};

// The routing of `rows` tokens from their router logits [rows, num_experts] (row-major fp32, as
// the router linear produced them), by the rule in the header comment. top_k in [1, num_experts].
Routing RouteTokens(const float* logits, int64_t rows, int num_experts, int top_k,
                    bool renormalize);

}  // namespace qcal::engine
