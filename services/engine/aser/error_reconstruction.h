// Error reconstruction (DESIGN.md section 3, "Error reconstruction (ASER)"): a low-rank correction
// L_A·L_B of a layer's quantization error E = W' − Ŵ, fitted where the layer's inputs put weight,
// so that inference computes Q(W)x + L_A(L_B x).
//
// With a whitening factor S of the (smoothed) input X' (S Sᵀ ≈ X'ᵀX', so ‖M S‖_F ≈ ‖M X'ᵀ‖_F for
// any M), take the SVD E·S = U Σ Vᵀ and keep rank r:
//   L_A = U_r Σ_r (d_out × r),   L_B = V_rᵀ S⁻¹ (r × d_in, a triangular solve, no explicit
//   inverse).
// By Eckart–Young, (E − L_A L_B) S = E S − U_r Σ_r V_rᵀ is the best rank-r approximation error, so
//   ‖(E − L_A L_B) S‖_F = sqrt(Σ_{i>r} σ_i²)   (σ = singular values of E·S),
// no rank-r correction does better in this norm, and full rank leaves no error.
//
// Whitening factors:
//   cholesky  S = L, the lower Cholesky factor of G + δI, G = X'ᵀX', δ = damp·mean(diag G).
//             With δ = 0 the norm is exactly the output error ‖(E − L_A L_B) X'ᵀ‖_F.
//   diagonal  S = diag(s), s_j = mean |X'_tj| (LQER). A channel with s_j = 0 never carries signal:
//             its column of L_B is set to 0.
//   none      S = I (plain SVD of E).
//
// Outlier extraction (ASER smoothing): the base quantizer sees W'_normal = W' with the extracted
// columns zeroed (ZeroColumns; GPTQ does the same itself with GptqOptions::outlier_columns), so Ŵ
// is 0 there and E = W' − Q(W'_normal) carries those columns whole into the correction.
//
// Precision: everything is computed in double (LAPACK dgesdd, falling back to dgesvd if it does not
// converge; dtrmm and dtrsm from BLAS); the factors are returned in the caller's precision T.
// Deterministic for a given BLAS/LAPACK library and thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// A whitening factor S for inputs of d_in channels.
struct WhiteningFactor {
  Whitening kind = Whitening::kNone;
  int64_t d_in = 0;
  // kCholesky: L [d_in][d_in] row-major, lower triangular (strict upper triangle 0), L Lᵀ = G + δI.
  // kDiagonal: s [d_in]. kNone: empty.
  std::vector<double> factor;
  // kCholesky: δ added to the diagonal of G; otherwise 0.
  double delta = 0;
};

// S = Cholesky(G + δI), δ = damp · mean(diag G). gram G = X'ᵀX' [d_in][d_in] row-major, any
// positive multiple of it giving the same correction; only its upper triangle (j >= i) is read.
// T is float or double. Errors: InvalidArgument for d_in < 1, damp negative or not finite, a
// non-finite G entry; FailedPrecondition when G + δI is not positive definite (for example damp = 0
// with fewer tokens than channels, or an all-zero G), naming the failing leading minor.
template <typename T>
absl::StatusOr<WhiteningFactor> CholeskyWhitening(const T* gram, int64_t d_in, double damp);

// S = diag(mean_abs) (LQER). Errors: empty input, a negative or non-finite entry.
absl::StatusOr<WhiteningFactor> DiagonalWhitening(const std::vector<double>& mean_abs);

// S = I.
WhiteningFactor IdentityWhitening(int64_t d_in);

// rank value asking for the rank to be chosen from the spectrum.
inline constexpr int kAutoRank = -1;

struct ErrorReconstructionOptions {
  // r >= 1: fixed rank, clamped to min(d_out, d_in); kAutoRank: chosen by ChooseRank's rule. No
  // usable default (the recipe key is required): 0 is invalid.
  int rank = 0;
  // Auto rank: the fraction of Σσ² to keep, in (0, 1]. Default: 0.9.
  double energy = 0.9;
  // Auto rank: at most this fraction of the layer's d_out·d_in parameters as r·(d_out + d_in) extra
  // ones, in (0, 1]. Default: 0.1.
  double max_extra_params = 0.1;
  // Auto rank: raised to at least this (ASER: outlier_channels), >= 0. Default: 0.
  int min_rank = 0;

