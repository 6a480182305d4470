#include "kernels/cuda/cuda_low_rank.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/cuda_resources.h"
#include "kernels/cuda/gptq.cuh"
#include "kernels/cuda/low_rank.cuh"
#include "kernels/cuda/small_svd.cuh"
#include "kernels/cuda/solver_util.h"

namespace qcal::kernels::cuda {
namespace {

enum class WhiteningKind { kCholesky, kDiagonal, kNone };

// Column panels of M = E·S (MultiplyLower).
constexpr int64_t kPanels = 8;
constexpr int64_t kMinPanelWidth = 128;

// The diagonal of the square row-major x [n, n] (fp32), on the host.
absl::StatusOr<std::vector<float>> DownloadDiagonal(const QuantContext& ctx, const Tensor& x,
                                                    const char* what) {
  const int64_t n = x.dim(0);
  std::vector<float> diag(static_cast<size_t>(n));
  QCAL_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpy2DAsync(diag.data(), sizeof(float), x.data<float>(), (n + 1) * sizeof(float),
                        sizeof(float), n, cudaMemcpyDeviceToHost, ctx.stream),
      what));
  QCAL_RETURN_IF_ERROR(Sync(ctx, what));
  return diag;
}

// CholeskyQR2's acceptance test on the diagonals of its two factors, diag = [R₁'s | R₂'s], each
// of length n: R₁'s pivots within a ratio of kMaxPivotRatio of each other (κ(x) is at least
// their spread), and R₂ within kMaxSecondPassDrift of the identity on its diagonal (the first pass
// left x nearly orthonormal, the regime where the second pass is exact to rounding).
constexpr double kMaxPivotRatio = 1e6;
constexpr double kMaxSecondPassDrift = 0.1;

bool WellConditioned(const std::vector<double>& diag, int64_t n) {
  double lo = INFINITY, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = diag[i], d2 = diag[n + i];
    if (!std::isfinite(d) || !std::isfinite(d2) || !(d > 0)) return false;
    if (std::abs(d2 - 1.0) > kMaxSecondPassDrift) return false;
    lo = std::min(lo, d);
    hi = std::max(hi, d);
  }
  return lo * kMaxPivotRatio >= hi;
}

// The cuSOLVER state of one ReconstructError: the 64-bit API's parameters, a device workspace that
// grows to the largest call (blocks go back to the pool in stream order, so a replaced one is safe
// to release while queued work still reads it) and the info words.
class Solver {
 public:
  explicit Solver(const QuantContext& ctx) : ctx_(ctx) {}

  // `calls`: how many cuSOLVER calls with an info word the op may make (at most: CholeskyQr's
  // factorizations have their own words, read by CholeskyQr; only a Householder fallback and the
  // SVDs take these).
  absl::Status Init(int calls) {
    slots_ = calls;
    QCAL_RETURN_IF_ERROR(params_.Create());
    QCAL_ASSIGN_OR_RETURN(info_, ctx_.alloc(DType::kI32, {calls}));
    return CudaStatus(cudaMemsetAsync(info_.raw(), 0, info_.nbytes(), ctx_.stream),
                      "clearing solver info words");
  }

  // x [rows, cols] (column-major, rows >= cols) := the Q of its Householder QR (geqrf + orgqr);
  // when r is given, also the R into r [cols, cols] (column-major, strict lower triangle 0).
  absl::Status Qr(double* x, int64_t rows, int64_t cols, double* r = nullptr) {
    const int m = static_cast<int>(rows), n = static_cast<int>(cols);
    QCAL_ASSIGN_OR_RETURN(Tensor tau, ctx_.alloc(DType::kF64, {cols}));
    int geqrf_work = 0, orgqr_work = 0;
    QCAL_RETURN_IF_ERROR(
        CusolverStatus(cusolverDnDgeqrf_bufferSize(ctx_.solver, m, n, x, m, &geqrf_work),
                       "cusolverDnDgeqrf_bufferSize"));
    QCAL_RETURN_IF_ERROR(CusolverStatus(
        cusolverDnDorgqr_bufferSize(ctx_.solver, m, n, n, x, m, tau.data<double>(), &orgqr_work),
        "cusolverDnDorgqr_bufferSize"));
    QCAL_ASSIGN_OR_RETURN(
        void* work, Work(sizeof(double) * static_cast<size_t>(std::max(geqrf_work, orgqr_work))));
    auto* w = static_cast<double*>(work);
    QCAL_ASSIGN_OR_RETURN(int* info, Info());
    QCAL_RETURN_IF_ERROR(CusolverStatus(
        cusolverDnDgeqrf(ctx_.solver, m, n, x, m, tau.data<double>(), w, geqrf_work, info),
        absl::StrCat("cusolverDnDgeqrf ", rows, "x", cols)));
    if (r != nullptr) {
      QCAL_RETURN_IF_ERROR(
          CudaStatus(LaunchUpperTriangle(x, rows, cols, r, ctx_.stream), "extracting R"));
    }
    QCAL_ASSIGN_OR_RETURN(info, Info());
    return CusolverStatus(
        cusolverDnDorgqr(ctx_.solver, m, n, n, x, m, tau.data<double>(), w, orgqr_work, info),
        absl::StrCat("cusolverDnDorgqr ", rows, "x", cols));
  }

