// The compute interface: one set of ops, two backends (CPU, CUDA).
//
// Callers ask SupportsOp() instead of branching on the build. Tensors passed to a backend must live
// on its device (Alloc/ToDevice/ToHost move them). All activations are fp32; `compute_dtype` kBF16
// rounds GEMM operands to bf16 and accumulates in fp32 (DESIGN section 3), on both backends, so
// parity tests compare like with like. Every op has a scalar CPU twin in kernels/cpu/ref_ops.h that
// is its specification.
//
// Row layouts. A batch of `batch` sequences of `seq_len` tokens is a [batch*seq_len, width] matrix,
// sequence-major. Multi-head tensors put head h's features at columns [h*head_dim, (h+1)*head_dim).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/rope_scaling.h"
#include "common/tensor.h"
#include "kernels/abq_ops.h"
#include "kernels/quant_ops.h"
#include "kernels/train_ops.h"

namespace qcal::kernels {

enum class Op {
  kLinear,
  kRmsNorm,
  kRope,
  kAttention,
  kSiluMul,
  kAdd,
  kEmbedding,
  kNll,
  kGram,
  kActQuant,
  // The gradient pass's ops (DESIGN section 2, step 4): Gemm, RmsNormBackward, RopeBackward,
  // AttentionBackward, SiluMulBackward, EmbeddingBackward, NllBackward, ScaleRowsByNorm,
  // AccumulateSquares. A backend supports all of them or none.
  kBackward,
  // Block retraining's ops (DESIGN section 3, "Retraining"): ClippedFakeQuant,
  // ClippedFakeQuantBackward, AdamWStep, SquaredError, WeightedSquaredError. A backend supports all
  // of them or none.
  kTrain,
  // ABQ quantized inference (DESIGN section 3, "Arbitrary-bit inference kernels (ABQ)"):
  // PrepareAbqLinear and AbqLinear.
  kAbqLinear,
};

// Weight-quantization ops (kernels/quant_ops.h) that a backend may run on its own device. The CPU
// backend runs their references (kernels/cpu/quant_ref.h, the engine's quantizers) for every group
// but kErrorReconstruction, whose device form (randomized SVD, rank chosen from the leading values)
// is not the reference's full SVD: without it the engine reconstructs on the host
// (services/engine/aser).
enum class SolverOp {
  kGptq,
  kQuantizeRtn,
  kOutputError,
  kErrorReconstruction,  // CholeskyWhitening, WhiteningDelta, ReconstructError, AddLowRank,
                         // LowRankOutputError
  kSmoothing,            // ChannelAbsStats, ScaleColumns, DivideRows
};

enum class ComputeDType { kF32, kBF16 };

struct BackendOptions {
  // "cpu", "cuda" (device 0) or "cuda:N". Default: "cpu".
  std::string device = "cpu";
  // CPU threads for BLAS and parallel loops; 0 = number of cores. Default: 0.
  int threads = 0;
  // GEMM operand precision. Default: kF32.
  ComputeDType compute_dtype = ComputeDType::kF32;
  // Device memory, in bytes, that the engine plans with on a device backend: calibration
  // activations beyond it live in pinned host memory. 0 = all free device memory. Not a cap on
  // single allocations. Default: 0.
  int64_t memory_limit_bytes = 0;
  absl::Status Validate() const;
};

// Shapes of one attention call. Queries: [batch*q_len, num_heads*head_dim]; keys and values:
// [batch*kv_len, num_kv_heads*head_dim]. Query i of a sequence sits at position p = q_offset + i
// and attends keys 0 .. p (causal), or with a sliding window W > 0 only keys max(0, p - W + 1) .. p
// (W keys, itself included: transformers' `kv_idx > q_idx - sliding_window`).
// q_offset + q_len <= kv_len.
struct AttentionShape {
  // Positional construction as with an aggregate (the window last, defaulted).
  AttentionShape() = default;
  AttentionShape(int batch, int q_len, int kv_len, int num_heads, int num_kv_heads, int head_dim,
                 int q_offset, int sliding_window = 0)
      : batch(batch),
        q_len(q_len),
        kv_len(kv_len),
        num_heads(num_heads),
        num_kv_heads(num_kv_heads),
        head_dim(head_dim),
        q_offset(q_offset),
        sliding_window(sliding_window) {}
  int batch = 1;
  int q_len = 0;
  int kv_len = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int q_offset = 0;
  int sliding_window = 0;  // 0 = none
};

// What an attention forward keeps for its backward (Backend::AttentionForBackward), backend
// specific: the CUDA backend's bf16 path keeps its packed bf16 q, k and v and each query's
// log2-sum-exp; empty (the default) when the backward recomputes everything itself.
struct AttentionSaved {
  Tensor q, k, v;  // packed operands
  Tensor lse;      // F32 [batch, num_heads, q_len]
};

// RoPE placement: row r of a [batch*seq_len, ...] tensor is at position offset + r % seq_len.
struct RopeShape {
  // Positional construction as with an aggregate (the scaling last, defaulted).
  RopeShape() = default;
  RopeShape(int seq_len, int offset, int head_dim, double theta, RopeScaling scaling = {})
      : seq_len(seq_len), offset(offset), head_dim(head_dim), theta(theta), scaling(scaling) {}
  int seq_len = 0;
  int offset = 0;
  int head_dim = 0;
  double theta = 10000.0;
  // Scaled inverse frequencies and YaRN's cos/sin factor (ref::RopeInvFreq, ref::RopeAngle).
  RopeScaling scaling;
};

// One linear's ABQ-packed weights placed on a backend (Backend::PrepareAbqLinear), ready for any
// of the ABQ kernels. Immutable; valid only with the backend that prepared it, which must outlive
// it (the CUDA form runs on the backend's stream).
class PreparedAbqLinear {
 public:
  virtual ~PreparedAbqLinear() = default;
  PreparedAbqLinear(const PreparedAbqLinear&) = delete;
  PreparedAbqLinear& operator=(const PreparedAbqLinear&) = delete;

