#include "kernels/cpu/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "kernels/cpu/abq_ref.h"
#include "kernels/cpu/quant_ref.h"
#include "kernels/cpu/ref_grad.h"
#include "kernels/cpu/ref_ops.h"
#include "kernels/cpu/train_ref.h"

namespace qcal::kernels {
namespace {

absl::Status ExpectF32(const Tensor& t, const char* op, const char* what) {
  if (!t.defined() || t.dtype() != DType::kF32 || t.device() != Device::kHost) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " must be a host F32 tensor"));
  }
  return absl::OkStatus();
}

// Output and secondary operands: a host F32 tensor of exactly `shape` (so that writes of 4-byte
// floats stay inside the buffer).
absl::Status ExpectShape(const Tensor& t, const Shape& shape, const char* op, const char* what) {
  QCAL_RETURN_IF_ERROR(ExpectF32(t, op, what));
  if (t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": ", what, " has shape ", ShapeString(t.shape()), ", expected ", ShapeString(shape)));
  }
  return absl::OkStatus();
}

absl::Status ExpectRank(const Tensor& t, int rank, const char* op, const char* what) {
  if (t.rank() != rank) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", what, " must have rank ", rank, ", got ", t.DebugString()));
  }
  return absl::OkStatus();
}

absl::Status ExpectRows(const Tensor& t, const char* op, const char* what) {
  if (t.rank() < 1 || t.dim(-1) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", what, " needs a non-empty last dimension, got ", t.DebugString()));
  }
  return absl::OkStatus();
}

absl::Status ExpectMatrix(const Tensor& t, const char* op, const char* what) {
  QCAL_RETURN_IF_ERROR(ExpectF32(t, op, what));
  return ExpectRank(t, 2, op, what);
}

std::vector<float> RoundedCopy(const float* p, int64_t n) {
  std::vector<float> out(p, p + n);
  for (float& v : out) v = RoundToBf16(v);
  return out;
}

// The head counts and lengths of an attention call, the one at fault named.
absl::Status CheckAttentionShape(const AttentionShape& s, const char* op) {
  if (s.batch < 0 || s.q_len < 0 || s.head_dim <= 0 || s.num_heads <= 0 || s.num_kv_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": batch ", s.batch, ", q_len ", s.q_len, ", heads ", s.num_heads, ", kv heads ",
        s.num_kv_heads, ", head_dim ", s.head_dim, " (head counts and head_dim must be positive)"));
  }
  if (s.num_heads % s.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": ", s.num_heads, " heads are not a multiple of ", s.num_kv_heads, " kv heads"));
  }
  if (s.q_offset < 0 || s.q_offset + s.q_len > s.kv_len || s.sliding_window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": q_offset ", s.q_offset, " + q_len ", s.q_len, " exceeds kv_len ",
                     s.kv_len, " or sliding_window ", s.sliding_window, " is negative"));
  }
  return absl::OkStatus();
}

absl::Status CheckRopeShape(const Tensor& x, const RopeShape& shape, const char* op) {
  if (shape.head_dim <= 0 || shape.head_dim % 2 || x.dim(-1) % shape.head_dim ||
      shape.seq_len <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": head_dim ", shape.head_dim, " (positive, even, dividing the width of ",
                     x.DebugString(), ") or seq_len ", shape.seq_len, " (positive) is wrong"));
  }
  return absl::OkStatus();
}

// Rope's cos/sin per position of the sequence and frequency index, interleaved: entry
// (p·half + i)·2 is the cos of position offset + p, index i, and the next one its sin.
std::vector<float> RopeTable(const RopeShape& shape) {
  const int half = shape.head_dim / 2;
  std::vector<float> cs(size_t(shape.seq_len) * half * 2);
  for (int p = 0; p < shape.seq_len; ++p) {
    for (int i = 0; i < half; ++i) {
      ref::RopeAngle(shape.offset + p, i, shape, &cs[(size_t(p) * half + i) * 2],
                     &cs[(size_t(p) * half + i) * 2 + 1]);
    }
  }
  return cs;
}

