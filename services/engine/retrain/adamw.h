// AdamW (Loshchilov and Hutter), the optimizer of block retraining (DESIGN section 3,
// "Retraining"), as PyTorch's torch.optim.AdamW computes it. Engine-level host code, templated:
// T = float updates the trainer's fp32 master parameters, T = double is the oracles' hand step.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace qcal::engine {

struct AdamWOptions {
  // Learning rate, > 0. Default: 5e-4 (retrain.lr_lora's default).
  double lr = 5.0e-4;
  // Decay rates of the first and second moment estimates, in [0, 1). Defaults: 0.9, 0.999.
  double beta1 = 0.9;
  double beta2 = 0.999;
  // Added to the square root of the second moment, > 0. Default: 1e-8.
  double eps = 1.0e-8;
  // Decoupled weight decay, >= 0. Default: 0.1 (retrain.weight_decay's default).
  double weight_decay = 0.1;
  // OK when every field is finite and in range; otherwise InvalidArgument naming the field.
  absl::Status Validate() const;
};

// Step t (1-based) for n parameters p with gradients g and moments m, v (zero before step 1):
//   p ← p·(1 − lr·weight_decay)
//   m ← beta1·m + (1 − beta1)·g,   v ← beta2·v + (1 − beta2)·g²
//   p ← p − (lr / (1 − beta1^t))·m / (sqrt(v) / sqrt(1 − beta2^t) + eps)
// The scalar coefficients (1 − lr·weight_decay, the bias corrections) are computed in double and
// rounded to T once; every per-element operation is in T, in the order written.
template <typename T>
void AdamWStep(T* p, const T* g, T* m, T* v, int64_t n, int64_t t, const AdamWOptions& options);

}  // namespace qcal::engine
