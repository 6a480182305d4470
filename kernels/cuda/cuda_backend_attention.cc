// The CUDA backend's attention: forward and backward, their checks, and the bf16
// tensor-core path (packed operands, saved statistics).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/attention_backward.cuh"
#include "kernels/cuda/cuda_backend_internal.h"

namespace qcal::kernels::cuda_internal {

namespace {

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

}  // namespace

absl::Status CudaBackend::Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const AttentionShape& s, Tensor& out) {
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

absl::Status CudaBackend::RopeAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const RopeShape& rope, const AttentionShape& s,
                                        Tensor& out) {
  if (dtype_ != ComputeDType::kBF16) return Backend::RopeAttention(q, k, v, rope, s, out);
  QCAL_RETURN_IF_ERROR(CheckAttention(q, k, v, s, out));
  if (rope.head_dim != s.head_dim || rope.head_dim % 2 != 0 || rope.seq_len <= 0 ||
      rope.offset < 0 || s.kv_len != s.q_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("RopeAttention: bad RoPE shape (head_dim ", rope.head_dim, " for ", s.head_dim,
                     ", seq_len ", rope.seq_len, ", offset ", rope.offset, "; q_len ", s.q_len,
                     ", kv_len ", s.kv_len, ": q and k must have the same rows)"));
  }
  return AttentionBf16(q, k, v, s, out, nullptr, &rope);
}

absl::Status CudaBackend::AttentionForBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const AttentionShape& s, Tensor& out,
                                               AttentionSaved& saved) {
  saved = AttentionSaved();
  if (dtype_ != ComputeDType::kBF16) return Attention(q, k, v, s, out);
  QCAL_RETURN_IF_ERROR(CheckAttention(q, k, v, s, out));
  return AttentionBf16(q, k, v, s, out, &saved);
}

absl::Status CudaBackend::CheckAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const AttentionShape& s, const Tensor& out) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(q, DType::kF32, "Attention", "q"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(k, DType::kF32, "Attention", "k"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(v, DType::kF32, "Attention", "v"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(out, DType::kF32, "Attention", "out"));
  if (s.batch < 0 || s.q_len < 0 || s.q_offset < 0 || s.head_dim <= 0 || s.num_heads <= 0 ||
      s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads != 0 || s.q_offset + s.q_len > s.kv_len ||
      s.sliding_window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: bad shape (batch ", s.batch, ", q_len ", s.q_len, ", kv_len ",
                     s.kv_len, ", heads ", s.num_heads, "/", s.num_kv_heads, ", head_dim ",
                     s.head_dim, ", q_offset ", s.q_offset, ")"));
  }
  if (s.head_dim > cuda::kAttentionMaxHeadDim || s.batch > 65535 || s.num_heads > 65535) {
    return absl::UnimplementedError(
        absl::StrCat("Attention: the CUDA kernel handles head_dim <= ", cuda::kAttentionMaxHeadDim,
                     " and at most 65535 sequences and heads (got head_dim ", s.head_dim,
                     ", batch ", s.batch, ", heads ", s.num_heads, ")"));
  }
  const int64_t qw = int64_t(s.num_heads) * s.head_dim, kvw = int64_t(s.num_kv_heads) * s.head_dim;
  QCAL_RETURN_IF_ERROR(ExpectShape(q, {int64_t(s.batch) * s.q_len, qw}, "Attention", "q"));
  QCAL_RETURN_IF_ERROR(ExpectShape(k, {int64_t(s.batch) * s.kv_len, kvw}, "Attention", "k"));
  QCAL_RETURN_IF_ERROR(ExpectShape(v, {int64_t(s.batch) * s.kv_len, kvw}, "Attention", "v"));
  QCAL_RETURN_IF_ERROR(ExpectShape(out, q.shape(), "Attention", "out"));
  return cuda::UseDevice(device_);
}

