#include "services/engine/aser/error_reconstruction.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {
namespace {

absl::Status CheckShape(int64_t d_out, int64_t d_in) {
  if (d_out < 1 || d_in < 1 || d_out > INT_MAX || d_in > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("error reconstruction: bad weight shape [", d_out, ", ", d_in, "]"));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status CheckFiniteMatrix(const T* m, int64_t rows, int64_t cols, const char* what) {
  for (int64_t i = 0; i < rows * cols; ++i) {
    if (!std::isfinite(m[i])) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", i / cols, ", ", i % cols, "] is ",
                                                     static_cast<double>(m[i]), " (not finite)"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckWhitening(const WhiteningFactor& s, int64_t d_in) {
  size_t expected = 0;
  switch (s.kind) {
    case Whitening::kCholesky:
      expected = static_cast<size_t>(d_in * d_in);
      break;
    case Whitening::kDiagonal:
      expected = static_cast<size_t>(d_in);
      break;
    case Whitening::kNone:
      break;
  }
  if (s.d_in != d_in || s.factor.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat("error reconstruction: whitening factor for ",
                                                   s.d_in, " channels (", s.factor.size(),
                                                   " values) used on a layer of d_in ", d_in));
  }
  return absl::OkStatus();
}

// SVD of the row-major M [rows][cols] (destroyed): M = U diag(sigma) Vᵀ with U row-major
// [rows][k] and Vᵀ row-major [k][cols], k = min(rows, cols). LAPACK is column-major, and the
// row-major M is the column-major Mᵀ = V Σ Uᵀ: its left factor, written column-major, is Vᵀ
// row-major and its right factor is U row-major, so no transposed copies are needed.
absl::Status Svd(std::vector<double>& m, int rows, int cols, std::vector<double>& u,
                 std::vector<double>& sigma, std::vector<double>& vt) {
  const int k = std::min(rows, cols);
  u.assign(static_cast<size_t>(rows) * k, 0.0);
  vt.assign(static_cast<size_t>(k) * cols, 0.0);
  sigma.assign(static_cast<size_t>(k), 0.0);
  std::vector<double> backup = m;
  lapack_int info = LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', cols, rows, m.data(), cols, sigma.data(),
                                   vt.data(), cols, u.data(), k);
  if (info == 0) return absl::OkStatus();
  // dgesdd's divide and conquer can fail to converge where QR iteration does not.
  std::vector<double> superb(static_cast<size_t>(std::max(k - 1, 1)));
  info = LAPACKE_dgesvd(LAPACK_COL_MAJOR, 'S', 'S', cols, rows, backup.data(), cols, sigma.data(),
                        vt.data(), cols, u.data(), k, superb.data());
  if (info != 0) {
    return absl::InternalError(absl::StrCat("error reconstruction: SVD of a ", rows, "x", cols,
                                            " matrix failed (LAPACK info ", info, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

template <typename T>
absl::StatusOr<WhiteningFactor> CholeskyWhitening(const T* gram, int64_t d_in, double damp) {
  if (d_in < 1 || d_in > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("whitening: bad width ", d_in));
  }
  if (!std::isfinite(damp) || damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("whitening: damp must be >= 0, got ", damp));
  }
  const int64_t n = d_in;
  double diag_sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) {
      if (!std::isfinite(gram[i * n + j])) {
        return absl::InvalidArgumentError(absl::StrCat("whitening: gram[", i, ", ", j, "] is ",
                                                       static_cast<double>(gram[i * n + j]),
                                                       " (not finite)"));
      }
    }
    diag_sum += static_cast<double>(gram[i * n + i]);
  }
  WhiteningFactor s;
  s.kind = Whitening::kCholesky;
  s.d_in = n;
  s.delta = damp * (diag_sum / static_cast<double>(n));
  // G + δI into the row-major lower triangle, which is the column-major upper triangle: potrf('U')
  // there computes Uᵀ U = A, and the column-major U read row-major is the lower L with L Lᵀ = A.
  // The strict upper triangle stays 0 (LAPACK does not touch it).
  s.factor.assign(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) s.factor[i * n + j] = static_cast<double>(gram[j * n + i]);
    s.factor[i * n + i] += s.delta;
  }
  const lapack_int info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', static_cast<lapack_int>(n),
                                         s.factor.data(), static_cast<lapack_int>(n));
  if (info > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "whitening: the input Gram matrix plus damping (delta ", s.delta,
        ") is not positive definite (leading minor ", info, " of ", n, "); raise damp"));
  }
  if (info < 0) {
    return absl::InternalError(absl::StrCat("whitening: dpotrf argument ", -info, " is invalid"));
  }
  return s;
}

