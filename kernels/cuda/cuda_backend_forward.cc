// The CUDA backend's forward ops: Linear and the GEMMs (panelled lower triangles, batched),
// conversions, RMSNorm, RoPE, SiLU, Add, embedding, NLL and the Gram accumulation.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cpu/ref_ops.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/cuda_backend_internal.h"
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/grad_elementwise.cuh"
#include "kernels/cuda/nll.cuh"
#include "kernels/cuda/rms_norm.cuh"
#include "kernels/cuda/rope.cuh"

namespace qcal::kernels::cuda_internal {

namespace {

// Row panels of the bf16 Gram product (AccumulateGram).
constexpr int64_t kGramPanels = 8;
constexpr int64_t kGramMinPanelWidth = 256;

// A GEMM operand: a CUDA tensor, F32 (rounded per the compute dtype) or BF16 (already rounded).
absl::Status ExpectOperand(const Tensor& t, const char* op, const char* what) {
  if (t.defined() && t.dtype() == DType::kBF16) return ExpectDevice(t, DType::kBF16, op, what);
  return ExpectDevice(t, DType::kF32, op, what);
}

}  // namespace

absl::Status CudaBackend::Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                                 bool accumulate) {
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
    QCAL_RETURN_IF_ERROR(cuda::Gemm(blas_.get(), false, true, m, n, k, 1.0f, xo.raw(), k, wo.raw(),
                                    k, operands, beta, yp, n));
  }
  if (has_bias && accumulate) {
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cuda::LaunchAddRowVector(bias->data<float>(), yp, m, n, stream()), "Linear: bias"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "RmsNorm", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(weight, DType::kF32, "RmsNorm", "weight"));
  QCAL_RETURN_IF_ERROR(ExpectOperand(y, "RmsNorm", "y"));
  QCAL_RETURN_IF_ERROR(ExpectShape(y, x.shape(), "RmsNorm", "y"));
  if (x.rank() == 0) return absl::InvalidArgumentError("RmsNorm: x must have rank >= 1");
  const int64_t width = x.dim(-1);
  QCAL_RETURN_IF_ERROR(ExpectShape(weight, {width}, "RmsNorm", "weight"));
  if (width == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  const int64_t rows = x.numel() / width;
  if (y.dtype() == DType::kBF16) {
    return CudaStatus(cuda::LaunchRmsNorm(x.data<float>(), weight.data<float>(), eps,
                                          y.data<__nv_bfloat16>(), rows, width, stream()),
                      "RmsNorm kernel");
  }
  return CudaStatus(cuda::LaunchRmsNorm(x.data<float>(), weight.data<float>(), eps, y.data<float>(),
                                        rows, width, stream()),
                    "RmsNorm kernel");
}

absl::Status CudaBackend::Rope(Tensor& x, const RopeShape& shape) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "Rope", "x"));
  if (x.rank() == 0 || shape.head_dim <= 0 || shape.head_dim % 2 != 0 ||
      x.dim(-1) % shape.head_dim != 0 || shape.seq_len <= 0 || shape.offset < 0) {
    return absl::InvalidArgumentError(absl::StrCat("Rope: bad shape (x ", x.DebugString(),
                                                   ", head_dim ", shape.head_dim, ", seq_len ",
                                                   shape.seq_len, ", offset ", shape.offset, ")"));
  }
  const int64_t width = x.dim(-1);
  if (width == 0 || x.numel() == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  QCAL_ASSIGN_OR_RETURN(const float* table, RopeTable(shape));
  return CudaStatus(cuda::LaunchRope(x.data<float>(), x.numel() / width, width, shape.seq_len,
                                     shape.head_dim, table, stream()),
                    "Rope kernel");
}

absl::Status CudaBackend::SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(gate, DType::kF32, "SiluMul", "gate"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(up, DType::kF32, "SiluMul", "up"));
  QCAL_RETURN_IF_ERROR(ExpectOperand(out, "SiluMul", "out"));
  QCAL_RETURN_IF_ERROR(ExpectShape(up, gate.shape(), "SiluMul", "up"));
  QCAL_RETURN_IF_ERROR(ExpectShape(out, gate.shape(), "SiluMul", "out"));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  if (out.dtype() == DType::kBF16) {
    return CudaStatus(cuda::LaunchSiluMul(gate.data<float>(), up.data<float>(),
                                          out.data<__nv_bfloat16>(), gate.numel(), stream()),
                      "SiluMul kernel");
  }
  return CudaStatus(cuda::LaunchSiluMul(gate.data<float>(), up.data<float>(), out.data<float>(),
                                        gate.numel(), stream()),
                    "SiluMul kernel");
}

absl::Status CudaBackend::Add(const Tensor& x, Tensor& y) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "Add", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, "Add", "y"));
  QCAL_RETURN_IF_ERROR(ExpectShape(y, x.shape(), "Add", "y"));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(cuda::LaunchAdd(x.data<float>(), y.data<float>(), x.numel(), stream()),
                    "Add kernel");
}