absl::Status CudaBackend::AttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& dout, const AttentionShape& s, Tensor& dq,
                                            Tensor& dk, Tensor& dv) {
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

absl::Status CudaBackend::AttentionBackwardSaved(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& out, const Tensor& dout,
                                                 const AttentionSaved& saved,
                                                 const AttentionShape& s, Tensor& dq, Tensor& dk,
                                                 Tensor& dv) {
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
  QCAL_RETURN_IF_ERROR(expect_packed(saved.k, {kv_rows, int64_t(s.num_kv_heads) * dp}, "saved k"));
  QCAL_RETURN_IF_ERROR(expect_packed(saved.v, {kv_rows, int64_t(s.num_kv_heads) * dp}, "saved v"));
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

absl::StatusOr<Tensor> CudaBackend::AttentionBackwardScratch(const AttentionShape& s) {
  return Uninitialized(
      DType::kF32,
      {std::max<int64_t>(1, cuda::AttentionBackwardScratchFloats(s.batch, s.num_heads, s.q_len))});
}

absl::Status CudaBackend::CheckAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& dout, const AttentionShape& s,
                                                 const Tensor& dq, const Tensor& dk,
                                                 const Tensor& dv) {
  const char* op = "AttentionBackward";
  QCAL_RETURN_IF_ERROR(ExpectDevice(q, DType::kF32, op, "q"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(k, DType::kF32, op, "k"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(v, DType::kF32, op, "v"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(dout, DType::kF32, op, "dout"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(dq, DType::kF32, op, "dq"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(dk, DType::kF32, op, "dk"));
  QCAL_RETURN_IF_ERROR(ExpectDevice(dv, DType::kF32, op, "dv"));
  if (s.batch < 0 || s.q_len < 0 || s.q_offset < 0 || s.head_dim <= 0 || s.num_heads <= 0 ||
      s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads != 0 || s.q_offset + s.q_len > s.kv_len ||
      s.sliding_window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": bad shape (batch ", s.batch, ", q_len ", s.q_len, ", kv_len ", s.kv_len,
                     ", heads ", s.num_heads, "/", s.num_kv_heads, ", head_dim ", s.head_dim,
                     ", q_offset ", s.q_offset, ", window ", s.sliding_window, ")"));
  }
  if (s.head_dim > cuda::kAttentionMaxHeadDim || s.batch > 65535 || s.num_heads > 65535) {
    return absl::UnimplementedError(
        absl::StrCat(op, ": the CUDA kernels handle head_dim <= ", cuda::kAttentionMaxHeadDim,
                     " and at most 65535 sequences and heads (got head_dim ", s.head_dim,
                     ", batch ", s.batch, ", heads ", s.num_heads, ")"));
  }
  const int64_t qw = int64_t(s.num_heads) * s.head_dim, kvw = int64_t(s.num_kv_heads) * s.head_dim;
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

absl::Status CudaBackend::AttentionBf16(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const AttentionShape& s, Tensor& out, AttentionSaved* saved,
                                        const RopeShape* rope) {
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
  if (rope != nullptr) {
    QCAL_ASSIGN_OR_RETURN(const float* table, RopeTable(*rope));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchPackBf16HeadsRope(q.data<float>(), q_rows, s.num_heads, s.head_dim,
                                                 rope->seq_len, table, qp, stream()),
                   "Attention: rotating and packing q"));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchPackBf16HeadsRope(k.data<float>(), kv_rows, s.num_kv_heads,
                                                 s.head_dim, rope->seq_len, table, kp, stream()),
                   "Attention: rotating and packing k"));
  } else {
    QCAL_RETURN_IF_ERROR(CudaStatus(
        cuda::LaunchPackBf16Heads(q.data<float>(), q_rows, s.num_heads, s.head_dim, qp, stream()),
        "Attention: packing q"));
    QCAL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchPackBf16Heads(k.data<float>(), kv_rows, s.num_kv_heads, s.head_dim,
                                             kp, stream()),
                   "Attention: packing k"));
  }
  QCAL_RETURN_IF_ERROR(CudaStatus(
      cuda::LaunchPackBf16Heads(v.data<float>(), kv_rows, s.num_kv_heads, s.head_dim, vp, stream()),
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

absl::Status CudaBackend::AttentionBackwardBf16(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& dout, const AttentionShape& s,
                                                Tensor& scratch, const AttentionSaved* saved,
                                                Tensor& dq, Tensor& dk, Tensor& dv) {
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

}  // namespace qcal::kernels::cuda_internal