  // x [rows, cols] (column-major, rows >= cols) := the Q of its QR by CholeskyQR2 (Yamamoto et al.
  // 2015): G = xᵀx (syrk), G = R₁ᵀR₁ (potrf), x := x R₁⁻¹ (trsm), then the same again, which
  // restores the orthogonality the first pass loses to κ(x)² (both passes are GEMM-shaped work on
  // the FP64 tensor cores, where geqrf's panels are latency-bound: 24.5 ms of Householder QRs in a
  // steady 7B block). When r is given, also R = R₂R₁ into r [cols, cols] (column-major, strict
  // lower triangle 0). CholeskyQR2 is stable for κ(x) up to about u^(-1/2) ≈ 1e8; a sketch of a
  // rank-deficient M (fewer independent directions than columns) is beyond that, and its Gram may
  // still pass potrf with round-off pivots. So one read-back of the info words and both diagonals
  // decides: a failed potrf, or a first factor whose diagonal spans more than kMaxPivotRatio
  // (κ(x) >= that), or a second factor that is not near I, restores x and factors it by Householder
  // (Qr). Q's columns then match Qr's up to sign; the randomized SVD is sign-agnostic. Returns
  // whether CholeskyQR2 was kept (then x's pivots, and so R's, span less than kMaxPivotRatio).
  absl::StatusOr<bool> CholeskyQr(double* x, int64_t rows, int64_t cols, double* r = nullptr) {
    const int m = static_cast<int>(rows), n = static_cast<int>(cols);
    const double one = 1.0, zero = 0.0;
    QCAL_ASSIGN_OR_RETURN(Tensor saved, ctx_.alloc(DType::kF64, {cols, rows}));
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(saved.raw(), x, saved.nbytes(), cudaMemcpyDeviceToDevice, ctx_.stream),
        "CholeskyQR: saving x"));
    // r1 and r2 start at 0 so that their strict lower triangles are 0 in R = R₂R₁: syrk with
    // CUBLAS_FILL_MODE_UPPER writes only the upper triangle, and potrf with it processes only the
    // upper triangle (cuSOLVER's documentation; LAPACK's dpotrf leaves the other untouched). The
    // randomized tests' final QR, whose R goes through the k x k SVD, would see a nonzero one.
    QCAL_ASSIGN_OR_RETURN(Tensor factors, ctx_.alloc(DType::kF64, {2, cols, cols}));
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cudaMemsetAsync(factors.raw(), 0, factors.nbytes(), ctx_.stream), "CholeskyQR: clearing"));
    QCAL_ASSIGN_OR_RETURN(Tensor info, ctx_.alloc(DType::kI32, {2}));
    double* r1 = factors.data<double>();
    double* r2 = r1 + cols * cols;
    int lwork = 0;
    QCAL_RETURN_IF_ERROR(CusolverStatus(
        cusolverDnDpotrf_bufferSize(ctx_.solver, CUBLAS_FILL_MODE_UPPER, n, r1, n, &lwork),
        "cusolverDnDpotrf_bufferSize"));
    QCAL_ASSIGN_OR_RETURN(void* work, Work(sizeof(double) * static_cast<size_t>(lwork)));
    for (int pass = 0; pass < 2; ++pass) {
      double* g = pass == 0 ? r1 : r2;
      QCAL_RETURN_IF_ERROR(CublasStatus(cublasDsyrk(ctx_.blas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T,
                                                    n, m, &one, x, m, &zero, g, n),
                                        "CholeskyQR: xᵀx"));
      QCAL_RETURN_IF_ERROR(CusolverStatus(
          cusolverDnDpotrf(ctx_.solver, CUBLAS_FILL_MODE_UPPER, n, g, n, static_cast<double*>(work),
                           lwork, info.data<int32_t>() + pass),
          absl::StrCat("cusolverDnDpotrf ", cols, "x", cols)));
      QCAL_RETURN_IF_ERROR(
          CublasStatus(cublasDtrsm(ctx_.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER,
                                   CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, m, n, &one, g, n, x, m),
                       "CholeskyQR: x R⁻¹"));
    }
    // One read-back: the two info words and the diagonals of R₁ and R₂.
    int32_t codes[2] = {0, 0};
    std::vector<double> diag(2 * static_cast<size_t>(cols));
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(codes, info.raw(), sizeof(codes), cudaMemcpyDeviceToHost, ctx_.stream),
        "reading CholeskyQR info"));
    for (int pass = 0; pass < 2; ++pass) {
      QCAL_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpy2DAsync(diag.data() + pass * cols, sizeof(double),
                                       pass == 0 ? r1 : r2, (cols + 1) * sizeof(double),
                                       sizeof(double), cols, cudaMemcpyDeviceToHost, ctx_.stream),
                     "reading CholeskyQR diagonals"));
    }
    QCAL_RETURN_IF_ERROR(Sync(ctx_, "CholeskyQR"));
    if (codes[0] < 0 || codes[1] < 0) {
      return absl::InternalError(
          absl::StrCat("error reconstruction: cusolverDnDpotrf rejected argument ",
                       -std::min(codes[0], codes[1])));
    }
    if (codes[0] > 0 || codes[1] > 0 || !WellConditioned(diag, cols)) {
      QCAL_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(x, saved.raw(), saved.nbytes(), cudaMemcpyDeviceToDevice, ctx_.stream),
          "CholeskyQR: restoring x"));
      QCAL_RETURN_IF_ERROR(Qr(x, rows, cols, r));
      return false;
    }
    if (r == nullptr) return true;
    QCAL_RETURN_IF_ERROR(
        CublasStatus(cublasDtrmm(ctx_.blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                                 CUBLAS_DIAG_NON_UNIT, n, n, &one, r2, n, r1, n, r, n),
                     "CholeskyQR: R₂R₁"));
    return true;
  }

  // Thin SVD of a [rows, cols] (column-major, rows >= cols, destroyed): a = u diag(sigma) vt with
  // u [rows, cols] (leading dimension rows), sigma [cols] descending, vt [cols, cols].
  absl::Status Svd(double* a, int64_t rows, int64_t cols, double* u, double* sigma, double* vt) {
    size_t device_bytes = 0, host_bytes = 0;
    QCAL_RETURN_IF_ERROR(CusolverStatus(
        cusolverDnXgesvd_bufferSize(ctx_.solver, params_.get(), 'S', 'S', rows, cols, CUDA_R_64F, a,
                                    rows, CUDA_R_64F, sigma, CUDA_R_64F, u, rows, CUDA_R_64F, vt,
                                    cols, CUDA_R_64F, &device_bytes, &host_bytes),
        "cusolverDnXgesvd_bufferSize"));
    QCAL_ASSIGN_OR_RETURN(void* work, Work(device_bytes));
    std::vector<char> host(std::max<size_t>(host_bytes, 1));
    svd_slots_.push_back(next_slot_);
    QCAL_ASSIGN_OR_RETURN(int* info, Info());
    QCAL_RETURN_IF_ERROR(CusolverStatus(
        cusolverDnXgesvd(ctx_.solver, params_.get(), 'S', 'S', rows, cols, CUDA_R_64F, a, rows,
                         CUDA_R_64F, sigma, CUDA_R_64F, u, rows, CUDA_R_64F, vt, cols, CUDA_R_64F,
                         work, device_bytes, host.data(), host_bytes, info),
        absl::StrCat("cusolverDnXgesvd ", rows, "x", cols)));
    // The host workspace must outlive the call's queued work.
    return Sync(ctx_, "cusolverDnXgesvd");
  }

  // SVD of the small square a [k, k] (column-major) by one-sided Jacobi in one launch
  // (kernels/small_svd.h; LaunchSmallSvd equals ref::SmallSvd bit for bit): a = u diag(sigma) vᵀ,
  // sigma descending, u and v [k, k]. For the k x k triangle of the randomized path. cuSOLVER's
  // gesvdj took about 1.6 ms a linear for k = 80 on an H100, dozens of small launches a sweep
  // (docs/BENCHMARKS.md, thirty-second session). LAPACK on the host would tie a GPU job's factors
  // to the host CPU's OpenBLAS kernels; everything a GPU job computes stays on the device or in
  // this binary's own loops. Its info word (no convergence, or a non-finite singular value) is read
  // by Check with the others.
  absl::Status SmallSvd(const double* a, int64_t k, double* u, double* sigma, double* v) {
    if (k > kSmallSvdMaxK) {
      return absl::InvalidArgumentError(
          absl::StrCat("error reconstruction: rank + oversample = ", k, " exceeds the ",
                       kSmallSvdMaxK, " of the randomized SVD's k x k step"));
    }
    Tensor scratch;
    if (k > kSmallSvdSharedMaxK) {
      QCAL_ASSIGN_OR_RETURN(scratch, ctx_.alloc(DType::kF64, {SmallSvdScratchDoubles(k)}));
    }
    svd_slots_.push_back(next_slot_);
    QCAL_ASSIGN_OR_RETURN(int* info, Info());
    return CudaStatus(LaunchSmallSvd(a, k, scratch.defined() ? scratch.data<double>() : nullptr, u,
                                     sigma, v, info, /*sweeps=*/nullptr, ctx_.stream),
                      absl::StrCat("the ", k, "x", k, " Jacobi SVD"));
  }

  // Reads the info words: a negative one is an invalid argument, a positive one of an SVD means
  // that it did not converge (QR iteration, or the Jacobi sweeps: bit 1) or, for the Jacobi SVD,
  // that a singular value is not finite (bit 2).
  absl::Status Check() {
    QCAL_ASSIGN_OR_RETURN(auto info,
                          Download<int32_t>(ctx_, info_.raw(), next_slot_, "reading solver info"));
    for (int i = 0; i < next_slot_; ++i) {
      if (info[i] < 0) {
        return absl::InternalError(absl::StrCat("error reconstruction: cuSOLVER call ", i,
                                                " rejected argument ", -info[i]));
      }
      if (info[i] > 0 && std::count(svd_slots_.begin(), svd_slots_.end(), i) > 0) {
        return absl::InternalError(absl::StrCat(
            "error reconstruction: the SVD did not converge or met a non-finite value (info ",
            info[i], ")"));
      }
    }
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<int*> Info() {
    if (next_slot_ == slots_) {
      return absl::InternalError("error reconstruction: out of cuSOLVER info words");
    }
    return info_.data<int32_t>() + next_slot_++;
  }

  absl::StatusOr<void*> Work(size_t bytes) {
    if (!work_.defined() || static_cast<size_t>(work_.nbytes()) < bytes) {
      QCAL_ASSIGN_OR_RETURN(
          work_, ctx_.alloc(DType::kU8, {static_cast<int64_t>(std::max<size_t>(bytes, 1))}));
    }
    return work_.raw();
  }

  const QuantContext& ctx_;
  SolverParams params_;
  Tensor info_;
  Tensor work_;
  int slots_ = 0;
  int next_slot_ = 0;
  std::vector<int> svd_slots_;
};

