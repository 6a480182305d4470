#include "services/engine/synth/synthetic_checkpoint.h"

#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <future>
#include <numbers>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dtype.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/safetensors_writer.h"
#include "common/sentencepiece_shim.h"
#include "common/status.h"
#include "common/text_data.h"
#include "nlohmann/json.hpp"
#include "services/engine/bench_shapes.h"
#include "services/engine/model.h"
#include "services/engine/synth/synthetic_text.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;

// Weight statistics (see the header).
constexpr double kLinearGain = 0.6;
constexpr double kRowLogSigma = 0.3;
constexpr double kColumnLogSigma = 0.2;
constexpr double kNormMean = 0.9;
constexpr double kNormSigma = 0.03;
constexpr double kOutlierNormMin = 8.0;
constexpr double kOutlierNormMax = 20.0;
constexpr double kEmbedSigma = 0.03;
constexpr double kEmbedRowLogSigma = 0.2;

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

// The seed of the random stream named `name` (a tensor name, a text file name).
uint64_t StreamSeed(uint64_t seed, const std::string& name) {
  return SplitMix64(seed).Next() ^ Fnv1a(name);
}

// One tensor's random stream, addressed by position: Bits(n) is output n (0-based) of
// SplitMix64(seed), Normal(m) the m-th standard normal of the Box–Muller pairs built from it.
class Stream {
 public:
  explicit Stream(uint64_t seed) : seed_(seed) {}

