// The CUDA backend: the adapters that validate shapes and dtypes, run the launchers of the
// kernels/cuda/*.cu files or cuBLAS on the backend's stream, and turn every failure into an
// absl::Status.
#include "kernels/cuda/cuda_backend.h"

#include <cuda_bf16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cpu/ref_ops.h"
#include "kernels/cuda/act_quant.cuh"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/attention_backward.cuh"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/channel_stats.cuh"
#include "kernels/cuda/clipped_quant.cuh"
#include "kernels/cuda/clipped_quant_backward.cuh"
#include "kernels/cuda/cuda_abq.h"
#include "kernels/cuda/cuda_low_rank.h"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/cuda/cuda_resources.h"
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/embedding_backward.cuh"
#include "kernels/cuda/fill.cuh"
#include "kernels/cuda/grad_elementwise.cuh"
#include "kernels/cuda/nll.cuh"
#include "kernels/cuda/nll_backward.cuh"
#include "kernels/cuda/rms_norm.cuh"
#include "kernels/cuda/rms_norm_backward.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/scale.cuh"
#include "kernels/cuda/squared_error.cuh"

namespace qcal::kernels {
namespace {

using cuda::CudaStatus;

// Row panels of the bf16 Gram product (AccumulateGram).
constexpr int64_t kGramPanels = 8;
constexpr int64_t kGramMinPanelWidth = 256;

absl::Status ExpectDevice(const Tensor& t, DType dtype, const char* op, const char* what) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " is undefined"));
  }
  if (t.device() != Device::kCuda) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", what, " ", t.DebugString(), " is a host tensor, expected CUDA"));
  }
  if (t.dtype() != dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", what, " is ", t.DebugString(), ", expected ", DTypeName(dtype)));
  }
  return absl::OkStatus();
}

// A GEMM operand: a CUDA tensor, F32 (rounded per the compute dtype) or BF16 (already rounded).
absl::Status ExpectOperand(const Tensor& t, const char* op, const char* what) {
  if (t.defined() && t.dtype() == DType::kBF16) return ExpectDevice(t, DType::kBF16, op, what);
  return ExpectDevice(t, DType::kF32, op, what);
}

absl::Status ExpectHostI32(const Tensor& t, const char* op, const char* what) {
  if (!t.defined() || t.device() != Device::kHost || t.dtype() != DType::kI32) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " must be a host I32 tensor"));
  }
  return absl::OkStatus();
}

// The attention kernels' argument structs take an AttentionShape's fields one by one.
template <typename Args>
void SetShape(const AttentionShape& s, Args& args) {
  args.batch = s.batch;
  args.q_len = s.q_len;
  args.kv_len = s.kv_len;
  args.num_heads = s.num_heads;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = s.head_dim;
  args.q_offset = s.q_offset;
  args.sliding_window = s.sliding_window;
}

absl::Status ExpectShape(const Tensor& t, const Shape& shape, const char* op, const char* what) {
  if (t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": ", what, " has shape ", ShapeString(t.shape()), ", expected ", ShapeString(shape)));
  }
  return absl::OkStatus();
}

// Checks that every id lies in [0, limit).
absl::Status CheckIds(const Tensor& ids, int64_t limit, const char* op, const char* what) {
  const int32_t* p = ids.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (p[i] < 0 || p[i] >= limit) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": ", what, " ", p[i], " at index ", i, " is outside [0, ", limit, ")"));
    }
  }
  return absl::OkStatus();
}

// ABQ weights on the CUDA backend: a CudaAbqLinear on the backend's stream and memory pool.
class CudaPreparedAbqLinear final : public PreparedAbqLinear {
 public:
  explicit CudaPreparedAbqLinear(std::unique_ptr<CudaAbqLinear> linear)
      : PreparedAbqLinear(linear->spec(), linear->n(), linear->k()), linear_(std::move(linear)) {}
  CudaAbqLinear& linear() const { return *linear_; }

