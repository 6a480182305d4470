// The CPU integer reference of the ABQ arbitrary-bit GEMM (DESIGN.md section 3, "Arbitrary-bit
// inference kernels (ABQ)"): the packed bit-plane layouts of weights and activations, the fused
// activation prologue, the binary-plane integer GEMM and its epilogue. It is the specification the
// CUDA kernels are tested against: their integer sums must equal AbqIntegerGemm exactly and their
// outputs must equal AbqEpilogue bit for bit (same operations, same order).
//
// Notation: y[t][o] = Σ_k x[t][k]·ŵ[o][k] for tokens t < m, outputs o < n, inputs k < K.
//
// Weights: unsigned codes q[o][k] in [0, 2^wb − 1] with a zero point per (k-group, output):
//   ŵ = s_w·(q − z). wb = weight planes, 2, 3, 4 or 8; the balanced grid (ABQ bit balance, codes
//   0..4) uses 3 planes, as its 3-bit GPTQ v1 export does. Zero points are in [0, 2^wb] (GPTQ v1
//   readers give z = stored + 1 in [1, 2^wb]).
// Activations (DESIGN section 3, "Activation quantization"), per token, symmetric:
//   s_a[t] = max_k |x[t][k]| / (2^(ab−1) − 1), a[t][k] = clamp(round(x / s_a), ±(2^(ab−1) − 1))
//   (s_a = 0 gives a = 0), exactly ref::ActQuant's codes: x̂ = s_a·a is ActQuant's output bit for
//   bit. ab = activation planes, 4 or 8. a is kept as ab-bit two's complement: plane i holds bit i
//   of (a mod 2^ab), so a = Σ_{i<ab−1} 2^i a_i − 2^(ab−1) a_{ab−1} (the top plane has sign −1).
//
// Packed layout (both operands). A plane row is words = ceil(K / 32) uint32 words along K; column
// k is bit (k mod 32) of word k / 32 (least significant bit first). Bits of columns >= K are 0 in
// both operands, so padding contributes nothing.
//   weights:     planes[(o·wb + j)·words + w], plane j of row o (the wb planes of a row are
//                consecutive);
//   activations: planes[(t·ab + i)·words + w], plane i of token t.
// k-groups: group_size g is −1 (per output channel: one group of K columns; any g >= K is the
// same) or a multiple of 32, so that a group is whole words. n_groups = ceil(K / g); group G covers
// columns [G·g, min((G + 1)·g, K)) and words [G·g/32, min((G + 1)·g/32, words)).
//   s_w and z: [n_groups][n] (GPTQ v1's order), s_a: [m], Σa: [m][n_groups] = Σ_{k in G} a[t][k].
//
// Integer GEMM, per (t, o, G):
//   dot = Σ_{i<ab} Σ_{j<wb} sgn_i·2^(i+j)·popc(a_i AND w_j over G's words),  sgn_i = −1 for
//   i = ab − 1, else +1;  dot = Σ_{k in G} a[t][k]·q[o][k] exactly.
// The group length is bounded (ValidateAbqShape) so that |dot|, |z·Σa| and |dot − z·Σa| are below
// 2^31: int32 accumulators are exact, and since int32 addition wraps modulo 2^32 a kernel may add
// the products in any order and still land on the same final sum.
// Epilogue (fp64 sums, one fp32 rounding; the CUDA kernels perform the same operations):
//   c_G = dot_G − z[G][o]·Σa[t][G]           (int32, exact)
//   S = 0; for G = 0 .. n_groups − 1: S = S + double(c_G)·double(s_w[G][o])   (fp64)
//   y[t][o] = float(double(s_a[t])·S)
// With a GPTQ v1 checkpoint's fp16 scales (11 significant bits; bf16 has 8) each product is exact
// in fp64 (|c_G| < 2^31), so a fused multiply-add would give the same S as a product and an add.
// (A scale with more than 22 significant bits can make a product inexact: the kernels still
// perform this product, then this add, unfused, in group order, so they still equal this
// reference, but the dequantizing path's equality below needs exact terms.) With exact terms,
// S = Σ_k a·s_w·(q − z) exactly unless one row's terms span more than fp64's 53 bits: with fp16
// scales that needs log2(127·2^wb·K) + 11 + log2(the ratio of one row's largest scale to its
// smallest) > 53, so scales more than 2^17 apart at 4 bits and K = 2^14, 2^13 at 8 bits (a
// trained model's rows are nowhere near). The dequantizing path
// (ref::ActQuantLinear, Backend::ActQuantLinear) sums the same exact terms and rounds the same
// way, so the two paths give the same bits; y equals Σ_k x̂·ŵ up to one fp32 rounding
// (AbqEpilogueErrorBound).
//
// Act-order GPTQ checkpoints (g_idx not equal to k / g) are refused by PackGptqV1ToAbq: the layout
// has consecutive k-groups, and permuting activation columns in the prologue is not part of this
// reference. Everything here is single-threaded scalar code; it favours clarity over speed.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/abq_ops.h"
#include "kernels/quant_grid.h"