  uint64_t Bits(uint64_t n) const {
    uint64_t z = seed_ + (n + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  // Uniform on the open interval (0, 1), so that log() below is finite.
  double Uniform(uint64_t n) const { return (static_cast<double>(Bits(n) >> 11) + 0.5) * 0x1p-53; }

  // Calls fn(k, x) for k in [0, count) with x the normal first + k.
  template <typename Fn>
  void ForEachNormal(uint64_t first, int64_t count, Fn&& fn) const {
    int64_t k = 0;
    uint64_t m = first;
    while (k < count) {
      const uint64_t pair = m / 2;
      const double r = std::sqrt(-2.0 * std::log(Uniform(2 * pair)));
      const double theta = 2.0 * std::numbers::pi * Uniform(2 * pair + 1);
      if (m % 2 == 0) {
        fn(k++, r * std::cos(theta));
        if (k == count) break;
      }
      fn(k++, r * std::sin(theta));
      m = 2 * pair + 2;
    }
  }

  double Normal(uint64_t m) const {
    double out = 0;
    ForEachNormal(m, 1, [&](int64_t, double x) { out = x; });
    return out;
  }

  std::vector<double> Normals(uint64_t first, int64_t count) const {
    std::vector<double> out(static_cast<size_t>(count));
    ForEachNormal(first, count, [&](int64_t k, double x) { out[k] = x; });
    return out;
  }

 private:
  uint64_t seed_;
};

// Runs fn(piece) for every piece in [0, pieces) on up to `threads` threads, each taking the next
// piece when done with one. Pieces write disjoint outputs, so the result does not depend on
// scheduling.
void ForEachPiece(int64_t pieces, int threads, const std::function<void(int64_t)>& fn) {
  const int64_t workers = std::min<int64_t>(threads, pieces);
  if (workers <= 1) {
    for (int64_t p = 0; p < pieces; ++p) fn(p);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t p = next++; p < pieces; p = next++) fn(p);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
}

int ResolveThreads(int threads) {
  return threads > 0 ? threads
                     : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// Stores fp32 values into a tensor of dtype F32 or BF16, piece by piece: fill(begin, count, dst)
// writes elements [begin, begin + count) as fp32 into dst.
void FillPieces(Tensor& t, int threads, const std::function<void(int64_t, int64_t, float*)>& fill) {
  const int64_t n = t.numel();
  const int64_t pieces = (n + kSynthPieceElements - 1) / kSynthPieceElements;
  ForEachPiece(pieces, threads, [&](int64_t p) {
    const int64_t begin = p * kSynthPieceElements;
    const int64_t count = std::min(kSynthPieceElements, n - begin);
    if (t.dtype() == DType::kF32) {
      fill(begin, count, t.data<float>() + begin);
      return;
    }
    std::vector<float> scratch(static_cast<size_t>(count));
    fill(begin, count, scratch.data());
    uint16_t* out = t.data<uint16_t>() + begin;
    for (int64_t i = 0; i < count; ++i) out[i] = FloatToBf16(scratch[i]);
  });
}

// Normals 0 .. d_out + d_in - 1 are the row and column scales' exponents, then one per weight.
Tensor LinearWeight(const PlannedTensor& p, uint64_t seed, int threads) {
  const Stream s(StreamSeed(seed, p.name));
  const int64_t d_out = p.shape[0], d_in = p.shape[1];
  std::vector<double> row = s.Normals(0, d_out), col = s.Normals(d_out, d_in);
  for (double& r : row) r = std::exp(kRowLogSigma * r);
  for (double& c : col) c = std::exp(kColumnLogSigma * c);
  const double base = kLinearGain / std::sqrt(static_cast<double>(d_in));
  Tensor t = Tensor::Zeros(p.dtype, p.shape);
  FillPieces(t, threads, [&](int64_t begin, int64_t count, float* dst) {
    s.ForEachNormal(d_out + d_in + begin, count, [&](int64_t k, double x) {
      const int64_t e = begin + k;
      dst[k] = static_cast<float>(base * row[e / d_in] * col[e % d_in] * x);
    });
  });
  return t;
}

// Normals 0 .. hidden - 1, then the outliers' uniforms after the last pair.
Tensor NormWeight(const PlannedTensor& p, uint64_t seed, const std::vector<int>& outliers) {
  const Stream s(StreamSeed(seed, p.name));
  const int64_t hidden = p.shape[0];
  std::vector<float> w(static_cast<size_t>(hidden));
  s.ForEachNormal(0, hidden, [&](int64_t c, double x) {
    w[c] = static_cast<float>(kNormMean + kNormSigma * x);
  });
  uint64_t next = 2 * static_cast<uint64_t>((hidden + 1) / 2);
  for (int c : outliers) {
    w[c] = static_cast<float>(kOutlierNormMin +
                              (kOutlierNormMax - kOutlierNormMin) * s.Uniform(next++));
  }
  Tensor t = Tensor::Zeros(p.dtype, p.shape);
  for (int64_t c = 0; c < hidden; ++c) {
    if (p.dtype == DType::kF32) {
      t.data<float>()[c] = w[c];
    } else {
      t.data<uint16_t>()[c] = FloatToBf16(w[c]);
    }
  }
  return t;
}

// Row v is normals v·(hidden + 1) (its scale's exponent) and the next hidden (its values).
Tensor EmbeddingWeight(const PlannedTensor& p, uint64_t seed, int threads) {
  const Stream s(StreamSeed(seed, p.name));
  const int64_t hidden = p.shape[1];
  Tensor t = Tensor::Zeros(p.dtype, p.shape);
  FillPieces(t, threads, [&](int64_t begin, int64_t count, float* dst) {
    for (int64_t done = 0; done < count;) {
      const int64_t v = (begin + done) / hidden, c = (begin + done) % hidden;
      const int64_t run = std::min(hidden - c, count - done);
      const uint64_t row_first = static_cast<uint64_t>(v) * (hidden + 1);
      const double scale = kEmbedSigma * std::exp(kEmbedRowLogSigma * s.Normal(row_first));
      s.ForEachNormal(row_first + 1 + c, run,
                      [&](int64_t k, double x) { dst[done + k] = static_cast<float>(scale * x); });
      done += run;
    }
  });
  return t;
}

// Biases (q/k/v of qwen2): 0.1 · N(0, 1).
Tensor BiasWeight(const PlannedTensor& p, uint64_t seed) {
  const Stream s(StreamSeed(seed, p.name));
  Tensor t = Tensor::Zeros(p.dtype, p.shape);
  s.ForEachNormal(0, p.shape[0], [&](int64_t c, double x) {
    const float v = static_cast<float>(0.1 * x);
    if (p.dtype == DType::kF32) {
      t.data<float>()[c] = v;
    } else {
      t.data<uint16_t>()[c] = FloatToBf16(v);
    }
  });
  return t;
}

bool EndsWith(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string ConfigJson(const ModelConfig& c) {
  // nlohmann::json keeps keys sorted, so the bytes do not depend on insertion order.
  nlohmann::json j;
  const std::string& mt = c.model_type;
  const bool qwen2 = mt == "qwen2" || mt == "qwen2_moe";
  if (mt == "mistral") {
    j["architectures"] = {"MistralForCausalLM"};
    j["sliding_window"] = c.sliding_window;
  } else if (mt == "mixtral") {
    j["architectures"] = {"MixtralForCausalLM"};
    j["sliding_window"] = nullptr;
    j["num_local_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["router_jitter_noise"] = 0.0;  // training only
    j["router_aux_loss_coef"] = 0.02;
    j["output_router_logits"] = false;
  } else if (mt == "qwen2" || mt == "qwen3" || mt == "qwen2_moe" || mt == "qwen3_moe") {
    static const std::map<std::string, const char*> kArchitectures = {
        {"qwen2", "Qwen2ForCausalLM"},
        {"qwen3", "Qwen3ForCausalLM"},
        {"qwen2_moe", "Qwen2MoeForCausalLM"},
        {"qwen3_moe", "Qwen3MoeForCausalLM"}};
    j["architectures"] = {kArchitectures.at(mt)};
    j["use_sliding_window"] = false;
    j["sliding_window"] = 64;  // ignored: use_sliding_window is false
    j["max_window_layers"] = c.num_layers;
    if (c.moe()) {
      j["num_experts"] = c.num_experts;
      j["num_experts_per_tok"] = c.num_experts_per_tok;
      j["moe_intermediate_size"] = c.moe_intermediate_size;
      j["norm_topk_prob"] = c.norm_topk_prob;
      j["decoder_sparse_step"] = c.decoder_sparse_step;
      j["mlp_only_layers"] = c.mlp_only_layers;
      j["router_aux_loss_coef"] = 0.001;
      j["output_router_logits"] = false;
      if (mt == "qwen2_moe") {
        j["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size;
        j["qkv_bias"] = true;
      }
    }
  } else {
    j["architectures"] = {"LlamaForCausalLM"};
  }
  const RopeScaling& r = c.rope_scaling;
  if (r.type == RopeScaling::Type::kLlama3) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", r.factor},
                         {"low_freq_factor", r.low_freq_factor},
                         {"high_freq_factor", r.high_freq_factor},
                         {"original_max_position_embeddings", r.original_max_position_embeddings}};
  } else if (r.type == RopeScaling::Type::kYarn) {
    j["rope_scaling"] = {{"type", "yarn"},
                         {"rope_type", "yarn"},
                         {"factor", r.factor},
                         {"original_max_position_embeddings", r.original_max_position_embeddings}};
  } else if (r.type == RopeScaling::Type::kLinear) {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", r.factor}};
  }
  j["attention_bias"] = !qwen2 && c.attention_bias;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["hidden_size"] = c.hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = c.intermediate_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["mlp_bias"] = false;
  j["model_type"] = c.model_type;
  j["num_attention_heads"] = c.num_heads;
  j["num_hidden_layers"] = c.num_layers;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["torch_dtype"] = c.dtype;
  j["use_cache"] = true;
  j["vocab_size"] = c.vocab_size;
  return j.dump(2) + "\n";
}

std::string GenerationConfigJson(const ModelConfig& c) {
  nlohmann::json j;
  j["_from_model_config"] = true;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  return j.dump(2) + "\n";
}

// Removes a temporary directory on scope exit unless released.
class TempDirGuard {
 public:
  explicit TempDirGuard(fs::path path) : path_(std::move(path)) {}
  ~TempDirGuard() {
    if (!path_.empty()) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  TempDirGuard(const TempDirGuard&) = delete;
  TempDirGuard& operator=(const TempDirGuard&) = delete;
  void Release() { path_.clear(); }

 private:
  fs::path path_;
};

// OK when `target` may be replaced: absent, an empty directory, or a non-empty one with overwrite.
absl::Status CheckTarget(const fs::path& target, bool overwrite) {
  std::error_code ec;
  const fs::file_status st = fs::status(target, ec);
  if (!fs::exists(st)) return absl::OkStatus();
  if (!fs::is_directory(st)) {
    return absl::InvalidArgumentError(
        absl::StrCat(target.string(), ": exists and is not a directory"));
  }
  const bool empty = fs::is_empty(target, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(target.string(), ": cannot read directory: ", ec.message()));
  }
  if (!empty && !overwrite) {
    return absl::FailedPreconditionError(absl::StrCat(
        target.string(), ": directory exists and is not empty (use --overwrite to replace it)"));
  }
  return absl::OkStatus();
}

absl::Status WriteFile(const fs::path& dir, const std::string& name, const std::string& contents) {
  return WriteStringToFile((dir / name).string(), contents);
}

}  // namespace

absl::StatusOr<SynthPreset> ParseSynthPreset(const std::string& name) {
  for (SynthPreset p : {SynthPreset::kTiny, SynthPreset::kSmall, SynthPreset::k7b,
                        SynthPreset::k13b, SynthPreset::k70b}) {
    if (name == SynthPresetName(p)) return p;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synth preset \"", name, "\" (expected tiny, small, 7b, 13b or 70b)"));
}

const char* SynthPresetName(SynthPreset preset) {
  switch (preset) {
    case SynthPreset::kTiny:
      return "tiny";
    case SynthPreset::kSmall:
      return "small";
    case SynthPreset::k7b:
      return "7b";
    case SynthPreset::k13b:
      return "13b";
    case SynthPreset::k70b:
      return "70b";
  }
  return "?";
}

absl::StatusOr<SynthArch> ParseSynthArch(const std::string& name) {
  for (SynthArch a :
       {SynthArch::kLlama, SynthArch::kLlama3, SynthArch::kQwen2, SynthArch::kQwen3,
        SynthArch::kMistral, SynthArch::kMixtral, SynthArch::kQwen2Moe, SynthArch::kQwen3Moe}) {
    if (name == SynthArchName(a)) return a;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synth arch \"", name,
                   "\" (expected llama, llama3, qwen2, qwen3, mistral, mixtral, qwen2_moe or "
                   "qwen3_moe)"));
}

const char* SynthArchName(SynthArch arch) {
  switch (arch) {
    case SynthArch::kLlama:
      return "llama";
    case SynthArch::kLlama3:
      return "llama3";
    case SynthArch::kQwen2:
      return "qwen2";
    case SynthArch::kQwen3:
      return "qwen3";
    case SynthArch::kMistral:
      return "mistral";
    case SynthArch::kMixtral:
      return "mixtral";
    case SynthArch::kQwen2Moe:
      return "qwen2_moe";
    case SynthArch::kQwen3Moe:
      return "qwen3_moe";
  }
  return "?";
}

ModelConfig SynthConfig(SynthPreset preset, int layers, SynthArch arch) {
  ModelConfig c;
  if (preset == SynthPreset::kTiny || preset == SynthPreset::kSmall) {
    c.model_type = "llama";
    c.head_dim = 32;
    c.max_position_embeddings = 2048;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 10000.0;
    c.dtype = "float32";
    const bool tiny = preset == SynthPreset::kTiny;
    c.hidden_size = tiny ? 128 : 256;
    c.intermediate_size = tiny ? 384 : 768;
    c.num_layers = tiny ? 2 : 4;
    c.num_heads = tiny ? 4 : 8;
    c.num_kv_heads = tiny ? 2 : 4;
    c.vocab_size = tiny ? 512 : 1024;
  } else {
    // One definition of the Llama-2 shapes: the benchmark's (vocab, eps, theta, 4096 positions).
    const absl::StatusOr<BenchShape> shape = BenchShapeNamed(SynthPresetName(preset));
    QCAL_CHECK(shape.ok());
    c = shape->config;
    c.dtype = "bfloat16";
  }
  c.tie_word_embeddings = false;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  if (layers > 0) c.num_layers = layers;
  switch (arch) {
    case SynthArch::kLlama:
      break;
    case SynthArch::kLlama3:
      c.rope_theta = 500000.0;
      c.rope_scaling.type = RopeScaling::Type::kLlama3;
      c.rope_scaling.factor = 8;
      c.rope_scaling.low_freq_factor = 1;
      c.rope_scaling.high_freq_factor = 4;
      c.rope_scaling.original_max_position_embeddings = 64;
      break;
    case SynthArch::kQwen2:
      c.model_type = "qwen2";
      c.attention_bias = true;
      c.tie_word_embeddings = true;
      c.rms_norm_eps = 1e-6;
      c.rope_theta = 1000000.0;
      c.rope_scaling.type = RopeScaling::Type::kYarn;
      c.rope_scaling.factor = 4;
      c.rope_scaling.original_max_position_embeddings = 64;
      c.rope_scaling.attention_factor = 0.1 * std::log(4.0) + 1.0;
      c.max_position_embeddings = 256;
      break;
    case SynthArch::kQwen3:
      c.model_type = "qwen3";
      c.head_dim = 64;
      c.qk_norm = true;
      c.tie_word_embeddings = true;
      c.rms_norm_eps = 1e-6;
      c.rope_theta = 1000000.0;
      break;
    case SynthArch::kMistral:
      c.model_type = "mistral";
      c.sliding_window = 16;
      break;
    case SynthArch::kMixtral:
      c.model_type = "mixtral";
      c.rope_theta = 1000000.0;
      c.intermediate_size = 256;
      c.num_experts = 4;
      c.num_experts_per_tok = 2;
      c.moe_intermediate_size = c.intermediate_size;
      c.norm_topk_prob = true;
      break;
    case SynthArch::kQwen2Moe:
      c.model_type = "qwen2_moe";
      c.attention_bias = true;
      c.rms_norm_eps = 1e-6;
      c.rope_theta = 1000000.0;
      c.num_experts = 8;
      c.num_experts_per_tok = 4;
      c.moe_intermediate_size = 128;
      c.shared_expert_intermediate_size = 256;
      c.norm_topk_prob = false;
      break;
    case SynthArch::kQwen3Moe:
      c.model_type = "qwen3_moe";
      c.head_dim = 64;
      c.qk_norm = true;
      c.rms_norm_eps = 1e-6;
      c.rope_theta = 1000000.0;
      c.num_experts = 8;
      c.num_experts_per_tok = 2;
      c.moe_intermediate_size = 128;
      c.norm_topk_prob = true;
      c.mlp_only_layers = {0};
      break;
  }
  return c;
}

int SynthOutlierCount(SynthPreset preset) { return preset == SynthPreset::kTiny ? 3 : 4; }

std::vector<int> SynthOutlierChannels(SynthPreset preset, uint64_t seed) {
  const int hidden = SynthConfig(preset).hidden_size;
  std::vector<int> channels(hidden);
  for (int c = 0; c < hidden; ++c) channels[c] = c;
  // A partial Fisher–Yates shuffle picks distinct channels.
  SplitMix64 rng(StreamSeed(seed, "outlier_channels"));
  const int k = SynthOutlierCount(preset);
  for (int i = 0; i < k; ++i) {
    const int j = i + static_cast<int>(rng.Next() % static_cast<uint64_t>(hidden - i));
    std::swap(channels[i], channels[j]);
  }
  channels.resize(k);
  std::sort(channels.begin(), channels.end());
  return channels;
}

std::vector<PlannedTensor> SynthTensorPlan(const ModelConfig& c) {
  const DType dtype = c.dtype == "bfloat16" ? DType::kBF16 : DType::kF32;
  const int64_t d = c.hidden_size, f = c.intermediate_size, v = c.vocab_size;
  std::vector<PlannedTensor> plan;
  plan.push_back({"model.embed_tokens.weight", dtype, {v, d}});
  plan.push_back({"model.norm.weight", dtype, {d}});
  if (!c.tie_word_embeddings) plan.push_back({"lm_head.weight", dtype, {v, d}});
  for (int b = 0; b < c.num_layers; ++b) {
    for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) {
      plan.push_back({absl::StrCat("model.layers.", b, ".", norm, ".weight"), dtype, {d}});
    }
    if (c.qk_norm) {
      for (const char* norm : {"q_norm", "k_norm"}) {
        plan.push_back({absl::StrCat("model.layers.", b, ".self_attn.", norm, ".weight"),
                        dtype,
                        {c.head_dim}});
      }
    }
    if (c.IsMoeBlock(b)) {
      const auto expert = [&](const std::function<std::string(LinearKind)>& prefix_of,
                              int64_t inter) {
        plan.push_back({prefix_of(LinearKind::kGate) + ".weight", dtype, {inter, d}});
        plan.push_back({prefix_of(LinearKind::kUp) + ".weight", dtype, {inter, d}});
        plan.push_back({prefix_of(LinearKind::kDown) + ".weight", dtype, {d, inter}});
      };
      plan.push_back({RouterWeightName(c, b), dtype, {c.num_experts, d}});
      for (int e = 0; e < c.num_experts; ++e) {
        expert([&](LinearKind k) { return ExpertLinearPrefix(c, b, e, k); },
               c.moe_intermediate_size);
      }
      if (c.shared_expert_intermediate_size > 0) {
        expert([&](LinearKind k) { return SharedExpertPrefix(b, k); },
               c.shared_expert_intermediate_size);
        plan.push_back({SharedExpertGateWeightName(b), dtype, {1, d}});
      }
    }
    for (LinearKind k : kAllLinears) {
      if (!HasDenseLinear(c, b, k)) continue;
      int64_t d_out = d, d_in = d;
      switch (k) {
        case LinearKind::kQ:
          d_out = c.q_dim();
          break;
        case LinearKind::kK:
        case LinearKind::kV:
          d_out = c.kv_dim();
          break;
        case LinearKind::kO:
          d_in = c.q_dim();
          break;
        case LinearKind::kGate:
        case LinearKind::kUp:
          d_out = f;
          break;
        case LinearKind::kDown:
          d_in = f;
          break;
      }
      plan.push_back({LinearPrefix(b, k) + ".weight", dtype, {d_out, d_in}});
      const bool bias = k == LinearKind::kO
                            ? c.o_bias
                            : (k == LinearKind::kQ || k == LinearKind::kK || k == LinearKind::kV) &&
                                  c.attention_bias;
      if (bias) plan.push_back({LinearPrefix(b, k) + ".bias", dtype, {d_out}});
    }
  }
  std::sort(plan.begin(), plan.end(),
            [](const PlannedTensor& a, const PlannedTensor& b) { return a.name < b.name; });
  return plan;
}