absl::Status CudaBackend::Embedding(const Tensor& table, const Tensor& ids, Tensor& out) {
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
  return CudaStatus(cuda::LaunchEmbedding(table.data<float>(), width, device_ids.data<int32_t>(), n,
                                          out.data<float>(), stream()),
                    "Embedding kernel");
}

absl::Status CudaBackend::Nll(const Tensor& logits, const Tensor& targets, Tensor& nll) {
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

absl::Status CudaBackend::AccumulateGram(const Tensor& x, Tensor& h) {
  return GramInto(x, h, /*accumulate=*/true);
}

absl::StatusOr<Tensor> CudaBackend::Gram(const Tensor& x) {
  // The fp32 SYRK only adds: a zero-filled h (Backend's default).
  if (dtype_ != ComputeDType::kBF16 || x.rank() != 2) return Backend::Gram(x);
  // The bf16 panels and the mirror write every element: no zero fill.
  QCAL_ASSIGN_OR_RETURN(Tensor h, Uninitialized(DType::kF32, {x.dim(1), x.dim(1)}));
  QCAL_RETURN_IF_ERROR(GramInto(x, h, /*accumulate=*/false));
  return h;
}

absl::StatusOr<Tensor> CudaBackend::GramLower(const Tensor& x) {
  // The bf16 panels write the lower triangle: Gram without its mirror.
  if (dtype_ != ComputeDType::kBF16 || x.rank() != 2) return Gram(x);
  QCAL_ASSIGN_OR_RETURN(Tensor h, Uninitialized(DType::kF32, {x.dim(1), x.dim(1)}));
  QCAL_RETURN_IF_ERROR(GramInto(x, h, /*accumulate=*/false, /*mirror=*/false));
  return h;
}

absl::Status CudaBackend::AddLower(const Tensor& x, Tensor& y) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, DType::kF32, "AddLower", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(y, DType::kF32, "AddLower", "y"));
  if (x.rank() != 2 || x.dim(0) != x.dim(1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AddLower: x is ", x.DebugString(), ", expected a square matrix"));
  }
  QCAL_RETURN_IF_ERROR(ExpectShape(y, x.shape(), "AddLower", "y"));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(cuda::LaunchAddLower(x.data<float>(), y.data<float>(), x.dim(0), stream()),
                    "AddLower kernel");
}

// h += xᵀx (accumulate) or h = xᵀx (bf16 compute only: the panels overwrite the lower triangle
// and the diagonal blocks, the mirror the rest; without `mirror`, h's strict upper triangle is
// left as the panels leave it: GramLower).
absl::Status CudaBackend::GramInto(const Tensor& x, Tensor& h, bool accumulate, bool mirror) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(x, x.dtype() == DType::kBF16 ? DType::kBF16 : DType::kF32,
                                    "AccumulateGram", "x"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(h, DType::kF32, "AccumulateGram", "h"));
  if (x.rank() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("AccumulateGram: x is ", x.DebugString(), ", expected rank 2"));
  }
  const int64_t n = x.dim(0), k = x.dim(1);
  QCAL_RETURN_IF_ERROR(ExpectShape(h, {k, k}, "AccumulateGram", "h"));
  if (k == 0) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  float* hp = h.data<float>();
  if (n == 0) {
    if (accumulate) return absl::OkStatus();
    return CudaStatus(cudaMemsetAsync(hp, 0, h.nbytes(), stream()), "Gram: no rows");
  }
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
                                      xp, k, DType::kBF16, accumulate ? 1.0f : 0.0f, hp + r0 * k,
                                      k));
    }
  } else {
    if (!accumulate) return absl::InternalError("GramInto: fp32 compute only accumulates");
    QCAL_ASSIGN_OR_RETURN(Tensor xf, AsOperand(x, DType::kF32));
    QCAL_RETURN_IF_ERROR(cuda::SyrkLowerF32(blas_.get(), xf.data<float>(), n, k, hp));
  }
  if (!mirror) return absl::OkStatus();
  return CudaStatus(cuda::LaunchMirrorLowerToUpper(hp, k, stream()), "AccumulateGram: mirror");
}

absl::Status CudaBackend::Gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                               float alpha, float beta, Tensor& c) {
  return GemmPanels(a, trans_a, b, trans_b, alpha, beta, c, /*lower=*/false);
}

absl::Status CudaBackend::GemmLower(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                    float alpha, float beta, Tensor& c) {
  return GemmPanels(a, trans_a, b, trans_b, alpha, beta, c, /*lower=*/true);
}