// The factors of M = E·S before the whitening solve, on the device, in double.
struct Factors {
  Tensor a;  // row-major [d_out, r]: U_r Σ_r
  Tensor b;  // row-major [r, d_in] (its first r·d_in elements): V_rᵀ, unless `pullback` is set
  // Randomized SVD with a well-conditioned last sketch only: P = Z·R_Y⁻¹·V_R[:, :r], column-major
  // [d_out, r], such that S⁻ᵀ·V_r = Eᵀ·P (RandomizedSvd), so L_B = V_rᵀ·S⁻¹ = Pᵀ·E without a solve.
  // Then `b` is left undefined.
  Tensor pullback;
  std::vector<double> sigma;
  double error_before = 0;
  double error_after = 0;
};

// m [d_out, d_in] = e [d_out, d_in] · s [d_in, d_in] for a lower triangular s (strict upper
// triangle 0), all row-major double. In column panels J of kPanels: M[:, J] = E[:, J0:] S[J0:, J]
// skips the zero rows above the panel, (P + 1) / 2P of a full product. Plain GEMMs on the FP64
// tensor cores: cuBLAS's trmm measured about 3x slower on the H100 at d_in = 4096.
absl::Status MultiplyLower(const QuantContext& ctx, const double* e, const double* s, int64_t d_out,
                           int64_t d_in, double* m) {
  const int64_t panels = d_in >= kPanels * kMinPanelWidth ? kPanels : 1;
  const int64_t width = (d_in + panels - 1) / panels;
  const double one = 1.0, zero = 0.0;
  for (int64_t j0 = 0; j0 < d_in; j0 += width) {
    const int64_t j1 = std::min(d_in, j0 + width);
    // Column-major: Mᵀ[J, :] = (Sᵀ)[J, J0:] · Eᵀ[J0:, :], Sᵀ being the buffer of s.
    QCAL_RETURN_IF_ERROR(
        CublasStatus(cublasDgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(j1 - j0),
                                 static_cast<int>(d_out), static_cast<int>(d_in - j0), &one,
                                 s + j0 * d_in + j0, static_cast<int>(d_in), e + j0,
                                 static_cast<int>(d_in), &zero, m + j0, static_cast<int>(d_in)),
                     "ReconstructError: E·S"));
  }
  return absl::OkStatus();
}

absl::Status ValidateOptions(const LowRankOptions& o) {
  if (o.rank < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("error_reconstruction.rank must be >= 1, got ", o.rank));
  }
  if (o.svd != SvdMethod::kFull && o.svd != SvdMethod::kRandomized) {
    return absl::InvalidArgumentError(
        absl::StrCat("error reconstruction: unknown SVD method ", static_cast<int>(o.svd)));
  }
  if (o.oversample < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("error reconstruction: oversample must be >= 0, got ", o.oversample));
  }
  if (o.power_iterations < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "error reconstruction: power_iterations must be >= 0, got ", o.power_iterations));
  }
  if (std::isnan(o.gram_error_sq) || std::isinf(o.gram_error_sq)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "error reconstruction: the output error ‖E·Xᵀ‖² must be finite, got ", o.gram_error_sq));
  }
  if (!std::isfinite(o.whitening_delta) || o.whitening_delta < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "error reconstruction: whitening_delta must be finite and >= 0, got ", o.whitening_delta));
  }
  return absl::OkStatus();
}

// The options that need a Cholesky factor: an order that is a permutation of [0, d_in), and a
// known output error only with the randomized SVD.
absl::Status ValidateCholeskyOptions(const LowRankOptions& o, WhiteningKind kind, int64_t d_in) {
  if (!o.whitening_order.empty()) {
    if (kind != WhiteningKind::kCholesky) {
      return absl::InvalidArgumentError(
          "error reconstruction: a whitening order needs a Cholesky whitening factor");
    }
    if (static_cast<int64_t>(o.whitening_order.size()) != d_in) {
      return absl::InvalidArgumentError(
          absl::StrCat("error reconstruction: the whitening order has ", o.whitening_order.size(),
                       " entries, expected d_in = ", d_in));
    }
    std::vector<uint8_t> seen(static_cast<size_t>(d_in), 0);
    for (int32_t j : o.whitening_order) {
      if (j < 0 || j >= d_in || seen[j]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "error reconstruction: the whitening order is not a permutation of [0, ", d_in,
            "): column ", j, j < 0 || j >= d_in ? " is out of range" : " repeats"));
      }
      seen[j] = 1;
    }
  }
  if (o.gram_error_sq >= 0 &&
      (kind != WhiteningKind::kCholesky || o.svd != SvdMethod::kRandomized)) {
    return absl::InvalidArgumentError(
        "error reconstruction: a known output error (gram_error_sq) applies to the randomized SVD "
        "with a Cholesky whitening factor");
  }
  return absl::OkStatus();
}

absl::StatusOr<WhiteningKind> KindOf(const Tensor& s, int64_t d_in) {
  if (!s.defined()) return WhiteningKind::kNone;
  if (s.device() == Device::kCuda && s.dtype() == DType::kF32) {
    if (s.shape() == Shape{d_in, d_in}) return WhiteningKind::kCholesky;
    if (s.shape() == Shape{d_in}) return WhiteningKind::kDiagonal;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "ReconstructError: the whitening factor is ", s.DebugString(), ", expected a CUDA F32 [",
      d_in, ", ", d_in, "] (Cholesky) or [", d_in, "] (diagonal) tensor, or none"));
}

// A Cholesky factor: finite lower triangle, non-zero diagonal (the solve divides by it). A
// diagonal one: finite and >= 0 (engine::DiagonalWhitening's rule).
absl::Status CheckWhitening(const QuantContext& ctx, const Tensor& s, WhiteningKind kind) {
  if (kind == WhiteningKind::kCholesky) {
    const int64_t n = s.dim(0);
    QCAL_RETURN_IF_ERROR(
        CheckFinite(ctx, s.data<float>(), n, "whitening", [&](unsigned long long* first) {
          return LaunchFindNonFiniteLower(s.data<float>(), n, first, ctx.stream);
        }));
    QCAL_ASSIGN_OR_RETURN(auto diag, DownloadDiagonal(ctx, s, "reading the whitening diagonal"));
    for (int64_t j = 0; j < n; ++j) {
      if (diag[j] == 0.0f) {
        return absl::InvalidArgumentError(absl::StrCat(
            "whitening[", j, ", ", j, "] is 0: a triangular whitening factor must be invertible"));
      }
    }
  } else if (kind == WhiteningKind::kDiagonal) {
    QCAL_ASSIGN_OR_RETURN(
        auto values, Download<float>(ctx, s.raw(), s.numel(), "reading the diagonal whitening"));
    for (size_t j = 0; j < values.size(); ++j) {
      if (!std::isfinite(values[j]) || values[j] < 0) {
        return absl::InvalidArgumentError(absl::StrCat("whitening: mean |x| of channel ", j, " is ",
                                                       values[j], " (must be finite and >= 0)"));
      }
    }
  }
  return absl::OkStatus();
}

