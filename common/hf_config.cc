#include "common/hf_config.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"

namespace qcal {
namespace {

using Json = nlohmann::json;

absl::Status Err(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

absl::StatusOr<int> RequireInt(const Json& j, const char* key, const std::string& path) {
  if (!j.contains(key) || j[key].is_null())
    return Err(path, absl::StrCat("missing key \"", key, "\""));
  if (!j[key].is_number_integer() || j[key].get<int64_t>() <= 0 ||
      j[key].get<int64_t>() > (1 << 30)) {
    return Err(path, absl::StrCat("key \"", key, "\" must be a positive integer"));
  }
  return j[key].get<int>();
}

absl::StatusOr<int> OptionalInt(const Json& j, const char* key, int fallback,
                                const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number_integer())
    return Err(path, absl::StrCat("key \"", key, "\" must be an integer"));
  return j[key].get<int>();
}

absl::StatusOr<bool> OptionalBool(const Json& j, const char* key, bool fallback,
                                  const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean())
    return Err(path, absl::StrCat("key \"", key, "\" must be true or false"));
  return j[key].get<bool>();
}

absl::StatusOr<double> OptionalNumber(const Json& j, const char* key, double fallback,
                                      const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number()) return Err(path, absl::StrCat("key \"", key, "\" must be a number"));
  return j[key].get<double>();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& path) {
  Json j;
  try {
    j = Json::parse(json_text);
  } catch (const Json::exception& e) {
    return Err(path, absl::StrCat("malformed JSON: ", e.what()));
  }
  if (!j.is_object()) return Err(path, "not a JSON object");
  ModelConfig c;
  if (!j.contains("model_type") || !j["model_type"].is_string()) {
    return Err(path, "missing key \"model_type\"");
  }
  c.model_type = j["model_type"].get<std::string>();
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2") {
    return Err(path, absl::StrCat("unsupported architecture: model_type \"", c.model_type,
                                  "\" (supported: llama, mistral, qwen2)"));
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    return Err(path, "unsupported hidden_act (only \"silu\")");
  }
  QCAL_ASSIGN_OR_RETURN(c.hidden_size, RequireInt(j, "hidden_size", path));
  QCAL_ASSIGN_OR_RETURN(c.intermediate_size, RequireInt(j, "intermediate_size", path));
  QCAL_ASSIGN_OR_RETURN(c.num_layers, RequireInt(j, "num_hidden_layers", path));
  QCAL_ASSIGN_OR_RETURN(c.num_heads, RequireInt(j, "num_attention_heads", path));
  QCAL_ASSIGN_OR_RETURN(c.vocab_size, RequireInt(j, "vocab_size", path));
  QCAL_ASSIGN_OR_RETURN(c.num_kv_heads, OptionalInt(j, "num_key_value_heads", c.num_heads, path));
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0) {
    return Err(path, "key \"num_key_value_heads\" must divide num_attention_heads");
  }
  if ((!j.contains("head_dim") || j["head_dim"].is_null()) && c.hidden_size % c.num_heads != 0) {
    return Err(path, "hidden_size is not divisible by num_attention_heads and head_dim is missing");
  }
  QCAL_ASSIGN_OR_RETURN(c.head_dim, OptionalInt(j, "head_dim", c.hidden_size / c.num_heads, path));
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    return Err(path, "key \"head_dim\" must be even and positive");
  QCAL_ASSIGN_OR_RETURN(c.max_position_embeddings,
                        OptionalInt(j, "max_position_embeddings", 4096, path));
  QCAL_ASSIGN_OR_RETURN(c.rms_norm_eps, OptionalNumber(j, "rms_norm_eps", 1e-6, path));
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const Json& rp = j["rope_parameters"];
    QCAL_ASSIGN_OR_RETURN(c.rope_theta, OptionalNumber(rp, "rope_theta", 10000.0, path));
    if (rp.contains("rope_type") && rp["rope_type"] != "default") {
      return Err(path, "unsupported rope_parameters.rope_type (only \"default\")");
    }
  } else {
    QCAL_ASSIGN_OR_RETURN(c.rope_theta, OptionalNumber(j, "rope_theta", 10000.0, path));
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    return Err(path, "unsupported key \"rope_scaling\" (RoPE scaling is not implemented)");
  }
  if (c.rope_theta <= 0) return Err(path, "key \"rope_theta\" must be positive");
  QCAL_ASSIGN_OR_RETURN(c.tie_word_embeddings, OptionalBool(j, "tie_word_embeddings", false, path));
  const bool qwen = c.model_type == "qwen2";
  QCAL_ASSIGN_OR_RETURN(bool attn_bias, OptionalBool(j, "attention_bias", false, path));
  c.attention_bias = qwen || attn_bias;
  c.o_bias = !qwen && attn_bias;
  QCAL_ASSIGN_OR_RETURN(c.mlp_bias, OptionalBool(j, "mlp_bias", false, path));
  QCAL_ASSIGN_OR_RETURN(c.bos_token_id, OptionalInt(j, "bos_token_id", 1, path));
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    if (j["eos_token_id"].empty() || !j["eos_token_id"][0].is_number_integer()) {
      return Err(path, "key \"eos_token_id\" must be an integer or a list of integers");
    }
    c.eos_token_id = j["eos_token_id"][0].get<int>();
  } else {
    QCAL_ASSIGN_OR_RETURN(c.eos_token_id, OptionalInt(j, "eos_token_id", 2, path));
  }
  if (j.contains("dtype") && j["dtype"].is_string()) {
    c.dtype = j["dtype"].get<std::string>();
  } else if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) {
    c.dtype = j["torch_dtype"].get<std::string>();
  }
  if (c.dtype != "float32" && c.dtype != "float16" && c.dtype != "bfloat16") {
    return Err(path, absl::StrCat("unsupported dtype \"", c.dtype, "\""));
  }
  if (c.model_type != "llama" && j.contains("sliding_window") && !j["sliding_window"].is_null()) {
    const Json& w = j["sliding_window"];
    if (!w.is_number_integer() || w.get<int64_t>() < 0) {
      return Err(path, "key \"sliding_window\" must be a non-negative integer or null");
    }
    c.sliding_window = w.get<int64_t>();
    if (qwen) {
      QCAL_ASSIGN_OR_RETURN(const bool used, OptionalBool(j, "use_sliding_window", false, path));
      if (!used) c.sliding_window = 0;
    }
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseModelConfig(text, path);
}

absl::Status CheckSequenceLength(const ModelConfig& config, int64_t seq_len) {
  if (config.sliding_window > 0 && seq_len > config.sliding_window) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: sliding_window ", config.sliding_window,
                     " is shorter than the sequence length ", seq_len,
                     " (sliding-window attention is not implemented)"));
  }
  return absl::OkStatus();
}

}  // namespace qcal
