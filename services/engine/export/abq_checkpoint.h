// ABQ inference from GPTQ v1 checkpoints (`qcal eval|generate --kernels abq`; DESIGN section 3,
// "Arbitrary-bit inference kernels (ABQ)", and section 5): what runs which linear, decided and
// checked on the host before anything is placed on a device, and each quantized linear's GPTQ
// tensors repacked into the kernels' bit planes (kernels::PackGptqV1ToAbq) as its block loads.
//
// Refused, each with an error naming the file or the linear and the reason (there is never a
// fallback to the dequantizing path):
//   - a checkpoint that is not GPTQ v1: unquantized, or qcal_fake (cuberoot grid, 5..7 bits);
//   - activation bits the kernel does not run: b1 and int8 quantize activations to 4 or 8 bits (an
//     A16 checkpoint needs --abq-kernel a16 or --act-bits 4|8; 5..7 bits have no kernel), a16
//     keeps them 16-bit (a checkpoint with activation bits needs b1 or int8, or --act-bits 16);
//   - a group size other than -1 or a multiple of 32 (a k-group is whole 32-bit plane words);
//   - a linear whose tensors lack the dtypes and shapes that config.json and the group size give;
//     whose g_idx is not k / group_size: act-order checkpoints are refused, not permuted (the ABQ
//     layout's k-groups are consecutive columns, and the prologue does not permute activation
//     columns); whose k-groups could overflow the kernels' int32 sums (kernels::ValidateAbqShape:
//     e.g. per-channel W8A8 takes d_in up to 33,090); or that has more than kAbqMaxGroups groups.
// The weight bits of GPTQ v1 (2, 3, 4, 8; 3 for the balanced grid) and any d_out, and any d_in
// (padded to whole words), are runnable. Linears the checkpoint keeps unquantized (`.weight`,
// no `.qweight`) run the dense GEMM, as on the dequantizing path; the plan lists them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/safetensors.h"
#include "kernels/cpu/abq_ref.h"

namespace qcal::engine {

struct AbqInferenceOptions {
  // The kernel every quantized linear runs through. Default: b1.
  kernels::AbqKernel kernel = kernels::AbqKernel::kBinaryMma;
  // Activation bits: 0 = the checkpoint's (quantization_config.qcal.activation_bits, 16 when
  // absent), else 4..8 or 16 (--act-bits). Default: 0.
  int act_bits = 0;
};

struct AbqInferencePlan {
  // What the kernels compute: weight planes (the checkpoint's bits: 3 for the balanced grid),
  // activation bits (for a16, which quantizes none, 8: AbqSpec needs a valid value) and the group
  // size (-1 per output channel).
  kernels::AbqSpec spec;
  kernels::AbqKernel kernel = kernels::AbqKernel::kBinaryMma;
  // The activation bits the kernel runs: 4 or 8 (b1, int8) or 16 (a16).
  int act_bits = 16;
  // Linears (prefixes "model.layers.{b}.{module}.{proj}") that the checkpoint keeps unquantized.
  std::vector<std::string> dense_linears;
};

// Checks the checkpoint in `dir` (config.json, its quantization config, and every block linear's
// tensor headers and g_idx) against the refusals above, reading no weight data. Errors
// (InvalidArgument) name the file or linear and the reason.
absl::StatusOr<AbqInferencePlan> PlanAbqInference(const std::string& dir,
                                                  const AbqInferenceOptions& options);

// The packed weights of the linear `prefix` [d_out, d_in] on `spec`'s planes and groups (its
// qweight, qzeros, fp16 scales as fp32 and g_idx through kernels::PackGptqV1ToAbq), or nullopt
// when the checkpoint keeps it unquantized. Errors name the linear.
absl::StatusOr<std::optional<kernels::AbqWeights>> ReadAbqLinear(const CheckpointReader& reader,
                                                                 const std::string& prefix,
                                                                 int64_t d_out, int64_t d_in,
                                                                 const kernels::AbqSpec& spec);

}  // namespace qcal::engine
