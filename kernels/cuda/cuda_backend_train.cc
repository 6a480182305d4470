// The CUDA backend's training ops: the backward of the forward ops, clipped fake-quant and its
// backward, AdamW, squared errors, row scaling by norms and squares accumulation.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/clipped_quant.cuh"
#include "kernels/cuda/clipped_quant_backward.cuh"
#include "kernels/cuda/cuda_backend_internal.h"
#include "kernels/cuda/embedding_backward.cuh"
#include "kernels/cuda/grad_elementwise.cuh"
#include "kernels/cuda/nll_backward.cuh"
#include "kernels/cuda/rms_norm_backward.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/squared_error.cuh"

namespace qcal::kernels::cuda_internal {

absl::Status CudaBackend::RmsNormBackward(const Tensor& x, const Tensor& weight, float eps,
                                          const Tensor& dy, Tensor& dx) {
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

absl::Status CudaBackend::RopeBackward(Tensor& g, const RopeShape& shape) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(g, DType::kF32, "RopeBackward", "g"));
  if (g.rank() == 0 || shape.head_dim <= 0 || shape.head_dim % 2 != 0 ||
      g.dim(-1) % shape.head_dim != 0 || shape.seq_len <= 0 || shape.offset < 0) {
    return absl::InvalidArgumentError(absl::StrCat("RopeBackward: bad shape (g ", g.DebugString(),
                                                   ", head_dim ", shape.head_dim, ", seq_len ",
                                                   shape.seq_len, ", offset ", shape.offset, ")"));
  }
  const int64_t width = g.dim(-1);
  if (width == 0 || g.numel() == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  QCAL_ASSIGN_OR_RETURN(const float* table, RopeTable(shape));
  return CudaStatus(cuda::LaunchRopeBackward(g.data<float>(), g.numel() / width, width,
                                             shape.seq_len, shape.head_dim, table, stream()),
                    "RopeBackward kernel");
}

absl::Status CudaBackend::SiluMulBackward(const Tensor& gate, const Tensor& up, const Tensor& dout,
                                          Tensor& dgate, Tensor& dup) {
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

absl::Status CudaBackend::EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable) {
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

absl::Status CudaBackend::NllBackward(const Tensor& logits, const Tensor& targets, float scale,
                                      Tensor& dlogits) {
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

absl::Status CudaBackend::ScaleRowsByNorm(const Tensor& g, Tensor& x) {
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

absl::Status CudaBackend::ScaleRowsByNormInto(const Tensor& g, const Tensor& x, Tensor& out) {
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

absl::Status CudaBackend::AccumulateSquares(const Tensor& g, Tensor& f) {
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

absl::Status CudaBackend::ClippedFakeQuant(const Tensor& w, const ClipTensors& layout,
                                           const Tensor& gamma, const Tensor& beta, Tensor& w_hat) {
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

absl::Status CudaBackend::ClippedFakeQuantBackward(const Tensor& w, const ClipTensors& layout,
                                                   const Tensor& gamma, const Tensor& beta,
                                                   const Tensor& d_w_hat, Tensor& d_gamma,
                                                   Tensor& d_beta, Tensor* d_w) {
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

absl::Status CudaBackend::AdamWStep(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, int64_t t,
                                    const AdamWOptions& options) {
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

absl::StatusOr<double> CudaBackend::SquaredError(const Tensor& y, const Tensor& target, float scale,
                                                 Tensor* dy) {
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
  QCAL_RETURN_IF_ERROR(CudaStatus(
      cuda::LaunchSquaredError(y.data<float>(), target.data<float>(), y.numel(), scale,
                               dy ? dy->data<float>() : nullptr, partial.data<double>(), stream()),
      "SquaredError kernel"));
  QCAL_ASSIGN_OR_RETURN(Tensor sums, ToHost(partial));
  double total = 0;
  for (int64_t b = 0; b < blocks; ++b) total += sums.data<double>()[b];
  return total;
}

absl::StatusOr<double> CudaBackend::WeightedSquaredError(const Tensor& x, const Tensor& r,
                                                         const Tensor& f, float scale, Tensor* g1,
                                                         Tensor* g2, double total) {
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

}  // namespace qcal::kernels::cuda_internal
