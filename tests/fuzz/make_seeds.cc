// Writes the seed corpora of the fuzz harnesses (tests/fuzz/corpus/<harness>/) with the project's
// own writers, so that every seed is a file qcal writes or reads: small valid inputs and a few
// edge cases (empty tensors, scalars, act-order, sharded indexes, refused types). Run by hand after
// changing a format; the output is committed:
//
//   build-fuzz/bin/fuzz_make_seeds tests/fuzz/corpus
//
// Deterministic: the same source gives the same bytes.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/hf_config.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "kernels/cpu/quant_ref.h"
#include "nlohmann/json.hpp"
#include "qcal/v1/quant_service.pb.h"
#include "services/engine/driver/artifacts.h"
#include "services/engine/export/checkpoint_writer.h"
#include "services/engine/export/gptq_pack.h"
#include "services/engine/gang/exchange.h"
#include "services/engine/model.h"
#include "tests/fuzz/fuzz_util.h"

namespace qcal::fuzz {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

template <typename T>
T Check(absl::StatusOr<T> v) {
  if (!v.ok()) {
    std::fprintf(stderr, "make_seeds: %s\n", std::string(v.status().message()).c_str());
    std::abort();
  }
  return *std::move(v);
}

std::vector<float> Values(int64_t n, double salt) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(0.1 * std::sin(0.71 * i + salt));
  return v;
}

Tensor F32(const Shape& shape, double salt) {
  return Tensor::FromVector(Values(NumElements(shape), salt), shape);
}

