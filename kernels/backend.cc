#include "kernels/backend.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/hash_random.h"
#if QCAL_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace qcal::kernels {

absl::Status BackendOptions::Validate() const {
  if (threads < 0) return absl::InvalidArgumentError("threads must be >= 0");
  if (memory_limit_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory_limit_bytes must be >= 0, got ", memory_limit_bytes));
  }
  if (device != "cpu" && device != "cuda" && !absl::StartsWith(device, "cuda:")) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown device \"", device, "\" (expected cpu, cuda or cuda:N)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Backend::Gram(const Tensor& x) {
  if (x.rank() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gram: x is ", x.DebugString(), ", expected rank 2"));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor h, Alloc(DType::kF32, {x.dim(1), x.dim(1)}));
  QCAL_RETURN_IF_ERROR(AccumulateGram(x, h));
  return h;
}

absl::Status Backend::FillUniform(Tensor& t, uint64_t seed, float lo, float hi) {
  if (!t.defined() || t.device() != Device::kHost || t.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("FillUniform: ", t.defined() ? t.DebugString() : "undefined tensor",
                     " is not a host F32 tensor"));
  }
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i)
    p[i] = HashUniform(seed, static_cast<uint64_t>(i), lo, hi);
  return absl::OkStatus();
}

absl::Status Backend::GemmBatched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                  float alpha, float beta, Tensor& c, bool lower) {
  QCAL_RETURN_IF_ERROR(CheckGemmBatched(a, trans_a, b, trans_b, beta, c));
  const int64_t batch = c.dim(0);
  // An F32 view of a BF16 operand (exact), on this backend.
  auto widened = [&](const Tensor& t) -> absl::StatusOr<Tensor> {
    if (t.dtype() == DType::kF32) return t;
    QCAL_ASSIGN_OR_RETURN(Tensor out, Alloc(DType::kF32, t.shape()));
    QCAL_RETURN_IF_ERROR(Convert(t, out));
    return out;
  };
  QCAL_ASSIGN_OR_RETURN(Tensor af, widened(a));
  QCAL_ASSIGN_OR_RETURN(Tensor bf, widened(b));
  Tensor cf = c;
  if (c.dtype() == DType::kBF16) {
    QCAL_ASSIGN_OR_RETURN(cf, Alloc(DType::kF32, c.shape()));
  }
  auto item = [](const Tensor& t, int64_t i) {
    return t.Reshape({t.dim(0) * t.dim(1), t.dim(2)}).Rows(i * t.dim(1), (i + 1) * t.dim(1));
  };
  for (int64_t i = 0; i < batch; ++i) {
    Tensor ci = item(cf, i);
    QCAL_RETURN_IF_ERROR(
        lower ? GemmLower(item(af, i), trans_a, item(bf, i), trans_b, alpha, beta, ci)
              : Gemm(item(af, i), trans_a, item(bf, i), trans_b, alpha, beta, ci));
  }
  if (c.dtype() == DType::kBF16) return Convert(cf, c);
  return absl::OkStatus();
}

absl::Status Backend::RopeAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const RopeShape& rope, const AttentionShape& shape,
                                    Tensor& out) {
  QCAL_ASSIGN_OR_RETURN(Tensor qr, AllocUninitialized(q.dtype(), q.shape()));
  QCAL_RETURN_IF_ERROR(Copy(q, qr));
  QCAL_ASSIGN_OR_RETURN(Tensor kr, AllocUninitialized(k.dtype(), k.shape()));
  QCAL_RETURN_IF_ERROR(Copy(k, kr));
  QCAL_RETURN_IF_ERROR(Rope(qr, rope));
  QCAL_RETURN_IF_ERROR(Rope(kr, rope));
  return Attention(qr, kr, v, shape, out);
}

absl::Status Backend::ScaleRowsByNormInto(const Tensor& g, const Tensor& x, Tensor& out) {
  if (!out.defined() || out.shape() != x.shape() ||
      (out.dtype() != DType::kF32 && out.dtype() != DType::kBF16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ScaleRowsByNormInto: out ", out.defined() ? out.DebugString() : "undefined",
                     " must be F32 or BF16 of x's shape ", x.DebugString()));
  }
  if (out.dtype() == DType::kF32) {
    QCAL_RETURN_IF_ERROR(Copy(x, out));
    return ScaleRowsByNorm(g, out);
  }
  QCAL_ASSIGN_OR_RETURN(Tensor scaled, Alloc(DType::kF32, x.shape()));
  QCAL_RETURN_IF_ERROR(Copy(x, scaled));
  QCAL_RETURN_IF_ERROR(ScaleRowsByNorm(g, scaled));
  return Convert(scaled, out);
}

absl::Status Backend::CheckConcatColumns(const Tensor& a, const Tensor& b, const Tensor& out,
                                         Device device) {
  auto matrix = [device](const Tensor& t) {
    return t.defined() && t.rank() == 2 && t.device() == device &&
           (t.dtype() == DType::kF32 || t.dtype() == DType::kBF16);
  };
  if (!matrix(a) || !matrix(b) || !matrix(out) || a.dim(0) != out.dim(0) ||
      b.dim(0) != out.dim(0) || out.dim(1) != a.dim(1) + b.dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ConcatColumns: a ", a.defined() ? a.DebugString() : "undefined", ", b ",
        b.defined() ? b.DebugString() : "undefined", " into out ",
        out.defined() ? out.DebugString() : "undefined",
        " (F32 or BF16 matrices on this backend's device, out [m, a columns + b columns])"));
  }
  return absl::OkStatus();
}

