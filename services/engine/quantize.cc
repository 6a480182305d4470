#include "services/engine/quantize.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <system_error>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "common/text_data.h"
#include "services/engine/aser/activation_stats.h"
#include "services/engine/aser/error_reconstruction.h"
#include "services/engine/aser/smoothing.h"

namespace qcal::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

absl::Status CheckFinite(const Tensor& host, const std::string& what) {
  const float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    if (!std::isfinite(p[i])) {
      return absl::InvalidArgumentError(absl::StrCat(what, " contains NaN or Inf"));
    }
  }
  return absl::OkStatus();
}

Tensor I32Tensor(const std::vector<int32_t>& v) {
  Tensor t = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(v.size())});
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

std::vector<int32_t> I32Vector(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return std::vector<int32_t>(p, p + t.numel());
}

// Device bytes one block needs besides its weights and the calibration activations: the largest
// statistics (a Gram sum and a per-chunk partial) plus the larger of the solver's scratch (the
// factorization, U, working copies of the weight, codes, the split errors) and the per-chunk
// forward temporaries (with their bf16 operand copies), and 1 GiB for library workspaces. A
// planning estimate for what to keep on the device, not a bound.
int64_t WorkingSetBytes(const ModelConfig& c, int64_t chunk_rows) {
  const int64_t d = c.hidden_size, f = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t n = std::max({d, f, qd});
  const int64_t w = std::max({f * d, qd * d});
  const int64_t stats = 2 * n * n * 4;
  const int64_t solve = 3 * n * n * 4 + w * 30;
  const int64_t forward = chunk_rows * (3 * d + 2 * qd + 2 * kvd + 3 * f) * 6;
  return stats + std::max(solve, forward) + (int64_t{1} << 30);
}

// Moves a device chunk of activations to pinned host memory when the device has less than
// `reserve` bytes available (device backends only; host backends plan no memory).
absl::Status ParkIfShort(kernels::Backend& be, Tensor& chunk, int64_t reserve) {
  if (be.device() == Device::kHost || chunk.device() == Device::kHost) return absl::OkStatus();
  const int64_t available = be.AvailableMemory();
  if (available < 0 || available >= reserve) return absl::OkStatus();
  QCAL_ASSIGN_OR_RETURN(Tensor host, be.AllocHost(chunk.dtype(), chunk.shape()));
  QCAL_RETURN_IF_ERROR(be.Copy(chunk, host));
  chunk = std::move(host);
  return absl::OkStatus();
}

// A QuantizedLinear from a device solve's results, with codes, scales and zeros already on the
// host.
QuantizedLinear ToQuantizedLinear(const kernels::QuantizedTensors& q, const QuantSpec& spec,
                                  const Tensor& codes, const Tensor& scales, const Tensor& zeros) {
  QuantizedLinear out;
  out.d_out = q.d_out;
  out.d_in = q.d_in;
  out.spec = spec;
  out.group_size = q.group_size;
  out.n_groups = q.n_groups;
  const uint8_t* c = codes.data<uint8_t>();
  out.codes.assign(c, c + codes.numel());
  const float* s = scales.data<float>();
  out.scales.assign(s, s + scales.numel());
  const int32_t* z = zeros.data<int32_t>();
  out.zeros.assign(z, z + zeros.numel());
  out.g_idx = q.g_idx;
  out.perm = q.perm;
  return out;
}

// Runs fn on a thread of its own when one can be started, else right here.
std::future<QuantizedLinear> RunAsync(const std::function<QuantizedLinear()>& fn) {
  try {
    return std::async(std::launch::async, fn);
  } catch (const std::system_error&) {
    std::promise<QuantizedLinear> done;
    done.set_value(fn());
    return done.get_future();
  }
}

absl::Status InstallWeight(Model& model, int b, LinearKind k, const QuantizedLinear& q) {
  Linear& lin = model.block(b).at(k);
  if (lin.weight.dim(0) != q.d_out || lin.weight.dim(1) != q.d_in) {
    return absl::InvalidArgumentError(absl::StrCat(LinearPrefix(b, k), ": quantized shape [",
                                                   q.d_out, ", ", q.d_in,
                                                   "] does not match the model"));
  }
  Tensor host = Tensor::FromVector(q.Dequantized(), {q.d_out, q.d_in});
  QCAL_ASSIGN_OR_RETURN(lin.weight, model.backend().ToDevice(host));
  return absl::OkStatus();
}

// The block tensor a folded-tensor name refers to: an RMSNorm weight or a linear's bias of block
// b. NotFound for any other name.
absl::StatusOr<Tensor*> FoldedTarget(Model& model, int b, const std::string& name) {
  BlockWeights& bw = model.block(b);
  const std::string p = absl::StrCat("model.layers.", b, ".");
  if (name == p + "input_layernorm.weight") return &bw.input_norm;
  if (name == p + "post_attention_layernorm.weight") return &bw.post_attention_norm;
  for (LinearKind k : kAllLinears) {
    if (name == LinearPrefix(b, k) + ".bias" && bw.at(k).bias.defined()) return &bw.at(k).bias;
  }
  return absl::NotFoundError(
      absl::StrCat("folded tensor ", name, " is not a norm or bias of block ", b));
}

// The low-rank branch, activation bits and folded tensors of a result (the weight is installed
// separately).
absl::Status InstallExtras(Model& model, int b, LinearKind k, const LayerResult& r) {
  Linear& lin = model.block(b).at(k);
  kernels::Backend& be = model.backend();
  const int64_t rank = r.report.rank;
  if (rank > 0) {
    const int64_t d_out = lin.weight.dim(0), d_in = lin.weight.dim(1);
    if (static_cast<int64_t>(r.lora_a.size()) != d_out * rank ||
        static_cast<int64_t>(r.lora_b.size()) != rank * d_in) {
      return absl::InvalidArgumentError(
          absl::StrCat(LinearPrefix(b, k), ": low-rank factors do not match rank ", rank));
    }
    QCAL_ASSIGN_OR_RETURN(lin.lora_a, be.ToDevice(Tensor::FromVector(r.lora_a, {d_out, rank})));
    QCAL_ASSIGN_OR_RETURN(lin.lora_b, be.ToDevice(Tensor::FromVector(r.lora_b, {rank, d_in})));
  } else {
    lin.lora_a = lin.lora_b = Tensor();
  }
  lin.act_bits = r.act_bits;
  for (const auto& [name, host] : r.folded) {
    QCAL_ASSIGN_OR_RETURN(Tensor * target, FoldedTarget(model, b, name));
    if (host.shape() != target->shape()) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": folded tensor has shape ", ShapeString(host.shape())));
    }
    QCAL_ASSIGN_OR_RETURN(*target, be.ToDevice(host));
  }
  return absl::OkStatus();
}

// out = w_hat + a·b (host, row-major [d_out][d_in]; a [d_out][r], b [r][d_in]).
std::vector<float> AddLowRank(const std::vector<float>& w_hat, const std::vector<float>& a,
                              const std::vector<float>& b, int64_t d_out, int64_t d_in, int64_t r) {
  std::vector<float> out = w_hat;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(d_out),
              static_cast<int>(d_in), static_cast<int>(r), 1.0f, a.data(), static_cast<int>(r),
              b.data(), static_cast<int>(d_in), 1.0f, out.data(), static_cast<int>(d_in));
  return out;
}

