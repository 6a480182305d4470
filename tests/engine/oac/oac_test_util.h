// Shared fixtures of the OAC tests: a small random model of each attention variant (GQA with
// biases, Qwen3's per-head q/k norms, a sliding window with YaRN RoPE), on the CPU backend.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/hf_config.h"
#include "common/tensor.h"
#include "kernels/backend.h"
#include "services/engine/model.h"
#include "tests/engine/quant/quant_test_data.h"

namespace qcal::testing {

// The OAC tests' CPU backend: two threads, so that the parallel paths run.
inline std::unique_ptr<kernels::Backend> OacCpuBackend() { return CpuBackend(2); }

enum class OacVariant {
  kLlama,        // GQA (6 heads over 2), biases on every linear
  kQwen3,        // per-head q/k RMSNorm, head_dim 12 (q_dim > hidden)
  kSlidingYarn,  // sliding window 3, YaRN RoPE scaling
};

// hidden 24, intermediate 40, vocab 37 (odd sizes), `layers` blocks.
inline ModelConfig OacConfig(OacVariant variant, int layers) {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_layers = layers;
  c.num_heads = 6;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 37;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  switch (variant) {
    case OacVariant::kLlama:
      c.attention_bias = c.o_bias = c.mlp_bias = true;
      break;
    case OacVariant::kQwen3:
      c.model_type = "qwen3";
      c.qk_norm = true;
      c.num_heads = 3;
      c.num_kv_heads = 1;
      c.head_dim = 12;
      c.attention_bias = true;
      break;
    case OacVariant::kSlidingYarn:
      c.sliding_window = 3;
      c.rope_theta = 1000.0;
      c.rope_scaling.type = RopeScaling::Type::kYarn;
      c.rope_scaling.factor = 4.0;
      c.rope_scaling.original_max_position_embeddings = 4;
      c.rope_scaling.attention_factor = 0.1 * std::log(4.0) + 1.0;
      break;
  }
  return c;
}

// Random weights of `config` (host tensors: `cpu` must be a CPU backend), every block resident.
inline std::unique_ptr<engine::Model> OacRandomModel(const ModelConfig& c, kernels::Backend* cpu,
                                                     uint64_t seed) {
  using engine::LinearKind;
  TestRng rng(seed);
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  std::vector<engine::BlockWeights> blocks;
  for (int b = 0; b < c.num_layers; ++b) {
    engine::BlockWeights bw;
    for (Tensor* norm : {&bw.input_norm, &bw.post_attention_norm}) {
      *norm = RandomTensor(rng, {d}, 0.1);
      for (int64_t j = 0; j < d; ++j) norm->data<float>()[j] += 1.0f;
    }
    if (c.qk_norm) {
      for (Tensor* norm : {&bw.q_norm, &bw.k_norm}) {
        *norm = RandomTensor(rng, {c.head_dim}, 0.1);
        for (int64_t j = 0; j < c.head_dim; ++j) norm->data<float>()[j] += 1.0f;
      }
    }
    for (LinearKind k : engine::kAllLinears) {
      int64_t out = 0, in = 0;
      bool bias = false;
      switch (k) {
        case LinearKind::kQ:
          out = c.q_dim(), in = d, bias = c.attention_bias;
          break;
        case LinearKind::kK:
        case LinearKind::kV:
          out = c.kv_dim(), in = d, bias = c.attention_bias;
          break;
        case LinearKind::kO:
          out = d, in = c.q_dim(), bias = c.o_bias;
          break;
        case LinearKind::kGate:
        case LinearKind::kUp:
          out = f, in = d, bias = c.mlp_bias;
          break;
        case LinearKind::kDown:
          out = d, in = f, bias = c.mlp_bias;
          break;
      }
      bw.at(k).weight = RandomTensor(rng, {out, in}, 1.0 / std::sqrt(double(in)));
      if (bias) bw.at(k).bias = RandomTensor(rng, {out}, 0.1);
    }
    blocks.push_back(std::move(bw));
  }
  Tensor embed = RandomTensor(rng, {c.vocab_size, d}, 1.0);
  Tensor final_norm = RandomTensor(rng, {d}, 0.1);
  for (int64_t j = 0; j < d; ++j) final_norm.data<float>()[j] += 1.0f;
  Tensor lm_head = RandomTensor(rng, {c.vocab_size, d}, 2.0 / std::sqrt(double(d)));
  return engine::Model::FromWeights(c, cpu, embed, final_norm, lm_head, std::move(blocks));
}

inline std::vector<float> Values(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

}  // namespace qcal::testing
