// Launcher of the clipped fake quantizer's forward (spec: ref::ClippedFakeQuant in
// kernels/cpu/train_ref.h; rules: kernels/train_math.h). Returns the launch's cudaError_t; the
// backend validates shapes first.
#pragma once

#include <cuda_runtime.h>

#include "kernels/train_math.h"

namespace qcal::kernels::cuda {

// When the staged kernels apply (groups whole: d_in a multiple of g; no permutation; g <= 128):
// groups per block (threads) 4096 / g clamped to [32, 128], and the shared memory of `tiles`
// tiles of threads × (g + 1) floats. threads = 0: the direct kernels (a thread reads its group's
// columns from global memory, uncoalesced: about 5x slower at the 7B shape, measured).
struct StagedGroups {
  int threads = 0;
  size_t shared_bytes = 0;
};
inline StagedGroups StagedGroupsOf(const ClipView& layout, int tiles) {
  const int64_t g = layout.group_size();
  StagedGroups s;
  if (layout.perm != nullptr || g <= 0 || g > 128 || layout.d_in % g != 0) return s;
  const int64_t per_block = 4096 / g;
  s.threads = static_cast<int>(per_block < 32 ? 32 : (per_block > 128 ? 128 : per_block));
  s.shared_bytes = static_cast<size_t>(tiles) * s.threads * (g + 1) * sizeof(float);
  return s;
}

// w_hat [d_out, d_in] = ClippedFakeQuantGroup for every row o and group k of w [d_out, d_in], with
// gamma, beta [d_out, n_groups]; the layout's pointers are device memory. One thread per (o, k)
// runs the reference's own code (compiled without fused multiply-add), on the group's columns
// staged in shared memory (GroupView) where StagedGroupsOf applies, else on w itself:
// bit-identical to ref::ClippedFakeQuant<float> either way. w_hat may alias w: a block reads and
// writes only its own groups' columns, all reads before any write.
cudaError_t LaunchClippedFakeQuant(const ClipView& layout, const float* w, const float* gamma,
                                   const float* beta, float* w_hat, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