Tensor SynthesizeTensor(const PlannedTensor& tensor, uint64_t seed,
                        const std::vector<int>& outliers, int threads) {
  threads = ResolveThreads(threads);
  if (tensor.name == "model.embed_tokens.weight") return EmbeddingWeight(tensor, seed, threads);
  if (tensor.name == "model.norm.weight") return NormWeight(tensor, seed, {});
  if (EndsWith(tensor.name, ".bias")) return BiasWeight(tensor, seed);
  if (EndsWith(tensor.name, "_norm.weight") &&
      tensor.name.find("self_attn.") != std::string::npos) {
    return NormWeight(tensor, seed, {});  // q_norm / k_norm: head_dim channels, no outliers
  }
  if (tensor.shape.size() == 1) return NormWeight(tensor, seed, outliers);
  return LinearWeight(tensor, seed, threads);
}

std::map<std::string, Tensor> SynthesizeWeights(SynthPreset preset, uint64_t seed, int layers,
                                                SynthArch arch) {
  const std::vector<int> outliers = SynthOutlierChannels(preset, seed);
  std::map<std::string, Tensor> w;
  for (const PlannedTensor& p : SynthTensorPlan(SynthConfig(preset, layers, arch))) {
    w[p.name] = SynthesizeTensor(p, seed, outliers, /*threads=*/0);
  }
  return w;
}