// Quantizes one block: statistics, solves and the push through the quantized block, on the host
// (the CPU reference solvers) or, when the backend has the solver ops, entirely on its device.
class BlockRun {
 public:
  BlockRun(Model& model, CalibActivations& acts, const Recipe& recipe, StageTimes& times)
      : model_(model),
        be_(model.backend()),
        acts_(acts),
        recipe_(recipe),
        t_(times),
        b_(acts.next_block),
        spec_(SpecOf(recipe)),
        device_solve_(be_.SupportsSolverOp(kernels::SolverOp::kGptq) &&
                      be_.SupportsSolverOp(kernels::SolverOp::kQuantizeRtn) &&
                      be_.SupportsSolverOp(kernels::SolverOp::kOutputError)) {
    gopt_.damp = recipe.gptq.damp;
    gopt_.block_size = recipe.gptq.block_size;
    gopt_.act_order = recipe.gptq.act_order;
    const ModelConfig& c = model.config();
    widths_ = {c.hidden_size, c.q_dim(), c.hidden_size, c.intermediate_size};
    const int64_t chunk_rows =
        acts.chunk_batch.empty() ? 0 : int64_t(acts.chunk_batch[0]) * acts.seq_len;
    reserve_ = WorkingSetBytes(model.config(), chunk_rows);
  }

  absl::StatusOr<std::vector<LayerResult>> Run() {
    for (size_t c = acts_.chunks.size(); c-- > 0;) {
      QCAL_RETURN_IF_ERROR(ParkIfShort(be_, acts_.chunks[c], reserve_));
    }
    clock_ = Clock::now();
    if (recipe_.smoothing.enabled()) QCAL_RETURN_IF_ERROR(Smooth());
    QCAL_RETURN_IF_ERROR(recipe_.gptq.true_sequential ? Staged() : TwoPass());
    for (size_t i = 0; i < pending_.size(); ++i) results_[i].quantized = pending_[i].get();
    if (!pending_.empty()) {
      const double before = t_.transfer;
      QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
      t_.solve += t_.transfer - before;
    }
    acts_.next_block = b_ + 1;
    return std::move(results_);
  }

 private:
  // Adds the time since the last charge to `slot`, once the device has done the work queued
  // meanwhile.
  absl::Status Charge(double& slot) {
    QCAL_RETURN_IF_ERROR(be_.Synchronize());
    const auto now = Clock::now();
    slot += std::chrono::duration<double>(now - clock_).count();
    clock_ = now;
    return absl::OkStatus();
  }

  SeqShape ShapeOf(size_t c) const { return SeqShape{acts_.chunk_batch[c], acts_.seq_len, 0}; }

  // Chunk c's hidden state on the device: the chunk itself, or a device copy of a parked one.
  absl::StatusOr<Tensor> Fetch(size_t c) {
    const Tensor& chunk = acts_.chunks[c];
    if (chunk.device() == be_.device()) return chunk;
    QCAL_ASSIGN_OR_RETURN(Tensor d, be_.Alloc(chunk.dtype(), chunk.shape()));
    QCAL_RETURN_IF_ERROR(be_.Copy(chunk, d));
    return d;
  }
  // Writes back a hidden state that Fetch copied from a parked chunk.
  absl::Status Store(size_t c, const Tensor& h) {
    if (acts_.chunks[c].device() == be_.device()) return absl::OkStatus();
    return be_.Copy(h, acts_.chunks[c]);
  }
  // Whether an intermediate may stay on the device for a later stage (else it is recomputed).
  bool KeepOnDevice() {
    const int64_t available = be_.AvailableMemory();
    return available < 0 || available >= reserve_;
  }

  absl::StatusOr<Tensor> NewGram(LinearInput in) {
    const int64_t width = model_.block(b_).at(ConsumersOf(in)[0]).weight.dim(1);
    return be_.Alloc(DType::kF32, {width, width});
  }
  // sum += xᵀx through a zeroed per-chunk partial, so that sums run in chunk order whatever the
  // split of chunks across workers. With LQER's diagonal whitening, also the mean |x| per channel.
  absl::Status Accumulate(LinearInput in, Tensor& sum, const Tensor& x) {
    QCAL_ASSIGN_OR_RETURN(Tensor partial, be_.Alloc(DType::kF32, sum.shape()));
    QCAL_RETURN_IF_ERROR(be_.AccumulateGram(x, partial));
    QCAL_RETURN_IF_ERROR(be_.Add(partial, sum));
    if (recipe_.error_reconstruction.enabled &&
        recipe_.error_reconstruction.whitening == Whitening::kDiagonal) {
      QCAL_RETURN_IF_ERROR(Observe(path_stats_, in, x));
    }
    return absl::OkStatus();
  }