namespace qcal::kernels {

// OK for weight bits {2, 3, 4, 8}, activation bits {4, 8} and group size -1 or a positive
// multiple of 32; otherwise InvalidArgument naming the value and the reason (e.g. activation bits
// 16: "A16 has no activation planes; use the weight-only path").
absl::Status ValidateAbqSpec(const AbqSpec& spec);

// The AbqSpec of a linear quantized with `weights` whose activations use act_bits: planes =
// CodeBits(weights) (3 for the balanced grid). InvalidArgument for the cuberoot grid (not a linear
// grid: no integer GEMM computes it), bits 5..7, or anything ValidateAbqSpec refuses.
absl::StatusOr<AbqSpec> AbqSpecFor(const QuantSpec& weights, int act_bits);

// Plane words per row for K input columns, ceil(K / 32).
int64_t AbqWords(int64_t k);
// The effective group length g (K for group_size -1 or >= K) and the group count ceil(K / g).
int64_t AbqGroupSize(const AbqSpec& spec, int64_t k);
int64_t AbqNumGroups(const AbqSpec& spec, int64_t k);

// OK when m, n, k >= 1 and the longest k-group keeps every integer of the GEMM below 2^31:
// g·(2^(ab−1) − 1)·(2^(wb+1) − 1) <= 2^31 − 1 (ab = 8, wb = 8: g <= 33,090, e.g. per-channel
// K = 28,672). InvalidArgument naming the shape otherwise.
absl::Status ValidateAbqShape(const AbqSpec& spec, int64_t m, int64_t n, int64_t k);

// OK when `w` keeps the invariants above: a valid spec and shape (ValidateAbqShape), words and
// n_groups matching k, tensors of their sizes, zero points in [0, 2^wb], finite scales, zero
// padding bits, and at most kAbqMaxGroups k-groups (the CUDA kernels' limit, checked on every
// backend so that all refuse the same linears). InvalidArgument naming the violation otherwise.
absl::Status ValidateAbqWeights(const AbqWeights& w);

// Packed activations of m tokens [m][k], as the prologue produces them.
struct AbqActivations {
  AbqSpec spec;
  int64_t m = 0, k = 0;
  int64_t words = 0;
  int64_t n_groups = 0;
  std::vector<uint32_t> planes;  // [m][act_bits][words]
  std::vector<float> scales;     // s_a [m]
  std::vector<int32_t> sums;     // Σa [m][n_groups]
};

// Packs weight codes [n][k] (row-major) with zero points and scales [n_groups][n]. Errors: an
// invalid spec or shape, sizes that do not match, a code outside [0, 2^wb − 1], a zero point
// outside [0, 2^wb], a non-finite scale.
absl::StatusOr<AbqWeights> PackAbqWeights(std::span<const int32_t> codes,
                                          std::span<const int32_t> zeros,
                                          std::span<const float> scales, int64_t n, int64_t k,
                                          const AbqSpec& spec);

// The codes [n][k] of packed weights (the inverse of PackAbqWeights' code packing).
std::vector<int32_t> UnpackAbqWeightCodes(const AbqWeights& w);

// Packs a GPTQ v1 linear (DESIGN section 5) into planes, as the CUDA path does at load: qweight
// int32 [ceil(d_in/32)·b][d_out] (column o is a little-endian bit stream, code k at bits
// [k·b, k·b + b)), qzeros int32 [n_groups][ceil(d_out/32)·b] (z = stored + 1, no wrap), scales
// [n_groups][d_out] as fp32 (the checkpoint's fp16 values converted exactly), g_idx [d_in].
// b = spec.weight_bits (3 for a balanced checkpoint). Errors: invalid spec or shape, tensor sizes
// that do not match, n_groups != AbqNumGroups(spec, d_in), and act-order or any other g_idx with
// g_idx[k] != k / g ("act-order checkpoints are not supported by the ABQ layout").
absl::StatusOr<AbqWeights> PackGptqV1ToAbq(std::span<const int32_t> qweight,
                                           std::span<const int32_t> qzeros,
                                           std::span<const float> scales,
                                           std::span<const int32_t> g_idx, int64_t d_out,
                                           int64_t d_in, const AbqSpec& spec);

// Packs activation codes [m][k] with per-token scales [m] and computes Σa per k-group. Errors: an
// invalid spec or shape, sizes that do not match, a code outside ±(2^(ab−1) − 1).
absl::StatusOr<AbqActivations> PackAbqActivationCodes(std::span<const int32_t> codes,
                                                      std::span<const float> scales, int64_t m,
                                                      int64_t k, const AbqSpec& spec);

// The fused prologue's reference: quantizes x [m][k] per token (codes and s_a as described above,
// bit-identical to ref::ActQuant) and packs the planes and Σa. Non-finite inputs give meaningless
// codes (callers validate activations), never undefined behaviour.
absl::StatusOr<AbqActivations> AbqQuantizeActivations(std::span<const float> x, int64_t m,
                                                      int64_t k, const AbqSpec& spec);

// The codes [m][k] of packed activations (two's complement planes back to integers).
std::vector<int32_t> UnpackAbqActivationCodes(const AbqActivations& a);

// The integer sums dot [m][n][n_groups] from AND + popcount over the planes. Errors: operands
// whose spec or k differ, or a shape ValidateAbqShape refuses.
absl::StatusOr<std::vector<int32_t>> AbqIntegerGemm(const AbqActivations& a, const AbqWeights& w);

// The epilogue y [m][n] from the integer sums dot [m][n][n_groups]. Errors as AbqIntegerGemm,
// and dot of the wrong size.
absl::StatusOr<std::vector<float>> AbqEpilogue(std::span<const int32_t> dot,
                                               const AbqActivations& a, const AbqWeights& w);

// AbqIntegerGemm followed by AbqEpilogue: y [m][n].
absl::StatusOr<std::vector<float>> AbqGemm(const AbqActivations& a, const AbqWeights& w);

// A bound on |y[t][o] − y64[t][o]|, y64 = Σ_k (s_a a)(s_w (q − z)) in exact arithmetic, for the
// epilogue's result: 2^-23·|s_a|·Σ_G |s_w[G][o]·c_G|: the final fp32 rounding (2^-24 relative)
// plus the fp64 sum's and product's, far below another 2^-24.
double AbqEpilogueErrorBound(std::span<const int32_t> dot, const AbqActivations& a,
                             const AbqWeights& w, int64_t t, int64_t o);

// The weight-only (A16) baseline's specification, for the CUDA kernel that dequantizes the packed
// weights in registers and multiplies on bf16 tensor cores: activations are rounded to bf16 (round
// to nearest even), weights enter as the exact integers q − z, each k-group is summed in fp32 and
// scaled by s_w in the epilogue. Returns y64 [m][n] = Σ_G s_w[G][o]·Σ_{k in G} bf16(x[t][k])·(q −
// z) in double precision. Errors: x of the wrong size, m < 1.
absl::StatusOr<std::vector<double>> AbqWeightOnlyReference(std::span<const float> x, int64_t m,
                                                           const AbqWeights& w);

// The bound on |y[t][o] − y64[t][o]| for the fp32 kernel: (g + n_groups + 2)·2^-22·
// Σ_G |s_w[G][o]|·Σ_{k in G} |bf16(x[t][k])·(q − z)|, g the group length. The products are exact
// in fp32; each of the at most g additions of a group's fp32 accumulation (tensor cores may
// truncate rather than round: at most one ulp, 2^-23 relative) and each epilogue fma adds at most
// 2^-23 of the absolute sum; the factor 2 covers the higher-order terms.
double AbqWeightOnlyErrorBound(std::span<const float> x, const AbqWeights& w, int64_t t, int64_t o);

}  // namespace qcal::kernels