// The full SVD of m (row-major [d_out, d_in], destroyed). Column-major, m is Mᵀ [d_in, d_out];
// gesvd takes a tall matrix, so Mᵀ = V Σ Uᵀ is factored when d_in >= d_out, else a transposed
// copy M = U Σ Vᵀ.
absl::StatusOr<Factors> FullSvd(const QuantContext& ctx, Solver& solver, Tensor& m, int64_t d_out,
                                int64_t d_in, int64_t r) {
  const double one = 1.0, zero = 0.0;
  const bool wide = d_in >= d_out;
  const int64_t rows = wide ? d_in : d_out, k = wide ? d_out : d_in;
  Tensor t = m;
  if (!wide) {
    QCAL_ASSIGN_OR_RETURN(t, ctx.alloc(DType::kF64, {d_in, d_out}));
    QCAL_RETURN_IF_ERROR(CublasStatus(
        cublasDgeam(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(d_out),
                    static_cast<int>(d_in), &one, m.data<double>(), static_cast<int>(d_in), &zero,
                    t.data<double>(), static_cast<int>(d_out), t.data<double>(),
                    static_cast<int>(d_out)),
        "transposing E·S"));
    m = Tensor();  // release it early: the SVD's workspace is large
  }
  QCAL_ASSIGN_OR_RETURN(Tensor u, ctx.alloc(DType::kF64, {k, rows}));
  QCAL_ASSIGN_OR_RETURN(Tensor vt, ctx.alloc(DType::kF64, {k, k}));
  QCAL_ASSIGN_OR_RETURN(Tensor sigma, ctx.alloc(DType::kF64, {k}));
  QCAL_RETURN_IF_ERROR(solver.Svd(t.data<double>(), rows, k, u.data<double>(), sigma.data<double>(),
                                  vt.data<double>()));
  QCAL_RETURN_IF_ERROR(solver.Check());
  t = Tensor();

  Factors f;
  QCAL_ASSIGN_OR_RETURN(f.a, ctx.alloc(DType::kF64, {d_out, r}));
  const int ri = static_cast<int>(r), ki = static_cast<int>(k);
  if (wide) {
    // Mᵀ = u Σ vt: U = vtᵀ, V = u. Column-major, L_A is [r, d_out] = diag(σ_r) · vt[:r, :].
    QCAL_RETURN_IF_ERROR(CublasStatus(
        cublasDdgmm(ctx.blas, CUBLAS_SIDE_LEFT, ri, static_cast<int>(d_out), vt.data<double>(), ki,
                    sigma.data<double>(), 1, f.a.data<double>(), ri),
        "scaling U"));
    // V_rᵀ row-major [r, d_in] is V_r column-major: u's first r columns.
    f.b = u;
  } else {
    // M = u Σ vt: U = u, V = vtᵀ. L_A column-major [r, d_out] = (u[:, :r] Σ_r)ᵀ.
    QCAL_RETURN_IF_ERROR(
        CublasStatus(cublasDgeam(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, ri, static_cast<int>(d_out),
                                 &one, u.data<double>(), static_cast<int>(d_out), &zero,
                                 f.a.data<double>(), ri, f.a.data<double>(), ri),
                     "transposing U"));
    QCAL_RETURN_IF_ERROR(CublasStatus(
        cublasDdgmm(ctx.blas, CUBLAS_SIDE_LEFT, ri, static_cast<int>(d_out), f.a.data<double>(), ri,
                    sigma.data<double>(), 1, f.a.data<double>(), ri),
        "scaling U"));
    // V_r column-major [d_in, r] = (vt[:r, :])ᵀ.
    QCAL_ASSIGN_OR_RETURN(f.b, ctx.alloc(DType::kF64, {r, d_in}));
    QCAL_RETURN_IF_ERROR(CublasStatus(
        cublasDgeam(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(d_in), ri, &one,
                    vt.data<double>(), ki, &zero, f.b.data<double>(), static_cast<int>(d_in),
                    f.b.data<double>(), static_cast<int>(d_in)),
        "transposing Vᵀ"));
  }
  QCAL_ASSIGN_OR_RETURN(f.sigma,
                        Download<double>(ctx, sigma.raw(), k, "reading the singular values"));
  // As the CPU: both sums smallest first.
  double total = 0, tail = 0;
  for (int64_t i = k - 1; i >= 0; --i) {
    total += f.sigma[i] * f.sigma[i];
    if (i >= r) tail += f.sigma[i] * f.sigma[i];
  }
  f.error_before = std::sqrt(total);
  f.error_after = std::sqrt(tail);
  return f;
}

// A = Mᵀ [d_in, d_out] (column-major) for the randomized SVD, by its two products with a thin
// column-major block of k columns: y [d_in, k] = A·z and z [d_out, k] = Aᵀ·y.
struct Operator {
  std::function<absl::Status(const double* z, double* y, int64_t k)> times;
  std::function<absl::Status(const double* y, double* z, int64_t k)> transposed_times;
};

// A over a formed M (row-major [d_out, d_in], which is A column-major).
Operator FormedOperator(const QuantContext& ctx, const double* m, int64_t d_out, int64_t d_in) {
  const int n_in = static_cast<int>(d_in), n_out = static_cast<int>(d_out);
  Operator op;
  op.times = [&ctx, m, n_in, n_out](const double* z, double* y, int64_t k) {
    const double one = 1.0, zero = 0.0;
    return CublasStatus(cublasDgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, n_in, static_cast<int>(k),
                                    n_out, &one, m, n_in, z, n_out, &zero, y, n_in),
                        "randomized SVD: A Z");
  };
  op.transposed_times = [&ctx, m, n_in, n_out](const double* y, double* z, int64_t k) {
    const double one = 1.0, zero = 0.0;
    return CublasStatus(cublasDgemm(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, static_cast<int>(k),
                                    n_in, &one, m, n_in, y, n_in, &zero, z, n_out),
                        "randomized SVD: Aᵀ Y");
  };
  return op;
}

// out [n, k] = T·in [n, k] (column-major, leading dimension n) for the column-major upper
// triangular T = the buffer of the row-major lower s [n, n] (strict upper triangle 0), or
// out = Tᵀ·in when `transpose`. In row panels J of kPanels, skipping the zero triangle: T[J, J0:]
// or (Tᵀ)[J, :J1] times the matching rows of in, (P + 1) / 2P of a full product, as plain GEMMs
// (MultiplyLower's reason).
absl::Status TriangularTimesThin(const QuantContext& ctx, const double* s, int64_t n,
                                 bool transpose, const double* in, int64_t k, double* out) {
  const int64_t panels = n >= kPanels * kMinPanelWidth ? kPanels : 1;
  const int64_t height = (n + panels - 1) / panels;
  const double one = 1.0, zero = 0.0;
  const int ni = static_cast<int>(n), ki = static_cast<int>(k);
  for (int64_t j0 = 0; j0 < n; j0 += height) {
    const int64_t j1 = std::min(n, j0 + height);
    const int rows = static_cast<int>(j1 - j0);
    cublasStatus_t status;
    if (!transpose) {
      status = cublasDgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, rows, ki, static_cast<int>(n - j0),
                           &one, s + j0 * n + j0, ni, in + j0, ni, &zero, out + j0, ni);
    } else {
      status = cublasDgemm(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, ki, static_cast<int>(j1), &one,
                           s + j0 * n, ni, in, ni, &zero, out + j0, ni);
    }
    QCAL_RETURN_IF_ERROR(CublasStatus(status, "randomized SVD: triangular times thin"));
  }
  return absl::OkStatus();
}