  // Adds x (one chunk of input `in`) to stats[in], created on first use.
  absl::Status Observe(std::array<std::unique_ptr<ActivationStats>, kNumLinearInputs>& stats,
                       LinearInput in, const Tensor& x) {
    auto& s = stats[static_cast<int>(in)];
    if (!s) s = std::make_unique<ActivationStats>(widths_[static_cast<int>(in)]);
    if (SmoothingOnDevice(be_)) {
      // On the device: only the per-channel totals come back.
      QCAL_ASSIGN_OR_RETURN(kernels::ChannelStats c, be_.ChannelAbsStats(x, acts_.seq_len));
      if (c.first_bad_column >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("block ", b_, ": activation statistics: channel ", c.first_bad_column,
                         " of a linear input holds a value that is not finite"));
      }
      return Annotate(s->AddTotals(c.max_abs, c.sum_abs, c.tokens, c.skipped),
                      absl::StrCat("block ", b_));
    }
    QCAL_ASSIGN_OR_RETURN(Tensor host, be_.ToHost(x));
    return Annotate(s->Accumulate(host.data<float>(), host.dim(0), host.dim(1), acts_.seq_len),
                    absl::StrCat("block ", b_));
  }

  // Smoothing (DESIGN section 3): per-channel statistics of every input of the full-precision
  // block, the scales of every input, and their exact fold into the block. The changed norm
  // weights and biases are rounded to the checkpoint's dtype (the exported values) and recorded
  // for the artifacts.
  absl::Status Smooth() {
    // Name a bad weight before its NaNs reach the statistics (on the device where it can).
    for (LinearKind k : kAllLinears) {
      const Tensor& weight = model_.block(b_).at(k).weight;
      if (SmoothingOnDevice(be_)) {
        QCAL_ASSIGN_OR_RETURN(kernels::ChannelStats c, be_.ChannelAbsStats(weight, 0));
        if (c.first_bad_column >= 0) {
          return absl::InvalidArgumentError(absl::StrCat("weight ", LinearPrefix(b_, k),
                                                         ": column ", c.first_bad_column,
                                                         " holds a value that is not finite"));
        }
        continue;
      }
      QCAL_ASSIGN_OR_RETURN(Tensor w, be_.ToHost(weight));
      QCAL_RETURN_IF_ERROR(CheckFinite(w, absl::StrCat("weight ", LinearPrefix(b_, k))));
    }
    std::array<std::unique_ptr<ActivationStats>, kNumLinearInputs> stats;
    for (size_t c = 0; c < acts_.chunks.size(); ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      Tensor hidden;
      if (be_.device() == Device::kHost) {
        hidden = h.Clone();
      } else {
        QCAL_ASSIGN_OR_RETURN(hidden, be_.Alloc(DType::kF32, h.shape()));
        QCAL_RETURN_IF_ERROR(be_.Copy(h, hidden));
      }
      auto tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
        QCAL_RETURN_IF_ERROR(Observe(stats, in, x));
        if (in == LinearInput::kDown) return absl::CancelledError("statistics taken");
        return absl::OkStatus();
      };
      QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, hidden, ShapeOf(c), nullptr, tap));
    }
    SmoothingOptions so;
    so.method = recipe_.smoothing.method;
    so.alpha = recipe_.smoothing.alpha;
    so.outlier_channels = recipe_.smoothing.outlier_channels;
    std::array<const ActivationStats*, kNumLinearInputs> ptrs{};
    for (int i = 0; i < kNumLinearInputs; ++i) ptrs[i] = stats[i].get();
    BlockWeights& bw = model_.block(b_);
    auto scales = ComputeBlockSmoothing(be_, bw, model_.config(), ptrs, so);
    if (!scales.ok()) return Annotate(scales.status(), absl::StrCat("smoothing of block ", b_));
    smoothing_ = *std::move(scales);
    QCAL_RETURN_IF_ERROR(Annotate(FoldBlockSmoothing(be_, model_.config(), smoothing_, bw),
                                  absl::StrCat("smoothing of block ", b_)));
    const std::string p = absl::StrCat("model.layers.", b_, ".");
    if (!smoothing_.at(LinearInput::kQkv).m.empty()) {
      QCAL_RETURN_IF_ERROR(
          RoundFolded(LinearKind::kQ, p + "input_layernorm.weight", bw.input_norm));
    }
    if (!smoothing_.at(LinearInput::kGateUp).m.empty()) {
      QCAL_RETURN_IF_ERROR(RoundFolded(LinearKind::kGate, p + "post_attention_layernorm.weight",
                                       bw.post_attention_norm));
    }
    for (auto [in, k] : {std::pair{LinearInput::kO, LinearKind::kV},
                         std::pair{LinearInput::kDown, LinearKind::kUp}}) {
      if (!smoothing_.at(in).m.empty() && bw.at(k).bias.defined()) {
        QCAL_RETURN_IF_ERROR(RoundFolded(k, LinearPrefix(b_, k) + ".bias", bw.at(k).bias));
      }
    }
    return Charge(t_.smooth);
  }

  // Rounds a folded tensor to its checkpoint dtype in place and records it for kind's artifact.
  absl::Status RoundFolded(LinearKind kind, const std::string& name, Tensor& t) {
    QCAL_ASSIGN_OR_RETURN(Tensor host, be_.ToHost(t));
    host = host.Clone();
    const DType dtype = model_.SourceDType(name);
    if (dtype != DType::kF32) {
      QCAL_ASSIGN_OR_RETURN(Tensor stored, host.ConvertTo(dtype));
      QCAL_ASSIGN_OR_RETURN(host, stored.ToF32());
      QCAL_ASSIGN_OR_RETURN(t, be_.ToDevice(host));
    }
    folded_[static_cast<int>(kind)][name] = host;
    return absl::OkStatus();
  }

  // The attention output of chunk c's current hidden state h.
  absl::StatusOr<Tensor> AttentionOf(const Tensor& h, size_t c) {
    QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kQkv));
    return model_.AttentionOutput(b_, x, ShapeOf(c));
  }
  // The MLP product of the post-attention hidden state h.
  absl::StatusOr<Tensor> MlpOf(const Tensor& h) {
    QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kGateUp));
    return model_.MlpProduct(b_, x);
  }

  // True-sequential: each sub-layer group's statistics are taken with the earlier groups already
  // quantized, and the block runs once in stages (model.h) instead of from its start for every
  // group. The attention outputs and MLP products of one stage feed the next when they fit on the
  // device, and are recomputed from the chunk's hidden state otherwise; the hidden states advance
  // in place (to the post-attention residual, then to the block output).
  absl::Status Staged() {
    const size_t chunks = acts_.chunks.size();
    std::vector<Tensor> kept(chunks);
    // q/k/v: the normed block input.
    QCAL_ASSIGN_OR_RETURN(Tensor gram, NewGram(LinearInput::kQkv));
    for (size_t c = 0; c < chunks; ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kQkv));
      QCAL_RETURN_IF_ERROR(Charge(t_.forward));
      QCAL_RETURN_IF_ERROR(Accumulate(LinearInput::kQkv, gram, x));
      QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
    }
    QCAL_RETURN_IF_ERROR(Solve(LinearInput::kQkv, gram));
    // o: the attention output through the quantized q/k/v.
    QCAL_ASSIGN_OR_RETURN(gram, NewGram(LinearInput::kO));
    for (size_t c = 0; c < chunks; ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      QCAL_ASSIGN_OR_RETURN(Tensor a, AttentionOf(h, c));
      QCAL_RETURN_IF_ERROR(Charge(t_.forward));
      QCAL_RETURN_IF_ERROR(Accumulate(LinearInput::kO, gram, a));
      QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
      if (KeepOnDevice()) kept[c] = std::move(a);
    }
    QCAL_RETURN_IF_ERROR(Solve(LinearInput::kO, gram));
    // gate/up: the normed post-attention residual.
    QCAL_ASSIGN_OR_RETURN(gram, NewGram(LinearInput::kGateUp));
    for (size_t c = 0; c < chunks; ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      Tensor a = std::move(kept[c]);
      if (!a.defined()) {
        QCAL_ASSIGN_OR_RETURN(a, AttentionOf(h, c));
      }
      QCAL_RETURN_IF_ERROR(model_.AddProjection(b_, LinearKind::kO, a, h));
      a = Tensor();
      QCAL_RETURN_IF_ERROR(Store(c, h));
      QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kGateUp));
      QCAL_RETURN_IF_ERROR(Charge(t_.forward));
      QCAL_RETURN_IF_ERROR(Accumulate(LinearInput::kGateUp, gram, x));
      QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
    }
    QCAL_RETURN_IF_ERROR(Solve(LinearInput::kGateUp, gram));
    // down: the MLP product through the quantized gate/up.
    QCAL_ASSIGN_OR_RETURN(gram, NewGram(LinearInput::kDown));
    for (size_t c = 0; c < chunks; ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      QCAL_ASSIGN_OR_RETURN(Tensor m, MlpOf(h));
      QCAL_RETURN_IF_ERROR(Charge(t_.forward));
      QCAL_RETURN_IF_ERROR(Accumulate(LinearInput::kDown, gram, m));
      QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
      if (KeepOnDevice()) kept[c] = std::move(m);
    }
    QCAL_RETURN_IF_ERROR(Solve(LinearInput::kDown, gram));
    gram = Tensor();
    // The block output: the next block's input.
    for (size_t c = 0; c < chunks; ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      Tensor m = std::move(kept[c]);
      if (!m.defined()) {
        QCAL_ASSIGN_OR_RETURN(m, MlpOf(h));
      }
      QCAL_RETURN_IF_ERROR(model_.AddProjection(b_, LinearKind::kDown, m, h));
      QCAL_RETURN_IF_ERROR(Store(c, h));
    }
    return Charge(t_.forward);
  }

  // Without true-sequential: every statistic from the full-precision block, then all solves, then
  // the push through the quantized block.
  absl::Status TwoPass() {
    std::map<LinearInput, Tensor> grams;
    for (LinearInput in :
         {LinearInput::kQkv, LinearInput::kO, LinearInput::kGateUp, LinearInput::kDown}) {
      QCAL_ASSIGN_OR_RETURN(grams[in], NewGram(in));
    }
    for (size_t c = 0; c < acts_.chunks.size(); ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      Tensor hidden;
      if (be_.device() == Device::kHost) {
        hidden = h.Clone();
      } else {
        QCAL_ASSIGN_OR_RETURN(hidden, be_.Alloc(DType::kF32, h.shape()));
        QCAL_RETURN_IF_ERROR(be_.Copy(h, hidden));
      }
      auto tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
        QCAL_RETURN_IF_ERROR(Charge(t_.forward));
        QCAL_RETURN_IF_ERROR(Accumulate(in, grams[in], x));
        QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
        // Stop the forward once the last input has been seen.
        if (in == LinearInput::kDown) return absl::CancelledError("statistics taken");
        return absl::OkStatus();
      };
      QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, hidden, ShapeOf(c), nullptr, tap));
    }
    for (auto& [in, gram] : grams) QCAL_RETURN_IF_ERROR(Solve(in, gram));
    grams.clear();
    for (size_t c = 0; c < acts_.chunks.size(); ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
      QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, h, ShapeOf(c)));
      QCAL_RETURN_IF_ERROR(Store(c, h));
    }
    return Charge(t_.forward);
  }

  // Solves every linear reading `in` with its Gram matrix and installs the quantized weights.
  absl::Status Solve(LinearInput in, const Tensor& gram) {
    QCAL_RETURN_IF_ERROR(Charge(t_.forward));
    const double before = t_.factor + t_.quantize + t_.error + t_.transfer + t_.reconstruct;
    QCAL_RETURN_IF_ERROR(device_solve_ ? SolveOnDevice(in, gram) : SolveOnHost(in, gram));
    QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
    t_.solve += t_.factor + t_.quantize + t_.error + t_.transfer + t_.reconstruct - before;
    return absl::OkStatus();
  }

  // A host copy of a device result, in the backend's transfer memory.
  absl::StatusOr<Tensor> Download(const Tensor& t) {
    QCAL_ASSIGN_OR_RETURN(Tensor host, be_.AllocHost(t.dtype(), t.shape()));
    QCAL_RETURN_IF_ERROR(be_.Copy(t, host));
    return host;
  }

  LayerResult NewResult(LinearKind k, int64_t d_out, int64_t d_in) const {
    LayerResult r;
    r.report.block = b_;
    r.report.kind = k;
    r.report.name = LinearPrefix(b_, k);
    r.report.d_out = d_out;
    r.report.d_in = d_in;
    return r;
  }

  // The columns ASER extracted from input `in` (empty otherwise).
  const std::vector<int32_t>& OutliersOf(LinearInput in) const {
    return smoothing_.at(in).outliers;
  }

  // The whitening factor of input `in` for error reconstruction, from its Gram matrix (host) or
  // its quantized-path statistics.
  absl::StatusOr<WhiteningFactor> WhiteningOf(LinearInput in, const Tensor& gram_host) {
    const Whitening kind = recipe_.error_reconstruction.whitening;
    const int64_t n = gram_host.dim(0);
    if (kind == Whitening::kCholesky) {
      auto f = CholeskyWhitening<float>(gram_host.data<float>(), n, recipe_.gptq.damp);
      if (!f.ok()) {
        return Annotate(f.status(),
                        absl::StrCat("whitening of block ", b_, " (", RecipeName(kind), ")"));
      }
      return f;
    }
    if (kind == Whitening::kDiagonal) {
      const auto& st = path_stats_[static_cast<int>(in)];
      if (!st) return absl::InternalError("diagonal whitening without activation statistics");
      return DiagonalWhitening(st->MeanAbs());
    }
    return IdentityWhitening(n);
  }

  // ASER's extracted columns are restored by the low-rank branch only: a fixed rank (after
  // clamping) below their number is an error naming the layer.
  absl::Status CheckOutliersFitRank(LinearInput in, const LayerResult& r) const {
    const int rank = recipe_.error_reconstruction.rank;
    const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
    const int64_t outliers = static_cast<int64_t>(OutliersOf(in).size());
    if (rank == kRecipeAutoRank || outliers <= std::min<int64_t>(rank, std::min(d_out, d_in))) {
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(
        r.report.name, ": recipe key \"smoothing.outlier_channels\" extracts ", outliers,
        " columns, more than the rank ", std::min<int64_t>(rank, std::min(d_out, d_in)),
        " of this ", d_out, "x", d_in, " layer can restore"));
  }

  // Error reconstruction runs on the device when the backend has the ops.
  bool DeviceReconstruction() const {
    return recipe_.error_reconstruction.enabled &&
           be_.SupportsSolverOp(kernels::SolverOp::kErrorReconstruction);
  }

  // The device whitening factor of input `in` (Backend::ReconstructError's `whitening`):
  // Cholesky of the device Gram matrix, LQER's mean |x| uploaded, or undefined for plain SVD.
  absl::StatusOr<Tensor> DeviceWhiteningOf(LinearInput in, const Tensor& gram) {
    const Whitening kind = recipe_.error_reconstruction.whitening;
    if (kind == Whitening::kCholesky) {
      auto s = be_.CholeskyWhitening(gram, recipe_.gptq.damp);
      if (!s.ok()) {
        return Annotate(s.status(),
                        absl::StrCat("whitening of block ", b_, " (", RecipeName(kind), ")"));
      }
      return s;
    }
    if (kind == Whitening::kDiagonal) {
      const auto& st = path_stats_[static_cast<int>(in)];
      if (!st) return absl::InternalError("diagonal whitening without activation statistics");
      QCAL_ASSIGN_OR_RETURN(const WhiteningFactor f, DiagonalWhitening(st->MeanAbs()));
      const std::vector<float> s(f.factor.begin(), f.factor.end());
      return be_.ToDevice(Tensor::FromVector(s, {f.d_in}));
    }
    return Tensor();
  }

  // The engine's options for error reconstruction of a linear fed by `in`.
  ErrorReconstructionOptions ErOptions(LinearInput in) const {
    const ErrorReconstructionRecipe& er = recipe_.error_reconstruction;
    ErrorReconstructionOptions opt;
    opt.rank = er.rank == kRecipeAutoRank ? kAutoRank : er.rank;
    opt.energy = er.energy;
    opt.max_extra_params = er.max_extra_params;
    opt.min_rank = static_cast<int>(OutliersOf(in).size());
    return opt;
  }

  // Error reconstruction of one linear on the device with the randomized SVD: the factors are
  // fitted and the corrected layer's output error measured there; only the factors come back to
  // the host. Rank auto computes the largest rank the rule allows (MaxRank), applies ChooseRank to
  // those leading singular values plus one value carrying the rest of ‖E·S‖_F², and keeps the
  // leading columns of L_A and rows of L_B (the best rank-r factors within the sketch).
  absl::Status ReconstructOnDevice(LinearInput in, const Tensor& w, const Tensor& w_hat,
                                   const Tensor& gram, const Tensor& whitening, double denom,
                                   LayerResult& r) {
    QCAL_RETURN_IF_ERROR(CheckOutliersFitRank(in, r));
    const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
    const ErrorReconstructionOptions eopt = ErOptions(in);
    kernels::LowRankOptions opt;
    opt.rank = static_cast<int>(MaxRank(d_out, d_in, eopt));
    opt.svd = kernels::SvdMethod::kRandomized;
    auto lr = be_.ReconstructError(w, w_hat, whitening, opt);
    if (!lr.ok()) return Annotate(lr.status(), r.report.name);
    QCAL_ASSIGN_OR_RETURN(Tensor a_all, be_.ToHost(lr->a));
    QCAL_ASSIGN_OR_RETURN(Tensor b_all, be_.ToHost(lr->b));
    const int64_t computed = lr->rank;
    int64_t rank = computed;
    double error_after = lr->error_after;
    if (eopt.rank == kAutoRank) {
      std::vector<double> sigma = lr->singular_values;
      double kept = 0;
      for (double v : sigma) kept += v * v;
      const double total = lr->error_before * lr->error_before;
      sigma.push_back(std::sqrt(std::max(0.0, total - kept)));
      rank = std::min(ChooseRank(sigma, d_out, d_in, eopt), computed);
      double kept_r = 0;
      for (int64_t i = 0; i < rank; ++i) kept_r += sigma[i] * sigma[i];
      error_after = std::sqrt(std::max(0.0, total - kept_r));
    }
    r.report.rank = static_cast<int>(rank);
    r.report.whitened_error_before = lr->error_before;
    r.report.whitened_error_after = error_after;
    r.report.extra_params = static_cast<double>(rank * (d_out + d_in)) /
                            (static_cast<double>(d_out) * static_cast<double>(d_in));
    // L_A's leading `rank` columns and L_B's leading `rank` rows.
    r.lora_a.resize(static_cast<size_t>(d_out * rank));
    for (int64_t o = 0; o < d_out; ++o) {
      std::copy_n(a_all.data<float>() + o * computed, rank, r.lora_a.begin() + o * rank);
    }
    r.lora_b.assign(b_all.data<float>(), b_all.data<float>() + rank * d_in);
    Tensor a = lr->a, b = lr->b;
    if (rank != computed) {
      QCAL_ASSIGN_OR_RETURN(a, be_.ToDevice(Tensor::FromVector(r.lora_a, {d_out, rank})));
      QCAL_ASSIGN_OR_RETURN(b, be_.ToDevice(Tensor::FromVector(r.lora_b, {rank, d_in})));
    }
    QCAL_ASSIGN_OR_RETURN(Tensor w_eff, be_.Alloc(DType::kF32, w_hat.shape()));
    QCAL_RETURN_IF_ERROR(be_.Copy(w_hat, w_eff));
    QCAL_RETURN_IF_ERROR(be_.AddLowRank(a, b, w_eff));
    QCAL_ASSIGN_OR_RETURN(const double error, be_.OutputError(w, w_eff, gram));
    r.report.rel_error_er = error / denom;
    return absl::OkStatus();
  }

  // Error reconstruction of one linear on the host (DESIGN section 3): E = w − w_hat, where w is
  // W' (smoothed) and w_hat the dequantized Q(W'_normal); fills the factors and the report.
  absl::Status Reconstruct(LinearInput in, const float* w, const std::vector<float>& w_hat,
                           const Tensor& gram_host, const WhiteningFactor& whitening, double denom,
                           LayerResult& r) {
    const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
    const ErrorReconstructionOptions opt = ErOptions(in);
    QCAL_RETURN_IF_ERROR(CheckOutliersFitRank(in, r));
    auto lr = ReconstructError<float>(w, w_hat.data(), d_out, d_in, whitening, opt);
    if (!lr.ok()) return Annotate(lr.status(), r.report.name);
    r.report.rank = lr->rank;
    r.report.whitened_error_before = lr->error_before;
    r.report.whitened_error_after = lr->error_after;
    r.report.extra_params =
        static_cast<double>(lr->extra_params()) / (static_cast<double>(d_out) * d_in);
    const std::vector<float> w_eff = AddLowRank(w_hat, lr->a, lr->b, d_out, d_in, lr->rank);
    r.report.rel_error_er =
        OutputError(w, w_eff.data(), gram_host.data<float>(), d_out, d_in) / denom;
    r.lora_a = std::move(lr->a);
    r.lora_b = std::move(lr->b);
    return absl::OkStatus();
  }

  // The CPU reference: statistics and weights copied to the host, solved there.
  absl::Status SolveOnHost(LinearInput in, const Tensor& gram_device) {
    BlockWeights& bw = model_.block(b_);
    QCAL_ASSIGN_OR_RETURN(Tensor gram, be_.ToHost(gram_device));
    QCAL_RETURN_IF_ERROR(CheckFinite(gram, absl::StrCat("calibration statistics of block ", b_)));
    QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
    const std::vector<int32_t>& outliers = OutliersOf(in);
    std::optional<WhiteningFactor> whitening;
    if (recipe_.error_reconstruction.enabled) {
      QCAL_ASSIGN_OR_RETURN(whitening, WhiteningOf(in, gram));
      QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
    }
    for (LinearKind k : ConsumersOf(in)) {
      const auto t0 = Clock::now();
      const std::string name = LinearPrefix(b_, k);
      QCAL_ASSIGN_OR_RETURN(Tensor w, be_.ToHost(bw.at(k).weight));
      QCAL_RETURN_IF_ERROR(CheckFinite(w, absl::StrCat("weight ", name)));
      QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
      const int64_t d_out = w.dim(0), d_in = w.dim(1);
      LayerResult r = NewResult(k, d_out, d_in);
      // The part that is quantized: W' with ASER's extracted columns zeroed.
      std::vector<float> w_normal;
      const float* wq = w.data<float>();
      if (!outliers.empty()) {
        QCAL_ASSIGN_OR_RETURN(w_normal, ZeroColumns(wq, d_out, d_in, outliers));
        wq = w_normal.data();
      }
      QCAL_ASSIGN_OR_RETURN(QuantizedLinear rtn, QuantizeRtn<float>(wq, d_out, d_in, spec_));
      if (recipe_.method == QuantMethod::kGptq) {
        GptqOptions gopt;
        gopt.damp = gopt_.damp;
        gopt.block_size = gopt_.block_size;
        gopt.act_order = gopt_.act_order;
        gopt.outlier_columns = outliers;
        GptqStats stats;
        auto q = QuantizeGptq<float>(w.data<float>(), gram.data<float>(), d_out, d_in, spec_, gopt,
                                     &stats);
        if (!q.ok()) return Annotate(q.status(), name);
        r.quantized = std::move(q).value();
        r.report.dead_columns = stats.dead_columns;
        r.report.damp_used = stats.damp_used;
      } else {
        r.quantized = rtn;
      }
      r.report.outlier_columns = static_cast<int>(outliers.size());
      QCAL_RETURN_IF_ERROR(Charge(t_.quantize));
      const std::vector<float> w_hat = r.quantized.Dequantized();
      const std::vector<float> w_rtn = rtn.Dequantized();
      const std::vector<float> zeros(static_cast<size_t>(d_out * d_in), 0.0f);
      const double norm =
          OutputError(w.data<float>(), zeros.data(), gram.data<float>(), d_out, d_in);
      const double denom = norm > 0 ? norm : 1.0;
      r.report.rel_error =
          OutputError(w.data<float>(), w_hat.data(), gram.data<float>(), d_out, d_in) / denom;
      r.report.rel_error_rtn =
          OutputError(w.data<float>(), w_rtn.data(), gram.data<float>(), d_out, d_in) / denom;
      QCAL_RETURN_IF_ERROR(Charge(t_.error));
      if (whitening) {
        QCAL_RETURN_IF_ERROR(Reconstruct(in, w.data<float>(), w_hat, gram, *whitening, denom, r));
        QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
      }
      r.act_bits = recipe_.activations.bits;
      r.folded = folded_[static_cast<int>(k)];
      QCAL_RETURN_IF_ERROR(InstallWeight(model_, b_, k, r.quantized));
      QCAL_RETURN_IF_ERROR(InstallExtras(model_, b_, k, r));
      QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
      r.report.solve_seconds = Since(t0);
      results_.push_back(std::move(r));
    }
    return absl::OkStatus();
  }

  // On the device: one factorization per input shared by its consumers; the weights never leave
  // the device (the dequantized result replaces them there). Only codes, scales and zeros are
  // copied to the host; their conversion into QuantizedLinear runs on a host thread while the
  // device goes on with the next stage. Error reconstruction runs on the device too (randomized
  // SVD, ReconstructOnDevice) when the backend has it, else on the host (LAPACK) with the weight,
  // its quantized form and the statistics copied there.
  absl::Status SolveOnDevice(LinearInput in, const Tensor& gram) {
    BlockWeights& bw = model_.block(b_);
    const std::vector<LinearKind> consumers = ConsumersOf(in);
    const bool gptq = recipe_.method == QuantMethod::kGptq;
    const std::vector<int32_t>& outliers = OutliersOf(in);
    auto t0 = Clock::now();
    kernels::GptqFactor factor;
    kernels::GptqSolveOptions gopt = gopt_;
    gopt.outlier_columns = outliers;
    if (gptq) {
      auto f = be_.GptqFactorize(gram, gopt);
      if (!f.ok()) return Annotate(f.status(), LinearPrefix(b_, consumers[0]));
      factor = std::move(f).value();
      QCAL_RETURN_IF_ERROR(Charge(t_.factor));
    }
    Tensor gram_host;
    std::optional<WhiteningFactor> whitening;
    const bool device_er = DeviceReconstruction();
    Tensor device_whitening;
    if (device_er) {
      QCAL_ASSIGN_OR_RETURN(device_whitening, DeviceWhiteningOf(in, gram));
      QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
    } else if (recipe_.error_reconstruction.enabled) {
      QCAL_ASSIGN_OR_RETURN(gram_host, be_.ToHost(gram));
      QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
      QCAL_ASSIGN_OR_RETURN(whitening, WhiteningOf(in, gram_host));
      QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
    }
    for (LinearKind k : consumers) {
      const std::string name = LinearPrefix(b_, k);
      Linear& lin = bw.at(k);
      const Tensor w = lin.weight;
      LayerResult r = NewResult(k, w.dim(0), w.dim(1));
      Tensor w_normal = w;
      if (!outliers.empty() && SmoothingOnDevice(be_)) {
        // A copy with the extracted columns multiplied by 0, on the device.
        std::vector<float> keep(static_cast<size_t>(w.dim(1)), 1.0f);
        for (int32_t j : outliers) keep[j] = 0.0f;
        QCAL_ASSIGN_OR_RETURN(Tensor mask, be_.ToDevice(Tensor::FromVector(keep, {w.dim(1)})));
        QCAL_ASSIGN_OR_RETURN(w_normal, be_.Alloc(DType::kF32, w.shape()));
        QCAL_RETURN_IF_ERROR(be_.Copy(w, w_normal));
        QCAL_RETURN_IF_ERROR(be_.ScaleColumns(w_normal, mask));
      } else if (!outliers.empty()) {
        QCAL_ASSIGN_OR_RETURN(Tensor host, be_.ToHost(w));
        QCAL_ASSIGN_OR_RETURN(std::vector<float> zeroed,
                              ZeroColumns(host.data<float>(), w.dim(0), w.dim(1), outliers));
        QCAL_ASSIGN_OR_RETURN(w_normal, be_.ToDevice(Tensor::FromVector(zeroed, w.shape())));
      }
      auto rtn = be_.QuantizeRtn(w_normal, spec_);
      if (!rtn.ok()) return Annotate(rtn.status(), name);
      kernels::QuantizedTensors q = *rtn;
      if (gptq) {
        auto solved = be_.GptqSolve(w, factor, spec_, gopt_.block_size);
        if (!solved.ok()) return Annotate(solved.status(), name);
        q = std::move(solved).value();
        r.report.dead_columns = factor.dead_columns;
        r.report.damp_used = factor.damp_used;
      }
      r.report.outlier_columns = static_cast<int>(outliers.size());
      QCAL_RETURN_IF_ERROR(Charge(t_.quantize));
      QCAL_ASSIGN_OR_RETURN(const double norm, be_.OutputError(w, Tensor(), gram));
      if (!std::isfinite(norm)) {
        return absl::InvalidArgumentError(
            absl::StrCat("calibration statistics of block ", b_, " contain NaN or Inf"));
      }
      const double denom = norm > 0 ? norm : 1.0;
      QCAL_ASSIGN_OR_RETURN(const double error, be_.OutputError(w, q.dequantized, gram));
      double error_rtn = error;
      if (gptq) {
        QCAL_ASSIGN_OR_RETURN(error_rtn, be_.OutputError(w, rtn->dequantized, gram));
      }
      r.report.rel_error = error / denom;
      r.report.rel_error_rtn = error_rtn / denom;
      QCAL_RETURN_IF_ERROR(Charge(t_.error));
      if (device_er) {
        QCAL_RETURN_IF_ERROR(
            ReconstructOnDevice(in, w, q.dequantized, gram, device_whitening, denom, r));
        QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
      } else if (whitening) {
        QCAL_ASSIGN_OR_RETURN(Tensor w_host, be_.ToHost(w));
        QCAL_ASSIGN_OR_RETURN(Tensor w_hat_host, be_.ToHost(q.dequantized));
        const float* wh = w_hat_host.data<float>();
        const std::vector<float> w_hat(wh, wh + w_hat_host.numel());
        QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
        QCAL_RETURN_IF_ERROR(
            Reconstruct(in, w_host.data<float>(), w_hat, gram_host, *whitening, denom, r));
        QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
      }
      QCAL_ASSIGN_OR_RETURN(Tensor codes, Download(q.codes));
      QCAL_ASSIGN_OR_RETURN(Tensor scales, Download(q.scales));
      QCAL_ASSIGN_OR_RETURN(Tensor zeros, Download(q.zeros));
      lin.weight = q.dequantized;
      r.act_bits = recipe_.activations.bits;
      r.folded = folded_[static_cast<int>(k)];
      QCAL_RETURN_IF_ERROR(InstallExtras(model_, b_, k, r));
      q.codes = q.scales = q.zeros = q.dequantized = Tensor();
      const QuantSpec spec = spec_;
      pending_.push_back(RunAsync([q, spec, codes, scales, zeros] {
        return ToQuantizedLinear(q, spec, codes, scales, zeros);
      }));
      QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
      const auto now = Clock::now();
      r.report.solve_seconds = std::chrono::duration<double>(now - t0).count();
      t0 = now;
      results_.push_back(std::move(r));
    }
    return absl::OkStatus();
  }

  Model& model_;
  kernels::Backend& be_;
  CalibActivations& acts_;
  const Recipe& recipe_;
  StageTimes& t_;
  const int b_;
  const QuantSpec spec_;
  const bool device_solve_;
  kernels::GptqSolveOptions gopt_;
  // Channels of each linear input (LinearInput order).
  std::array<int64_t, kNumLinearInputs> widths_{};
  // Smoothing of this block (empty scales: none) and the tensors its fold changed, per linear.
  BlockSmoothing smoothing_;
  std::array<std::map<std::string, Tensor>, kNumLinears> folded_;
  // Quantized-path activation statistics (LQER's diagonal whitening only).
  std::array<std::unique_ptr<ActivationStats>, kNumLinearInputs> path_stats_;
  int64_t reserve_ = 0;
  Clock::time_point clock_;
  std::vector<LayerResult> results_;
  // Host conversions of device results, by index into results_ (device path only).
  std::vector<std::future<QuantizedLinear>> pending_;
};

}  // namespace

