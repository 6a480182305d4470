#include "services/engine/synth/synthetic_checkpoint.h"

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numbers>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/safetensors.h"
#include "common/sentencepiece_shim.h"
#include "common/status.h"
#include "common/text_data.h"
#include "nlohmann/json.hpp"
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

// Standard normal draws by Box–Muller on a SplitMix64 stream, both values of each pair used.
class Gaussian {
 public:
  explicit Gaussian(uint64_t seed) : rng_(seed) {}

  // Uniform on the open interval (0, 1), so that log() below is finite.
  double Uniform() { return (static_cast<double>(rng_.Next() >> 11) + 0.5) * 0x1p-53; }

  double Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = Uniform();
    const double u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 2.0 * std::numbers::pi * u2;
    spare_ = r * std::sin(theta);
    has_spare_ = true;
    return r * std::cos(theta);
  }

 private:
  SplitMix64 rng_;
  bool has_spare_ = false;
  double spare_ = 0;
};

Tensor LinearWeight(uint64_t seed, const std::string& name, int64_t d_out, int64_t d_in) {
  Gaussian g(StreamSeed(seed, name));
  std::vector<double> row(d_out), col(d_in);
  for (double& r : row) r = std::exp(kRowLogSigma * g.Next());
  for (double& c : col) c = std::exp(kColumnLogSigma * g.Next());
  const double base = kLinearGain / std::sqrt(static_cast<double>(d_in));
  Tensor t = Tensor::Zeros(DType::kF32, {d_out, d_in});
  float* w = t.data<float>();
  for (int64_t i = 0; i < d_out; ++i) {
    for (int64_t j = 0; j < d_in; ++j) {
      w[i * d_in + j] = static_cast<float>(base * row[i] * col[j] * g.Next());
    }
  }
  return t;
}

Tensor NormWeight(uint64_t seed, const std::string& name, int64_t hidden,
                  const std::vector<int>& outliers) {
  Gaussian g(StreamSeed(seed, name));
  Tensor t = Tensor::Zeros(DType::kF32, {hidden});
  float* w = t.data<float>();
  for (int64_t c = 0; c < hidden; ++c) w[c] = static_cast<float>(kNormMean + kNormSigma * g.Next());
  for (int c : outliers) {
    w[c] = static_cast<float>(kOutlierNormMin + (kOutlierNormMax - kOutlierNormMin) * g.Uniform());
  }
  return t;
}

Tensor EmbeddingWeight(uint64_t seed, const std::string& name, int64_t vocab, int64_t hidden) {
  Gaussian g(StreamSeed(seed, name));
  Tensor t = Tensor::Zeros(DType::kF32, {vocab, hidden});
  float* w = t.data<float>();
  for (int64_t v = 0; v < vocab; ++v) {
    const double scale = kEmbedSigma * std::exp(kEmbedRowLogSigma * g.Next());
    for (int64_t c = 0; c < hidden; ++c) w[v * hidden + c] = static_cast<float>(scale * g.Next());
  }
  return t;
}

std::string ConfigJson(const ModelConfig& c) {
  // nlohmann::json keeps keys sorted, so the bytes do not depend on insertion order.
  nlohmann::json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["attention_bias"] = false;
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
  if (name == "tiny") return SynthPreset::kTiny;
  if (name == "small") return SynthPreset::kSmall;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synth preset \"", name, "\" (expected tiny or small)"));
}

const char* SynthPresetName(SynthPreset preset) {
  return preset == SynthPreset::kTiny ? "tiny" : "small";
}

ModelConfig SynthConfig(SynthPreset preset) {
  ModelConfig c;
  c.model_type = "llama";
  c.head_dim = 32;
  c.max_position_embeddings = 2048;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  c.dtype = "float32";
  if (preset == SynthPreset::kTiny) {
    c.hidden_size = 128;
    c.intermediate_size = 384;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.vocab_size = 512;
  } else {
    c.hidden_size = 256;
    c.intermediate_size = 768;
    c.num_layers = 4;
    c.num_heads = 8;
    c.num_kv_heads = 4;
    c.vocab_size = 1024;
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

std::map<std::string, Tensor> SynthesizeWeights(SynthPreset preset, uint64_t seed) {
  const ModelConfig c = SynthConfig(preset);
  const std::vector<int> outliers = SynthOutlierChannels(preset, seed);
  const int64_t d = c.hidden_size, f = c.intermediate_size, v = c.vocab_size;
  std::map<std::string, Tensor> w;
  w["model.embed_tokens.weight"] = EmbeddingWeight(seed, "model.embed_tokens.weight", v, d);
  w["model.norm.weight"] = NormWeight(seed, "model.norm.weight", d, {});
  w["lm_head.weight"] = LinearWeight(seed, "lm_head.weight", v, d);
  for (int b = 0; b < c.num_layers; ++b) {
    for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) {
      const std::string name = absl::StrCat("model.layers.", b, ".", norm, ".weight");
      w[name] = NormWeight(seed, name, d, outliers);
    }
    for (LinearKind k : kAllLinears) {
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
      const std::string name = LinearPrefix(b, k) + ".weight";
      w[name] = LinearWeight(seed, name, d_out, d_in);
    }
  }
  return w;
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
  return absl::OkStatus();
}

absl::StatusOr<SynthResult> WriteSyntheticCheckpoint(const SynthOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
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
  result.config = SynthConfig(options.preset);
  result.outlier_channels = SynthOutlierChannels(options.preset, options.seed);
  const ModelConfig& c = result.config;
  spdlog::info("synth: {} preset (hidden {}, {} layers, vocab {}), seed {}",
               SynthPresetName(options.preset), c.hidden_size, c.num_layers, c.vocab_size,
               options.seed);

  const std::string calib =
      GenerateSyntheticText(StreamSeed(options.seed, "calib.txt"), kSynthCalibBytes);
  const std::string eval =
      GenerateSyntheticText(StreamSeed(options.seed, "eval.txt"), kSynthEvalBytes);
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "calib.txt", calib));
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "eval.txt", eval));

  spdlog::info("synth: training the tokenizer on {} bytes of calib.txt", calib.size());
  QCAL_ASSIGN_OR_RETURN(std::string tokenizer, TrainSynthTokenizer(calib, c.vocab_size));
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "tokenizer.model", tokenizer));

  const std::map<std::string, Tensor> weights = SynthesizeWeights(options.preset, options.seed);
  for (const auto& [name, t] : weights) result.num_parameters += t.numel();
  spdlog::info("synth: {} parameters, outlier channels [{}]", result.num_parameters,
               absl::StrJoin(result.outlier_channels, ", "));
  QCAL_RETURN_IF_ERROR(
      WriteSafetensors((tmp / "model.safetensors").string(), weights, {{"format", "pt"}}));
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "config.json", ConfigJson(c)));
  QCAL_RETURN_IF_ERROR(WriteFile(tmp, "generation_config.json", GenerationConfigJson(c)));

  for (const char* name : {"calib.txt", "config.json", "eval.txt", "generation_config.json",
                           "model.safetensors", "tokenizer.model"}) {
    const fs::path path = tmp / name;
    QCAL_ASSIGN_OR_RETURN(std::string sha, Sha256File(path.string()));
    const uintmax_t bytes = fs::file_size(path, ec);
    if (ec) return absl::DataLossError(absl::StrCat(path.string(), ": ", ec.message()));
    result.files.push_back({name, static_cast<int64_t>(bytes), std::move(sha)});
  }

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