Tensor I32(const std::vector<int32_t>& v, const Shape& shape) {
  Tensor t = Tensor::Zeros(DType::kI32, shape);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

std::string Serialize(const std::map<std::string, Tensor>& tensors,
                      const std::map<std::string, std::string>& meta = {}) {
  return Check(SerializeSafetensors(tensors, meta));
}

// The corpus root: Add writes <root>/<harness>/<name>.
struct Corpus {
  std::string root;
  void Add(const std::string& harness, const std::string& name, const std::string& bytes) const {
    WriteFiles(root, {{harness + "/" + name, bytes}});
  }
};

void SafetensorsSeeds(const Corpus& c) {
  std::map<std::string, Tensor> t;
  t["a.f32"] = F32({3, 5}, 1);
  t["b.f16"] = Check(F32({4}, 2).ConvertTo(DType::kF16));
  t["c.bf16"] = Check(F32({2, 2, 2}, 3).ConvertTo(DType::kBF16));
  t["d.i32"] = I32({1, -2, 3}, {3});
  t["e.empty"] = Tensor::Zeros(DType::kF32, {0, 4});
  t["f.scalar"] = F32({}, 4);
  const std::string bytes = Serialize(t, {{"format", "pt"}});
  c.Add("safetensors", "valid", bytes);
  c.Add("safetensors", "no_tensors", Serialize({}));
  c.Add("safetensors", "truncated", bytes.substr(0, bytes.size() / 2));
  Json index = {{"metadata", {{"total_size", 100}}}, {"weight_map", Json::object()}};
  for (const auto& [name, tensor] : t) {
    index["weight_map"][name] = "model-00001-of-00001.safetensors";
  }
  c.Add("safetensors", "indexed", JoinFiles({bytes, index.dump(1)}));
  index["weight_map"]["missing"] = "model-00001-of-00001.safetensors";
  c.Add("safetensors", "indexed_missing", JoinFiles({bytes, index.dump(1)}));
}

void ModelConfigSeeds(const Corpus& c) {
  const std::string tiny = TinyModelConfigJson();
  c.Add("model_config", "tiny", tiny);
  Json llama3 = Json::parse(tiny);
  llama3["rope_theta"] = 500000.0;
  llama3["rope_scaling"] = {{"rope_type", "llama3"},
                            {"factor", 8.0},
                            {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0},
                            {"original_max_position_embeddings", 64}};
  c.Add("model_config", "llama3",
        JoinFiles({llama3.dump(1), R"({"bos_token": "<s>", "eos_token": {"content": "</s>"}})",
                   R"({"eos_token_id": [96, 97]})"}));
  Json qwen2 = Json::parse(tiny);
  qwen2["model_type"] = "qwen2";
  qwen2["tie_word_embeddings"] = true;
  qwen2["sliding_window"] = 64;
  qwen2["use_sliding_window"] = false;
  qwen2["rope_scaling"] = {
      {"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32}};
  c.Add("model_config", "qwen2_yarn",
        JoinFiles({qwen2.dump(1), R"({"bos_token": null, "eos_token": "<|eot|>"})", ""}));
  Json qwen3 = Json::parse(tiny);
  qwen3["model_type"] = "qwen3";
  qwen3["head_dim"] = 64;
  qwen3["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
  qwen3["eos_token_id"] = {2, 3};
  c.Add("model_config", "qwen3",
        JoinFiles({qwen3.dump(1), R"({"bos_token": "<s>", "add_bos_token": false})", ""}));
  Json mistral = Json::parse(tiny);
  mistral["model_type"] = "mistral";
  mistral["sliding_window"] = 16;
  mistral["dtype"] = "bfloat16";
  c.Add("model_config", "mistral", mistral.dump(1));
  Json mixtral = Json::parse(tiny);
  mixtral["model_type"] = "mixtral";
  mixtral["num_local_experts"] = 4;
  mixtral["num_experts_per_tok"] = 2;
  mixtral["router_jitter_noise"] = 0.0;
  mixtral["sliding_window"] = nullptr;
  c.Add("model_config", "mixtral", mixtral.dump(1));
  Json qwen2_moe = Json::parse(tiny);
  qwen2_moe["model_type"] = "qwen2_moe";
  qwen2_moe["num_experts"] = 8;
  qwen2_moe["num_experts_per_tok"] = 4;
  qwen2_moe["moe_intermediate_size"] = 32;
  qwen2_moe["shared_expert_intermediate_size"] = 64;
  qwen2_moe["norm_topk_prob"] = false;
  qwen2_moe["qkv_bias"] = true;
  qwen2_moe["decoder_sparse_step"] = 2;
  c.Add("model_config", "qwen2_moe", qwen2_moe.dump(1));
  Json qwen3_moe = Json::parse(tiny);
  qwen3_moe["model_type"] = "qwen3_moe";
  qwen3_moe["head_dim"] = 64;
  qwen3_moe["num_experts"] = 8;
  qwen3_moe["num_experts_per_tok"] = 2;
  qwen3_moe["moe_intermediate_size"] = 32;
  qwen3_moe["norm_topk_prob"] = true;
  qwen3_moe["mlp_only_layers"] = {0};
  c.Add("model_config", "qwen3_moe", qwen3_moe.dump(1));
  c.Add("model_config", "refused_gemma", R"({"model_type": "gemma", "hidden_size": 32})");
}

void RecipeSeeds(const Corpus& c) {
  const std::map<std::string, std::string> recipes = {
      {"rtn_w4", "method: rtn\nweights: {bits: 4, group_size: 128}\n"},
      {"gptq_act_order",
       "method: gptq\nweights:\n  bits: 3\n  group_size: -1\n  symmetric: true\n"
       "gptq: {damp: 0.01, block_size: 128, act_order: true, true_sequential: false}\n"},
      {"aser",
       "method: gptq\nweights: {bits: 4, group_size: -1}\nactivations: {bits: 8}\n"
       "smoothing: {method: aser, outlier_channels: 32}\n"
       "error_reconstruction: {rank: 64, whitening: cholesky}\n"},
      {"rank_auto",
       "method: gptq\nweights: {bits: 2, group_size: 64}\n"
       "error_reconstruction: {rank: auto, energy: 0.9, max_extra_params: 0.1}\n"},
      {"smoothquant", "method: rtn\nweights: {bits: 8}\nsmoothing: {method: smoothquant}\n"},
      {"saliency",
       "method: gptq\nweights: {bits: 2, group_size: 128}\nhessian: output_adaptive\n"
       "retrain:\n  method: saliency\n  rank: 16\n  epochs: {weight: 15, mixed: 0, output: 5}\n"
       "  lambda: 0.1\n  lr_lora: 5.0e-4\n  lr_clip: 5.0e-3\n  weight_decay: 0.1\n"},
      {"balanced", "method: gptq\nweights: {bits: 2, grid: balanced}\n"},
      {"unknown_key", "method: gptq\nweights: {bits: 4, color: red}\n"},
  };
  for (const auto& [name, text] : recipes) c.Add("recipe", name, text);
}

void TokenizerSeeds(const Corpus& c) {
  const std::string tiny = TinyTokenizerJson();
  c.Add("tokenizer", "tiny", JoinFiles({tiny, "the theme\u00e9 <s> 123 \xe2\x80\x94 end</s>"}));
  Json j = Json::parse(tiny);
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFKC"}}}}};
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern",
          {{"Regex",
            R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  j["model"]["merges"] = {{"t", "h"}, {"th", "e"}};
  j["model"]["ignore_merges"] = true;
  j["added_tokens"][0]["lstrip"] = true;
  j["added_tokens"][1]["rstrip"] = true;
  j["added_tokens"][2]["single_word"] = true;
  j["added_tokens"][2]["special"] = false;
  j["added_tokens"][2]["normalized"] = true;
  c.Add("tokenizer", "llama3_split", JoinFiles({j.dump(1), "I'll  say <s> the\r\n\tend<|eot|>"}));
  Json metaspace = Json::parse(tiny);
  metaspace["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\u2581"}};
  c.Add("tokenizer", "metaspace_refused", metaspace.dump(1));
}

// A GPTQ v1 checkpoint of the tiny model: every linear quantized at `bits` with groups of `group`
// (act-order: g_idx by a permutation), as the exporter packs it.
std::string GptqCheckpoint(int bits, int group, bool act_order, bool inline_config,
                           std::string* quantize_config) {
  std::map<std::string, Tensor> tensors;
  const std::map<std::string, std::string> tiny = TinyModelFiles();
  auto base = Check(SafetensorsFile::FromBytes(tiny.at("model.safetensors"), "tiny"));
  ModelConfig config = Check(ParseModelConfig(tiny.at("config.json"), "config.json"));
  std::set<std::string> linears;
  for (engine::LinearKind k : engine::kAllLinears) linears.insert(engine::LinearPrefix(0, k));
  for (const auto& [name, info] : base->tensors()) {
    const std::string prefix = name.substr(0, name.size() - std::string(".weight").size());
    if (!linears.count(prefix)) {
      tensors[name] = Check(base->Get(name)).Clone();
      continue;
    }
    const int64_t d_out = info.shape[0], d_in = info.shape[1];
    const int64_t n_groups = (d_in + group - 1) / group;
    std::vector<int32_t> codes(d_out * d_in), zeros(n_groups * d_out), g_idx(d_in);
    for (int64_t i = 0; i < d_out * d_in; ++i)
      codes[i] = static_cast<int32_t>((i * 7) % (1 << bits));
    for (int64_t i = 0; i < n_groups * d_out; ++i)
      zeros[i] = 1 + static_cast<int32_t>(i % ((1 << bits) - 1));
    for (int64_t j = 0; j < d_in; ++j) {
      const int64_t position = act_order ? (j * 5) % d_in : j;  // 5 is coprime to 32 and 64
      g_idx[j] = static_cast<int32_t>(position / group);
    }
    const std::vector<int32_t> qweight = Check(engine::PackQweight(codes, d_out, d_in, bits));
    const std::vector<int32_t> qzeros = Check(engine::PackQzeros(zeros, n_groups, d_out, bits));
    tensors[prefix + ".qweight"] = I32(qweight, {engine::PackedLength(d_in, bits), d_out});
    tensors[prefix + ".qzeros"] = I32(qzeros, {n_groups, engine::PackedLength(d_out, bits)});
    tensors[prefix + ".g_idx"] = I32(g_idx, {d_in});
    tensors[prefix + ".scales"] =
        Check(Tensor::FromVector(std::vector<float>(n_groups * d_out, 0.01f), {n_groups, d_out})
                  .ConvertTo(DType::kF16));
  }
  Json qc = {{"quant_method", "gptq"},
             {"bits", bits},
             {"group_size", group},
             {"desc_act", act_order},
             {"sym", false},
             {"checkpoint_format", "gptq"},
             {"qcal", {{"activation_bits", 16}, {"grid", "uniform"}}}};
  Json cfg = Json::parse(TinyModelConfigJson());
  if (inline_config) {
    cfg["quantization_config"] = qc;
    *quantize_config = "";
  } else {
    qc.erase("quant_method");  // AutoGPTQ's quantize_config.json may omit it
    *quantize_config = qc.dump(1);
  }
  return JoinFiles({cfg.dump(1), *quantize_config, Serialize(tensors)});
}

void GptqSeeds(const Corpus& c) {
  std::string qc;
  c.Add("gptq_checkpoint", "w4_g32_quantize_config", GptqCheckpoint(4, 32, false, false, &qc));
  c.Add("gptq_checkpoint", "w3_g16_act_order", GptqCheckpoint(3, 16, true, true, &qc));
  c.Add("gptq_checkpoint", "w8_per_channel", GptqCheckpoint(8, 64, false, true, &qc));
  c.Add("gptq_checkpoint", "w2_g32", GptqCheckpoint(2, 32, true, false, &qc));
  const std::map<std::string, std::string> tiny = TinyModelFiles();
  c.Add("gptq_checkpoint", "unquantized",
        JoinFiles({tiny.at("config.json"), "", tiny.at("model.safetensors")}));
}

void AdapterSeeds(const Corpus& c) {
  std::map<std::string, engine::LowRankAdapter> adapters;
  adapters["model.layers.0.self_attn.q_proj"] = {F32({32, 4}, 1), F32({4, 32}, 2)};
  adapters["model.layers.0.self_attn.v_proj"] = {F32({32, 4}, 3), F32({4, 32}, 4)};
  adapters["model.layers.0.mlp.down_proj"] = {F32({32, 8}, 5), F32({8, 64}, 6)};
  const fs::path dir = fs::temp_directory_path() / "qcal-make-seeds-adapter";
  fs::remove_all(dir);
  if (!engine::WriteLoraAdapter(dir.string(), adapters).ok()) std::abort();
  const std::string config = Check(ReadFileToString((dir / "adapter_config.json").string()));
  const std::string weights = Check(ReadFileToString((dir / "adapter_model.safetensors").string()));
  fs::remove_all(dir);
  c.Add("adapter", "three_linears", JoinFiles({config, weights}));
  Json alpha = Json::parse(config);
  alpha["lora_alpha"] = 8;
  alpha["alpha_pattern"] = {{"model.layers.0.mlp.down_proj", 16}};
  c.Add("adapter", "alpha_pattern", JoinFiles({alpha.dump(1), weights}));
}

void ActivationSeeds(const Corpus& c, kernels::Backend& backend) {
  engine::CalibActivations acts;
  acts.seq_len = 3;
  acts.next_block = 2;
  acts.chunk_batch = {2, 1};
  acts.chunks = {F32({6, 4}, 1), F32({3, 4}, 2)};
  acts.first_chunk = 0;
  acts.total_chunks = 2;
  const fs::path dir = fs::temp_directory_path() / "qcal-make-seeds-acts";
  fs::create_directories(dir);
  auto save = [&](const engine::CalibActivations& a, int chunk) {
    const std::string path = (dir / "x.safetensors").string();
    const absl::Status s = chunk < 0 ? engine::SaveActivations(backend, a, path)
                                     : engine::SaveActivationChunk(backend, a, chunk, path);
    if (!s.ok()) std::abort();
    return Check(ReadFileToString(path));
  };
  c.Add("activations", "two_chunks", save(acts, -1));
  c.Add("activations", "assembled", JoinFiles({save(acts, 0), save(acts, 1)}));
  acts.fp_chunks = {F32({6, 4}, 3), F32({3, 4}, 4)};
  c.Add("activations", "full_precision_path", save(acts, -1));
  c.Add("activations", "assembled_full_precision", JoinFiles({save(acts, 0), save(acts, 1)}));
  // Written before gangs: no first_chunk / total_chunks.
  std::map<std::string, Tensor> old = {{"chunk.100000", F32({3, 4}, 5)}};
  c.Add("activations", "legacy",
        Serialize(old, {{"seq_len", "3"}, {"next_block", "1"}, {"chunk_batch", "1"}}));
  fs::remove_all(dir);
}

void LayerSeeds(const Corpus& c) {
  const int64_t d_out = 8, d_in = 12;
  const std::vector<float> w = Values(d_out * d_in, 7);
  auto layer = [&](const kernels::QuantSpec& spec, int64_t rank, bool act_order, bool folded) {
    engine::LayerResult r;
    r.quantized = Check(kernels::ref::QuantizeRtn(w.data(), d_out, d_in, spec));
    if (act_order) {
      r.quantized.perm.resize(d_in);
      for (int64_t p = 0; p < d_in; ++p) r.quantized.perm[p] = static_cast<int32_t>((p * 5) % d_in);
    }
    r.report.block = 1;
    r.report.kind = engine::LinearKind::kV;
    r.report.name = engine::LinearPrefix(1, engine::LinearKind::kV);
    r.report.d_out = d_out;
    r.report.d_in = d_in;
    r.report.rel_error = 0.05;
    r.report.rank = rank;
    if (rank > 0) {
      r.lora_a = Values(d_out * rank, 1);
      r.lora_b = Values(rank * d_in, 2);
      r.act_bits = 8;
    }
    if (folded) r.folded["model.layers.1.self_attn.v_proj.bias"] = F32({d_out}, 3);
    return engine::SerializeSolvedLayer(r);
  };
  kernels::QuantSpec spec;
  spec.bits = 4;
  spec.group_size = 4;
  c.Add("layer_artifact", "w4_g4", layer(spec, 0, false, false));
  spec.bits = 3;
  spec.group_size = -1;
  spec.symmetric = true;
  c.Add("layer_artifact", "w3_sym_low_rank", layer(spec, 2, true, true));
  spec = {};
  spec.bits = 2;
  spec.group_size = 8;
  spec.grid = kernels::GridKind::kBalanced;
  c.Add("layer_artifact", "balanced", layer(spec, 0, false, false));
  spec.grid = kernels::GridKind::kCuberoot;
  spec.bits = 5;
  c.Add("layer_artifact", "cuberoot", layer(spec, 0, true, false));
}

void JobSpecSeeds(const Corpus& c) {
  v1::SubmitJobRequest request;
  v1::JobSpec& s = *request.mutable_spec();
  s.set_model("model");
  s.set_calib("calib.txt");
  s.set_samples(4);
  s.set_seq_len(16);
  s.mutable_recipe()->set_method("gptq");
  s.mutable_recipe()->mutable_weights()->set_bits(4);
  s.mutable_recipe()->mutable_weights()->set_group_size(32);
  s.set_output_name("out");
  c.Add("job_spec", "minimal", request.SerializeAsString());
  request.set_idempotency_key("key-1");
  s.set_eval_text("eval.txt");
  s.set_eval_seq_len(8);
  s.set_eval_max_windows(2);
  s.set_threads(2);
  s.set_shard_size(1 << 20);
  s.set_compute_dtype("bf16");
  s.mutable_workers()->set_min(1);
  s.mutable_workers()->set_max(3);
  v1::Recipe& r = *s.mutable_recipe();
  r.mutable_activations()->set_bits(8);
  r.mutable_smoothing()->set_method("aser");
  r.mutable_smoothing()->set_outlier_channels(4);
  r.mutable_error_reconstruction()->set_rank_auto(true);
  c.Add("job_spec", "full", request.SerializeAsString());
  r.clear_smoothing();
  r.clear_error_reconstruction();
  r.set_hessian("output_adaptive");
  r.mutable_retrain()->set_method("saliency");
  r.mutable_retrain()->mutable_epochs()->set_weight(2);
  c.Add("job_spec", "saliency", request.SerializeAsString());
  s.set_model("escape/etc");
  c.Add("job_spec", "escape", request.SerializeAsString());
  s.set_model("../model");
  c.Add("job_spec", "dotdot", request.SerializeAsString());
}

}  // namespace
}  // namespace qcal::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const qcal::fuzz::Corpus corpus{argv[1]};
  qcal::fuzz::SafetensorsSeeds(corpus);
  qcal::fuzz::ModelConfigSeeds(corpus);
  qcal::fuzz::RecipeSeeds(corpus);
  qcal::fuzz::TokenizerSeeds(corpus);
  qcal::fuzz::GptqSeeds(corpus);
  qcal::fuzz::AdapterSeeds(corpus);
  qcal::fuzz::ActivationSeeds(corpus, qcal::fuzz::CpuBackend());
  qcal::fuzz::LayerSeeds(corpus);
  qcal::fuzz::JobSpecSeeds(corpus);
  return 0;
}