int SynthTokenizerVocab(const ModelConfig& config) {
  return std::min(config.vocab_size, kSynthMaxTokenizerVocab);
}

absl::StatusOr<std::string> TrainSynthTokenizer(const std::string& text, int vocab_size) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    if (nl > pos) lines.push_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  // Llama's tokenizer settings; one thread and the whole input in order make training
  // deterministic. Paragraph lines stay far below max_sentence_length.
  const std::string args = absl::StrCat(
      "--model_type=bpe --vocab_size=", vocab_size,
      " --num_threads=1 --input_sentence_size=0 --shuffle_input_sentence=false"
      " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --byte_fallback=true"
      " --character_coverage=1.0 --split_digits=true --allow_whitespace_only_pieces=true"
      " --normalization_rule_name=identity --remove_extra_whitespaces=false"
      " --add_dummy_prefix=true --max_sentence_length=65536 --minloglevel=1");
  std::string model;
  const std::string err = spm::Train(args, lines, &model);
  if (!err.empty()) {
    return absl::InternalError(
        absl::StrCat("training the SentencePiece tokenizer (vocab ", vocab_size, "): ", err));
  }
  return model;
}

absl::Status SynthOptions::Validate() const {
  if (out_dir.empty()) return absl::InvalidArgumentError("synth: the output directory is empty");
  if (layers.has_value() && *layers < 1) {
    return absl::InvalidArgumentError(absl::StrCat("synth: layers must be >= 1, got ", *layers));
  }
  if (dtype.has_value() && *dtype != DType::kF32 && *dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: dtype must be F32 or BF16, got ", DTypeName(*dtype)));
  }
  if (threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("synth: threads must be >= 0, got ", threads));
  }
  if (arch != SynthArch::kLlama && preset != SynthPreset::kTiny && preset != SynthPreset::kSmall) {
    return absl::InvalidArgumentError(absl::StrCat("synth: arch ", SynthArchName(arch),
                                                   " needs preset tiny or small, got ",
                                                   SynthPresetName(preset)));
  }
  return absl::OkStatus();
}

