// Counter-based random numbers that host and device code compute identically: element i of a
// stream is a hash of (seed, i), so any element can be drawn independently, in any order, by any
// thread, and a tensor filled on the GPU equals the same tensor filled on the CPU bit for bit.
// Used for synthetic weights generated in place (qcal bench) and for tests.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QCAL_HASH_HOST_DEVICE __host__ __device__
#else
#define QCAL_HASH_HOST_DEVICE
#endif

namespace qcal::kernels {

// The SplitMix64 output for state seed + (i + 1) * golden ratio: element i of the SplitMix64
// stream seeded with `seed` (common/text_data.h's SplitMix64 draws the same sequence).
QCAL_HASH_HOST_DEVICE inline uint64_t HashBits(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// lo + (hi - lo) * u with u = the top 24 bits of HashBits / 2^24, in [0, 1): a value in [lo, hi).
// The multiply and the add are rounded separately (no fused multiply-add) on every compiler.
QCAL_HASH_HOST_DEVICE inline float HashUniform(uint64_t seed, uint64_t i, float lo, float hi) {
  const float u = static_cast<float>(HashBits(seed, i) >> 40) * (1.0f / 16777216.0f);
#if defined(__CUDA_ARCH__)
  return __fadd_rn(lo, __fmul_rn(hi - lo, u));
#else
  const volatile float scaled = (hi - lo) * u;  // volatile: keeps the product rounded on its own
  return lo + scaled;
#endif
}

}  // namespace qcal::kernels
