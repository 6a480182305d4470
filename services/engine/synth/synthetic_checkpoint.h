// Synthetic checkpoints (`qcal synth`): a Llama-architecture model in Hugging Face layout with
// deterministic random weights, a SentencePiece tokenizer trained on generated text, and the
// generated calibration and evaluation texts. It is the default model of `make demo`, a test model
// that needs nothing outside the project, and (presets 7b, 13b, 70b) a real-sized checkpoint to
// run `qcal quantize` on without downloading one.
//
// The directory written by WriteSyntheticCheckpoint:
//   config.json             model_type llama, bos 1, eos 2, rope_theta 10000, rms_norm_eps 1e-5,
//                           untied lm_head, torch_dtype float32 (tiny, small) or bfloat16 (7b, 13b,
//                           70b)
//   generation_config.json  bos/eos ids
//   model.safetensors       the weights in the preset's dtype, tensors in sorted name order; when
//                           they pass the shard size, HF shards
//                           model-{i:05d}-of-{N:05d}.safetensors with model.safetensors.index.json
//                           instead (ShardedSafetensorsWriter)
//   tokenizer.model         SentencePiece BPE, Llama-style (unk 0, bos 1, eos 2, no pad, byte
//                           fallback, digits split, identity normalization), of
//                           SynthTokenizerVocab(config) pieces
//   calib.txt, eval.txt     generated text (GenerateSyntheticText) from two different streams;
//                           the tokenizer is trained on calib.txt only
// Architectures (SynthArch, `qcal synth --arch`; tiny and small presets only for all but llama):
//   llama    as above (the default; bytes unchanged by the other architectures).
//   llama3   model_type llama, rope_theta 500000, rope_scaling {rope_type llama3, factor 8,
//            low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 64}.
//   qwen2    model_type qwen2: q/k/v biases (0.1·N(0, 1)), tied embeddings (no lm_head tensor),
//            rope_theta 1e6, rope_scaling {type yarn, factor 4, original_max_position_embeddings
//            64} with max_position_embeddings 256 (= factor × original, so transformers versions
//            that derive the factor from the two lengths agree), sliding_window 64 with
//            use_sliding_window false (must be ignored).
//   qwen3    model_type qwen3: head_dim 64 (q_dim = 2 × hidden), per-head q_norm / k_norm weights
//            (norm statistics, no outliers), tied embeddings, rope_theta 1e6.
//   mistral  model_type mistral, sliding_window 16.
// Mixture-of-experts families (docs/MOE.md), on the tiny or small attention shapes, rope_theta 1e6,
// untied lm_head; router and expert weights drawn like any linear:
//   mixtral    model_type mixtral, 4 experts of intermediate_size 256, top 2 (renormalised),
//              sliding_window null.
//   qwen2_moe  model_type qwen2_moe, q/k/v biases (qkv_bias true), 8 experts of
//              moe_intermediate_size 128, top 4, norm_topk_prob false, a shared expert of 256 with
//              its shared_expert_gate.
//   qwen3_moe  model_type qwen3_moe, q/k norms and head_dim 64 as qwen3, 8 experts of 128, top 2,
//              norm_topk_prob true, mlp_only_layers [0]: block 0 has a dense MLP of
//              intermediate_size (the preset's), the others are MoE blocks.
// The small original_max_position_embeddings and windows let a test run past them with short
// sequences. With `tokenizer_dir` (`--tokenizer DIR`), tokenizer.json and tokenizer_config.json
// (and generation_config.json and special_tokens_map.json when present) are copied from DIR instead
// of training a SentencePiece model; the vocabulary is the largest token id of tokenizer.json
// (model.vocab and added_tokens) + 1, rounded up to a multiple of 128, and bos/eos ids follow
// generation_config.json or the tokens named in tokenizer_config.json.
// Every byte is a function of (preset, arch, layers, dtype, seed, shard size, tokenizer files): the
// same options give byte-identical files whatever the number of threads, and nothing written holds
// a path, a time or a host name.
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
// Box–Muller (normal m is the cosine (m even) or sine (m odd) of the pair built from the stream's
// outputs 2·⌊m/2⌋ and 2·⌊m/2⌋ + 1). SplitMix64 is counter-based (output n is a hash of
// seed + (n + 1)·γ), so a tensor is filled in fixed-size pieces on many threads, each piece
// starting at its own position of the stream, with the values a single sequential pass gives.
// Values are computed in double, rounded to fp32 and, for bf16 presets, from fp32 to bf16
// (nearest-even, as PyTorch's `.to(torch.bfloat16)`). The model is untrained: its perplexity is of
// the order of the tokenizer's vocabulary, and finite.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "common/safetensors_writer.h"
#include "common/tensor.h"

