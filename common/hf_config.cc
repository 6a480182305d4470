#include "common/hf_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

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

namespace {

std::string JsonValue(const Json& v) { return v.dump(); }

// A finite number in [lo, hi] (strict bounds when the flags say so), else an error naming the key
// and the value.
absl::Status CheckRange(const std::string& path, const std::string& key, double v, double lo,
                        bool lo_open, double hi, bool hi_open, const std::string& rule) {
  const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  if (ok) return absl::OkStatus();
  return Err(path, absl::StrCat("key \"", key, "\" is ", v, " (must be ", rule, ")"));
}

// Reads the scaling part of a rope_scaling / rope_parameters object `rp` (named `where`).
absl::Status ParseRopeScaling(const Json& rp, const std::string& where, int max_positions,
                              const std::string& path, RopeScaling* out) {
  std::string type = "default";
  const char* type_key = rp.contains("rope_type") ? "rope_type" : "type";
  if (rp.contains(type_key) && !rp[type_key].is_null()) {
    if (!rp[type_key].is_string()) {
      return Err(path, absl::StrCat("key \"", where, ".", type_key, "\" must be a string"));
    }
    type = rp[type_key].get<std::string>();
  }
  auto key = [&](const char* k) { return absl::StrCat(where, ".", k); };
  auto number = [&](const char* k, double fallback) -> absl::StatusOr<double> {
    if (!rp.contains(k) || rp[k].is_null()) return fallback;
    if (!rp[k].is_number()) return Err(path, absl::StrCat("key \"", key(k), "\" must be a number"));
    return rp[k].get<double>();
  };
  auto required = [&](const char* k) -> absl::StatusOr<double> {
    if (!rp.contains(k) || rp[k].is_null()) {
      return Err(path, absl::StrCat("missing key \"", key(k), "\" (rope type \"", type, "\")"));
    }
    return number(k, 0);
  };
  if (rp.contains("partial_rotary_factor") && !rp["partial_rotary_factor"].is_null() &&
      !(rp["partial_rotary_factor"].is_number() &&
        rp["partial_rotary_factor"].get<double>() == 1)) {
    return Err(path, absl::StrCat("unsupported key \"", key("partial_rotary_factor"), "\" ",
                                  JsonValue(rp["partial_rotary_factor"]), " (only 1)"));
  }
  RopeScaling r;
  if (type == "default") {
    *out = r;
    return absl::OkStatus();
  }
  if (type != "linear" && type != "llama3" && type != "yarn") {
    return Err(path, absl::StrCat("unsupported rope type: key \"", key(type_key), "\" is \"", type,
                                  "\" (supported: default, linear, llama3, yarn)"));
  }
  QCAL_ASSIGN_OR_RETURN(r.factor, required("factor"));
  QCAL_RETURN_IF_ERROR(
      CheckRange(path, key("factor"), r.factor, 1, false, 1e6, false, "finite, >= 1 and <= 1e6"));
  auto original = [&](bool need) -> absl::Status {
    const char* k = "original_max_position_embeddings";
    if (!rp.contains(k) || rp[k].is_null()) {
      if (need)
        return Err(path, absl::StrCat("missing key \"", key(k), "\" (rope type \"", type, "\")"));
      r.original_max_position_embeddings = max_positions;
      return absl::OkStatus();
    }
    if (!rp[k].is_number_integer() || rp[k].get<int64_t>() < 1 ||
        rp[k].get<int64_t>() > (1 << 30)) {
      return Err(path, absl::StrCat("key \"", key(k), "\" is ", JsonValue(rp[k]),
                                    " (must be a positive integer)"));
    }
    r.original_max_position_embeddings = rp[k].get<int>();
    return absl::OkStatus();
  };
  if (type == "linear") {
    r.type = RopeScaling::Type::kLinear;
  } else if (type == "llama3") {
    r.type = RopeScaling::Type::kLlama3;
    QCAL_ASSIGN_OR_RETURN(r.low_freq_factor, required("low_freq_factor"));
    QCAL_ASSIGN_OR_RETURN(r.high_freq_factor, required("high_freq_factor"));
    QCAL_RETURN_IF_ERROR(CheckRange(path, key("low_freq_factor"), r.low_freq_factor, 0, true, 1e6,
                                    false, "finite and > 0"));
    QCAL_RETURN_IF_ERROR(CheckRange(path, key("high_freq_factor"), r.high_freq_factor,
                                    r.low_freq_factor, true, 1e6, false,
                                    "finite and > low_freq_factor"));
    QCAL_RETURN_IF_ERROR(original(/*need=*/true));
  } else {
    r.type = RopeScaling::Type::kYarn;
    QCAL_RETURN_IF_ERROR(original(/*need=*/false));
    QCAL_ASSIGN_OR_RETURN(double beta_fast, number("beta_fast", 0));
    QCAL_ASSIGN_OR_RETURN(double beta_slow, number("beta_slow", 0));
    // transformers: `get("beta_fast") or 32` (0 means the default too).
    r.beta_fast = beta_fast == 0 ? 32.0 : beta_fast;
    r.beta_slow = beta_slow == 0 ? 1.0 : beta_slow;
    QCAL_RETURN_IF_ERROR(
        CheckRange(path, key("beta_fast"), r.beta_fast, 0, true, 1e6, false, "finite and > 0"));
    QCAL_RETURN_IF_ERROR(CheckRange(path, key("beta_slow"), r.beta_slow, 0, true, r.beta_fast,
                                    false, "finite, > 0 and <= beta_fast"));
    if (rp.contains("truncate") && !rp["truncate"].is_null()) {
      if (!rp["truncate"].is_boolean()) {
        return Err(path, absl::StrCat("key \"", key("truncate"), "\" must be true or false"));
      }
      r.truncate = rp["truncate"].get<bool>();
    }
    auto mscale_of = [](double scale, double m) {
      return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0;
    };
    QCAL_ASSIGN_OR_RETURN(double mscale, number("mscale", 0));
    QCAL_ASSIGN_OR_RETURN(double mscale_all_dim, number("mscale_all_dim", 0));
    if (rp.contains("attention_factor") && !rp["attention_factor"].is_null()) {
      QCAL_ASSIGN_OR_RETURN(r.attention_factor, number("attention_factor", 1));
      QCAL_RETURN_IF_ERROR(CheckRange(path, key("attention_factor"), r.attention_factor, 0, true,
                                      1e3, false, "finite, > 0 and <= 1000"));
    } else if (mscale != 0 && mscale_all_dim != 0) {
      r.attention_factor = mscale_of(r.factor, mscale) / mscale_of(r.factor, mscale_all_dim);
    } else {
      r.attention_factor = mscale_of(r.factor, 1.0);
    }
  }
  *out = r;
  return absl::OkStatus();
}

// The mixture-of-experts keys of a mixtral, qwen2_moe or qwen3_moe config, with transformers 5's
// defaults (configuration_mixtral.py, configuration_qwen2_moe.py, configuration_qwen3_moe.py).
absl::Status ParseMoe(const Json& j, const std::string& path, ModelConfig* c) {
  auto positive = [&](const char* key, int fallback) -> absl::StatusOr<int> {
    QCAL_ASSIGN_OR_RETURN(const int v, OptionalInt(j, key, fallback, path));
    if (v < 1 || v > (1 << 20)) {
      return Err(path, absl::StrCat("key \"", key, "\" is ", v, " (must be >= 1)"));
    }
    return v;
  };
  const char* experts_key = "num_experts";
  if (c->model_type == "mixtral") {
    experts_key = "num_local_experts";
    QCAL_ASSIGN_OR_RETURN(c->num_experts, positive(experts_key, 8));
    QCAL_ASSIGN_OR_RETURN(c->num_experts_per_tok, OptionalInt(j, "num_experts_per_tok", 2, path));
    c->moe_intermediate_size = c->intermediate_size;
    c->norm_topk_prob = true;  // MixtralTopKRouter always renormalises
  } else {
    const bool qwen2 = c->model_type == "qwen2_moe";
    QCAL_ASSIGN_OR_RETURN(c->num_experts, positive(experts_key, qwen2 ? 60 : 128));
    QCAL_ASSIGN_OR_RETURN(c->num_experts_per_tok,
                          OptionalInt(j, "num_experts_per_tok", qwen2 ? 4 : 8, path));
    QCAL_ASSIGN_OR_RETURN(c->moe_intermediate_size,
                          positive("moe_intermediate_size", qwen2 ? 1408 : 768));
    if (qwen2) {
      QCAL_ASSIGN_OR_RETURN(c->shared_expert_intermediate_size,
                            positive("shared_expert_intermediate_size", 5632));
    }
    QCAL_ASSIGN_OR_RETURN(c->norm_topk_prob, OptionalBool(j, "norm_topk_prob", false, path));
    QCAL_ASSIGN_OR_RETURN(c->decoder_sparse_step, positive("decoder_sparse_step", 1));
    if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
      const Json& m = j["mlp_only_layers"];
      if (!m.is_array()) return Err(path, "key \"mlp_only_layers\" must be a list of integers");
      for (const Json& v : m) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= c->num_layers) {
          return Err(path, absl::StrCat("key \"mlp_only_layers\" holds ", JsonValue(v),
                                        " (must be block indices in [0, num_hidden_layers = ",
                                        c->num_layers, "))"));
        }
        c->mlp_only_layers.push_back(v.get<int>());
      }
      std::sort(c->mlp_only_layers.begin(), c->mlp_only_layers.end());
      c->mlp_only_layers.erase(std::unique(c->mlp_only_layers.begin(), c->mlp_only_layers.end()),
                               c->mlp_only_layers.end());
    }
  }
  if (c->num_experts_per_tok < 1 || c->num_experts_per_tok > c->num_experts) {
    return Err(path, absl::StrCat("key \"num_experts_per_tok\" is ", c->num_experts_per_tok,
                                  " (must be in [1, ", experts_key, " = ", c->num_experts, "])"));
  }
  return absl::OkStatus();
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
  const std::string& mt = c.model_type;
  if (mt != "llama" && mt != "mistral" && mt != "qwen2" && mt != "qwen3" && mt != "mixtral" &&
      mt != "qwen2_moe" && mt != "qwen3_moe") {
    return Err(path, absl::StrCat("unsupported architecture: key \"model_type\" is \"", mt,
                                  "\" (supported: llama, mistral, qwen2, qwen3, mixtral, "
                                  "qwen2_moe, qwen3_moe)"));
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    return Err(path, absl::StrCat("unsupported key \"hidden_act\" ", JsonValue(j["hidden_act"]),
                                  " (only \"silu\")"));
  }
  QCAL_ASSIGN_OR_RETURN(c.hidden_size, RequireInt(j, "hidden_size", path));
  QCAL_ASSIGN_OR_RETURN(c.intermediate_size, RequireInt(j, "intermediate_size", path));
  QCAL_ASSIGN_OR_RETURN(c.num_layers, RequireInt(j, "num_hidden_layers", path));
  QCAL_ASSIGN_OR_RETURN(c.num_heads, RequireInt(j, "num_attention_heads", path));
  QCAL_ASSIGN_OR_RETURN(c.vocab_size, RequireInt(j, "vocab_size", path));
  QCAL_ASSIGN_OR_RETURN(c.num_kv_heads, OptionalInt(j, "num_key_value_heads", c.num_heads, path));
  if (c.num_kv_heads <= 0) {
    return Err(path, absl::StrCat("key \"num_key_value_heads\" is ", c.num_kv_heads,
                                  " (must be positive)"));
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return Err(path, "key \"num_key_value_heads\" must divide num_attention_heads");
  }
  if ((!j.contains("head_dim") || j["head_dim"].is_null()) && c.hidden_size % c.num_heads != 0) {
    return Err(path, "hidden_size is not divisible by num_attention_heads and head_dim is missing");
  }
  QCAL_ASSIGN_OR_RETURN(c.head_dim, OptionalInt(j, "head_dim", c.hidden_size / c.num_heads, path));
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.head_dim > 4096) {
    return Err(path, absl::StrCat("key \"head_dim\" is ", c.head_dim,
                                  " (must be even, positive and <= 4096)"));
  }
  // q_dim (and kv_dim, no larger) is an int, like every other size: at most 2^30.
  if (int64_t{c.num_heads} * c.head_dim > (int64_t{1} << 30)) {
    return Err(path, absl::StrCat("num_attention_heads ", c.num_heads, " x head_dim ", c.head_dim,
                                  " is larger than 2^30"));
  }
  if (j.contains("max_position_embeddings") && !j["max_position_embeddings"].is_null() &&
      (!j["max_position_embeddings"].is_number_integer() ||
       j["max_position_embeddings"].get<int64_t>() < 1 ||
       j["max_position_embeddings"].get<int64_t>() > (int64_t{1} << 30))) {
    return Err(path,
               absl::StrCat("key \"max_position_embeddings\" is ",
                            JsonValue(j["max_position_embeddings"]), " (must be an integer >= 1)"));
  }
  QCAL_ASSIGN_OR_RETURN(c.max_position_embeddings,
                        OptionalInt(j, "max_position_embeddings", 4096, path));
  QCAL_ASSIGN_OR_RETURN(c.rms_norm_eps, OptionalNumber(j, "rms_norm_eps", 1e-6, path));
  QCAL_RETURN_IF_ERROR(
      CheckRange(path, "rms_norm_eps", c.rms_norm_eps, 0, true, 1, true, "finite and in (0, 1)"));

  // RoPE: transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older configs have
  // rope_theta at top level and rope_scaling {type or rope_type, ...} (null = none).
  const bool has_params = j.contains("rope_parameters") && !j["rope_parameters"].is_null();
  const bool has_scaling = j.contains("rope_scaling") && !j["rope_scaling"].is_null();
  if (has_params && !j["rope_parameters"].is_object()) {
    return Err(path, "key \"rope_parameters\" must be an object");
  }
  if (has_scaling && !j["rope_scaling"].is_object()) {
    return Err(path, "key \"rope_scaling\" must be an object");
  }
  if (has_params && j["rope_parameters"].contains("rope_theta")) {
    QCAL_ASSIGN_OR_RETURN(c.rope_theta,
                          OptionalNumber(j["rope_parameters"], "rope_theta", 10000.0, path));
  } else {
    QCAL_ASSIGN_OR_RETURN(c.rope_theta, OptionalNumber(j, "rope_theta", 10000.0, path));
  }
  QCAL_RETURN_IF_ERROR(CheckRange(path, "rope_theta", c.rope_theta, 0, true, 1e12, false,
                                  "finite, > 0 and <= 1e12"));
  if (has_params) {
    QCAL_RETURN_IF_ERROR(ParseRopeScaling(j["rope_parameters"], "rope_parameters",
                                          c.max_position_embeddings, path, &c.rope_scaling));
  }
  if (has_scaling && c.rope_scaling.type == RopeScaling::Type::kDefault) {
    QCAL_RETURN_IF_ERROR(ParseRopeScaling(j["rope_scaling"], "rope_scaling",
                                          c.max_position_embeddings, path, &c.rope_scaling));
  }

  QCAL_ASSIGN_OR_RETURN(c.tie_word_embeddings, OptionalBool(j, "tie_word_embeddings", false, path));
  // Attention as the dense family each MoE family extends: qwen2_moe as qwen2 (q/k/v biases, from
  // `qkv_bias` in transformers 5), qwen3_moe as qwen3, mixtral as mistral.
  const bool qwen2 = mt == "qwen2" || mt == "qwen2_moe";
  const bool qwen3 = mt == "qwen3" || mt == "qwen3_moe";
  const bool mistral = mt == "mistral" || mt == "mixtral";
  QCAL_ASSIGN_OR_RETURN(bool attn_bias, OptionalBool(j, "attention_bias", false, path));
  QCAL_ASSIGN_OR_RETURN(const bool qkv_bias, OptionalBool(j, "qkv_bias", true, path));
  c.attention_bias = mt == "qwen2" || (mt == "qwen2_moe" && qkv_bias) || (!qwen2 && attn_bias);
  c.o_bias = !qwen2 && attn_bias;
  c.qk_norm = qwen3;
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
  if (qwen2 || qwen3) {
    QCAL_ASSIGN_OR_RETURN(const bool used, OptionalBool(j, "use_sliding_window", false, path));
    if (used) {
      return Err(path, absl::StrCat("unsupported key \"use_sliding_window\" true for model_type \"",
                                    c.model_type,
                                    "\" (Qwen's per-layer sliding windows are not implemented)"));
    }
  } else if (mistral && j.contains("sliding_window") && !j["sliding_window"].is_null()) {
    const Json& w = j["sliding_window"];
    if (!w.is_number_integer() || w.get<int64_t>() < 1 || w.get<int64_t>() > (int64_t{1} << 30)) {
      return Err(path, absl::StrCat("key \"sliding_window\" is ", JsonValue(w),
                                    " (must be a positive integer or null)"));
    }
    c.sliding_window = w.get<int64_t>();
  }
  if (mt == "mixtral" || mt == "qwen2_moe" || mt == "qwen3_moe") {
    QCAL_RETURN_IF_ERROR(ParseMoe(j, path, &c));
  }
  return c;
}

bool ModelConfig::IsMoeBlock(int b) const {
  if (!moe()) return false;
  if (std::binary_search(mlp_only_layers.begin(), mlp_only_layers.end(), b)) return false;
  return (b + 1) % decoder_sparse_step == 0;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseModelConfig(text, path);
}

std::string SequenceLengthWarning(const ModelConfig& config, int64_t seq_len) {
  if (seq_len <= config.max_position_embeddings) return "";
  return absl::StrCat("the sequence length ", seq_len, " is longer than max_position_embeddings ",
                      config.max_position_embeddings,
                      " of config.json: positions past it were not trained");
}

absl::Status CheckSequenceLength(const ModelConfig& config, int64_t seq_len) {
  if (seq_len < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("the sequence length must be >= 1, got ", seq_len));
  }
  const std::string warning = SequenceLengthWarning(config, seq_len);
  if (!warning.empty()) spdlog::warn("{}", warning);
  return absl::OkStatus();
}

}  // namespace qcal