// A = Mᵀ = Sᵀ·Eᵀ without forming M = E·S: e row-major [d_out, d_in] (Eᵀ column-major), s the
// row-major lower S (Sᵀ column-major). A·z = Sᵀ·(Eᵀ·z) and Aᵀ·y = E·(S·y), through `work`
// [d_in, k_max].
Operator ImplicitOperator(const QuantContext& ctx, const double* e, const double* s, int64_t d_out,
                          int64_t d_in, double* work) {
  const int n_in = static_cast<int>(d_in), n_out = static_cast<int>(d_out);
  Operator op;
  op.times = [&ctx, e, s, n_in, n_out, work](const double* z, double* y, int64_t k) {
    const double one = 1.0, zero = 0.0;
    QCAL_RETURN_IF_ERROR(
        CublasStatus(cublasDgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, n_in, static_cast<int>(k),
                                 n_out, &one, e, n_in, z, n_out, &zero, work, n_in),
                     "randomized SVD: Eᵀ Z"));
    return TriangularTimesThin(ctx, s, n_in, /*transpose=*/false, work, k, y);
  };
  op.transposed_times = [&ctx, e, s, n_in, n_out, work](const double* y, double* z, int64_t k) {
    const double one = 1.0, zero = 0.0;
    QCAL_RETURN_IF_ERROR(TriangularTimesThin(ctx, s, n_in, /*transpose=*/true, y, k, work));
    return CublasStatus(cublasDgemm(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, static_cast<int>(k),
                                    n_in, &one, e, n_in, work, n_in, &zero, z, n_out),
                        "randomized SVD: E (S Y)");
  };
  return op;
}

// The randomized SVD of M [d_out, d_in] given as the operator of A = Mᵀ, with ‖M‖_F known
// (error_before). A = V Σ Uᵀ; the range finder works on A's column space (V's side): Y = A Ω,
// Z = Aᵀ Y, ..., Bᵀ = Aᵀ Q = Q₂ R, R = U_R Σ V_Rᵀ, so that V ≈ Q V_R and U ≈ Q₂ U_R.
//
// With `pullback` (A = Sᵀ·Eᵀ for a Cholesky whitening S): the last sketch is Y = A·Z = Sᵀ·Eᵀ·Z
// and its QR gives Q = Y·R_Y⁻¹, so S⁻ᵀ·Q = Eᵀ·Z·R_Y⁻¹ and S⁻ᵀ·V_r = Eᵀ·P for
// P = Z·R_Y⁻¹·V_R[:, :r] (d_out x r). L_B = V_rᵀ·S⁻¹ is then one product with E instead of a
// triangular solve with S (whose d_in / 64 dependent block steps took 1.2 ms a 4096-wide linear
// and 3.3 ms an 11,008-wide one on an H100). R_Y⁻¹ is applied only when CholeskyQR2 accepted
// that sketch (WellConditioned: only while CholeskyQR2 is stable, about κ(Y) < 1e8, so R_Y⁻¹
// costs at most about κ(Y)·1e-16); otherwise f.b holds V_r for the solve.
absl::StatusOr<Factors> RandomizedSvd(const QuantContext& ctx, Solver& solver, const Operator& op,
                                      double error_before, int64_t d_out, int64_t d_in, int64_t r,
                                      const LowRankOptions& options, bool pullback) {
  const int64_t k = std::min<int64_t>(r + options.oversample, std::min(d_out, d_in));
  const int n_in = static_cast<int>(d_in), n_out = static_cast<int>(d_out);
  const int ki = static_cast<int>(k), ri = static_cast<int>(r);
  const double one = 1.0, zero = 0.0;
  Factors f;
  f.error_before = error_before;

  QCAL_ASSIGN_OR_RETURN(Tensor y, ctx.alloc(DType::kF64, {k, d_in}));   // [d_in, k] col-major
  QCAL_ASSIGN_OR_RETURN(Tensor z, ctx.alloc(DType::kF64, {k, d_out}));  // [d_out, k] col-major
  QCAL_RETURN_IF_ERROR(
      CudaStatus(LaunchGaussian(z.data<double>(), k * d_out, options.seed, ctx.stream),
                 "drawing the test matrix"));
  double* yp = y.data<double>();
  double* zp = z.data<double>();
  auto sketch = [&]() { return op.times(zp, yp, k); };              // Y = A Z
  auto project = [&]() { return op.transposed_times(yp, zp, k); };  // Z = Aᵀ Y
  // With `pullback`: the last sketch's R_Y, and the Z it was taken from (project() overwrites z).
  Tensor ry, z_last;
  if (pullback) {
    QCAL_ASSIGN_OR_RETURN(ry, ctx.alloc(DType::kF64, {k, k}));
    QCAL_ASSIGN_OR_RETURN(z_last, ctx.alloc(DType::kF64, {k, d_out}));
  }
  auto orthonormalize_y = [&](bool last) {
    return solver.CholeskyQr(yp, d_in, k, last && pullback ? ry.data<double>() : nullptr);
  };
  QCAL_RETURN_IF_ERROR(sketch());
  QCAL_ASSIGN_OR_RETURN(bool y_accepted, orthonormalize_y(options.power_iterations == 0));
  for (int it = 0; it < options.power_iterations; ++it) {
    QCAL_RETURN_IF_ERROR(project());
    QCAL_RETURN_IF_ERROR(solver.CholeskyQr(zp, d_out, k).status());
    QCAL_RETURN_IF_ERROR(sketch());
    QCAL_ASSIGN_OR_RETURN(y_accepted, orthonormalize_y(it + 1 == options.power_iterations));
  }
  pullback = pullback && y_accepted;
  if (pullback) {
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(z_last.raw(), zp, z_last.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream),
        "randomized SVD: keeping the last sketch's Z"));
  }
  // Bᵀ = Aᵀ Q = Q₂ R (z becomes Q₂), then R = U_R Σ V_Rᵀ.
  QCAL_RETURN_IF_ERROR(project());
  QCAL_ASSIGN_OR_RETURN(Tensor rm, ctx.alloc(DType::kF64, {k, k}));
  QCAL_RETURN_IF_ERROR(solver.CholeskyQr(zp, d_out, k, rm.data<double>()).status());
  QCAL_ASSIGN_OR_RETURN(Tensor ur, ctx.alloc(DType::kF64, {k, k}));
  QCAL_ASSIGN_OR_RETURN(Tensor vr, ctx.alloc(DType::kF64, {k, k}));
  QCAL_ASSIGN_OR_RETURN(Tensor sigma, ctx.alloc(DType::kF64, {k}));
  QCAL_RETURN_IF_ERROR(solver.SmallSvd(rm.data<double>(), k, ur.data<double>(),
                                       sigma.data<double>(), vr.data<double>()));
  QCAL_RETURN_IF_ERROR(solver.Check());

  // L_A column-major [r, d_out] = (Q₂ U_R[:, :r] Σ_r)ᵀ = (U_R[:, :r] Σ_r)ᵀ Q₂ᵀ.
  QCAL_RETURN_IF_ERROR(
      CublasStatus(cublasDdgmm(ctx.blas, CUBLAS_SIDE_RIGHT, ki, ri, ur.data<double>(), ki,
                               sigma.data<double>(), 1, ur.data<double>(), ki),
                   "scaling U_R"));
  QCAL_ASSIGN_OR_RETURN(f.a, ctx.alloc(DType::kF64, {d_out, r}));
  QCAL_RETURN_IF_ERROR(
      CublasStatus(cublasDgemm(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_T, ri, n_out, ki, &one,
                               ur.data<double>(), ki, zp, n_out, &zero, f.a.data<double>(), ri),
                   "randomized SVD: L_A"));
  if (pullback) {
    // P column-major [d_out, r] = Z·(R_Y⁻¹·V_R[:, :r]); V_R's first r columns are contiguous.
    QCAL_RETURN_IF_ERROR(
        CublasStatus(cublasDtrsm(ctx.blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                                 CUBLAS_DIAG_NON_UNIT, ki, ri, &one, ry.data<double>(), ki,
                                 vr.data<double>(), ki),
                     "randomized SVD: R_Y⁻¹ V_R"));
    QCAL_ASSIGN_OR_RETURN(f.pullback, ctx.alloc(DType::kF64, {r, d_out}));
    QCAL_RETURN_IF_ERROR(CublasStatus(
        cublasDgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, n_out, ri, ki, &one, z_last.data<double>(),
                    n_out, vr.data<double>(), ki, &zero, f.pullback.data<double>(), n_out),
        "randomized SVD: Z R_Y⁻¹ V_R"));
  } else {
    // V_r column-major [d_in, r] = Q V_R[:, :r].
    QCAL_ASSIGN_OR_RETURN(f.b, ctx.alloc(DType::kF64, {r, d_in}));
    QCAL_RETURN_IF_ERROR(
        CublasStatus(cublasDgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, n_in, ri, ki, &one, yp, n_in,
                                 vr.data<double>(), ki, &zero, f.b.data<double>(), n_in),
                     "randomized SVD: V_r"));
  }
  QCAL_ASSIGN_OR_RETURN(auto sigma_host,
                        Download<double>(ctx, sigma.raw(), k, "reading the singular values"));
  f.sigma.assign(sigma_host.begin(), sigma_host.begin() + r);
  double kept = 0;
  for (int64_t i = r - 1; i >= 0; --i) kept += f.sigma[i] * f.sigma[i];
  f.error_after = std::sqrt(std::max(0.0, f.error_before * f.error_before - kept));
  return f;
}

