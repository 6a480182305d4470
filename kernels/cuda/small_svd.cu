// One-sided Jacobi SVD of a small square matrix in one thread block (kernels/small_svd.h), on
// X = aᵀ. A group of kSmallSvdLanes threads owns a pair of columns: its lanes form the three sums
// over their rows, add them by a butterfly (the lanes' tree order of the header), and rotate their
// rows of the two columns of X and of the rotations J. The pairs of a round are disjoint, so the
// groups run them at once; a barrier separates the rounds. Compiled with -fmad=false
// (kernels/cuda/CMakeLists.txt): the CPU reference's separately rounded products and sums, bit for
// bit.
//
// Why not cuSOLVER's gesvdj: for k = 80 it took about 1.6 ms on an H100 (docs/BENCHMARKS.md,
// thirty-second session), dozens of small launches a sweep; the whole iteration here is one launch.
#include <algorithm>

#include "kernels/cuda/small_svd.cuh"
#include "kernels/small_svd.h"

namespace qcal::kernels::cuda {
namespace {

constexpr int kMaxThreads = 1024;

// Σ over the lanes of a group (width kSmallSvdLanes, the group's lanes in `mask`): every lane
// ends with the tree order's bits.
__device__ double GroupSum(double value, unsigned mask) {
  for (int h = kSmallSvdLanes / 2; h >= 1; h /= 2) {
    value += __shfl_xor_sync(mask, value, h, kSmallSvdLanes);
  }
  return value;
}

__global__ void __launch_bounds__(kMaxThreads)
    SmallSvdKernel(const double* a_in, int k, double* scratch, bool in_shared, double* u,
                   double* sigma, double* v_out, int32_t* info, int32_t* sweeps) {
  extern __shared__ double shared[];
  __shared__ int rotated;
  __shared__ double negligible;
  double* a = in_shared ? shared : scratch;  // X = aᵀ, rotated
  double* v = a + k * k;                     // J, the rotations
  double* norms = v + k * k;
  double* ranks = norms + k;  // small integers, exact in double
  const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  const int lane = tid % kSmallSvdLanes, group = tid / kSmallSvdLanes;
  const int groups = threads / kSmallSvdLanes;
  const unsigned mask = ((1u << kSmallSvdLanes) - 1u)
                        << (tid % 32 / kSmallSvdLanes * kSmallSvdLanes);
  for (int e = tid; e < k * k; e += threads) {
    a[e] = a_in[e % k * k + e / k];
    v[e] = e % k == e / k ? 1.0 : 0.0;
  }
  __syncthreads();
  // ‖X‖_F²: the columns' lane sums, then added in column order by one thread (the reference's
  // order); norms[] is free until the end.
  for (int j = group; j < k; j += groups) {
    double acc = 0;
    for (int r = lane; r < k; r += kSmallSvdLanes) acc += a[j * k + r] * a[j * k + r];
    acc = GroupSum(acc, mask);
    if (lane == 0) norms[j] = acc;
  }
  __syncthreads();
  if (tid == 0) {
    double frobenius_sq = 0;
    for (int j = 0; j < k; ++j) frobenius_sq += norms[j];
    negligible = SmallSvdNegligible(k, frobenius_sq);
  }
  __syncthreads();

  const int kk = k + (k & 1);
  bool converged = false;
  int sweep = 0;
  while (!converged && sweep < kSmallSvdMaxSweeps) {
    ++sweep;
    if (tid == 0) rotated = 0;
    __syncthreads();
    for (int round = 0; round < kk - 1; ++round) {
      for (int i = group; i < kk / 2; i += groups) {
        const int p = SmallSvdSlotColumn(i, round, kk);
        const int q = SmallSvdSlotColumn(kk - 1 - i, round, kk);
        if (p >= k || q >= k) continue;
        double* ap = a + p * k;
        double* aq = a + q * k;
        double alpha = 0, beta = 0, gamma = 0;
        for (int r = lane; r < k; r += kSmallSvdLanes) {
          const double x = ap[r], y = aq[r];
          alpha += x * x;
          beta += y * y;
          gamma += x * y;
        }
        alpha = GroupSum(alpha, mask);
        beta = GroupSum(beta, mask);
        gamma = GroupSum(gamma, mask);
        double c = 0, s = 0;
        if (!SmallSvdRotation(alpha, beta, gamma, negligible, &c, &s)) continue;
        double* vp = v + p * k;
        double* vq = v + q * k;
        for (int r = lane; r < k; r += kSmallSvdLanes) {
          SmallSvdRotate(c, s, &ap[r], &aq[r]);
          SmallSvdRotate(c, s, &vp[r], &vq[r]);
        }
        if (lane == 0) rotated = 1;
      }
      __syncthreads();
    }
    converged = rotated == 0;
    __syncthreads();
  }

  for (int j = group; j < k; j += groups) {
    double acc = 0;
    for (int r = lane; r < k; r += kSmallSvdLanes) acc += a[j * k + r] * a[j * k + r];
    acc = GroupSum(acc, mask);
    if (lane == 0) norms[j] = sqrt(acc);
  }
  __syncthreads();
  for (int j = tid; j < k; j += threads) {
    int rank = 0;
    for (int i = 0; i < k; ++i) rank += norms[i] > norms[j] || (norms[i] == norms[j] && i < j);
    ranks[j] = static_cast<double>(rank);
  }
  if (tid == 0) {
    bool finite = true;
    for (int j = 0; j < k; ++j) finite = finite && isfinite(norms[j]);
    *info = (converged ? 0 : 1) | (finite ? 0 : 2);
    if (sweeps != nullptr) *sweeps = sweep;
  }
  __syncthreads();
  for (int e = tid; e < k * k; e += threads) {
    const int j = e / k, r = e % k;
    const int out = static_cast<int>(ranks[j]) * k + r;
    u[out] = v[e];
    v_out[out] = norms[j] > 0 ? a[e] / norms[j] : 0.0;
    if (r == 0) sigma[static_cast<int>(ranks[j])] = norms[j];
  }
}

}  // namespace

cudaError_t LaunchSmallSvd(const double* a, int64_t k, double* scratch, double* u, double* sigma,
                           double* v, int32_t* info, int32_t* sweeps, cudaStream_t stream) {
  if (k < 1 || k > kSmallSvdMaxK) return cudaErrorInvalidValue;
  const int64_t pairs = (k + 1) / 2;
  const int threads =
      static_cast<int>(std::min<int64_t>(kMaxThreads, (pairs * kSmallSvdLanes + 31) / 32 * 32));
  const bool in_shared = k <= kSmallSvdSharedMaxK;
  const size_t bytes =
      in_shared ? static_cast<size_t>(SmallSvdScratchDoubles(k)) * sizeof(double) : 0;
  if (in_shared) {
    // Always the largest size: a per-k value could be lowered by another host thread between
    // this call and the launch.
    const cudaError_t error = cudaFuncSetAttribute(
        SmallSvdKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(SmallSvdScratchDoubles(kSmallSvdSharedMaxK) * sizeof(double)));
    if (error != cudaSuccess) return error;
  }
  SmallSvdKernel<<<1, threads, bytes, stream>>>(a, static_cast<int>(k), scratch, in_shared, u,
                                                sigma, v, info, sweeps);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