template absl::StatusOr<WhiteningFactor> CholeskyWhitening<float>(const float*, int64_t, double);
template absl::StatusOr<WhiteningFactor> CholeskyWhitening<double>(const double*, int64_t, double);

absl::StatusOr<WhiteningFactor> DiagonalWhitening(const std::vector<double>& mean_abs) {
  if (mean_abs.empty()) return absl::InvalidArgumentError("whitening: no channels");
  for (size_t j = 0; j < mean_abs.size(); ++j) {
    if (!std::isfinite(mean_abs[j]) || mean_abs[j] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("whitening: mean |x| of channel ", j, " is ",
                                                     mean_abs[j], " (must be finite and >= 0)"));
    }
  }
  WhiteningFactor s;
  s.kind = Whitening::kDiagonal;
  s.d_in = static_cast<int64_t>(mean_abs.size());
  s.factor = mean_abs;
  return s;
}

WhiteningFactor IdentityWhitening(int64_t d_in) {
  WhiteningFactor s;
  s.kind = Whitening::kNone;
  s.d_in = d_in;
  return s;
}

absl::Status ErrorReconstructionOptions::Validate() const {
  if (rank != kAutoRank && rank < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("error_reconstruction.rank must be >= 1 or auto, got ", rank));
  }
  if (!std::isfinite(energy) || energy <= 0 || energy > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("error_reconstruction.energy must be in (0, 1], got ", energy));
  }
  if (!std::isfinite(max_extra_params) || max_extra_params <= 0 || max_extra_params > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "error_reconstruction.max_extra_params must be in (0, 1], got ", max_extra_params));
  }
  if (min_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("error_reconstruction: minimum rank must be >= 0, got ", min_rank));
  }
  return absl::OkStatus();
}

namespace {

// The largest r with r·(d_out + d_in) <= max_extra_params · d_out·d_in; the floor's rounding is
// corrected both ways.
int64_t RankBudget(int64_t d_out, int64_t d_in, const ErrorReconstructionOptions& options) {
  const double budget = options.max_extra_params * static_cast<double>(d_out * d_in);
  const double per_rank = static_cast<double>(d_out + d_in);
  int64_t r_budget = static_cast<int64_t>(std::floor(budget / per_rank));
  while (r_budget > 0 && static_cast<double>(r_budget) * per_rank > budget) --r_budget;
  while (static_cast<double>(r_budget + 1) * per_rank <= budget) ++r_budget;
  return r_budget;
}

}  // namespace

int64_t ChooseRank(const std::vector<double>& sigma, int64_t d_out, int64_t d_in,
                   const ErrorReconstructionOptions& options) {
  const int64_t k = std::min(d_out, d_in);
  if (options.rank != kAutoRank) return std::min<int64_t>(options.rank, k);
  double total = 0;
  for (double s : sigma) total += s * s;
  const double target = options.energy * total;
  int64_t r_energy = std::max<int64_t>(static_cast<int64_t>(sigma.size()), 1);
  double kept = 0;
  for (size_t i = 0; i < sigma.size(); ++i) {
    kept += sigma[i] * sigma[i];
    if (kept >= target) {
      r_energy = static_cast<int64_t>(i) + 1;
      break;
    }
  }
  int64_t r = std::min(r_energy, RankBudget(d_out, d_in, options));
  r = std::max<int64_t>(r, std::max(options.min_rank, 1));
  return std::min(r, k);
}

int64_t MaxRank(int64_t d_out, int64_t d_in, const ErrorReconstructionOptions& options) {
  const int64_t k = std::min(d_out, d_in);
  if (options.rank != kAutoRank) return std::min<int64_t>(options.rank, k);
  const int64_t r = std::max<int64_t>(RankBudget(d_out, d_in, options), options.min_rank);
  return std::min<int64_t>(std::max<int64_t>(r, 1), k);
}

