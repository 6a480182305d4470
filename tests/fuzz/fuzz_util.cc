#include "tests/fuzz/fuzz_util.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "common/tensor.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"

namespace qcal::fuzz {
namespace fs = std::filesystem;

std::vector<std::string> SplitFiles(const uint8_t* data, size_t size, size_t n) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> parts;
  size_t pos = 0;
  while (parts.size() + 1 < n) {
    const size_t next = all.find(kFileSeparator, pos);
    if (next == std::string_view::npos) break;
    parts.emplace_back(all.substr(pos, next - pos));
    pos = next + kFileSeparator.size();
  }
  parts.emplace_back(all.substr(pos));
  parts.resize(n);
  return parts;
}

std::string JoinFiles(const std::vector<std::string>& files) {
  std::string out;
  for (size_t i = 0; i < files.size(); ++i) {
    if (i > 0) out += kFileSeparator;
    out += files[i];
  }
  return out;
}

ScratchDir& ScratchDir::Get() {
  static ScratchDir* dir = new ScratchDir();
  return *dir;
}

ScratchDir::ScratchDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern =
      absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/qcal-fuzz-XXXXXX");
  QCAL_CHECK(::mkdtemp(pattern.data()) != nullptr);
  path_ = pattern;
  static std::string* to_remove = new std::string(path_);
  std::atexit([] {
    std::error_code ec;
    fs::remove_all(*to_remove, ec);
  });
}

void ScratchDir::Clear() const {
  for (const auto& entry : fs::directory_iterator(path_)) fs::remove_all(entry.path());
}

std::string ScratchDir::Write(const std::string& rel, std::string_view bytes) const {
  WriteFiles(path_, {{rel, std::string(bytes)}});
  return (fs::path(path_) / rel).string();
}

kernels::Backend& CpuBackend() {
  static kernels::Backend* backend = [] {
    kernels::BackendOptions options;
    options.threads = 1;
    auto b = kernels::CreateCpuBackend(options);
    QCAL_CHECK(b.ok());
    return b->release();
  }();
  return *backend;
}

std::string TinyModelConfigJson() {
  return R"({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
 "vocab_size": 64, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
 "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
)";
}

std::map<std::string, std::string> TinyModelFiles() {
  const std::map<std::string, Shape> shapes = {
      {"model.embed_tokens.weight", {64, 32}},
      {"model.norm.weight", {32}},
      {"lm_head.weight", {64, 32}},
      {"model.layers.0.input_layernorm.weight", {32}},
      {"model.layers.0.post_attention_layernorm.weight", {32}},
      {"model.layers.0.self_attn.q_proj.weight", {32, 32}},
      {"model.layers.0.self_attn.k_proj.weight", {32, 32}},
      {"model.layers.0.self_attn.v_proj.weight", {32, 32}},
      {"model.layers.0.self_attn.o_proj.weight", {32, 32}},
      {"model.layers.0.mlp.gate_proj.weight", {64, 32}},
      {"model.layers.0.mlp.up_proj.weight", {64, 32}},
      {"model.layers.0.mlp.down_proj.weight", {32, 64}}};
  std::map<std::string, Tensor> tensors;
  int salt = 0;
  for (const auto& [name, shape] : shapes) {
    std::vector<float> v(static_cast<size_t>(NumElements(shape)));
    const bool norm = shape.size() == 1;
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = norm ? 1.0f : 0.05f * static_cast<float>(std::sin(0.37 * i + 1.3 * ++salt));
    }
    tensors[name] = Tensor::FromVector(v, shape);
  }
  absl::StatusOr<std::string> bytes = SerializeSafetensors(tensors);
  QCAL_CHECK(bytes.ok());
  return {{"config.json", TinyModelConfigJson()}, {"model.safetensors", *std::move(bytes)}};
}

std::string TinyTokenizerJson() {
  nlohmann::json vocab = nlohmann::json::object();
  int id = 0;
  vocab["\u0120"] = id++;  // the space byte's stand-in
  for (char c = 33; c <= 126; ++c) vocab[std::string(1, c)] = id++;
  const char* merges[] = {"t h", "th e", "\u0120 th"};
  nlohmann::json merge_list = nlohmann::json::array();
  for (const char* m : merges) {
    const std::string s = m;
    const size_t sp = s.find(' ');
    vocab[s.substr(0, sp) + s.substr(sp + 1)] = id++;
    merge_list.push_back(s);
  }
  nlohmann::json added = nlohmann::json::array();
  for (const char* t : {"<s>", "</s>", "<|eot|>"}) {
    added.push_back({{"id", id++},
                     {"content", t},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  nlohmann::json j = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"unk_token", nullptr}, {"vocab", vocab}, {"merges", merge_list}}}};
  return j.dump(1);
}

void WriteFiles(const std::string& dir, const std::map<std::string, std::string>& files) {
  for (const auto& [name, bytes] : files) {
    const fs::path p = fs::path(dir) / name;
    fs::create_directories(p.parent_path());
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    QCAL_CHECK(out.good());
  }
}

}  // namespace qcal::fuzz