absl::Status CudaBackend::Convert(const Tensor& src, Tensor& dst) {
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

absl::Status CudaBackend::ConcatColumns(const Tensor& a, const Tensor& b, Tensor& out) {
  QCAL_RETURN_IF_ERROR(CheckConcatColumns(a, b, out, Device::kCuda));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  const int64_t m = out.dim(0), ca = a.dim(1), cb = b.dim(1);
  // The eight type combinations, dispatched one operand at a time.
  auto with_out = [&](const auto* ap, const auto* bp) -> cudaError_t {
    if (out.dtype() == DType::kF32) {
      return cuda::LaunchConcatColumns(ap, ca, bp, cb, out.data<float>(), m, stream());
    }
    return cuda::LaunchConcatColumns(ap, ca, bp, cb, static_cast<__nv_bfloat16*>(out.raw()), m,
                                     stream());
  };
  auto with_b = [&](const auto* ap) -> cudaError_t {
    if (b.dtype() == DType::kF32) return with_out(ap, b.data<float>());
    return with_out(ap, static_cast<const __nv_bfloat16*>(b.raw()));
  };
  return CudaStatus(a.dtype() == DType::kF32 ? with_b(a.data<float>())
                                             : with_b(static_cast<const __nv_bfloat16*>(a.raw())),
                    "ConcatColumns");
}

absl::Status CudaBackend::WriteColumns(const Tensor& src, int64_t first, Tensor& out) {
  QCAL_RETURN_IF_ERROR(CheckWriteColumns(src, first, out, Device::kCuda));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  const int64_t m = src.dim(0), c = src.dim(1), n = out.dim(1);
  auto with_out = [&](const auto* sp) -> cudaError_t {
    if (out.dtype() == DType::kF32) {
      return cuda::LaunchWriteColumns(sp, c, out.data<float>() + first, n, m, stream());
    }
    return cuda::LaunchWriteColumns(sp, c, static_cast<__nv_bfloat16*>(out.raw()) + first, n, m,
                                    stream());
  };
  return CudaStatus(src.dtype() == DType::kF32
                        ? with_out(src.data<float>())
                        : with_out(static_cast<const __nv_bfloat16*>(src.raw())),
                    "WriteColumns");
}

absl::Status CudaBackend::MirrorLower(Tensor& c) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(c, DType::kF32, "MirrorLower", "c"));
  const int64_t n = c.rank() >= 2 ? c.dim(-1) : -1;
  const int64_t batch = c.rank() == 3 ? c.dim(0) : 1;
  if ((c.rank() != 2 && c.rank() != 3) || c.dim(-2) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("MirrorLower: c is ", c.DebugString(), ", expected [n, n] or [batch, n, n]"));
  }
  if (n <= 1) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  for (int64_t s = 0; s < batch; ++s) {
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cuda::LaunchMirrorLowerToUpper(c.data<float>() + s * n * n, n, stream()), "MirrorLower"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::GemmBatched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                      float alpha, float beta, Tensor& c, bool lower) {
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

absl::Status CudaBackend::GemmPanels(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                     float alpha, float beta, Tensor& c, bool lower) {
  QCAL_RETURN_IF_ERROR(ExpectOperand(a, "Gemm", "a"));
  QCAL_RETURN_IF_ERROR(ExpectOperand(b, "Gemm", "b"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(c, DType::kF32, "Gemm", "c"));
  if (a.rank() != 2 || b.rank() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gemm: a ", a.DebugString(), " and b ", b.DebugString(), " must be matrices"));
  }
  const int64_t m = trans_a ? a.dim(1) : a.dim(0), k = trans_a ? a.dim(0) : a.dim(1);
  const int64_t kb = trans_b ? b.dim(1) : b.dim(0), n = trans_b ? b.dim(0) : b.dim(1);
  if (k != kb) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gemm: op(a) of ", a.DebugString(), (trans_a ? " transposed" : ""), " has ", k,
                     " columns but op(b) of ", b.DebugString(), (trans_b ? " transposed" : ""),
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
                                    a.dim(1), bo.raw(), b.dim(1), operands, beta, cp + r0 * n, n));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> CudaBackend::AsOperand(const Tensor& t, DType operands) {
  if (t.dtype() == operands) return t;
  QCAL_ASSIGN_OR_RETURN(Tensor out, Uninitialized(operands, t.shape()));
  cudaError_t error;
  if (operands == DType::kBF16) {
    error = cuda::LaunchF32ToBf16(t.data<float>(), out.data<__nv_bfloat16>(), t.numel(), stream());
  } else {
    error = cuda::LaunchBf16ToF32(t.data<__nv_bfloat16>(), out.data<float>(), t.numel(), stream());
  }
  QCAL_RETURN_IF_ERROR(CudaStatus(error, "converting GEMM operands"));
  return out;
}

absl::StatusOr<const float*> CudaBackend::RopeTable(const RopeShape& shape) {
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

}  // namespace qcal::kernels::cuda_internal