namespace {

// The id of token `content` in tokenizer.json (added tokens first, then model.vocab), or -1.
int TokenId(const nlohmann::json& tok, const std::string& content) {
  if (tok.contains("added_tokens") && tok["added_tokens"].is_array()) {
    for (const auto& t : tok["added_tokens"]) {
      if (t.is_object() && t.value("content", "") == content && t.contains("id") &&
          t["id"].is_number_integer()) {
        return t["id"].get<int>();
      }
    }
  }
  if (tok.contains("model") && tok["model"].is_object() && tok["model"].contains("vocab") &&
      tok["model"]["vocab"].is_object()) {
    const auto& vocab = tok["model"]["vocab"];
    auto it = vocab.find(content);
    if (it != vocab.end() && it->is_number_integer()) return it->get<int>();
  }
  return -1;
}

// A token named in tokenizer_config.json: a string or {"content": ...}; "" when absent or null.
std::string NamedToken(const nlohmann::json& cfg, const char* key) {
  if (!cfg.contains(key)) return "";
  const auto& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return "";
}

// Reads `dir`'s tokenizer files for the checkpoint: sets the vocabulary and bos/eos of `c` and
// returns the files to copy (name -> bytes).
absl::StatusOr<std::map<std::string, std::string>> ReadTokenizerFiles(const std::string& dir,
                                                                      ModelConfig& c) {
  std::map<std::string, std::string> files;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    const fs::path path = fs::path(dir) / name;
    if (!fs::exists(path)) {
      return absl::NotFoundError(absl::StrCat(path.string(),
                                              ": missing (--tokenizer needs tokenizer.json and "
                                              "tokenizer_config.json)"));
    }
    QCAL_ASSIGN_OR_RETURN(files[name], ReadFileToString(path.string()));
  }
  for (const char* name : {"generation_config.json", "special_tokens_map.json"}) {
    const fs::path path = fs::path(dir) / name;
    if (fs::exists(path)) {
      QCAL_ASSIGN_OR_RETURN(files[name], ReadFileToString(path.string()));
    }
  }
  const std::string tok_path = (fs::path(dir) / "tokenizer.json").string();
  nlohmann::json tok, cfg, gen;
  try {
    tok = nlohmann::json::parse(files["tokenizer.json"]);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(tok_path, ": malformed JSON: ", e.what()));
  }
  try {
    cfg = nlohmann::json::parse(files["tokenizer_config.json"]);
    if (files.count("generation_config.json")) {
      gen = nlohmann::json::parse(files["generation_config.json"]);
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": malformed tokenizer_config.json or ",
                                                   "generation_config.json: ", e.what()));
  }
  int64_t max_id = -1;
  if (!tok.is_object() || !tok.contains("model") || !tok["model"].is_object() ||
      !tok["model"].contains("vocab") || !tok["model"]["vocab"].is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(tok_path, ": key \"model.vocab\" missing or not an object"));
  }
  for (const auto& [piece, id] : tok["model"]["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(tok_path, ": model.vocab entry ", nlohmann::json(piece).dump(), " has id ",
                       id.dump(), " (expected a non-negative integer)"));
    }
    max_id = std::max(max_id, id.get<int64_t>());
  }
  if (tok.contains("added_tokens") && tok["added_tokens"].is_array()) {
    for (const auto& t : tok["added_tokens"]) {
      if (t.is_object() && t.contains("id") && t["id"].is_number_integer()) {
        max_id = std::max(max_id, t["id"].get<int64_t>());
      }
    }
  }
  if (max_id < 0 || max_id >= (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat(tok_path, ": no usable token ids (largest ", max_id, ")"));
  }
  c.vocab_size = static_cast<int>((max_id + 1 + 127) / 128 * 128);
  auto gen_id = [&](const char* key) -> int {
    if (!gen.is_object() || !gen.contains(key)) return -1;
    const auto& v = gen[key];
    if (v.is_number_integer()) return v.get<int>();
    if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int>();
    return -1;
  };
  const int eos_named = TokenId(tok, NamedToken(cfg, "eos_token"));
  const int eos = gen_id("eos_token_id") >= 0 ? gen_id("eos_token_id") : eos_named;
  const int bos_named = TokenId(tok, NamedToken(cfg, "bos_token"));
  const int bos = bos_named >= 0 ? bos_named : gen_id("bos_token_id");
  c.eos_token_id = eos >= 0 ? eos : 0;
  c.bos_token_id = bos >= 0 ? bos : c.eos_token_id;
  return files;
}

}  // namespace