  const AbqSpec& spec() const { return spec_; }
  int64_t n() const { return n_; }  // outputs (d_out)
  int64_t k() const { return k_; }  // inputs (d_in)

 protected:
  PreparedAbqLinear(const AbqSpec& spec, int64_t n, int64_t k) : spec_(spec), n_(n), k_(k) {}

 private:
  const AbqSpec spec_;
  const int64_t n_, k_;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  virtual bool SupportsOp(Op op) const = 0;
  virtual ComputeDType compute_dtype() const = 0;
  virtual int threads() const = 0;
  // A short description of the hardware and libraries, recorded as the job's device kind.
  virtual std::string DeviceKind() const = 0;

  // A zero-filled tensor on this backend's device.
  virtual absl::StatusOr<Tensor> Alloc(DType dtype, const Shape& shape) = 0;
  // A tensor whose contents are unspecified, for an output the caller's next op writes whole (a
  // device backend skips Alloc's fill: memory traffic in hot loops). Default: Alloc.
  virtual absl::StatusOr<Tensor> AllocUninitialized(DType dtype, const Shape& shape) {
    return Alloc(dtype, shape);
  }
  // Copies a host tensor to this device (the CPU backend returns a deep copy).
  virtual absl::StatusOr<Tensor> ToDevice(const Tensor& host) = 0;
  // Copies a device tensor to the host.
  virtual absl::StatusOr<Tensor> ToHost(const Tensor& t) = 0;
  virtual absl::Status Synchronize() = 0;
  // Opens (start) or closes a range of work for a profiler that captures only marked ranges
  // (ncu or nsys with --profile-from-start off): cudaProfilerStart/Stop on the CUDA backend.
  // Default: nothing.
  virtual void ProfilerRange(bool start) {}
  // dst = src for two tensors with the same dtype and element count, each on this backend's
  // device or, on a device backend, one of them in host memory (a transfer, complete on return).
  virtual absl::Status Copy(const Tensor& src, Tensor& dst) = 0;
  // Starts dst = src for a tensor src on this backend's device and dst from AllocHost, in the
  // order of the work queued before, and returns a function that waits until dst holds it (dst
  // must not be read, nor src changed, before it returns OK). The default copies at once (Copy).
  virtual absl::StatusOr<std::function<absl::Status()>> CopyToHostAsync(const Tensor& src,
                                                                        Tensor& dst) {
    if (absl::Status s = Copy(src, dst); !s.ok()) return s;
    return std::function<absl::Status()>([] { return absl::OkStatus(); });
  }
  // dst = src converted between F32 and BF16 (round to nearest even; BF16 to F32 is exact), for
  // two tensors on this backend's device with the same element count.
  virtual absl::Status Convert(const Tensor& src, Tensor& dst) = 0;
  // out = [a | b] for a [m, ca] and b [m, cb] (F32 or BF16 each) and out [m, ca + cb] (F32 or
  // BF16), all on this backend's device, every element converted to out's dtype as Convert does:
  // the operand of a product whose K joins two inputs (Model's joined low-rank branch).
  // InvalidArgument for other dtypes or shapes.
  virtual absl::Status ConcatColumns(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  // out[:, first : first + c] = src for src [m, c] and out [m, n] (F32 or BF16 each) on this
  // backend's device, converted as Convert does; out's other columns are left as they are: the
  // t columns of a joined operand [x | t] whose x columns several products share (Model).
  // InvalidArgument for other dtypes or shapes, or columns outside out.
  virtual absl::Status WriteColumns(const Tensor& src, int64_t first, Tensor& out) = 0;
  // Bytes of device memory still available for new tensors (free memory plus this backend's cached
  // blocks, within BackendOptions::memory_limit_bytes), or -1 for a backend that computes in host
  // memory and plans none. Default: -1.
  virtual int64_t AvailableMemory() { return -1; }
  // Memory held by the backend's live tensors now, and the most held since creation or the last
  // ResetPeakMemory, in bytes; -1 when the backend does not account it (the default). CUDA: device
  // memory of its caching allocator (size classes). CPU: the bytes of every tensor it allocated
  // (Alloc, AllocHost, ToDevice, ToHost and the results of its ops) that is still alive, whoever
  // holds it: its working memory, a part of the process's resident set; scratch buffers internal
  // to an op are not counted. Thread-safe.
  virtual int64_t MemoryInUse() const { return -1; }
  virtual int64_t PeakMemoryInUse() const { return -1; }
  virtual void ResetPeakMemory() {}
  // A host tensor suited to Copy to and from this device: page-locked, from a cache, contents
  // unspecified on CUDA. Default: Tensor::Zeros.
  virtual absl::StatusOr<Tensor> AllocHost(DType dtype, const Shape& shape) {
    return Tensor::Zeros(dtype, shape);
  }
  // Fills t (F32, on this device) with uniform values in [lo, hi): element i becomes
  // HashUniform(seed, i, lo, hi) (kernels/hash_random.h), identical on every backend. The default
  // fills host tensors; device backends override it.
  virtual absl::Status FillUniform(Tensor& t, uint64_t seed, float lo, float hi);

  // y[m,n] = x[m,k] · w[n,k]ᵀ (+ bias[n] when given); with `accumulate`, y += instead.
  // x, y fp32; w fp32 (the CUDA backend also takes bf16 x and w, as already rounded operands; the
  // CPU backend fp32 only).
  virtual absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                              bool accumulate) = 0;
  // y[r] = x[r] / sqrt(mean(x[r]²) + eps) * weight.  y may alias x. The CUDA backend also writes
  // a BF16 y (each fp32 result rounded to nearest, ties to even: the GEMM operand of the fp32 y).
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y) = 0;
  // In-place rotary embedding, Hugging Face half-split convention, on every head of x.
  virtual absl::Status Rope(Tensor& x, const RopeShape& shape) = 0;
  // Causal grouped-query attention with softmax scale 1/sqrt(head_dim).
  virtual absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const AttentionShape& shape, Tensor& out) = 0;
  // Attention(Rope(q), Rope(k), v) without changing q and k: each rotated as Rope rotates it (the
  // same shape for both: no cache offset between them), then attended. The default rotates
  // copies; the CUDA backend computing in bf16 rotates them while rounding them to its operands
  // (the same values).
  virtual absl::Status RopeAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const RopeShape& rope, const AttentionShape& shape,
                                     Tensor& out);
  // out = silu(gate) * up, elementwise. The CUDA backend also writes a BF16 out, as RmsNorm.
  virtual absl::Status SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // y += x, elementwise.
  virtual absl::Status Add(const Tensor& x, Tensor& y) = 0;
  // out[r] = table[ids[r]]; ids is a host I32 tensor; table fp32 [vocab, width].
  virtual absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor& out) = 0;
  // nll[r] = logsumexp(logits[r]) - logits[r, targets[r]] (log-softmax in double on CPU, fp32 out).
  // targets is a host I32 tensor.
  virtual absl::Status Nll(const Tensor& logits, const Tensor& targets, Tensor& nll) = 0;
  // h[k,k] += xᵀ x for x [n,k], fp32 accumulation (F32 operands rounded per compute_dtype; a BF16
  // x is taken as already rounded).
  virtual absl::Status AccumulateGram(const Tensor& x, Tensor& h) = 0;
  // A new k×k F32 tensor holding xᵀx, with AccumulateGram's operand rounding and accuracy (a
  // device backend skips the zero fill of a fresh tensor, and its library may then sum in another
  // order than into zeros). Default: Alloc, then AccumulateGram.
  virtual absl::StatusOr<Tensor> Gram(const Tensor& x);
  // Partial Gram matrices of the canonical reduction, completed once (DESIGN section 2): GramLower
  // is Gram's lower triangle (row-major entries i >= j, the same values), its strict upper
  // triangle unspecified; AddLower adds x's lower triangle into y's (y's strict upper triangle is
  // unspecified after). MirrorLower (below) completes the sum: summing lower triangles and
  // mirroring the sum gives the bits of summing the full symmetric matrices. Defaults: Gram, Add.
  // The engine completes every input statistic with MirrorLower, so a backend that computes
  // them must implement it (its default is UnsupportedOp).
  virtual absl::StatusOr<Tensor> GramLower(const Tensor& x) { return Gram(x); }
  virtual absl::Status AddLower(const Tensor& x, Tensor& y) { return Add(x, y); }

  // ---- Backward ops: the gradient pass (DESIGN section 2, step 4; section 3, "Output-adaptive
  // calibration"). Each is the exact gradient of its forward op above for the same inputs,
  // computed in fp32 (GEMM operands rounded per compute_dtype, as the forward rounds them), with a
  // scalar twin in kernels/cpu/ref_grad.h that is its specification. Not pure: a backend without
  // them answers SupportsOp(kBackward) false and returns Unimplemented.
  //
  // c = alpha·op(a)·op(b) + beta·c, where op(a) is [m,k] (a [m,k], or a [k,m] with trans_a),
  // op(b) is [k,n] (b [k,n], or b [n,k] with trans_b) and c is [m,n]. beta == 0 ignores c's
  // contents (NaN included). Operands F32, rounded per compute_dtype (the CUDA backend also takes
  // BF16 operands, as already rounded), fp32 accumulation.
  virtual absl::Status Gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                            float alpha, float beta, Tensor& c) {
    return UnsupportedOp("Gemm");
  }
  // The lower triangle (diagonal included) of c = alpha·op(a)·op(b) + beta·c, for a product the
  // caller knows to be symmetric (square, and equal to its transpose: XᵀX, ΓΓᵀ, Xᵀ(PX) for a
  // symmetric P). Entries above the diagonal are unspecified afterwards; MirrorLower completes c.
  // The CUDA backend computes row panels of the lower triangle, about half of Gemm's work; the
  // default (the CPU's) is Gemm.
  virtual absl::Status GemmLower(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                 float alpha, float beta, Tensor& c) {
    return Gemm(a, trans_a, b, trans_b, alpha, beta, c);
  }
  // c[i, j] = c[j, i] for j > i: a square F32 c [n, n] made symmetric from its lower triangle, or
  // each of the `batch` squares of c [batch, n, n].
  virtual absl::Status MirrorLower(Tensor& c) { return UnsupportedOp("MirrorLower"); }
  // Gemm (or with `lower` GemmLower) on each of `batch` independent products: a, b and c are
  // rank 3, [batch, rows, cols], and c[i] = alpha·op(a[i])·op(b[i]) + beta·c[i]. Operands may be
  // F32 (rounded per compute_dtype, as Gemm rounds them) or BF16 (taken as already rounded, so a
  // caller converts a shared operand once). c is F32, or BF16 with beta == 0: the fp32 result
  // rounded to nearest even. The default runs the products one by one through Gemm/GemmLower,
  // widening BF16 operands (exact) and converting a BF16 c; the CUDA backend issues batched
  // products (a lower triangle in two batched panels), so that a chunk's per-sample 2048-wide
  // products fill the device.
  virtual absl::Status GemmBatched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                   float alpha, float beta, Tensor& c, bool lower);
  // dx = ∂<dy, RmsNorm(x, weight, eps)>/∂x for x, dy [rows, width] (weight [width]; the weight's
  // own gradient is not formed). dx may alias dy.
  virtual absl::Status RmsNormBackward(const Tensor& x, const Tensor& weight, float eps,
                                       const Tensor& dy, Tensor& dx) {
    return UnsupportedOp("RmsNormBackward");
  }
  // In place: g = Rᵀ·g on every head, where R is Rope's rotation for the same shape (the rotation
  // by the negative angle, YaRN's factor included): the gradient of Rope.
  virtual absl::Status RopeBackward(Tensor& g, const RopeShape& shape) {
    return UnsupportedOp("RopeBackward");
  }
  // The gradients of Attention(q, k, v, shape) given dout = ∂ℓ/∂out: dq (shaped like q), dk, dv
  // (shaped like k, v), overwritten. The probabilities are recomputed (on the GPU flash-style,
  // tile by tile, never an L×L matrix per head in memory); causal and sliding-window masks as in
  // the forward.
  virtual absl::Status AttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& dout, const AttentionShape& shape,
                                         Tensor& dq, Tensor& dk, Tensor& dv) {
    return UnsupportedOp("AttentionBackward");
  }
  // Attention (the same out, bit for bit) that also fills `saved` for AttentionBackwardSaved.
  // Default: Attention, nothing saved.
  virtual absl::Status AttentionForBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const AttentionShape& shape, Tensor& out,
                                            AttentionSaved& saved) {
    saved = AttentionSaved();
    return Attention(q, k, v, shape, out);
  }
  // AttentionBackward given the forward's output `out` and what AttentionForBackward saved for the
  // same q, k, v and shape: the CUDA bf16 path reuses the packed operands and the statistics (one
  // sweep over the keys for dq instead of two; D = dout·out), within the bf16 path's bound of
  // AttentionBackward. With nothing saved (and by default): AttentionBackward.
  virtual absl::Status AttentionBackwardSaved(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const Tensor& out, const Tensor& dout,
                                              const AttentionSaved& saved,
                                              const AttentionShape& shape, Tensor& dq, Tensor& dk,
                                              Tensor& dv) {
    return AttentionBackward(q, k, v, dout, shape, dq, dk, dv);
  }
  // For out = silu(gate)·up: dgate = dout·up·silu'(gate), dup = dout·silu(gate).
  virtual absl::Status SiluMulBackward(const Tensor& gate, const Tensor& up, const Tensor& dout,
                                       Tensor& dgate, Tensor& dup) {
    return UnsupportedOp("SiluMulBackward");
  }
  // dtable[ids[r]] += dout[r] for r = 0, 1, ... in order (deterministic: every row of dtable sums
  // its tokens in row order). ids is a host I32 tensor [rows]; dout [rows, width]; dtable
  // [vocab, width]. InvalidArgument for an id outside the table.
  virtual absl::Status EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable) {
    return UnsupportedOp("EmbeddingBackward");
  }
  // dlogits[r] = scale·(softmax(logits[r]) − onehot(targets[r])): the gradient of scale·Σ_r nll[r]
  // (Nll). targets is a host I32 tensor; a row whose target is −1 predicts nothing and gets
  // zeros. dlogits may alias logits.
  virtual absl::Status NllBackward(const Tensor& logits, const Tensor& targets, float scale,
                                   Tensor& dlogits) {
    return UnsupportedOp("NllBackward");
  }
  // x[r, :] *= ‖g[r, :]‖₂ for x [rows, width_x] and g [rows, width_g] (the squares summed in
  // double on the CPU, in fp32 by a block reduction on the CUDA backend; the norm rounded to
  // fp32): the per-token Hessian H_tok = Σ_t ‖g_t‖²·x_t x_tᵀ is then AccumulateGram of the scaled
  // x. A norm of a power of two is exact, so ‖g_t‖² = 4 scales every row by exactly 2.
  virtual absl::Status ScaleRowsByNorm(const Tensor& g, Tensor& x) {
    return UnsupportedOp("ScaleRowsByNorm");
  }
  // out = x with each row scaled by ‖g[r, :]‖₂ as ScaleRowsByNorm scales it (x not modified), out
  // F32 of x's shape, or BF16: the scaled fp32 value rounded to nearest even, what a bf16 GEMM
  // operand of ScaleRowsByNorm's result would be. The CUDA backend does it in one pass; the
  // default copies, scales and converts.
  virtual absl::Status ScaleRowsByNormInto(const Tensor& g, const Tensor& x, Tensor& out);
  // f += g ⊙ g, elementwise (the diagonal Fisher), for F32 tensors of the same element count.
  virtual absl::Status AccumulateSquares(const Tensor& g, Tensor& f) {
    return UnsupportedOp("AccumulateSquares");
  }

  // ---- Training ops: block retraining (DESIGN section 3, "Retraining (ApiQ and
  // saliency-aware)"). Each has a CPU reference in kernels/cpu/train_ref.h that is its
  // specification (the rules: kernels/train_math.h); every tensor is F32 (the layout's I32) on this
  // backend's device. Not pure: a backend without them answers SupportsOp(kTrain) false and
  // returns Unimplemented.
  //
  // w_hat [d_out, d_in] = the clipped fake-quant of w [d_out, d_in] with the clipping logits gamma
  // and beta [d_out, n_groups] on `layout`: bit-identical to ref::ClippedFakeQuant<float> on every
  // backend. w finite and the layout valid (ClipTensors); w_hat may alias w (each group reads and
  // writes only its own columns). The CUDA backend also writes a BF16 w_hat: those values rounded
  // to nearest even (for a caller that uses ŵ only as a bf16 GEMM operand).
  virtual absl::Status ClippedFakeQuant(const Tensor& w, const ClipTensors& layout,
                                        const Tensor& gamma, const Tensor& beta, Tensor& w_hat) {
    return UnsupportedOp("ClippedFakeQuant");
  }
  // Its STE gradients for d_w_hat [d_out, d_in]: d_gamma, d_beta [d_out, n_groups] and, when d_w
  // is given, d_w [d_out, d_in], all overwritten: bit-identical to ref::ClippedFakeQuantBackward
  // <float> on every backend (each group's sums run over its positions in order on one thread).
  virtual absl::Status ClippedFakeQuantBackward(const Tensor& w, const ClipTensors& layout,
                                                const Tensor& gamma, const Tensor& beta,
                                                const Tensor& d_w_hat, Tensor& d_gamma,
                                                Tensor& d_beta, Tensor* d_w) {
    return UnsupportedOp("ClippedFakeQuantBackward");
  }
  // AdamW step t >= 1 (1-based) on p with gradients g and moments m, v (F32 tensors of one element
  // count; zero before step 1), in place: bit-identical to ref::AdamWStep<float> on every backend.
  // InvalidArgument for invalid options (AdamWOptions::Validate) or t < 1.
  virtual absl::Status AdamWStep(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, int64_t t,
                                 const AdamWOptions& options) {
    return UnsupportedOp("AdamWStep");
  }
  // Σ (y − target)² over all elements (each difference and square in double) and, when dy is
  // given, dy = scale·(y − target) in fp32 (bit-identical to ref::SquaredError's; dy may alias y).
  // The sum is ref::SquaredError's in element order on the CPU; on CUDA per-block double partial
  // sums added in a fixed order (deterministic run to run; within 1e-12 relative of the CPU's).
  virtual absl::StatusOr<double> SquaredError(const Tensor& y, const Tensor& target, float scale,
                                              Tensor* dy) {
    return UnsupportedOp("SquaredError");
  }
  // total + Σ F·(x − r)² over x, r [rows, width] (F = f, or 1 when f is undefined; the difference
  // in fp32, the products and sums in double: per-row sums, added to `total` one by one in row
  // order, so that sums over several tensors chain), adding g = (scale·F)·(x − r) in fp32 to g1
  // and to g2 when given (bit-identical to ref::WeightedSquaredError's). The row sums are the
  // reference's on the CPU; on CUDA each is a fixed-order block reduction (deterministic; the
  // result within 1e-12 relative of the CPU's).
  virtual absl::StatusOr<double> WeightedSquaredError(const Tensor& x, const Tensor& r,
                                                      const Tensor& f, float scale, Tensor* g1,
                                                      Tensor* g2, double total) {
    return UnsupportedOp("WeightedSquaredError");
  }

  // Activation fake-quantization (DESIGN section 3, "Activation quantization"): per row (token) of
  // x [rows, width], dynamic and symmetric with b = `bits` (2..8) and qmax = 2^(b-1) - 1:
  // s = max|x_row| / qmax, out = s * clamp(round_half_even(x / s), -qmax, qmax); s = 0 gives 0.
  // Bit-identical to ref::ActQuant (fp32 arithmetic, IEEE division). out may alias x.
  // Not pure: backends without it return Unimplemented (and SupportsOp(kActQuant) false).
  virtual absl::Status ActQuant(const Tensor& x, int bits, Tensor& out) {
    return absl::UnimplementedError("ActQuant is not implemented by the " + name() + " backend");
  }
  // The activation-quantized linear (DESIGN section 3, "Activation quantization"; the dequantizing
  // path of an AxWy model): y[m,n] = w[n,k] applied to ActQuant(x[m,k], bits), + bias[n] when
  // given; with `accumulate`, y += instead. The layer's fp32 output plus the bias is formed first,
  // then stored or added, as AbqLinear does. In fp32 compute (every CPU run, and CUDA's f32) the
  // product is formed as ref::ActQuantLinear specifies: the per-token scale is factored out, the
  // codes times w are summed in fp64 and the result rounded once, fl32(fl64(s·Σ a·w)). For a GPTQ
  // checkpoint's weights that sum is exact, so this path and the ABQ kernels give the same bits.
  // With compute dtype bf16 (CUDA): ActQuant, then Linear on the bf16-rounded operands. x, y, bias
  // F32; w F32 (CUDA also BF16). Not pure: like ActQuant (SupportsOp(kActQuant)).
  virtual absl::Status ActQuantLinear(const Tensor& x, int bits, const Tensor& w,
                                      const Tensor* bias, Tensor& y, bool accumulate) {
    return absl::UnimplementedError("ActQuantLinear is not implemented by the " + name() +
                                    " backend");
  }
  // The weight operand of a bf16 ActQuantLinear written into the left part of a wider one:
  // out[:, 0:width] = bf16(ActQuant(x, bits)) for x F32 [rows, width] and out BF16 [rows,
  // >= width]; the other columns of out are left as they are. The same bits as ActQuant then
  // Convert. Model joins an activation-quantized weight branch with its low-rank branch through it
  // (the x columns of [Q(x) | t]). CUDA only (the CPU does not join products): others return
  // Unimplemented.
  virtual absl::Status ActQuantOperand(const Tensor& x, int bits, Tensor& out) {
    return absl::UnimplementedError("ActQuantOperand is not implemented by the " + name() +
                                    " backend");
  }

  // ---- ABQ quantized inference (DESIGN section 3, "Arbitrary-bit inference kernels (ABQ)"): a
  // linear's packed weights placed once (PrepareAbqLinear), then whole layers run through a kernel
  // the caller names (AbqLinear; never swapped for another). CUDA: the kernels of
  // kernels/cuda/cuda_abq.h on the backend's own stream and memory, with no host round trip. CPU:
  // their specification, kernels/cpu/abq_ref.h (b1 and int8 both compute AbqGemm of
  // AbqQuantizeActivations, which the CUDA integer kernels equal bit for bit; a16 is
  // AbqWeightOnlyReference rounded to fp32), for tests: scalar code, slow. Not pure: a backend
  // without them answers SupportsOp(kAbqLinear) false and returns Unimplemented.
  //
  // Places `w` on this backend. InvalidArgument for weights AbqWeights' invariants reject (spec,
  // shape, sizes) or more than kAbqMaxGroups k-groups; kResourceExhausted when memory runs out.
  virtual absl::StatusOr<std::shared_ptr<const PreparedAbqLinear>> PrepareAbqLinear(
      const AbqWeights& w) {
    return Unsupported("PrepareAbqLinear");
  }
  // y[m,n] = the layer of w through `kernel` applied to x[m,k] (+ bias[n] when given); with
  // `accumulate`, y += instead. The layer's fp32 output plus the bias is formed first, then stored
  // or added, on every backend alike. The integer kernels quantize x per token to
  // w.spec().act_bits themselves (DESIGN section 3, "Activation quantization"); the weight-only
  // kernel rounds x to bf16. x, y, bias F32 on this device; w prepared by this backend;
  // 1 <= m <= kAbqMaxTokens (m = 0 does nothing). InvalidArgument naming the operand otherwise.
  virtual absl::Status AbqLinear(const PreparedAbqLinear& w, AbqKernel kernel, const Tensor& x,
                                 const Tensor* bias, Tensor& y, bool accumulate) {
    return Unsupported("AbqLinear");
  }

  // Weight quantization on this backend's device (kernels/quant_ops.h). Not pure: a backend
  // without them answers SupportsSolverOp false and returns Unimplemented. Each follows the CPU
  // reference kernels/cpu/quant_ref.h in fp32, so results agree with it within the fp32 tolerances
  // of DESIGN section 3 (RTN codes exactly; the CPU backend runs the reference itself, bit for
  // bit); bad input (non-finite weights or statistics, invalid spec or options, shapes) is
  // InvalidArgument naming the value.
  virtual bool SupportsSolverOp(SolverOp op) const { return false; }
  // GPTQ steps 1-4 on the Gram matrix h (F32 [n, n] on this device; only the upper triangle
  // j >= i is read): dead and outlier columns, the visiting order, damping (retried at 10x and
  // 100x) and U. FailedPrecondition when H is not positive definite even with the most damping.
  virtual absl::StatusOr<GptqFactor> GptqFactorize(const Tensor& h,
                                                   const GptqSolveOptions& options) {
    return Unsupported("GptqFactorize");
  }
  // GPTQ step 5: quantizes w (F32 [d_out, n] on this device) column by column in the factor's
  // visiting order, in lazy blocks of `block_size` columns (quant_ref.h). w is not modified.
  // record_pre_round: also return W̃ (QuantizedTensors::pre_round), bit-identical to the
  // reference's on the CPU backend; on CUDA the values its column loop rounded (so they round to
  // its codes exactly), within the solve's fp32 tolerance of the reference's. The codes are the
  // same either way.
  virtual absl::StatusOr<QuantizedTensors> GptqSolve(const Tensor& w, const GptqFactor& factor,
                                                     const QuantSpec& spec, int block_size,
                                                     bool record_pre_round) {
    return Unsupported("GptqSolve");
  }
  // Round to nearest, group by group: codes identical to ref::QuantizeRtn<float>.
  virtual absl::StatusOr<QuantizedTensors> QuantizeRtn(const Tensor& w, const QuantSpec& spec) {
    return Unsupported("QuantizeRtn");
  }
  // ||(W - W^) X^T||_F = sqrt(trace(E G E^T)) with E = w - w_hat (E = w when w_hat is undefined)
  // for w, w_hat F32 [d_out, d_in] and the Gram matrix G = gram (F32 [d_in, d_in], upper triangle
  // read), like ref::OutputError (CUDA: EᵀE as one TF32 product of E rounded to TF32, within 5e-4
  // relative; the trace summed in double).
  virtual absl::StatusOr<double> OutputError(const Tensor& w, const Tensor& w_hat,
                                             const Tensor& gram) {
    return Unsupported("OutputError");
  }
  // The same figure where it is only reported, never computed with (the relative error's
  // denominator ‖W·Xᵀ‖ and the RTN baseline): a backend may take cheaper products. Default:
  // OutputError. CUDA: EᵀE as one bf16 product of E rounded to bf16 (within 2.5e-3 relative).
  virtual absl::StatusOr<double> ReportOutputError(const Tensor& w, const Tensor& w_hat,
                                                   const Tensor& gram) {
    return OutputError(w, w_hat, gram);
  }
  // The whitening factor S = lower Cholesky factor of G + δI, δ = damp · mean(diag G), for the
  // Gram matrix G = gram (F32 [n, n] on this device, upper triangle read), computed in double and
  // returned as F32 [n, n] (strict upper triangle 0). FailedPrecondition when G + δI is not
  // positive definite (like engine::CholeskyWhitening).
  virtual absl::StatusOr<Tensor> CholeskyWhitening(const Tensor& gram, double damp) {
    return Unsupported("CholeskyWhitening");
  }
  // The δ that CholeskyWhitening(gram, damp) adds, damp · mean(diag G) (for
  // LowRankOptions::whitening_delta). InvalidArgument for a bad damp or a non-square gram.
  virtual absl::StatusOr<double> WhiteningDelta(const Tensor& gram, double damp) {
    return Unsupported("WhiteningDelta");
  }
  // Error reconstruction of E = w − w_hat (F32 [d_out, d_in] each) with the whitening factor
  // `whitening`: F32 [d_in, d_in] lower triangular S (Cholesky), F32 [d_in] diagonal s (LQER; a
  // channel with s_j = 0 gets a zero column of L_B), or undefined (S = I). Like
  // engine::ReconstructError with a fixed rank; kFull agrees with it to fp32 accuracy.
  virtual absl::StatusOr<LowRankTensors> ReconstructError(const Tensor& w, const Tensor& w_hat,
                                                          const Tensor& whitening,
                                                          const LowRankOptions& options) {
    return Unsupported("ReconstructError");
  }
  // w += a·b for F32 a [d_out, r], b [r, d_in] and w [d_out, d_in] on this device: a low-rank
  // correction added to a dense weight (to measure the corrected layer's output error).
  virtual absl::Status AddLowRank(const Tensor& a, const Tensor& b, Tensor& w) {
    return Unsupported("AddLowRank");
  }
  // The corrected layer's output error ‖(E − a·b)·Xᵀ‖_F (E = w − w_hat), what OutputError(w,
  // w_hat + a·b, gram) measures, from error_sq = ‖E·Xᵀ‖_F² (OutputError(w, w_hat, gram) squared)
  // by products of r columns: error_sq − ⟨a, 2·E·G·bᵀ − a·b·G·bᵀ⟩ (CUDA: fp32 products, the inner
  // product in double; error_sq's accuracy carries over, scaled by error_sq / result²). Shapes as
  // AddLowRank's and OutputError's; InvalidArgument for a mismatch or an error_sq that is not
  // finite and >= 0.
  virtual absl::StatusOr<double> LowRankOutputError(const Tensor& w, const Tensor& w_hat,
                                                    const Tensor& a, const Tensor& b,
                                                    const Tensor& gram, double error_sq) {
    return Unsupported("LowRankOutputError");
  }
  // Per-channel statistics of one chunk of a linear's input x (F32 [rows, width] on this device,
  // rows whole samples of seq_len tokens), like engine::ActivationStats::Accumulate (bit-identical
  // max; sums in double in another order). seq_len 0 counts every row (a weight's column maxima).
  // InvalidArgument for a bad shape or seq_len.
  virtual absl::StatusOr<ChannelStats> ChannelAbsStats(const Tensor& x, int64_t seq_len) {
    return Unsupported("ChannelAbsStats");
  }
  // ChannelAbsStats without the read-back: x's totals written in stream order into this device's
  // max_abs (F32, width elements), sum_abs (F64, width) and bad (I32, width: 1 where the column
  // holds a NaN or an infinity in any row, else 0), the same values ChannelAbsStats returns, so
  // that a pass over many chunks reads its totals back once instead of once a chunk.
  // InvalidArgument as ChannelAbsStats, or for outputs of another size or dtype.
  virtual absl::Status ChannelAbsStatsInto(const Tensor& x, int64_t seq_len, Tensor& max_abs,
                                           Tensor& sum_abs, Tensor& bad) {
    return Unsupported("ChannelAbsStatsInto");
  }
  // w[r, j] *= m[j] for F32 w [rows, width] and m [width] on this device (IEEE products: the same
  // bits as the host).
  virtual absl::Status ScaleColumns(Tensor& w, const Tensor& m) {
    return Unsupported("ScaleColumns");
  }
  // w[r, ...] /= m[r] for F32 w [rows, ...] (a vector is rows of one) and m [rows] on this device
  // (IEEE division: the same bits as the host).
  virtual absl::Status DivideRows(Tensor& w, const Tensor& m) { return Unsupported("DivideRows"); }

  // A second backend on this device with its own queue, for independent work that a host thread
  // runs beside this backend's (the output-adaptive factorizations of a block's linears, which the
  // block's statistics do not feed: oac/factor_prefetch.h). Created on first call and owned by
  // this backend; nullptr where there is none (the default, and the CPU backend, whose ops already
  // use every thread). CUDA: its own stream, cuBLAS and cuSOLVER handles and memory pool, so its
  // results are bit-identical to this backend's. Its device tensors are this backend's operands
  // once its Synchronize has returned; memory it handed out must not be written by this backend.
  // Not thread-safe (call it from this backend's thread); the side backend is used by one other
  // thread at a time.
  virtual absl::StatusOr<Backend*> SideBackend() { return nullptr; }

 protected:
  absl::Status UnsupportedOp(const char* op) const { return Unsupported(op); }
  // The operand checks of AbqLinear that do not depend on the device: x [m, w.k()] and y
  // [m, w.n()] of rank 2 and F32, bias [w.n()] F32 when given, m <= kAbqMaxTokens.
  static absl::Status CheckAbqLinearOperands(const PreparedAbqLinear& w, const Tensor& x,
                                             const Tensor* bias, const Tensor& y);
  // The operand checks of ActQuantLinear that do not depend on the device: bits in 2..8, x
  // [m, k] and w [n, k] of rank 2, y F32 [m, n], bias F32 [n] when given (defined).
  static absl::Status CheckActQuantLinearOperands(const Tensor& x, int bits, const Tensor& w,
                                                  const Tensor* bias, const Tensor& y);
  // ConcatColumns' checks: a, b and out F32 or BF16 matrices on `device` with a.dim(0) ==
  // b.dim(0) == out.dim(0) and out.dim(1) == a.dim(1) + b.dim(1).
  static absl::Status CheckConcatColumns(const Tensor& a, const Tensor& b, const Tensor& out,
                                         Device device);
  // WriteColumns' checks: src and out F32 or BF16 matrices on `device` with the same rows, and
  // 0 <= first <= out.dim(1) - src.dim(1).
  static absl::Status CheckWriteColumns(const Tensor& src, int64_t first, const Tensor& out,
                                        Device device);
  // GemmBatched's operand checks: rank-3 F32 or BF16 a, b and c of one batch whose shapes fit,
  // and beta == 0 for a BF16 c.
  static absl::Status CheckGemmBatched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                       float beta, const Tensor& c);

 private:
  absl::Status Unsupported(const char* op) const {
    return absl::UnimplementedError(std::string(op) + " is not implemented by the " + name() +
                                    " backend");
  }
};

// Creates the backend named by options.device. Errors: unknown device, CUDA not built, no GPU.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

// Whether a CUDA device is usable here (built with CUDA and cudaGetDeviceCount > 0).
bool CudaAvailable();

}  // namespace qcal::kernels
