// Launchers of the ABQ arbitrary-bit GEMM kernels (spec: kernels/cpu/abq_ref.h, whose packed
// layouts they read and write unchanged; the adapter is cuda_abq.cc). Each returns the launch's
// cudaError_t, runs on `stream` asynchronously and knows nothing of tensors or absl.
//
//   LaunchAbqPrologue     per-token quantization of x, packed into activation planes with s_a and
//                         Σa per k-group (AbqQuantizeActivations bit for bit);
//   LaunchAbqGemm         the integer GEMM and the fp64 epilogue (AbqIntegerGemm + AbqEpilogue bit
//                         for bit), by one of two kernels over the same planes:
//                           kBinary  b1 AND + popcount mma.sync (m16n8k256, m16n8k128): the
//                                    GEMV kernel for m <= 4 (abq_gemv.cu), the decode kernel
//                                    for m <= 16, the tiled kernel otherwise;
//                           kInt8    planes unpacked in registers to u8 weight codes and s8
//                                    activation codes, mma.sync m16n8k32 (IMMA);
//   LaunchAbqWeightOnly   the A16 baseline: weight codes dequantized in registers to bf16 (q − z),
//                         x rounded to bf16, bf16 mma.sync with fp32 accumulation per k-group and
//                         s_w applied per group in fp32 (spec: AbqWeightOnlyReference).
// The b1 GEMV kernel (m <= 4, k-groups of whole k128 steps or per channel, abq_gemv.cu): a block
// of 4 warps owns 8 outputs over all of K, the warps split K and bulk-copy their plane rows into
// shared memory (before griddepcontrol.wait); each k-group's integer sum goes to shared memory
// and one thread per (output, token) runs the epilogue in group order.
// The b1 decode kernel (m <= 16, k-groups of whole k128 steps: group size a multiple of 128 or
// per channel): a block of 4 warps streams 4 tiles of 16 weight rows over all of K through a
// multi-stage cp.async ring in shared memory (the weights' copies start before the prologue is
// done); each warp reduces its k-steps' counts in registers and runs the fp64 epilogue per k-group
// in order as the groups end (abq_decode.cu). Where it does not apply (other groups,
// shared memory beyond its bound) kBinary runs the tiled kernel below.
// Tiled kernels: a block of 16 warps owns 16 weight rows (b1: 16/wb outputs × wb planes; int8 and
// A16: 16 outputs) and up to 16 tokens over all of K; grid.x walks the outputs, grid.y the tokens
// in tiles of 16 (decode m <= 16 is one tile, prefill loops over tiles). The warps split K into
// (k-group, part) units whose sums meet in shared memory; one thread per (output, token) then
// runs the epilogue over the groups in order. Every output is written by exactly one thread,
// with no atomics: results are bit-identical run to run. The tiled kernels serve every m; both b1
// kernels are compiled for 1, 4 and all n8 tiles of activation planes and launched with the fewest
// that hold the tokens (m = 1: one tile). The integer GEMMs are
// launched with programmatic stream serialization (PDL), so that a GEMM after LaunchAbqPrologue on
// the same stream starts (and fetches its first weights) while the prologue runs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// Packed weights on the device ([n][wb][words] planes, s_w and z [n_groups][n]). `meta`, when
// not null, holds the same s_w and z as one word each, [n_groups][n]: z << 16 | the fp16 bits of
// s_w, for weights whose every scale is an fp16 value (a GPTQ checkpoint's, and every scale
// qcal's quantizer makes, are); the fused GEMV reads it instead of scales and zeros (half the
// bytes).
struct AbqDeviceWeights {
  const uint32_t* planes = nullptr;
  const float* scales = nullptr;
  const int32_t* zeros = nullptr;
  const uint32_t* meta = nullptr;
  // For the dp4a kernel (abq_dp4a.cu), made when it is chosen: the codes in its unit layout
  // (2, 4 or 8 bits a code; units of 128 columns, a lane's in 16-byte pieces;
  // LaunchAbqRepackDigits), and `meta`'s words row-major, [n][n_groups] (null where the scales are
  // not all fp16 values).
  const uint32_t* digits = nullptr;
  const uint32_t* meta_rows = nullptr;
  int64_t n = 0;
  int64_t k = 0;
  int words = 0;        // ceil(k / 32)
  int group_words = 0;  // words per k-group (words when there is one group)
  int n_groups = 0;
  int weight_bits = 0;  // 2, 3, 4 or 8
};

// Packed activations on the device ([m][ab][words] planes, s_a [m], Σa [m][n_groups]).
struct AbqDeviceActivations {
  uint32_t* planes = nullptr;
  float* scales = nullptr;
  int32_t* sums = nullptr;
  int64_t m = 0;
  int act_bits = 0;  // 4 or 8
};

// kBinaryTiled is kBinary's tiled kernel at every m (what kBinary runs for m > 16), and
// kBinaryRing its decode kernel wherever that applies (m <= 16, the tiled kernel elsewhere): the
// GEMV and decode kernels' comparisons in qcal bench --abq.
enum class AbqMma { kBinary, kInt8, kBinaryTiled, kBinaryRing };

