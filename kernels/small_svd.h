// The SVD of a small square matrix by one-sided Jacobi (Hestenes), the step of error
// reconstruction's randomized SVD that factors the k x k triangle R = U_R Σ V_Rᵀ (k = rank +
// oversample, 80 for rank 64; engine::ReconstructError, DESIGN.md section 3). Header-only and
// QCAL_HOST_DEVICE like kernels/train_math.h, so that the CPU reference
// (kernels/cpu/small_svd_ref.h, which runs the pairs of a round one after another) and the CUDA
// kernel (kernels/cuda/small_svd.cu, a group of kSmallSvdLanes threads a pair, the pairs of a round
// at once) run the same operations in the same order: every operation is a separately rounded IEEE
// operation in double (the CUDA file is compiled with -fmad=false; divisions and square roots are
// IEEE; the CPU references are built with -ffp-contract=off), so the two give the same bits.
//
// The algorithm runs on X = aᵀ (the rows of a as columns): X is rotated from the right, X := X·J,
// J := J·G (J starts as I), one pair of columns (p, q) at a time, until X's columns are mutually
// orthogonal; then σ_j = ‖x_j‖ and, with the columns ordered by decreasing σ (ties: the lower
// column first), aᵀ = X̃ Σ Jᵀ (X̃ the normalized columns), so a = U Σ Vᵀ with U = J (orthogonal)
// and V = X̃ (v_j = x_j / σ_j, 0 where σ_j = 0). Rows rather than columns because the triangles
// error reconstruction factors come from a QR without pivoting: on an 80 x 80 R of a spectrum
// spread over 1, 3 and 8 decades, the sweeps on Rᵀ numbered 9, 9 and 9, on R 10, 14 and 23.
//   - Pair order (a sweep): the round-robin tournament over kk = k rounded up to even columns
//     (column k, when k is odd, is a bye). Round r = 0 .. kk − 2 pairs slot i with slot
//     kk − 1 − i, i < kk / 2, where slot 0 holds column 0 and slot s > 0 holds column
//     1 + (s − 1 + r) mod (kk − 1). Every pair meets once a sweep, and the pairs of a round are
//     disjoint, so the GPU rotates them at once.
//   - A pair's sums α = ‖x_p‖², β = ‖x_q‖², γ = x_p·x_q: kSmallSvdLanes partial sums, partial l
//     over the rows i ≡ l (mod kSmallSvdLanes) in increasing order, then added as a pairwise tree
//     (for h = lanes/2, ..., 1: partial[l] += partial[l + h]), which is what a butterfly of the
//     group's lanes computes. σ_j is the square root of the same sum for column j alone.
//   - Negligible columns: a pair is left alone when α or β is at most ν = (k·ε)²·‖X‖_F² (ε =
//     2^-52; ‖X‖_F² the sum of the columns' sums in column order, before any rotation, computed as
//     SmallSvdNegligible does). A column at that level is rounding noise of the others (a
//     rank-deficient a), which no rotation can make orthogonal to a column 10^14 times longer; it
//     keeps its σ (at most k·ε·‖a‖_F) and its noisy v, and U stays orthogonal.
//   - The rotation: when γ² > τ²·α·β (τ = kSmallSvdTolerance), with d = β − α and g = 2γ,
//     r = √(d² + g²), w = |d| + r, h = √(w² + g²): c = w/h, s = ±|g|/h (the sign of d·g, + when
//     d = 0). That is Rutishauser's t = sign(ζ)/(|ζ| + √(1 + ζ²)), ζ = d/g, c = 1/√(1 + t²),
//     s = c·t, with three long-latency operations (two square roots and one division) instead of
//     seven: each round waits for them. x_p := c·x_p − s·x_q, x_q := s·x_p + c·x_q (both from the
//     old values), and the same for J's columns. This makes x_p·x_q zero up to rounding. (The
//     squares assume |entries| between about 1e-75 and 1e75, which the whitened errors are.)
//   - A sweep that rotates no pair ends the iteration. kSmallSvdMaxSweeps sweeps without one is a
//     failure to converge (the caller's error). Quadratic convergence makes it about 6–10 sweeps
//     for the triangles error reconstruction factors (9 on the three above).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/host_device.h"

namespace qcal::kernels {

// Threads (GPU) or partial sums (CPU) a pair's dot products are split over.
inline constexpr int kSmallSvdLanes = 16;
// Relative orthogonality below which a pair is left alone: a few units of double rounding.
inline constexpr double kSmallSvdTolerance = 4.0e-15;
// Sweeps after which the iteration is declared not to converge.
inline constexpr int kSmallSvdMaxSweeps = 60;

// The column that tournament slot `slot` holds in round `round` of a sweep over `kk` (even)
// columns; a column >= k is the bye.
// (slot, round < kk - 1: one conditional subtraction, no division, which a GPU runs as a long
// chain of integer instructions.)
QCAL_HOST_DEVICE inline int SmallSvdSlotColumn(int slot, int round, int kk) {
  if (slot == 0) return 0;
  const int x = slot - 1 + round;
  return 1 + (x >= kk - 1 ? x - (kk - 1) : x);
}

// ν, the squared norm at or below which a column is negligible, for k columns of squared norms
// summing (in column order) to frobenius_sq.
QCAL_HOST_DEVICE inline double SmallSvdNegligible(int64_t k, double frobenius_sq) {
  const double scale = static_cast<double>(k) * 0x1.0p-52;
  return scale * scale * frobenius_sq;
}

// The plane rotation (c, s) that orthogonalises a pair with sums α, β, γ; false when the pair is
// already orthogonal to the tolerance or one of its columns is negligible (no rotation).
QCAL_HOST_DEVICE inline bool SmallSvdRotation(double alpha, double beta, double gamma,
                                              double negligible, double* c, double* s) {
  if (!(alpha > negligible && beta > negligible)) return false;
  constexpr double kTolSq = kSmallSvdTolerance * kSmallSvdTolerance;
  if (!(gamma * gamma > kTolSq * alpha * beta)) return false;
  const double d = beta - alpha, g = 2.0 * gamma;
  const double w = std::fabs(d) + std::sqrt(d * d + g * g);
  const double inv_h = 1.0 / std::sqrt(w * w + g * g);
  *c = w * inv_h;
  *s = ((d >= 0) == (g >= 0) ? std::fabs(g) : -std::fabs(g)) * inv_h;
  return true;
}

// One rotated element pair: (x, y) := (c·x − s·y, s·x + c·y).
QCAL_HOST_DEVICE inline void SmallSvdRotate(double c, double s, double* x, double* y) {
  const double xp = *x, yq = *y;
  *x = c * xp - s * yq;
  *y = s * xp + c * yq;
}

}  // namespace qcal::kernels
