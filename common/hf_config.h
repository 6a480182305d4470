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
// RoPE: `rope_theta` at top level or under `rope_parameters` (transformers 5); scaling from
// `rope_scaling` or `rope_parameters` with type (`rope_type` or `type`) default, linear, llama3 or
// yarn (common/rope_scaling.h); any other type is refused naming the key and value. `dtype` or
// `torch_dtype`. Range checks name the key: positive sizes and head counts, rms_norm_eps finite in
// (0, 1), rope_theta finite in (0, 1e12], max_position_embeddings >= 1, scaling factors >= 1...
// Other activations and partial rotary factors are refused.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/rope_scaling.h"
#include "nlohmann/json.hpp"

namespace qcal {

struct ModelConfig {
  std::string model_type;  // "llama", "mistral", "qwen2" or "qwen3"
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
