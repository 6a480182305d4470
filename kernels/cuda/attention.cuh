// Launchers of the CUDA causal grouped-query attention kernels (spec: ref::Attention).
//
// Flash-attention style: a block owns a tile of queries of one head and streams the visible keys
// and values through shared memory in tiles, keeping each query's softmax statistics (maximum,
// sum), so memory does not grow with the sequence length.
// - fp32 operands (LaunchAttention): fp32 arithmetic on CUDA cores, one pass with rescaling.
// - bf16 operands (LaunchAttentionBf16): tensor cores. q, k and v are rounded to bf16 first
//   (LaunchPackBf16Heads); one pass over the keys in tiles of 64, the unnormalised
//   probabilities e^(s − m) rounded to bf16 against the running maximum m before they multiply
//   v, l and o rescaled when m moves, out = o / l: exactly where the reference's bf16 path rounds
//   (docs/OPERATIONS.md, "Where bf16 attention rounds").
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// The largest head_dim the kernel is built for (Llama-family models use 64 or 128).
inline constexpr int kAttentionMaxHeadDim = 128;

// Row-major device tensors and shapes as in kernels::AttentionShape: q and out
// [batch*q_len, num_heads*head_dim], k and v [batch*kv_len, num_kv_heads*head_dim]; query i of a
// sequence sits at position p = q_offset + i and attends keys 0 .. p, or with sliding_window W > 0
// keys max(0, p - W + 1) .. p (ref::Attention).
struct AttentionArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  int batch = 0;
  int q_len = 0;
  int kv_len = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int q_offset = 0;
  int sliding_window = 0;  // 0 = none
};

// cudaErrorInvalidValue for shapes the kernel does not handle (head_dim outside
// 1..kAttentionMaxHeadDim, num_heads not a multiple of num_kv_heads, batch or heads over 65535).
cudaError_t LaunchAttention(const AttentionArgs& args, cudaStream_t stream);

// head_dim rounded up to a multiple of 16: the row width of the packed bf16 layout.
int AttentionPaddedDim(int head_dim);

// out [rows, heads, AttentionPaddedDim(head_dim)] = x [rows, heads*head_dim] rounded to bf16
// (to nearest, ties to even), each head's row zero-padded.
cudaError_t LaunchPackBf16Heads(const float* x, int64_t rows, int heads, int head_dim,
                                __nv_bfloat16* out, cudaStream_t stream);
// The same for x rotated first as LaunchRope rotates it (rows of seq_len positions, cos_sin the
// backend's RoPE table): equal to LaunchRope followed by LaunchPackBf16Heads, x unchanged.
cudaError_t LaunchPackBf16HeadsRope(const float* x, int64_t rows, int heads, int head_dim,
                                    int seq_len, const float* cos_sin, __nv_bfloat16* out,
                                    cudaStream_t stream);

// As AttentionArgs, with q, k and v packed by LaunchPackBf16Heads (padded_dim =
// AttentionPaddedDim(head_dim)); out stays fp32 [batch*q_len, num_heads*head_dim].
struct AttentionBf16Args {
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  float* out = nullptr;
  int batch = 0;
  int q_len = 0;
  int kv_len = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int padded_dim = 0;
  int q_offset = 0;
  int sliding_window = 0;  // 0 = none
  // Optional: each query's log2-sum-exp of its scaled scores, log2(e)·(m + ln Σ_j e^(s_j − m)),
  // written [batch, num_heads, q_len] for the backward (AttentionBackwardBf16Args::stats_given);
  // 0 for a query that sees no key. The output does not change.
  float* lse = nullptr;
};

// Errors as LaunchAttention's, and for a padded_dim that does not match head_dim.
cudaError_t LaunchAttentionBf16(const AttentionBf16Args& args, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
