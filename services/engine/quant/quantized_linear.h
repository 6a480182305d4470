// A quantized linear layer (codes, scales, zero points, column groups) as every quantizer
// produces it and the exporter consumes it, plus round-to-nearest quantization (RTN) and the
// layer output error used to compare quantizers.
//
// The grid rules themselves (fitting, code <-> value) are in kernels/quant_grid.h, shared with the
// CUDA kernels; this header re-exports their names into qcal::engine.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/quant_grid.h"
#include "kernels/quant_ops.h"

namespace qcal::engine {

using kernels::GridKind;
using kernels::GroupParams;
using kernels::QuantSpec;

// OK when bits is 2..8 and group_size is -1 or >= 1; otherwise InvalidArgument naming the field.
using kernels::ValidateQuantSpec;

// The result of quantizing one weight matrix W [d_out][d_in]. Group k of output row o covers the
// input columns j with g_idx[j] == k; its parameters are scales/zeros[k * d_out + o].
struct QuantizedLinear {
  int64_t d_out = 0;
  int64_t d_in = 0;
  QuantSpec spec;
  // Effective group width g (d_in when there is one group per row).
  int64_t group_size = 0;
  // Groups per row, ceil(d_in / g).
  int64_t n_groups = 0;
  // [d_out][d_in] codes in 0..2^bits-1, original column order.
  std::vector<int32_t> codes;
  // [n_groups][d_out] scales, each an fp16 value >= 2^-14 (exported as fp16 without rounding).
  std::vector<float> scales;
  // [n_groups][d_out] zero points.
  std::vector<int32_t> zeros;
  // [d_in] group of each original column: j / g, or with act-order (position of j in the
  // permutation) / g.
  std::vector<int32_t> g_idx;
  // Act-order permutation, perm[p] = original column at position p; empty without act-order.
  std::vector<int32_t> perm;

  // The dequantized weights [d_out][d_in] in fp32: w^ = s (q - z) (cubed for the cuberoot grid),
  // with s and z taken through g_idx. Identical to what a reader of the exported tensors computes.
  std::vector<float> Dequantized() const;
};

// RTN: every group of every row fitted and rounded on its own (kernels::FitGroup/QuantizeCode in
// precision T, float or double). w is row-major [d_out][d_in].
// Errors (InvalidArgument): an invalid spec or shape, a non-finite weight (naming row and column),
// a group whose range overflows an fp16 scale.
template <typename T>
absl::StatusOr<QuantizedLinear> QuantizeRtn(const T* w, int64_t d_out, int64_t d_in,
                                            const QuantSpec& spec);

// The layer output error ||(W - W^) X^T||_F computed from the Gram matrix G = X^T X [d_in][d_in]:
// sqrt(trace(E G E^T)) with E = W - W^, in double precision. Only the upper triangle of G (j >= i)
// is read. Needs d_in^2 doubles of scratch memory. Deterministic for a given BLAS thread count.
double OutputError(const float* w, const float* w_hat, const float* gram, int64_t d_out,
                   int64_t d_in);

}  // namespace qcal::engine
