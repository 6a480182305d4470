#include "kernels/cpu/train_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/status.h"
#include "kernels/quant_ops.h"

namespace qcal::kernels {

absl::Status ClipLayout::Validate() const {
  QCAL_RETURN_IF_ERROR(ValidateQuantSpec(spec));
  if (spec.grid != GridKind::kUniform) {
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
    const int32_t maxq = MaxCode(spec);
    for (size_t i = 0; i < n; ++i) {
      const float s = grid_scales[i];
      if (!(s >= kMinScale && std::isfinite(s)) || grid_zeros[i] < 0 || grid_zeros[i] > maxq) {
        return absl::InvalidArgumentError(absl::StrCat("clipped quantization: grid group ",
                                                       i / d_out, " row ", i % d_out, " has scale ",
                                                       s, " and zero ", grid_zeros[i]));
      }
    }
  }
  return absl::OkStatus();
}

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

absl::Status CheckTrainOperand(const Tensor& t, DType dtype, const Shape& shape, Device device,
                               const char* op, const char* what) {
  if (!t.defined() || t.dtype() != dtype || t.device() != device || t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": ", what, " is ", t.defined() ? t.DebugString() : std::string("undefined"),
        ", expected ", DTypeName(dtype), " ", ShapeString(shape), " on the ",
        device == Device::kHost ? "host" : "device"));
  }
  return absl::OkStatus();
}

absl::Status CheckClipOperands(const ClipTensors& layout, const Tensor& w, const Tensor& gamma,
                               const Tensor& beta, Device device, const char* op) {
  QCAL_RETURN_IF_ERROR(ValidateQuantSpec(layout.spec));
  if (layout.spec.grid != GridKind::kUniform) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": clipping needs the uniform grid"));
  }
  if (layout.d_out < 1 || layout.d_in < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape [", layout.d_out, ", ", layout.d_in, "] is not positive"));
  }
  const Shape logits = {layout.d_out, layout.n_groups()};
  const Shape grid = {layout.n_groups(), layout.d_out};
  QCAL_RETURN_IF_ERROR(
      CheckTrainOperand(w, DType::kF32, {layout.d_out, layout.d_in}, device, op, "w"));
  QCAL_RETURN_IF_ERROR(CheckTrainOperand(gamma, DType::kF32, logits, device, op, "gamma"));
  QCAL_RETURN_IF_ERROR(CheckTrainOperand(beta, DType::kF32, logits, device, op, "beta"));
  if (layout.perm.defined()) {
    QCAL_RETURN_IF_ERROR(
        CheckTrainOperand(layout.perm, DType::kI32, {layout.d_in}, device, op, "perm"));
  }
  if (layout.grid_scales.defined() != layout.grid_zeros.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": grid scales and zeros go together"));
  }
  if (layout.grid_scales.defined()) {
    QCAL_RETURN_IF_ERROR(
        CheckTrainOperand(layout.grid_scales, DType::kF32, grid, device, op, "grid_scales"));
    QCAL_RETURN_IF_ERROR(
        CheckTrainOperand(layout.grid_zeros, DType::kI32, grid, device, op, "grid_zeros"));
  }
  return absl::OkStatus();
}

absl::Status CheckClipBackwardOperands(const ClipTensors& layout, const Tensor& w,
                                       const Tensor& gamma, const Tensor& beta,
                                       const Tensor& d_w_hat, const Tensor& d_gamma,
                                       const Tensor& d_beta, const Tensor* d_w, Device device,
                                       const char* op) {
  QCAL_RETURN_IF_ERROR(CheckClipOperands(layout, w, gamma, beta, device, op));
  QCAL_RETURN_IF_ERROR(CheckTrainOperand(d_w_hat, DType::kF32, w.shape(), device, op, "d_w_hat"));
  QCAL_RETURN_IF_ERROR(
      CheckTrainOperand(d_gamma, DType::kF32, gamma.shape(), device, op, "d_gamma"));
  QCAL_RETURN_IF_ERROR(CheckTrainOperand(d_beta, DType::kF32, gamma.shape(), device, op, "d_beta"));
  if (d_w) QCAL_RETURN_IF_ERROR(CheckTrainOperand(*d_w, DType::kF32, w.shape(), device, op, "d_w"));
  return absl::OkStatus();
}

namespace ref {

template <typename T>
void ClippedFakeQuant(const T* w, const ClipView& layout, const T* gamma, const T* beta, T* w_hat) {
  const int64_t n_groups = layout.n_groups();
  ParallelFor(layout.d_out, layout.d_in, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t k = 0; k < n_groups; ++k) {
        const int64_t i = o * n_groups + k;
        ClippedFakeQuantGroup(w + o * layout.d_in, layout, o, k, gamma[i], beta[i],
                              w_hat + o * layout.d_in);
      }
    }
  });
}

template <typename T>
void ClippedFakeQuantBackward(const T* w, const ClipView& layout, const T* gamma, const T* beta,
                              const T* d_w_hat, T* d_gamma, T* d_beta, T* d_w) {
  const int64_t n_groups = layout.n_groups();
  ParallelFor(layout.d_out, layout.d_in, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t k = 0; k < n_groups; ++k) {
        const int64_t i = o * n_groups + k;
        ClippedFakeQuantBackwardGroup(w + o * layout.d_in, layout, o, k, gamma[i], beta[i],
                                      d_w_hat + o * layout.d_in, d_gamma + i, d_beta + i,
                                      d_w ? d_w + o * layout.d_in : nullptr);
      }
    }
  });
}

