// Loads any checkpoint qcal can run: plain Hugging Face checkpoints, GPTQ v1 checkpoints (ours or
// anyone's: DESIGN section 5 reading rules) dequantized at load, and qcal fake-quant checkpoints.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "services/engine/model.h"

namespace qcal::engine {

// What a checkpoint declares about its quantization.
struct CheckpointQuantization {
  std::string quant_method;  // "" (none), "gptq" or "qcal_fake"
  int bits = 16;
  int group_size = -1;
  int activation_bits = 16;  // qcal extension; 16 = off
};

// Reads `quantization_config` from config.json, or quantize_config.json when config.json has
// none. Errors: an unsupported quant_method or checkpoint_format (e.g. gptq_v2), bad bits.
absl::StatusOr<CheckpointQuantization> ReadCheckpointQuantization(const std::string& dir);

absl::StatusOr<std::unique_ptr<Model>> LoadCheckpoint(const std::string& dir,
                                                      kernels::Backend* backend);

}  // namespace qcal::engine