// Quantizes x [a.m][w.k] per token into `a` (planes, scales, sums for w's k-grouping). Needs
// w.n_groups * 4 bytes of shared memory (at most 48 KiB); cudaErrorInvalidValue otherwise or for
// act_bits other than 4 and 8.
cudaError_t LaunchAbqPrologue(const float* x, const AbqDeviceWeights& w,
                              const AbqDeviceActivations& a, cudaStream_t stream);

// y [a.m][w.n] (fp32) from packed activations and weights; dot [a.m][w.n][w.n_groups] receives
// the integer sums when not null. cudaErrorInvalidValue for unsupported bit widths.
cudaError_t LaunchAbqGemm(AbqMma mma, const AbqDeviceWeights& w, const AbqDeviceActivations& a,
                          float* y, int32_t* dot, cudaStream_t stream);

// Whether LaunchAbqFusedGemv takes m tokens of `w` with ab-bit activations: m = 1, ab 4 or 8,
// K a multiple of 128, k-groups of whole k128 steps (or one group), 16-byte aligned weight
// arrays, and a per-block shared memory layout of which a cluster fits on the current device.
bool AbqFusedGemvApplies(const AbqDeviceWeights& w, int64_t m, int ab);

// The whole b1 layer of one token in one launch (abq_gemv_fused.cu): y [w.n] from x [w.k] (fp32,
// 16-byte aligned), meant to equal LaunchAbqPrologue followed by LaunchAbqGemm(kBinary) bit for
// bit (cuda_abq_test's FusedKernelEqualsReference checks it; not yet run on a GPU at 2026-12-05);
// dot [w.n][w.n_groups] receives the integer sums when not null. x and y must not overlap (some
// blocks write y while others still read x). A cluster launch (8 blocks) with programmatic stream
// serialization: it reads the weights before griddepcontrol.wait, so the kernel before it on the
// stream must not write them (it may write x). cudaErrorInvalidValue where AbqFusedGemvApplies is
// false or x is not 16-byte aligned.
cudaError_t LaunchAbqFusedGemv(const float* x, const AbqDeviceWeights& w, int ab, float* y,
                               int32_t* dot, cudaStream_t stream);

// uint32 words of `w`'s unit layout (AbqDeviceWeights::digits): n·ceil(ceil(k / 128) / 32)·sb·128,
// sb = 2, 4 or 8 bits a code (W2; W3, the balanced grid and W4; W8).
int64_t AbqDigitWords(const AbqDeviceWeights& w);

// Writes `w`'s codes from its planes into `digits` (AbqDigitWords(w) words) in the dp4a
// kernel's unit layout. cudaErrorInvalidValue for K not a multiple of 64 or unsupported widths.
cudaError_t LaunchAbqRepackDigits(const AbqDeviceWeights& w, uint32_t* digits, cudaStream_t stream);

// Whether LaunchAbqDp4aGemv takes m tokens of `w` with ab-bit activations: m = 1, ab 4 or 8,
// weight bits 2, 3, 4 or 8, K a multiple of 64, one k-group or groups of 64·2^i columns up to
// 2048, and shared memory (the codes of K rounded up to 128 columns, Σa, the warps' k-group
// products) within 200 KiB.
bool AbqDp4aGemvApplies(const AbqDeviceWeights& w, int64_t m, int ab);

// Bytes of the scratch LaunchAbqDp4aGemv needs for `w` (the token's codes, Σa per k-group, s_a).
int64_t AbqDp4aScratchBytes(const AbqDeviceWeights& w);

// The whole layer of one token on the CUDA cores (abq_dp4a.cu): where K <= 4096 at weight bits
// 2 to 4 one launch, the GEMV coding the token itself; otherwise two, the activation codes into
// `scratch` (AbqDp4aScratchBytes(w) bytes, 16-byte aligned, on this stream's device; reused by
// every call on the stream), then the GEMV. y [w.n] from x [w.k] (fp32, 16-byte aligned), equal
// to LaunchAbqPrologue followed by LaunchAbqGemm bit for bit; dot [w.n][w.n_groups] receives the
// integer sums when not null. Reads w.digits (and w.meta_rows where not null, else w.scales and
// w.zeros). Programmatic stream serialization for every launch: the GEMV reads the weights before
// griddepcontrol.wait and may start while the kernels before it (or before the activation kernel)
// still run, so those must not write the weights (they may write x). x and y must not overlap.
// cudaErrorInvalidValue where AbqDp4aGemvApplies is false, w.digits or scratch is null, or x or
// scratch is not 16-byte aligned.
cudaError_t LaunchAbqDp4aGemv(const float* x, const AbqDeviceWeights& w, int ab, float* y,
                              int32_t* dot, void* scratch, cudaStream_t stream);

// y [m][w.n] = the weight-only GEMM of x [m][w.k] (fp32, rounded to bf16 in the kernel).
cudaError_t LaunchAbqWeightOnly(const float* x, int64_t m, const AbqDeviceWeights& w, float* y,
                                cudaStream_t stream);

}  // namespace qcal::kernels::cuda
