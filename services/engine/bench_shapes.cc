#include "services/engine/bench_shapes.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace qcal::engine {
namespace {

ModelConfig LlamaConfig(int hidden, int intermediate, int layers, int heads, int kv_heads) {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.vocab_size = 32000;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = true;
  return c;
}

// The published config.json values (huggingface.co; the search tool's copies, 2026-12-04):
// mistralai/Mixtral-8x7B-Instruct-v0.1 at commit eba92302 (the architecture of
// Mixtral-8x7B-v0.1, whose own file was not among the copies; copies naming it as _name_or_path,
// e.g. YeungNLP/firefly-mixtral-8x7b, carry the same values): hidden_size 4096,
// intermediate_size 14336, num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8,
// num_local_experts 8, num_experts_per_tok 2, vocab_size 32000, max_position_embeddings 32768,
// rms_norm_eps 1e-5, rope_theta 1e6, sliding_window null, tie_word_embeddings false, bos 1.
ModelConfig MixtralConfig() {
  ModelConfig c = LlamaConfig(4096, 14336, 32, 32, 8);
  c.model_type = "mixtral";
  c.max_position_embeddings = 32768;
  c.rope_theta = 1e6;
  c.tie_word_embeddings = false;
  c.num_experts = 8;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = c.intermediate_size;
  c.norm_topk_prob = true;  // Mixtral always renormalises
  return c;
}

// Qwen/Qwen3-30B-A3B's own config.json was not among the search tool's copies; its values as the
// copies agree on (Qwen3MoeForCausalLM configs derived from it, e.g. AweAI-Team/Scale-SWE-Agent,
// and Ascend/MindSpeed-RL configs/model/qwen3_30b_a3b.yaml): hidden_size 2048, intermediate_size
// 6144 (dense MLP, unused: mlp_only_layers []), num_hidden_layers 48, num_attention_heads 32,
// num_key_value_heads 4, head_dim 128, num_experts 128, num_experts_per_tok 8,
// moe_intermediate_size 768, norm_topk_prob true, decoder_sparse_step 1, vocab_size 151936,
// max_position_embeddings 40960, rms_norm_eps 1e-6, rope_theta 1e6, tie_word_embeddings false,
// bos 151643; no shared expert (Qwen3-MoE has none).
ModelConfig Qwen3MoeConfig() {
  ModelConfig c = LlamaConfig(2048, 6144, 48, 32, 4);
  c.model_type = "qwen3_moe";
  c.head_dim = 128;  // not hidden / heads
  c.qk_norm = true;
  c.vocab_size = 151936;
  c.max_position_embeddings = 40960;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 1e6;
  c.tie_word_embeddings = false;
  c.bos_token_id = 151643;
  c.eos_token_id = 151645;
  c.num_experts = 128;
  c.num_experts_per_tok = 8;
  c.moe_intermediate_size = 768;
  c.norm_topk_prob = true;
  return c;
}

}  // namespace

absl::StatusOr<BenchShape> BenchShapeNamed(const std::string& name) {
  BenchShape s;
  s.name = name;
  if (name == "7b") {
    s.config = LlamaConfig(4096, 11008, 32, 32, 32);
    s.ideal_floor_seconds = 11;
    s.library_floor_seconds = 15;
  } else if (name == "13b") {
    // DESIGN section 9 gives no 13B figures: the 7B floors scaled by the useful-FLOP ratio at
    // 128 x 2048 tokens (about 1.96); no reference measurement.
    s.config = LlamaConfig(5120, 13824, 40, 40, 40);
    const ModelConfig c7 = LlamaConfig(4096, 11008, 32, 32, 32);
    const double ratio =
        CountFlops(s.config, 128, 2048).total() / CountFlops(c7, 128, 2048).total();
    s.ideal_floor_seconds = 11 * ratio;
    s.library_floor_seconds = 15 * ratio;
    s.floors_scaled = true;
  } else if (name == "70b") {
    s.config = LlamaConfig(8192, 28672, 80, 64, 8);
    s.ideal_floor_seconds = 150;    // about 2.5 min
    s.library_floor_seconds = 270;  // 4-5 min
  } else if (name == "mixtral-8x7b") {
    s.config = MixtralConfig();
  } else if (name == "qwen3-30b-a3b") {
    s.config = Qwen3MoeConfig();
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown bench shape \"", name,
                     "\" (expected 7b, 13b, 70b, mixtral-8x7b or qwen3-30b-a3b)"));
  }
  return s;
}

BenchFlops CountFlops(const ModelConfig& c, int samples, int seq_len) {
  const double tokens = double(samples) * seq_len;
  const double d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  const double attention = 4.0 * qd * (double(seq_len) * (seq_len + 1) / 2) * samples;
  // q, k, v and o: their weights, the Hessians of their inputs (q/k/v: d wide, o: q_dim), the lazy
  // updates d_out d_in^2 and the two factorizations.
  const double attn_params = d * qd + 2 * d * kvd + qd * d;
  const double attn_hessian = tokens * (d * d + qd * qd);
  const double attn_updates = qd * d * d + 2 * kvd * d * d + d * qd * qd;
  const double attn_factor = 2.0 / 3.0 * (d * d * d + qd * qd * qd);
  // One gate/up/down MLP of intermediate f over `rows` tokens: Hessians of its inputs (d and f
  // wide), updates, factorizations.
  auto mlp_hessian = [&](double f, double rows) { return rows * (d * d + f * f); };
  auto mlp_solve = [&](double f) {
    return 2 * f * d * d + d * f * f + 2.0 / 3.0 * (d * d * d + f * f * f);
  };
  BenchFlops out;
  for (int b = 0; b < c.num_layers; ++b) {
    out.forward += 2 * tokens * attn_params + attention;
    out.hessian += attn_hessian;
    out.solve += attn_updates + attn_factor;
    if (!c.IsMoeBlock(b)) {
      const double f = c.intermediate_size;
      out.forward += 2 * tokens * 3 * d * f;
      out.hessian += mlp_hessian(f, tokens);
      out.solve += mlp_solve(f);
      continue;
    }
    const double fe = c.moe_intermediate_size, fs = c.shared_expert_intermediate_size;
    const double routed = tokens * c.num_experts_per_tok;  // summed over the experts
    out.forward += 2 * tokens * c.num_experts * d + 2 * routed * 3 * d * fe;
    out.hessian += mlp_hessian(fe, routed);
    out.solve += c.num_experts * mlp_solve(fe);
    if (fs > 0) {
      out.forward += 2 * tokens * (3 * d * fs + d);
      out.hessian += mlp_hessian(fs, tokens);
      out.solve += mlp_solve(fs);
    }
  }
  return out;
}

}  // namespace qcal::engine