absl::Status Backend::CheckWriteColumns(const Tensor& src, int64_t first, const Tensor& out,
                                        Device device) {
  auto matrix = [device](const Tensor& t) {
    return t.defined() && t.rank() == 2 && t.device() == device &&
           (t.dtype() == DType::kF32 || t.dtype() == DType::kBF16);
  };
  if (!matrix(src) || !matrix(out) || src.dim(0) != out.dim(0) || first < 0 ||
      first > out.dim(1) - src.dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "WriteColumns: src ", src.defined() ? src.DebugString() : "undefined", " at column ", first,
        " of out ", out.defined() ? out.DebugString() : "undefined",
        " (F32 or BF16 matrices on this backend's device with the same rows, the columns inside "
        "out)"));
  }
  return absl::OkStatus();
}

absl::Status Backend::CheckGemmBatched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                       float beta, const Tensor& c) {
  auto operand = [](const Tensor& t) {
    return t.defined() && t.rank() == 3 && (t.dtype() == DType::kF32 || t.dtype() == DType::kBF16);
  };
  if (!operand(a) || !operand(b) || !operand(c) || a.dim(0) != c.dim(0) || b.dim(0) != c.dim(0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GemmBatched: a ", a.defined() ? a.DebugString() : "undefined", ", b ",
                     b.defined() ? b.DebugString() : "undefined", " and c ",
                     c.defined() ? c.DebugString() : "undefined",
                     " must be F32 or BF16 [batch, rows, cols] with the same batch"));
  }
  const int64_t m = a.dim(trans_a ? 2 : 1), k = a.dim(trans_a ? 1 : 2);
  const int64_t kb = b.dim(trans_b ? 2 : 1), n = b.dim(trans_b ? 1 : 2);
  if (k != kb || c.dim(1) != m || c.dim(2) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GemmBatched: op(a) of ", a.DebugString(), (trans_a ? " transposed" : ""),
                     " times op(b) of ", b.DebugString(), (trans_b ? " transposed" : ""),
                     " does not fit c ", c.DebugString()));
  }
  if (c.dtype() == DType::kBF16 && beta != 0.0f) {
    return absl::InvalidArgumentError("GemmBatched: a BF16 c takes beta == 0 only");
  }
  return absl::OkStatus();
}

absl::Status Backend::CheckAbqLinearOperands(const PreparedAbqLinear& w, const Tensor& x,
                                             const Tensor* bias, const Tensor& y) {
  auto f32 = [](const Tensor& t) { return t.defined() && t.dtype() == DType::kF32; };
  if (!f32(x) || !f32(y) || x.rank() != 2 || x.dim(1) != w.k() ||
      y.shape() != Shape{x.dim(0), w.n()}) {
    return absl::InvalidArgumentError(
        absl::StrCat("AbqLinear: x ", x.defined() ? x.DebugString() : "undefined", " and y ",
                     y.defined() ? y.DebugString() : "undefined", " do not fit a [", w.n(), ", ",
                     w.k(), "] linear (F32 [m, ", w.k(), "] in, [m, ", w.n(), "] out)"));
  }
  if (bias != nullptr && (!f32(*bias) || bias->shape() != Shape{w.n()})) {
    return absl::InvalidArgumentError(
        absl::StrCat("AbqLinear: bias ", bias->defined() ? bias->DebugString() : "undefined",
                     " is not F32 [", w.n(), "]"));
  }
  if (x.dim(0) > kAbqMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("AbqLinear: ", x.dim(0), " tokens in one call, at most ", kAbqMaxTokens));
  }
  return absl::OkStatus();
}

absl::Status Backend::CheckActQuantLinearOperands(const Tensor& x, int bits, const Tensor& w,
                                                  const Tensor* bias, const Tensor& y) {
  if (bits < 2 || bits > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("ActQuantLinear: bits must be 2..8, got ", bits));
  }
  if (!x.defined() || !w.defined() || x.rank() != 2 || w.rank() != 2 || x.dim(1) != w.dim(1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ActQuantLinear: x ", x.defined() ? x.DebugString() : "undefined", " and w ",
                     w.defined() ? w.DebugString() : "undefined", " do not match"));
  }
  const Shape out{x.dim(0), w.dim(0)};
  if (!y.defined() || y.dtype() != DType::kF32 || y.shape() != out) {
    return absl::InvalidArgumentError(absl::StrCat("ActQuantLinear: y is ",
                                                   y.defined() ? y.DebugString() : "undefined",
                                                   ", expected F32 ", ShapeString(out)));
  }
  if (bias && bias->defined() &&
      (bias->dtype() != DType::kF32 || bias->shape() != Shape{w.dim(0)})) {
    return absl::InvalidArgumentError(absl::StrCat("ActQuantLinear: bias is ", bias->DebugString(),
                                                   ", expected F32 [", w.dim(0), "]"));
  }
  return absl::OkStatus();
}

bool CudaAvailable() {
#if QCAL_HAVE_CUDA
  return CudaDeviceCount() > 0;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  if (options.device == "cpu") return CreateCpuBackend(options);
  int index = 0;
  if (absl::StartsWith(options.device, "cuda:") &&
      !absl::SimpleAtoi(options.device.substr(5), &index)) {
    return absl::InvalidArgumentError(absl::StrCat("bad device \"", options.device, "\""));
  }
#if QCAL_HAVE_CUDA
  return CreateCudaBackend(options, index);
#else
  return absl::FailedPreconditionError(
      absl::StrCat("device \"", options.device, "\" requested but qcal was built without CUDA"));
#endif
}

}  // namespace qcal::kernels
