// Launchers of the CUDA causal grouped-query attention backward (spec: ref::AttentionBackward,
// kernels/cpu/ref_grad.h): an exact fp32 path on CUDA cores (LaunchAttentionBackward) and a
// bf16 tensor-core path (LaunchAttentionBackwardBf16, below).
//
// Exact path. Flash-attention style: the probabilities are recomputed tile by tile from q and k,
// never stored as an L×L matrix. Three steps, each deterministic (no atomics; every output element
// is written by one thread that sums in a fixed order):
// 1. per (query tile, head): a forward sweep over the visible keys gives each query's
//    logsumexp and D_i = Σ_j P_ij·(dout_i·v_j) (= dout_i·out_i), kept in scratch;
// 2. the same block then sweeps the keys again and accumulates dq = scale·dS·k, where
//    dS = P ⊙ (dP − D) and dP = dout·vᵀ;
// 3. per (key tile, kv head): a block loops over the n_rep query heads of the group and their
//    visible query tiles, in order, and accumulates dv = Pᵀ·dout and dk = scale·dSᵀ·q.
// Tiles of 64 queries × 64 keys live in shared memory; 256 threads each own 4 × 4 scores, fp32
// arithmetic on CUDA cores. With bf16 operands, q, k, v and dout are rounded to bf16 as they are
// loaded, exactly where the reference rounds them; the probabilities and dS stay fp32 (the
// backend's fp32 compute runs this path; its bf16 compute runs the tensor-core path, about 8x
// faster: 10 ms against 81 ms for a Llama-2-7B chunk, 8 x 2048 tokens, 32 heads of 128, on an
// H200).
#pragma once

#include <cuda_bf16.h>
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

// Tensor-core path: q, k, v and dout packed to bf16 by LaunchPackBf16Heads (rows padded to
// padded_dim = AttentionPaddedDim(head_dim), so every head_dim up to kAttentionMaxHeadDim is
// covered); dq, dk, dv and scratch as in AttentionBackwardArgs. The same three steps as the exact
// path, with every product on the tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation) and no atomics, so results are bit-identical run to run:
// 1. DqBf16Kernel, per (64 queries, head): S = q·kᵀ and dP = dout·vᵀ over the visible keys give
//    the logsumexp and D_i = Σ_j P_ij·dP_ij online (P in fp32), kept in scratch;
// 2. the same block sweeps the keys again: dS = P ⊙ (dP − D), rounded to bf16, and dq = scale·dS·k;
// 3. DkDvBf16Kernel, per (64 keys, kv head): over the group's query heads and their visible query
//    tiles in order, recompute Sᵀ and dPᵀ, then dv += Pᵀ·dout and dk += scale·dSᵀ·q with P and dS
//    rounded to bf16.
// Unlike the reference (and the exact path with bf16_operands), P and dS are rounded to bf16 where
// they enter a product: about 2e-3 relative error against ref::AttentionBackward with bf16
// operands (measured on an H200; the exact path is within 5e-7).
struct AttentionBackwardBf16Args {
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  const __nv_bfloat16* dout = nullptr;
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
  int padded_dim = 0;
  int q_offset = 0;
  int sliding_window = 0;  // 0 = none
  // scratch already holds each query's log2-sum-exp (the forward's, AttentionBf16Args::lse) and
  // D_i = dout_i·out_i (LaunchAttentionDelta): step 1 is skipped, the dq kernel sweeps the keys
  // once. P·(dP − D) then uses the forward's statistics, D from the forward's output (whose P was
  // rounded to bf16 before P·V): a difference of the order of that rounding.
  bool stats_given = false;
};

// Errors as LaunchAttentionBackward's, and for a padded_dim that does not match head_dim or more
// than 65535 tiles of 64 queries or keys (over 4 million tokens).
cudaError_t LaunchAttentionBackwardBf16(const AttentionBackwardBf16Args& args, cudaStream_t stream);

// delta[(b·num_heads + h)·q_len + i] = Σ_c bf16(dout[b·q_len + i, h·head_dim + c])·out[...], the
// D of the backward from the forward's output (fp32 sums over one warp per query and head, in a
// fixed order), for row-major dout and out [batch·q_len, num_heads·head_dim].
cudaError_t LaunchAttentionDelta(const float* dout, const float* out, int batch, int q_len,
                                 int num_heads, int head_dim, float* delta, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