// b [n, k] (column-major, leading dimension n) := T⁻¹·b for the column-major upper triangle t
// [n, n]: the diagonal blocks' inverses (LaunchInvertUpperDiagonalBlocks), then block back
// substitution in one launch (LaunchSolveUpperByBlocks). cublasDtrsm with 64 right-hand sides ran
// its diagonal blocks through a single-block kernel, 90 µs each (1.6 ms at n = 4096 on an H100);
// the same blocks as two DGEMMs a step were bound by the 128 launches (about 12 µs apart, 1.5 ms;
// docs/BENCHMARKS.md, thirty-third session).
absl::Status SolveUpper(const QuantContext& ctx, const double* t, int64_t n, double* b, int64_t k) {
  const int64_t blocks = (n + kTriBlock - 1) / kTriBlock;
  QCAL_ASSIGN_OR_RETURN(Tensor inv, ctx.alloc(DType::kF64, {blocks, kTriBlock, kTriBlock}));
  QCAL_ASSIGN_OR_RETURN(Tensor ready, ctx.alloc(DType::kI32, {SolveUpperByBlocksWords(n, k)}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(LaunchInvertUpperDiagonalBlocks(t, n, inv.data<double>(), ctx.stream),
                 "ReconstructError: the diagonal blocks' inverses"));
  return CudaStatus(
      LaunchSolveUpperByBlocks(t, n, inv.data<double>(), b, k, ready.data<int32_t>(), ctx.stream),
      "ReconstructError: the blocked back substitution");
}

// δ = damp · mean(diag G) of the square gram, its diagonal summed in double in column order.
absl::StatusOr<double> DeltaOf(const QuantContext& ctx, const Tensor& gram, double damp) {
  QCAL_ASSIGN_OR_RETURN(auto diag, DownloadDiagonal(ctx, gram, "reading the Gram diagonal"));
  double diag_sum = 0;
  for (float d : diag) diag_sum += static_cast<double>(d);
  return damp * (diag_sum / static_cast<double>(gram.dim(0)));
}

}  // namespace

absl::StatusOr<double> WhiteningDelta(const QuantContext& ctx, const Tensor& gram, double damp) {
  if (!std::isfinite(damp) || damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("whitening: damp must be >= 0, got ", damp));
  }
  QCAL_RETURN_IF_ERROR(ExpectMatrix(gram, "WhiteningDelta", "gram"));
  if (gram.dim(1) != gram.dim(0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("WhiteningDelta: gram ", gram.DebugString(), " is not square"));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  return DeltaOf(ctx, gram, damp);
}

absl::StatusOr<Tensor> CholeskyWhitening(const QuantContext& ctx, const Tensor& gram, double damp) {
  if (!std::isfinite(damp) || damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("whitening: damp must be >= 0, got ", damp));
  }
  QCAL_RETURN_IF_ERROR(ExpectMatrix(gram, "CholeskyWhitening", "gram"));
  const int64_t n = gram.dim(0);
  if (gram.dim(1) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("CholeskyWhitening: gram ", gram.DebugString(), " is not square"));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(ctx, gram, /*upper_only=*/true, "whitening: gram"));
  QCAL_ASSIGN_OR_RETURN(const double delta, DeltaOf(ctx, gram, damp));

  // G + δI in the row-major lower triangle, which is the column-major upper triangle: potrf(upper)
  // there computes Uᵀ U = A, and the column-major U read row-major is the lower L with L Lᵀ = A.
  QCAL_ASSIGN_OR_RETURN(Tensor a, ctx.alloc(DType::kF64, {n, n}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(LaunchLowerFromUpper(gram.data<float>(), n, delta, a.data<double>(), ctx.stream),
                 "CholeskyWhitening: assembling G + δI"));
  SolverParams params;
  QCAL_RETURN_IF_ERROR(params.Create());
  size_t device_bytes = 0, host_bytes = 0;
  QCAL_RETURN_IF_ERROR(CusolverStatus(
      cusolverDnXpotrf_bufferSize(ctx.solver, params.get(), CUBLAS_FILL_MODE_UPPER, n, CUDA_R_64F,
                                  a.raw(), n, CUDA_R_64F, &device_bytes, &host_bytes),
      "cusolverDnXpotrf_bufferSize"));
  QCAL_ASSIGN_OR_RETURN(
      Tensor work,
      ctx.alloc(DType::kU8, {static_cast<int64_t>(std::max<size_t>(device_bytes, 1))}));
  std::vector<char> host(std::max<size_t>(host_bytes, 1));
  QCAL_ASSIGN_OR_RETURN(Tensor info, ctx.alloc(DType::kI32, {1}));
  QCAL_RETURN_IF_ERROR(
      CusolverStatus(cusolverDnXpotrf(ctx.solver, params.get(), CUBLAS_FILL_MODE_UPPER, n,
                                      CUDA_R_64F, a.raw(), n, CUDA_R_64F, work.raw(), device_bytes,
                                      host.data(), host_bytes, info.data<int32_t>()),
                     absl::StrCat("cusolverDnXpotrf n=", n)));
  QCAL_ASSIGN_OR_RETURN(auto code, Download<int32_t>(ctx, info.raw(), 1, "cusolverDnXpotrf"));
  if (code[0] > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "whitening: the input Gram matrix plus damping (delta ", delta,
        ") is not positive definite (leading minor ", code[0], " of ", n, "); raise damp"));
  }
  if (code[0] < 0) {
    return absl::InternalError(
        absl::StrCat("whitening: cusolverDnXpotrf argument ", -code[0], " is invalid"));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor s, ctx.alloc(DType::kF32, {n, n}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(LaunchLowerToF32(a.data<double>(), n, s.data<float>(), ctx.stream),
                 "CholeskyWhitening: rounding the factor"));
  return s;
}

