// Writes a quantized checkpoint (DESIGN section 5) into a directory:
//   - GPTQ v1 (qweight/qzeros/scales/g_idx per quantized linear) for uniform grids at 2, 3, 4, 8
//     bits and the balanced 2-bit grid (codes 0..4 stored as 3-bit codes, `bits: 3`, with
//     `quantization_config.qcal.grid: "balanced"`), with `quantization_config` in config.json and
//     the same keys in quantize_config.json;
//   - otherwise (cuberoot grid, 5–7 bits) a fake-quant checkpoint: dequantized fp32 weights and
//     `quantization_config.quant_method = "qcal_fake"`.
// Every other tensor keeps its name, dtype and bytes (except tensors changed by folded smoothing,
// written in their source dtype). The tokenizer and the other small files of the source directory
// (tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
// generation_config.json) are copied when present.
//
// The export streams: the model is written block by block, tensor by tensor, into HF shards
// `model-{i:05d}-of-{N:05d}.safetensors` with `model.safetensors.index.json`, or one
// `model.safetensors` (no index) when everything fits in one shard. Every tensor's name, dtype and
// shape is planned before the first byte is written (from config.json, the source checkpoint's
// tensor list and the recipe), so N is known in advance. Tensor order (the order of the data in
// the shards, and of the shard boundaries; each file's header lists its tensors sorted by name):
//   1. `model.embed_tokens.weight`;
//   2. each block's tensors (names "model.layers.{b}.…"), blocks in order, within a block sorted by
//      name: the quantized linears' GPTQ tensors (or fake-quant `.weight`) and the block's other
//      source tensors (norms, biases);
//   3. every remaining source tensor (model.norm, lm_head, anything else), sorted by name.
// (The data order is the only difference from a file written whole by WriteSafetensors, whose data
// follows name order: the same when name order is block order, i.e. no lm_head, < 10 blocks.)
// At most one block's quantized linears and extras, and one tensor's bytes, are in memory at a
// time; unquantized tensors are copied from the source one at a time. The PEFT adapter (one
// `adapter/adapter_model.safetensors`, as PEFT expects) is streamed the same way, in parallel.
// The output is a deterministic function of the inputs: no paths, times or host names.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "common/tensor.h"
#include "nlohmann/json_fwd.hpp"
#include "services/engine/quant/gptq.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// Whether the recipe's weights can be stored as GPTQ v1.
bool IsGptqExportable(const Recipe& recipe);

// The `quantization_config` object written into config.json for this recipe.
nlohmann::ordered_json QuantizationConfig(const Recipe& recipe);

// A low-rank correction W ≈ Ŵ + a·b of one linear, host fp32: a = L_A [d_out, r], b = L_B
// [r, d_in].
struct LowRankAdapter {
  Tensor a;
  Tensor b;
};

// What a job changes besides the quantized linears.
struct CheckpointExtras {
  // Tensors changed by folded smoothing (norm weights, biases), by checkpoint name: host fp32
  // tensors whose values the source checkpoint's dtype represents exactly; written in that dtype.
  std::map<std::string, Tensor> replaced;
  // Error reconstruction, by linear name: written as the PEFT LoRA adapter in `dir`/adapter
  // (DESIGN section 5) when non-empty.
  std::map<std::string, LowRankAdapter> adapters;
};

// One block's part of the export.
struct BlockExport {
  // The block's quantized linears (an MoE block's experts included), by checkpoint prefix
  // ("model.layers.{b}.{module}.{proj}", LinearPrefix).
  std::map<std::string, QuantizedLinear> quantized;
  // The block's folded tensors (names "model.layers.{b}.…") and low-rank adapters (exactly the
  // block's linears listed in `adapter_ranks`, at those ranks).
  CheckpointExtras extras;
};

// Supplies block `block`'s part. The writer calls it exactly once per block, in block order, and
// drops each result before asking for the next. An error aborts the export with that status.
using BlockExportFn = std::function<absl::StatusOr<BlockExport>(int block)>;

struct ExportOptions {
  // Largest shard, in bytes of tensor data: a new shard starts when adding the next tensor would
  // take the current one past it (a larger tensor gets a shard of its own). Default: 4 GiB.
  int64_t shard_size = 4ll << 30;

  // OK when shard_size >= 1; InvalidArgument naming the field otherwise.
  absl::Status Validate() const;
};

// Parses a byte count for --shard-size: a non-negative decimal number ("123", "1.5") with an
// optional unit, case-insensitive, spaces allowed between: B; KB, MB, GB, TB (powers of 1000);
// KiB, MiB, GiB, TiB (powers of 1024). Fractions are allowed with a unit and rounded down to whole
// bytes. Errors (InvalidArgument, quoting `text`): empty, malformed, unknown unit, a result below
// 1 byte or above 2^63 − 1.
absl::StatusOr<int64_t> ParseByteSize(const std::string& text);

// Streams the checkpoint of the source model in `source_dir` into `dir` (must exist) in the order
// described at the top of this file. `num_blocks` must equal config.json's num_hidden_layers; every
// linear of every block is quantized. `adapter_ranks` maps linear names to the rank of their
// error-reconstruction adapter (empty: no adapter directory). Errors name the tensor, block or
// file at fault: a source checkpoint lacking a block linear's weight; a block whose linears,
// shapes, group counts, folded tensors or adapters differ from the plan; an adapter rank for a name
// that is not a linear of the model. On error, `dir` may hold partial files (callers write into a
// temporary directory).
absl::Status WriteQuantizedCheckpoint(const std::string& source_dir, const std::string& dir,
                                      const Recipe& recipe, int num_blocks,
                                      const BlockExportFn& block,
                                      const std::map<std::string, int64_t>& adapter_ranks,
                                      const ExportOptions& options);

// The same from whole-model maps (held by the caller): `quantized` maps linear names
// ("model.layers.{i}.{module}.{proj}") to their quantized form, and every linear of the model must
// be present; `extras.replaced` may only name block tensors (norms, biases).
absl::Status WriteQuantizedCheckpoint(const std::string& source_dir, const std::string& dir,
                                      const Recipe& recipe,
                                      const std::map<std::string, QuantizedLinear>& quantized,
                                      const CheckpointExtras& extras = {},
                                      const ExportOptions& options = {});

// Writes `adapters` as a PEFT LoRA adapter into `dir` (created): adapter_config.json (r = the most
// common rank, the largest among equally common ones; rank_pattern and alpha_pattern list the
// linears of other ranks; lora_alpha = r so that PEFT's scaling alpha/r is 1) and
// adapter_model.safetensors (fp32; lora_A = L_B, lora_B = L_A).
absl::Status WriteLoraAdapter(const std::string& dir,
                              const std::map<std::string, LowRankAdapter>& adapters);

}  // namespace qcal::engine
