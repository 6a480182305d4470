// The CUDA backend's class and the checks its files share. Internal to kernels/cuda: only the
// cuda_backend*.cc files include this; everything else reaches the backend through
// CreateCudaBackend (cuda_backend.h). The members are defined by room, as the groups below say.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/tensor.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/cuda/cuda_resources.h"

namespace qcal::kernels::cuda_internal {

using cuda::CudaStatus;

// Checks shared by the files (cuda_backend.cc defines them); each returns InvalidArgument naming
// `op` and `what`.

// Unless `t` is a defined CUDA tensor of `dtype`.
absl::Status ExpectDevice(const Tensor& t, DType dtype, const char* op, const char* what);
// Unless `t` is a defined host I32 tensor.
absl::Status ExpectHostI32(const Tensor& t, const char* op, const char* what);
// Unless `t` has `shape`.
absl::Status ExpectShape(const Tensor& t, const Shape& shape, const char* op, const char* what);
// Unless every id lies in [0, limit).
absl::Status CheckIds(const Tensor& ids, int64_t limit, const char* op, const char* what);

// The Backend on one CUDA device (kernels/cuda/cuda_backend.h says what it promises).
class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, ComputeDType dtype, int64_t memory_limit, std::string kind,
              cuda::CudaStream stream, cuda::CublasHandle blas, cuda::CusolverHandle solver);
  ~CudaBackend() override;

  std::string name() const override { return absl::StrCat("cuda:", device_); }
  Device device() const override { return Device::kCuda; }
  bool SupportsOp(Op) const override { return true; }
  bool SupportsSolverOp(SolverOp) const override { return true; }
  ComputeDType compute_dtype() const override { return dtype_; }
  // One stream; the host threads play no part in the results.
  int threads() const override { return 1; }
  std::string DeviceKind() const override { return kind_; }

  // Memory, transfers, synchronization (cuda_backend.cc).
  absl::StatusOr<Tensor> Alloc(DType dtype, const Shape& shape) override;
  absl::StatusOr<Tensor> AllocUninitialized(DType dtype, const Shape& shape) override;
  absl::StatusOr<Tensor> ToDevice(const Tensor& t) override;
  absl::StatusOr<Tensor> ToHost(const Tensor& t) override;
  absl::Status Synchronize() override;
  absl::Status Copy(const Tensor& src, Tensor& dst) override;
  absl::StatusOr<std::function<absl::Status()>> CopyToHostAsync(const Tensor& src,
                                                                Tensor& dst) override;
  int64_t AvailableMemory() override;
  absl::StatusOr<Backend*> SideBackend() override;
  int64_t MemoryInUse() const override { return static_cast<int64_t>(allocator_->bytes_in_use()); }
  int64_t PeakMemoryInUse() const override {
    return static_cast<int64_t>(allocator_->peak_bytes_in_use());
  }
  void ResetPeakMemory() override { allocator_->ResetPeak(); }
  absl::StatusOr<Tensor> AllocHost(DType dtype, const Shape& shape) override;
  absl::Status FillUniform(Tensor& t, uint64_t seed, float lo, float hi) override;
  void ProfilerRange(bool start) override;

  // Forward ops and GEMMs (cuda_backend_forward.cc).
  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                      bool accumulate) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y) override;
  absl::Status Rope(Tensor& x, const RopeShape& shape) override;
  absl::Status SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) override;
  absl::Status Add(const Tensor& x, Tensor& y) override;
  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor& out) override;
  absl::Status Nll(const Tensor& logits, const Tensor& targets, Tensor& nll) override;
  absl::Status AccumulateGram(const Tensor& x, Tensor& h) override;
  absl::StatusOr<Tensor> Gram(const Tensor& x) override;
  absl::StatusOr<Tensor> GramLower(const Tensor& x) override;
  absl::Status AddLower(const Tensor& x, Tensor& y) override;
  absl::Status Gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                    float beta, Tensor& c) override;
  absl::Status GemmLower(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                         float beta, Tensor& c) override;
  absl::Status Convert(const Tensor& src, Tensor& dst) override;
  absl::Status ConcatColumns(const Tensor& a, const Tensor& b, Tensor& out) override;
  absl::Status WriteColumns(const Tensor& src, int64_t first, Tensor& out) override;
  absl::Status MirrorLower(Tensor& c) override;
  absl::Status GemmBatched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                           float alpha, float beta, Tensor& c, bool lower) override;

  // Attention (cuda_backend_attention.cc).
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& s,
                         Tensor& out) override;
  absl::Status RopeAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                             const RopeShape& rope, const AttentionShape& s, Tensor& out) override;
  absl::Status AttentionForBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const AttentionShape& s, Tensor& out,
                                    AttentionSaved& saved) override;
  absl::Status AttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& dout, const AttentionShape& s, Tensor& dq,
                                 Tensor& dk, Tensor& dv) override;
  absl::Status AttentionBackwardSaved(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& out, const Tensor& dout,
                                      const AttentionSaved& saved, const AttentionShape& s,
                                      Tensor& dq, Tensor& dk, Tensor& dv) override;

  // Training ops (cuda_backend_train.cc; specs in kernels/cpu/ref_grad.h).
  absl::Status RmsNormBackward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy,
                               Tensor& dx) override;
  absl::Status RopeBackward(Tensor& g, const RopeShape& shape) override;
  absl::Status SiluMulBackward(const Tensor& gate, const Tensor& up, const Tensor& dout,
                               Tensor& dgate, Tensor& dup) override;
  absl::Status EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable) override;
  absl::Status NllBackward(const Tensor& logits, const Tensor& targets, float scale,
                           Tensor& dlogits) override;
  absl::Status ScaleRowsByNorm(const Tensor& g, Tensor& x) override;
  absl::Status ScaleRowsByNormInto(const Tensor& g, const Tensor& x, Tensor& out) override;
  absl::Status AccumulateSquares(const Tensor& g, Tensor& f) override;
  absl::Status ClippedFakeQuant(const Tensor& w, const ClipTensors& layout, const Tensor& gamma,
                                const Tensor& beta, Tensor& w_hat) override;
  absl::Status ClippedFakeQuantBackward(const Tensor& w, const ClipTensors& layout,
                                        const Tensor& gamma, const Tensor& beta,
                                        const Tensor& d_w_hat, Tensor& d_gamma, Tensor& d_beta,
                                        Tensor* d_w) override;
  absl::Status AdamWStep(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, int64_t t,
                         const AdamWOptions& options) override;
  absl::StatusOr<double> SquaredError(const Tensor& y, const Tensor& target, float scale,
                                      Tensor* dy) override;
  absl::StatusOr<double> WeightedSquaredError(const Tensor& x, const Tensor& r, const Tensor& f,
                                              float scale, Tensor* g1, Tensor* g2,
                                              double total) override;

  // Quantization: activations, ABQ weights, the solvers, channel statistics and scaling
  // (cuda_backend_quant.cc).
  absl::Status ActQuant(const Tensor& x, int bits, Tensor& out) override;
  absl::Status ActQuantLinear(const Tensor& x, int bits, const Tensor& w, const Tensor* bias,
                              Tensor& y, bool accumulate) override;
  absl::Status ActQuantOperand(const Tensor& x, int bits, Tensor& out) override;
  absl::StatusOr<std::shared_ptr<const PreparedAbqLinear>> PrepareAbqLinear(
      const AbqWeights& w) override;
  absl::Status AbqLinear(const PreparedAbqLinear& w, AbqKernel kernel, const Tensor& x,
                         const Tensor* bias, Tensor& y, bool accumulate) override;
  absl::StatusOr<GptqFactor> GptqFactorize(const Tensor& h,
                                           const GptqSolveOptions& options) override;
  absl::StatusOr<QuantizedTensors> GptqSolve(const Tensor& w, const GptqFactor& factor,
                                             const QuantSpec& spec, int block_size,
                                             bool record_pre_round) override;
  absl::StatusOr<QuantizedTensors> QuantizeRtn(const Tensor& w, const QuantSpec& spec) override;
  absl::StatusOr<double> ReportOutputError(const Tensor& w, const Tensor& w_hat,
                                           const Tensor& gram) override;
  absl::StatusOr<double> OutputError(const Tensor& w, const Tensor& w_hat,
                                     const Tensor& gram) override;
  absl::StatusOr<Tensor> CholeskyWhitening(const Tensor& gram, double damp) override;
  absl::StatusOr<double> WhiteningDelta(const Tensor& gram, double damp) override;
  absl::StatusOr<LowRankTensors> ReconstructError(const Tensor& w, const Tensor& w_hat,
                                                  const Tensor& whitening,
                                                  const LowRankOptions& options) override;
  absl::Status AddLowRank(const Tensor& a, const Tensor& b, Tensor& w) override;
  absl::StatusOr<double> LowRankOutputError(const Tensor& w, const Tensor& w_hat, const Tensor& a,
                                            const Tensor& b, const Tensor& gram,
                                            double error_sq) override;
  absl::StatusOr<ChannelStats> ChannelAbsStats(const Tensor& x, int64_t seq_len) override;
  absl::Status ChannelAbsStatsInto(const Tensor& x, int64_t seq_len, Tensor& max_abs,
                                   Tensor& sum_abs, Tensor& bad) override;
  absl::Status ScaleColumns(Tensor& w, const Tensor& m) override;
  absl::Status DivideRows(Tensor& w, const Tensor& m) override;

 private:
  // The stream; a tensor from the device pool, its contents undefined (cuda_backend.cc).
  cudaStream_t stream() const { return stream_.get(); }
  absl::StatusOr<Tensor> Uninitialized(DType dtype, const Shape& shape);

  // Helpers of the GEMMs and of RoPE (cuda_backend_forward.cc).

  // Gemm, or with `lower` GemmLower: row panels [r0, r1) of the lower triangle, each one product
  // of op(a)'s rows r0..r1 with op(b)'s first r1 columns ((P + 1) / 2P of the full product for P
  // panels; panel starts are multiples of 64 rows, so that bf16 operands stay aligned).
  absl::Status GemmPanels(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                          float beta, Tensor& c, bool lower);
  // AccumulateGram (accumulate) or Gram's product into an unfilled h (bf16 compute only).
  absl::Status GramInto(const Tensor& x, Tensor& h, bool accumulate, bool mirror = true);

  // `t` (a CUDA F32 or BF16 tensor) in the dtype `operands`: t itself when it already is, else a
  // converted scratch copy (fp32 -> bf16 rounds to nearest even; bf16 -> fp32 is exact).
  absl::StatusOr<Tensor> AsOperand(const Tensor& t, DType operands);

  // The device (cos, sin) table of `shape`, computed on the host by ref::RopeAngle so that both
  // backends rotate by identical angles. The last table is kept while the shape stays the same
  // (a whole evaluation; the q and k calls of one decoding step).
  absl::StatusOr<const float*> RopeTable(const RopeShape& shape);

  // Helpers of attention (cuda_backend_attention.cc).

  // Attention's checks (then the device is current).
  absl::Status CheckAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionShape& s, const Tensor& out);

  // AttentionBackward's checks (then the device is current).
  absl::Status CheckAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& dout, const AttentionShape& s, const Tensor& dq,
                                      const Tensor& dk, const Tensor& dv);

  // The backward kernels' fp32 scratch: the forward's statistics, then D = dout·out.
  absl::StatusOr<Tensor> AttentionBackwardScratch(const AttentionShape& s);

  // The tensor-core path: q, k and v rounded to bf16 into padded scratch copies, then the kernel.
  // With `saved`, the packed operands are kept there and each query's log2-sum-exp written.
  absl::Status AttentionBf16(const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttentionShape& s, Tensor& out, AttentionSaved* saved,
                             const RopeShape* rope = nullptr);

  // AttentionBackward with bf16 compute: q, k, v and dout packed to bf16 as AttentionBf16 packs
  // them, then the tensor-core kernels (P and dS rounded to bf16 where they enter a product).
  // With `saved` (AttentionBackwardSaved): its packed q, k and v, and the statistics already in
  // `scratch`.
  absl::Status AttentionBackwardBf16(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& dout, const AttentionShape& s, Tensor& scratch,
                                     const AttentionSaved* saved, Tensor& dq, Tensor& dk,
                                     Tensor& dv);

  // The solvers' context: this backend's device, stream, handles and pool
  // (cuda_backend_quant.cc).
  cuda::QuantContext SolverContext();

  const int device_;
  const ComputeDType dtype_;
  const int64_t memory_limit_;
  const std::string kind_;
  // Declared before the handles: they are destroyed first.
  cuda::CudaStream stream_;
  // Device-to-host copies that overlap the compute stream (CopyToHostAsync); made at first use.
  std::unique_ptr<cuda::CudaStream> copy_stream_;
  cuda::CublasHandle blas_;
  cuda::CusolverHandle solver_;
  std::shared_ptr<cuda::CachingAllocator> allocator_;
  std::shared_ptr<cuda::CachingAllocator> pinned_;
  RopeShape rope_key_;
  Tensor rope_table_;
  // SideBackend(): created on first use; destroyed first (it synchronizes its own stream).
  std::unique_ptr<Backend> side_;
};

}  // namespace qcal::kernels::cuda_internal
