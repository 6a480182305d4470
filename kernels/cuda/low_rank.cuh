// Launchers of the error-reconstruction kernels (spec: engine::CholeskyWhitening and
// engine::ReconstructError in services/engine/aser/error_reconstruction.h; the adapters, which run
// the factorizations and products in cuSOLVER and cuBLAS, are in cuda_low_rank.cc). Each returns
// the launch's cudaError_t, runs on `stream` asynchronously and knows nothing of tensors or absl.
// All matrices are row-major unless a comment says column-major.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// a [n, n] (double) = the row-major lower triangle of G + delta·I read from the upper triangle of
// g [n, n] (fp32): a[i*n + j] = g[j*n + i] (+ delta when i == j) for j <= i, 0 for j > i.
// Column-major, a is the upper triangle of G + delta·I, ready for potrf(upper).
cudaError_t LaunchLowerFromUpper(const float* g, int64_t n, double delta, double* a,
                                 cudaStream_t stream);

// s [n, n] (fp32) = the row-major lower triangle read from the upper triangle of g [n, n] (fp32):
// s[i*n + j] = g[j*n + i] for j <= i, 0 for j > i. A column-major lower Cholesky factor (potrf's
// output, whose other triangle holds the input) becomes the row-major lower factor.
cudaError_t LaunchLowerFromUpperF32(const float* g, int64_t n, float* s, cudaStream_t stream);

// s [n, n] (fp32) = the lower triangle of a [n, n] (double) rounded to fp32; the strict upper
// triangle of s is 0.
cudaError_t LaunchLowerToF32(const double* a, int64_t n, float* s, cudaStream_t stream);

// m[o*d_in + p] = (double(w) - double(w_hat)) · (scale ? scale[j] : 1) at column j = order[p]
// (j = p without an order) in double, for the [d_out, d_in] matrices w and w_hat (fp32), the
// optional per-column scale [d_in] (fp32) and the optional column order [d_in] (a permutation).
cudaError_t LaunchWhitenedDifference(const float* w, const float* w_hat, int64_t d_out,
                                     int64_t d_in, const float* scale, const int32_t* order,
                                     double* m, cudaStream_t stream);

// dst[i*cols + order[p]] = float(src[i*cols + p]) for the row-major [rows, cols] src (double) and
// dst (fp32), order a permutation of [0, cols): the inverse of LaunchWhitenedDifference's gather.
cudaError_t LaunchScatterColumnsToF32(const double* src, int64_t rows, int64_t cols,
                                      const int32_t* order, float* dst, cudaStream_t stream);

// x [rank, d_in] (double) /= scale[j] per column j, and 0 where scale[j] == 0 (a channel without
// signal gets a zero column).
cudaError_t LaunchDivideColumns(double* x, int64_t rank, int64_t d_in, const float* scale,
                                cudaStream_t stream);

// x[i] = a standard normal draw (Box-Muller on HashBits(seed, 2i) and HashBits(seed, 2i + 1),
// kernels/hash_random.h), in double: the same values for the same seed on every run.
cudaError_t LaunchGaussian(double* x, int64_t count, uint64_t seed, cudaStream_t stream);

// dst (column-major [k, k], leading dimension k) = the upper triangle of src (column-major, leading
// dimension ld >= k); the strict lower triangle of dst is 0.
cudaError_t LaunchUpperTriangle(const double* src, int64_t ld, int64_t k, double* dst,
                                cudaStream_t stream);

// dst[i] = float(src[i]).
cudaError_t LaunchF64ToF32(const double* src, int64_t count, float* dst, cudaStream_t stream);
// a [n, n] (double) = the lower triangle of s [n, n] (fp32); the strict upper triangle of a is 0.
cudaError_t LaunchLowerToF64(const float* s, int64_t n, double* a, cudaStream_t stream);

// *first = min(*first, linear index of every non-finite element) of the lower triangle (j <= i)
// of x [n, n] (fp32). The caller initialises *first to ~0ull.
cudaError_t LaunchFindNonFiniteLower(const float* x, int64_t n, unsigned long long* first,
                                     cudaStream_t stream);

// The inverses of the diagonal blocks of the column-major upper triangle t [n, n] (leading
// dimension n): block b covers rows and columns [b·kTriBlock, min(n, (b+1)·kTriBlock)), and
// inv [ceil(n / kTriBlock), kTriBlock, kTriBlock] receives each inverse column-major (leading
// dimension kTriBlock; entries outside the block's size and below its diagonal 0). One thread a
// column, back substitution in a fixed order (run to run identical). For the blocked solve of
// ReconstructError's L_B.
constexpr int64_t kTriBlock = 64;
cudaError_t LaunchInvertUpperDiagonalBlocks(const double* t, int64_t n, double* inv,
                                            cudaStream_t stream);

// b [n, k] (column-major, leading dimension n) := T⁻¹·b for the column-major upper triangle t
// [n, n], given inv = LaunchInvertUpperDiagonalBlocks(t): block back substitution in one launch,
// a thread block per kTriBlock rows and kTriBlock columns of b, each waiting for the row blocks
// below it through `ready` (SolveUpperByBlocksWords(n, k) words, 8-byte aligned, cleared here:
// a flag per block and a ticket counter) instead of a launch per step. The sums over the blocks
// below run in descending block order: run-to-run identical.
int64_t SolveUpperByBlocksWords(int64_t n, int64_t k);
cudaError_t LaunchSolveUpperByBlocks(const double* t, int64_t n, const double* inv, double* b,
                                     int64_t k, int32_t* ready, cudaStream_t stream);

// *out = Σ_i double(x_i)·double(y_i) over count fp32 pairs, summed in double by one block in a
// fixed order (run to run identical): LowRankOutputError's ⟨L_A, P⟩ without reading both back.
cudaError_t LaunchDotF64(const float* x, const float* y, int64_t count, double* out,
                         cudaStream_t stream);

}  // namespace qcal::kernels::cuda
