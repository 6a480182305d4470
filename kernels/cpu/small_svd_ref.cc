#include "kernels/cpu/small_svd_ref.h"

#include <cmath>

#include "kernels/small_svd.h"

namespace qcal::kernels::ref {
namespace {

// Σ x_i·y_i over i < k in the lanes' order (kernels/small_svd.h).
double LaneSum(const double* x, const double* y, int64_t k) {
  double partial[kSmallSvdLanes];
  for (int l = 0; l < kSmallSvdLanes; ++l) {
    double acc = 0;
    for (int64_t i = l; i < k; i += kSmallSvdLanes) acc += x[i] * y[i];
    partial[l] = acc;
  }
  for (int h = kSmallSvdLanes / 2; h >= 1; h /= 2) {
    for (int l = 0; l < h; ++l) partial[l] += partial[l + h];
  }
  return partial[0];
}

}  // namespace

SmallSvdResult SmallSvd(const std::vector<double>& a_in, int64_t k) {
  // x = aᵀ (column-major) is rotated; j accumulates the rotations.
  std::vector<double> a(static_cast<size_t>(k * k)), v(static_cast<size_t>(k * k), 0.0);
  for (int64_t c = 0; c < k; ++c) {
    for (int64_t r = 0; r < k; ++r) a[c * k + r] = a_in[r * k + c];
  }
  for (int64_t j = 0; j < k; ++j) v[j * k + j] = 1.0;
  double frobenius_sq = 0;
  for (int64_t j = 0; j < k; ++j) frobenius_sq += LaneSum(a.data() + j * k, a.data() + j * k, k);
  const double negligible = SmallSvdNegligible(k, frobenius_sq);
  const int kk = static_cast<int>(k + (k & 1));
  SmallSvdResult result;
  while (!result.converged && result.sweeps < kSmallSvdMaxSweeps) {
    ++result.sweeps;
    bool rotated = false;
    for (int round = 0; round < kk - 1; ++round) {
      for (int i = 0; i < kk / 2; ++i) {
        const int64_t p = SmallSvdSlotColumn(i, round, kk);
        const int64_t q = SmallSvdSlotColumn(kk - 1 - i, round, kk);
        if (p >= k || q >= k) continue;
        double* ap = a.data() + p * k;
        double* aq = a.data() + q * k;
        double c = 0, s = 0;
        if (!SmallSvdRotation(LaneSum(ap, ap, k), LaneSum(aq, aq, k), LaneSum(ap, aq, k),
                              negligible, &c, &s)) {
          continue;
        }
        rotated = true;
        double* vp = v.data() + p * k;
        double* vq = v.data() + q * k;
        for (int64_t r = 0; r < k; ++r) {
          SmallSvdRotate(c, s, &ap[r], &aq[r]);
          SmallSvdRotate(c, s, &vp[r], &vq[r]);
        }
      }
    }
    result.converged = !rotated;
  }
  std::vector<double> norms(static_cast<size_t>(k));
  result.finite = true;
  for (int64_t j = 0; j < k; ++j) {
    norms[j] = std::sqrt(LaneSum(a.data() + j * k, a.data() + j * k, k));
    result.finite = result.finite && std::isfinite(norms[j]);
  }
  result.u.assign(static_cast<size_t>(k * k), 0.0);
  result.v.assign(static_cast<size_t>(k * k), 0.0);
  result.sigma.assign(static_cast<size_t>(k), 0.0);
  for (int64_t j = 0; j < k; ++j) {
    int64_t rank = 0;
    for (int64_t i = 0; i < k; ++i) {
      rank += norms[i] > norms[j] || (norms[i] == norms[j] && i < j);
    }
    result.sigma[rank] = norms[j];
    for (int64_t r = 0; r < k; ++r) {
      result.u[rank * k + r] = v[j * k + r];
      result.v[rank * k + r] = norms[j] > 0 ? a[j * k + r] / norms[j] : 0.0;
    }
  }
  return result;
}

}  // namespace qcal::kernels::ref
