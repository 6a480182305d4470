// The straight-through estimator's surrogate of the clipped fake quantizer, for the float64
// oracles of tests/engine/retrain: services/engine/retrain/clipped_quant.h defines the STE backward
// as the exact derivative of the forward with every rounding offset, the clamp mask and the branch
// frozen at a point. This writes that surrogate out independently of the implementation, so that
// central differences of it check the backward.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/quant_grid.h"
#include "services/engine/retrain/clipped_quant.h"

namespace qcal::engine {

// The STE's surrogate (clipped_quant.h): every rounding offset, the clamp mask and the branch
// frozen at (w0, γ0, β0), written out independently of the implementation. Smooth in (w, γ, β),
// equal to the forward at the point.
class FrozenSurrogate {
 public:
  FrozenSurrogate(const std::vector<double>& w0, const ClipLayout& l, const std::vector<double>& g0,
                  const std::vector<double>& b0)
      : l_(l) {
    const double maxq = (1 << l.spec.bits) - 1;
    const int64_t g = l.group_size();
    for (int64_t o = 0; o < l.d_out; ++o) {
      for (int64_t k = 0; k < l.n_groups(); ++k) {
        Group gr;
        for (int64_t p = k * g; p < std::min((k + 1) * g, l.d_in); ++p) {
          gr.cols.push_back(l.perm.empty() ? p : l.perm[p]);
        }
        const double* row = &w0[o * l.d_in];
        double xmin0 = 0, xmax0 = 0;
        if (l.has_grid()) {
          Span(l, o, k, &xmin0, &xmax0);
        } else {
          for (int64_t j : gr.cols) {
            if (row[j] < xmin0) xmin0 = row[j], gr.argmin = j;
            if (row[j] > xmax0) xmax0 = row[j], gr.argmax = j;
          }
        }
        const int64_t i = o * l.n_groups() + k;
        double xmin = xmin0 / (1 + std::exp(-b0[i])), xmax = xmax0 / (1 + std::exp(-g0[i]));
        double raw;  // the scale before fp16 rounding
        if (xmin == xmax) {
          gr.branch = 0;
          xmin = -1, xmax = 1;
        }
        if (l.spec.symmetric) {
          gr.use_min = -xmin > xmax;
          raw = 2 * (gr.use_min ? -xmin : xmax) / maxq;
          if (gr.branch != 0) gr.branch = 3;
          gr.z = 1 << (l.spec.bits - 1);
        } else {
          raw = (xmax - xmin) / maxq;
          double s = kernels::RoundScaleToHalf(raw);
          const double z_raw = -xmin / s;
          gr.z = kernels::RoundHalfEven(z_raw);
          gr.z_offset = gr.z - z_raw;
          if (gr.branch != 0) gr.branch = 1;
          if (gr.z == 0) {
            gr.z = 1;
            raw = xmax / (maxq - 1);
            if (gr.branch != 0) gr.branch = 2;
          }
        }
        const double s = kernels::RoundScaleToHalf(raw);
        gr.s_offset = s - raw;
        gr.s_const = s;
        for (int64_t j : gr.cols) {
          const double ratio = row[j] / s;
          const double code = kernels::RoundHalfEven(ratio) + gr.z;
          gr.offset.push_back(kernels::RoundHalfEven(ratio) - ratio);
          gr.clamped.push_back(code < 0 ? 0 : (code > maxq ? maxq : -1));
        }
        groups_.push_back(gr);
      }
    }
  }

  std::vector<double> operator()(const std::vector<double>& w, const std::vector<double>& gamma,
                                 const std::vector<double>& beta) const {
    const double maxq = (1 << l_.spec.bits) - 1;
    std::vector<double> out(w.size());
    for (int64_t o = 0; o < l_.d_out; ++o) {
      for (int64_t k = 0; k < l_.n_groups(); ++k) {
        const int64_t i = o * l_.n_groups() + k;
        const Group& gr = groups_[i];
        const double* row = &w[o * l_.d_in];
        double xmin0 = gr.argmin >= 0 ? row[gr.argmin] : 0;
        double xmax0 = gr.argmax >= 0 ? row[gr.argmax] : 0;
        if (l_.has_grid()) Span(l_, o, k, &xmin0, &xmax0);
        const double xmin = xmin0 / (1 + std::exp(-beta[i]));
        const double xmax = xmax0 / (1 + std::exp(-gamma[i]));
        double s = gr.s_const, z = gr.z;
        if (gr.branch == 1) {
          s = (xmax - xmin) / maxq + gr.s_offset;
          z = -xmin / s + gr.z_offset;
        } else if (gr.branch == 2) {
          s = xmax / (maxq - 1) + gr.s_offset;
        } else if (gr.branch == 3) {
          s = 2 * (gr.use_min ? -xmin : xmax) / maxq + gr.s_offset;
        }
        for (size_t c = 0; c < gr.cols.size(); ++c) {
          const int64_t j = gr.cols[c];
          const double code = gr.clamped[c] >= 0 ? gr.clamped[c] : row[j] / s + gr.offset[c] + z;
          out[o * l_.d_in + j] = s * (code - z);
        }
      }
    }
    return out;
  }

  // Codes outside 0..maxq before the clamp, over all groups.
  int64_t clamped_count() const {
    int64_t n = 0;
    for (const Group& g : groups_) {
      for (double c : g.clamped) n += c >= 0;
    }
    return n;
  }

 private:
  // The solver grid's span of group (o, k): [−z·s, (maxq − z)·s], symmetric ±maxq·s/2.
  static void Span(const ClipLayout& l, int64_t o, int64_t k, double* xmin0, double* xmax0) {
    const double maxq = (1 << l.spec.bits) - 1;
    const double s = l.grid_scales[k * l.d_out + o];
    if (l.spec.symmetric) {
      *xmax0 = maxq * s / 2;
      *xmin0 = -*xmax0;
    } else {
      const double z = l.grid_zeros[k * l.d_out + o];
      *xmin0 = -z * s;
      *xmax0 = (maxq - z) * s;
    }
  }

  struct Group {
    std::vector<int64_t> cols;
    int64_t argmin = -1, argmax = -1;
    int branch = -1;  // 0 empty range, 1 asymmetric, 2 z = 0 fallback, 3 symmetric
    bool use_min = false;
    double z = 0, z_offset = 0, s_offset = 0, s_const = 0;
    std::vector<double> offset;   // round(w/s) − w/s
    std::vector<double> clamped;  // the clamped code, or −1 inside the range
  };
  ClipLayout l_;
  std::vector<Group> groups_;
};

}  // namespace qcal::engine