 private:
  const std::unique_ptr<CudaAbqLinear> linear_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, ComputeDType dtype, int64_t memory_limit, std::string kind,
              cuda::CudaStream stream, cuda::CublasHandle blas, cuda::CusolverHandle solver)
      : device_(device),
        dtype_(dtype),
        memory_limit_(memory_limit),
        kind_(std::move(kind)),
        stream_(std::move(stream)),
        blas_(std::move(blas)),
        solver_(std::move(solver)),
        allocator_(std::make_shared<cuda::CachingAllocator>(device, cuda::MemoryKind::kDevice)),
        pinned_(std::make_shared<cuda::CachingAllocator>(device, cuda::MemoryKind::kPinnedHost)) {}

  ~CudaBackend() override {
    // Let queued work finish before the handle and stream go; errors have nowhere to go here.
    if (cuda::UseDevice(device_).ok()) cudaStreamSynchronize(stream_.get());
  }

  std::string name() const override { return absl::StrCat("cuda:", device_); }
  Device device() const override { return Device::kCuda; }
  bool SupportsOp(Op) const override { return true; }
  bool SupportsSolverOp(SolverOp) const override { return true; }
  ComputeDType compute_dtype() const override { return dtype_; }
  // One stream; the host threads play no part in the results.
  int threads() const override { return 1; }
  std::string DeviceKind() const override { return kind_; }

  absl::StatusOr<Tensor> Alloc(DType dtype, const Shape& shape) override {
    QCAL_ASSIGN_OR_RETURN(Tensor t, Uninitialized(dtype, shape));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cudaMemsetAsync(t.raw(), 0, t.nbytes(), stream()), "Alloc: cudaMemsetAsync"));
    return t;
  }

  absl::StatusOr<Tensor> AllocUninitialized(DType dtype, const Shape& shape) override {
    return Uninitialized(dtype, shape);
  }

  absl::StatusOr<Tensor> ToDevice(const Tensor& t) override {
    if (!t.defined()) return absl::InvalidArgumentError("ToDevice: tensor is undefined");
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(Tensor out, Uninitialized(t.dtype(), t.shape()));
    const cudaMemcpyKind kind =
        t.device() == Device::kHost ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice;
    QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(out.raw(), t.raw(), t.nbytes(), kind, stream()),
                                    absl::StrCat("ToDevice ", t.DebugString())));
    // The host buffer may be released as soon as we return.
    QCAL_RETURN_IF_ERROR(Synchronize());
    return out;
  }

  absl::StatusOr<Tensor> ToHost(const Tensor& t) override {
    if (!t.defined()) return absl::InvalidArgumentError("ToHost: tensor is undefined");
    if (t.device() == Device::kHost) return t.Clone();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    Tensor out = Tensor::Zeros(t.dtype(), t.shape());
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(out.raw(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost, stream()),
        absl::StrCat("ToHost ", t.DebugString())));
    QCAL_RETURN_IF_ERROR(Synchronize());
    return out;
  }

  absl::Status Synchronize() override {
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cudaStreamSynchronize(stream()), "cudaStreamSynchronize");
  }

  absl::Status Copy(const Tensor& src, Tensor& dst) override {
    if (!src.defined() || !dst.defined() || src.dtype() != dst.dtype() ||
        src.numel() != dst.numel() ||
        (src.device() != Device::kCuda && dst.device() != Device::kCuda)) {
      return absl::InvalidArgumentError(
          absl::StrCat("Copy: ", src.defined() ? src.DebugString() : "undefined", " into ",
                       dst.defined() ? dst.DebugString() : "undefined",
                       " (same dtype and element count, at least one of them a CUDA tensor)"));
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDefault, stream()),
                   absl::StrCat("Copy ", src.DebugString(), " into ", dst.DebugString())));
    // A host buffer may be read or released as soon as we return.
    if (src.device() == Device::kHost || dst.device() == Device::kHost) return Synchronize();
    return absl::OkStatus();
  }

  int64_t AvailableMemory() override {
    if (!cuda::UseDevice(device_).ok()) return 0;
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    int64_t available = static_cast<int64_t>(free_bytes + allocator_->bytes_cached());
    if (memory_limit_ > 0) {
      available = std::min(
          available,
          std::max<int64_t>(0, memory_limit_ - static_cast<int64_t>(allocator_->bytes_in_use())));
    }
    return available;
  }

  absl::StatusOr<Backend*> SideBackend() override {
    if (side_ == nullptr) {
      BackendOptions options;
      options.compute_dtype = dtype_;
      options.memory_limit_bytes = memory_limit_;
      QCAL_ASSIGN_OR_RETURN(side_, CreateCudaBackend(options, device_));
    }
    return side_.get();
  }

  int64_t MemoryInUse() const override { return static_cast<int64_t>(allocator_->bytes_in_use()); }
  int64_t PeakMemoryInUse() const override {
    return static_cast<int64_t>(allocator_->peak_bytes_in_use());
  }
  void ResetPeakMemory() override { allocator_->ResetPeak(); }

  absl::StatusOr<Tensor> AllocHost(DType dtype, const Shape& shape) override {
    for (int64_t d : shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("AllocHost: bad shape ", ShapeString(shape)));
      }
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(std::shared_ptr<Storage> storage,
                          pinned_->Allocate(NumElements(shape) * DTypeSize(dtype)));
    return Tensor(std::move(storage), 0, dtype, shape);
  }

  absl::Status FillUniform(Tensor& t, uint64_t seed, float lo, float hi) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(t, DType::kF32, "FillUniform", "t"));
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cuda::LaunchFillUniform(t.data<float>(), t.numel(), seed, lo, hi, stream()),
                      "FillUniform kernel");
  }

  absl::Status ActQuant(const Tensor& x, int bits, Tensor& out) override {
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
  // kernel that scales, rounds once, adds the bias and stores. bf16: ActQuant, then Linear.
  absl::Status ActQuantLinear(const Tensor& x, int bits, const Tensor& w, const Tensor* bias,
                              Tensor& y, bool accumulate) override {
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
      QCAL_ASSIGN_OR_RETURN(Tensor xq, Uninitialized(DType::kF32, x.shape()));
      QCAL_RETURN_IF_ERROR(ActQuant(x, bits, xq));
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

  absl::StatusOr<std::shared_ptr<const PreparedAbqLinear>> PrepareAbqLinear(
      const AbqWeights& w) override {
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(std::unique_ptr<CudaAbqLinear> linear,
                          CudaAbqLinear::Create(w, device_, stream(), allocator_));
    return std::make_shared<const CudaPreparedAbqLinear>(std::move(linear));
  }

  absl::Status AbqLinear(const PreparedAbqLinear& w, AbqKernel kernel, const Tensor& x,
                         const Tensor* bias, Tensor& y, bool accumulate) override {
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
      QCAL_RETURN_IF_ERROR(CudaStatus(
          cuda::LaunchAddRowVector(bias->data<float>(), out.data<float>(), m, n, stream()),
          "AbqLinear: bias"));
    }
    if (accumulate) {
      QCAL_RETURN_IF_ERROR(CudaStatus(
          cuda::LaunchAdd(out.data<float>(), y.data<float>(), m * n, stream()), "AbqLinear: add"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<GptqFactor> GptqFactorize(const Tensor& h,
                                           const GptqSolveOptions& options) override {
    return cuda::GptqFactorize(SolverContext(), h, options);
  }

  absl::StatusOr<QuantizedTensors> GptqSolve(const Tensor& w, const GptqFactor& factor,
                                             const QuantSpec& spec, int block_size,
                                             bool record_pre_round) override {
    return cuda::GptqSolve(SolverContext(), w, factor, spec, block_size, record_pre_round);
  }

  absl::StatusOr<QuantizedTensors> QuantizeRtn(const Tensor& w, const QuantSpec& spec) override {
    return cuda::QuantizeRtn(SolverContext(), w, spec);
  }

  absl::StatusOr<double> OutputError(const Tensor& w, const Tensor& w_hat,
                                     const Tensor& gram) override {
    return cuda::OutputError(SolverContext(), w, w_hat, gram);
  }

  absl::StatusOr<Tensor> CholeskyWhitening(const Tensor& gram, double damp) override {
    return cuda::CholeskyWhitening(SolverContext(), gram, damp);
  }

  absl::StatusOr<LowRankTensors> ReconstructError(const Tensor& w, const Tensor& w_hat,
                                                  const Tensor& whitening,
                                                  const LowRankOptions& options) override {
    return cuda::ReconstructError(SolverContext(), w, w_hat, whitening, options);
  }

  absl::Status AddLowRank(const Tensor& a, const Tensor& b, Tensor& w) override {
    return cuda::AddLowRank(SolverContext(), a, b, w);
  }

  absl::StatusOr<ChannelStats> ChannelAbsStats(const Tensor& x, int64_t seq_len) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ChannelAbsStats", "x"));
    if (x.rank() != 2 || seq_len < 0 || (seq_len > 0 && x.dim(0) % seq_len != 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ChannelAbsStats: x ", x.DebugString(), " is not whole samples of ", seq_len, " tokens"));
    }
    const int64_t rows = x.dim(0), width = x.dim(1);
    ChannelStats out;
    out.skipped = seq_len > 0 ? rows / seq_len : 0;
    out.tokens = rows - out.skipped;
    out.max_abs.assign(width, 0.0f);
    out.sum_abs.assign(width, 0.0);
    if (width == 0 || rows == 0) return out;
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    // Scratch in doubles: a double, a float and an int per (segment, column).
    const int64_t segments = cuda::ChannelStatsSegments(rows);
    QCAL_ASSIGN_OR_RETURN(Tensor scratch, Alloc(DType::kF64, {2 * segments * width}));
    QCAL_ASSIGN_OR_RETURN(Tensor max_abs, Alloc(DType::kF32, {width}));
    QCAL_ASSIGN_OR_RETURN(Tensor sum_abs, Alloc(DType::kF64, {width}));
    QCAL_ASSIGN_OR_RETURN(Tensor bad, Alloc(DType::kI32, {width}));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchChannelStats(x.data<float>(), rows, width, seq_len,
                                            scratch.data<double>(), max_abs.data<float>(),
                                            sum_abs.data<double>(), bad.data<int32_t>(), stream()),
                   "ChannelAbsStats kernel"));
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

  absl::Status ScaleColumns(Tensor& w, const Tensor& m) override {
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

  absl::Status DivideRows(Tensor& w, const Tensor& m) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(w, DType::kF32, "DivideRows", "w"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(m, DType::kF32, "DivideRows", "m"));
    if (w.rank() < 1 || m.rank() != 1 || m.dim(0) != w.dim(0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DivideRows: scales ", m.DebugString(), " do not match the rows of ", w.DebugString()));
    }
    const int64_t rows = w.dim(0);
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cuda::LaunchDivideRows(w.data<float>(), rows, rows > 0 ? w.numel() / rows : 0,
                                             m.data<float>(), stream()),
                      "DivideRows kernel");
  }

  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                      bool accumulate) override {
    QCAL_RETURN_IF_ERROR(ExpectOperand(x, "Linear", "x"));
    if (!w.defined() || w.device() != Device::kCuda ||
        (w.dtype() != DType::kF32 && w.dtype() != DType::kBF16)) {
      return absl::InvalidArgumentError(absl::StrCat("Linear: w is ",
                                                     w.defined() ? w.DebugString() : "undefined",
                                                     ", expected a CUDA F32 or BF16 tensor"));
    }
    QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, "Linear", "y"));
    if (x.rank() != 2 || w.rank() != 2 || x.dim(1) != w.dim(1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("Linear: x ", x.DebugString(), " and w ", w.DebugString(), " do not match"));
    }
    const int64_t m = x.dim(0), n = w.dim(0), k = x.dim(1);
    QCAL_RETURN_IF_ERROR(ExpectShape(y, {m, n}, "Linear", "y"));
    const bool has_bias = bias && bias->defined();
    if (has_bias) {
      QCAL_RETURN_IF_ERROR(ExpectDevice(*bias, DType::kF32, "Linear", "bias"));
      QCAL_RETURN_IF_ERROR(ExpectShape(*bias, {n}, "Linear", "bias"));
    }
    if (m == 0 || n == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    float* yp = y.data<float>();
    if (has_bias && !accumulate) {
      QCAL_RETURN_IF_ERROR(CudaStatus(
          cuda::LaunchBroadcastRows(bias->data<float>(), yp, m, n, stream()), "Linear: bias"));
    }
    const float beta = (accumulate || has_bias) ? 1.0f : 0.0f;
    if (k == 0) {
      if (beta == 0.0f) {
        QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(yp, 0, y.nbytes(), stream()), "Linear"));
      }
    } else {
      // Operands in the compute dtype; scratch copies are released (to the pool, in stream
      // order) when they go out of scope.
      const DType operands = dtype_ == ComputeDType::kBF16 ? DType::kBF16 : DType::kF32;
      QCAL_ASSIGN_OR_RETURN(Tensor xo, AsOperand(x, operands));
      QCAL_ASSIGN_OR_RETURN(Tensor wo, AsOperand(w, operands));
      QCAL_RETURN_IF_ERROR(cuda::Gemm(blas_.get(), false, true, m, n, k, 1.0f, xo.raw(), k,
                                      wo.raw(), k, operands, beta, yp, n));
    }
    if (has_bias && accumulate) {
      QCAL_RETURN_IF_ERROR(CudaStatus(
          cuda::LaunchAddRowVector(bias->data<float>(), yp, m, n, stream()), "Linear: bias"));
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "RmsNorm", "x"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(weight, DType::kF32, "RmsNorm", "weight"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, "RmsNorm", "y"));
    QCAL_RETURN_IF_ERROR(ExpectShape(y, x.shape(), "RmsNorm", "y"));
    if (x.rank() == 0) return absl::InvalidArgumentError("RmsNorm: x must have rank >= 1");
    const int64_t width = x.dim(-1);
    QCAL_RETURN_IF_ERROR(ExpectShape(weight, {width}, "RmsNorm", "weight"));
    if (width == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cuda::LaunchRmsNorm(x.data<float>(), weight.data<float>(), eps,
                                          y.data<float>(), x.numel() / width, width, stream()),
                      "RmsNorm kernel");
  }

  absl::Status Rope(Tensor& x, const RopeShape& shape) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "Rope", "x"));
    if (x.rank() == 0 || shape.head_dim <= 0 || shape.head_dim % 2 != 0 ||
        x.dim(-1) % shape.head_dim != 0 || shape.seq_len <= 0 || shape.offset < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Rope: bad shape (x ", x.DebugString(), ", head_dim ", shape.head_dim,
                       ", seq_len ", shape.seq_len, ", offset ", shape.offset, ")"));
    }
    const int64_t width = x.dim(-1);
    if (width == 0 || x.numel() == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(const float* table, RopeTable(shape));
    return CudaStatus(cuda::LaunchRope(x.data<float>(), x.numel() / width, width, shape.seq_len,
                                       shape.head_dim, table, stream()),
                      "Rope kernel");
  }

  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& s,
                         Tensor& out) override {
    QCAL_RETURN_IF_ERROR(CheckAttention(q, k, v, s, out));
    if (dtype_ == ComputeDType::kBF16) return AttentionBf16(q, k, v, s, out, nullptr);
    cuda::AttentionArgs args;
    args.q = q.data<float>();
    args.k = k.data<float>();
    args.v = v.data<float>();
    args.out = out.data<float>();
    SetShape(s, args);
    return CudaStatus(cuda::LaunchAttention(args, stream()), "Attention kernel");
  }

  absl::Status AttentionForBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const AttentionShape& s, Tensor& out,
                                    AttentionSaved& saved) override {
    saved = AttentionSaved();
    if (dtype_ != ComputeDType::kBF16) return Attention(q, k, v, s, out);
    QCAL_RETURN_IF_ERROR(CheckAttention(q, k, v, s, out));
    return AttentionBf16(q, k, v, s, out, &saved);
  }

  // Attention's checks (then the device is current).
  absl::Status CheckAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionShape& s, const Tensor& out) {
    QCAL_RETURN_IF_ERROR(ExpectDevice(q, DType::kF32, "Attention", "q"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(k, DType::kF32, "Attention", "k"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(v, DType::kF32, "Attention", "v"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(out, DType::kF32, "Attention", "out"));
    if (s.batch < 0 || s.q_len < 0 || s.q_offset < 0 || s.head_dim <= 0 || s.num_heads <= 0 ||
        s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads != 0 ||
        s.q_offset + s.q_len > s.kv_len || s.sliding_window < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Attention: bad shape (batch ", s.batch, ", q_len ", s.q_len, ", kv_len ",
                       s.kv_len, ", heads ", s.num_heads, "/", s.num_kv_heads, ", head_dim ",
                       s.head_dim, ", q_offset ", s.q_offset, ")"));
    }
    if (s.head_dim > cuda::kAttentionMaxHeadDim || s.batch > 65535 || s.num_heads > 65535) {
      return absl::UnimplementedError(absl::StrCat(
          "Attention: the CUDA kernel handles head_dim <= ", cuda::kAttentionMaxHeadDim,
          " and at most 65535 sequences and heads (got head_dim ", s.head_dim, ", batch ", s.batch,
          ", heads ", s.num_heads, ")"));
    }
    const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                  kvw = int64_t(s.num_kv_heads) * s.head_dim;
    QCAL_RETURN_IF_ERROR(ExpectShape(q, {int64_t(s.batch) * s.q_len, qw}, "Attention", "q"));
    QCAL_RETURN_IF_ERROR(ExpectShape(k, {int64_t(s.batch) * s.kv_len, kvw}, "Attention", "k"));
    QCAL_RETURN_IF_ERROR(ExpectShape(v, {int64_t(s.batch) * s.kv_len, kvw}, "Attention", "v"));
    QCAL_RETURN_IF_ERROR(ExpectShape(out, q.shape(), "Attention", "out"));
    return cuda::UseDevice(device_);
  }

  absl::Status SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(gate, DType::kF32, "SiluMul", "gate"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(up, DType::kF32, "SiluMul", "up"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(out, DType::kF32, "SiluMul", "out"));
    QCAL_RETURN_IF_ERROR(ExpectShape(up, gate.shape(), "SiluMul", "up"));
    QCAL_RETURN_IF_ERROR(ExpectShape(out, gate.shape(), "SiluMul", "out"));
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cuda::LaunchSiluMul(gate.data<float>(), up.data<float>(), out.data<float>(),
                                          gate.numel(), stream()),
                      "SiluMul kernel");
  }

  absl::Status Add(const Tensor& x, Tensor& y) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "Add", "x"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, "Add", "y"));
    QCAL_RETURN_IF_ERROR(ExpectShape(y, x.shape(), "Add", "y"));
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cuda::LaunchAdd(x.data<float>(), y.data<float>(), x.numel(), stream()),
                      "Add kernel");
  }

  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(table, DType::kF32, "Embedding", "table"));
    QCAL_RETURN_IF_ERROR(ExpectHostI32(ids, "Embedding", "ids"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(out, DType::kF32, "Embedding", "out"));
    if (table.rank() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("Embedding: table is ", table.DebugString(), ", expected rank 2"));
    }
    const int64_t vocab = table.dim(0), width = table.dim(1), n = ids.numel();
    QCAL_RETURN_IF_ERROR(ExpectShape(out, {n, width}, "Embedding", "out"));
    QCAL_RETURN_IF_ERROR(CheckIds(ids, vocab, "Embedding", "token id"));
    if (n == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(Tensor device_ids, ToDevice(ids));
    return CudaStatus(cuda::LaunchEmbedding(table.data<float>(), width, device_ids.data<int32_t>(),
                                            n, out.data<float>(), stream()),
                      "Embedding kernel");
  }

  absl::Status Nll(const Tensor& logits, const Tensor& targets, Tensor& nll) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(logits, DType::kF32, "Nll", "logits"));
    QCAL_RETURN_IF_ERROR(ExpectHostI32(targets, "Nll", "targets"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(nll, DType::kF32, "Nll", "nll"));
    if (logits.rank() != 2 || logits.dim(1) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Nll: logits is ", logits.DebugString(), ", expected [rows, vocab > 0]"));
    }
    const int64_t rows = logits.dim(0), vocab = logits.dim(1);
    if (targets.numel() != rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("Nll: ", targets.numel(), " targets for ", rows, " rows of logits"));
    }
    QCAL_RETURN_IF_ERROR(ExpectShape(nll, {rows}, "Nll", "nll"));
    QCAL_RETURN_IF_ERROR(CheckIds(targets, vocab, "Nll", "target"));
    if (rows == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(Tensor device_targets, ToDevice(targets));
    return CudaStatus(cuda::LaunchNll(logits.data<float>(), rows, vocab,
                                      device_targets.data<int32_t>(), nll.data<float>(), stream()),
                      "Nll kernel");
  }

  absl::Status AccumulateGram(const Tensor& x, Tensor& h) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, x.dtype() == DType::kBF16 ? DType::kBF16 : DType::kF32,
                                      "AccumulateGram", "x"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(h, DType::kF32, "AccumulateGram", "h"));
    if (x.rank() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("AccumulateGram: x is ", x.DebugString(), ", expected rank 2"));
    }
    const int64_t n = x.dim(0), k = x.dim(1);
    QCAL_RETURN_IF_ERROR(ExpectShape(h, {k, k}, "AccumulateGram", "h"));
    if (n == 0 || k == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    float* hp = h.data<float>();
    if (dtype_ == ComputeDType::kBF16) {
      // No bf16 SYRK in cuBLAS: row panels of the lower triangle, each one GEMM against every
      // earlier column, (P + 1) / 2P of a full product for P panels; the mirror below then makes h
      // exactly symmetric. Panel starts are multiples of 64 columns (aligned operands).
      QCAL_ASSIGN_OR_RETURN(Tensor xb, AsOperand(x, DType::kBF16));
      const auto* xp = static_cast<const __nv_bfloat16*>(xb.raw());
      const int64_t panels = k >= kGramPanels * kGramMinPanelWidth ? kGramPanels : 1;
      const int64_t width = ((k + panels - 1) / panels + 63) / 64 * 64;
      for (int64_t r0 = 0; r0 < k; r0 += width) {
        const int64_t r1 = std::min(k, r0 + width);
        QCAL_RETURN_IF_ERROR(cuda::Gemm(blas_.get(), true, false, r1 - r0, r1, n, 1.0f, xp + r0, k,
                                        xp, k, DType::kBF16, 1.0f, hp + r0 * k, k));
      }
    } else {
      QCAL_ASSIGN_OR_RETURN(Tensor xf, AsOperand(x, DType::kF32));
      QCAL_RETURN_IF_ERROR(cuda::SyrkLowerF32(blas_.get(), xf.data<float>(), n, k, hp));
    }
    return CudaStatus(cuda::LaunchMirrorLowerToUpper(hp, k, stream()), "AccumulateGram: mirror");
  }

  // ---- Backward ops (kernels/backend.h; specs in kernels/cpu/ref_grad.h).

  absl::Status Gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                    float beta, Tensor& c) override {
    return GemmPanels(a, trans_a, b, trans_b, alpha, beta, c, /*lower=*/false);
  }

  absl::Status GemmLower(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                         float beta, Tensor& c) override {
    return GemmPanels(a, trans_a, b, trans_b, alpha, beta, c, /*lower=*/true);
  }

  absl::Status Convert(const Tensor& src, Tensor& dst) override {
    const bool down = src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16;
    const bool up = src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32;
    if (!src.defined() || !dst.defined() || !(down || up) || src.numel() != dst.numel() ||
        src.device() != Device::kCuda || dst.device() != Device::kCuda) {
      return absl::InvalidArgumentError(
          absl::StrCat("Convert: ", src.defined() ? src.DebugString() : "undefined", " into ",
                       dst.defined() ? dst.DebugString() : "undefined",
                       " (F32 to BF16 or BF16 to F32, the same element count, CUDA tensors)"));
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    const int64_t n = src.numel();
    if (down) {
      return CudaStatus(cuda::LaunchF32ToBf16(src.data<float>(),
                                              static_cast<__nv_bfloat16*>(dst.raw()), n, stream()),
                        "Convert");
    }
    return CudaStatus(cuda::LaunchBf16ToF32(static_cast<const __nv_bfloat16*>(src.raw()),
                                            dst.data<float>(), n, stream()),
                      "Convert");
  }

  absl::Status MirrorLower(Tensor& c) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(c, DType::kF32, "MirrorLower", "c"));
    const int64_t n = c.rank() >= 2 ? c.dim(-1) : -1;
    const int64_t batch = c.rank() == 3 ? c.dim(0) : 1;
    if ((c.rank() != 2 && c.rank() != 3) || c.dim(-2) != n) {
      return absl::InvalidArgumentError(absl::StrCat("MirrorLower: c is ", c.DebugString(),
                                                     ", expected [n, n] or [batch, n, n]"));
    }
    if (n <= 1) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    for (int64_t s = 0; s < batch; ++s) {
      QCAL_RETURN_IF_ERROR(CudaStatus(
          cuda::LaunchMirrorLowerToUpper(c.data<float>() + s * n * n, n, stream()), "MirrorLower"));
    }
    return absl::OkStatus();
  }

  absl::Status GemmBatched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                           float alpha, float beta, Tensor& c, bool lower) override {
    QCAL_RETURN_IF_ERROR(CheckGemmBatched(a, trans_a, b, trans_b, beta, c));
    for (const Tensor* t : {&a, &b, static_cast<const Tensor*>(&c)}) {
      if (t->device() != Device::kCuda) {
        return absl::InvalidArgumentError(
            absl::StrCat("GemmBatched: ", t->DebugString(), " is not on the CUDA device"));
      }
    }
    const int64_t batch = c.dim(0), m = c.dim(1), n = c.dim(2), k = a.dim(trans_a ? 1 : 2);
    if (batch == 0 || m == 0 || n == 0) return absl::OkStatus();
    // An empty inner dimension scales c (Gemm's rule): the default's item-by-item path.
    if (k == 0) return Backend::GemmBatched(a, trans_a, b, trans_b, alpha, beta, c, lower);
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    const DType operands = dtype_ == ComputeDType::kBF16 ? DType::kBF16 : DType::kF32;
    QCAL_ASSIGN_OR_RETURN(Tensor ao, AsOperand(a, operands));
    QCAL_ASSIGN_OR_RETURN(Tensor bo, AsOperand(b, operands));
    // cuBLAS writes bf16 only from bf16 operands: fp32 operands go through an fp32 c.
    Tensor out = c;
    if (c.dtype() == DType::kBF16 && operands == DType::kF32) {
      QCAL_ASSIGN_OR_RETURN(out, Uninitialized(DType::kF32, c.shape()));
    }
    const int64_t elem = operands == DType::kBF16 ? 2 : 4;
    const int64_t c_elem = out.dtype() == DType::kBF16 ? 2 : 4;
    const int64_t lda = a.dim(2), ldb = b.dim(2);
    const int64_t stride_a = a.dim(1) * lda, stride_b = b.dim(1) * ldb, stride_c = m * n;
    // One batched product, or for a lower triangle row panels [r0, r1) against the first r1
    // columns: two panels (3/4 of the work) when the batch fills the device, else kGramPanels as
    // GemmLower (a lone product's small panels run split over its long inner dimension).
    int64_t panels = 1;
    if (lower && m == n && m >= 256) panels = batch >= 4 ? 2 : kGramPanels;
    if (panels > 1 && batch < 4 && m < kGramPanels * kGramMinPanelWidth) panels = 1;
    const int64_t width = ((m + panels - 1) / panels + 63) / 64 * 64;
    const char* ap = static_cast<const char*>(ao.raw());
    char* cp = static_cast<char*>(out.raw());
    for (int64_t r0 = 0; r0 < m; r0 += width) {
      const int64_t r1 = std::min(m, r0 + width), cols = panels == 1 ? n : r1;
      const void* a_rows = ap + (trans_a ? r0 : r0 * lda) * elem;
      QCAL_RETURN_IF_ERROR(cuda::GemmStridedBatched(
          blas_.get(), trans_a, trans_b, r1 - r0, cols, k, alpha, a_rows, lda, stride_a, bo.raw(),
          ldb, stride_b, operands, beta, cp + r0 * n * c_elem, n, stride_c, out.dtype(), batch));
    }
    if (out.raw() != c.raw()) return Convert(out, c);
    return absl::OkStatus();
  }

  absl::Status RmsNormBackward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy,
                               Tensor& dx) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "RmsNormBackward", "x"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(weight, DType::kF32, "RmsNormBackward", "weight"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dy, DType::kF32, "RmsNormBackward", "dy"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dx, DType::kF32, "RmsNormBackward", "dx"));
    if (x.rank() == 0) return absl::InvalidArgumentError("RmsNormBackward: x must have rank >= 1");
    QCAL_RETURN_IF_ERROR(ExpectShape(dy, x.shape(), "RmsNormBackward", "dy"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dx, x.shape(), "RmsNormBackward", "dx"));
    const int64_t width = x.dim(-1);
    QCAL_RETURN_IF_ERROR(ExpectShape(weight, {width}, "RmsNormBackward", "weight"));
    if (width == 0 || x.numel() == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(
        cuda::LaunchRmsNormBackward(x.data<float>(), weight.data<float>(), eps, dy.data<float>(),
                                    dx.data<float>(), x.numel() / width, width, stream()),
        "RmsNormBackward kernel");
  }

  absl::Status RopeBackward(Tensor& g, const RopeShape& shape) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(g, DType::kF32, "RopeBackward", "g"));
    if (g.rank() == 0 || shape.head_dim <= 0 || shape.head_dim % 2 != 0 ||
        g.dim(-1) % shape.head_dim != 0 || shape.seq_len <= 0 || shape.offset < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RopeBackward: bad shape (g ", g.DebugString(), ", head_dim ", shape.head_dim,
          ", seq_len ", shape.seq_len, ", offset ", shape.offset, ")"));
    }
    const int64_t width = g.dim(-1);
    if (width == 0 || g.numel() == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(const float* table, RopeTable(shape));
    return CudaStatus(cuda::LaunchRopeBackward(g.data<float>(), g.numel() / width, width,
                                               shape.seq_len, shape.head_dim, table, stream()),
                      "RopeBackward kernel");
  }

  absl::Status AttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& dout, const AttentionShape& s, Tensor& dq,
                                 Tensor& dk, Tensor& dv) override {
    QCAL_RETURN_IF_ERROR(CheckAttentionBackward(q, k, v, dout, s, dq, dk, dv));
    if (int64_t(s.batch) * s.kv_len == 0) return absl::OkStatus();
    QCAL_ASSIGN_OR_RETURN(Tensor scratch, AttentionBackwardScratch(s));
    if (dtype_ == ComputeDType::kBF16) {
      return AttentionBackwardBf16(q, k, v, dout, s, scratch, nullptr, dq, dk, dv);
    }
    cuda::AttentionBackwardArgs args;
    args.q = q.data<float>();
    args.k = k.data<float>();
    args.v = v.data<float>();
    args.dout = dout.data<float>();
    args.dq = dq.data<float>();
    args.dk = dk.data<float>();
    args.dv = dv.data<float>();
    args.scratch = scratch.data<float>();
    SetShape(s, args);
    return CudaStatus(cuda::LaunchAttentionBackward(args, stream()), "AttentionBackward kernels");
  }

  absl::Status AttentionBackwardSaved(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& out, const Tensor& dout,
                                      const AttentionSaved& saved, const AttentionShape& s,
                                      Tensor& dq, Tensor& dk, Tensor& dv) override {
    if (dtype_ != ComputeDType::kBF16 || !saved.lse.defined()) {
      return AttentionBackward(q, k, v, dout, s, dq, dk, dv);
    }
    const char* op = "AttentionBackwardSaved";
    QCAL_RETURN_IF_ERROR(CheckAttentionBackward(q, k, v, dout, s, dq, dk, dv));
    QCAL_RETURN_IF_ERROR(ExpectDevice(out, DType::kF32, op, "out"));
    QCAL_RETURN_IF_ERROR(ExpectShape(out, q.shape(), op, "out"));
    const int dp = cuda::AttentionPaddedDim(s.head_dim);
    const int64_t q_rows = int64_t(s.batch) * s.q_len, kv_rows = int64_t(s.batch) * s.kv_len;
    QCAL_RETURN_IF_ERROR(ExpectDevice(saved.lse, DType::kF32, op, "saved lse"));
    QCAL_RETURN_IF_ERROR(ExpectShape(
        saved.lse, {int64_t(s.batch), int64_t(s.num_heads), int64_t(s.q_len)}, op, "saved lse"));
    auto expect_packed = [&](const Tensor& t, Shape shape, const char* what) -> absl::Status {
      QCAL_RETURN_IF_ERROR(ExpectDevice(t, DType::kBF16, op, what));
      return ExpectShape(t, shape, op, what);
    };
    QCAL_RETURN_IF_ERROR(expect_packed(saved.q, {q_rows, int64_t(s.num_heads) * dp}, "saved q"));
    QCAL_RETURN_IF_ERROR(
        expect_packed(saved.k, {kv_rows, int64_t(s.num_kv_heads) * dp}, "saved k"));
    QCAL_RETURN_IF_ERROR(
        expect_packed(saved.v, {kv_rows, int64_t(s.num_kv_heads) * dp}, "saved v"));
    if (kv_rows == 0) return absl::OkStatus();
    QCAL_ASSIGN_OR_RETURN(Tensor scratch, AttentionBackwardScratch(s));
    // The scratch's first half: the forward's statistics; its second: D = dout·out.
    const int64_t stats = int64_t(s.batch) * s.num_heads * s.q_len;
    if (stats > 0) {
      QCAL_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(scratch.data<float>(), saved.lse.data<float>(),
                                     stats * sizeof(float), cudaMemcpyDeviceToDevice, stream()),
                     "AttentionBackwardSaved: statistics"));
      QCAL_RETURN_IF_ERROR(
          CudaStatus(cuda::LaunchAttentionDelta(dout.data<float>(), out.data<float>(), s.batch,
                                                s.q_len, s.num_heads, s.head_dim,
                                                scratch.data<float>() + stats, stream()),
                     "AttentionBackwardSaved: D"));
    }
    return AttentionBackwardBf16(q, k, v, dout, s, scratch, &saved, dq, dk, dv);
  }

  absl::StatusOr<Tensor> AttentionBackwardScratch(const AttentionShape& s) {
    return Uninitialized(DType::kF32, {std::max<int64_t>(1, cuda::AttentionBackwardScratchFloats(
                                                                s.batch, s.num_heads, s.q_len))});
  }

  // AttentionBackward's checks (then the device is current).
  absl::Status CheckAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& dout, const AttentionShape& s, const Tensor& dq,
                                      const Tensor& dk, const Tensor& dv) {
    const char* op = "AttentionBackward";
    QCAL_RETURN_IF_ERROR(ExpectDevice(q, DType::kF32, op, "q"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(k, DType::kF32, op, "k"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(v, DType::kF32, op, "v"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dout, DType::kF32, op, "dout"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dq, DType::kF32, op, "dq"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dk, DType::kF32, op, "dk"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dv, DType::kF32, op, "dv"));
    if (s.batch < 0 || s.q_len < 0 || s.q_offset < 0 || s.head_dim <= 0 || s.num_heads <= 0 ||
        s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads != 0 ||
        s.q_offset + s.q_len > s.kv_len || s.sliding_window < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": bad shape (batch ", s.batch, ", q_len ", s.q_len, ", kv_len ",
                       s.kv_len, ", heads ", s.num_heads, "/", s.num_kv_heads, ", head_dim ",
                       s.head_dim, ", q_offset ", s.q_offset, ", window ", s.sliding_window, ")"));
    }
    if (s.head_dim > cuda::kAttentionMaxHeadDim || s.batch > 65535 || s.num_heads > 65535) {
      return absl::UnimplementedError(
          absl::StrCat(op, ": the CUDA kernels handle head_dim <= ", cuda::kAttentionMaxHeadDim,
                       " and at most 65535 sequences and heads (got head_dim ", s.head_dim,
                       ", batch ", s.batch, ", heads ", s.num_heads, ")"));
    }
    const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                  kvw = int64_t(s.num_kv_heads) * s.head_dim;
    const int64_t q_rows = int64_t(s.batch) * s.q_len, kv_rows = int64_t(s.batch) * s.kv_len;
    QCAL_RETURN_IF_ERROR(ExpectShape(q, {q_rows, qw}, op, "q"));
    QCAL_RETURN_IF_ERROR(ExpectShape(k, {kv_rows, kvw}, op, "k"));
    QCAL_RETURN_IF_ERROR(ExpectShape(v, {kv_rows, kvw}, op, "v"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dout, q.shape(), op, "dout"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dq, q.shape(), op, "dq"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dk, k.shape(), op, "dk"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dv, v.shape(), op, "dv"));
    return cuda::UseDevice(device_);
  }

  absl::Status SiluMulBackward(const Tensor& gate, const Tensor& up, const Tensor& dout,
                               Tensor& dgate, Tensor& dup) override {
    const char* op = "SiluMulBackward";
    QCAL_RETURN_IF_ERROR(ExpectDevice(gate, DType::kF32, op, "gate"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(up, DType::kF32, op, "up"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dout, DType::kF32, op, "dout"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dgate, DType::kF32, op, "dgate"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dup, DType::kF32, op, "dup"));
    QCAL_RETURN_IF_ERROR(ExpectShape(up, gate.shape(), op, "up"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dout, gate.shape(), op, "dout"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dgate, gate.shape(), op, "dgate"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dup, gate.shape(), op, "dup"));
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(
        cuda::LaunchSiluMulBackward(gate.data<float>(), up.data<float>(), dout.data<float>(),
                                    dgate.data<float>(), dup.data<float>(), gate.numel(), stream()),
        "SiluMulBackward kernel");
  }

  absl::Status EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable) override {
    const char* op = "EmbeddingBackward";
    QCAL_RETURN_IF_ERROR(ExpectHostI32(ids, op, "ids"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dout, DType::kF32, op, "dout"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dtable, DType::kF32, op, "dtable"));
    if (dtable.rank() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": dtable is ", dtable.DebugString(), ", expected rank 2"));
    }
    const int64_t vocab = dtable.dim(0), width = dtable.dim(1), n = ids.numel();
    QCAL_RETURN_IF_ERROR(ExpectShape(dout, {n, width}, op, "dout"));
    QCAL_RETURN_IF_ERROR(CheckIds(ids, vocab, op, "token id"));
    if (n == 0 || width == 0) return absl::OkStatus();
    if (n > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": ", n, " rows exceed the I32 plan"));
    }
    // The plan [tokens | starts | rows] (embedding_backward.cuh): a counting sort of the rows by
    // token, stable, so each token keeps its rows in order.
    const int32_t* id = ids.data<int32_t>();
    std::vector<int32_t> count(vocab, 0);
    for (int64_t r = 0; r < n; ++r) ++count[id[r]];
    std::vector<int32_t> tokens;
    for (int64_t t = 0; t < vocab; ++t) {
      if (count[t] > 0) tokens.push_back(static_cast<int32_t>(t));
    }
    const int64_t distinct = static_cast<int64_t>(tokens.size());
    QCAL_ASSIGN_OR_RETURN(Tensor plan, AllocHost(DType::kI32, {2 * distinct + 1 + n}));
    int32_t* p = plan.data<int32_t>();
    int32_t* starts = p + distinct;
    int32_t* rows = starts + distinct + 1;
    std::vector<int32_t> next(vocab, 0);  // where token t's next row goes
    int32_t at = 0;
    for (int64_t u = 0; u < distinct; ++u) {
      p[u] = tokens[u];
      starts[u] = at;
      next[tokens[u]] = at;
      at += count[tokens[u]];
    }
    starts[distinct] = at;
    for (int64_t r = 0; r < n; ++r) rows[next[id[r]]++] = static_cast<int32_t>(r);
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(Tensor device_plan, ToDevice(plan));
    return CudaStatus(
        cuda::LaunchEmbeddingBackward(device_plan.data<int32_t>(), distinct, dout.data<float>(),
                                      width, dtable.data<float>(), stream()),
        "EmbeddingBackward kernel");
  }

  absl::Status NllBackward(const Tensor& logits, const Tensor& targets, float scale,
                           Tensor& dlogits) override {
    const char* op = "NllBackward";
    QCAL_RETURN_IF_ERROR(ExpectDevice(logits, DType::kF32, op, "logits"));
    QCAL_RETURN_IF_ERROR(ExpectHostI32(targets, op, "targets"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(dlogits, DType::kF32, op, "dlogits"));
    if (logits.rank() != 2 || logits.dim(1) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": logits is ", logits.DebugString(), ", expected [rows, vocab > 0]"));
    }
    const int64_t rows = logits.dim(0), vocab = logits.dim(1);
    if (targets.numel() != rows) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": ", targets.numel(), " targets for ", rows, " rows of logits"));
    }
    QCAL_RETURN_IF_ERROR(ExpectShape(dlogits, logits.shape(), op, "dlogits"));
    const int32_t* t = targets.data<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
      if (t[r] < -1 || t[r] >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat(op, ": target ", t[r], " at row ", r, " is outside [-1, ", vocab, ")"));
      }
    }
    if (rows == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(Tensor device_targets, ToDevice(targets));
    return CudaStatus(
        cuda::LaunchNllBackward(logits.data<float>(), rows, vocab, device_targets.data<int32_t>(),
                                scale, dlogits.data<float>(), stream()),
        "NllBackward kernel");
  }

  absl::Status ScaleRowsByNorm(const Tensor& g, Tensor& x) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(g, DType::kF32, "ScaleRowsByNorm", "g"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ScaleRowsByNorm", "x"));
    if (g.rank() != 2 || x.rank() != 2 || g.dim(0) != x.dim(0)) {
      return absl::InvalidArgumentError(absl::StrCat("ScaleRowsByNorm: g ", g.DebugString(),
                                                     " and x ", x.DebugString(),
                                                     " must be matrices with the same rows"));
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cuda::LaunchScaleRowsByNorm(g.data<float>(), g.dim(0), g.dim(1),
                                                  x.data<float>(), x.dim(1), stream()),
                      "ScaleRowsByNorm kernel");
  }

  absl::Status ScaleRowsByNormInto(const Tensor& g, const Tensor& x, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(g, DType::kF32, "ScaleRowsByNormInto", "g"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "ScaleRowsByNormInto", "x"));
    if (g.rank() != 2 || x.rank() != 2 || g.dim(0) != x.dim(0) || !out.defined() ||
        out.shape() != x.shape() || out.device() != Device::kCuda ||
        (out.dtype() != DType::kF32 && out.dtype() != DType::kBF16)) {
      return absl::InvalidArgumentError(
          absl::StrCat("ScaleRowsByNormInto: g ", g.DebugString(), ", x ", x.DebugString(),
                       " and out ", out.defined() ? out.DebugString() : "undefined",
                       ": matrices with the same rows, out F32 or BF16 of x's shape"));
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(
        cuda::LaunchScaleRowsByNormInto(g.data<float>(), g.dim(0), g.dim(1), x.data<float>(),
                                        x.dim(1), out.raw(), out.dtype() == DType::kBF16, stream()),
        "ScaleRowsByNormInto kernel");
  }

  absl::Status AccumulateSquares(const Tensor& g, Tensor& f) override {
    QCAL_RETURN_IF_ERROR(ExpectDevice(g, DType::kF32, "AccumulateSquares", "g"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(f, DType::kF32, "AccumulateSquares", "f"));
    if (g.numel() != f.numel()) {
      return absl::InvalidArgumentError(absl::StrCat("AccumulateSquares: g ", g.DebugString(),
                                                     " and f ", f.DebugString(),
                                                     " differ in element count"));
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(
        cuda::LaunchAccumulateSquares(g.data<float>(), f.data<float>(), g.numel(), stream()),
        "AccumulateSquares kernel");
  }

  absl::Status ClippedFakeQuant(const Tensor& w, const ClipTensors& layout, const Tensor& gamma,
                                const Tensor& beta, Tensor& w_hat) override {
    const char* op = "ClippedFakeQuant";
    QCAL_RETURN_IF_ERROR(CheckClipOperands(layout, w, gamma, beta, Device::kCuda, op));
    const bool bf16 = w_hat.defined() && w_hat.dtype() == DType::kBF16;
    QCAL_RETURN_IF_ERROR(CheckTrainOperand(w_hat, bf16 ? DType::kBF16 : DType::kF32, w.shape(),
                                           Device::kCuda, op, "w_hat"));
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    const cudaError_t error =
        bf16 ? cuda::LaunchClippedFakeQuantBf16(layout.view(), w.data<float>(), gamma.data<float>(),
                                                beta.data<float>(), w_hat.data<__nv_bfloat16>(),
                                                stream())
             : cuda::LaunchClippedFakeQuant(layout.view(), w.data<float>(), gamma.data<float>(),
                                            beta.data<float>(), w_hat.data<float>(), stream());
    return CudaStatus(error, "ClippedFakeQuant kernel");
  }

  absl::Status ClippedFakeQuantBackward(const Tensor& w, const ClipTensors& layout,
                                        const Tensor& gamma, const Tensor& beta,
                                        const Tensor& d_w_hat, Tensor& d_gamma, Tensor& d_beta,
                                        Tensor* d_w) override {
    const char* op = "ClippedFakeQuantBackward";
    QCAL_RETURN_IF_ERROR(CheckClipBackwardOperands(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta,
                                                   d_w, Device::kCuda, op));
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(cuda::LaunchClippedFakeQuantBackward(
                          layout.view(), w.data<float>(), gamma.data<float>(), beta.data<float>(),
                          d_w_hat.data<float>(), d_gamma.data<float>(), d_beta.data<float>(),
                          d_w ? d_w->data<float>() : nullptr, stream()),
                      "ClippedFakeQuantBackward kernel");
  }

  void ProfilerRange(bool start) override {
    if (!cuda::UseDevice(device_).ok()) return;
    if (start) {
      (void)cudaProfilerStart();
    } else {
      (void)cudaDeviceSynchronize();
      (void)cudaProfilerStop();
    }
  }

  absl::Status AdamWStep(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, int64_t t,
                         const AdamWOptions& options) override {
    const char* op = "AdamWStep";
    QCAL_RETURN_IF_ERROR(options.Validate());
    if (t < 1) return absl::InvalidArgumentError(absl::StrCat(op, ": step ", t, " is not >= 1"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(p, DType::kF32, op, "p"));
    for (const auto& [x, what] :
         {std::pair<const Tensor*, const char*>{&g, "g"}, {&m, "m"}, {&v, "v"}}) {
      QCAL_RETURN_IF_ERROR(ExpectDevice(*x, DType::kF32, op, what));
      if (x->numel() != p.numel()) {
        return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " ", x->DebugString(),
                                                       " and p ", p.DebugString(),
                                                       " differ in element count"));
      }
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    return CudaStatus(
        cuda::LaunchAdamWStep(p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(),
                              p.numel(), AdamWCoefficientsOf<float>(options, t), stream()),
        "AdamWStep kernel");
  }

  absl::StatusOr<double> SquaredError(const Tensor& y, const Tensor& target, float scale,
                                      Tensor* dy) override {
    const char* op = "SquaredError";
    QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, op, "y"));
    QCAL_RETURN_IF_ERROR(
        CheckTrainOperand(target, DType::kF32, y.shape(), Device::kCuda, op, "target"));
    if (dy) {
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(*dy, DType::kF32, y.shape(), Device::kCuda, op, "dy"));
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    const int64_t blocks = cuda::SquaredErrorBlocks(y.numel());
    QCAL_ASSIGN_OR_RETURN(Tensor partial, Uninitialized(DType::kF64, {blocks}));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchSquaredError(y.data<float>(), target.data<float>(), y.numel(), scale,
                                            dy ? dy->data<float>() : nullptr,
                                            partial.data<double>(), stream()),
                   "SquaredError kernel"));
    QCAL_ASSIGN_OR_RETURN(Tensor sums, ToHost(partial));
    double total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += sums.data<double>()[b];
    return total;
  }

  absl::StatusOr<double> WeightedSquaredError(const Tensor& x, const Tensor& r, const Tensor& f,
                                              float scale, Tensor* g1, Tensor* g2,
                                              double total) override {
    const char* op = "WeightedSquaredError";
    QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, op, "x"));
    if (x.rank() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": x must have rank 2, got ", x.DebugString()));
    }
    QCAL_RETURN_IF_ERROR(CheckTrainOperand(r, DType::kF32, x.shape(), Device::kCuda, op, "r"));
    if (f.defined()) {
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(f, DType::kF32, x.shape(), Device::kCuda, op, "f"));
    }
    if (g1) {
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(*g1, DType::kF32, x.shape(), Device::kCuda, op, "g1"));
    }
    if (g2) {
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(*g2, DType::kF32, x.shape(), Device::kCuda, op, "g2"));
    }
    const int64_t rows = x.dim(0);
    if (rows == 0) return total;
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    QCAL_ASSIGN_OR_RETURN(Tensor row_sums, Uninitialized(DType::kF64, {rows}));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchWeightedSquaredError(
                       x.data<float>(), r.data<float>(), f.defined() ? f.data<float>() : nullptr,
                       rows, x.dim(1), scale, g1 ? g1->data<float>() : nullptr,
                       g2 ? g2->data<float>() : nullptr, row_sums.data<double>(), stream()),
                   "WeightedSquaredError kernel"));
    QCAL_ASSIGN_OR_RETURN(Tensor sums, ToHost(row_sums));
    for (int64_t o = 0; o < rows; ++o) total += sums.data<double>()[o];
    return total;
  }

 private:
  // Gemm, or with `lower` GemmLower: row panels [r0, r1) of the lower triangle, each one product
  // of op(a)'s rows r0..r1 with op(b)'s first r1 columns ((P + 1) / 2P of the full product for P
  // panels; panel starts are multiples of 64 rows, so that bf16 operands stay aligned).
  absl::Status GemmPanels(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                          float beta, Tensor& c, bool lower) {
    QCAL_RETURN_IF_ERROR(ExpectOperand(a, "Gemm", "a"));
    QCAL_RETURN_IF_ERROR(ExpectOperand(b, "Gemm", "b"));
    QCAL_RETURN_IF_ERROR(ExpectDevice(c, DType::kF32, "Gemm", "c"));
    if (a.rank() != 2 || b.rank() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("Gemm: a ", a.DebugString(), " and b ",
                                                     b.DebugString(), " must be matrices"));
    }
    const int64_t m = trans_a ? a.dim(1) : a.dim(0), k = trans_a ? a.dim(0) : a.dim(1);
    const int64_t kb = trans_b ? b.dim(1) : b.dim(0), n = trans_b ? b.dim(0) : b.dim(1);
    if (k != kb) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gemm: op(a) of ", a.DebugString(), (trans_a ? " transposed" : ""), " has ",
                       k, " columns but op(b) of ", b.DebugString(), (trans_b ? " transposed" : ""),
                       " has ", kb, " rows"));
    }
    QCAL_RETURN_IF_ERROR(ExpectShape(c, {m, n}, "Gemm", "c"));
    if (m == 0 || n == 0) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    float* cp = c.data<float>();
    if (k == 0) {  // cuBLAS leaves c unscaled for an empty inner dimension
      if (beta == 0.0f) {
        return CudaStatus(cudaMemsetAsync(cp, 0, c.nbytes(), stream()), "Gemm: zeroing c");
      }
      return CudaStatus(cuda::LaunchScale(cp, c.numel(), beta, stream()), "Gemm: scaling c");
    }
    const DType operands = dtype_ == ComputeDType::kBF16 ? DType::kBF16 : DType::kF32;
    QCAL_ASSIGN_OR_RETURN(Tensor ao, AsOperand(a, operands));
    QCAL_ASSIGN_OR_RETURN(Tensor bo, AsOperand(b, operands));
    if (!lower || m != n || m < kGramPanels * kGramMinPanelWidth) {
      return cuda::Gemm(blas_.get(), trans_a, trans_b, m, n, k, alpha, ao.raw(), a.dim(1), bo.raw(),
                        b.dim(1), operands, beta, cp, n);
    }
    const int64_t width = ((m + kGramPanels - 1) / kGramPanels + 63) / 64 * 64;
    const int64_t elem = operands == DType::kBF16 ? 2 : 4;
    const char* ap = static_cast<const char*>(ao.raw());
    for (int64_t r0 = 0; r0 < m; r0 += width) {
      const int64_t r1 = std::min(m, r0 + width);
      // op(a)'s rows r0..r1: a's rows (a [m, k]) or a's columns (a [k, m] transposed).
      const void* a_rows = ap + (trans_a ? r0 : r0 * a.dim(1)) * elem;
      QCAL_RETURN_IF_ERROR(cuda::Gemm(blas_.get(), trans_a, trans_b, r1 - r0, r1, k, alpha, a_rows,
                                      a.dim(1), bo.raw(), b.dim(1), operands, beta, cp + r0 * n,
                                      n));
    }
    return absl::OkStatus();
  }

  cudaStream_t stream() const { return stream_.get(); }

  // The tensor-core path: q, k and v rounded to bf16 into padded scratch copies, then the kernel.
  // With `saved`, the packed operands are kept there and each query's log2-sum-exp written.
  absl::Status AttentionBf16(const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttentionShape& s, Tensor& out, AttentionSaved* saved) {
    const int dp = cuda::AttentionPaddedDim(s.head_dim);
    const int64_t q_rows = int64_t(s.batch) * s.q_len, kv_rows = int64_t(s.batch) * s.kv_len;
    QCAL_ASSIGN_OR_RETURN(Tensor qb,
                          Uninitialized(DType::kBF16, {q_rows, int64_t(s.num_heads) * dp}));
    QCAL_ASSIGN_OR_RETURN(Tensor kb,
                          Uninitialized(DType::kBF16, {kv_rows, int64_t(s.num_kv_heads) * dp}));
    QCAL_ASSIGN_OR_RETURN(Tensor vb,
                          Uninitialized(DType::kBF16, {kv_rows, int64_t(s.num_kv_heads) * dp}));
    auto* qp = static_cast<__nv_bfloat16*>(qb.raw());
    auto* kp = static_cast<__nv_bfloat16*>(kb.raw());
    auto* vp = static_cast<__nv_bfloat16*>(vb.raw());
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cuda::LaunchPackBf16Heads(q.data<float>(), q_rows, s.num_heads, s.head_dim, qp, stream()),
        "Attention: packing q"));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchPackBf16Heads(k.data<float>(), kv_rows, s.num_kv_heads, s.head_dim,
                                             kp, stream()),
                   "Attention: packing k"));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchPackBf16Heads(v.data<float>(), kv_rows, s.num_kv_heads, s.head_dim,
                                             vp, stream()),
                   "Attention: packing v"));
    cuda::AttentionBf16Args args;
    args.q = qp;
    args.k = kp;
    args.v = vp;
    args.out = out.data<float>();
    SetShape(s, args);
    args.padded_dim = dp;
    if (saved != nullptr) {
      QCAL_ASSIGN_OR_RETURN(
          saved->lse,
          Uninitialized(DType::kF32, {int64_t(s.batch), int64_t(s.num_heads), int64_t(s.q_len)}));
      args.lse = saved->lse.data<float>();
      saved->q = qb;
      saved->k = kb;
      saved->v = vb;
    }
    return CudaStatus(cuda::LaunchAttentionBf16(args, stream()), "Attention kernel (bf16)");
  }

  // AttentionBackward with bf16 compute: q, k, v and dout packed to bf16 as AttentionBf16 packs
  // them, then the tensor-core kernels (P and dS rounded to bf16 where they enter a product).
  // With `saved` (AttentionBackwardSaved): its packed q, k and v, and the statistics already in
  // `scratch`.
  absl::Status AttentionBackwardBf16(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& dout, const AttentionShape& s, Tensor& scratch,
                                     const AttentionSaved* saved, Tensor& dq, Tensor& dk,
                                     Tensor& dv) {
    const int dp = cuda::AttentionPaddedDim(s.head_dim);
    const int64_t q_rows = int64_t(s.batch) * s.q_len, kv_rows = int64_t(s.batch) * s.kv_len;
    const Shape q_shape{q_rows, int64_t(s.num_heads) * dp};
    const Shape kv_shape{kv_rows, int64_t(s.num_kv_heads) * dp};
    QCAL_ASSIGN_OR_RETURN(Tensor dob, Uninitialized(DType::kBF16, q_shape));
    Tensor qb, kb, vb;
    if (saved != nullptr) {
      qb = saved->q;
      kb = saved->k;
      vb = saved->v;
    } else {
      QCAL_ASSIGN_OR_RETURN(qb, Uninitialized(DType::kBF16, q_shape));
      QCAL_ASSIGN_OR_RETURN(kb, Uninitialized(DType::kBF16, kv_shape));
      QCAL_ASSIGN_OR_RETURN(vb, Uninitialized(DType::kBF16, kv_shape));
    }
    const struct {
      const Tensor& from;
      Tensor& to;
      int64_t rows;
      int heads;
      const char* what;
    } packs[] = {{dout, dob, q_rows, s.num_heads, "AttentionBackward: packing dout"},
                 {q, qb, q_rows, s.num_heads, "AttentionBackward: packing q"},
                 {k, kb, kv_rows, s.num_kv_heads, "AttentionBackward: packing k"},
                 {v, vb, kv_rows, s.num_kv_heads, "AttentionBackward: packing v"}};
    for (const auto& p : packs) {
      if (saved != nullptr && &p.from != &dout) continue;  // packed by the forward
      QCAL_RETURN_IF_ERROR(
          CudaStatus(cuda::LaunchPackBf16Heads(p.from.data<float>(), p.rows, p.heads, s.head_dim,
                                               static_cast<__nv_bfloat16*>(p.to.raw()), stream()),
                     p.what));
    }
    cuda::AttentionBackwardBf16Args args;
    args.q = static_cast<const __nv_bfloat16*>(qb.raw());
    args.k = static_cast<const __nv_bfloat16*>(kb.raw());
    args.v = static_cast<const __nv_bfloat16*>(vb.raw());
    args.dout = static_cast<const __nv_bfloat16*>(dob.raw());
    args.dq = dq.data<float>();
    args.dk = dk.data<float>();
    args.dv = dv.data<float>();
    args.scratch = scratch.data<float>();
    SetShape(s, args);
    args.padded_dim = dp;
    args.stats_given = saved != nullptr;
    return CudaStatus(cuda::LaunchAttentionBackwardBf16(args, stream()),
                      "AttentionBackward kernels (bf16)");
  }

  cuda::QuantContext SolverContext() {
    cuda::QuantContext ctx;
    ctx.device = device_;
    ctx.stream = stream();
    ctx.blas = blas_.get();
    ctx.solver = solver_.get();
    ctx.alloc = [this](DType dtype, const Shape& shape) { return Uninitialized(dtype, shape); };
    return ctx;
  }

  absl::StatusOr<Tensor> Uninitialized(DType dtype, const Shape& shape) {
    for (int64_t d : shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat("Alloc: bad shape ", ShapeString(shape)));
      }
    }
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
    const size_t bytes = NumElements(shape) * DTypeSize(dtype);
    QCAL_ASSIGN_OR_RETURN(std::shared_ptr<Storage> storage, allocator_->Allocate(bytes));
    return Tensor(std::move(storage), 0, dtype, shape);
  }

  // `t` (a CUDA F32 or BF16 tensor) in the dtype `operands`: t itself when it already is, else a
  // converted scratch copy (fp32 -> bf16 rounds to nearest even; bf16 -> fp32 is exact).
  absl::StatusOr<Tensor> AsOperand(const Tensor& t, DType operands) {
    if (t.dtype() == operands) return t;
    QCAL_ASSIGN_OR_RETURN(Tensor out, Uninitialized(operands, t.shape()));
    cudaError_t error;
    if (operands == DType::kBF16) {
      error =
          cuda::LaunchF32ToBf16(t.data<float>(), out.data<__nv_bfloat16>(), t.numel(), stream());
    } else {
      error =
          cuda::LaunchBf16ToF32(t.data<__nv_bfloat16>(), out.data<float>(), t.numel(), stream());
    }
    QCAL_RETURN_IF_ERROR(CudaStatus(error, "converting GEMM operands"));
    return out;
  }

  // The device (cos, sin) table of `shape`, computed on the host by ref::RopeAngle so that both
  // backends rotate by identical angles. The last table is kept while the shape stays the same
  // (a whole evaluation; the q and k calls of one decoding step).
  absl::StatusOr<const float*> RopeTable(const RopeShape& shape) {
    const bool same = rope_table_.defined() && rope_key_.seq_len == shape.seq_len &&
                      rope_key_.offset == shape.offset && rope_key_.head_dim == shape.head_dim &&
                      rope_key_.theta == shape.theta && rope_key_.scaling == shape.scaling;
    if (!same) {
      const int half = shape.head_dim / 2;
      Tensor host = Tensor::Zeros(DType::kF32, {int64_t(shape.seq_len) * half * 2});
      float* cs = host.data<float>();
      for (int p = 0; p < shape.seq_len; ++p) {
        for (int i = 0; i < half; ++i) {
          const int64_t at = (int64_t(p) * half + i) * 2;
          ref::RopeAngle(shape.offset + p, i, shape, &cs[at], &cs[at + 1]);
        }
      }
      QCAL_ASSIGN_OR_RETURN(rope_table_, ToDevice(host));
      rope_key_ = shape;
    }
    return rope_table_.data<float>();
  }

  const int device_;
  const ComputeDType dtype_;
  const int64_t memory_limit_;
  const std::string kind_;
  // Declared before the handles: they are destroyed first.
  cuda::CudaStream stream_;
  cuda::CublasHandle blas_;
  cuda::CusolverHandle solver_;
  std::shared_ptr<cuda::CachingAllocator> allocator_;
  std::shared_ptr<cuda::CachingAllocator> pinned_;
  RopeShape rope_key_;
  Tensor rope_table_;
  // SideBackend(): created on first use; destroyed first (it synchronizes its own stream).
  std::unique_ptr<Backend> side_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options,
                                                           int index) {
  const int count = CudaDeviceCount();
  if (count == 0) return absl::FailedPreconditionError("no CUDA device is available");
  if (index < 0 || index >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", index, " does not exist (", count, " present)"));
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(index));
  cudaDeviceProp prop;
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties"));
  QCAL_ASSIGN_OR_RETURN(cuda::CudaStream stream, cuda::CudaStream::Create());
  QCAL_ASSIGN_OR_RETURN(cuda::CublasHandle blas, cuda::CublasHandle::Create(stream.get()));
  QCAL_ASSIGN_OR_RETURN(cuda::CusolverHandle solver, cuda::CusolverHandle::Create(stream.get()));
  int solver_version = 0;
  QCAL_RETURN_IF_ERROR(
      cuda::CusolverStatus(cusolverGetVersion(&solver_version), "cusolverGetVersion"));
  std::string kind = absl::StrCat("cuda/", prop.name, "/sm_", prop.major, prop.minor, "/cublas-",
                                  blas.Version(), "/cusolver-", solver_version);
  return std::make_unique<CudaBackend>(index, options.compute_dtype, options.memory_limit_bytes,
                                       std::move(kind), std::move(stream), std::move(blas),
                                       std::move(solver));
}

}  // namespace qcal::kernels