QuantSpec SpecOf(const Recipe& recipe) {
  QuantSpec spec;
  spec.bits = recipe.weights.bits;
  spec.group_size = recipe.weights.group_size;
  spec.symmetric = recipe.weights.symmetric;
  spec.grid = recipe.weights.grid;
  return spec;
}

absl::StatusOr<CalibActivations> EmbedCalibration(Model& model,
                                                  const std::vector<std::vector<int>>& samples) {
  if (samples.empty()) return absl::InvalidArgumentError("no calibration samples");
  CalibActivations acts;
  acts.seq_len = static_cast<int>(samples[0].size());
  for (const auto& s : samples) {
    if (static_cast<int>(s.size()) != acts.seq_len) {
      return absl::InvalidArgumentError("calibration samples must have equal length");
    }
  }
  const int64_t reserve = WorkingSetBytes(model.config(), int64_t{kCalibChunk} * acts.seq_len);
  for (size_t c0 = 0; c0 < samples.size(); c0 += kCalibChunk) {
    const size_t c1 = std::min(samples.size(), c0 + kCalibChunk);
    std::vector<int> ids;
    for (size_t i = c0; i < c1; ++i) ids.insert(ids.end(), samples[i].begin(), samples[i].end());
    QCAL_ASSIGN_OR_RETURN(Tensor h, model.Embed(ids));
    QCAL_RETURN_IF_ERROR(ParkIfShort(model.backend(), h, reserve));
    acts.chunks.push_back(std::move(h));
    acts.chunk_batch.push_back(static_cast<int>(c1 - c0));
  }
  return acts;
}