  // InvalidArgument naming the key (error_reconstruction.rank, .energy, .max_extra_params) when
  // out of range.
  absl::Status Validate() const;
};

// The rank kept for a layer [d_out, d_in] whose E·S has the singular values `sigma` (descending,
// min(d_out, d_in) of them), k = min(d_out, d_in):
//   fixed:  min(rank, k).
//   auto:   r_energy = the smallest r in 1..k with σ_1² + … + σ_r² >= energy · Σ_i σ_i² (sums in
//           double, in index order, so r = k always qualifies; a zero spectrum gives 1);
//           r_budget = the largest r >= 0 with r·(d_out + d_in) <= max_extra_params · (d_out·d_in)
//           (both sides in double, the integer products exact; equality fits the budget);
//           r = min(r_energy, r_budget), then raised to max(min_rank, 1) (a budget below one rank
//           still gives 1, and the outlier floor wins over the budget: extracted columns need the
//           rank), then clamped to k (so min_rank > k gives k).
// Options must be valid.
int64_t ChooseRank(const std::vector<double>& sigma, int64_t d_out, int64_t d_in,
                   const ErrorReconstructionOptions& options);

// The largest rank ChooseRank can return for a [d_out, d_in] layer whatever the spectrum: fixed,
// min(rank, k); auto, min(max(r_budget, min_rank, 1), k). A device that computes only the leading
// singular values (a randomized SVD) computes this many, then applies ChooseRank to them plus one
// value carrying the rest of ‖E·S‖_F² (the auto rule needs only the leading values and the total).
int64_t MaxRank(int64_t d_out, int64_t d_in, const ErrorReconstructionOptions& options);

// A fitted correction, W ≈ Ŵ + a·b.
template <typename T>
struct LowRankCorrection {
  int64_t d_out = 0;
  int64_t d_in = 0;
  int64_t rank = 0;
  // L_A = U_r Σ_r [d_out][rank] row-major (the PEFT adapter's lora_B).
  std::vector<T> a;
  // L_B = V_rᵀ S⁻¹ [rank][d_in] row-major (the PEFT adapter's lora_A).
  std::vector<T> b;
  // σ(E·S), all min(d_out, d_in), descending.
  std::vector<double> singular_values;
  // ‖E S‖_F = sqrt(Σ σ_i²): the whitened error before the correction.
  double error_before = 0;
  // sqrt(Σ_{i>r} σ_i²) (tail summed smallest first): ‖(E − L_A L_B) S‖_F in exact arithmetic; the
  // returned factors, rounded to T, reach it up to T's rounding.
  double error_after = 0;

  // Parameters the correction adds: rank · (d_out + d_in).
  int64_t extra_params() const { return rank * (d_out + d_in); }
};

// Fits the correction of E = w − w_hat (both row-major [d_out][d_in]; under ASER w is W' and w_hat
// the dequantized Q(W'_normal)) in the metric of `whitening`. T is float or double. Errors
// (InvalidArgument): invalid options, a non-positive shape, whitening for another d_in, a
// non-finite weight; Internal when LAPACK fails on both SVD drivers.
template <typename T>
absl::StatusOr<LowRankCorrection<T>> ReconstructError(const T* w, const T* w_hat, int64_t d_out,
                                                      int64_t d_in,
                                                      const WhiteningFactor& whitening,
                                                      const ErrorReconstructionOptions& options);

// W'_normal: a copy of w [d_out][d_in] with the given columns set to 0 (ASER's extracted outlier
// channels; duplicates allowed). Error (InvalidArgument): a column outside [0, d_in).
absl::StatusOr<std::vector<float>> ZeroColumns(const float* w, int64_t d_out, int64_t d_in,
                                               const std::vector<int32_t>& columns);

}  // namespace qcal::engine