// Bytes held by the live tensors of one backend, and their peak. Shared with the tensors' storage,
// which may outlive the backend.
class MemoryCounter {
 public:
  void Add(int64_t bytes) {
    const int64_t now = in_use_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    int64_t peak = peak_.load(std::memory_order_relaxed);
    while (now > peak && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  void Subtract(int64_t bytes) { in_use_.fetch_sub(bytes, std::memory_order_relaxed); }
  int64_t in_use() const { return in_use_.load(std::memory_order_relaxed); }
  int64_t peak() const { return peak_.load(std::memory_order_relaxed); }
  void ResetPeak() { peak_.store(in_use(), std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> in_use_{0};
  std::atomic<int64_t> peak_{0};
};

// Host memory (AllocateHost) counted in a MemoryCounter while it lives.
class CountedStorage final : public Storage {
 public:
  CountedStorage(std::shared_ptr<Storage> memory, std::shared_ptr<MemoryCounter> counter)
      : Storage(memory->data(), memory->bytes(), Device::kHost),
        memory_(std::move(memory)),
        counter_(std::move(counter)) {
    counter_->Add(static_cast<int64_t>(bytes()));
  }
  ~CountedStorage() override { counter_->Subtract(static_cast<int64_t>(bytes())); }

 private:
  std::shared_ptr<Storage> memory_;
  std::shared_ptr<MemoryCounter> counter_;
};

// ABQ weights on the CPU backend: the packed host copy that the reference reads.
class CpuAbqLinear final : public PreparedAbqLinear {
 public:
  explicit CpuAbqLinear(const AbqWeights& w) : PreparedAbqLinear(w.spec, w.n, w.k), w_(w) {}
  const AbqWeights& weights() const { return w_; }

 private:
  const AbqWeights w_;
};

// The layer's fp32 output for m tokens x [m][k] through `kernel`'s specification.
absl::StatusOr<std::vector<float>> AbqReferenceForward(const AbqWeights& w, AbqKernel kernel,
                                                       std::span<const float> x, int64_t m) {
  if (kernel == AbqKernel::kWeightOnly) {
    QCAL_ASSIGN_OR_RETURN(std::vector<double> y, AbqWeightOnlyReference(x, m, w));
    return std::vector<float>(y.begin(), y.end());
  }
  QCAL_ASSIGN_OR_RETURN(AbqActivations a, AbqQuantizeActivations(x, m, w.k, w.spec));
  return AbqGemm(a, w);
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, ComputeDType dtype)
      : threads_(threads), dtype_(dtype), memory_(std::make_shared<MemoryCounter>()) {}

  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::kHost; }
  // Every Op (listed, so that a new Op fails to compile until it is answered here).
  bool SupportsOp(Op op) const override {
    switch (op) {
      case Op::kLinear:
      case Op::kRmsNorm:
      case Op::kRope:
      case Op::kAttention:
      case Op::kSiluMul:
      case Op::kAdd:
      case Op::kEmbedding:
      case Op::kNll:
      case Op::kGram:
      case Op::kActQuant:
        return true;
      case Op::kBackward:
        return true;
      case Op::kTrain:
        return true;
      case Op::kAbqLinear:
        return true;
    }
    return false;
  }
  // The solver ops run their references (quant_ref.h, ref_ops.h), bit for bit. Not error
  // reconstruction: the device form (randomized SVD, ReconstructError's fixed rank) would not give
  // the engine's host results (full SVD, rank chosen from the whole spectrum), which the engine
  // therefore computes itself on a host backend.
  bool SupportsSolverOp(SolverOp op) const override {
    switch (op) {
      case SolverOp::kGptq:
      case SolverOp::kQuantizeRtn:
      case SolverOp::kOutputError:
      case SolverOp::kSmoothing:
        return true;
      case SolverOp::kErrorReconstruction:
        return false;
    }
    return false;
  }
  ComputeDType compute_dtype() const override { return dtype_; }
  int threads() const override { return threads_; }

  std::string DeviceKind() const override {
    std::string isa = "x86-64";
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f")) {
      isa = "avx512";
    } else if (__builtin_cpu_supports("avx2")) {
      isa = "avx2";
    }
#endif
    return absl::StrCat("cpu/", isa, "/openblas-", openblas_get_corename());
  }

  absl::StatusOr<Tensor> Alloc(DType dtype, const Shape& shape) override {
    return NewTensor(dtype, shape);
  }
  absl::StatusOr<Tensor> ToDevice(const Tensor& host) override { return CountedClone(host); }
  absl::StatusOr<Tensor> ToHost(const Tensor& t) override { return CountedClone(t); }
  absl::StatusOr<Tensor> AllocHost(DType dtype, const Shape& shape) override {
    return NewTensor(dtype, shape);
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  int64_t MemoryInUse() const override { return memory_->in_use(); }
  int64_t PeakMemoryInUse() const override { return memory_->peak(); }
  void ResetPeakMemory() override { memory_->ResetPeak(); }
  absl::Status Copy(const Tensor& src, Tensor& dst) override {
    if (src.dtype() != dst.dtype() || src.numel() != dst.numel()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Copy: ", src.DebugString(), " into ", dst.DebugString()));
    }
    std::memcpy(dst.raw(), src.raw(), src.nbytes());
    return absl::OkStatus();
  }

  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                      bool accumulate) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "Linear", "x"));
    QCAL_RETURN_IF_ERROR(ExpectF32(w, "Linear", "w"));
    QCAL_RETURN_IF_ERROR(ExpectF32(y, "Linear", "y"));
    if (x.rank() != 2 || w.rank() != 2 || x.dim(1) != w.dim(1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("Linear: x ", x.DebugString(), " and w ", w.DebugString(), " do not match"));
    }
    const int64_t m = x.dim(0), n = w.dim(0), k = x.dim(1);
    QCAL_RETURN_IF_ERROR(ExpectShape(y, {m, n}, "Linear", "y"));
    if (bias && bias->defined()) {
      QCAL_RETURN_IF_ERROR(ExpectShape(*bias, {n}, "Linear", "bias"));
    }
    if (m == 0 || n == 0) return absl::OkStatus();
    const float* xp = x.data<float>();
    const float* wp = w.data<float>();
    std::vector<float> xr, wr;
    if (dtype_ == ComputeDType::kBF16) {
      xr = RoundedCopy(xp, m * k);
      wr = RoundedCopy(wp, n * k);
      xp = xr.data();
      wp = wr.data();
    }
    float* yp = y.data<float>();
    const bool has_bias = bias && bias->defined();
    if (has_bias && !accumulate) {
      const float* b = bias->data<float>();
      for (int64_t i = 0; i < m; ++i) std::copy(b, b + n, yp + i * n);
    }
    const float beta = (accumulate || has_bias) ? 1.0f : 0.0f;
    if (k == 0) {
      if (beta == 0.0f) std::fill(yp, yp + m * n, 0.0f);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, xp, k, wp, k, beta, yp,
                  n);
    }
    if (has_bias && accumulate) {
      const float* b = bias->data<float>();
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) yp[i * n + j] += b[j];
      }
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "RmsNorm", "x"));
    QCAL_RETURN_IF_ERROR(ExpectF32(weight, "RmsNorm", "weight"));
    QCAL_RETURN_IF_ERROR(ExpectRows(x, "RmsNorm", "x"));
    QCAL_RETURN_IF_ERROR(ExpectF32(y, "RmsNorm", "y"));
    QCAL_RETURN_IF_ERROR(ExpectShape(y, x.shape(), "RmsNorm", "y"));
    const int64_t width = x.dim(-1), rows = x.numel() / std::max<int64_t>(width, 1);
    QCAL_RETURN_IF_ERROR(ExpectShape(weight, {width}, "RmsNorm", "weight"));
    const float* xp = x.data<float>();
    float* yp = y.data<float>();
    ParallelFor(rows, width, [&](int64_t r0, int64_t r1) {
      ref::RmsNorm(xp + r0 * width, weight.data<float>(), eps, yp + r0 * width, r1 - r0, width);
    });
    return absl::OkStatus();
  }

  absl::Status Rope(Tensor& x, const RopeShape& shape) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "Rope", "x"));
    QCAL_RETURN_IF_ERROR(ExpectRows(x, "Rope", "x"));
    QCAL_RETURN_IF_ERROR(CheckRopeShape(x, shape, "Rope"));
    const int64_t width = x.dim(-1), rows = x.numel() / width;
    const int half = shape.head_dim / 2;
    const std::vector<float> cs = RopeTable(shape);
    float* xp = x.data<float>();
    const int64_t heads = width / shape.head_dim;
    ParallelFor(rows, width, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* t = &cs[size_t(r % shape.seq_len) * half * 2];
        for (int64_t h = 0; h < heads; ++h) {
          float* v = xp + r * width + h * shape.head_dim;
          for (int i = 0; i < half; ++i) {
            const float c = t[2 * i], s = t[2 * i + 1];
            const float a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
          }
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& s,
                         Tensor& out) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(q, "Attention", "q"));
    QCAL_RETURN_IF_ERROR(ExpectF32(k, "Attention", "k"));
    QCAL_RETURN_IF_ERROR(ExpectF32(v, "Attention", "v"));
    if (s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads || s.q_offset + s.q_len > s.kv_len ||
        s.sliding_window < 0) {
      return absl::InvalidArgumentError("Attention: bad shape");
    }
    const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                  kvw = int64_t(s.num_kv_heads) * s.head_dim;
    QCAL_RETURN_IF_ERROR(ExpectShape(q, {int64_t(s.batch) * s.q_len, qw}, "Attention", "q"));
    QCAL_RETURN_IF_ERROR(ExpectShape(k, {int64_t(s.batch) * s.kv_len, kvw}, "Attention", "k"));
    QCAL_RETURN_IF_ERROR(ExpectShape(v, {int64_t(s.batch) * s.kv_len, kvw}, "Attention", "v"));
    QCAL_RETURN_IF_ERROR(ExpectShape(out, q.shape(), "Attention", "out"));
    if (dtype_ == ComputeDType::kBF16) {
      ref::Attention(q.data<float>(), k.data<float>(), v.data<float>(), s, out.data<float>(), true);
      return absl::OkStatus();
    }
    const int n_rep = s.num_heads / s.num_kv_heads;
    const float scale = 1.0f / std::sqrt(float(s.head_dim));
    std::vector<float> scores(size_t(s.q_len) * s.kv_len);
    for (int b = 0; b < s.batch; ++b) {
      for (int h = 0; h < s.num_heads; ++h) {
        const int kvh = h / n_rep;
        const float* qh = q.data<float>() + int64_t(b) * s.q_len * qw + h * s.head_dim;
        const float* kh = k.data<float>() + int64_t(b) * s.kv_len * kvw + kvh * s.head_dim;
        const float* vh = v.data<float>() + int64_t(b) * s.kv_len * kvw + kvh * s.head_dim;
        float* oh = out.data<float>() + int64_t(b) * s.q_len * qw + h * s.head_dim;
        // scores = scale * Q Kᵀ over the visible prefix, softmax per row, then out = P V.
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.q_len, s.kv_len, s.head_dim, scale,
                    qh, qw, kh, kvw, 0.0f, scores.data(), s.kv_len);
        ParallelFor(s.q_len, s.kv_len, [&](int64_t i0, int64_t i1) {
          for (int i = static_cast<int>(i0); i < i1; ++i) {
            float* row = scores.data() + size_t(i) * s.kv_len;
            const int last = s.q_offset + i;
            const int first = s.sliding_window > 0 ? std::max(0, last - s.sliding_window + 1) : 0;
            float mx = -INFINITY;
            for (int j = first; j <= last; ++j) mx = std::max(mx, row[j]);
            double sum = 0;
            for (int j = first; j <= last; ++j) {
              row[j] = std::exp(row[j] - mx);
              sum += row[j];
            }
            const float inv = float(1.0 / sum);
            for (int j = 0; j < first; ++j) row[j] = 0.0f;
            for (int j = first; j <= last; ++j) row[j] *= inv;
            for (int j = last + 1; j < s.kv_len; ++j) row[j] = 0.0f;
          }
        });
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s.q_len, s.head_dim, s.kv_len, 1.0f,
                    scores.data(), s.kv_len, vh, kvw, 0.0f, oh, qw);
      }
    }
    return absl::OkStatus();
  }

  absl::Status SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(gate, "SiluMul", "gate"));
    QCAL_RETURN_IF_ERROR(ExpectShape(up, gate.shape(), "SiluMul", "up"));
    QCAL_RETURN_IF_ERROR(ExpectF32(out, "SiluMul", "out"));
    QCAL_RETURN_IF_ERROR(ExpectF32(up, "SiluMul", "up"));
    QCAL_RETURN_IF_ERROR(ExpectShape(out, gate.shape(), "SiluMul", "out"));
    const int64_t n = gate.numel();
    ParallelFor(n, 8, [&](int64_t i0, int64_t i1) {
      ref::SiluMul(gate.data<float>() + i0, up.data<float>() + i0, out.data<float>() + i0, i1 - i0);
    });
    return absl::OkStatus();
  }

  absl::Status Add(const Tensor& x, Tensor& y) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "Add", "x"));
    QCAL_RETURN_IF_ERROR(ExpectShape(y, x.shape(), "Add", "y"));
    ref::Add(x.data<float>(), y.data<float>(), x.numel());
    return absl::OkStatus();
  }

  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(table, "Embedding", "table"));
    QCAL_RETURN_IF_ERROR(ExpectRank(table, 2, "Embedding", "table"));
    if (ids.dtype() != DType::kI32) return absl::InvalidArgumentError("Embedding: ids must be I32");
    const int64_t vocab = table.dim(0), width = table.dim(1), n = ids.numel();
    QCAL_RETURN_IF_ERROR(ExpectShape(out, {n, width}, "Embedding", "out"));
    for (int64_t i = 0; i < n; ++i) {
      const int32_t id = ids.data<int32_t>()[i];
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " is outside the embedding table (vocab ", vocab, ")"));
      }
    }
    ref::Embedding(table.data<float>(), vocab, width, ids.data<int32_t>(), n, out.data<float>());
    return absl::OkStatus();
  }

  absl::Status Nll(const Tensor& logits, const Tensor& targets, Tensor& nll) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(logits, "Nll", "logits"));
    QCAL_RETURN_IF_ERROR(ExpectRank(logits, 2, "Nll", "logits"));
    const int64_t rows = logits.dim(0), vocab = logits.dim(1);
    if (targets.dtype() != DType::kI32 || targets.numel() != rows) {
      return absl::InvalidArgumentError("Nll: targets must be I32 with one id per row");
    }
    QCAL_RETURN_IF_ERROR(ExpectShape(nll, {rows}, "Nll", "nll"));
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t t = targets.data<int32_t>()[r];
      if (t < 0 || t >= vocab)
        return absl::InvalidArgumentError("Nll: target outside the vocabulary");
    }
    ParallelFor(rows, vocab * 4, [&](int64_t r0, int64_t r1) {
      ref::Nll(logits.data<float>() + r0 * vocab, r1 - r0, vocab, targets.data<int32_t>() + r0,
               nll.data<float>() + r0);
    });
    return absl::OkStatus();
  }

  absl::Status AccumulateGram(const Tensor& x, Tensor& h) override {
    const bool bf16_x = x.defined() && x.dtype() == DType::kBF16;
    if (!bf16_x) QCAL_RETURN_IF_ERROR(ExpectF32(x, "AccumulateGram", "x"));
    QCAL_RETURN_IF_ERROR(ExpectF32(h, "AccumulateGram", "h"));
    QCAL_RETURN_IF_ERROR(ExpectRank(x, 2, "AccumulateGram", "x"));
    const int64_t n = x.dim(0), k = x.dim(1);
    QCAL_RETURN_IF_ERROR(ExpectShape(h, {k, k}, "AccumulateGram", "h"));
    if (n == 0) return absl::OkStatus();
    std::vector<float> xr;
    if (bf16_x) {  // already rounded: widened exactly
      xr.resize(n * k);
      for (int64_t i = 0; i < n * k; ++i) xr[i] = Bf16ToFloat(x.data<uint16_t>()[i]);
    }
    const float* xp = bf16_x ? xr.data() : x.data<float>();
    if (!bf16_x && dtype_ == ComputeDType::kBF16) {
      xr = RoundedCopy(xp, n * k);
      xp = xr.data();
    }
    float* hp = h.data<float>();
    // SYRK fills the upper triangle (row-major); mirror it so h stays a full symmetric matrix.
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, k, n, 1.0f, xp, k, 1.0f, hp, k);
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t b = 0; b < a; ++b) hp[a * k + b] = hp[b * k + a];
    }
    return absl::OkStatus();
  }

  absl::Status Gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                    float beta, Tensor& c) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(a, "Gemm", "a"));
    QCAL_RETURN_IF_ERROR(ExpectMatrix(b, "Gemm", "b"));
    QCAL_RETURN_IF_ERROR(ExpectMatrix(c, "Gemm", "c"));
    const int64_t m = a.dim(trans_a ? 1 : 0), k = a.dim(trans_a ? 0 : 1);
    const int64_t kb = b.dim(trans_b ? 1 : 0), n = b.dim(trans_b ? 0 : 1);
    if (k != kb) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gemm: op(a) of a ", a.DebugString(), (trans_a ? " (transposed)" : ""),
                       " has ", k, " columns but op(b) of b ", b.DebugString(),
                       (trans_b ? " (transposed)" : ""), " has ", kb, " rows"));
    }
    QCAL_RETURN_IF_ERROR(ExpectShape(c, {m, n}, "Gemm", "c"));
    if (m == 0 || n == 0) return absl::OkStatus();
    float* cp = c.data<float>();
    // beta == 0 ignores c's contents, NaN included: BLAS would propagate 0·NaN.
    if (beta == 0.0f) std::fill(cp, cp + m * n, 0.0f);
    if (k == 0) {
      for (int64_t i = 0; i < m * n; ++i) cp[i] *= beta;
      return absl::OkStatus();
    }
    const float* ap = a.data<float>();
    const float* bp = b.data<float>();
    std::vector<float> ar, br;
    if (dtype_ == ComputeDType::kBF16) {
      ar = RoundedCopy(ap, a.numel());
      br = RoundedCopy(bp, b.numel());
      ap = ar.data();
      bp = br.data();
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, ap, a.dim(1), bp, b.dim(1),
                beta, cp, n);
    return absl::OkStatus();
  }

  absl::Status Convert(const Tensor& src, Tensor& dst) override {
    const bool down = src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16;
    const bool up = src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32;
    if (!src.defined() || !dst.defined() || !(down || up) || src.numel() != dst.numel()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Convert: ", src.defined() ? src.DebugString() : "undefined", " into ",
                       dst.defined() ? dst.DebugString() : "undefined",
                       " (F32 to BF16 or BF16 to F32, the same element count)"));
    }
    const int64_t n = src.numel();
    if (down) {
      const float* s = src.data<float>();
      uint16_t* d = dst.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) d[i] = FloatToBf16(s[i]);
    } else {
      const uint16_t* s = src.data<uint16_t>();
      float* d = dst.data<float>();
      for (int64_t i = 0; i < n; ++i) d[i] = Bf16ToFloat(s[i]);
    }
    return absl::OkStatus();
  }

  absl::Status ConcatColumns(const Tensor& a, const Tensor& b, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(CheckConcatColumns(a, b, out, Device::kHost));
    const int64_t m = out.dim(0), ca = a.dim(1), cb = b.dim(1);
    auto load = [](const Tensor& t, int64_t i) {
      return t.dtype() == DType::kF32 ? t.data<float>()[i] : Bf16ToFloat(t.data<uint16_t>()[i]);
    };
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < ca + cb; ++c) {
        const float v = c < ca ? load(a, r * ca + c) : load(b, r * cb + c - ca);
        const int64_t i = r * (ca + cb) + c;
        if (out.dtype() == DType::kF32) {
          out.data<float>()[i] = v;
        } else {
          out.data<uint16_t>()[i] = FloatToBf16(v);
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status WriteColumns(const Tensor& src, int64_t first, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(CheckWriteColumns(src, first, out, Device::kHost));
    const int64_t m = src.dim(0), c = src.dim(1), n = out.dim(1);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < c; ++j) {
        const float v = src.dtype() == DType::kF32 ? src.data<float>()[r * c + j]
                                                   : Bf16ToFloat(src.data<uint16_t>()[r * c + j]);
        const int64_t i = r * n + first + j;
        if (out.dtype() == DType::kF32) {
          out.data<float>()[i] = v;
        } else {
          out.data<uint16_t>()[i] = FloatToBf16(v);
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status MirrorLower(Tensor& c) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(c, "MirrorLower", "c"));
    const int64_t n = c.rank() >= 2 ? c.dim(-1) : -1;
    const int64_t batch = c.rank() == 3 ? c.dim(0) : 1;
    if ((c.rank() != 2 && c.rank() != 3) || c.dim(-2) != n) {
      return absl::InvalidArgumentError(absl::StrCat("MirrorLower: c is ", c.DebugString(),
                                                     ", expected [n, n] or [batch, n, n]"));
    }
    for (int64_t s = 0; s < batch; ++s) {
      float* cp = c.data<float>() + s * n * n;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = i + 1; j < n; ++j) cp[i * n + j] = cp[j * n + i];
      }
    }
    return absl::OkStatus();
  }

  absl::Status RmsNormBackward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy,
                               Tensor& dx) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "RmsNormBackward", "x"));
    QCAL_RETURN_IF_ERROR(ExpectRows(x, "RmsNormBackward", "x"));
    const int64_t width = x.dim(-1), rows = x.numel() / width;
    QCAL_RETURN_IF_ERROR(ExpectShape(weight, {width}, "RmsNormBackward", "weight"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dy, x.shape(), "RmsNormBackward", "dy"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dx, x.shape(), "RmsNormBackward", "dx"));
    // Rows are independent: each range runs the reference (which allows dx == dy).
    ParallelFor(rows, width * 2, [&](int64_t r0, int64_t r1) {
      ref::RmsNormBackward(x.data<float>() + r0 * width, weight.data<float>(), double(eps),
                           dy.data<float>() + r0 * width, dx.data<float>() + r0 * width, r1 - r0,
                           width);
    });
    return absl::OkStatus();
  }

  absl::Status RopeBackward(Tensor& g, const RopeShape& shape) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(g, "RopeBackward", "g"));
    QCAL_RETURN_IF_ERROR(ExpectRows(g, "RopeBackward", "g"));
    QCAL_RETURN_IF_ERROR(CheckRopeShape(g, shape, "RopeBackward"));
    const int64_t width = g.dim(-1), rows = g.numel() / width;
    const int half = shape.head_dim / 2;
    const std::vector<float> cs = RopeTable(shape);
    float* gp = g.data<float>();
    const int64_t heads = width / shape.head_dim;
    ParallelFor(rows, width, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* t = &cs[size_t(r % shape.seq_len) * half * 2];
        for (int64_t h = 0; h < heads; ++h) {
          float* v = gp + r * width + h * shape.head_dim;
          for (int i = 0; i < half; ++i) {
            // The transposed rotation: the same angle table, sin negated.
            const float c = t[2 * i], s = t[2 * i + 1];
            const float a = v[i], b = v[i + half];
            v[i] = a * c + b * s;
            v[i + half] = b * c - a * s;
          }
        }
      }
    });
    return absl::OkStatus();
  }

  // Per (sequence, head), with P the recomputed probabilities [q_len, kv_len] (zero where masked):
  // dV_kv += Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale, dQ = dS·K, dK_kv += dSᵀ·Q.
  // The n_rep query heads of a KV head add into dK and dV in head order (the first overwrites),
  // so the result depends only on the BLAS and ParallelFor thread counts. With kBF16 q, k, v and
  // dout are rounded first, as ref::AttentionBackward rounds them.
  absl::Status AttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& dout, const AttentionShape& s, Tensor& dq,
                                 Tensor& dk, Tensor& dv) override {
    const char* op = "AttentionBackward";
    QCAL_RETURN_IF_ERROR(CheckAttentionShape(s, op));
    const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                  kvw = int64_t(s.num_kv_heads) * s.head_dim;
    const Shape q_shape{int64_t(s.batch) * s.q_len, qw}, kv_shape{int64_t(s.batch) * s.kv_len, kvw};
    QCAL_RETURN_IF_ERROR(ExpectShape(q, q_shape, op, "q"));
    QCAL_RETURN_IF_ERROR(ExpectShape(k, kv_shape, op, "k"));
    QCAL_RETURN_IF_ERROR(ExpectShape(v, kv_shape, op, "v"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dout, q_shape, op, "dout"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dq, q_shape, op, "dq"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dk, kv_shape, op, "dk"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dv, kv_shape, op, "dv"));
    if (s.q_len == 0 || s.kv_len == 0) {
      // No query sees a key: every gradient is zero (and BLAS is not asked for empty products).
      std::fill(dk.data<float>(), dk.data<float>() + dk.numel(), 0.0f);
      std::fill(dv.data<float>(), dv.data<float>() + dv.numel(), 0.0f);
      return absl::OkStatus();
    }
    const float* qp = q.data<float>();
    const float* kp = k.data<float>();
    const float* vp = v.data<float>();
    const float* dop = dout.data<float>();
    std::vector<float> qr, kr, vr, dor;
    if (dtype_ == ComputeDType::kBF16) {
      qr = RoundedCopy(qp, q.numel());
      kr = RoundedCopy(kp, k.numel());
      vr = RoundedCopy(vp, v.numel());
      dor = RoundedCopy(dop, dout.numel());
      qp = qr.data();
      kp = kr.data();
      vp = vr.data();
      dop = dor.data();
    }
    const int n_rep = s.num_heads / s.num_kv_heads;
    const int hd = s.head_dim;
    const float scale = float(1.0 / std::sqrt(double(hd)));
    std::vector<float> probs(size_t(s.q_len) * s.kv_len), dscores(size_t(s.q_len) * s.kv_len);
    for (int b = 0; b < s.batch; ++b) {
      for (int h = 0; h < s.num_heads; ++h) {
        const int kvh = h / n_rep;
        const int64_t q_off = int64_t(b) * s.q_len * qw + h * hd;
        const int64_t kv_off = int64_t(b) * s.kv_len * kvw + kvh * hd;
        const float* qh = qp + q_off;
        const float* doh = dop + q_off;
        const float* kh = kp + kv_off;
        const float* vh = vp + kv_off;
        // probs = softmax(scale·Q Kᵀ) over the visible keys; dscores = dO Vᵀ, then dS in place.
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.q_len, s.kv_len, hd, scale, qh, qw,
                    kh, kvw, 0.0f, probs.data(), s.kv_len);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.q_len, s.kv_len, hd, 1.0f, doh, qw,
                    vh, kvw, 0.0f, dscores.data(), s.kv_len);
        ParallelFor(s.q_len, s.kv_len * 4, [&](int64_t i0, int64_t i1) {
          for (int i = static_cast<int>(i0); i < i1; ++i) {
            float* p = probs.data() + size_t(i) * s.kv_len;
            float* ds = dscores.data() + size_t(i) * s.kv_len;
            const int last = s.q_offset + i;
            const int first = s.sliding_window > 0 ? std::max(0, last - s.sliding_window + 1) : 0;
            float mx = -INFINITY;
            for (int j = first; j <= last; ++j) mx = std::max(mx, p[j]);
            double sum = 0;
            for (int j = first; j <= last; ++j) {
              p[j] = std::exp(p[j] - mx);
              sum += p[j];
            }
            const float inv = float(1.0 / sum);
            double p_dp = 0;
            for (int j = first; j <= last; ++j) {
              p[j] *= inv;
              p_dp += double(p[j]) * ds[j];
            }
            for (int j = first; j <= last; ++j) {
              ds[j] = float(double(p[j]) * (ds[j] - p_dp) * scale);
            }
            std::fill(p, p + first, 0.0f);
            std::fill(ds, ds + first, 0.0f);
            std::fill(p + last + 1, p + s.kv_len, 0.0f);
            std::fill(ds + last + 1, ds + s.kv_len, 0.0f);
          }
        });
        const float accumulate = h % n_rep == 0 ? 0.0f : 1.0f;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s.q_len, hd, s.kv_len, 1.0f,
                    dscores.data(), s.kv_len, kh, kvw, 0.0f, dq.data<float>() + q_off, qw);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, s.kv_len, hd, s.q_len, 1.0f,
                    dscores.data(), s.kv_len, qh, qw, accumulate, dk.data<float>() + kv_off, kvw);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, s.kv_len, hd, s.q_len, 1.0f,
                    probs.data(), s.kv_len, doh, qw, accumulate, dv.data<float>() + kv_off, kvw);
      }
    }
    return absl::OkStatus();
  }

  absl::Status SiluMulBackward(const Tensor& gate, const Tensor& up, const Tensor& dout,
                               Tensor& dgate, Tensor& dup) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(gate, "SiluMulBackward", "gate"));
    QCAL_RETURN_IF_ERROR(ExpectShape(up, gate.shape(), "SiluMulBackward", "up"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dout, gate.shape(), "SiluMulBackward", "dout"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dgate, gate.shape(), "SiluMulBackward", "dgate"));
    QCAL_RETURN_IF_ERROR(ExpectShape(dup, gate.shape(), "SiluMulBackward", "dup"));
    ParallelFor(gate.numel(), 16, [&](int64_t i0, int64_t i1) {
      ref::SiluMulBackward(gate.data<float>() + i0, up.data<float>() + i0, dout.data<float>() + i0,
                           dgate.data<float>() + i0, dup.data<float>() + i0, i1 - i0);
    });
    return absl::OkStatus();
  }

  absl::Status EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(dout, "EmbeddingBackward", "dout"));
    QCAL_RETURN_IF_ERROR(ExpectMatrix(dtable, "EmbeddingBackward", "dtable"));
    const int64_t rows = dout.dim(0), width = dout.dim(1), vocab = dtable.dim(0);
    if (ids.dtype() != DType::kI32 || ids.device() != Device::kHost || ids.numel() != rows) {
      return absl::InvalidArgumentError(absl::StrCat("EmbeddingBackward: ids ", ids.DebugString(),
                                                     " must be host I32 with one id per row of ",
                                                     dout.DebugString()));
    }
    QCAL_RETURN_IF_ERROR(ExpectShape(dtable, {vocab, width}, "EmbeddingBackward", "dtable"));
    const int32_t* id = ids.data<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
      if (id[r] < 0 || id[r] >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("EmbeddingBackward: token id ", id[r], " of row ", r,
                         " is outside the table (vocab ", vocab, ")"));
      }
    }
    // Threads split the columns, so every element still sums its rows in row order (the
    // reference's bits) and no two threads write the same element.
    const float* dp = dout.data<float>();
    float* tp = dtable.data<float>();
    ParallelFor(width, rows, [&](int64_t c0, int64_t c1) {
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = tp + int64_t(id[r]) * width;
        const float* src = dp + r * width;
        for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
      }
    });
    return absl::OkStatus();
  }

  absl::Status NllBackward(const Tensor& logits, const Tensor& targets, float scale,
                           Tensor& dlogits) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(logits, "NllBackward", "logits"));
    const int64_t rows = logits.dim(0), vocab = logits.dim(1);
    if (targets.dtype() != DType::kI32 || targets.device() != Device::kHost ||
        targets.numel() != rows) {
      return absl::InvalidArgumentError(absl::StrCat("NllBackward: targets ", targets.DebugString(),
                                                     " must be host I32 with one id per row of ",
                                                     logits.DebugString()));
    }
    QCAL_RETURN_IF_ERROR(ExpectShape(dlogits, logits.shape(), "NllBackward", "dlogits"));
    const int32_t* t = targets.data<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
      if (t[r] < -1 || t[r] >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("NllBackward: target ", t[r], " of row ", r,
                                                       " is outside the vocabulary (", vocab,
                                                       ") and is not -1"));
      }
    }
    ParallelFor(rows, vocab * 8, [&](int64_t r0, int64_t r1) {
      ref::NllBackward(logits.data<float>() + r0 * vocab, r1 - r0, vocab, t + r0, scale,
                       dlogits.data<float>() + r0 * vocab);
    });
    return absl::OkStatus();
  }

  absl::Status ScaleRowsByNorm(const Tensor& g, Tensor& x) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(g, "ScaleRowsByNorm", "g"));
    QCAL_RETURN_IF_ERROR(ExpectMatrix(x, "ScaleRowsByNorm", "x"));
    if (g.dim(0) != x.dim(0)) {
      return absl::InvalidArgumentError(absl::StrCat("ScaleRowsByNorm: g ", g.DebugString(),
                                                     " and x ", x.DebugString(),
                                                     " have different row counts"));
    }
    const int64_t rows = x.dim(0), width_g = g.dim(1), width_x = x.dim(1);
    ParallelFor(rows, width_g + width_x, [&](int64_t r0, int64_t r1) {
      ref::ScaleRowsByNorm(g.data<float>() + r0 * width_g, r1 - r0, width_g,
                           x.data<float>() + r0 * width_x, width_x);
    });
    return absl::OkStatus();
  }

  absl::Status AccumulateSquares(const Tensor& g, Tensor& f) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(g, "AccumulateSquares", "g"));
    QCAL_RETURN_IF_ERROR(ExpectF32(f, "AccumulateSquares", "f"));
    if (g.numel() != f.numel()) {
      return absl::InvalidArgumentError(absl::StrCat("AccumulateSquares: g ", g.DebugString(),
                                                     " and f ", f.DebugString(),
                                                     " have different element counts"));
    }
    ParallelFor(g.numel(), 2, [&](int64_t i0, int64_t i1) {
      ref::AccumulateSquares(g.data<float>() + i0, i1 - i0, f.data<float>() + i0);
    });
    return absl::OkStatus();
  }

  // The training ops run their references (train_ref.h), bit for bit.
  absl::Status ClippedFakeQuant(const Tensor& w, const ClipTensors& layout, const Tensor& gamma,
                                const Tensor& beta, Tensor& w_hat) override {
    const char* op = "ClippedFakeQuant";
    QCAL_RETURN_IF_ERROR(CheckClipOperands(layout, w, gamma, beta, Device::kHost, op));
    QCAL_RETURN_IF_ERROR(
        CheckTrainOperand(w_hat, DType::kF32, w.shape(), Device::kHost, op, "w_hat"));
    ref::ClippedFakeQuant(w.data<float>(), layout.view(), gamma.data<float>(), beta.data<float>(),
                          w_hat.data<float>());
    return absl::OkStatus();
  }

  absl::Status ClippedFakeQuantBackward(const Tensor& w, const ClipTensors& layout,
                                        const Tensor& gamma, const Tensor& beta,
                                        const Tensor& d_w_hat, Tensor& d_gamma, Tensor& d_beta,
                                        Tensor* d_w) override {
    const char* op = "ClippedFakeQuantBackward";
    QCAL_RETURN_IF_ERROR(CheckClipBackwardOperands(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta,
                                                   d_w, Device::kHost, op));
    ref::ClippedFakeQuantBackward(w.data<float>(), layout.view(), gamma.data<float>(),
                                  beta.data<float>(), d_w_hat.data<float>(), d_gamma.data<float>(),
                                  d_beta.data<float>(), d_w ? d_w->data<float>() : nullptr);
    return absl::OkStatus();
  }

  absl::Status AdamWStep(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, int64_t t,
                         const AdamWOptions& options) override {
    const char* op = "AdamWStep";
    QCAL_RETURN_IF_ERROR(options.Validate());
    if (t < 1) return absl::InvalidArgumentError(absl::StrCat(op, ": step ", t, " is not >= 1"));
    QCAL_RETURN_IF_ERROR(CheckTrainOperand(p, DType::kF32, p.shape(), Device::kHost, op, "p"));
    for (const auto& [x, what] :
         {std::pair<const Tensor*, const char*>{&g, "g"}, {&m, "m"}, {&v, "v"}}) {
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(*x, DType::kF32, x->defined() ? x->shape() : Shape{},
                                             Device::kHost, op, what));
      if (x->numel() != p.numel()) {
        return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " ", x->DebugString(),
                                                       " and p ", p.DebugString(),
                                                       " differ in element count"));
      }
    }
    ref::AdamWStep(p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), p.numel(), t,
                   options);
    return absl::OkStatus();
  }

  absl::StatusOr<double> SquaredError(const Tensor& y, const Tensor& target, float scale,
                                      Tensor* dy) override {
    const char* op = "SquaredError";
    QCAL_RETURN_IF_ERROR(CheckTrainOperand(y, DType::kF32, y.shape(), Device::kHost, op, "y"));
    QCAL_RETURN_IF_ERROR(
        CheckTrainOperand(target, DType::kF32, y.shape(), Device::kHost, op, "target"));
    if (dy)
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(*dy, DType::kF32, y.shape(), Device::kHost, op, "dy"));
    return ref::SquaredError(y.data<float>(), target.data<float>(), y.numel(), scale,
                             dy ? dy->data<float>() : nullptr);
  }

  absl::StatusOr<double> WeightedSquaredError(const Tensor& x, const Tensor& r, const Tensor& f,
                                              float scale, Tensor* g1, Tensor* g2,
                                              double total) override {
    const char* op = "WeightedSquaredError";
    QCAL_RETURN_IF_ERROR(CheckTrainOperand(x, DType::kF32, x.shape(), Device::kHost, op, "x"));
    QCAL_RETURN_IF_ERROR(ExpectRank(x, 2, op, "x"));
    QCAL_RETURN_IF_ERROR(CheckTrainOperand(r, DType::kF32, x.shape(), Device::kHost, op, "r"));
    if (f.defined())
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(f, DType::kF32, x.shape(), Device::kHost, op, "f"));
    if (g1)
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(*g1, DType::kF32, x.shape(), Device::kHost, op, "g1"));
    if (g2)
      QCAL_RETURN_IF_ERROR(CheckTrainOperand(*g2, DType::kF32, x.shape(), Device::kHost, op, "g2"));
    return ref::WeightedSquaredError(
        x.data<float>(), r.data<float>(), f.defined() ? f.data<float>() : nullptr, x.dim(0),
        x.dim(1), scale, g1 ? g1->data<float>() : nullptr, g2 ? g2->data<float>() : nullptr, total);
  }

  absl::Status ActQuant(const Tensor& x, int bits, Tensor& out) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "ActQuant", "x"));
    QCAL_RETURN_IF_ERROR(ExpectF32(out, "ActQuant", "out"));
    QCAL_RETURN_IF_ERROR(ExpectRows(x, "ActQuant", "x"));
    QCAL_RETURN_IF_ERROR(ExpectShape(out, x.shape(), "ActQuant", "out"));
    if (bits < 2 || bits > 8) {
      return absl::InvalidArgumentError(absl::StrCat("ActQuant: bits must be 2..8, got ", bits));
    }
    if (x.rank() < 1) return absl::InvalidArgumentError("ActQuant: x must have rank >= 1");
    if (x.numel() == 0) return absl::OkStatus();
    const int64_t width = x.dim(-1), rows = x.numel() / width;
    // Rows are independent: each range runs the scalar reference, so the bits match it exactly.
    ParallelFor(rows, width * 4, [&](int64_t r0, int64_t r1) {
      ref::ActQuant(x.data<float>() + r0 * width, r1 - r0, width, bits,
                    out.data<float>() + r0 * width);
    });
    return absl::OkStatus();
  }

  // ref::ActQuantLinear with the fp64 sums as one BLAS product (the same numbers whenever the
  // sums are exact; otherwise they differ from the scalar order's by fp64 rounding only).
  absl::Status ActQuantLinear(const Tensor& x, int bits, const Tensor& w, const Tensor* bias,
                              Tensor& y, bool accumulate) override {
    QCAL_RETURN_IF_ERROR(CheckActQuantLinearOperands(x, bits, w, bias, y));
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "ActQuantLinear", "x"));
    QCAL_RETURN_IF_ERROR(ExpectF32(w, "ActQuantLinear", "w"));
    QCAL_RETURN_IF_ERROR(ExpectF32(y, "ActQuantLinear", "y"));
    const bool has_bias = bias && bias->defined();
    if (has_bias) QCAL_RETURN_IF_ERROR(ExpectF32(*bias, "ActQuantLinear", "bias"));
    const int64_t m = x.dim(0), n = w.dim(0), k = x.dim(1);
    if (dtype_ == ComputeDType::kBF16) {
      Tensor xq = NewTensor(DType::kF32, x.shape());
      QCAL_RETURN_IF_ERROR(ActQuant(x, bits, xq));
      return Linear(xq, w, bias, y, accumulate);
    }
    if (m == 0 || n == 0) return absl::OkStatus();
    std::vector<float> codes(static_cast<size_t>(m * k)), scales(static_cast<size_t>(m));
    ParallelFor(m, k * 4, [&](int64_t t0, int64_t t1) {
      ref::ActQuantCodes(x.data<float>() + t0 * k, t1 - t0, k, bits, codes.data() + t0 * k,
                         scales.data() + t0);
    });
    std::vector<double> sums(static_cast<size_t>(m * n), 0.0);
    if (k > 0) {
      const std::vector<double> a(codes.begin(), codes.end());
      const float* wp = w.data<float>();
      const std::vector<double> wd(wp, wp + n * k);
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0, a.data(), k, wd.data(), k,
                  0.0, sums.data(), n);
    }
    float* yp = y.data<float>();
    const float* bp = has_bias ? bias->data<float>() : nullptr;
    for (int64_t t = 0; t < m; ++t) {
      for (int64_t o = 0; o < n; ++o) {
        float v = static_cast<float>(double{scales[t]} * sums[t * n + o]);
        if (bp) v += bp[o];
        yp[t * n + o] = accumulate ? yp[t * n + o] + v : v;
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::shared_ptr<const PreparedAbqLinear>> PrepareAbqLinear(
      const AbqWeights& w) override {
    QCAL_RETURN_IF_ERROR(ValidateAbqWeights(w));
    return std::make_shared<const CpuAbqLinear>(w);
  }

  absl::Status AbqLinear(const PreparedAbqLinear& w, AbqKernel kernel, const Tensor& x,
                         const Tensor* bias, Tensor& y, bool accumulate) override {
    const auto* cw = dynamic_cast<const CpuAbqLinear*>(&w);
    if (cw == nullptr) {
      return absl::InvalidArgumentError("AbqLinear: the weights were prepared by another backend");
    }
    QCAL_RETURN_IF_ERROR(CheckAbqLinearOperands(w, x, bias, y));
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "AbqLinear", "x"));
    QCAL_RETURN_IF_ERROR(ExpectF32(y, "AbqLinear", "y"));
    if (bias) QCAL_RETURN_IF_ERROR(ExpectF32(*bias, "AbqLinear", "bias"));
    const int64_t m = x.dim(0), n = w.n(), k = w.k();
    if (m == 0) return absl::OkStatus();
    const AbqWeights& aw = cw->weights();
    // Tokens are independent: each range of rows runs the reference on its own.
    absl::Mutex mu;
    absl::Status status;
    ParallelFor(m, n * k, [&](int64_t t0, int64_t t1) {
      const std::span<const float> xs(x.data<float>() + t0 * k, (t1 - t0) * k);
      absl::StatusOr<std::vector<float>> out = AbqReferenceForward(aw, kernel, xs, t1 - t0);
      if (!out.ok()) {
        absl::MutexLock lock(&mu);
        status.Update(out.status());
        return;
      }
      float* yp = y.data<float>() + t0 * n;
      for (int64_t i = 0; i < (t1 - t0) * n; ++i) {
        float v = (*out)[i];
        if (bias) v += bias->data<float>()[i % n];
        yp[i] = accumulate ? yp[i] + v : v;
      }
    });
    return status;
  }

  absl::StatusOr<GptqFactor> GptqFactorize(const Tensor& h,
                                           const GptqSolveOptions& options) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(h, "GptqFactorize", "the Hessian"));
    const int64_t n = h.dim(0);
    if (h.dim(1) != n) {
      return absl::InvalidArgumentError(
          absl::StrCat("GptqFactorize: the Hessian ", h.DebugString(), " is not square"));
    }
    Tensor u = NewTensor(DType::kF32, {n, n});
    GptqFactor f;
    QCAL_RETURN_IF_ERROR(ref::GptqFactorize(h.data<float>(), n, options, u.data<float>(), &f));
    f.u = std::move(u);
    return f;
  }

  absl::StatusOr<QuantizedTensors> GptqSolve(const Tensor& w, const GptqFactor& factor,
                                             const QuantSpec& spec, int block_size,
                                             bool record_pre_round) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "GptqSolve", "the weight"));
    const int64_t n = w.dim(1);
    if (factor.n != n || factor.u.shape() != Shape{n, n} || factor.u.device() != Device::kHost ||
        factor.u.dtype() != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("GptqSolve: the factor (n = ", factor.n,
                                                     ") does not match the weight ",
                                                     w.DebugString()));
    }
    std::vector<float> pre_round;
    QCAL_ASSIGN_OR_RETURN(
        const QuantizedLinear q,
        ref::GptqSolve(w.data<float>(), w.dim(0), factor, factor.u.data<float>(), spec, block_size,
                       record_pre_round ? &pre_round : nullptr));
    QuantizedTensors t = ToTensors(q);
    if (record_pre_round) t.pre_round = Tensor::FromVector(pre_round, {w.dim(0), n});
    return t;
  }

  absl::StatusOr<QuantizedTensors> QuantizeRtn(const Tensor& w, const QuantSpec& spec) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "QuantizeRtn", "the weight"));
    QCAL_ASSIGN_OR_RETURN(const QuantizedLinear q,
                          ref::QuantizeRtn(w.data<float>(), w.dim(0), w.dim(1), spec));
    return ToTensors(q);
  }

  absl::StatusOr<double> OutputError(const Tensor& w, const Tensor& w_hat,
                                     const Tensor& gram) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "OutputError", "w"));
    const int64_t d_out = w.dim(0), d_in = w.dim(1);
    if (w_hat.defined())
      QCAL_RETURN_IF_ERROR(ExpectShape(w_hat, w.shape(), "OutputError", "w_hat"));
    QCAL_RETURN_IF_ERROR(ExpectShape(gram, {d_in, d_in}, "OutputError", "gram"));
    return ref::OutputError(w.data<float>(), w_hat.defined() ? w_hat.data<float>() : nullptr,
                            gram.data<float>(), d_out, d_in);
  }

  absl::StatusOr<ChannelStats> ChannelAbsStats(const Tensor& x, int64_t seq_len) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(x, "ChannelAbsStats", "x"));
    if (x.rank() != 2 || seq_len < 0 || (seq_len > 0 && x.dim(0) % seq_len != 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ChannelAbsStats: x ", x.DebugString(), " is not whole samples of ", seq_len, " tokens"));
    }
    return ref::ChannelAbsStats(x.data<float>(), x.dim(0), x.dim(1), seq_len);
  }

  absl::Status ScaleColumns(Tensor& w, const Tensor& m) override {
    QCAL_RETURN_IF_ERROR(ExpectMatrix(w, "ScaleColumns", "w"));
    QCAL_RETURN_IF_ERROR(ExpectShape(m, {w.dim(1)}, "ScaleColumns", "m"));
    const int64_t width = w.dim(1);
    ParallelFor(w.dim(0), width, [&](int64_t r0, int64_t r1) {
      ref::ScaleColumns(w.data<float>() + r0 * width, r1 - r0, width, m.data<float>());
    });
    return absl::OkStatus();
  }

  absl::Status DivideRows(Tensor& w, const Tensor& m) override {
    QCAL_RETURN_IF_ERROR(ExpectF32(w, "DivideRows", "w"));
    if (w.rank() < 1) return absl::InvalidArgumentError("DivideRows: w must have rank >= 1");
    const int64_t rows = w.dim(0), width = rows > 0 ? w.numel() / rows : 0;
    QCAL_RETURN_IF_ERROR(ExpectShape(m, {rows}, "DivideRows", "m"));
    ParallelFor(rows, width, [&](int64_t r0, int64_t r1) {
      ref::DivideRows(w.data<float>() + r0 * width, r1 - r0, width, m.data<float>() + r0);
    });
    return absl::OkStatus();
  }

 private:
  // A zero-filled host tensor counted in MemoryInUse while it lives.
  Tensor NewTensor(DType dtype, const Shape& shape) {
    const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
    return Tensor(std::make_shared<CountedStorage>(AllocateHost(bytes), memory_), 0, dtype, shape);
  }
  Tensor CountedClone(const Tensor& t) {
    Tensor out = NewTensor(t.dtype(), t.shape());
    std::memcpy(out.raw(), t.raw(), t.nbytes());
    return out;
  }
  // The tensors of a host result: codes as U8, the dequantized weight as Install would form it.
  QuantizedTensors ToTensors(const QuantizedLinear& q) {
    QuantizedTensors out;
    out.d_out = q.d_out;
    out.d_in = q.d_in;
    out.group_size = q.group_size;
    out.n_groups = q.n_groups;
    out.codes = NewTensor(DType::kU8, {q.d_out, q.d_in});
    std::copy(q.codes.begin(), q.codes.end(), out.codes.data<uint8_t>());
    out.scales = NewTensor(DType::kF32, {q.n_groups, q.d_out});
    std::copy(q.scales.begin(), q.scales.end(), out.scales.data<float>());
    out.zeros = NewTensor(DType::kI32, {q.n_groups, q.d_out});
    std::copy(q.zeros.begin(), q.zeros.end(), out.zeros.data<int32_t>());
    out.dequantized = NewTensor(DType::kF32, {q.d_out, q.d_in});
    const std::vector<float> w_hat = q.Dequantized();
    std::copy(w_hat.begin(), w_hat.end(), out.dequantized.data<float>());
    out.g_idx = q.g_idx;
    out.perm = q.perm;
    return out;
  }

  int threads_;
  ComputeDType dtype_;
  std::shared_ptr<MemoryCounter> memory_;
};

}  // namespace

int SetCpuThreads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  openblas_set_num_threads(threads);
  SetParallelThreads(threads);
  return threads;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options) {
  const int threads = SetCpuThreads(options.threads);
  return std::make_unique<CpuBackend>(threads, options.compute_dtype);
}

}  // namespace qcal::kernels
