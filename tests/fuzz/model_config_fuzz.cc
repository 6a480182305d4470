// Fuzzes config.json (common/hf_config.h) and the BOS/EOS files the tokenizer loader reads beside
// it (common/tokenizer.h): tokenizer_config.json and generation_config.json. A config that parses
// must give sizes the model code can compute without overflow, and RoPE frequencies that are
// finite (what Model::Load and the rotary embedding compute from it).
//
// Input: config.json, then kFileSeparator and tokenizer_config.json, then kFileSeparator and
// generation_config.json (each optional: an empty part is an absent file). The directory also
// holds a fixed byte-level BPE tokenizer.json (fuzz_util.h).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/hf_config.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "kernels/cpu/ref_ops.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> files = qcal::fuzz::SplitFiles(data, size, 3);
  absl::StatusOr<qcal::ModelConfig> config = qcal::ParseModelConfig(files[0], "config.json");
  if (config.ok()) {
    const qcal::ModelConfig& c = *config;
    // The per-layer shapes Model::Load reads (as int64, the tensor shapes' type).
    const int64_t q_dim = int64_t{c.num_heads} * c.head_dim;
    const int64_t kv_dim = int64_t{c.num_kv_heads} * c.head_dim;
    QCAL_CHECK(c.n_rep() >= 1 && c.q_dim() == q_dim && c.kv_dim() == kv_dim);
    QCAL_CHECK(c.hidden_size > 0 && c.intermediate_size > 0 && c.vocab_size > 0);
    const qcal::kernels::RopeShape rope(/*seq_len=*/1, /*offset=*/0, c.head_dim, c.rope_theta,
                                        c.rope_scaling);
    for (int i = 0; i < c.head_dim / 2; ++i) {
      QCAL_CHECK(std::isfinite(qcal::kernels::ref::RopeInvFreq(i, rope)));
    }
    float cos = 0, sin = 0;
    qcal::kernels::ref::RopeAngle(c.max_position_embeddings, c.head_dim / 2 - 1, rope, &cos, &sin);
    (void)qcal::SequenceLengthWarning(c, int64_t{c.max_position_embeddings} + 1);
    // Mixture of experts: a top-k the router can take, positive expert sizes, block indices.
    if (c.moe()) {
      QCAL_CHECK(c.num_experts_per_tok >= 1 && c.num_experts_per_tok <= c.num_experts);
      QCAL_CHECK(c.moe_intermediate_size > 0 && c.shared_expert_intermediate_size >= 0);
      QCAL_CHECK(c.decoder_sparse_step >= 1);
      for (int b : c.mlp_only_layers) QCAL_CHECK(b >= 0 && b < c.num_layers);
      for (int b = 0; b < c.num_layers && b < 4096; ++b) (void)c.IsMoeBlock(b);
    }
  }

  const qcal::fuzz::ScratchDir& dir = qcal::fuzz::ScratchDir::Get();
  dir.Clear();
  static const std::string tokenizer_json = qcal::fuzz::TinyTokenizerJson();
  dir.Write("tokenizer.json", tokenizer_json);
  if (!files[0].empty()) dir.Write("config.json", files[0]);
  if (!files[1].empty()) dir.Write("tokenizer_config.json", files[1]);
  if (!files[2].empty()) dir.Write("generation_config.json", files[2]);
  auto tok = qcal::Tokenizer::Load(dir.path());
  if (tok.ok()) {
    const int vocab = (*tok)->vocab_size();
    QCAL_CHECK((*tok)->bos_id() >= -1 && (*tok)->bos_id() < vocab);
    for (int id : (*tok)->eos_ids()) QCAL_CHECK(id >= 0 && id < vocab);
  }
  return 0;
}
