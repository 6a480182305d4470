#include "kernels/cpu/quant_ref.h"

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

namespace qcal::kernels {

std::vector<float> QuantizedLinear::Dequantized() const {
  std::vector<float> out(static_cast<size_t>(d_out * d_in));
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j = 0; j < d_in; ++j) {
      const int64_t k = g_idx[j] * d_out + o;
      const GroupParams p{scales[k], zeros[k]};
      out[o * d_in + j] = Dequantize<float>(codes[o * d_in + j], p, spec);
    }
  }
  return out;
}

namespace ref {
namespace {

// A QuantizedLinear with validated spec and shape, sized buffers (codes, scales, zeros zeroed) and
// g_idx[j] = j / g. Errors: invalid spec, non-positive shape.
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
  q.group_size = EffectiveGroupSize(spec, d_in);
  q.n_groups = NumGroups(spec, d_in);
  q.codes.assign(static_cast<size_t>(d_out * d_in), 0);
  q.scales.assign(static_cast<size_t>(q.n_groups * d_out), 0.0f);
  q.zeros.assign(static_cast<size_t>(q.n_groups * d_out), 0);
  q.g_idx.resize(static_cast<size_t>(d_in));
  for (int64_t j = 0; j < d_in; ++j) q.g_idx[j] = static_cast<int32_t>(j / q.group_size);
  return q;
}

// InvalidArgument naming `what`[row, col] and its value for the first non-finite entry of the
// row-major matrix `values` [rows][cols].
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

absl::Status CheckBlasRange(int64_t d_out, int64_t d_in) {
  if (d_out > INT_MAX || d_in > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight shape [", d_out, ", ", d_in, "] exceeds the BLAS index range"));
  }
  return absl::OkStatus();
}

// The error for a group whose fitted scale is not a finite fp16 value.
absl::Status ScaleOverflowError(int64_t row, int64_t group) {
  return absl::InvalidArgumentError(
      absl::StrCat("weight row ", row, ", group ", group,
                   ": value range too large for an fp16 scale (max 65504)"));
}

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

template <typename T>
absl::Status CheckGptqWeight(const T* w, int64_t d_out, int64_t d_in, const QuantSpec& spec) {
  QCAL_RETURN_IF_ERROR(ValidateQuantSpec(spec));
  if (d_out <= 0 || d_in <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight shape must be positive, got [", d_out, ", ", d_in, "]"));
  }
  QCAL_RETURN_IF_ERROR(CheckBlasRange(d_out, d_in));
  return CheckFinite(w, d_out, d_in, "weight");
}

template <typename T>
absl::StatusOr<QuantizedLinear> QuantizeRtn(const T* w, int64_t d_out, int64_t d_in,
                                            const QuantSpec& spec) {
  QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, NewQuantizedLinear(d_out, d_in, spec));
  QCAL_RETURN_IF_ERROR(CheckFinite(w, d_out, d_in, "weight"));
  const int64_t g = q.group_size;
  // Overflow is recorded per row and reported for the first row.
  std::vector<int64_t> overflow_group(static_cast<size_t>(d_out), -1);
  ParallelFor(d_out, d_in, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* row = w + o * d_in;
      for (int64_t k = 0; k < q.n_groups; ++k) {
        const int64_t j0 = k * g, j1 = std::min(j0 + g, d_in);
        const GroupParams p = FitGroup(row + j0, j1 - j0, 1, spec);
        if (!std::isfinite(p.scale) && overflow_group[o] < 0) overflow_group[o] = k;
        q.scales[k * d_out + o] = p.scale;
        q.zeros[k * d_out + o] = p.zero;
        for (int64_t j = j0; j < j1; ++j) q.codes[o * d_in + j] = QuantizeCode(row[j], p, spec);
      }
    }
  });
  for (int64_t o = 0; o < d_out; ++o) {
    if (overflow_group[o] >= 0) return ScaleOverflowError(o, overflow_group[o]);
  }
  return q;
}

