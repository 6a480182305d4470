#include "kernels/cuda/cuda_quant.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/cuda_resources.h"
#include "kernels/cuda/gptq.cuh"
#include "kernels/cuda/low_rank.cuh"
#include "kernels/cuda/output_error.cuh"
#include "kernels/cuda/solver_util.h"

namespace qcal::kernels::cuda {
namespace {

// Column panels of the lower-triangle products (S = EᵀE): panel p forms rows [p·T, (p+1)·T) of
// S against every earlier column, (P + 1) / 2P of the full product.
constexpr int64_t kPanels = 8;
constexpr int64_t kMinPanelWidth = 128;

// The output tensors of a quantized weight, allocated on the device.
absl::StatusOr<QuantizedTensors> NewQuantized(const QuantContext& ctx, int64_t d_out, int64_t d_in,
                                              const QuantSpec& spec) {
  QuantizedTensors q;
  q.d_out = d_out;
  q.d_in = d_in;
  q.group_size = EffectiveGroupSize(spec, d_in);
  q.n_groups = NumGroups(spec, d_in);
  QCAL_ASSIGN_OR_RETURN(q.codes, ctx.alloc(DType::kU8, {d_out, d_in}));
  QCAL_ASSIGN_OR_RETURN(q.dequantized, ctx.alloc(DType::kF32, {d_out, d_in}));
  QCAL_ASSIGN_OR_RETURN(q.scales, ctx.alloc(DType::kF32, {q.n_groups, d_out}));
  QCAL_ASSIGN_OR_RETURN(q.zeros, ctx.alloc(DType::kI32, {q.n_groups, d_out}));
  q.g_idx.resize(static_cast<size_t>(d_in));
  for (int64_t j = 0; j < d_in; ++j) q.g_idx[j] = static_cast<int32_t>(j / q.group_size);
  return q;
}

absl::Status ScaleOverflowError(int64_t row, int64_t group) {
  return absl::InvalidArgumentError(
      absl::StrCat("weight row ", row, ", group ", group,
                   ": value range too large for an fp16 scale (max 65504)"));
}

// Device workspace and info word of the two cuSOLVER calls, sized once per factorization.
struct SolverWork {
  Tensor device;
  std::vector<char> host;
  size_t device_bytes = 0;
  Tensor info;
};

absl::StatusOr<SolverWork> NewSolverWork(const QuantContext& ctx, cusolverDnParams_t params,
                                         float* a, int64_t n) {
  size_t potrf_device = 0, potrf_host = 0, trtri_device = 0, trtri_host = 0;
  QCAL_RETURN_IF_ERROR(CusolverStatus(
      cusolverDnXpotrf_bufferSize(ctx.solver, params, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F, a, n,
                                  CUDA_R_32F, &potrf_device, &potrf_host),
      "cusolverDnXpotrf_bufferSize"));
  QCAL_RETURN_IF_ERROR(CusolverStatus(
      cusolverDnXtrtri_bufferSize(ctx.solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n,
                                  CUDA_R_32F, a, n, &trtri_device, &trtri_host),
      "cusolverDnXtrtri_bufferSize"));
  SolverWork work;
  work.device_bytes = std::max<size_t>({potrf_device, trtri_device, 1});
  QCAL_ASSIGN_OR_RETURN(work.device,
                        ctx.alloc(DType::kU8, {static_cast<int64_t>(work.device_bytes)}));
  work.host.resize(std::max<size_t>({potrf_host, trtri_host, 1}));
  QCAL_ASSIGN_OR_RETURN(work.info, ctx.alloc(DType::kI32, {1}));
  return work;
}

// The widest run of lazy blocks whose errors update the later columns in one product (GptqSolve).
constexpr int64_t kSuperBlock = 1024;

// Below this width a triangle is inverted by cusolverDnXtrtri itself.
constexpr int64_t kTrtriBase = 512;

// The lower triangle of the column-major n × n matrix at x (leading dimension ld) replaced by its
// inverse: inv([A 0; B C]) = [A⁻¹ 0; -C⁻¹·B·A⁻¹ C⁻¹], the halves recursively, the off-diagonal
// block by two fp32 TRMMs through `scratch` (at least (n / 2 + 1) × (n / 2) floats), down to
// kTrtriBase, below which cusolverDnXtrtri runs. All but O(n² · kTrtriBase) of the n³/3
// multiply-adds are TRMM products: the 7B shape's factorizations took 2.1 s against 4.0 s with
// cusolverDnXtrtri on the whole triangle (H100; docs/BENCHMARKS.md, "three solver levers"). The
// info word holds the last base case's; after a successful potrf every diagonal entry is positive,
// so no base case can meet a zero pivot.
absl::Status InvertLower(const QuantContext& ctx, SolverWork& work, float* x, int64_t n, int64_t ld,
                         float* scratch) {
  if (n <= kTrtriBase) {
    return CusolverStatus(
        cusolverDnXtrtri(ctx.solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F, x,
                         ld, work.device.raw(), work.device_bytes, work.host.data(),
                         work.host.size(), work.info.data<int32_t>()),
        absl::StrCat("cusolverDnXtrtri n=", n));
  }
  const int64_t n1 = n / 2, n2 = n - n1;
  float* a = x;
  float* b = x + n1;
  float* c = x + n1 + n1 * ld;
  QCAL_RETURN_IF_ERROR(InvertLower(ctx, work, a, n1, ld, scratch));
  QCAL_RETURN_IF_ERROR(InvertLower(ctx, work, c, n2, ld, scratch));
  QCAL_RETURN_IF_ERROR(
      TrmmLowerF32(ctx.blas, /*right=*/true, n2, n1, 1.0f, a, ld, b, ld, scratch, n2));
  return TrmmLowerF32(ctx.blas, /*right=*/false, n2, n1, -1.0f, c, ld, scratch, n2, b, ld);
}

// Whether the info word of the last solver call is 0 (success).
absl::StatusOr<bool> InfoOk(const QuantContext& ctx, const SolverWork& work, const char* what) {
  QCAL_ASSIGN_OR_RETURN(auto info, Download<int32_t>(ctx, work.info.raw(), 1, what));
  if (info[0] < 0) {
    return absl::InternalError(absl::StrCat(what, ": invalid argument ", -info[0]));
  }
  return info[0] == 0;
}

}  // namespace

absl::StatusOr<GptqFactor> GptqFactorize(const QuantContext& ctx, const Tensor& h,
                                         const GptqSolveOptions& options) {
  if (!std::isfinite(options.damp) || options.damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("gptq.damp must be >= 0, got ", options.damp));
  }
  QCAL_RETURN_IF_ERROR(ExpectMatrix(h, "GptqFactorize", "the Hessian"));
  const int64_t n = h.dim(0);
  if (h.dim(1) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GptqFactorize: the Hessian ", h.DebugString(), " is not square"));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(ctx, h, /*upper_only=*/true, "hessian"));

  // 1-2. Dead and outlier columns, visiting order: decided on the host from the diagonal.
  std::vector<float> diag(static_cast<size_t>(n));
  QCAL_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpy2DAsync(diag.data(), sizeof(float), h.data<float>(), (n + 1) * sizeof(float),
                        sizeof(float), n, cudaMemcpyDeviceToHost, ctx.stream),
      "reading the Hessian's diagonal"));
  QCAL_RETURN_IF_ERROR(Sync(ctx, "reading the Hessian's diagonal"));
  GptqFactor f;
  f.n = n;
  f.act_order = options.act_order;
  QCAL_ASSIGN_OR_RETURN(const double diag_mean,
                        PlanGptqColumns(
                            n, [&](int64_t j) { return diag[j]; }, options, f));

  // 3-4. Damping and U, retried with more damping like the CPU.
  QCAL_ASSIGN_OR_RETURN(Tensor perm, Upload(ctx, f.perm, DType::kI32));
  QCAL_ASSIGN_OR_RETURN(Tensor removed, Upload(ctx, f.removed, DType::kU8));
  QCAL_ASSIGN_OR_RETURN(Tensor a, ctx.alloc(DType::kF32, {n, n}));
  SolverParams params;
  QCAL_RETURN_IF_ERROR(params.Create());
  QCAL_ASSIGN_OR_RETURN(SolverWork work, NewSolverWork(ctx, params.get(), a.data<float>(), n));
  QCAL_ASSIGN_OR_RETURN(Tensor scratch,
                        ctx.alloc(DType::kF32, {n > kTrtriBase ? (n / 2 + 1) * (n / 2) : 1}));
  double lambda = options.damp;
  bool factored = false;
  for (int attempt = 0; attempt < 3 && !factored; ++attempt) {
    if (attempt > 0) {
      if (options.damp == 0) break;
      lambda *= 10;
    }
    f.damp_used = lambda;
    QCAL_RETURN_IF_ERROR(CudaStatus(
        LaunchBuildReversedHessian(h.data<float>(), n, perm.data<int32_t>(),
                                   removed.data<uint8_t>(), static_cast<float>(lambda * diag_mean),
                                   a.data<float>(), ctx.stream),
        "GptqFactorize: building the damped Hessian"));
    QCAL_RETURN_IF_ERROR(CusolverStatus(
        cusolverDnXpotrf(ctx.solver, params.get(), CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F,
                         a.data<float>(), n, CUDA_R_32F, work.device.raw(), work.device_bytes,
                         work.host.data(), work.host.size(), work.info.data<int32_t>()),
        absl::StrCat("cusolverDnXpotrf n=", n)));
    QCAL_ASSIGN_OR_RETURN(bool ok, InfoOk(ctx, work, "cusolverDnXpotrf"));
    if (ok && attempt == 0 && options.keep_whitening && f.dead_columns == 0 &&
        f.outlier_columns == 0) {
      // a holds J·Hd·J = L·Lᵀ with column-major lower L: the whitening factor before it is
      // inverted in place, in the order a's rows have (position p is column perm[n-1-p]).
      QCAL_ASSIGN_OR_RETURN(f.whitening, ctx.alloc(DType::kF32, {n, n}));
      QCAL_RETURN_IF_ERROR(CudaStatus(
          LaunchLowerFromUpperF32(a.data<float>(), n, f.whitening.data<float>(), ctx.stream),
          "GptqFactorize: keeping the whitening factor"));
      f.whitening_order.resize(static_cast<size_t>(n));
      for (int64_t p = 0; p < n; ++p) f.whitening_order[p] = f.perm[n - 1 - p];
      f.whitening_delta = static_cast<double>(static_cast<float>(lambda * diag_mean));
    }
    if (ok) {
      QCAL_RETURN_IF_ERROR(InvertLower(ctx, work, a.data<float>(), n, n, scratch.data<float>()));
      QCAL_ASSIGN_OR_RETURN(ok, InfoOk(ctx, work, "cusolverDnXtrtri"));
    }
    factored = ok;
    if (!factored) ++f.cholesky_failures;
  }
  if (!factored) {
    return absl::FailedPreconditionError(absl::StrCat(
        "GPTQ: the Hessian [", n, " x ", n, "] is not positive definite even with damping ",
        f.damp_used, " (gptq.damp = ", options.damp,
        "); more calibration data or a larger gptq.damp may help"));
  }
  QCAL_ASSIGN_OR_RETURN(f.u, ctx.alloc(DType::kF32, {n, n}));
  QCAL_RETURN_IF_ERROR(CudaStatus(LaunchExtractU(a.data<float>(), n, f.u.data<float>(), ctx.stream),
                                  "GptqFactorize: extracting U"));
  return f;
}

