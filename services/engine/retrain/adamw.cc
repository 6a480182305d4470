#include "services/engine/retrain/adamw.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"

namespace qcal::engine {

absl::Status AdamWOptions::Validate() const {
  if (!(lr > 0 && std::isfinite(lr))) {
    return absl::InvalidArgumentError(absl::StrCat("AdamW lr must be finite and > 0, got ", lr));
  }
  if (!(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdamW betas must be in [0, 1), got ", beta1, " and ", beta2));
  }
  if (!(eps > 0 && std::isfinite(eps))) {
    return absl::InvalidArgumentError(absl::StrCat("AdamW eps must be finite and > 0, got ", eps));
  }
  if (!(weight_decay >= 0 && std::isfinite(weight_decay))) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdamW weight_decay must be finite and >= 0, got ", weight_decay));
  }
  return absl::OkStatus();
}

template <typename T>
void AdamWStep(T* p, const T* g, T* m, T* v, int64_t n, int64_t t, const AdamWOptions& o) {
  const T decay = static_cast<T>(1.0 - o.lr * o.weight_decay);
  const T b1 = static_cast<T>(o.beta1), b2 = static_cast<T>(o.beta2);
  const T one_minus_b1 = static_cast<T>(1.0 - o.beta1),
          one_minus_b2 = static_cast<T>(1.0 - o.beta2);
  const double t_d = static_cast<double>(t);
  const T step_size = static_cast<T>(o.lr / (1.0 - std::pow(o.beta1, t_d)));
  const T bias2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(o.beta2, t_d)));
  const T eps = static_cast<T>(o.eps);
  // Elements are independent: the split over threads does not change any bit.
  ParallelFor(n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      p[i] *= decay;
      m[i] = b1 * m[i] + one_minus_b1 * g[i];
      v[i] = b2 * v[i] + one_minus_b2 * g[i] * g[i];
      p[i] -= step_size * m[i] / (std::sqrt(v[i]) / bias2_sqrt + eps);
    }
  });
}

template void AdamWStep<float>(float*, const float*, float*, float*, int64_t, int64_t,
                               const AdamWOptions&);
template void AdamWStep<double>(double*, const double*, double*, double*, int64_t, int64_t,
                                const AdamWOptions&);

}  // namespace qcal::engine
