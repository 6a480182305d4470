// The Llama-family model configuration read from a Hugging Face `config.json`.
//
// Accepts Llama, Mistral and Qwen2 (attention bias on q/k/v), GQA, an explicit `head_dim`, tied or
// untied embeddings, `rope_theta` at top level or under `rope_parameters`, and `dtype` or
// `torch_dtype`. Anything else that changes the architecture (rope scaling, other activations) is
// rejected with an error naming the key. A sliding attention window is read into
// `sliding_window`, not rejected here, since it changes nothing for sequences no longer than the
// window: whoever picks a sequence length calls CheckSequenceLength.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace qcal {

struct ModelConfig {
  std::string model_type;  // "llama", "mistral" or "qwen2"
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
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q/k/v (and o when `attention_bias` is set on Llama)
  bool o_bias = false;
  bool mlp_bias = false;
  int bos_token_id = 1;
  int eos_token_id = 2;
  std::string dtype = "float32";  // torch dtype name of the stored weights
  // Tokens a position attends to (itself included) under sliding-window attention; 0 = none.
  // Read from Mistral's and Qwen2's `sliding_window` (null or absent = none). Qwen2 uses it only
  // when `use_sliding_window` is true (transformers' default is false); `max_window_layers` is
  // ignored. Llama has no sliding-window attention in transformers, so the key is ignored there.
  int64_t sliding_window = 0;

  int n_rep() const { return num_heads / num_kv_heads; }
  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
};

// Parses and validates the JSON text of a config.json; `path` is used in error messages only.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& path);
// Reads `<dir>/config.json`.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// OK when attention over `seq_len` positions is what qcal computes (full causal attention), i.e.
// there is no sliding window or the window covers the whole sequence (seq_len <= sliding_window).
// InvalidArgument otherwise, naming the key and both values: "config.json: sliding_window 4096 is
// shorter than the sequence length 8192 (sliding-window attention is not implemented)".
absl::Status CheckSequenceLength(const ModelConfig& config, int64_t seq_len);

}  // namespace qcal
