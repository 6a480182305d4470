// The ABQ arbitrary-bit GEMMs (DESIGN.md section 3, "Arbitrary-bit inference kernels") on one
// CUDA device: a linear's packed weights (kernels/cpu/abq_ref.h, AbqWeights) uploaded once, and
// whole-layer forwards through one of three kernels (abq_gemm.cuh):
//   kBinaryMma  the ABQ path: the activation prologue, then b1 AND + popcount mma.sync over the
//               bit planes and the fp64 epilogue (one fp32 rounding);
//   kInt8Mma    the comparison: the same prologue and planes, unpacked in registers to u8/s8 for
//               the int8 mma.sync (IMMA), the same epilogue;
//   kWeightOnly the A16 baseline (W4A16, W2*A16): weights dequantized to bf16 in registers, x
//               rounded to bf16, bf16 mma.sync with fp32 accumulation.
// The two integer kernels equal the CPU reference bit for bit: their integer sums are
// AbqIntegerGemm's and their outputs AbqGemm(AbqQuantizeActivations(x), w)'s. The weight-only
// kernel is within AbqWeightOnlyErrorBound of AbqWeightOnlyReference. No kernel is ever swapped
// for another: the caller names it.
//
// Only kernels/cuda includes CUDA headers; this header does not (a cudaStream_t is a CUstream_st*,
// declared below). An instance runs on its own stream with its own memory pool, or on a stream and
// pool its creator lends it (the CUDA backend's, so that a model's forward runs the layer on the
// backend's tensors in the backend's stream order: ForwardDevice). It is not thread-safe (one
// thread drives an instance). Also the timing of the layer and of cuBLAS's GEMMs, for qcal bench
// --abq (kernels/abq_bench.h).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/abq_bench.h"
#include "kernels/cpu/abq_ref.h"

struct CUstream_st;

namespace qcal::kernels {
namespace cuda {
class CachingAllocator;  // kernels/cuda/cuda_resources.h
}  // namespace cuda

class CudaAbqLinear {
 public:
  // Uploads `w` (ValidateAbqWeights: its spec, shape, tensor sizes, at most kAbqMaxGroups k-groups)
  // to CUDA device `device`. Errors: no such device, out of device memory (kResourceExhausted),
  // invalid weights.
  static absl::StatusOr<std::unique_ptr<CudaAbqLinear>> Create(const AbqWeights& w, int device);
  // The same on a stream and pool of device `device` that the caller owns (the CUDA backend's):
  // the weights come from `pool` (uploaded on `stream`, complete on return) and every later call
  // runs on `stream`, after the work already queued there. The stream must outlive the instance;
  // the instance keeps the pool alive, and its memory goes back to the pool in the stream's order.
  static absl::StatusOr<std::unique_ptr<CudaAbqLinear>> Create(
      const AbqWeights& w, int device, CUstream_st* stream,
      std::shared_ptr<cuda::CachingAllocator> pool);
  ~CudaAbqLinear();
  CudaAbqLinear(const CudaAbqLinear&) = delete;
  CudaAbqLinear& operator=(const CudaAbqLinear&) = delete;

  const AbqSpec& spec() const;
  int64_t n() const;
  int64_t k() const;

  // The device entry point: y [m][n] = the layer through `kernel` for x [m][k] (1 <= m <=
  // kAbqMaxTokens), both fp32 device pointers on this linear's device, queued on the instance's
  // stream with no host round trip and no synchronization (the same launches as Forward, whose
  // results it equals bit for bit). Scratch (activation planes, s_a, Σa) comes from the pool.
  // Errors: invalid m, out of device memory, a failed launch.
  absl::Status ForwardDevice(const float* x, int64_t m, AbqKernel kernel, float* y);

  // The prologue alone: x [m][k] quantized and packed on the device, downloaded. Equals
  // AbqQuantizeActivations(x, m, k, spec()) bit for bit.
  absl::StatusOr<AbqActivations> QuantizeActivations(std::span<const float> x, int64_t m);

  // y [m][n] for x [m][k] (1 <= m <= 1,048,560) through the whole layer with `kernel`; for the
  // integer kernels `dot`, when not null, receives the integer sums [m][n][n_groups]
  // (InvalidArgument for kWeightOnly, which has none).
  absl::StatusOr<std::vector<float>> Forward(std::span<const float> x, int64_t m, AbqKernel kernel,
                                             std::vector<int32_t>* dot = nullptr);

  // The integer GEMM and epilogue alone on given packed activations (e.g. the CPU prologue's):
  // y [a.m][n], and the integer sums in `dot` when not null. kWeightOnly is refused.
  absl::StatusOr<std::vector<float>> Gemm(const AbqActivations& a, AbqKernel kernel,
                                          std::vector<int32_t>* dot = nullptr);