namespace {

// Generates the plan's tensors in order and streams them into `dir`: tensor i + 1 is generated
// (on `threads` threads) while tensor i is being written, so two tensors at most are in memory.
absl::Status WriteWeights(const fs::path& dir, const std::vector<PlannedTensor>& plan,
                          uint64_t seed, const std::vector<int>& outliers, int64_t shard_bytes,
                          int threads) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<ShardedSafetensorsWriter> writer,
                        ShardedSafetensorsWriter::Create(dir.string(), plan, shard_bytes, "model",
                                                         {{"format", "pt"}}));
  int64_t total_bytes = 0, done_bytes = 0;
  for (const PlannedTensor& p : plan) total_bytes += NumElements(p.shape) * DTypeSize(p.dtype);
  const auto start = std::chrono::steady_clock::now();
  auto last_log = start;
  Tensor writing;                   // the tensor being written
  std::future<absl::Status> write;  // its write; destroyed (waited for) before `writing`
  for (const PlannedTensor& p : plan) {
    Tensor next = SynthesizeTensor(p, seed, outliers, threads);
    if (write.valid()) QCAL_RETURN_IF_ERROR(write.get());
    writing = std::move(next);
    write = std::async(std::launch::async,
                       [&writer, &writing, &p] { return writer->Write(p.name, writing); });
    done_bytes += writing.nbytes();
    const auto now = std::chrono::steady_clock::now();
    if (now - last_log > std::chrono::seconds(10)) {
      last_log = now;
      const double seconds = std::chrono::duration<double>(now - start).count();
      spdlog::info("synth: {:.1f} of {:.1f} GB generated ({:.0f} MB/s)", done_bytes * 1e-9,
                   total_bytes * 1e-9, done_bytes * 1e-6 / seconds);
    }
  }
  if (write.valid()) QCAL_RETURN_IF_ERROR(write.get());
  QCAL_RETURN_IF_ERROR(writer->Finish());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("synth: {:.2f} GB of weights in {} files in {:.1f} s ({:.0f} MB/s, {} threads)",
               total_bytes * 1e-9, writer->shard_files().size(), seconds,
               total_bytes * 1e-6 / std::max(seconds, 1e-9), threads);
  return absl::OkStatus();
}

