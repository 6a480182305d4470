// The CUDA backend's error-reconstruction ops (Backend::CholeskyWhitening, ReconstructError;
// contracts in kernels/backend.h, data in kernels/quant_ops.h): adapters that validate, run
// cuSOLVER, cuBLAS and the launchers of low_rank.cuh on the backend's stream, and return
// absl::Status. The reference is services/engine/aser/error_reconstruction.h. Internal to
// kernels/cuda.
//
// Precision: everything between the fp32 inputs and the fp32 factors is double (the CPU reference
// is double too): E·S, the factorizations and the products. On Hopper, double GEMMs run on the
// tensor cores at about the fp32 rate, so double costs little here.
//
// CholeskyWhitening: G + δI assembled in double (its upper triangle read), potrf, rounded to fp32.
//
// ReconstructError forms M = E·S in double (panel GEMMs over S's lower triangle for a Cholesky
// factor, fused into the difference for a diagonal one; E's columns first gathered into
// LowRankOptions::whitening_order where S factors the Gram matrix in that order, as GPTQ's factor
// does, and L_B's columns scattered back at the end), then:
//   kFull        the full SVD of M (cusolverDnXgesvd, QR iteration, like LAPACK's dgesvd) on
//                whichever of M and Mᵀ is tall; error_before = sqrt(Σ σ_i²) and error_after =
//                sqrt(Σ_{i>r} σ_i²) (tail summed smallest first), as the CPU computes them.
//   kRandomized  a randomized SVD (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1) with
//                k = min(r + oversample, min(d_out, d_in)) sketch columns: Y = M-side sketch of a
//                Gaussian Ω (hash_random.h, seeded), `power_iterations` subspace iterations with
//                a QR after every product (CholeskyQR2: syrk, potrf, trsm, twice; Householder
//                geqrf + orgqr where a Gram is not positive definite, R₁'s pivots spread over
//                1e6 or R₂'s diagonal is off 1 by more than 0.1), then B = QᵀM factored as
//                a QR of Bᵀ and the SVD of its k x k triangle (one-sided Jacobi in one launch,
//                kernels/small_svd.h, bit for bit ref::SmallSvd). σ are the r leading
//                singular values of B (never above M's); error_before = ‖M‖_F (nrm2) and
//                error_after = sqrt(max(0, ‖M‖_F² − Σ_{i<=r} σ_i²)), which is exactly the
//                whitened error of the returned factors in exact arithmetic (they project M onto
//                an r-dimensional subspace). Where the caller gives ‖E·Xᵀ‖² and δ
//                (LowRankOptions::gram_error_sq), M is not formed: the products with M and Mᵀ
//                are E·(S·Y) and Sᵀ·(Eᵀ·Z), thin GEMMs in row panels of S's triangle, and
//                ‖M‖_F² = ‖E·Xᵀ‖² + δ‖E‖_F² (the d_out · d_in² product of M was about 20 ms of a
//                7B block in double).
// Both then form L_A = U_r Σ_r with one GEMM (or transpose and scaling) and L_B = V_rᵀ S⁻¹, and
// round them to fp32. kRandomized with a Cholesky factor takes L_B from its last sketch
// Y = Sᵀ·Eᵀ·Z: S⁻ᵀ·V_r = Eᵀ·(Z·R_Y⁻¹·V_R), a k x r solve with CholeskyQR2's R_Y and two GEMMs,
// where CholeskyQR2 accepted that sketch; otherwise (and for kFull) a triangular solve with S
// (the diagonal 64-blocks inverted, then block back substitution in one launch: SolveUpper).
// Measured on one H100 at rank 64 (qcal bench --er, CholeskyQR2, 2026-12-06): kRandomized 7.9
// / 12.5 / 20.5 ms for 4096 x 4096 / 11008 x 4096 / 4096 x 11008, kFull about 1.6-1.8 s each.
//
// Determinism: the cuSOLVER handle is in deterministic mode, cuBLAS runs without atomics and the
// test matrix is a hash of (seed, index), so equal inputs give bit-identical outputs on the same
// GPU model and library versions.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor.h"
#include "kernels/cpu/small_svd_ref.h"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/quant_ops.h"

namespace qcal::kernels::cuda {

absl::StatusOr<Tensor> CholeskyWhitening(const QuantContext& ctx, const Tensor& gram, double damp);

// The δ that CholeskyWhitening(gram, damp) adds: damp · mean(diag G), the diagonal summed in
// double.
absl::StatusOr<double> WhiteningDelta(const QuantContext& ctx, const Tensor& gram, double damp);

absl::StatusOr<LowRankTensors> ReconstructError(const QuantContext& ctx, const Tensor& w,
                                                const Tensor& w_hat, const Tensor& whitening,
                                                const LowRankOptions& options);

// w += a·b (one fp32 GEMM, true fp32).
absl::Status AddLowRank(const QuantContext& ctx, const Tensor& a, const Tensor& b, Tensor& w);

// ‖(E − a·b)·Xᵀ‖_F from error_sq = ‖E·Xᵀ‖_F² (E = w − w_hat, G = gram = XᵀX, upper triangle
// read) by thin products only: error_sq − ⟨a, 2·E·G·bᵀ − a·(b·G·bᵀ)⟩, with G·bᵀ one symm, the rest
// fp32 GEMMs of r columns (true fp32) and the inner product in double. No d_in² · d_out product:
// in place of OutputError(w, w_hat + a·b, gram) where error_sq is known.
absl::StatusOr<double> LowRankOutputError(const QuantContext& ctx, const Tensor& w,
                                          const Tensor& w_hat, const Tensor& a, const Tensor& b,
                                          const Tensor& gram, double error_sq);

// The k x k one-sided Jacobi SVD that kRandomized runs on its triangle
// (kernels/cuda/small_svd.cuh), on CUDA device `device` with its own stream and buffers, of a
// (column-major [k, k], host): the entry point of the parity test against ref::SmallSvd, whose
// result type it returns (u, sigma, v, sweeps, converged, finite). kInvalidArgument unless a holds
// k² values with 1 <= k <= kSmallSvdMaxK (4096).
absl::StatusOr<ref::SmallSvdResult> SmallSvdOnDevice(const std::vector<double>& a, int64_t k,
                                                     int device);

}  // namespace qcal::kernels::cuda
