// Launcher of the CUDA causal grouped-query attention kernel (spec: ref::Attention).
//
// Flash-attention style: each block owns a tile of 64 queries of one head and streams the visible
// keys and values through shared memory in tiles of 64, keeping a running softmax (maximum, sum)
// per query, so memory does not grow with the sequence length. Arithmetic is fp32 on CUDA cores.
// With bf16 operands, q, k and v are rounded to bf16 as they are loaded and the normalised
// probabilities are rounded to bf16 before they multiply v, exactly where the reference rounds;
// normalised probabilities need the final softmax sum, so that variant makes two passes over the
// keys (statistics, then output).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// The largest head_dim the kernel is built for (Llama-family models use 64 or 128).
inline constexpr int kAttentionMaxHeadDim = 128;

// Row-major device tensors and shapes as in kernels::AttentionShape: q and out
// [batch*q_len, num_heads*head_dim], k and v [batch*kv_len, num_kv_heads*head_dim]; query i of a
// sequence sits at position q_offset + i and attends keys 0 .. q_offset + i.
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
};

// cudaErrorInvalidValue for shapes the kernel does not handle (head_dim outside
// 1..kAttentionMaxHeadDim, num_heads not a multiple of num_kv_heads, batch or heads over 65535).
cudaError_t LaunchAttention(const AttentionArgs& args, bool bf16_operands, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
