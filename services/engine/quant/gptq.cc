#include "services/engine/quant/gptq.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <numeric>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/status.h"
#include "services/engine/quant/quant_internal.h"

namespace qcal::engine {
namespace {

// LAPACK and BLAS in the solver's precision. The row-major symmetric buffers are handed to LAPACK
// as column-major lower triangles, which is the same memory as the row-major upper triangle: no
// transposed copies (LAPACKE's row-major entry points would make one, d_in^2 extra elements).
lapack_int PotrfLower(float* a, lapack_int n) {
  return LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', n, a, n);
}
lapack_int PotrfLower(double* a, lapack_int n) {
  return LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', n, a, n);
}
lapack_int PotriLower(float* a, lapack_int n) {
  return LAPACKE_spotri(LAPACK_COL_MAJOR, 'L', n, a, n);
}
lapack_int PotriLower(double* a, lapack_int n) {
  return LAPACKE_dpotri(LAPACK_COL_MAJOR, 'L', n, a, n);
}

// c[m][n] -= a[m][k] b[k][n], row-major with leading dimensions lda, ldb, ldc.
void GemmSubtract(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
                  int ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, -1.0f, a, lda, b, ldb, 1.0f, c,
              ldc);
}
void GemmSubtract(int m, int n, int k, const double* a, int lda, const double* b, int ldb,
                  double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, -1.0, a, lda, b, ldb, 1.0, c,
              ldc);
}

// The upper triangle (row-major) of the damped H in visiting order: removed columns get the
// identity's row and column, damp_add is added to the diagonal. The strict lower triangle is left
// untouched (LAPACK never reads or writes it either).
template <typename T>
void BuildHessian(const T* h, int64_t n, const std::vector<int32_t>& perm,
                  const std::vector<uint8_t>& removed, T damp_add, T* out) {
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = perm[a];
    for (int64_t b = a; b < n; ++b) {
      const int64_t j = perm[b];
      T v;
      if (removed[i] || removed[j]) {
        v = a == b ? T(1) : T(0);
      } else {
        v = i <= j ? h[i * n + j] : h[j * n + i];
      }
      out[a * n + b] = a == b ? v + damp_add : v;
    }
  }
}

// Replaces the damped H (row-major upper triangle of a) by U, the upper Cholesky factor of H^-1
// (U^T U = H^-1), in a's row-major upper triangle. False when a factorization fails.
template <typename T>
bool InverseCholeskyUpper(T* a, lapack_int n) {
  // Column-major view: L L^T = H, then H^-1 from L, then L2 L2^T = H^-1; L2 read row-major is U.
  return PotrfLower(a, n) == 0 && PotriLower(a, n) == 0 && PotrfLower(a, n) == 0;
}

// Per row: the first failure seen in the column loop, reported after the block for the lowest row
// so that the message does not depend on thread scheduling.
struct RowFailure {
  enum Kind : uint8_t { kNone, kScaleOverflow, kNonFiniteError } kind = kNone;
  int64_t where = 0;  // group index (kScaleOverflow) or original column (kNonFiniteError)
};

}  // namespace

