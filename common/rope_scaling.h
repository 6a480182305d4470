// RoPE scaling parameters (`rope_scaling` / `rope_parameters` of a Hugging Face config.json),
// shared by the config parser (common/hf_config) and the rotary-embedding ops (kernels/,
// ref::RopeInvFreq computes the scaled inverse frequencies exactly as transformers'
// `_compute_*_parameters` in modeling_rope_utils.py do, in double precision). YaRN follows
// transformers 5: `factor` is used as given (transformers 4.4x-4.5x replaced it by
// max_position_embeddings / original_max_position_embeddings when the latter was set; synthetic
// checkpoints keep the two equal, so both versions agree on them).
#pragma once

namespace qcal {

struct RopeScaling {
  enum class Type { kDefault, kLinear, kLlama3, kYarn };
  Type type = Type::kDefault;
  // linear, llama3, yarn: the scaling factor (inv_freq / factor where scaled).
  double factor = 1.0;
  // llama3: the wavelength thresholds' factors.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  // llama3 and yarn: the pre-scaling context length (yarn: max_position_embeddings when absent).
  int original_max_position_embeddings = 0;
  // yarn: the ramp's rotation counts (defaults 32 and 1), whether its bounds are rounded outwards
  // (`truncate`, default true), and the factor applied to cos and sin (`attention_factor`; default
  // 0.1·ln(factor) + 1 for factor > 1, or get_mscale(factor, mscale) / get_mscale(factor,
  // mscale_all_dim) when both are given).
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  bool truncate = true;
  double attention_factor = 1.0;

  // (Spelled out: CUDA sources include this header and compile as C++17.)
  bool operator==(const RopeScaling& o) const {
    return type == o.type && factor == o.factor && low_freq_factor == o.low_freq_factor &&
           high_freq_factor == o.high_freq_factor &&
           original_max_position_embeddings == o.original_max_position_embeddings &&
           beta_fast == o.beta_fast && beta_slow == o.beta_slow && truncate == o.truncate &&
           attention_factor == o.attention_factor;
  }
  bool operator!=(const RopeScaling& o) const { return !(*this == o); }
};

// "default", "linear", "llama3" or "yarn".
inline const char* RopeTypeName(RopeScaling::Type t) {
  switch (t) {
    case RopeScaling::Type::kDefault:
      return "default";
    case RopeScaling::Type::kLinear:
      return "linear";
    case RopeScaling::Type::kLlama3:
      return "llama3";
    case RopeScaling::Type::kYarn:
      return "yarn";
  }
  return "?";
}

}  // namespace qcal
