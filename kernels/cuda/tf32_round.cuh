// Rounding an fp32 value to TF32 (10 stored significand bits) on the device, to nearest with ties
// away from zero (cvt.rna): what the TF32 products here are fed (OutputError's E, the split
// operands of GemmSplitTf32), so that the tensor cores' own conversion changes nothing.
#pragma once

#include <cstdint>

namespace qcal::kernels::cuda {

__device__ __forceinline__ float RoundToTf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return __uint_as_float(bits);
}

}  // namespace qcal::kernels::cuda