absl::Status GptqOptions::Validate() const {
  if (!std::isfinite(damp) || damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("gptq.damp must be >= 0, got ", damp));
  }
  if (block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gptq.block_size must be >= 1, got ", block_size));
  }
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<QuantizedLinear> QuantizeGptq(const T* w, const T* h, int64_t d_out, int64_t d_in,
                                             const QuantSpec& spec, const GptqOptions& options,
                                             GptqStats* stats) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, internal::NewQuantizedLinear(d_out, d_in, spec));
  if (d_out > INT_MAX || d_in > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight shape [", d_out, ", ", d_in, "] exceeds the BLAS index range"));
  }
  QCAL_RETURN_IF_ERROR(internal::CheckFinite(w, d_out, d_in, "weight"));
  const int64_t n = d_in;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) {
      if (!std::isfinite(h[i * n + j])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "hessian[", i, ", ", j, "] is ", static_cast<double>(h[i * n + j]), " (not finite)"));
      }
    }
  }

  // 1. Dead and outlier columns.
  GptqStats st;
  std::vector<uint8_t> removed(static_cast<size_t>(n), 0);
  for (int64_t j = 0; j < n; ++j) {
    if (h[j * n + j] == T(0)) {
      removed[j] = 1;
      ++st.dead_columns;
    }
  }
  for (int32_t c : options.outlier_columns) {
    if (c < 0 || c >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("outlier column ", c, " is out of range [0, ", n, ")"));
    }
    if (!removed[c]) {
      removed[c] = 1;
      ++st.outlier_columns;
    }
  }
  auto diag = [&](int64_t j) { return removed[j] ? T(1) : h[j * n + j]; };

  // 2. Visiting order.
  std::vector<int32_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  if (options.act_order) {
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int32_t a, int32_t b) { return diag(a) > diag(b); });
  }

  // 3-4. Damping and U, retrying with more damping when H is not positive definite enough.
  double diag_sum = 0;
  for (int64_t j = 0; j < n; ++j) diag_sum += static_cast<double>(diag(j));
  const double diag_mean = diag_sum / static_cast<double>(n);
  std::vector<T> u(static_cast<size_t>(n * n), T(0));
  double lambda = options.damp;
  bool factored = false;
  for (int attempt = 0; attempt < 3 && !factored; ++attempt) {
    if (attempt > 0) {
      if (options.damp == 0) break;
      lambda *= 10;
    }
    st.damp_used = lambda;
    BuildHessian(h, n, perm, removed, static_cast<T>(lambda * diag_mean), u.data());
    factored = InverseCholeskyUpper(u.data(), static_cast<lapack_int>(n));
    if (!factored) ++st.cholesky_failures;
  }
  if (stats) *stats = st;
  if (!factored) {
    return absl::FailedPreconditionError(absl::StrCat(
        "GPTQ: the Hessian [", n, " x ", n, "] is not positive definite even with damping ",
        st.damp_used, " (gptq.damp = ", options.damp,
        "); more calibration data or a larger gptq.damp may help"));
  }

  // 5. The column loop, in visiting order, on a working copy of W with removed columns zeroed.
  std::vector<T> wp(static_cast<size_t>(d_out * n));
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t p = 0; p < n; ++p) {
      const int64_t j = perm[p];
      wp[o * n + p] = removed[j] ? T(0) : w[o * n + j];
    }
  }
  const int64_t g = q.group_size;
  const int64_t bs = options.block_size;
  std::vector<T> err(static_cast<size_t>(d_out * bs));
  std::vector<RowFailure> failures(static_cast<size_t>(d_out));
  for (int64_t i1 = 0; i1 < n;) {
    int64_t i2 = std::min(i1 + bs, n);
    // Cut the block before a group that starts inside it and extends past its end (see gptq.h).
    const int64_t last_group_start = (i2 - 1) / g * g;
    if (last_group_start > i1 && std::min(last_group_start + g, n) > i2) i2 = last_group_start;

    // Threads only pay off when the block holds enough work; either way each row's arithmetic is
    // the same.
    const int64_t block_work = d_out * (i2 - i1) * (i2 - i1 + 8);
    ParallelFor(d_out, block_work / std::max<int64_t>(d_out, 1), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        T* row = wp.data() + o * n;
        T* row_err = err.data() + o * bs;
        RowFailure& failure = failures[o];
        GroupParams p{q.scales[(i1 / g) * d_out + o], q.zeros[(i1 / g) * d_out + o]};
        for (int64_t i = i1; i < i2; ++i) {
          if (i % g == 0) {
            p = kernels::FitGroup(row + i, std::min(g, n - i), 1, spec);
            q.scales[(i / g) * d_out + o] = p.scale;
            q.zeros[(i / g) * d_out + o] = p.zero;
            if (!std::isfinite(p.scale) && failure.kind == RowFailure::kNone) {
              failure = {RowFailure::kScaleOverflow, i / g};
            }
          }
          const T wi = row[i];
          const int32_t code = kernels::QuantizeCode(wi, p, spec);
          q.codes[o * n + perm[i]] = code;
          const T e = (wi - kernels::Dequantize<T>(code, p, spec)) / u[i * n + i];
          if (!std::isfinite(e) && failure.kind == RowFailure::kNone) {
            failure = {RowFailure::kNonFiniteError, perm[i]};
          }
          row_err[i - i1] = e;
          const T* u_row = u.data() + i * n;
          for (int64_t j = i + 1; j < i2; ++j) row[j] -= e * u_row[j];
        }
      }
    });
    for (int64_t o = 0; o < d_out; ++o) {
      const RowFailure& f = failures[o];
      if (f.kind == RowFailure::kScaleOverflow) return internal::ScaleOverflowError(o, f.where);
      if (f.kind == RowFailure::kNonFiniteError) {
        return absl::InvalidArgumentError(
            absl::StrCat("GPTQ: non-finite rounding error at weight row ", o, ", column ", f.where,
                         " (ill-conditioned Hessian or extreme weights)"));
      }
    }
    if (i2 < n) {
      GemmSubtract(static_cast<int>(d_out), static_cast<int>(n - i2), static_cast<int>(i2 - i1),
                   err.data(), static_cast<int>(bs), u.data() + i1 * n + i2, static_cast<int>(n),
                   wp.data() + i2, static_cast<int>(n));
    }
    i1 = i2;
  }

  if (options.act_order) {
    for (int64_t p = 0; p < n; ++p) q.g_idx[perm[p]] = static_cast<int32_t>(p / g);
    q.perm = std::move(perm);
  }
  return q;
}

template absl::StatusOr<QuantizedLinear> QuantizeGptq<float>(const float*, const float*, int64_t,
                                                             int64_t, const QuantSpec&,
                                                             const GptqOptions&, GptqStats*);
template absl::StatusOr<QuantizedLinear> QuantizeGptq<double>(const double*, const double*, int64_t,
                                                              int64_t, const QuantSpec&,
                                                              const GptqOptions&, GptqStats*);

}  // namespace qcal::engine
