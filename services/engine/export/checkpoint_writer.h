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
#include "nlohmann/json.hpp"
#include "services/engine/quant/gptq.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// Whether the recipe's weights can be stored as GPTQ v1.
bool IsGptqExportable(const Recipe& recipe);

// The `quantization_config` object written into config.json for this recipe.
nlohmann::ordered_json QuantizationConfig(const Recipe& recipe);

// Writes the checkpoint into `dir` (must exist). `quantized` maps linear names
// ("model.layers.{i}.{module}.{proj}") to their quantized form; every linear of the model must be
// present.
absl::Status WriteQuantizedCheckpoint(const std::string& source_dir, const std::string& dir,
                                      const Recipe& recipe,
                                      const std::map<std::string, QuantizedLinear>& quantized);

}  // namespace qcal::engine
