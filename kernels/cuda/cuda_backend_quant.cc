// The CUDA backend's quantization ops: activation quantization, ABQ weights, the solver
// adapters over cuda_quant.cc and cuda_low_rank.cc, and channel statistics and scaling.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/act_quant.cuh"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/channel_stats.cuh"
#include "kernels/cuda/cuda_abq.h"
#include "kernels/cuda/cuda_backend_internal.h"
#include "kernels/cuda/cuda_low_rank.h"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/scale.cuh"

namespace qcal::kernels::cuda_internal {

namespace {

// ABQ weights on the CUDA backend: a CudaAbqLinear on the backend's stream and memory pool.
class CudaPreparedAbqLinear final : public PreparedAbqLinear {
 public:
  explicit CudaPreparedAbqLinear(std::unique_ptr<CudaAbqLinear> linear)
      : PreparedAbqLinear(linear->spec(), linear->n(), linear->k()), linear_(std::move(linear)) {}
  CudaAbqLinear& linear() const { return *linear_; }

 private:
  const std::unique_ptr<CudaAbqLinear> linear_;
};

}  // namespace

absl::Status CudaBackend::ActQuant(const Tensor& x, int bits, Tensor& out) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ActQuant", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(out, DType::kF32, "ActQuant", "out"));
  QCAL_RETURN_IF_ERROR(ExpectShape(out, x.shape(), "ActQuant", "out"));
  if (bits < 2 || bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("ActQuant: bits must be 2..8, got ", bits));
  }
  if (x.rank() < 1) return absl::InvalidArgumentError("ActQuant: x must have rank >= 1");
  const int64_t width = x.dim(-1);
  if (width == 0 || x.numel() == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(cuda::LaunchActQuant(x.data<float>(), x.numel() / width, width, bits,
                                         out.data<float>(), stream()),
                    "ActQuant kernel");
}

// f32: ref::ActQuantLinear as codes (fp64) and scales, w widened to fp64, one cuBLAS DGEMM
// (fp64 tensor cores: each product exact, and the sum exact for a checkpoint's weights), and a
// kernel that scales, rounds once, adds the bias and stores. bf16: ActQuant's values as the bf16
// operand (one pass), then Linear.
absl::Status CudaBackend::ActQuantLinear(const Tensor& x, int bits, const Tensor& w,
                                         const Tensor* bias, Tensor& y, bool accumulate) {
  QCAL_RETURN_IF_ERROR(CheckActQuantLinearOperands(x, bits, w, bias, y));
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ActQuantLinear", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, "ActQuantLinear", "y"));
  if (w.device() != Device::kCuda || (w.dtype() != DType::kF32 && w.dtype() != DType::kBF16)) {
    return absl::InvalidArgumentError(absl::StrCat("ActQuantLinear: w is ", w.DebugString(),
                                                   ", expected a CUDA F32 or BF16 tensor"));
  }
  const bool has_bias = bias && bias->defined();
  if (has_bias) QCAL_RETURN_IF_ERROR(ExpectDevice(*bias, DType::kF32, "ActQuantLinear", "bias"));
  const int64_t m = x.dim(0), n = w.dim(0), k = x.dim(1);
  if (dtype_ == ComputeDType::kBF16) {
    // ActQuant's values rounded to the bf16 operand in the same pass (what Linear would round).
    QCAL_ASSIGN_OR_RETURN(Tensor xq, Uninitialized(DType::kBF16, x.shape()));
    if (m > 0 && k > 0) {
      QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
      QCAL_RETURN_IF_ERROR(
          CudaStatus(cuda::LaunchActQuantBf16(x.data<float>(), m, k, bits,
                                              static_cast<__nv_bfloat16*>(xq.raw()), k, stream()),
                     "ActQuantLinear: bf16 operand"));
    }
    return Linear(xq, w, bias, y, accumulate);
  }
  if (m == 0 || n == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  // Scratch in fp64 (released to the pool, in stream order, at the end of the scope).
  QCAL_ASSIGN_OR_RETURN(Tensor codes, Uninitialized(DType::kF64, {m, k}));
  QCAL_ASSIGN_OR_RETURN(Tensor scales, Uninitialized(DType::kF32, {m}));
  QCAL_ASSIGN_OR_RETURN(Tensor sums, Uninitialized(DType::kF64, {m, n}));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cuda::LaunchActQuantCodes(x.data<float>(), m, k, bits, codes.data<double>(),
                                           scales.data<float>(), stream()),
                 "ActQuantLinear: codes"));
  if (k == 0) {
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cudaMemsetAsync(sums.raw(), 0, sums.nbytes(), stream()), "ActQuantLinear"));
  } else {
    QCAL_ASSIGN_OR_RETURN(Tensor wide, Uninitialized(DType::kF64, {n, k}));
    QCAL_RETURN_IF_ERROR(CudaStatus(cuda::LaunchWidenToF64(w.raw(), w.dtype() == DType::kBF16,
                                                           n * k, wide.data<double>(), stream()),
                                    "ActQuantLinear: widening w"));
    QCAL_RETURN_IF_ERROR(cuda::GemmF64NT(blas_.get(), m, n, k, codes.data<double>(),
                                         wide.data<double>(), sums.data<double>()));
  }
  return CudaStatus(cuda::LaunchActQuantScaleRows(sums.data<double>(), scales.data<float>(),
                                                  has_bias ? bias->data<float>() : nullptr, m, n,
                                                  accumulate, y.data<float>(), stream()),
                    "ActQuantLinear: scaling");
}

