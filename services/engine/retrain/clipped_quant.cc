#include "services/engine/retrain/clipped_quant.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/status.h"

namespace qcal::engine {
namespace {

using kernels::GroupParams;
using kernels::QuantSpec;
using kernels::RoundHalfEven;
using kernels::RoundScaleToHalf;

// Which rule of the grid fitted a group: the STE backward differentiates that rule.
enum class Branch {
  kDegenerate,    // clipped range empty: xmin = −1, xmax = 1, constant parameters
  kAsymmetric,    // s from (xmax − xmin), z = round(−xmin / s)
  kZeroFallback,  // z rounded to 0: z = 1, s from xmax alone
  kSymmetricMin,  // symmetric, a = −xmin
  kSymmetricMax,  // symmetric, a = xmax
};

// One group's fit with everything the backward needs. Columns are addressed through `col`.
template <typename T>
struct GroupFit {
  GroupParams p;
  Branch branch = Branch::kDegenerate;
  T xmin0 = 0, xmax0 = 0;  // unclipped range: min(min w, 0), max(max w, 0) or the grid's span
  T cmin = 1, cmax = 1;    // σ(β), σ(γ)
  int64_t argmin = -1;     // column attaining xmin0 (< 0), else −1
  int64_t argmax = -1;     // column attaining xmax0 (> 0), else −1
  T z_offset = 0;          // kAsymmetric: round(z_raw) − z_raw (the zero point's STE offset)
};

// The columns of group k of a row: position k·g + i in the (possibly permuted) order.
struct GroupColumns {
  const int32_t* perm;
  int64_t begin, end;  // positions
  int64_t operator[](int64_t pos) const { return perm ? perm[pos] : pos; }
};

GroupColumns ColumnsOf(const ClipLayout& layout, int64_t k) {
  const int64_t g = layout.group_size();
  return {layout.perm.empty() ? nullptr : layout.perm.data(), k * g,
          std::min((k + 1) * g, layout.d_in)};
}

// FitGroup (kernels/quant_grid.h) with the clip factors in T, recording the branch. The unclipped
// range is the group's min/max, or the span of the solver's grid (group k, row o) when the layout
// has one.
template <typename T>
GroupFit<T> Fit(const T* row, const GroupColumns& cols, const ClipLayout& layout, int64_t o,
                int64_t k, T gamma, T beta) {
  const QuantSpec& spec = layout.spec;
  GroupFit<T> f;
  if (layout.has_grid()) {
    const T s = static_cast<T>(layout.grid_scales[k * layout.d_out + o]);
    const T maxq = static_cast<T>(kernels::MaxCode(spec));
    if (spec.symmetric) {
      f.xmax0 = maxq * s / T(2);
      f.xmin0 = -f.xmax0;
    } else {
      const T z = static_cast<T>(layout.grid_zeros[k * layout.d_out + o]);
      f.xmin0 = -z * s;
      f.xmax0 = (maxq - z) * s;
    }
  } else {
    for (int64_t pos = cols.begin; pos < cols.end; ++pos) {
      const int64_t j = cols[pos];
      if (row[j] < f.xmin0) f.xmin0 = row[j], f.argmin = j;
      if (row[j] > f.xmax0) f.xmax0 = row[j], f.argmax = j;
    }
  }
  f.cmin = Sigmoid(beta);
  f.cmax = Sigmoid(gamma);
  T xmin = f.xmin0 * f.cmin, xmax = f.xmax0 * f.cmax;
  const bool degenerate = xmin == xmax;
  if (degenerate) xmin = T(-1), xmax = T(1);
  const int32_t maxq = kernels::MaxCode(spec);
  if (spec.symmetric) {
    const bool use_min = -xmin > xmax;
    f.p.scale = RoundScaleToHalf(T(2) * (use_min ? -xmin : xmax) / static_cast<T>(maxq));
    f.p.zero = 1 << (spec.bits - 1);
    f.branch = degenerate ? Branch::kDegenerate
                          : (use_min ? Branch::kSymmetricMin : Branch::kSymmetricMax);
    return f;
  }
  f.p.scale = RoundScaleToHalf((xmax - xmin) / static_cast<T>(maxq));
  const T z_raw = -xmin / static_cast<T>(f.p.scale);
  const T z = RoundHalfEven(z_raw);
  f.p.zero = z <= static_cast<T>(maxq) ? static_cast<int32_t>(z) : maxq;
  f.z_offset = static_cast<T>(f.p.zero) - z_raw;
  f.branch = degenerate ? Branch::kDegenerate : Branch::kAsymmetric;
  if (f.p.zero == 0) {
    f.p.zero = 1;
    f.p.scale = RoundScaleToHalf(xmax / static_cast<T>(maxq - 1));
    if (!degenerate) f.branch = Branch::kZeroFallback;
  }
  return f;
}

}  // namespace

absl::Status ClipLayout::Validate() const {
  QCAL_RETURN_IF_ERROR(kernels::ValidateQuantSpec(spec));
  if (spec.grid != kernels::GridKind::kUniform) {
    return absl::InvalidArgumentError("clipped quantization needs weights.grid uniform");
  }
  if (d_out < 1 || d_in < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("clipped quantization: shape [", d_out, ", ", d_in, "] is not positive"));
  }
  if (!perm.empty()) {
    if (static_cast<int64_t>(perm.size()) != d_in) {
      return absl::InvalidArgumentError(
          absl::StrCat("clipped quantization: perm has ", perm.size(), " entries, d_in is ", d_in));
    }
    std::vector<uint8_t> seen(static_cast<size_t>(d_in), 0);
    for (int32_t c : perm) {
      if (c < 0 || c >= d_in || seen[c]) {
        return absl::InvalidArgumentError(
            absl::StrCat("clipped quantization: perm is not a permutation of 0..", d_in - 1,
                         " (entry ", c, ")"));
      }
      seen[c] = 1;
    }
  }
  if (grid_scales.empty() != grid_zeros.empty()) {
    return absl::InvalidArgumentError("clipped quantization: grid scales and zeros go together");
  }
  if (has_grid()) {
    const size_t n = static_cast<size_t>(n_groups() * d_out);
    if (grid_scales.size() != n || grid_zeros.size() != n) {
      return absl::InvalidArgumentError(
          absl::StrCat("clipped quantization: the grid has ", grid_scales.size(), " scales and ",
                       grid_zeros.size(), " zeros, expected ", n, " ([n_groups, d_out])"));
    }
    const int32_t maxq = kernels::MaxCode(spec);
    for (size_t i = 0; i < n; ++i) {
      const float s = grid_scales[i];
      if (!(s >= kernels::kMinScale && std::isfinite(s)) || grid_zeros[i] < 0 ||
          grid_zeros[i] > maxq) {
        return absl::InvalidArgumentError(absl::StrCat("clipped quantization: grid group ",
                                                       i / d_out, " row ", i % d_out, " has scale ",
                                                       s, " and zero ", grid_zeros[i]));
      }
    }
  }
  return absl::OkStatus();
}