template <typename T>
absl::StatusOr<LowRankCorrection<T>> ReconstructError(const T* w, const T* w_hat, int64_t d_out,
                                                      int64_t d_in,
                                                      const WhiteningFactor& whitening,
                                                      const ErrorReconstructionOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_RETURN_IF_ERROR(CheckShape(d_out, d_in));
  QCAL_RETURN_IF_ERROR(CheckWhitening(whitening, d_in));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(w, d_out, d_in, "weight"));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(w_hat, d_out, d_in, "quantized weight"));
  const int rows = static_cast<int>(d_out), cols = static_cast<int>(d_in);
  const int k = std::min(rows, cols);

  // M = E·S.
  std::vector<double> m(static_cast<size_t>(d_out * d_in));
  for (size_t i = 0; i < m.size(); ++i) {
    m[i] = static_cast<double>(w[i]) - static_cast<double>(w_hat[i]);
  }
  const double* s = whitening.factor.data();
  switch (whitening.kind) {
    case Whitening::kCholesky:
      cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, rows, cols,
                  1.0, s, cols, m.data(), cols);
      break;
    case Whitening::kDiagonal:
      for (int64_t o = 0; o < d_out; ++o) {
        for (int64_t j = 0; j < d_in; ++j) m[o * d_in + j] *= s[j];
      }
      break;
    case Whitening::kNone:
      break;
  }

  std::vector<double> u, sigma, vt;
  QCAL_RETURN_IF_ERROR(Svd(m, rows, cols, u, sigma, vt));
  LowRankCorrection<T> out;
  out.d_out = d_out;
  out.d_in = d_in;
  out.rank = ChooseRank(sigma, d_out, d_in, options);
  const int r = static_cast<int>(out.rank);

  // L_A = U_r Σ_r.
  out.a.resize(static_cast<size_t>(d_out) * r);
  for (int64_t o = 0; o < d_out; ++o) {
    for (int i = 0; i < r; ++i) out.a[o * r + i] = static_cast<T>(u[o * k + i] * sigma[i]);
  }
  // L_B = V_rᵀ S⁻¹: the first r rows of Vᵀ, solved against S from the right.
  std::vector<double> b(vt.begin(), vt.begin() + static_cast<int64_t>(r) * d_in);
  switch (whitening.kind) {
    case Whitening::kCholesky:
      cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, r, cols, 1.0,
                  s, cols, b.data(), cols);
      break;
    case Whitening::kDiagonal:
      for (int i = 0; i < r; ++i) {
        for (int64_t j = 0; j < d_in; ++j) {
          b[i * d_in + j] = s[j] > 0 ? b[i * d_in + j] / s[j] : 0.0;
        }
      }
      break;
    case Whitening::kNone:
      break;
  }
  out.b.assign(b.begin(), b.end());

  out.singular_values = sigma;
  double total = 0, tail = 0;
  for (int i = k - 1; i >= 0; --i) {
    total += sigma[i] * sigma[i];
    if (i >= r) tail += sigma[i] * sigma[i];
  }
  out.error_before = std::sqrt(total);
  out.error_after = std::sqrt(tail);
  return out;
}

template absl::StatusOr<LowRankCorrection<float>> ReconstructError<float>(
    const float*, const float*, int64_t, int64_t, const WhiteningFactor&,
    const ErrorReconstructionOptions&);
template absl::StatusOr<LowRankCorrection<double>> ReconstructError<double>(
    const double*, const double*, int64_t, int64_t, const WhiteningFactor&,
    const ErrorReconstructionOptions&);

absl::StatusOr<std::vector<float>> ZeroColumns(const float* w, int64_t d_out, int64_t d_in,
                                               const std::vector<int32_t>& columns) {
  for (int32_t c : columns) {
    if (c < 0 || c >= d_in) {
      return absl::InvalidArgumentError(
          absl::StrCat("outlier column ", c, " is outside [0, ", d_in, ")"));
    }
  }
  std::vector<float> out(w, w + d_out * d_in);
  for (int64_t o = 0; o < d_out; ++o) {
    for (int32_t c : columns) out[o * d_in + c] = 0.0f;
  }
  return out;
}

}  // namespace qcal::engine