absl::Status CudaBackend::ActQuantOperand(const Tensor& x, int bits, Tensor& out) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ActQuantOperand", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(out, DType::kBF16, "ActQuantOperand", "out"));
  if (x.rank() != 2 || out.rank() != 2 || out.dim(0) != x.dim(0) || out.dim(1) < x.dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat("ActQuantOperand: out ", out.DebugString(),
                                                   " cannot hold x ", x.DebugString(),
                                                   " in its left columns"));
  }
  if (bits < 2 || bits > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("ActQuantOperand: bits must be 2..8, got ", bits));
  }
  if (x.numel() == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(
      cuda::LaunchActQuantBf16(x.data<float>(), x.dim(0), x.dim(1), bits,
                               static_cast<__nv_bfloat16*>(out.raw()), out.dim(1), stream()),
      "ActQuantOperand kernel");
}

absl::StatusOr<std::shared_ptr<const PreparedAbqLinear>> CudaBackend::PrepareAbqLinear(
    const AbqWeights& w) {
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<CudaAbqLinear> linear,
                        CudaAbqLinear::Create(w, device_, stream(), allocator_));
  return std::make_shared<const CudaPreparedAbqLinear>(std::move(linear));
}

absl::Status CudaBackend::AbqLinear(const PreparedAbqLinear& w, AbqKernel kernel, const Tensor& x,
                                    const Tensor* bias, Tensor& y, bool accumulate) {
  const auto* cw = dynamic_cast<const CudaPreparedAbqLinear*>(&w);
  if (cw == nullptr) {
    return absl::InvalidArgumentError("AbqLinear: the weights were prepared by another backend");
  }
  QCAL_RETURN_IF_ERROR(CheckAbqLinearOperands(w, x, bias, y));
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "AbqLinear", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, "AbqLinear", "y"));
  if (bias) QCAL_RETURN_IF_ERROR(ExpectDevice(*bias, DType::kF32, "AbqLinear", "bias"));
  const int64_t m = x.dim(0), n = w.n();
  if (m == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  // The layer's output goes straight into y unless it is added to y.
  Tensor out = y;
  if (accumulate) {
    QCAL_ASSIGN_OR_RETURN(out, Uninitialized(DType::kF32, {m, n}));
  }
  QCAL_RETURN_IF_ERROR(cw->linear().ForwardDevice(x.data<float>(), m, kernel, out.data<float>()));
  if (bias) {
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchAddRowVector(bias->data<float>(), out.data<float>(), m, n, stream()),
                   "AbqLinear: bias"));
  }
  if (accumulate) {
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cuda::LaunchAdd(out.data<float>(), y.data<float>(), m * n, stream()), "AbqLinear: add"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GptqFactor> CudaBackend::GptqFactorize(const Tensor& h,
                                                      const GptqSolveOptions& options) {
  return cuda::GptqFactorize(SolverContext(), h, options);
}

absl::StatusOr<QuantizedTensors> CudaBackend::GptqSolve(const Tensor& w, const GptqFactor& factor,
                                                        const QuantSpec& spec, int block_size,
                                                        bool record_pre_round) {
  return cuda::GptqSolve(SolverContext(), w, factor, spec, block_size, record_pre_round);
}

absl::StatusOr<QuantizedTensors> CudaBackend::QuantizeRtn(const Tensor& w, const QuantSpec& spec) {
  return cuda::QuantizeRtn(SolverContext(), w, spec);
}

absl::StatusOr<double> CudaBackend::OutputError(const Tensor& w, const Tensor& w_hat,
                                                const Tensor& gram) {
  return cuda::OutputError(SolverContext(), w, w_hat, gram, DType::kF32);
}

absl::StatusOr<double> CudaBackend::ReportOutputError(const Tensor& w, const Tensor& w_hat,
                                                      const Tensor& gram) {
  return cuda::OutputError(SolverContext(), w, w_hat, gram, DType::kBF16);
}

absl::StatusOr<Tensor> CudaBackend::CholeskyWhitening(const Tensor& gram, double damp) {
  return cuda::CholeskyWhitening(SolverContext(), gram, damp);
}

absl::StatusOr<double> CudaBackend::WhiteningDelta(const Tensor& gram, double damp) {
  return cuda::WhiteningDelta(SolverContext(), gram, damp);
}

absl::StatusOr<LowRankTensors> CudaBackend::ReconstructError(const Tensor& w, const Tensor& w_hat,
                                                             const Tensor& whitening,
                                                             const LowRankOptions& options) {
  return cuda::ReconstructError(SolverContext(), w, w_hat, whitening, options);
}

absl::Status CudaBackend::AddLowRank(const Tensor& a, const Tensor& b, Tensor& w) {
  return cuda::AddLowRank(SolverContext(), a, b, w);
}

absl::StatusOr<double> CudaBackend::LowRankOutputError(const Tensor& w, const Tensor& w_hat,
                                                       const Tensor& a, const Tensor& b,
                                                       const Tensor& gram, double error_sq) {
  return cuda::LowRankOutputError(SolverContext(), w, w_hat, a, b, gram, error_sq);
}

absl::StatusOr<ChannelStats> CudaBackend::ChannelAbsStats(const Tensor& x, int64_t seq_len) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ChannelAbsStats", "x"));
  const int64_t width = x.rank() == 2 ? x.dim(1) : 0;
  QCAL_ASSIGN_OR_RETURN(Tensor max_abs, Alloc(DType::kF32, {width}));
  QCAL_ASSIGN_OR_RETURN(Tensor sum_abs, Alloc(DType::kF64, {width}));
  QCAL_ASSIGN_OR_RETURN(Tensor bad, Alloc(DType::kI32, {width}));
  QCAL_RETURN_IF_ERROR(ChannelAbsStatsInto(x, seq_len, max_abs, sum_abs, bad));
  const int64_t rows = x.dim(0);
  ChannelStats out;
  out.skipped = seq_len > 0 ? rows / seq_len : 0;
  out.tokens = rows - out.skipped;
  out.max_abs.assign(width, 0.0f);
  out.sum_abs.assign(width, 0.0);
  if (width == 0 || rows == 0) return out;
  QCAL_ASSIGN_OR_RETURN(Tensor max_host, ToHost(max_abs));
  QCAL_ASSIGN_OR_RETURN(Tensor sum_host, ToHost(sum_abs));
  QCAL_ASSIGN_OR_RETURN(Tensor bad_host, ToHost(bad));
  std::copy_n(max_host.data<float>(), width, out.max_abs.begin());
  std::copy_n(sum_host.data<double>(), width, out.sum_abs.begin());
  const int32_t* b = bad_host.data<int32_t>();
  for (int64_t j = 0; j < width && out.first_bad_column < 0; ++j) {
    if (b[j] != 0) out.first_bad_column = j;
  }
  return out;
}

