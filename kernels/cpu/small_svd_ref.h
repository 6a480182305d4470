// The CPU reference of the small square SVD (kernels/small_svd.h): one-sided Jacobi with the
// tournament pair order, the lanes' sums and the rotation that header defines, the pairs of a round
// one after another. The specification the CUDA kernel (kernels/cuda/small_svd.cu) equals bit for
// bit; error reconstruction's randomized SVD on the GPU runs the kernel on its k x k triangle.
#pragma once

#include <cstdint>
#include <vector>

namespace qcal::kernels::ref {

struct SmallSvdResult {
  std::vector<double> u;      // column-major [k, k], orthogonal (the rotations)
  std::vector<double> sigma;  // [k], descending (ties: the lower original row first)
  std::vector<double> v;      // column-major [k, k]: orthonormal columns, 0 where σ_j = 0
  int sweeps = 0;             // sweeps run, the last one rotating nothing when converged
  bool converged = false;     // a sweep rotated nothing within kSmallSvdMaxSweeps
  bool finite = false;        // every σ is finite
};

// a: column-major [k, k] (k >= 1); a = u · diag(sigma) · vᵀ.
SmallSvdResult SmallSvd(const std::vector<double>& a, int64_t k);

}  // namespace qcal::kernels::ref