// Name, size and (when asked) sha256 of every file in `dir`, sorted by name; files are hashed in
// parallel.
absl::StatusOr<std::vector<SynthFile>> ListFiles(const fs::path& dir, bool sha256, int threads) {
  std::vector<SynthFile> files;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const uintmax_t bytes = e.file_size(ec);
    if (ec) return absl::DataLossError(absl::StrCat(e.path().string(), ": ", ec.message()));
    files.push_back({e.path().filename().string(), static_cast<int64_t>(bytes), ""});
  }
  if (ec) return absl::DataLossError(absl::StrCat(dir.string(), ": ", ec.message()));
  std::sort(files.begin(), files.end(),
            [](const SynthFile& a, const SynthFile& b) { return a.name < b.name; });
  if (!sha256) return files;
  std::vector<absl::Status> status(files.size());
  ForEachPiece(static_cast<int64_t>(files.size()), threads, [&](int64_t i) {
    absl::StatusOr<std::string> sha = Sha256File((dir / files[i].name).string());
    if (sha.ok()) {
      files[i].sha256 = *std::move(sha);
    } else {
      status[i] = sha.status();
    }
  });
  for (const absl::Status& st : status) QCAL_RETURN_IF_ERROR(st);
  return files;
}

}  // namespace

absl::StatusOr<SynthResult> WriteSyntheticCheckpoint(const SynthOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  const int threads = ResolveThreads(options.threads);
  fs::path target = fs::path(options.out_dir).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();
  if (!target.has_filename() || target.filename() == "." || target.filename() == "..") {
    return absl::InvalidArgumentError(
        absl::StrCat(options.out_dir, ": not usable as an output directory name"));
  }
  QCAL_RETURN_IF_ERROR(CheckTarget(target, options.overwrite));

  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(parent.string(), ": cannot create directory: ", ec.message()));
  }
  std::string tmp_template = (parent / ("." + target.filename().string() + ".tmp-XXXXXX")).string();
  if (mkdtemp(tmp_template.data()) == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat(parent.string(), ": cannot create a temporary directory"));
  }
  const fs::path tmp(tmp_template);
  TempDirGuard guard(tmp);
  // mkdtemp creates mode 0700; the checkpoint directory gets the usual 0755 (best effort).
  fs::permissions(tmp,
                  fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                      fs::perms::others_read | fs::perms::others_exec,
                  ec);

  SynthResult result;
  result.config = SynthConfig(options.preset, options.layers.value_or(0), options.arch);
  std::map<std::string, std::string> tokenizer_files;
  if (!options.tokenizer_dir.empty()) {
    QCAL_ASSIGN_OR_RETURN(tokenizer_files,
                          ReadTokenizerFiles(options.tokenizer_dir, result.config));
  }
  if (options.dtype.has_value()) {
    result.config.dtype = *options.dtype == DType::kBF16 ? "bfloat16" : "float32";
  }
  result.outlier_channels = SynthOutlierChannels(options.preset, options.seed);
  const ModelConfig& c = result.config;
  spdlog::info("synth: {} preset, {} (hidden {}, {} layers, vocab {}), seed {}, {} threads",
               SynthPresetName(options.preset), SynthArchName(options.arch), c.hidden_size,
               c.num_layers, c.vocab_size, options.seed, threads);

  const std::string calib =
      GenerateSyntheticText(StreamSeed(options.seed, "calib.txt"), kSynthCalibBytes);
  const std::string eval =
      GenerateSyntheticText(StreamSeed(options.seed, "eval.txt"), kSynthEvalBytes);
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "calib.txt", calib));
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "eval.txt", eval));

  if (tokenizer_files.empty()) {
    const int tokenizer_vocab = SynthTokenizerVocab(c);
    spdlog::info("synth: training a {}-piece tokenizer on {} bytes of calib.txt", tokenizer_vocab,
                 calib.size());
    QCAL_ASSIGN_OR_RETURN(std::string tokenizer, TrainSynthTokenizer(calib, tokenizer_vocab));
    QCAL_RETURN_IF_ERROR(WriteFile(tmp, "tokenizer.model", tokenizer));
  } else {
    spdlog::info("synth: tokenizer files from {} (vocab {}, bos {}, eos {})", options.tokenizer_dir,
                 c.vocab_size, c.bos_token_id, c.eos_token_id);
    for (const auto& [name, bytes] : tokenizer_files) {
      QCAL_RETURN_IF_ERROR(WriteFile(tmp, name, bytes));
    }
  }

  const std::vector<PlannedTensor> plan = SynthTensorPlan(c);
  for (const PlannedTensor& p : plan) result.num_parameters += NumElements(p.shape);
  spdlog::info("synth: {} parameters ({}), outlier channels [{}]", result.num_parameters, c.dtype,
               absl::StrJoin(result.outlier_channels, ", "));
  QCAL_RETURN_IF_ERROR(
      WriteWeights(tmp, plan, options.seed, result.outlier_channels, options.shard_bytes, threads));
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "config.json", ConfigJson(c)));
  if (!tokenizer_files.count("generation_config.json")) {
    QCAL_RETURN_IF_ERROR(WriteFile(tmp, "generation_config.json", GenerationConfigJson(c)));
  }
  QCAL_ASSIGN_OR_RETURN(result.files, ListFiles(tmp, options.sha256, threads));

  // The target may have changed while we wrote; check again before replacing it.
  QCAL_RETURN_IF_ERROR(CheckTarget(target, options.overwrite));
  if (fs::exists(target, ec)) {
    fs::remove_all(target, ec);
    if (ec) {
      return absl::PermissionDeniedError(
          absl::StrCat(target.string(), ": cannot remove the old directory: ", ec.message()));
    }
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    return absl::PermissionDeniedError(absl::StrCat(
        target.string(), ": cannot move the new checkpoint into place: ", ec.message()));
  }
  guard.Release();
  spdlog::info("synth: wrote {}", target.string());
  return result;
}

}  // namespace qcal::engine