absl::StatusOr<std::vector<LayerResult>> QuantizeBlock(Model& model, CalibActivations& acts,
                                                       const Recipe& recipe, StageTimes* times) {
  QCAL_RETURN_IF_ERROR(recipe.Validate());
  const int b = acts.next_block;
  if (b < 0 || b >= model.num_blocks()) {
    return absl::OutOfRangeError(absl::StrCat("block ", b, " is outside the model"));
  }
  StageTimes local;
  BlockRun run(model, acts, recipe, times ? *times : local);
  return run.Run();
}

absl::Status InstallBlock(Model& model, int b, const std::vector<LayerResult>& linears) {
  if (b < 0 || b >= model.num_blocks() || linears.size() != kAllLinears.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("InstallBlock: block ", b, " with ", linears.size(), " linears"));
  }
  for (size_t i = 0; i < linears.size(); ++i) {
    QCAL_RETURN_IF_ERROR(InstallWeight(model, b, kAllLinears[i], linears[i].quantized));
    QCAL_RETURN_IF_ERROR(InstallExtras(model, b, kAllLinears[i], linears[i]));
  }
  return absl::OkStatus();
}

absl::Status SaveActivations(kernels::Backend& backend, const CalibActivations& acts,
                             const std::string& path) {
  std::map<std::string, Tensor> tensors;
  std::string batches;
  for (size_t c = 0; c < acts.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor host, backend.ToHost(acts.chunks[c]));
    tensors[absl::StrCat("chunk.", 100000 + c)] = host;
    absl::StrAppend(&batches, c ? "," : "", acts.chunk_batch[c]);
  }
  return WriteSafetensors(path, tensors,
                          {{"seq_len", absl::StrCat(acts.seq_len)},
                           {"next_block", absl::StrCat(acts.next_block)},
                           {"chunk_batch", batches}});
}

