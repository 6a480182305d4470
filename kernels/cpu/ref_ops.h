// Scalar reference implementations of every backend op: the specification that the optimized CPU
// ops and the CUDA kernels are tested against. Readable over fast; accumulation in double.
//
// `bf16_operands` rounds each GEMM operand to bf16 (round-to-nearest-even) before multiplying, the
// way --compute-dtype bf16 does on the fast paths.
#pragma once

#include <cstdint>

#include "kernels/backend.h"

namespace qcal::kernels::ref {

// y[m,n] = x[m,k] · w[n,k]ᵀ (+ bias[n]); accumulate: y +=.
void Linear(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n,
            int64_t k, bool accumulate, bool bf16_operands);
void RmsNorm(const float* x, const float* weight, float eps, float* y, int64_t rows, int64_t width);
// Rotates every head of every row in place; width = heads * head_dim.
void Rope(float* x, int64_t rows, int64_t width, const RopeShape& shape);
// The inverse frequency of index i (0 <= i < head_dim/2): theta^(-2i/head_dim), scaled as
// transformers' `_compute_{linear_scaling,llama3,yarn}_parameters` scale it (in double).
double RopeInvFreq(int i, const RopeShape& shape);
// The cos/sin pair used for position `pos` and frequency index i (0 <= i < head_dim/2): the cos
// and sin of pos · RopeInvFreq(i), times YaRN's attention factor (1 for other types).
void RopeAngle(int64_t pos, int i, const RopeShape& shape, float* cos_out, float* sin_out);
// Causal (optionally sliding-window) attention, grouped-query. fp32 operands: softmax in double,
// then P·V. bf16_operands: the rounding points of the CUDA bf16 kernel, an online softmax over
// tiles of 64 keys at multiples of 64 (scores float(q·k)·scale, the running maximum m, l and o
// rescaled by e^(m − m'), the unnormalised e^(s − m') rounded to bf16 for P·V, out = o / l).
void Attention(const float* q, const float* k, const float* v, const AttentionShape& shape,
               float* out, bool bf16_operands);
void SiluMul(const float* gate, const float* up, float* out, int64_t n);
void Add(const float* x, float* y, int64_t n);
void Embedding(const float* table, int64_t vocab, int64_t width, const int32_t* ids, int64_t n,
               float* out);
void Nll(const float* logits, int64_t rows, int64_t vocab, const int32_t* targets, float* nll);
// h[k,k] += xᵀx for x [n,k].
void AccumulateGram(const float* x, int64_t n, int64_t k, float* h, bool bf16_operands);
// Per-token dynamic symmetric fake-quantization of x [rows, width] to `bits` (2..8), all in fp32:
// qmax = 2^(bits-1) - 1, s = max_j |x[r, j]| / qmax, out = s * clamp(RoundHalfEven(x / s), -qmax,
// qmax); a row with s == 0 (all zeros, or an amax so small that s underflows) gives zeros. Finite x
// expected. out may alias x.
void ActQuant(const float* x, int64_t rows, int64_t width, int bits, float* out);
// ActQuant's factors: codes[r, j] = clamp(RoundHalfEven(x / s), -qmax, qmax) (0 where s == 0) and
// scales[r] = s, so that ActQuant's out is scales[r] * codes[r, j] rounded to fp32.
void ActQuantCodes(const float* x, int64_t rows, int64_t width, int bits, float* codes,
                   float* scales);
// The A<bits> linear of DESIGN section 3 ("Activation quantization"; Backend::ActQuantLinear):
// with s and a the factors of ActQuantCodes, S[t, o] = Σ_k a[t, k]·w[o, k] accumulated in fp64,
// y[t, o] = fl32(fl64(s[t]·S[t, o])), then fl32(y + bias[o]) when bias is given, and stored (or,
// with `accumulate`, added to y in fp32). Every product a·w is exact in fp64, and so is S when
// the weights of a row are s_g·(q − z) with fp16 scales s_g (a GPTQ checkpoint's): then S is the
// same number in any summation order, and y equals the ABQ epilogue's (kernels/cpu/abq_ref.h) bit
// for bit. x [m, k], w [n, k], y [m, n].
void ActQuantLinear(const float* x, int64_t m, int64_t k, int bits, const float* w, int64_t n,
                    const float* bias, float* y, bool accumulate);

// Per-channel |x| statistics of x [rows, width] (Backend::ChannelAbsStats): with seq_len > 0 the
// rows r % seq_len == 0 (each sample's BOS) are skipped, with seq_len 0 every row counts. Maxima
// in fp32; sums in double in row order, the order of engine::ActivationStats::Accumulate, so that
// its totals added with AddTotals give the same bits. first_bad_column looks at every row.
// rows % seq_len == 0 expected.
ChannelStats ChannelAbsStats(const float* x, int64_t rows, int64_t width, int64_t seq_len);
// w[r, j] *= m[j] for w [rows, width].
void ScaleColumns(float* w, int64_t rows, int64_t width, const float* m);
// w[r, j] /= m[r] for w [rows, width].
void DivideRows(float* w, int64_t rows, int64_t width, const float* m);

}  // namespace qcal::kernels::ref