template <typename T>
absl::Status GptqFactorize(const T* h, int64_t n, const GptqSolveOptions& options, T* u,
                           GptqFactor* factor) {
  if (!std::isfinite(options.damp) || options.damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("gptq.damp must be >= 0, got ", options.damp));
  }
  if (n < 1 || n > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPTQ: the Hessian's size ", n, " is outside [1, ", INT_MAX, "]"));
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) {
      if (!std::isfinite(h[i * n + j])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "hessian[", i, ", ", j, "] is ", static_cast<double>(h[i * n + j]), " (not finite)"));
      }
    }
  }
  GptqFactor& f = *factor;
  f = GptqFactor();
  f.n = n;
  f.act_order = options.act_order;

  // 1-2. Dead and outlier columns, visiting order.
  QCAL_ASSIGN_OR_RETURN(const double diag_mean,
                        PlanGptqColumns(
                            n, [&](int64_t j) { return h[j * n + j]; }, options, f));

  // 3-4. Damping and U, retrying with more damping when H is not positive definite enough.
  std::fill(u, u + n * n, T(0));
  double lambda = options.damp;
  bool factored = false;
  for (int attempt = 0; attempt < 3 && !factored; ++attempt) {
    if (attempt > 0) {
      if (options.damp == 0) break;
      lambda *= 10;
    }
    f.damp_used = lambda;
    BuildHessian(h, n, f.perm, f.removed, static_cast<T>(lambda * diag_mean), u);
    factored = InverseCholeskyUpper(u, static_cast<lapack_int>(n));
    if (!factored) ++f.cholesky_failures;
  }
  if (!factored) {
    return absl::FailedPreconditionError(absl::StrCat(
        "GPTQ: the Hessian [", n, " x ", n, "] is not positive definite even with damping ",
        f.damp_used, " (gptq.damp = ", options.damp,
        "); more calibration data or a larger gptq.damp may help"));
  }
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<QuantizedLinear> GptqSolve(const T* w, int64_t d_out, const GptqFactor& factor,
                                          const T* u, const QuantSpec& spec, int block_size,
                                          std::vector<T>* pre_round) {
  const int64_t n = factor.n;
  QCAL_RETURN_IF_ERROR(CheckGptqWeight(w, d_out, n, spec));
  if (block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gptq.block_size must be >= 1, got ", block_size));
  }
  if (factor.perm.size() != static_cast<size_t>(n) ||
      factor.removed.size() != static_cast<size_t>(n)) {
    return absl::InvalidArgumentError(absl::StrCat("GPTQ: the factor of size ", n, " has ",
                                                   factor.perm.size(), " visiting positions and ",
                                                   factor.removed.size(), " column flags"));
  }
  QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, NewQuantizedLinear(d_out, n, spec));
  const std::vector<int32_t>& perm = factor.perm;

  // The column loop, in visiting order, on a working copy of W with removed columns zeroed.
  std::vector<T> wp(static_cast<size_t>(d_out * n));
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t p = 0; p < n; ++p) {
      const int64_t j = perm[p];
      wp[o * n + p] = factor.removed[j] ? T(0) : w[o * n + j];
    }
  }
  if (pre_round) pre_round->assign(static_cast<size_t>(d_out * n), T(0));
  T* const pre = pre_round ? pre_round->data() : nullptr;
  const int64_t g = q.group_size;
  const int64_t bs = block_size;
  std::vector<T> err(static_cast<size_t>(d_out * bs));
  std::vector<RowFailure> failures(static_cast<size_t>(d_out));
  for (int64_t i1 = 0; i1 < n;) {
    int64_t i2 = std::min(i1 + bs, n);
    // Cut the block before a group that starts inside it and extends past its end (see above).
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
            p = FitGroup(row + i, std::min(g, n - i), 1, spec);
            q.scales[(i / g) * d_out + o] = p.scale;
            q.zeros[(i / g) * d_out + o] = p.zero;
            if (!std::isfinite(p.scale) && failure.kind == RowFailure::kNone) {
              failure = {RowFailure::kScaleOverflow, i / g};
            }
          }
          const T wi = row[i];
          const int32_t code = QuantizeCode(wi, p, spec);
          q.codes[o * n + perm[i]] = code;
          if (pre) pre[o * n + perm[i]] = wi;
          const T e = (wi - Dequantize<T>(code, p, spec)) / u[i * n + i];
          if (!std::isfinite(e) && failure.kind == RowFailure::kNone) {
            failure = {RowFailure::kNonFiniteError, perm[i]};
          }
          row_err[i - i1] = e;
          const T* u_row = u + i * n;
          for (int64_t j = i + 1; j < i2; ++j) row[j] -= e * u_row[j];
        }
      }
    });
    for (int64_t o = 0; o < d_out; ++o) {
      const RowFailure& f = failures[o];
      if (f.kind == RowFailure::kScaleOverflow) return ScaleOverflowError(o, f.where);
      if (f.kind == RowFailure::kNonFiniteError) {
        return absl::InvalidArgumentError(
            absl::StrCat("GPTQ: non-finite rounding error at weight row ", o, ", column ", f.where,
                         " (ill-conditioned Hessian or extreme weights)"));
      }
    }
    if (i2 < n) {
      GemmSubtract(static_cast<int>(d_out), static_cast<int>(n - i2), static_cast<int>(i2 - i1),
                   err.data(), static_cast<int>(bs), u + i1 * n + i2, static_cast<int>(n),
                   wp.data() + i2, static_cast<int>(n));
    }
    i1 = i2;
  }

  if (factor.act_order) {
    for (int64_t p = 0; p < n; ++p) q.g_idx[perm[p]] = static_cast<int32_t>(p / g);
    q.perm = perm;
  }
  return q;
}

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
      const double wi = static_cast<double>(w[o0 * d_in + i]);
      e[i] = w_hat ? wi - static_cast<double>(w_hat[o0 * d_in + i]) : wi;
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

template absl::Status CheckGptqWeight<float>(const float*, int64_t, int64_t, const QuantSpec&);
template absl::Status CheckGptqWeight<double>(const double*, int64_t, int64_t, const QuantSpec&);
template absl::StatusOr<QuantizedLinear> QuantizeRtn<float>(const float*, int64_t, int64_t,
                                                            const QuantSpec&);
template absl::StatusOr<QuantizedLinear> QuantizeRtn<double>(const double*, int64_t, int64_t,
                                                             const QuantSpec&);
template absl::Status GptqFactorize<float>(const float*, int64_t, const GptqSolveOptions&, float*,
                                           GptqFactor*);
template absl::Status GptqFactorize<double>(const double*, int64_t, const GptqSolveOptions&,
                                            double*, GptqFactor*);
template absl::StatusOr<QuantizedLinear> GptqSolve<float>(const float*, int64_t, const GptqFactor&,
                                                          const float*, const QuantSpec&, int,
                                                          std::vector<float>*);
template absl::StatusOr<QuantizedLinear> GptqSolve<double>(const double*, int64_t,
                                                           const GptqFactor&, const double*,
                                                           const QuantSpec&, int,
                                                           std::vector<double>*);

}  // namespace ref
}  // namespace qcal::kernels
