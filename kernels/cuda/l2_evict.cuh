// Launcher of the L2 eviction read used by the ABQ benchmarks (kernels/cuda/cuda_abq.cc): a pass
// that reads a buffer larger than L2 and writes nothing, so that what a timed run needs is out of
// L2 and the lines left there are clean (a memset would leave L2 full of dirty lines, whose
// write-back then competes with the timed run's reads).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace qcal::kernels::cuda {

// Reads bytes (a multiple of 16) at buf (16-byte aligned); writes *sink only when the XOR of
// everything read equals key, so that the reads cannot be elided.
cudaError_t LaunchReadThrough(const void* buf, size_t bytes, uint32_t key, uint32_t* sink,
                              cudaStream_t stream);

// The same contract, shaped as the fastest way this code knows to stream `bytes` once from device
// memory: one launch, every SM full of threads that each issue all their 16-byte loads
// (evict-first) before using any, so that the memory system holds the whole read in flight at
// once. The ABQ benchmark's "read" rows time it over a layer's weight bytes: the floor of any
// one-launch kernel that reads them (kernels/abq_bench.h).
cudaError_t LaunchReadFloor(const void* buf, size_t bytes, uint32_t key, uint32_t* sink,
                            cudaStream_t stream);

}  // namespace qcal::kernels::cuda