absl::StatusOr<QuantizedTensors> GptqSolve(const QuantContext& ctx, const Tensor& w,
                                           const GptqFactor& factor, const QuantSpec& spec,
                                           int block_size, bool record_pre_round) {
  QCAL_RETURN_IF_ERROR(ValidateQuantSpec(spec));
  if (block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gptq.block_size must be >= 1, got ", block_size));
  }
  if (block_size > GptqMaxBlockWidth()) {
    return absl::UnimplementedError(absl::StrCat("gptq.block_size ", block_size,
                                                 " exceeds the CUDA solver's limit of ",
                                                 GptqMaxBlockWidth()));
  }
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "GptqSolve", "the weight"));
  const int64_t d_out = w.dim(0), n = w.dim(1);
  if (factor.n != n || factor.u.shape() != Shape{n, n} || factor.u.device() != Device::kCuda ||
      factor.perm.size() != static_cast<size_t>(n) ||
      factor.removed.size() != static_cast<size_t>(n)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GptqSolve: the factor (n = ", factor.n, ") does not match the weight ", w.DebugString()));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(ctx, w, /*upper_only=*/false, "weight"));
  QCAL_ASSIGN_OR_RETURN(QuantizedTensors q, NewQuantized(ctx, d_out, n, spec));
  QCAL_ASSIGN_OR_RETURN(Tensor perm, Upload(ctx, factor.perm, DType::kI32));
  QCAL_ASSIGN_OR_RETURN(Tensor removed, Upload(ctx, factor.removed, DType::kU8));
  QCAL_ASSIGN_OR_RETURN(Tensor wp, ctx.alloc(DType::kF32, {d_out, n}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(LaunchGatherColumns(w.data<float>(), d_out, n, perm.data<int32_t>(),
                                     removed.data<uint8_t>(), wp.data<float>(), ctx.stream),
                 "GptqSolve: permuting the weight"));
  const int64_t bs = block_size;
  if (record_pre_round) {
    QCAL_ASSIGN_OR_RETURN(q.pre_round, ctx.alloc(DType::kF32, {d_out, n}));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor failures, ctx.alloc(DType::kI32, {d_out, 2}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaMemsetAsync(failures.raw(), 0, failures.nbytes(), ctx.stream), "GptqSolve"));

  GptqBlockArgs args;
  args.wp = wp.data<float>();
  args.u = factor.u.data<float>();
  args.n = n;
  args.d_out = d_out;
  args.group_size = q.group_size;
  args.spec = spec;
  args.perm = perm.data<int32_t>();
  args.codes = q.codes.data<uint8_t>();
  args.dequantized = q.dequantized.data<float>();
  args.scales = q.scales.data<float>();
  args.zeros = q.zeros.data<int32_t>();
  args.pre_round = record_pre_round ? q.pre_round.data<float>() : nullptr;
  args.failures = reinterpret_cast<int2*>(failures.data<int32_t>());
  const int64_t g = q.group_size;
  std::vector<int64_t> block_starts, block_ends;
  for (int64_t i1 = 0; i1 < n;) {
    int64_t i2 = std::min(i1 + bs, n);
    // Cut the block before a group that starts inside it and extends past its end (gptq.h).
    const int64_t last_group_start = (i2 - 1) / g * g;
    if (last_group_start > i1 && std::min(last_group_start + g, n) > i2) i2 = last_group_start;
    block_starts.push_back(i1);
    block_ends.push_back(i2);
    i1 = i2;
  }
  // Two levels of lazy updates: the lazy blocks of a super-block (consecutive blocks spanning at
  // most kSuperBlock columns) update only the super-block's later columns; the super-block's
  // errors then update every column after it in one product of depth up to kSuperBlock instead
  // of one product of depth 128 per lazy block (33 TFLOP/s for the first, on an H200); the 7B
  // shape's loops and updates 3.55 -> 3.35 s (docs/BENCHMARKS.md, "three solver levers"). The same
  // updates as one level, summed in another order: GPU-deterministic, not the CPU's bits (the
  // parity tests' bounds decide). Both levels are three-TF32 products (GemmSplitTf32): about
  // fp32's accuracy on the tensor cores, where the SIMT fp32 GEMMs were the largest part of a
  // 70B block's loops (docs/BENCHMARKS.md, thirty-second session).
  const int64_t sb_width = std::max(kSuperBlock, bs);
  QCAL_ASSIGN_OR_RETURN(Tensor err, ctx.alloc(DType::kF32, {d_out, sb_width}));
  QCAL_ASSIGN_OR_RETURN(Tensor err3, ctx.alloc(DType::kF32, {d_out, 3 * sb_width}));
  QCAL_ASSIGN_OR_RETURN(Tensor u3, ctx.alloc(DType::kF32, {3 * sb_width, n}));
  // W[:, c0:c1] -= E[:, k0:k1] U[k0:k1, c0:c1], E's columns counted from the super-block's s0.
  auto update = [&](int64_t s0, int64_t k0, int64_t k1, int64_t c0, int64_t c1) {
    return GemmSplitTf32(ctx.blas, d_out, c1 - c0, k1 - k0, -1.0f, err.data<float>() + (k0 - s0),
                         sb_width, factor.u.data<float>() + k0 * n + c0, n, 1.0f,
                         wp.data<float>() + c0, n, err3.data<float>(), u3.data<float>());
  };
  args.err_ld = sb_width;
  float* e = err.data<float>();
  for (size_t b = 0; b < block_starts.size();) {
    const int64_t s0 = block_starts[b];
    size_t last = b;
    while (last + 1 < block_starts.size() && block_ends[last + 1] - s0 <= sb_width) ++last;
    const int64_t s1 = block_ends[last];
    for (size_t k = b; k <= last; ++k) {
      const int64_t i1 = block_starts[k], i2 = block_ends[k];
      args.i1 = i1;
      args.i2 = i2;
      args.err = e + (i1 - s0);
      QCAL_RETURN_IF_ERROR(
          CudaStatus(LaunchGptqBlock(args, ctx.stream), "GptqSolve: column loop kernel"));
      // The super-block's later columns: W[:, i2:s1] -= E U[i1:i2, i2:s1].
      if (i2 < s1) QCAL_RETURN_IF_ERROR(update(s0, i1, i2, i2, s1));
    }
    // Every column after the super-block: W[:, s1:] -= E U[s0:s1, s1:].
    if (s1 < n) QCAL_RETURN_IF_ERROR(update(s0, s0, s1, s1, n));
    b = last + 1;
  }

  // The CPU reports the first lazy block with a failure, and in it the lowest row.
  QCAL_ASSIGN_OR_RETURN(
      auto fails, Download<int32_t>(ctx, failures.raw(), 2 * d_out, "GptqSolve: reading failures"));
  int64_t worst_block = -1, worst_row = -1;
  for (int64_t o = 0; o < d_out; ++o) {
    if (fails[2 * o] == 0) continue;
    const int64_t block =
        std::upper_bound(block_starts.begin(), block_starts.end(), int64_t{fails[2 * o + 1]}) -
        block_starts.begin();
    if (worst_block < 0 || block < worst_block) {
      worst_block = block;
      worst_row = o;
    }
  }
  if (worst_row >= 0) {
    const int64_t i = fails[2 * worst_row + 1];
    if (fails[2 * worst_row] == kGptqScaleOverflow) return ScaleOverflowError(worst_row, i / g);
    return absl::InvalidArgumentError(
        absl::StrCat("GPTQ: non-finite rounding error at weight row ", worst_row, ", column ",
                     factor.perm[i], " (ill-conditioned Hessian or extreme weights)"));
  }
  if (factor.act_order) {
    for (int64_t p = 0; p < n; ++p) q.g_idx[factor.perm[p]] = static_cast<int32_t>(p / g);
    q.perm = factor.perm;
  }
  return q;
}

absl::StatusOr<QuantizedTensors> QuantizeRtn(const QuantContext& ctx, const Tensor& w,
                                             const QuantSpec& spec) {
  QCAL_RETURN_IF_ERROR(ValidateQuantSpec(spec));
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "QuantizeRtn", "the weight"));
  const int64_t d_out = w.dim(0), d_in = w.dim(1);
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  QCAL_RETURN_IF_ERROR(CheckFiniteMatrix(ctx, w, /*upper_only=*/false, "weight"));
  QCAL_ASSIGN_OR_RETURN(QuantizedTensors q, NewQuantized(ctx, d_out, d_in, spec));
  QCAL_ASSIGN_OR_RETURN(Tensor overflow, ctx.alloc(DType::kI32, {d_out}));
  // 0x7f7f7f7f: larger than any group index, "no overflow".
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaMemsetAsync(overflow.raw(), 0x7f, overflow.nbytes(), ctx.stream), "RTN"));
  QCAL_RETURN_IF_ERROR(CudaStatus(
      LaunchQuantizeRtn(w.data<float>(), d_out, d_in, q.group_size, spec, q.codes.data<uint8_t>(),
                        q.dequantized.data<float>(), q.scales.data<float>(),
                        q.zeros.data<int32_t>(), overflow.data<int32_t>(), ctx.stream),
      "QuantizeRtn kernel"));
  QCAL_ASSIGN_OR_RETURN(
      auto groups, Download<int32_t>(ctx, overflow.raw(), d_out, "QuantizeRtn: reading overflows"));
  for (int64_t o = 0; o < d_out; ++o) {
    if (groups[o] < q.n_groups) return ScaleOverflowError(o, groups[o]);
  }
  return q;
}

