// Loads any checkpoint qcal can run: plain Hugging Face checkpoints, GPTQ v1 checkpoints (ours or
// anyone's: DESIGN section 5 reading rules) dequantized at load, and qcal fake-quant checkpoints.
#pragma once

#include <memory>
#include <optional>
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
  // qcal extension (quantization_config.qcal.grid): "uniform" (also when absent), "cuberoot" or
  // "balanced". A balanced GPTQ checkpoint stores codes 0..4 as 3-bit codes (bits = 3) and is
  // dequantized like any other; the ABQ kernels give it three weight planes.
  std::string grid = "uniform";
};

// Reads `quantization_config` from config.json, or quantize_config.json when config.json has
// none. Errors: an unsupported quant_method or checkpoint_format (e.g. gptq_v2), bad bits, an
// unknown qcal.grid, or a GPTQ checkpoint with grid "cuberoot", or "balanced" with bits other than
// 3.
absl::StatusOr<CheckpointQuantization> ReadCheckpointQuantization(const std::string& dir);

struct LoadOptions {
  // Activation bits of every block linear's weight branch: 0 = what the checkpoint records
  // (quantization_config.qcal.activation_bits, 16 when absent), else 4..8 or 16 (off). Default: 0.
  int act_bits = 0;
  // kStreaming loads blocks on demand (Model::AcquireBlock), dequantizing each as it is read, and
  // adds the adapter's branches to each block as it loads. Default: kAll.
  BlockResidency residency = BlockResidency::kAll;
  // How quantized linears run. Unset: dequantized at load into dense fp32 weights (the reference,
  // `--kernels dequant`). Set: ABQ inference with this kernel (`--kernels abq`; GPTQ v1
  // checkpoints, export/abq_checkpoint.h): the checkpoint is checked by PlanAbqInference first,
  // then every quantized linear is repacked into bit planes as its block loads and placed with
  // Backend::PrepareAbqLinear, with no dense copy. Default: unset.
  std::optional<kernels::AbqKernel> abq_kernel;
};

// Loads the checkpoint in `dir` (one model.safetensors or shards with an index, ours or another
// tool's) and, when `dir`/adapter/adapter_config.json exists, its PEFT LoRA adapter (DESIGN section
// 5; the low-rank branch of each listed linear, scaled by lora_alpha / r). Errors name the file and
// the tensor or key at fault: a tensor of the adapter that names no linear of the model, a shape
// that does not match, lora_A without lora_B, a non-LORA peft_type.
absl::StatusOr<std::unique_ptr<Model>> LoadCheckpoint(const std::string& dir,
                                                      kernels::Backend* backend,
                                                      const LoadOptions& options = {});

// Reads `adapter_dir` (adapter_config.json, adapter_model.safetensors) and installs the low-rank
// branches into `model`, every block of which must be resident.
absl::Status LoadLoraAdapter(const std::string& adapter_dir, Model& model);

}  // namespace qcal::engine
