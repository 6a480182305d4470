// The Llama-family model configuration read from a Hugging Face `config.json`.
//
// Accepted `model_type`s (every other one is refused, naming the key and the value):
//   llama    Llama 1-3.x: GQA, `attention_bias` (q/k/v/o), `mlp_bias`, rope scaling.
//   mistral  as llama, plus a `sliding_window` attention mask (null = none).
//   qwen2    Qwen2 and Qwen2.5: biases on q/k/v (not o), tied embeddings on small models;
//            `use_sliding_window: true` is refused (transformers applies the window to the layers
//            from `max_window_layers` on only), false/absent means full attention.
//   qwen3    Qwen3: `head_dim` independent of hidden/heads, per-head `q_norm` / `k_norm` (RMSNorm
//            over head_dim, before RoPE), `attention_bias` (q/k/v/o); sliding windows as qwen2.
// Mixture-of-experts families (docs/MOE.md; keys as transformers 5 names them, its defaults when
// absent):
//   mixtral    attention as mistral (`sliding_window`, no biases); every block's MLP is
//              `num_local_experts` (8) experts of `intermediate_size`, `num_experts_per_tok` (2)
//              routed per token, top-k weights always renormalised; `router_jitter_noise` is a
//              training option and ignored.
//   qwen2_moe  attention as qwen2 (`qkv_bias`, default true: q/k/v biases); `num_experts` (60)
//              experts of `moe_intermediate_size` (1408), top `num_experts_per_tok` (4),
//              renormalised only with `norm_topk_prob` (false), plus a shared expert of
//              `shared_expert_intermediate_size` (5632) scaled by sigmoid(`shared_expert_gate`).
//   qwen3_moe  attention as qwen3; experts as qwen2_moe without the shared expert (defaults 128
//              experts of 768, top 8).
//   A qwen*_moe block b is an MoE block unless b is in `mlp_only_layers` or (b + 1) is not a
//   multiple of `decoder_sparse_step` (1); its other blocks have a dense MLP of intermediate_size.
//   `num_experts_per_tok` must be in [1, number of experts], `decoder_sparse_step` >= 1 and
//   `mlp_only_layers` a list of block indices: errors name the key.
// RoPE: `rope_theta` at top level or under `rope_parameters` (transformers 5); scaling from
// `rope_scaling` or `rope_parameters` with type (`rope_type` or `type`) default, linear, llama3 or
// yarn (common/rope_scaling.h); any other type is refused naming the key and value. `dtype` or
// `torch_dtype`. Range checks name the key: positive sizes and head counts, rms_norm_eps finite in
// (0, 1), rope_theta finite in (0, 1e12], max_position_embeddings >= 1, scaling factors >= 1...
// Other activations and partial rotary factors are refused.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/rope_scaling.h"

namespace qcal {

struct ModelConfig {
  // "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe" or "qwen3_moe"
  std::string model_type;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;  // type kDefault: none
  // Per-head RMSNorm of q and k (weights [head_dim], `self_attn.q_norm` / `k_norm`) between
  // q/k_proj and RoPE (Qwen3).
  bool qk_norm = false;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q/k/v (and o when `attention_bias` is set on Llama)
  bool o_bias = false;
  bool mlp_bias = false;
  int bos_token_id = 1;
  int eos_token_id = 2;
  std::string dtype = "float32";  // torch dtype name of the stored weights
  // Tokens a position attends to (itself included) under sliding-window attention; 0 = none.
  // Read from Mistral's `sliding_window` (null or absent = none). Qwen2/3 configs carry the key
  // too, but transformers uses it only with `use_sliding_window: true`, which is refused here;
  // Llama has no sliding-window attention in transformers, so the key is ignored there.
  int64_t sliding_window = 0;

  // Mixture of experts (mixtral, qwen2_moe, qwen3_moe); num_experts == 0 for a dense model.
  int num_experts = 0;            // routed experts per MoE block
  int num_experts_per_tok = 0;    // top-k
  int moe_intermediate_size = 0;  // each routed expert's intermediate size
  // Qwen2-MoE's shared expert (every token, scaled by sigmoid(shared_expert_gate · x)); 0 = none.
  int shared_expert_intermediate_size = 0;
  // Renormalise the top-k routing weights to sum 1 (always for Mixtral).
  bool norm_topk_prob = false;
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;  // sorted, distinct

  bool moe() const { return num_experts > 0; }
  // Whether block b's MLP is a mixture of experts (else a dense gate/up/down MLP).
  bool IsMoeBlock(int b) const;

  int n_rep() const { return num_heads / num_kv_heads; }
  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
};

// Parses and validates the JSON text of a config.json; `path` is used in error messages only.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& path);
// Reads `<dir>/config.json`.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Checks a sequence length that a command is about to run: seq_len must be >= 1 (InvalidArgument
// otherwise). A sequence longer than max_position_embeddings is run (RoPE extrapolates) with a
// warning logged that names both numbers. Sliding windows shorter than the sequence are computed
// (the attention mask), so they are no error.
absl::Status CheckSequenceLength(const ModelConfig& config, int64_t seq_len);
// The warning CheckSequenceLength logs, or "" when seq_len <= max_position_embeddings.
std::string SequenceLengthWarning(const ModelConfig& config, int64_t seq_len);

}  // namespace qcal
