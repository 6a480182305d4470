// Writes a quantized checkpoint (DESIGN section 5) into a directory:
//   - GPTQ v1 (qweight/qzeros/scales/g_idx per quantized linear) for uniform grids at 2, 3, 4, 8
//     bits, with `quantization_config` in config.json and the same keys in quantize_config.json;
//   - otherwise (cuberoot grid, 5–7 bits) a fake-quant checkpoint: dequantized fp32 weights and
//     `quantization_config.quant_method = "qcal_fake"`.
// Every other tensor keeps its name, dtype and bytes. The tokenizer and the other small files of
// the source directory (generation_config.json, tokenizer_config.json, special_tokens_map.json) are
// copied. All tensors go to one `model.safetensors`, sorted by name.
#pragma once

#include <map>
#include <string>

#include "absl/status/status.h"
#include "common/hf_config.h"
#include "common/tensor.h"
#include "nlohmann/json.hpp"
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

// Writes the checkpoint into `dir` (must exist). `quantized` maps linear names
// ("model.layers.{i}.{module}.{proj}") to their quantized form; every linear of the model must be
// present.
absl::Status WriteQuantizedCheckpoint(const std::string& source_dir, const std::string& dir,
                                      const Recipe& recipe,
                                      const std::map<std::string, QuantizedLinear>& quantized,
                                      const CheckpointExtras& extras = {});

// Writes `adapters` as a PEFT LoRA adapter into `dir` (created): adapter_config.json (r = the most
// common rank, the largest among equally common ones; rank_pattern and alpha_pattern list the
// linears of other ranks; lora_alpha = r so that PEFT's scaling alpha/r is 1) and
// adapter_model.safetensors (fp32; lora_A = L_B, lora_B = L_A).
absl::Status WriteLoraAdapter(const std::string& dir,
                              const std::map<std::string, LowRankAdapter>& adapters);

}  // namespace qcal::engine