absl::StatusOr<double> OutputError(const QuantContext& ctx, const Tensor& w, const Tensor& w_hat,
                                   const Tensor& gram, DType products) {
  if (products != DType::kF32 && products != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("OutputError: unsupported products ", DTypeName(products)));
  }
  QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "OutputError", "w"));
  const int64_t d_out = w.dim(0), d_in = w.dim(1);
  if (w_hat.defined()) {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(w_hat, "OutputError", "w_hat"));
    if (w_hat.shape() != w.shape()) {
      return absl::InvalidArgumentError(absl::StrCat("OutputError: w_hat ", w_hat.DebugString(),
                                                     " does not match w ", w.DebugString()));
    }
  }
  QCAL_RETURN_IF_ERROR(ExpectMatrix(gram, "OutputError", "gram"));
  if (gram.shape() != Shape{d_in, d_in}) {
    return absl::InvalidArgumentError(absl::StrCat("OutputError: gram ", gram.DebugString(),
                                                   " does not match w ", w.DebugString()));
  }
  QCAL_RETURN_IF_ERROR(UseDevice(ctx.device));
  const bool bf16 = products == DType::kBF16;
  QCAL_ASSIGN_OR_RETURN(Tensor e, ctx.alloc(products, {d_out, d_in}));
  const float* w_hat_data = w_hat.defined() ? w_hat.data<float>() : nullptr;
  QCAL_RETURN_IF_ERROR(CudaStatus(
      bf16
          ? LaunchRoundBf16(w.data<float>(), w_hat_data, d_out * d_in, e.raw(), ctx.stream)
          : LaunchRoundTf32(w.data<float>(), w_hat_data, d_out * d_in, e.data<float>(), ctx.stream),
      "OutputError: rounding E"));
  QCAL_ASSIGN_OR_RETURN(Tensor partial, ctx.alloc(DType::kF64, {d_in}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaMemsetAsync(partial.raw(), 0, partial.nbytes(), ctx.stream), "OutputError"));
  const int64_t panels = d_in >= kPanels * kMinPanelWidth ? kPanels : 1;
  const int64_t width = (d_in + panels - 1) / panels;
  QCAL_ASSIGN_OR_RETURN(Tensor st, ctx.alloc(DType::kF32, {d_in, width}));
  const size_t element = bf16 ? 2 : 4;
  const auto* ep = static_cast<const char*>(e.raw());
  float* stp = st.data<float>();
  for (int64_t r0 = 0; r0 < d_in; r0 += width) {
    const int64_t r1 = std::min(d_in, r0 + width), cols = r1 - r0;
    // St [r1, r1 - r0] = Ē[:, :r1]ᵀ Ē[:, r0:r1]: exact products, fp32 accumulation.
    const void* panel = ep + r0 * element;
    QCAL_RETURN_IF_ERROR(bf16 ? Gemm(ctx.blas, true, false, r1, cols, d_out, 1.0f, ep, d_in, panel,
                                     d_in, DType::kBF16, 0.0f, stp, cols)
                              : GemmTf32(ctx.blas, true, false, r1, cols, d_out, 1.0f,
                                         reinterpret_cast<const float*>(ep), d_in,
                                         static_cast<const float*>(panel), d_in, 0.0f, stp, cols));
    QCAL_RETURN_IF_ERROR(CudaStatus(LaunchWeightedPanelTrace(stp, r0, r1, gram.data<float>(), d_in,
                                                             partial.data<double>(), ctx.stream),
                                    "OutputError: trace"));
  }
  QCAL_ASSIGN_OR_RETURN(
      auto sums, Download<double>(ctx, partial.raw(), d_in, "OutputError: reading the trace"));
  double total = 0;
  for (double s : sums) total += s;
  // A Gram matrix is PSD; rounding can leave a tiny negative sum for a (near-)zero error.
  return std::sqrt(std::max(total, 0.0));
}

}  // namespace qcal::kernels::cuda