absl::StatusOr<LowRankTensors> ReconstructError(const QuantContext& ctx, const Tensor& w,
                                                const Tensor& w_hat, const Tensor& whitening,
                                                const LowRankOptions& options) {
  QCAL_RETURN_IF_ERROR(ValidateOptions(options));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "ReconstructError", "w"));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w_hat, "ReconstructError", "w_hat"));
  if (w_hat.shape() != w.shape()) {
    return absl::InvalidArgumentError(absl::StrCat("ReconstructError: w_hat ", w_hat.DebugString(),
                                                   " does not match w ", w.DebugString()));
  }
  const int64_t d_out = w.dim(0), d_in = w.dim(1);
  QCAL_ASSIGN_OR_RETURN(WhiteningKind kind, KindOf(whitening, d_in));
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(ctx, w, /*upper_only=*/false, "weight"));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(ctx, w_hat, /*upper_only=*/false, "quantized weight"));
  QCAL_RETURN_IF_ERROR(ValidateCholeskyOptions(options, kind, d_in));
  QCAL_RETURN_IF_ERROR(CheckWhitening(ctx, whitening, kind));
  const int64_t r = std::min<int64_t>(options.rank, std::min(d_out, d_in));
  Tensor order;
  if (!options.whitening_order.empty()) {
    QCAL_ASSIGN_OR_RETURN(order, Upload(ctx, options.whitening_order, DType::kI32));
  }
  const int32_t* order_p = order.defined() ? order.data<int32_t>() : nullptr;
  // The range finder applies S by thin products where ‖E·S‖ is known without M.
  const bool implicit = options.gram_error_sq >= 0;

  // The products and the solve take both operands in one precision: S in double, with its strict
  // upper triangle (never read from the caller's tensor) set to 0.
  Tensor s64;
  if (kind == WhiteningKind::kCholesky) {
    QCAL_ASSIGN_OR_RETURN(s64, ctx.alloc(DType::kF64, {d_in, d_in}));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(LaunchLowerToF64(whitening.data<float>(), d_in, s64.data<double>(), ctx.stream),
                   "ReconstructError: widening S"));
  }
  // E (its columns in the whitening order, if any), then M = E·S, row-major [d_out, d_in], unless
  // the range finder applies S itself.
  QCAL_ASSIGN_OR_RETURN(Tensor e, ctx.alloc(DType::kF64, {d_out, d_in}));
  QCAL_RETURN_IF_ERROR(CudaStatus(
      LaunchWhitenedDifference(w.data<float>(), w_hat.data<float>(), d_out, d_in,
                               kind == WhiteningKind::kDiagonal ? whitening.data<float>() : nullptr,
                               order_p, e.data<double>(), ctx.stream),
      "ReconstructError: E"));
  Tensor m;
  if (kind == WhiteningKind::kCholesky && !implicit) {
    QCAL_ASSIGN_OR_RETURN(m, ctx.alloc(DType::kF64, {d_out, d_in}));
    QCAL_RETURN_IF_ERROR(
        MultiplyLower(ctx, e.data<double>(), s64.data<double>(), d_out, d_in, m.data<double>()));
    // E stays for L_B (RandomizedSvd's pullback); the full SVD solves with S instead.
    if (options.svd == SvdMethod::kFull) e = Tensor();
  } else if (!implicit) {
    m = std::move(e);
  }

  // Info words: one SVD (kFull); two per QR that falls back to Householder, 2 + 4q + 2 of them at
  // most, and one SVD (kRandomized).
  Solver solver(ctx);
  QCAL_RETURN_IF_ERROR(
      solver.Init(options.svd == SvdMethod::kFull ? 1 : 4 * options.power_iterations + 5));
  Factors f;
  if (options.svd == SvdMethod::kFull) {
    QCAL_ASSIGN_OR_RETURN(f, FullSvd(ctx, solver, m, d_out, d_in, r));
  } else if (implicit) {
    // ‖E·S‖² = tr(E·S·Sᵀ·Eᵀ) = tr(E·G·Eᵀ) + δ‖E‖².
    double e_norm = 0;
    QCAL_RETURN_IF_ERROR(CublasStatus(
        cublasDnrm2_64(ctx.blas, d_out * d_in, e.data<double>(), 1, &e_norm), "cublasDnrm2 of E"));
    const double before =
        std::sqrt(std::max(0.0, options.gram_error_sq + options.whitening_delta * e_norm * e_norm));
    const int64_t k = std::min<int64_t>(r + options.oversample, std::min(d_out, d_in));
    QCAL_ASSIGN_OR_RETURN(Tensor work, ctx.alloc(DType::kF64, {k, d_in}));
    const Operator op = ImplicitOperator(ctx, e.data<double>(), s64.data<double>(), d_out, d_in,
                                         work.data<double>());
    QCAL_ASSIGN_OR_RETURN(f, RandomizedSvd(ctx, solver, op, before, d_out, d_in, r, options,
                                           kind == WhiteningKind::kCholesky));
  } else {
    double before = 0;
    QCAL_RETURN_IF_ERROR(
        CublasStatus(cublasDnrm2_64(ctx.blas, d_out * d_in, m.data<double>(), 1, &before),
                     "cublasDnrm2 of E·S"));
    const Operator op = FormedOperator(ctx, m.data<double>(), d_out, d_in);
    QCAL_ASSIGN_OR_RETURN(f, RandomizedSvd(ctx, solver, op, before, d_out, d_in, r, options,
                                           kind == WhiteningKind::kCholesky));
  }
  m = Tensor();

  // L_B = V_rᵀ S⁻¹: column-major L_Bᵀ = S⁻ᵀ V_r, either Eᵀ·P (RandomizedSvd's pullback; Eᵀ is the
  // column-major view of the row-major E) or a solve with the column-major upper Sᵀ.
  if (f.pullback.defined()) {
    const double one = 1.0, zero = 0.0;
    QCAL_ASSIGN_OR_RETURN(f.b, ctx.alloc(DType::kF64, {r, d_in}));
    QCAL_RETURN_IF_ERROR(CublasStatus(
        cublasDgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(d_in), static_cast<int>(r),
                    static_cast<int>(d_out), &one, e.data<double>(), static_cast<int>(d_in),
                    f.pullback.data<double>(), static_cast<int>(d_out), &zero, f.b.data<double>(),
                    static_cast<int>(d_in)),
        "ReconstructError: L_Bᵀ = Eᵀ P"));
  }
  e = Tensor();
  double* b = f.b.data<double>();
  if (kind == WhiteningKind::kCholesky && !f.pullback.defined()) {
    QCAL_RETURN_IF_ERROR(SolveUpper(ctx, s64.data<double>(), d_in, b, r));
  } else if (kind == WhiteningKind::kDiagonal) {
    QCAL_RETURN_IF_ERROR(
        CudaStatus(LaunchDivideColumns(b, r, d_in, whitening.data<float>(), ctx.stream),
                   "ReconstructError: V_rᵀ S⁻¹"));
  }

  LowRankTensors out;
  out.d_out = d_out;
  out.d_in = d_in;
  out.rank = r;
  QCAL_ASSIGN_OR_RETURN(out.a, ctx.alloc(DType::kF32, {d_out, r}));
  QCAL_ASSIGN_OR_RETURN(out.b, ctx.alloc(DType::kF32, {r, d_in}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(LaunchF64ToF32(f.a.data<double>(), d_out * r, out.a.data<float>(), ctx.stream),
                 "ReconstructError: rounding L_A"));
  // L_B's columns back in natural order.
  QCAL_RETURN_IF_ERROR(CudaStatus(
      order_p ? LaunchScatterColumnsToF32(b, r, d_in, order_p, out.b.data<float>(), ctx.stream)
              : LaunchF64ToF32(b, r * d_in, out.b.data<float>(), ctx.stream),
      "ReconstructError: rounding L_B"));
  out.singular_values = std::move(f.sigma);
  out.error_before = f.error_before;
  out.error_after = f.error_after;
  return out;
}