absl::Status CudaBackend::ChannelAbsStatsInto(const Tensor& x, int64_t seq_len, Tensor& max_abs,
                                              Tensor& sum_abs, Tensor& bad) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ChannelAbsStats", "x"));
  if (x.rank() != 2 || seq_len < 0 || (seq_len > 0 && x.dim(0) % seq_len != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ChannelAbsStats: x ", x.DebugString(), " is not whole samples of ", seq_len, " tokens"));
  }
  const int64_t rows = x.dim(0), width = x.dim(1);
  QCAL_RETURN_IF_ERROR(ExpectDevice(max_abs, DType::kF32, "ChannelAbsStatsInto", "max_abs"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(sum_abs, DType::kF64, "ChannelAbsStatsInto", "sum_abs"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(bad, DType::kI32, "ChannelAbsStatsInto", "bad"));
  if (max_abs.numel() != width || sum_abs.numel() != width || bad.numel() != width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ChannelAbsStatsInto: outputs ", max_abs.DebugString(), ", ", sum_abs.DebugString(),
        " and ", bad.DebugString(), " do not hold the ", width, " channels of x"));
  }
  if (width == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  if (rows == 0) {
    for (Tensor* t : {&max_abs, &sum_abs, &bad}) {
      QCAL_RETURN_IF_ERROR(
          CudaStatus(cudaMemsetAsync(t->raw(), 0, t->nbytes(), stream()), "ChannelAbsStats"));
    }
    return absl::OkStatus();
  }
  // Scratch in doubles: a double, a float and an int per (segment, column).
  const int64_t segments = cuda::ChannelStatsSegments(rows);
  QCAL_ASSIGN_OR_RETURN(Tensor scratch, Uninitialized(DType::kF64, {2 * segments * width}));
  return CudaStatus(cuda::LaunchChannelStats(x.data<float>(), rows, width, seq_len,
                                             scratch.data<double>(), max_abs.data<float>(),
                                             sum_abs.data<double>(), bad.data<int32_t>(), stream()),
                    "ChannelAbsStats kernel");
}

absl::Status CudaBackend::ScaleColumns(Tensor& w, const Tensor& m) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(w, DType::kF32, "ScaleColumns", "w"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(m, DType::kF32, "ScaleColumns", "m"));
  if (w.rank() != 2 || m.rank() != 1 || m.dim(0) != w.dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat("ScaleColumns: scales ", m.DebugString(),
                                                   " do not match the columns of ",
                                                   w.DebugString()));
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(
      cuda::LaunchScaleColumns(w.data<float>(), w.dim(0), w.dim(1), m.data<float>(), stream()),
      "ScaleColumns kernel");
}

absl::Status CudaBackend::DivideRows(Tensor& w, const Tensor& m) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(w, DType::kF32, "DivideRows", "w"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(m, DType::kF32, "DivideRows", "m"));
  if (w.rank() < 1 || m.rank() != 1 || m.dim(0) != w.dim(0)) {
    return absl::InvalidArgumentError(absl::StrCat("DivideRows: scales ", m.DebugString(),
                                                   " do not match the rows of ", w.DebugString()));
  }
  const int64_t rows = w.dim(0);
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(cuda::LaunchDivideRows(w.data<float>(), rows, rows > 0 ? w.numel() / rows : 0,
                                           m.data<float>(), stream()),
                    "DivideRows kernel");
}

cuda::QuantContext CudaBackend::SolverContext() {
  cuda::QuantContext ctx;
  ctx.device = device_;
  ctx.stream = stream();
  ctx.blas = blas_.get();
  ctx.solver = solver_.get();
  ctx.alloc = [this](DType dtype, const Shape& shape) { return Uninitialized(dtype, shape); };
  return ctx;
}

}  // namespace qcal::kernels::cuda_internal
