// Launcher of the CUDA causal grouped-query attention backward (spec: ref::AttentionBackward,
// kernels/cpu/ref_grad.h).
//
// Flash-attention style: the probabilities are recomputed tile by tile from q and k, never stored
// as an L×L matrix. Three steps, each deterministic (no atomics; every output element is written
// by one thread that sums in a fixed order):
// 1. per (query tile, head): a forward sweep over the visible keys gives each query's
//    logsumexp and D_i = Σ_j P_ij·(dout_i·v_j) (= dout_i·out_i), kept in scratch;
// 2. the same block then sweeps the keys again and accumulates dq = scale·dS·k, where
//    dS = P ⊙ (dP − D) and dP = dout·vᵀ;
// 3. per (key tile, kv head): a block loops over the n_rep query heads of the group and their
//    visible query tiles, in order, and accumulates dv = Pᵀ·dout and dk = scale·dSᵀ·q.
// Tiles of 64 queries × 64 keys live in shared memory; 256 threads each own 4 × 4 scores, fp32
// arithmetic on CUDA cores. With bf16 operands, q, k, v and dout are rounded to bf16 as they are
// loaded, exactly where the reference rounds them; the probabilities and dS stay fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// Row-major device tensors and shapes as in kernels::AttentionShape: q, dout and dq
// [batch*q_len, num_heads*head_dim]; k, v, dk and dv [batch*kv_len, num_kv_heads*head_dim].
// Query i of a sequence sits at position q_offset + i and attends keys 0 .. q_offset + i, or with
// sliding_window W > 0 the last W of them. dq, dk and dv are overwritten (keys no query sees get
// zeros). `scratch` holds AttentionBackwardScratchFloats floats of device memory.
struct AttentionBackwardArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* dout = nullptr;
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  float* scratch = nullptr;
  int batch = 0;
  int q_len = 0;
  int kv_len = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int q_offset = 0;
  int sliding_window = 0;  // 0 = none
  bool bf16_operands = false;
};

// The scratch the launch needs: a logsumexp and a D per (sequence, head, query).
int64_t AttentionBackwardScratchFloats(int batch, int num_heads, int q_len);

// cudaErrorInvalidValue for shapes the kernels do not handle (head_dim outside
// 1..kAttentionMaxHeadDim, num_heads not a multiple of num_kv_heads, batch or heads over 65535,
// q_offset + q_len > kv_len).
cudaError_t LaunchAttentionBackward(const AttentionBackwardArgs& args, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
