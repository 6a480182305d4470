// Scalar references of the gradient pass's ops (Backend's backward ops, DESIGN section 2 step 4),
// templated on the element type: T = float is the specification that the optimized CPU ops and
// the CUDA kernels are tested against; T = double, with the forwards below, is what the float64
// finite-difference oracles check (tests/kernels/grad_ref_test.cc). Readable over fast;
// accumulation in double. The float forwards here compute exactly what kernels/cpu/ref_ops.h
// computes (no bf16 rounding: callers that need it round operands first).
//
// Layouts as in kernels/backend.h: a batch of sequences is a [batch*seq_len, width] matrix,
// multi-head tensors put head h at columns [h*head_dim, (h+1)*head_dim). Explicitly instantiated
// for float and double in ref_grad.cc.
#pragma once

#include <cstdint>

#include "kernels/backend.h"

namespace qcal::kernels::ref {

// ---- Forwards (T = double for the oracles).
// y[m,n] = x[m,k]·w[n,k]ᵀ.
template <typename T>
void LinearT(const T* x, const T* w, T* y, int64_t m, int64_t n, int64_t k);
template <typename T>
void RmsNormT(const T* x, const T* weight, double eps, T* y, int64_t rows, int64_t width);
template <typename T>
void RopeT(T* x, int64_t rows, int64_t width, const RopeShape& shape);
template <typename T>
void AttentionT(const T* q, const T* k, const T* v, const AttentionShape& shape, T* out);
template <typename T>
void SiluMulT(const T* gate, const T* up, T* out, int64_t n);
template <typename T>
void EmbeddingT(const T* table, int64_t vocab, int64_t width, const int32_t* ids, int64_t n,
                T* out);
// nll[r] = logsumexp(logits[r]) − logits[r, targets[r]]; a target of −1 gives 0.
template <typename T>
void NllT(const T* logits, int64_t rows, int64_t vocab, const int32_t* targets, T* nll);

// ---- Backwards: the Backend ops of the same names (kernels/backend.h has the contracts).
// c[m,n] = alpha·op(a)·op(b) + beta·c (beta == 0 ignores c); bf16_operands rounds a and b.
template <typename T>
void Gemm(const T* a, bool trans_a, const T* b, bool trans_b, int64_t m, int64_t n, int64_t k,
          T alpha, T beta, T* c, bool bf16_operands);
template <typename T>
void RmsNormBackward(const T* x, const T* weight, double eps, const T* dy, T* dx, int64_t rows,
                     int64_t width);
template <typename T>
void RopeBackward(T* g, int64_t rows, int64_t width, const RopeShape& shape);
// bf16_operands rounds q, k, v and dout (as the forward rounds its operands); the recomputed
// probabilities and the score gradients stay in double.
template <typename T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* dout,
                       const AttentionShape& shape, T* dq, T* dk, T* dv, bool bf16_operands);
template <typename T>
void SiluMulBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n);
template <typename T>
void EmbeddingBackward(const int32_t* ids, int64_t n, const T* dout, int64_t width, T* dtable);
template <typename T>
void NllBackward(const T* logits, int64_t rows, int64_t vocab, const int32_t* targets, T scale,
                 T* dlogits);
template <typename T>
void ScaleRowsByNorm(const T* g, int64_t rows, int64_t width_g, T* x, int64_t width_x);
template <typename T>
void AccumulateSquares(const T* g, int64_t n, T* f);

}  // namespace qcal::kernels::ref
