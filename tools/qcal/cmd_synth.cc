// qcal synth: writes a synthetic checkpoint (services/engine/synth); this file maps flags onto
// SynthOptions and prints the result.
#include <cstdio>
#include <memory>
#include <string>

#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct SynthArgs {
  std::string out;
  std::string preset = "tiny";
  std::string arch = "llama";
  std::string tokenizer;
  int layers = 0;
  CLI::Option* layers_flag = nullptr;  // set: --layers was given
  std::string dtype;                   // empty: the preset's
  uint64_t seed = 0;
  int64_t shard_size = engine::kSynthDefaultShardBytes;
  int threads = 0;
  bool no_sha256 = false;
  bool overwrite = false;
  bool json = false;
};

absl::Status RunSynth(const SynthArgs& a) {
  engine::SynthOptions options;
  options.out_dir = a.out;
  QCAL_ASSIGN_OR_RETURN(options.preset, engine::ParseSynthPreset(a.preset));
  QCAL_ASSIGN_OR_RETURN(options.arch, engine::ParseSynthArch(a.arch));
  options.tokenizer_dir = a.tokenizer;
  if (a.layers_flag->count() > 0) options.layers = a.layers;
  if (a.dtype == "f32") options.dtype = DType::kF32;
  if (a.dtype == "bf16") options.dtype = DType::kBF16;
  options.seed = a.seed;
  options.shard_bytes = a.shard_size;
  options.threads = a.threads;
  options.sha256 = !a.no_sha256;
  options.overwrite = a.overwrite;
  QCAL_ASSIGN_OR_RETURN(engine::SynthResult r, engine::WriteSyntheticCheckpoint(options));
  if (a.json) {
    nlohmann::ordered_json j;
    j["out"] = a.out;
    j["preset"] = a.preset;
    j["arch"] = a.arch;
    j["model_type"] = r.config.model_type;
    j["vocab_size"] = r.config.vocab_size;
    j["seed"] = a.seed;
    j["layers"] = r.config.num_layers;
    j["dtype"] = r.config.dtype;
    j["parameters"] = r.num_parameters;
    j["outlier_channels"] = r.outlier_channels;
    nlohmann::ordered_json files = nlohmann::ordered_json::object();
    for (const engine::SynthFile& f : r.files) {
      nlohmann::ordered_json entry = {{"bytes", f.bytes}};
      if (!f.sha256.empty()) entry["sha256"] = f.sha256;
      files[f.name] = entry;
    }
    j["files"] = files;
    std::printf("%s\n", j.dump().c_str());
  }
  return absl::OkStatus();
}

}  // namespace

RunFn AddSynth(CLI::App& app) {
  auto a = std::make_shared<SynthArgs>();
  app.add_option("--out", a->out, "Output directory (Hugging Face layout)")->required();
  app.add_option("--preset", a->preset,
                 "Architecture: tiny (default) or small (fp32), or the Llama-2 shapes 7b, 13b, "
                 "70b (bf16, sharded)");
  app.add_option(
         "--arch", a->arch,
         "Model family: llama (default), llama3 (llama3 rope scaling), qwen2 (q/k/v biases, "
         "tied embeddings, yarn rope), qwen3 (q/k norms, head_dim 64), mistral (sliding "
         "window 16), and the mixture-of-experts families mixtral (4 experts, top 2), "
         "qwen2_moe (8 experts, top 4, a shared expert) and qwen3_moe (8 experts, top 2, block 0 "
         "dense); all but llama need preset tiny or small")
      ->check(CLI::IsMember(
          {"llama", "llama3", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe"}));
  app.add_option("--tokenizer", a->tokenizer,
                 "Directory with a real tokenizer.json and tokenizer_config.json (and optionally "
                 "generation_config.json) to copy in; the vocabulary follows tokenizer.json "
                 "(default: train a SentencePiece tokenizer on calib.txt)");
  a->layers_flag =
      app.add_option("--layers", a->layers, "Transformer blocks, replacing the preset's count")
          ->check(CLI::PositiveNumber);
  app.add_option("--dtype", a->dtype,
                 "Weight dtype, f32 or bf16 (default: f32 for tiny and small, bf16 for the Llama-2 "
                 "presets)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--seed", a->seed, "Seed of the weights and the generated texts (default 0)")
      ->check(NonNegativeInteger());
  app.add_option("--shard-size", a->shard_size,
                 "Largest safetensors shard, in bytes (default 5000000000); 0 writes one "
                 "model.safetensors")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", a->threads, "Threads generating the weights (default: cores)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--no-sha256", a->no_sha256,
               "Skip hashing the written files (--json then lists sizes only); hashing rereads "
               "every file, which for 70b is 138 GB");
  app.add_flag("--overwrite", a->overwrite, "Replace an existing non-empty output directory");
  app.add_flag(
      "--json", a->json,
      "Print one JSON object: out, preset, seed, layers, dtype, parameters, outlier_channels, "
      "files");
  return [a] { return RunSynth(*a); };
}

}  // namespace qcal::cli