template <typename T>
T Sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
void ClippedFakeQuant(const T* w, const ClipLayout& layout, const T* gamma, const T* beta,
                      T* w_hat) {
  const int64_t n_groups = layout.n_groups();
  // Rows are independent: each is computed start to finish by one thread.
  ParallelFor(layout.d_out, layout.d_in, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* row = w + o * layout.d_in;
      T* out = w_hat + o * layout.d_in;
      for (int64_t k = 0; k < n_groups; ++k) {
        const GroupColumns cols = ColumnsOf(layout, k);
        const int64_t i = o * n_groups + k;
        const GroupFit<T> f = Fit(row, cols, layout, o, k, gamma[i], beta[i]);
        for (int64_t pos = cols.begin; pos < cols.end; ++pos) {
          const int64_t j = cols[pos];
          out[j] = kernels::Dequantize<T>(kernels::QuantizeCode(row[j], f.p, layout.spec), f.p,
                                          layout.spec);
        }
      }
    }
  });
}

template <typename T>
void ClippedFakeQuantBackward(const T* w, const ClipLayout& layout, const T* gamma, const T* beta,
                              const T* d_w_hat, T* d_gamma, T* d_beta, T* d_w) {
  const int64_t n_groups = layout.n_groups();
  const T maxq = static_cast<T>(kernels::MaxCode(layout.spec));
  // Rows are independent: each is computed start to finish by one thread.
  ParallelFor(layout.d_out, layout.d_in, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* row = w + o * layout.d_in;
      const T* dy = d_w_hat + o * layout.d_in;
      T* dw = d_w ? d_w + o * layout.d_in : nullptr;
      for (int64_t k = 0; k < n_groups; ++k) {
        const GroupColumns cols = ColumnsOf(layout, k);
        const int64_t i = o * n_groups + k;
        const GroupFit<T> f = Fit(row, cols, layout, o, k, gamma[i], beta[i]);
        const T s = static_cast<T>(f.p.scale), z = static_cast<T>(f.p.zero);
        // ∂ŵ/∂s summed over the group (gs), and the clamped weights' direct ∂ŵ/∂xmin (g_xmin).
        T gs = 0, g_xmin = 0, g_xmax = 0;
        for (int64_t pos = cols.begin; pos < cols.end; ++pos) {
          const int64_t j = cols[pos];
          const T ratio = row[j] / s;
          const T rounded = RoundHalfEven(ratio);
          const T code = rounded + z;
          const bool inside = code >= T(0) && code <= maxq;
          if (inside) {
            gs += dy[j] * (rounded - ratio);
            if (dw) dw[j] = dy[j];
          } else {
            const T clamped = code < T(0) ? T(0) : maxq;
            if (f.branch == Branch::kAsymmetric) {
              gs += dy[j] * (clamped - f.z_offset);
              g_xmin += dy[j];
            } else {
              gs += dy[j] * (clamped - z);
            }
            if (dw) dw[j] = 0;
          }
        }
        // The scale's dependence on the clipped range (the fp16 rounding passes gradients as is).
        switch (f.branch) {
          case Branch::kDegenerate:
            g_xmin = 0;
            break;
          case Branch::kAsymmetric:
            g_xmax += gs / maxq;
            g_xmin -= gs / maxq;
            break;
          case Branch::kZeroFallback:
            g_xmax += gs / (maxq - T(1));
            break;
          case Branch::kSymmetricMin:
            g_xmin -= T(2) * gs / maxq;
            break;
          case Branch::kSymmetricMax:
            g_xmax += T(2) * gs / maxq;
            break;
        }
        d_gamma[i] = g_xmax * f.xmax0 * f.cmax * (T(1) - f.cmax);
        d_beta[i] = g_xmin * f.xmin0 * f.cmin * (T(1) - f.cmin);
        if (dw) {
          if (f.argmax >= 0) dw[f.argmax] += g_xmax * f.cmax;
          if (f.argmin >= 0) dw[f.argmin] += g_xmin * f.cmin;
        }
      }
    }
  });
}