absl::StatusOr<CalibActivations> LoadActivations(kernels::Backend& backend,
                                                 const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  CalibActivations acts;
  const auto& meta = file->metadata();
  auto get_int = [&](const char* key, int* out) -> absl::Status {
    auto it = meta.find(key);
    if (it == meta.end() || !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat(path, ": activation checkpoint lacks \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QCAL_RETURN_IF_ERROR(get_int("seq_len", &acts.seq_len));
  QCAL_RETURN_IF_ERROR(get_int("next_block", &acts.next_block));
  auto it = meta.find("chunk_batch");
  if (it == meta.end())
    return absl::DataLossError(absl::StrCat(path, ": activation checkpoint lacks chunk_batch"));
  for (absl::string_view part : absl::StrSplit(it->second, ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v))
      return absl::DataLossError(absl::StrCat(path, ": bad chunk_batch"));
    acts.chunk_batch.push_back(v);
  }
  if (acts.chunk_batch.size() != file->tensors().size()) {
    return absl::DataLossError(absl::StrCat(path, ": chunk count does not match chunk_batch"));
  }
  for (const auto& [name, info] : file->tensors()) {
    QCAL_ASSIGN_OR_RETURN(Tensor t, file->Get(name));
    if (t.dtype() != DType::kF32 || t.rank() != 2)
      return absl::DataLossError(absl::StrCat(path, ": bad chunk ", name));
    QCAL_ASSIGN_OR_RETURN(Tensor dev, backend.ToDevice(t));
    acts.chunks.push_back(std::move(dev));
  }
  return acts;
}

namespace {

// The tensors and metadata of a quantized linear's artifact.
void QuantizedLinearEntries(const QuantizedLinear& q, std::map<std::string, Tensor>& t,
                            std::map<std::string, std::string>& meta) {
  t["codes"] = I32Tensor(q.codes);
  t["zeros"] = I32Tensor(q.zeros);
  t["g_idx"] = I32Tensor(q.g_idx);
  t["perm"] = I32Tensor(q.perm);
  t["scales"] = Tensor::FromVector(q.scales, {static_cast<int64_t>(q.scales.size())});
  meta = {{"d_out", absl::StrCat(q.d_out)},
          {"d_in", absl::StrCat(q.d_in)},
          {"bits", absl::StrCat(q.spec.bits)},
          {"group_size", absl::StrCat(q.spec.group_size)},
          {"effective_group_size", absl::StrCat(q.group_size)},
          {"n_groups", absl::StrCat(q.n_groups)},
          {"symmetric", q.spec.symmetric ? "1" : "0"},
          {"grid", q.spec.grid == GridKind::kCuberoot ? "cuberoot" : "uniform"}};
}

absl::StatusOr<QuantizedLinear> QuantizedLinearFrom(const SafetensorsFile* file) {
  const auto& meta = file->metadata();
  auto get = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = meta.find(key);
    if (it == meta.end() || !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat("quantized linear artifact lacks \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QuantizedLinear q;
  int64_t bits = 0, gs = 0, sym = 0;
  QCAL_RETURN_IF_ERROR(get("d_out", &q.d_out));
  QCAL_RETURN_IF_ERROR(get("d_in", &q.d_in));
  QCAL_RETURN_IF_ERROR(get("bits", &bits));
  QCAL_RETURN_IF_ERROR(get("group_size", &gs));
  QCAL_RETURN_IF_ERROR(get("effective_group_size", &q.group_size));
  QCAL_RETURN_IF_ERROR(get("n_groups", &q.n_groups));
  QCAL_RETURN_IF_ERROR(get("symmetric", &sym));
  q.spec.bits = static_cast<int>(bits);
  q.spec.group_size = static_cast<int>(gs);
  q.spec.symmetric = sym != 0;
  auto grid = meta.find("grid");
  q.spec.grid =
      (grid != meta.end() && grid->second == "cuberoot") ? GridKind::kCuberoot : GridKind::kUniform;
  for (const char* name : {"codes", "zeros", "g_idx", "perm", "scales"}) {
    if (!file->Has(name))
      return absl::DataLossError(absl::StrCat("quantized linear artifact lacks ", name));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor codes, file->Get("codes"));
  QCAL_ASSIGN_OR_RETURN(Tensor zeros, file->Get("zeros"));
  QCAL_ASSIGN_OR_RETURN(Tensor g_idx, file->Get("g_idx"));
  QCAL_ASSIGN_OR_RETURN(Tensor perm, file->Get("perm"));
  QCAL_ASSIGN_OR_RETURN(Tensor scales, file->Get("scales"));
  q.codes = I32Vector(codes);
  q.zeros = I32Vector(zeros);
  q.g_idx = I32Vector(g_idx);
  q.perm = I32Vector(perm);
  const float* sp = scales.data<float>();
  q.scales.assign(sp, sp + scales.numel());
  if (static_cast<int64_t>(q.codes.size()) != q.d_out * q.d_in ||
      static_cast<int64_t>(q.scales.size()) != q.n_groups * q.d_out ||
      static_cast<int64_t>(q.zeros.size()) != q.n_groups * q.d_out ||
      static_cast<int64_t>(q.g_idx.size()) != q.d_in) {
    return absl::DataLossError("quantized linear artifact has inconsistent sizes");
  }
  return q;
}

std::string Serialize(const std::map<std::string, Tensor>& t,
                      const std::map<std::string, std::string>& meta) {
  auto bytes = SerializeSafetensors(t, meta);
  QCAL_CHECK(bytes.ok());  // host tensors only: cannot fail
  return *std::move(bytes);
}

constexpr char kFoldedPrefix[] = "folded/";

}  // namespace

std::string SerializeQuantizedLinear(const QuantizedLinear& q) {
  std::map<std::string, Tensor> t;
  std::map<std::string, std::string> meta;
  QuantizedLinearEntries(q, t, meta);
  return Serialize(t, meta);
}

absl::StatusOr<QuantizedLinear> ParseQuantizedLinear(const std::string& bytes) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(bytes, "quantized linear artifact"));
  return QuantizedLinearFrom(file.get());
}

std::string SerializeLayerArtifact(const LayerResult& r) {
  std::map<std::string, Tensor> t;
  std::map<std::string, std::string> meta;
  QuantizedLinearEntries(r.quantized, t, meta);
  meta["act_bits"] = absl::StrCat(r.act_bits);
  meta["rank"] = absl::StrCat(r.report.rank);
  if (r.report.rank > 0) {
    t["lora_a"] = Tensor::FromVector(r.lora_a, {r.quantized.d_out, r.report.rank});
    t["lora_b"] = Tensor::FromVector(r.lora_b, {r.report.rank, r.quantized.d_in});
  }
  for (const auto& [name, host] : r.folded) t[kFoldedPrefix + name] = host;
  return Serialize(t, meta);
}

absl::StatusOr<LayerResult> ParseLayerArtifact(const std::string& bytes) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(bytes, "layer artifact"));
  LayerResult r;
  QCAL_ASSIGN_OR_RETURN(r.quantized, QuantizedLinearFrom(file.get()));
  const auto& meta = file->metadata();
  int64_t act_bits = 16, rank = 0;
  auto get = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = meta.find(key);
    if (it != meta.end() && !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat("layer artifact has a bad \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QCAL_RETURN_IF_ERROR(get("act_bits", &act_bits));
  QCAL_RETURN_IF_ERROR(get("rank", &rank));
  r.act_bits = static_cast<int>(act_bits);
  r.report.rank = rank;
  if (rank > 0) {
    if (!file->Has("lora_a") || !file->Has("lora_b")) {
      return absl::DataLossError("layer artifact of rank > 0 lacks its low-rank factors");
    }
    QCAL_ASSIGN_OR_RETURN(Tensor a, file->Get("lora_a"));
    QCAL_ASSIGN_OR_RETURN(Tensor b, file->Get("lora_b"));
    if (a.dtype() != DType::kF32 || b.dtype() != DType::kF32 ||
        a.shape() != Shape{r.quantized.d_out, rank} || b.shape() != Shape{rank, r.quantized.d_in}) {
      return absl::DataLossError("layer artifact has low-rank factors of the wrong shape");
    }
    r.lora_a.assign(a.data<float>(), a.data<float>() + a.numel());
    r.lora_b.assign(b.data<float>(), b.data<float>() + b.numel());
  }
  for (const auto& [name, info] : file->tensors()) {
    if (name.rfind(kFoldedPrefix, 0) != 0) continue;
    QCAL_ASSIGN_OR_RETURN(Tensor t, file->Get(name));
    if (t.dtype() != DType::kF32) {
      return absl::DataLossError(absl::StrCat("layer artifact: ", name, " is not F32"));
    }
    r.folded[name.substr(sizeof(kFoldedPrefix) - 1)] = t.Clone();
  }
  return r;
}

void AddToExtras(const LayerResult& r, CheckpointExtras& extras) {
  for (const auto& [name, t] : r.folded) extras.replaced[name] = t;
  if (r.report.rank > 0) {
    const int64_t rank = r.report.rank;
    extras.adapters[r.report.name] = {Tensor::FromVector(r.lora_a, {r.quantized.d_out, rank}),
                                      Tensor::FromVector(r.lora_b, {rank, r.quantized.d_in})};
  }
}

absl::StatusOr<QuantizeOutcome> QuantizeModel(Model& model,
                                              const std::vector<std::vector<int>>& samples,
                                              const Recipe& recipe,
                                              const BlockProgressFn& progress) {
  QCAL_ASSIGN_OR_RETURN(CalibActivations acts, EmbedCalibration(model, samples));
  QuantizeOutcome out;
  const int nb = model.num_blocks();
  for (int b = 0; b < nb; ++b) {
    QCAL_ASSIGN_OR_RETURN(std::vector<LayerResult> block,
                          QuantizeBlock(model, acts, recipe, &out.times));
    for (LayerResult& r : block) {
      AddToExtras(r, out.extras);
      out.quantized[r.report.name] = std::move(r.quantized);
      out.layers.push_back(std::move(r.report));
    }
    if (progress) progress(b + 1, nb);
  }
  return out;
}

}  // namespace qcal::engine
