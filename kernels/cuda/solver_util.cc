#include "kernels/cuda/solver_util.h"

#include "kernels/cuda/gptq.cuh"

namespace qcal::kernels::cuda {

absl::Status CheckFiniteMatrix(const QuantContext& ctx, const Tensor& x, bool upper_only,
                               const char* what) {
  return CheckFinite(ctx, x.data<float>(), x.dim(1), what, [&](unsigned long long* first) {
    return LaunchFindNonFinite(x.data<float>(), x.dim(0), x.dim(1), upper_only, first, ctx.stream);
  });
}

}  // namespace qcal::kernels::cuda