  // Which kernel kBinaryMma runs from now on: kDispatch (the default) the GEMV kernel for m <= 4,
  // the decode kernel for m <= 16 and the tiled kernel otherwise (each where its group sizes and
  // shared memory allow, abq_gemm.cuh); kDecode the decode kernel wherever it applies, else the
  // tiled one; kTiled the tiled kernel at every m; kFused the one-launch layer (prologue and GEMV
  // fused, abq_gemv_fused.cu) for a whole-layer call from x where FusedApplies, else kDispatch's
  // kernels. All are bit-identical; the choice exists for qcal bench --abq's comparisons and for
  // the tests.
  // Choosing kFused first makes the weights' one-word scales and zero points where it can
  // (HasCompactMeta): errors are a failed transfer or out of device memory.
  // kDp4a is not b1: the one-token layer on the CUDA cores (abq_dp4a.cu: the codes as 2-bit
  // digits, dp4a against the int8 activation codes, which a small kernel launched just before
  // makes) where Dp4aApplies, else kDispatch's kernels; the same bits. Choosing it makes its digit
  // layout, its activation scratch (and the one-word scales where it can).
  enum class B1Kernel { kDispatch, kDecode, kTiled, kFused, kDp4a };
  absl::Status set_b1_kernel(B1Kernel b1);

  // Whether the fused one-launch kernel takes a whole-layer call of m tokens (m = 1, K a multiple
  // of 128, k-groups of whole 128-column steps or per channel, and shared memory that fits).
  bool FusedApplies(int64_t m) const;
  // Whether the dp4a kernel takes a whole-layer call of m tokens (after set_b1_kernel(kDp4a):
  // m = 1, K a multiple of 64, per channel or k-groups of 64·2^i columns up to 2048, shared
  // memory that fits).
  bool Dp4aApplies(int64_t m) const;
  // Whether the fused kernel reads s_w and z as one 4-byte word a (k-group, output) instead of 8
  // bytes: after set_b1_kernel(kFused), where every scale is an fp16 value.
  bool HasCompactMeta() const;

  // Mean seconds of one whole-layer forward of m tokens on device-resident inputs (uniform in
  // [-1, 1]), launches included (the prologue's too), over `iters` runs after 3 warm-up runs.
  // kAlone: each run is timed alone with CUDA events, after a read of twice the L2 cache's size
  // has evicted the weights (a decode step reads every layer's weights from memory; a layer's
  // quantized weights would otherwise stay in the 50 MB L2 from run to run) and a read of x has
  // brought it back (the op before a layer has just written it). kSequence: a run is one CUDA
  // graph of many calls back to back, cycling through device copies of the weights that together
  // pass twice the L2 size, after the same eviction and read of x; the result is per call.
  // The parts of one: with `part` kPrologue the activation prologue alone, with kGemm the integer
  // GEMM alone on activations the prologue produced once before the timing (kWeightOnly and the
  // fused kernel have neither: InvalidArgument).
  enum class Part { kWhole, kPrologue, kGemm };
  absl::StatusOr<double> TimeForward(int64_t m, AbqKernel kernel, int iters,
                                     Part part = Part::kWhole,
                                     AbqTiming timing = AbqTiming::kAlone);

 private:
  struct State;
  explicit CudaAbqLinear(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

// Mean seconds of a near-empty kernel on `device` (the eviction read's launch over 16 bytes: its
// blocks start and find nothing to read), timed as TimeForward: the floor that every timed run of
// this harness includes (launch and event overheads); with kSequence, per call of a graph of
// them (the gap a launch costs between back-to-back kernels).
absl::StatusOr<double> TimeNullLaunch(int device, int iters, AbqTiming timing = AbqTiming::kAlone);

// Mean seconds of one launch that only streams `bytes` (rounded up to 16) from device memory
// (LaunchReadFloor), timed as TimeForward; with kSequence the calls cycle through copies, as the
// layers' weights do. The floor of any one-launch kernel that reads that many bytes.
absl::StatusOr<double> TimeReadFloor(double bytes, int device, int iters,
                                     AbqTiming timing = AbqTiming::kAlone);

// Mean seconds of cuBLAS's GEMM y = x·Wᵀ for x [m][k], W [n][k] on `device`, timed as
// TimeForward (each run alone, after the L2 eviction): bf16 operands and output with fp32
// accumulation (int8 false), or int8 operands with int32 output (int8 true: the W8A8 integer GEMM
// without its scales). Operands are zero-filled (timing only). With kSequence the calls cycle
// through copies of W, as TimeForward's.
absl::StatusOr<double> TimeCublasGemm(bool int8, int64_t m, int64_t n, int64_t k, int device,
                                      int iters, AbqTiming timing = AbqTiming::kAlone);

}  // namespace qcal::kernels
