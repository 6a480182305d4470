// Launchers of the GPU GPTQ solver's kernels (spec: services/engine/quant/gptq.h; the adapters
// are in cuda_quant.cc). Each returns the launch's cudaError_t, runs on `stream` asynchronously and
// knows nothing of tensors or absl.
//
// The factorization works on the reversed matrix: with J the exchange matrix, the lower Cholesky
// factor L of J·H·J (potrf) gives H = (JLJ)(JLJ)ᵀ with JLJ upper triangular, so
// H⁻¹ = (JL⁻¹J)ᵀ(JL⁻¹J) and U = J·L⁻¹·J is the upper Cholesky factor of H⁻¹ after one triangular
// inverse: half the work of potrf + potri + potrf, the same U up to rounding. The inverse is taken
// by recursive halving with TRMM products (InvertLower in cuda_quant.cc; cusolverDnXtrtri only on
// blocks of 512 and less): the 7B shape's factorizations 2.1 s against 4.0 s with trtri on the
// whole triangle (H100, docs/BENCHMARKS.md).
//
// The column loop of one lazy block runs in ONE launch (LaunchGptqBlock): a group of lanes owns
// a weight row start to finish, its block columns held in shared memory, and the lanes share each
// column's update of the later columns (8 lanes a row, 4 rows a warp, with U's block staged in
// shared memory for blocks up to 128 wide; a warp a row for wider blocks). Its arithmetic is the
// CPU reference's operation for operation (separately rounded multiply and subtract, no fused
// multiply-add; kernels/quant_grid.h for the grid), so given the same U and block inputs the codes
// are bit-identical to the CPU's; only the lazy updates between blocks (cuBLAS GEMMs, two levels:
// within super-blocks of up to 1024 columns, then from each super-block to every later column) sum
// in a different order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {

// a (column-major, n x n, both triangles) = J Hd J, i.e. a[c*n + r] = Hd(n-1-r, n-1-c), where
// Hd(p, q) is the damped Hessian in visiting order: H[perm[p], perm[q]] read from h's upper
// triangle, the identity's entry when either column is removed, plus damp_add on the diagonal.
cudaError_t LaunchBuildReversedHessian(const float* h, int64_t n, const int32_t* perm,
                                       const uint8_t* removed, float damp_add, float* a,
                                       cudaStream_t stream);

// u (row-major [n, n]) = J L⁻¹ J from the column-major lower inverse factor linv: u[a*n + b] =
// linv[(n-1-b)*n + (n-1-a)] for b >= a, 0 below the diagonal.
cudaError_t LaunchExtractU(const float* linv, int64_t n, float* u, cudaStream_t stream);

// wp[o*n + p] = removed[perm[p]] ? 0 : w[o*n + perm[p]]: the working copy in visiting order.
cudaError_t LaunchGatherColumns(const float* w, int64_t d_out, int64_t n, const int32_t* perm,
                                const uint8_t* removed, float* wp, cudaStream_t stream);

// *first = min(*first, linear index of every non-finite element) of the row-major x [rows, cols],
// only over j >= i when upper_only. The caller initialises *first to ~0ull.
cudaError_t LaunchFindNonFinite(const float* x, int64_t rows, int64_t cols, bool upper_only,
                                unsigned long long* first, cudaStream_t stream);

// One lazy block [i1, i2) of the column loop. Rows are independent; row o reads wp's row (the
// columns of the block, and of a group starting at i1 that extends past i2) and U's rows i1..i2-1.
struct GptqBlockArgs {
  float* wp = nullptr;       // [d_out, n] working weights in visiting order
  const float* u = nullptr;  // [n, n] U, visiting order (upper triangle)
  int64_t n = 0;
  int64_t d_out = 0;
  int64_t i1 = 0, i2 = 0;  // the block's visiting positions
  int64_t group_size = 0;  // effective g
  QuantSpec spec;
  const int32_t* perm = nullptr;  // [n] visiting position -> original column
  float* err = nullptr;           // [d_out, err_ld]: e of column i1 + c at err[o*err_ld + c]
  int64_t err_ld = 0;
  uint8_t* codes = nullptr;      // [d_out, n], original column order
  float* dequantized = nullptr;  // [d_out, n], original column order
  float* scales = nullptr;       // [n_groups, d_out]
  int32_t* zeros = nullptr;      // [n_groups, d_out]
  // [d_out, n], original column order, or null: W̃, each weight's value when its column is
  // rounded (the value QuantizeCode rounds; removed columns are visited too and hold 0).
  float* pre_round = nullptr;
  // [d_out] per row: (kind, visiting position) of the row's first failure; kind 0 none,
  // kGptqScaleOverflow, kGptqNonFiniteError. Rows keep the first one across blocks.
  int2* failures = nullptr;
};
inline constexpr int kGptqScaleOverflow = 1;
inline constexpr int kGptqNonFiniteError = 2;

// The widest lazy block LaunchGptqBlock takes (it needs 13 bytes of shared memory per row and
// column); wider blocks get cudaErrorInvalidValue.
int64_t GptqMaxBlockWidth();
cudaError_t LaunchGptqBlock(const GptqBlockArgs& args, cudaStream_t stream);

// Round to nearest: for every row o and group k, FitGroup over the group's columns, then codes,
// dequantized values, scales and zeros as GptqBlockArgs lays them out (identity column order).
// overflow[o] = min(overflow[o], k) for every group k of row o whose scale is not finite; the
// caller initialises overflow to INT32_MAX.
cudaError_t LaunchQuantizeRtn(const float* w, int64_t d_out, int64_t d_in, int64_t group_size,
                              const QuantSpec& spec, uint8_t* codes, float* dequantized,
                              float* scales, int32_t* zeros, int32_t* overflow,
                              cudaStream_t stream);

}  // namespace qcal::kernels::cuda