absl::StatusOr<QuantizedLinear> QuantizeClipped(const float* w, const ClipLayout& layout,
                                                const float* gamma, const float* beta) {
  QCAL_RETURN_IF_ERROR(layout.Validate());
  const ClipView view = layout.view();
  const int64_t n_groups = layout.n_groups(), g = layout.group_size();
  for (int64_t i = 0; i < layout.num_logits(); ++i) {
    if (!std::isfinite(gamma[i]) || !std::isfinite(beta[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("clipping logit [", i / n_groups, ", ", i % n_groups, "] is not finite"));
    }
  }
  QuantizedLinear q;
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
    q.g_idx[view.column(pos)] = static_cast<int32_t>(pos / g);
  }
  // Rows are independent and each writes only its own codes, scales and zeros: split over threads,
  // the same bits. A row's error is kept and the first row's is returned.
  std::vector<absl::Status> row_status(static_cast<size_t>(layout.d_out));
  auto quantize_row = [&](int64_t o) -> absl::Status {
    const float* row = w + o * layout.d_in;
    for (int64_t j = 0; j < layout.d_in; ++j) {
      if (!std::isfinite(row[j])) {
        return absl::InvalidArgumentError(
            absl::StrCat("clipped quantization: weight [", o, ", ", j, "] is not finite"));
      }
    }
    for (int64_t k = 0; k < n_groups; ++k) {
      const int64_t i = o * n_groups + k;
      const ClipGroupFit<float> f = FitClippedGroup(row, view, o, k, gamma[i], beta[i]);
      if (!std::isfinite(f.p.scale)) {
        return absl::InvalidArgumentError(absl::StrCat("clipped quantization: the range of row ", o,
                                                       " group ", k, " overflows an fp16 scale"));
      }
      q.scales[k * layout.d_out + o] = f.p.scale;
      q.zeros[k * layout.d_out + o] = f.p.zero;
      for (int64_t pos = k * g; pos < std::min((k + 1) * g, layout.d_in); ++pos) {
        const int64_t j = view.column(pos);
        q.codes[o * layout.d_in + j] = QuantizeCode(row[j], f.p, layout.spec);
      }
    }
    return absl::OkStatus();
  };
  ParallelFor(layout.d_out, 4 * layout.d_in, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) row_status[static_cast<size_t>(o)] = quantize_row(o);
  });
  for (const absl::Status& status : row_status) QCAL_RETURN_IF_ERROR(status);
  return q;
}

template <typename T>
void AdamWStep(T* p, const T* g, T* m, T* v, int64_t n, int64_t t, const AdamWOptions& options) {
  const AdamWCoefficients<T> c = AdamWCoefficientsOf<T>(options, t);
  // Elements are independent: the split over threads does not change any bit.
  ParallelFor(n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) AdamWElement(p[i], g[i], m[i], v[i], c);
  });
}

double SquaredError(const float* y, const float* t, int64_t n, float scale, float* dy) {
  double sum = 0;
  for (int64_t e = 0; e < n; ++e) {
    const double d = static_cast<double>(y[e]) - static_cast<double>(t[e]);
    sum += d * d;
  }
  if (dy) {
    for (int64_t e = 0; e < n; ++e) dy[e] = scale * (y[e] - t[e]);
  }
  return sum;
}

double WeightedSquaredError(const float* x, const float* r, const float* f, int64_t rows,
                            int64_t width, float scale, float* g1, float* g2, double total) {
  // Per-row sums, added in row order: the total does not depend on the thread count.
  std::vector<double> row_sums(static_cast<size_t>(rows), 0.0);
  ParallelFor(rows, width, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      double sum = 0;
      for (int64_t e = o * width; e < (o + 1) * width; ++e) {
        const float d = x[e] - r[e];
        const float fe = f ? f[e] : 1.0f;
        sum += static_cast<double>(fe) * static_cast<double>(d) * static_cast<double>(d);
        const float g = scale * fe * d;
        if (g1) g1[e] += g;
        if (g2) g2[e] += g;
      }
      row_sums[o] = sum;
    }
  });
  for (double s : row_sums) total += s;
  return total;
}

template void ClippedFakeQuant<float>(const float*, const ClipView&, const float*, const float*,
                                      float*);
template void ClippedFakeQuant<double>(const double*, const ClipView&, const double*, const double*,
                                       double*);
template void ClippedFakeQuantBackward<float>(const float*, const ClipView&, const float*,
                                              const float*, const float*, float*, float*, float*);
template void ClippedFakeQuantBackward<double>(const double*, const ClipView&, const double*,
                                               const double*, const double*, double*, double*,
                                               double*);
template void AdamWStep<float>(float*, const float*, float*, float*, int64_t, int64_t,
                               const AdamWOptions&);
template void AdamWStep<double>(double*, const double*, double*, double*, int64_t, int64_t,
                                const AdamWOptions&);

}  // namespace ref
}  // namespace qcal::kernels
