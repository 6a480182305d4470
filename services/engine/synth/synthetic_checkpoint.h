// Synthetic checkpoints (`qcal synth`): a Llama-architecture model in Hugging Face layout with
// deterministic random weights, a SentencePiece tokenizer trained on generated text, and the
// generated calibration and evaluation texts. It is the default model of `make demo` and a test
// model that needs nothing outside the project.
//
// The directory written by WriteSyntheticCheckpoint:
//   config.json             model_type llama, bos 1, eos 2, rope_theta 10000, rms_norm_eps 1e-5,
//                           untied lm_head, torch_dtype float32
//   generation_config.json  bos/eos ids
//   model.safetensors       fp32 weights, tensors in sorted order
//   tokenizer.model         SentencePiece BPE, Llama-style (unk 0, bos 1, eos 2, no pad, byte
//                           fallback, digits split, identity normalization)
//   calib.txt, eval.txt     generated text (GenerateSyntheticText) from two different streams;
//                           the tokenizer is trained on calib.txt only
// Every byte is a function of (preset, seed): the same options give byte-identical files, and
// nothing written holds a path, a time or a host name.
//
// Weight statistics, chosen to resemble trained checkpoints where quantization cares:
//   linear W[i, j] = 0.6/sqrt(d_in) · r_i · c_j · n_ij with n ~ N(0, 1), row scales r = e^(0.3·N)
//     and input-channel scales c = e^(0.2·N) (log-normal spread, like trained q_proj/lm_head rows);
//   RMSNorm weights ~ 0.9 + 0.03·N(0, 1), except a few outlier channels (the same hidden channels
//     in every input_layernorm and post_attention_layernorm) whose weights are 8–20: the inputs of
//     q/k/v and gate/up then carry a few activation-outlier channels, as large trained models do;
//     the final norm has no outliers;
//   embeddings 0.03 · e^(0.2·N) (per row) · N(0, 1); lm_head like a linear with d_in = hidden.
// Each tensor draws from its own SplitMix64 stream seeded by (seed, tensor name), Gaussians by
// Box–Muller. The model is untrained: its perplexity is of the order of the vocabulary size, and
// finite.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "common/tensor.h"

namespace qcal::engine {

// Architecture presets. Every linear's d_in (hidden, q_dim, intermediate) and the vocabulary are
// multiples of 128, every d_out a multiple of 32 (so GPTQ packing needs no padding and groups of
// 128 divide every row).
//   kTiny:  hidden 128, intermediate 384, 2 layers, 4 heads, 2 KV heads, head_dim 32, vocab 512,
//           3 outlier channels (524,928 parameters).
//   kSmall: hidden 256, intermediate 768, 4 layers, 8 heads, 4 KV heads, head_dim 32, vocab 1024,
//           4 outlier channels (3,672,320 parameters).
enum class SynthPreset { kTiny, kSmall };

// "tiny" or "small"; the error names the value.
absl::StatusOr<SynthPreset> ParseSynthPreset(const std::string& name);
const char* SynthPresetName(SynthPreset preset);

// The model configuration of a preset (max_position_embeddings 2048, dtype "float32").
ModelConfig SynthConfig(SynthPreset preset);
// How many hidden channels carry large norm weights in a preset.
int SynthOutlierCount(SynthPreset preset);

// Sizes of the generated texts, in bytes (whole paragraphs, so slightly more).
inline constexpr size_t kSynthCalibBytes = 200 * 1000;
inline constexpr size_t kSynthEvalBytes = 48 * 1000;

// The hidden channels with large norm weights, ascending, drawn from `seed`.
std::vector<int> SynthOutlierChannels(SynthPreset preset, uint64_t seed);

// All weights of the preset's model as host fp32 tensors by Hugging Face name.
std::map<std::string, Tensor> SynthesizeWeights(SynthPreset preset, uint64_t seed);

// Trains the Llama-style BPE SentencePiece model on the lines of `text` (empty lines skipped),
// single-threaded with no sampling or shuffling, so that the same text gives the same bytes.
// Returns the serialized model (the contents of tokenizer.model). Errors carry SentencePiece's
// message (e.g. a text too small for `vocab_size`).
absl::StatusOr<std::string> TrainSynthTokenizer(const std::string& text, int vocab_size);

struct SynthOptions {
  // Output directory. Required. Its parent is created when missing.
  std::string out_dir;
  // Architecture. Default: kTiny.
  SynthPreset preset = SynthPreset::kTiny;
  // Seed of the weights and of both texts. Default: 0.
  uint64_t seed = 0;
  // Replace an existing non-empty out_dir (it is removed, with everything in it). Without it such
  // a directory is an error. An existing empty directory is always replaced. Default: false.
  bool overwrite = false;

  absl::Status Validate() const;
};

struct SynthFile {
  std::string name;  // relative to the output directory
  int64_t bytes = 0;
  std::string sha256;  // lower-case hex
};

struct SynthResult {
  ModelConfig config;
  int64_t num_parameters = 0;
  std::vector<int> outlier_channels;
  std::vector<SynthFile> files;  // sorted by name
};

// Writes the checkpoint. The files are written to a fresh temporary directory beside out_dir, which
// replaces out_dir at the end, so a failure never leaves a half-written out_dir. Errors name the
// path at fault: out_dir is a file, or a non-empty directory without `overwrite`; I/O failures.
// Logs progress to stderr.
absl::StatusOr<SynthResult> WriteSyntheticCheckpoint(const SynthOptions& options);

}  // namespace qcal::engine
