// Numeric comparisons shared by tests.
#pragma once

#include <cmath>
#include <vector>

namespace qcal::testing {

// ‖got − want‖ / ‖want‖ (Frobenius, in double) for vectors of the same length.
inline double RelativeError(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

}  // namespace qcal::testing
