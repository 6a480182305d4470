// Shared fixtures of the ASER tests: a small random Llama model with GQA and biases, capture of
// every linear input during a block forward, stories260k's calibration samples, and norms.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/hf_config.h"
#include "common/tensor.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/model.h"
#include "tests/engine/quant/quant_test_data.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {

// hidden 48, 6 heads over 2 KV heads (n_rep 3), head_dim 8, intermediate 80, vocab 64, 2 blocks;
// every linear has a bias. Norm weights carry outlier channels (x 12) so that smoothing has
// something to move, and the up_proj rows of a few channels are scaled up (outliers in the down
// input).
inline ModelConfig RandomConfig() {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 48;
  c.intermediate_size = 80;
  c.num_layers = 2;
  c.num_heads = 6;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.vocab_size = 64;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.attention_bias = true;
  c.o_bias = true;
  c.mlp_bias = true;
  return c;
}

// The weights are host tensors: `cpu` must be a CPU backend.
inline std::unique_ptr<engine::Model> RandomModel(kernels::Backend* cpu, uint64_t seed) {
  using engine::LinearKind;
  const ModelConfig c = RandomConfig();
  TestRng rng(seed);
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  std::vector<engine::BlockWeights> blocks;
  for (int b = 0; b < c.num_layers; ++b) {
    engine::BlockWeights bw;
    for (Tensor* norm : {&bw.input_norm, &bw.post_attention_norm}) {
      *norm = RandomTensor(rng, {d}, 0.05);
      float* p = norm->data<float>();
      for (int64_t j = 0; j < d; ++j) p[j] += (j % 11 == 3) ? 12.0f : 1.0f;
    }
    for (LinearKind k : engine::kAllLinears) {
      int64_t out = 0, in = 0;
      switch (k) {
        case LinearKind::kQ:
          out = c.q_dim();
          in = d;
          break;
        case LinearKind::kK:
        case LinearKind::kV:
          out = c.kv_dim();
          in = d;
          break;
        case LinearKind::kO:
          out = d;
          in = c.q_dim();
          break;
        case LinearKind::kGate:
        case LinearKind::kUp:
          out = f;
          in = d;
          break;
        case LinearKind::kDown:
          out = d;
          in = f;
          break;
      }
      bw.at(k).weight = RandomTensor(rng, {out, in}, 1.0 / std::sqrt(double(in)));
      bw.at(k).bias = RandomTensor(rng, {out}, 0.1);
    }
    float* up = bw.at(LinearKind::kUp).weight.data<float>();
    for (int64_t r = 5; r < f; r += 17) {
      for (int64_t j = 0; j < d; ++j) up[r * d + j] *= 8.0f;
    }
    blocks.push_back(std::move(bw));
  }
  Tensor embed = RandomTensor(rng, {c.vocab_size, d}, 1.0);
  Tensor final_norm = RandomTensor(rng, {d}, 0.05);
  for (int64_t j = 0; j < d; ++j) final_norm.data<float>()[j] += 1.0f;
  Tensor lm_head = RandomTensor(rng, {c.vocab_size, d}, 1.0 / std::sqrt(double(d)));
  return engine::Model::FromWeights(c, cpu, embed, final_norm, lm_head, std::move(blocks));
}

// Every distinct linear input of one block forward (host copies, indexed by LinearInput).
using CapturedInputs = std::array<Tensor, engine::kNumLinearInputs>;

// Runs block b on `hidden` (advanced in place) and captures its linear inputs.
inline absl::StatusOr<CapturedInputs> ForwardCapturing(engine::Model& model, int b, Tensor& hidden,
                                                       const engine::SeqShape& shape) {
  CapturedInputs captured;
  kernels::Backend& be = model.backend();
  auto tap = [&](engine::LinearInput in, const Tensor& x) -> absl::Status {
    QCAL_ASSIGN_OR_RETURN(captured[static_cast<int>(in)], be.ToHost(x));
    return absl::OkStatus();
  };
  QCAL_RETURN_IF_ERROR(model.BlockForward(b, hidden, shape, nullptr, tap));
  return captured;
}

// ‖a − b‖ / ‖b‖ over two equally sized host fp32 tensors, in double.
inline double RelativeError(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double d = double(a.data<float>()[i]) - double(b.data<float>()[i]);
    num += d * d;
    den += double(b.data<float>()[i]) * double(b.data<float>()[i]);
  }
  return std::sqrt(num / den);
}

// stories260k's calibration samples (DESIGN section 4, seed 0), or an error when ../shared is
// absent.
inline absl::StatusOr<std::vector<std::vector<int>>> StoriesCalibration(int num_samples,
                                                                        int seq_len) {
  const std::string shared = SharedDir();
  QCAL_ASSIGN_OR_RETURN(auto tokenizer,
                        Tokenizer::Load(shared + "/models/stories260k/tokenizer.model"));
  QCAL_ASSIGN_OR_RETURN(std::string text, LoadCorpusText(shared + "/data/tinystories-calib.txt"));
  QCAL_ASSIGN_OR_RETURN(std::vector<int> tokens, tokenizer->Encode(text));
  return SampleCalibration(tokens, num_samples, seq_len, 0, tokenizer->bos_id(), "calib");
}

inline std::string StoriesDir() { return SharedDir() + "/models/stories260k"; }

}  // namespace qcal::testing