absl::StatusOr<double> LowRankOutputError(const QuantContext& ctx, const Tensor& w,
                                          const Tensor& w_hat, const Tensor& a, const Tensor& b,
                                          const Tensor& gram, double error_sq) {
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "LowRankOutputError", "w"));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w_hat, "LowRankOutputError", "w_hat"));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(a, "LowRankOutputError", "a"));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(b, "LowRankOutputError", "b"));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(gram, "LowRankOutputError", "gram"));
  const int64_t d_out = w.dim(0), d_in = w.dim(1), r = a.dim(1);
  if (w_hat.shape() != w.shape() || a.dim(0) != d_out || b.dim(0) != r || b.dim(1) != d_in ||
      gram.shape() != Shape{d_in, d_in}) {
    return absl::InvalidArgumentError(
        absl::StrCat("LowRankOutputError: w ", w.DebugString(), ", w_hat ", w_hat.DebugString(),
                     ", a ", a.DebugString(), ", b ", b.DebugString(), " and gram ",
                     gram.DebugString(), " do not match"));
  }
  if (!std::isfinite(error_sq) || error_sq < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LowRankOutputError: the output error ‖E·Xᵀ‖² must be finite and >= 0, got ", error_sq));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  // T = G·L_Bᵀ: column-major [d_in, r], which is row-major tt [r, d_in]. G's row-major upper
  // triangle is its column-major lower one.
  QCAL_ASSIGN_OR_RETURN(Tensor tt, ctx.alloc(DType::kF32, {r, d_in}));
  const float one = 1.0f, zero = 0.0f;
  QCAL_RETURN_IF_ERROR(CublasStatus(
      cublasSsymm(ctx.blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, static_cast<int>(d_in),
                  static_cast<int>(r), &one, gram.data<float>(), static_cast<int>(d_in),
                  b.data<float>(), static_cast<int>(d_in), &zero, tt.data<float>(),
                  static_cast<int>(d_in)),
      "LowRankOutputError: G·L_Bᵀ"));
  // E = W − Ŵ first (one rounding an element), so that P = E·T does not cancel W·T against Ŵ·T
  // (E is a few percent of W: that difference of products lost that factor in precision, 2e-5 of
  // ‖E·Xᵀ‖² at 1 x 1 on an H100). P = E·T [d_out, r]; Q = L_B·G·L_Bᵀ = L_B·T [r, r]; then
  // P := 2P − L_A·Q.
  QCAL_ASSIGN_OR_RETURN(Tensor e, ctx.alloc(DType::kF32, {d_out, d_in}));
  const float minus_one = -1.0f;
  QCAL_RETURN_IF_ERROR(
      CublasStatus(cublasSgeam(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(d_in),
                               static_cast<int>(d_out), &one, w.data<float>(),
                               static_cast<int>(d_in), &minus_one, w_hat.data<float>(),
                               static_cast<int>(d_in), e.data<float>(), static_cast<int>(d_in)),
                   "LowRankOutputError: E"));
  QCAL_ASSIGN_OR_RETURN(Tensor p, ctx.alloc(DType::kF32, {d_out, r}));
  QCAL_ASSIGN_OR_RETURN(Tensor q, ctx.alloc(DType::kF32, {r, r}));
  QCAL_RETURN_IF_ERROR(Gemm(ctx.blas, false, true, d_out, r, d_in, 1.0f, e.data<float>(), d_in,
                            tt.data<float>(), d_in, DType::kF32, 0.0f, p.data<float>(), r));
  QCAL_RETURN_IF_ERROR(Gemm(ctx.blas, false, true, r, r, d_in, 1.0f, b.data<float>(), d_in,
                            tt.data<float>(), d_in, DType::kF32, 0.0f, q.data<float>(), r));
  QCAL_RETURN_IF_ERROR(Gemm(ctx.blas, false, false, d_out, r, r, -1.0f, a.data<float>(), r,
                            q.data<float>(), r, DType::kF32, 2.0f, p.data<float>(), r));
  // ‖(E − L_A·L_B)·Xᵀ‖² = ‖E·Xᵀ‖² − 2⟨L_A, E·G·L_Bᵀ⟩ + ⟨L_A, L_A·L_B·G·L_Bᵀ⟩ = error_sq − ⟨L_A, P⟩,
  // the inner product summed in double on the device (one block, a fixed order).
  QCAL_ASSIGN_OR_RETURN(Tensor dot, ctx.alloc(DType::kF64, {1}));
  QCAL_RETURN_IF_ERROR(CudaStatus(
      LaunchDotF64(a.data<float>(), p.data<float>(), d_out * r, dot.data<double>(), ctx.stream),
      "LowRankOutputError: ⟨L_A, P⟩"));
  QCAL_ASSIGN_OR_RETURN(auto dh, Download<double>(ctx, dot.raw(), 1, "LowRankOutputError"));
  return std::sqrt(std::max(0.0, error_sq - dh[0]));
}

absl::Status AddLowRank(const QuantContext& ctx, const Tensor& a, const Tensor& b, Tensor& w) {
  QCAL_RETURN_IF_ERROR(ExpectMatrix(a, "AddLowRank", "a"));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(b, "AddLowRank", "b"));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "AddLowRank", "w"));
  const int64_t d_out = w.dim(0), d_in = w.dim(1), r = a.dim(1);
  if (a.dim(0) != d_out || b.dim(0) != r || b.dim(1) != d_in) {
    return absl::InvalidArgumentError(absl::StrCat("AddLowRank: a ", a.DebugString(), " times b ",
                                                   b.DebugString(), " does not match w ",
                                                   w.DebugString()));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  return Gemm(ctx.blas, /*trans_a=*/false, /*trans_b=*/false, d_out, d_in, r, 1.0f, a.data<float>(),
              r, b.data<float>(), d_in, DType::kF32, 1.0f, w.data<float>(), d_in);
}

absl::StatusOr<ref::SmallSvdResult> SmallSvdOnDevice(const std::vector<double>& a, int64_t k,
                                                     int device) {
  if (k < 1 || k > kSmallSvdMaxK || static_cast<int64_t>(a.size()) != k * k) {
    return absl::InvalidArgumentError(absl::StrCat("SmallSvdOnDevice: ", a.size(),
                                                   " values for k = ", k,
                                                   ", expected k² with 1 <= k <= ", kSmallSvdMaxK));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(device));
  QCAL_ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create());
  // a, u, v [k²], sigma [k], the scratch, and the info and sweep words in the last double.
  const size_t square = static_cast<size_t>(k * k);
  const size_t doubles = 3 * square + k + SmallSvdScratchDoubles(k) + 1;
  double* buffer = nullptr;
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaMalloc(&buffer, doubles * sizeof(double)), "SmallSvdOnDevice: allocating"));
  struct Free {
    double* p;
    ~Free() { cudaFree(p); }
  } free_buffer{buffer};
  double* u = buffer + square;
  double* v = u + square;
  double* sigma = v + square;
  double* scratch = sigma + k;
  auto* words = reinterpret_cast<int32_t*>(scratch + SmallSvdScratchDoubles(k));
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(buffer, a.data(), square * sizeof(double),
                                                  cudaMemcpyHostToDevice, stream.get()),
                                  "SmallSvdOnDevice: uploading"));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(LaunchSmallSvd(buffer, k, scratch, u, sigma, v, words, words + 1, stream.get()),
                 "SmallSvdOnDevice: the Jacobi SVD"));
  ref::SmallSvdResult result;
  result.u.resize(square);
  result.v.resize(square);
  result.sigma.resize(static_cast<size_t>(k));
  int32_t host_words[2] = {0, 0};
  const std::pair<void*, const void*> copies[] = {
      {result.u.data(), u}, {result.v.data(), v}, {result.sigma.data(), sigma}};
  const size_t sizes[] = {square, square, static_cast<size_t>(k)};
  for (int i = 0; i < 3; ++i) {
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(copies[i].first, copies[i].second, sizes[i] * sizeof(double),
                                   cudaMemcpyDeviceToHost, stream.get()),
                   "SmallSvdOnDevice: downloading"));
  }
  QCAL_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(host_words, words, sizeof(host_words), cudaMemcpyDeviceToHost, stream.get()),
      "SmallSvdOnDevice: downloading"));
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream.get()), "SmallSvdOnDevice"));
  result.converged = (host_words[0] & 1) == 0;
  result.finite = (host_words[0] & 2) == 0;
  result.sweeps = host_words[1];
  return result;
}

}  // namespace qcal::kernels::cuda