absl::StatusOr<kernels::QuantizedLinear> QuantizeClipped(const float* w, const ClipLayout& layout,
                                                         const float* gamma, const float* beta) {
  QCAL_RETURN_IF_ERROR(layout.Validate());
  const int64_t n_groups = layout.n_groups(), g = layout.group_size();
  for (int64_t i = 0; i < layout.num_logits(); ++i) {
    if (!std::isfinite(gamma[i]) || !std::isfinite(beta[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("clipping logit [", i / n_groups, ", ", i % n_groups, "] is not finite"));
    }
  }
  kernels::QuantizedLinear q;
  q.d_out = layout.d_out;
  q.d_in = layout.d_in;
  q.spec = layout.spec;
  q.group_size = g;
  q.n_groups = n_groups;
  q.codes.resize(static_cast<size_t>(layout.d_out * layout.d_in));
  q.scales.resize(static_cast<size_t>(n_groups * layout.d_out));
  q.zeros.resize(q.scales.size());
  q.perm = layout.perm;
  q.g_idx.resize(static_cast<size_t>(layout.d_in));
  for (int64_t pos = 0; pos < layout.d_in; ++pos) {
    q.g_idx[layout.perm.empty() ? pos : layout.perm[pos]] = static_cast<int32_t>(pos / g);
  }
  for (int64_t o = 0; o < layout.d_out; ++o) {
    const float* row = w + o * layout.d_in;
    for (int64_t j = 0; j < layout.d_in; ++j) {
      if (!std::isfinite(row[j])) {
        return absl::InvalidArgumentError(
            absl::StrCat("clipped quantization: weight [", o, ", ", j, "] is not finite"));
      }
    }
    for (int64_t k = 0; k < n_groups; ++k) {
      const GroupColumns cols = ColumnsOf(layout, k);
      const int64_t i = o * n_groups + k;
      const GroupFit<float> f = Fit(row, cols, layout, o, k, gamma[i], beta[i]);
      if (!std::isfinite(f.p.scale)) {
        return absl::InvalidArgumentError(absl::StrCat("clipped quantization: the range of row ", o,
                                                       " group ", k, " overflows an fp16 scale"));
      }
      q.scales[k * layout.d_out + o] = f.p.scale;
      q.zeros[k * layout.d_out + o] = f.p.zero;
      for (int64_t pos = cols.begin; pos < cols.end; ++pos) {
        const int64_t j = cols[pos];
        q.codes[o * layout.d_in + j] = kernels::QuantizeCode(row[j], f.p, layout.spec);
      }
    }
  }
  return q;
}

template float Sigmoid<float>(float);
template double Sigmoid<double>(double);
template void ClippedFakeQuant<float>(const float*, const ClipLayout&, const float*, const float*,
                                      float*);
template void ClippedFakeQuant<double>(const double*, const ClipLayout&, const double*,
                                       const double*, double*);
template void ClippedFakeQuantBackward<float>(const float*, const ClipLayout&, const float*,
                                              const float*, const float*, float*, float*, float*);
template void ClippedFakeQuantBackward<double>(const double*, const ClipLayout&, const double*,
                                               const double*, const double*, double*, double*,
                                               double*);

}  // namespace qcal::engine
