// The plain data of the ABQ backend ops (Backend::PrepareAbqLinear and AbqLinear; DESIGN section 3,
// "Arbitrary-bit inference kernels (ABQ)"): what a GEMM computes (AbqSpec), one linear's packed
// weights (AbqWeights), the kernels that run it, and the kernels' limits. The packed layouts, their
// invariants and the integer reference that specifies every kernel are kernels/cpu/abq_ref.h.
// Kept free of C++20 so that the CUDA sources, compiled as C++17, can include kernels/backend.h.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace qcal::kernels {

// Bits per packed word along K.
inline constexpr int kAbqWordBits = 32;
static_assert(sizeof(uint32_t) * 8 == kAbqWordBits, "a plane word is 32 bits");

// The kernels that run an ABQ linear (kernels/cuda/cuda_abq.h; DESIGN section 3). The two integer
// kernels compute AbqGemm(AbqQuantizeActivations(x), w) bit for bit; the weight-only kernel is
// specified by AbqWeightOnlyReference and ignores AbqSpec::act_bits (its activations stay 16-bit).
// No kernel is ever swapped for another: the caller names it.
enum class AbqKernel {
  kBinaryMma,  // "b1": AND + popcount over the bit planes (the ABQ path)
  kInt8Mma,    // "int8": the same planes unpacked to int8 for the IMMA (the comparison)
  kWeightOnly  // "a16": weights dequantized in registers, bf16 activations (the A16 baseline)
};

// "b1", "int8" or "a16".
const char* AbqKernelName(AbqKernel kernel);
// The kernel named "b1", "int8" or "a16"; InvalidArgument naming the value otherwise.
absl::StatusOr<AbqKernel> ParseAbqKernel(std::string_view name);

// The most k-groups one linear may have on the CUDA kernels (their prologue keeps Σa per group in
// 48 KiB of shared memory): 12,288, e.g. K = 393,216 at group size 32.
inline constexpr int64_t kAbqMaxGroups = 48 * 1024 / 4;
// The most tokens m for which the CUDA b1 kernel (kBinaryMma) runs its decode kernel, where the
// weights' grouping allows it (kernels/cuda/abq_gemm.cuh); larger m run the tiled kernel.
inline constexpr int64_t kAbqDecodeTokens = 16;
// The most tokens m for which kBinaryMma runs its GEMV kernel instead (kernels/cuda/abq_gemv.cu),
// where the grouping and its shared memory allow it.
inline constexpr int64_t kAbqGemvTokens = 4;
// The most tokens m of one call of a CUDA kernel (the token grid: 65,535 tiles of 16).
inline constexpr int64_t kAbqMaxTokens = int64_t{65535} * 16;

// What one ABQ GEMM computes: operand widths and the k-grouping of the weights.
struct AbqSpec {
  // Weight planes: 2, 3, 4 or 8 (3 for the balanced grid). Default: 4.
  int weight_bits = 4;
  // Activation planes: 4 or 8. Default: 8.
  int act_bits = 8;
  // -1 (per output channel) or a multiple of 32. Default: 128.
  int group_size = 128;
};

// Packed weights of one linear [n outputs][k inputs].
struct AbqWeights {
  AbqSpec spec;
  int64_t n = 0, k = 0;
  int64_t words = 0;             // AbqWords(k)
  int64_t n_groups = 0;          // AbqNumGroups(spec, k)
  std::vector<uint32_t> planes;  // [n][weight_bits][words]
  std::vector<float> scales;     // s_w [n_groups][n]
  std::vector<int32_t> zeros;    // z [n_groups][n], each in [0, 2^weight_bits]
};

}  // namespace qcal::kernels