namespace qcal::engine {

// Architecture presets. In the small ones every linear's d_in (hidden, q_dim, intermediate) and
// the vocabulary are multiples of 128, every d_out a multiple of 32 (so GPTQ packing needs no
// padding and groups of 128 divide every row); the Llama-2 ones have Llama-2's dimensions (the
// same as `qcal bench --shape`, BenchShapeNamed), vocab 32000, head_dim 128,
// max_position_embeddings 4096, untied lm_head, bf16 weights.
//   kTiny:  hidden 128, intermediate 384, 2 layers, 4 heads, 2 KV heads, head_dim 32, vocab 512,
//           3 outlier channels, fp32 (524,928 parameters).
//   kSmall: hidden 256, intermediate 768, 4 layers, 8 heads, 4 KV heads, head_dim 32, vocab 1024,
//           4 outlier channels, fp32 (3,672,320 parameters).
//   k7b:    hidden 4096, intermediate 11008, 32 layers, 32 heads, 32 KV heads, 4 outlier channels
//           (6,738,415,616 parameters, 13.5 GB).
//   k13b:   hidden 5120, intermediate 13824, 40 layers, 40 heads, 40 KV heads, 4 outlier channels
//           (13,015,864,320 parameters, 26.0 GB).
//   k70b:   hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV heads, 4 outlier channels
//           (68,976,648,192 parameters, 138 GB).
enum class SynthPreset { kTiny, kSmall, k7b, k13b, k70b };
enum class SynthArch { kLlama, kLlama3, kQwen2, kQwen3, kMistral, kMixtral, kQwen2Moe, kQwen3Moe };

// "llama", "llama3", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe" or "qwen3_moe"; the error
// names the value.
absl::StatusOr<SynthArch> ParseSynthArch(const std::string& name);
const char* SynthArchName(SynthArch arch);

// "tiny", "small", "7b", "13b" or "70b"; the error names the value.
absl::StatusOr<SynthPreset> ParseSynthPreset(const std::string& name);
const char* SynthPresetName(SynthPreset preset);

// The model configuration of a preset (max_position_embeddings 2048 for tiny and small, 4096 for
// the Llama-2 presets; dtype "float32" or "bfloat16"). `layers` > 0 replaces num_layers.
// `arch` changes the family's keys (see the header comment).
ModelConfig SynthConfig(SynthPreset preset, int layers = 0, SynthArch arch = SynthArch::kLlama);
// How many hidden channels carry large norm weights in a preset.
int SynthOutlierCount(SynthPreset preset);

// Sizes of the generated texts, in bytes (whole paragraphs, so slightly more).
inline constexpr size_t kSynthCalibBytes = 200 * 1000;
inline constexpr size_t kSynthEvalBytes = 48 * 1000;

// The hidden channels with large norm weights, ascending, drawn from `seed`.
std::vector<int> SynthOutlierChannels(SynthPreset preset, uint64_t seed);

// The model's tensors in the order they are generated and written (sorted by name), with their
// shapes, all in the config's dtype (F32 for "float32", BF16 for "bfloat16").
std::vector<PlannedTensor> SynthTensorPlan(const ModelConfig& config);

// Elements per piece of a tensor's parallel generation.
inline constexpr int64_t kSynthPieceElements = int64_t{1} << 16;

// One tensor of the plan as a host tensor of its planned dtype and shape, with the statistics of
// the header (what the tensor is follows from its name: the embedding, a norm, or a linear; norm
// weights of the blocks take `outliers`). Filled on `threads` threads (0 = the number of cores);
// the bytes do not depend on `threads`.
Tensor SynthesizeTensor(const PlannedTensor& tensor, uint64_t seed,
                        const std::vector<int>& outliers, int threads = 1);

// All weights of the preset's model (`layers` > 0 replaces the block count) as host tensors of the
// preset's dtype by Hugging Face name. Holds the whole model: for tiny and small (tests); the
// checkpoint writer streams the tensors instead.
std::map<std::string, Tensor> SynthesizeWeights(SynthPreset preset, uint64_t seed, int layers = 0,
                                                SynthArch arch = SynthArch::kLlama);

// Pieces of the trained tokenizer: the vocabulary, at most 2048 (the generated calibration text
// holds fewer than 3000 BPE pieces, so a 32000-piece vocabulary cannot be trained on it; token ids
// of the Llama-2 presets stay below 2048, the remaining embedding rows are never looked up).
inline constexpr int kSynthMaxTokenizerVocab = 2048;
int SynthTokenizerVocab(const ModelConfig& config);

// Trains the Llama-style BPE SentencePiece model on the lines of `text` (empty lines skipped),
// single-threaded with no sampling or shuffling, so that the same text gives the same bytes.
// Returns the serialized model (the contents of tokenizer.model). Errors carry SentencePiece's
// message (e.g. a text too small for `vocab_size`).
absl::StatusOr<std::string> TrainSynthTokenizer(const std::string& text, int vocab_size);

// Default shard size: Hugging Face's "5GB" (save_pretrained's default max_shard_size).
inline constexpr int64_t kSynthDefaultShardBytes = 5'000'000'000;

struct SynthOptions {
  // Output directory. Required. Its parent is created when missing.
  std::string out_dir;
  // Architecture. Default: kTiny.
  SynthPreset preset = SynthPreset::kTiny;
  // Model family; other than kLlama needs preset kTiny or kSmall. Default: kLlama.
  SynthArch arch = SynthArch::kLlama;
  // A directory with a real tokenizer.json and tokenizer_config.json to copy in (the vocabulary
  // follows it); empty: train a SentencePiece tokenizer. Default: empty.
  std::string tokenizer_dir;
  // Transformer blocks, replacing the preset's count; >= 1 when set. Default: unset (the preset's).
  std::optional<int> layers;
  // Weight dtype, kF32 or kBF16, replacing the preset's (config.json's torch_dtype follows).
  // Default: unset (the preset's: fp32 for tiny and small, bf16 for the Llama-2 presets).
  std::optional<DType> dtype;
  // Seed of the weights and of both texts. Default: 0.
  uint64_t seed = 0;
  // Largest data section of one safetensors shard, in bytes (ShardedSafetensorsWriter's
  // max_shard_bytes); <= 0 writes one model.safetensors whatever its size. Default: 5e9, so tiny
  // and small are one file, 7b three shards, 13b six, 70b twenty-nine.
  int64_t shard_bytes = kSynthDefaultShardBytes;
  // Threads generating the weights and hashing the files; 0 = the number of cores. The output does
  // not depend on it. Default: 0.
  int threads = 0;
  // Compute each file's sha256 for SynthResult (after writing: rereads every file, in parallel).
  // Off, SynthFile::sha256 is empty. Default: true.
  bool sha256 = true;
  // Replace an existing non-empty out_dir (it is removed, with everything in it). Without it such
  // a directory is an error. An existing empty directory is always replaced. Default: false.
  bool overwrite = false;

  // InvalidArgument naming the field: empty out_dir, layers < 1, a dtype other than F32 or BF16,
  // threads < 0, an arch other than llama with a Llama-2 preset.
  absl::Status Validate() const;
};

struct SynthFile {
  std::string name;  // relative to the output directory
  int64_t bytes = 0;
  std::string sha256;  // lower-case hex; empty without SynthOptions::sha256
};

struct SynthResult {
  ModelConfig config;
  int64_t num_parameters = 0;
  std::vector<int> outlier_channels;
  std::vector<SynthFile> files;  // sorted by name
};

// Writes the checkpoint. The files are written to a fresh temporary directory beside out_dir, which
// replaces out_dir at the end, so a failure never leaves a half-written out_dir. Tensors are
// streamed: each is generated (in parallel) while the previous one is being written, so at most two
// tensors are in memory (the 70b embedding is 0.5 GB in bf16). Errors name the
// path at fault: out_dir is a file, or a non-empty directory without `overwrite`; I/O failures.
// Logs progress to stderr.
absl::StatusOr<SynthResult> WriteSyntheticCheckpoint(const SynthOptions& options);

}  // namespace qcal::engine
