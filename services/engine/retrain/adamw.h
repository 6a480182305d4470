// AdamW (Loshchilov and Hutter), the optimizer of block retraining (DESIGN section 3,
// "Retraining"), as PyTorch's torch.optim.AdamW computes it. Engine-level names for the kernels'
// definitions: the options are kernels::AdamWOptions (kernels/train_ops.h), the per-element
// update kernels::AdamWElement (kernels/train_math.h), and the host step the CPU reference
// kernels::ref::AdamWStep (kernels/cpu/train_ref.h; T = float updates fp32 parameters, T = double
// is the oracles' hand step). The trainer calls the backend op Backend::AdamWStep.
//
// Step t (1-based) for n parameters p with gradients g and moments m, v (zero before step 1):
//   p ← p·(1 − lr·weight_decay)
//   m ← beta1·m + (1 − beta1)·g,   v ← beta2·v + (1 − beta2)·g²
//   p ← p − (lr / (1 − beta1^t))·m / (sqrt(v) / sqrt(1 − beta2^t) + eps)
// The scalar coefficients (1 − lr·weight_decay, the bias corrections) are computed in double and
// rounded to T once; every per-element operation is in T, in the order written.
#pragma once

#include "kernels/cpu/train_ref.h"
#include "kernels/train_ops.h"

namespace qcal::engine {

using AdamWOptions = kernels::AdamWOptions;
using kernels::ref::AdamWStep;

}  // namespace qcal::engine
