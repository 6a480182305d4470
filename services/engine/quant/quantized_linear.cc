#include "services/engine/quant/quantized_linear.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "services/engine/quant/quant_internal.h"

namespace qcal::engine {

std::vector<float> QuantizedLinear::Dequantized() const {
  std::vector<float> out(static_cast<size_t>(d_out * d_in));
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j = 0; j < d_in; ++j) {
      const int64_t k = g_idx[j] * d_out + o;
      const GroupParams p{scales[k], zeros[k]};
      out[o * d_in + j] = kernels::Dequantize<float>(codes[o * d_in + j], p, spec);
    }
  }
  return out;
}

namespace internal {

absl::StatusOr<QuantizedLinear> NewQuantizedLinear(int64_t d_out, int64_t d_in,
                                                   const QuantSpec& spec) {
  QCAL_RETURN_IF_ERROR(ValidateQuantSpec(spec));
  if (d_out <= 0 || d_in <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight shape must be positive, got [", d_out, ", ", d_in, "]"));
  }
  QuantizedLinear q;
  q.d_out = d_out;
  q.d_in = d_in;
  q.spec = spec;
  q.group_size = kernels::EffectiveGroupSize(spec, d_in);
  q.n_groups = kernels::NumGroups(spec, d_in);
  q.codes.assign(static_cast<size_t>(d_out * d_in), 0);
  q.scales.assign(static_cast<size_t>(q.n_groups * d_out), 0.0f);
  q.zeros.assign(static_cast<size_t>(q.n_groups * d_out), 0);
  q.g_idx.resize(static_cast<size_t>(d_in));
  for (int64_t j = 0; j < d_in; ++j) q.g_idx[j] = static_cast<int32_t>(j / q.group_size);
  return q;
}

template <typename T>
absl::Status CheckFinite(const T* values, int64_t rows, int64_t cols, const char* what) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const T v = values[r * cols + c];
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, "[", r, ", ", c, "] is ", static_cast<double>(v), " (not finite)"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ScaleOverflowError(int64_t row, int64_t group) {
  return absl::InvalidArgumentError(
      absl::StrCat("weight row ", row, ", group ", group,
                   ": value range too large for an fp16 scale (max 65504)"));
}

template absl::Status CheckFinite<float>(const float*, int64_t, int64_t, const char*);
template absl::Status CheckFinite<double>(const double*, int64_t, int64_t, const char*);

}  // namespace internal

template <typename T>
absl::StatusOr<QuantizedLinear> QuantizeRtn(const T* w, int64_t d_out, int64_t d_in,
                                            const QuantSpec& spec) {
  QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, internal::NewQuantizedLinear(d_out, d_in, spec));
  QCAL_RETURN_IF_ERROR(internal::CheckFinite(w, d_out, d_in, "weight"));
  const int64_t g = q.group_size;
  // Rows are independent and each is handled by one thread start to finish: the result does not
  // depend on the thread count. Overflow is recorded per row and reported for the first row.
  std::vector<int64_t> overflow_group(static_cast<size_t>(d_out), -1);
  ParallelFor(d_out, d_in, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* row = w + o * d_in;
      for (int64_t k = 0; k < q.n_groups; ++k) {
        const int64_t j0 = k * g, j1 = std::min(j0 + g, d_in);
        const GroupParams p = kernels::FitGroup(row + j0, j1 - j0, 1, spec);
        if (!std::isfinite(p.scale) && overflow_group[o] < 0) overflow_group[o] = k;
        q.scales[k * d_out + o] = p.scale;
        q.zeros[k * d_out + o] = p.zero;
        for (int64_t j = j0; j < j1; ++j)
          q.codes[o * d_in + j] = kernels::QuantizeCode(row[j], p, spec);
      }
    }
  });
  for (int64_t o = 0; o < d_out; ++o) {
    if (overflow_group[o] >= 0) return internal::ScaleOverflowError(o, overflow_group[o]);
  }
  return q;
}

template absl::StatusOr<QuantizedLinear> QuantizeRtn<float>(const float*, int64_t, int64_t,
                                                            const QuantSpec&);
template absl::StatusOr<QuantizedLinear> QuantizeRtn<double>(const double*, int64_t, int64_t,
                                                             const QuantSpec&);

double OutputError(const float* w, const float* w_hat, const float* gram, int64_t d_out,
                   int64_t d_in) {
  if (d_out <= 0 || d_in <= 0) return 0.0;
  // G mirrored from its upper triangle, in double.
  std::vector<double> g(static_cast<size_t>(d_in * d_in));
  for (int64_t a = 0; a < d_in; ++a) {
    for (int64_t b = a; b < d_in; ++b) g[a * d_in + b] = g[b * d_in + a] = gram[a * d_in + b];
  }
  // trace(E G E^T) = sum over rows o of e_o G e_o^T, with E G formed for a chunk of rows at a time.
  constexpr int64_t kRowChunk = 64;
  std::vector<double> e(static_cast<size_t>(kRowChunk * d_in));
  std::vector<double> eg(static_cast<size_t>(kRowChunk * d_in));
  double total = 0;
  for (int64_t o0 = 0; o0 < d_out; o0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, d_out - o0);
    for (int64_t i = 0; i < rows * d_in; ++i) {
      e[i] = static_cast<double>(w[o0 * d_in + i]) - static_cast<double>(w_hat[o0 * d_in + i]);
    }
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                static_cast<int>(d_in), static_cast<int>(d_in), 1.0, e.data(),
                static_cast<int>(d_in), g.data(), static_cast<int>(d_in), 0.0, eg.data(),
                static_cast<int>(d_in));
    for (int64_t i = 0; i < rows * d_in; ++i) total += e[i] * eg[i];
  }
  // A Gram matrix is PSD; rounding can leave a tiny negative sum for a (near-)zero error.
  return std::sqrt(std::max(total, 0.0));
}

}  // namespace qcal::engine
