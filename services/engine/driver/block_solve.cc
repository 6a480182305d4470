// BlockRunner's solve of a block's linears (Solve; block_runner.h): GPTQ or RTN on the backend's
// solver ops, the output errors, and error reconstruction on the device or the host.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/driver/block_runner_internal.h"
#include "services/engine/quant/quantized_linear.h"

namespace qcal::engine {
namespace {

using Clock = std::chrono::steady_clock;

// CheckFinite for a tensor in host memory, before a solve: the error names the statistics or the
// weight as a whole. Device tensors are left to the solver ops, which check their inputs on the
// device and name the first bad value.
absl::Status CheckFiniteOnHost(const Tensor& t, const std::string& what) {
  return t.device() == Device::kHost ? driver_internal::CheckFinite(t, what) : absl::OkStatus();
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
std::future<absl::StatusOr<QuantizedLinear>> RunAsync(
    const std::function<absl::StatusOr<QuantizedLinear>()>& fn) {
  try {
    return std::async(std::launch::async, fn);
  } catch (const std::system_error&) {
    std::promise<absl::StatusOr<QuantizedLinear>> done;
    done.set_value(fn());
    return done.get_future();
  }
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

}  // namespace

absl::StatusOr<std::vector<SolvedLinear>> BlockRunner::Solve(const InputStatistics& stats,
                                                             const std::vector<LinearKind>& kinds,
                                                             int expert) {
  QCAL_RETURN_IF_ERROR(Charge(t_.forward));
  const double before = t_.factor + t_.quantize + t_.error + t_.transfer + t_.reconstruct;
  QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved, SolveInput(stats, kinds, expert));
  QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
  t_.solve += t_.factor + t_.quantize + t_.error + t_.transfer + t_.reconstruct - before;
  return solved;
}

absl::StatusOr<BlockRunner::PendingDownload> BlockRunner::LandingFor(const Tensor& t) {
  PendingDownload d;
  QCAL_ASSIGN_OR_RETURN(d.host, be_.AllocHost(t.dtype(), t.shape()));
  return d;
}

absl::Status BlockRunner::StartDownload(const Tensor& t, PendingDownload& d) {
  QCAL_ASSIGN_OR_RETURN(d.wait, be_.CopyToHostAsync(t, d.host));
  return absl::OkStatus();
}

LayerResult BlockRunner::NewResult(LinearId id, int64_t d_out, int64_t d_in) const {
  LayerResult r;
  r.report.block = b_;
  r.report.kind = id.kind;
  r.report.expert = id.expert;
  r.report.name = LinearPrefix(model_.config(), b_, id);
  if (id.expert >= 0) {
    r.report.routed_tokens = expert_tokens_[static_cast<size_t>(id.expert)];
    r.report.fallback = fallback_[static_cast<size_t>(id.expert)];
  }
  r.report.d_out = d_out;
  r.report.d_in = d_in;
  return r;
}

// The columns ASER extracted from input `in` (empty otherwise).
const std::vector<int32_t>& BlockRunner::OutliersOf(LinearInput in) const {
  return smoothing_.at(in).outliers;
}

// ASER's extracted columns are restored by the low-rank branch only: a fixed rank (after
// clamping) below their number is an error naming the layer.
absl::Status BlockRunner::CheckOutliersFitRank(LinearInput in, const LayerResult& r) const {
  const int rank = recipe_.error_reconstruction.rank;
  const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
  const int64_t outliers = static_cast<int64_t>(OutliersOf(in).size());
  if (rank == kRecipeAutoRank || outliers <= std::min<int64_t>(rank, std::min(d_out, d_in))) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(r.report.name, ": recipe key \"smoothing.outlier_channels\" extracts ", outliers,
                   " columns, more than the rank ", std::min<int64_t>(rank, std::min(d_out, d_in)),
                   " of this ", d_out, "x", d_in, " layer can restore"));
}

// Error reconstruction runs on the device when the backend has the ops.
bool BlockRunner::DeviceReconstruction() const {
  return recipe_.error_reconstruction.enabled &&
         be_.SupportsSolverOp(kernels::SolverOp::kErrorReconstruction);
}

// The engine's options for error reconstruction of a linear fed by `in`.
ErrorReconstructionOptions BlockRunner::ErOptions(LinearInput in) const {
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
absl::Status BlockRunner::ReconstructOnDevice(LinearInput in, const Tensor& w, const Tensor& w_hat,
                                              const Tensor& gram, const DeviceWhitening& whitening,
                                              double quantized_error, double denom,
                                              LayerResult& r) {
  QCAL_RETURN_IF_ERROR(CheckOutliersFitRank(in, r));
  const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
  const ErrorReconstructionOptions eopt = ErOptions(in);
  kernels::LowRankOptions opt;
  opt.rank = static_cast<int>(MaxRank(d_out, d_in, eopt));
  opt.svd = kernels::SvdMethod::kRandomized;
  opt.whitening_order = whitening.order;
  if (whitening.cholesky) {
    // quantized_error is ‖E·Xᵀ‖ of this E and Gram matrix (OutputError), and S·Sᵀ = G + δI.
    opt.gram_error_sq = quantized_error * quantized_error;
    opt.whitening_delta = whitening.delta;
  }
  auto lr = be_.ReconstructError(w, w_hat, whitening.factor, opt);
  if (!lr.ok()) return Annotate(lr.status(), r.report.name);
  // The factors come back into page-locked buffers while the device goes on to the corrected
  // layer's output error, instead of two synchronous copies into fresh pageable memory with the
  // device idle.
  QCAL_ASSIGN_OR_RETURN(PendingDownload a_all, LandingFor(lr->a));
  QCAL_ASSIGN_OR_RETURN(PendingDownload b_all, LandingFor(lr->b));
  QCAL_RETURN_IF_ERROR(StartDownload(lr->a, a_all));
  QCAL_RETURN_IF_ERROR(StartDownload(lr->b, b_all));
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
  r.report.reconstructed = true;
  r.report.whitened_error_before = lr->error_before;
  r.report.whitened_error_after = error_after;
  r.report.extra_params = static_cast<double>(rank * (d_out + d_in)) /
                          (static_cast<double>(d_out) * static_cast<double>(d_in));
  const double gram_error_sq = quantized_error * quantized_error;
  absl::StatusOr<double> error =
      rank == computed ? be_.LowRankOutputError(w, w_hat, lr->a, lr->b, gram, gram_error_sq) : 0.0;
  // Both copies end before their buffers can go back to the pool, whatever happened.
  const absl::Status a_done = a_all.wait(), b_done = b_all.wait();
  QCAL_RETURN_IF_ERROR(error.status());
  QCAL_RETURN_IF_ERROR(a_done);
  QCAL_RETURN_IF_ERROR(b_done);
  // L_A's leading `rank` columns and L_B's leading `rank` rows.
  const float* a_host = a_all.host.data<float>();
  const float* b_host = b_all.host.data<float>();
  r.lora_a.resize(static_cast<size_t>(d_out * rank));
  for (int64_t o = 0; o < d_out; ++o) {
    std::copy_n(a_host + o * computed, rank, r.lora_a.begin() + o * rank);
  }
  r.lora_b.assign(b_host, b_host + rank * d_in);
  if (rank != computed) {
    QCAL_ASSIGN_OR_RETURN(Tensor a, be_.ToDevice(Tensor::FromVector(r.lora_a, {d_out, rank})));
    QCAL_ASSIGN_OR_RETURN(Tensor b, be_.ToDevice(Tensor::FromVector(r.lora_b, {rank, d_in})));
    error = be_.LowRankOutputError(w, w_hat, a, b, gram, gram_error_sq);
    QCAL_RETURN_IF_ERROR(error.status());
  }
  r.report.rel_error_er = *error / denom;
  return absl::OkStatus();
}

// Error reconstruction of one linear on the host (DESIGN section 3): E = w − w_hat, where w is
// W' (smoothed) and w_hat the dequantized Q(W'_normal); fills the factors and the report.
absl::Status BlockRunner::Reconstruct(LinearInput in, const float* w,
                                      const std::vector<float>& w_hat, const Tensor& gram_host,
                                      const WhiteningFactor& whitening, double denom,
                                      LayerResult& r) {
  const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
  const ErrorReconstructionOptions opt = ErOptions(in);
  QCAL_RETURN_IF_ERROR(CheckOutliersFitRank(in, r));
  auto lr = ReconstructError<float>(w, w_hat.data(), d_out, d_in, whitening, opt);
  if (!lr.ok()) return Annotate(lr.status(), r.report.name);
  r.report.rank = lr->rank;
  r.report.reconstructed = true;
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

// The whitening factor of input `in` for error reconstruction, from its Gram matrix (host) or
// its quantized-path statistics.
absl::StatusOr<WhiteningFactor> BlockRunner::WhiteningOf(const InputStatistics& stats,
                                                         const Tensor& gram_host) {
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
    if (!stats.abs_stats) {
      return absl::InternalError("diagonal whitening without activation statistics");
    }
    return DiagonalWhitening(stats.abs_stats->MeanAbs());
  }
  return IdentityWhitening(n);
}

// The device whitening factor of input `in` (Backend::ReconstructError's `whitening`): the
// factor GPTQ kept of the same damped Gram matrix (taken out of `factor`) where it did, else the
// Cholesky of the device Gram matrix; LQER's mean |x| uploaded; or undefined for plain SVD.
absl::StatusOr<BlockRunner::DeviceWhitening> BlockRunner::DeviceWhiteningOf(
    const InputStatistics& stats, kernels::GptqFactor& factor) {
  const Whitening kind = recipe_.error_reconstruction.whitening;
  DeviceWhitening out;
  if (kind == Whitening::kCholesky && factor.whitening.defined()) {
    out.factor = std::move(factor.whitening);
    out.order = std::move(factor.whitening_order);
    out.delta = factor.whitening_delta;
    out.cholesky = true;
    factor.whitening = Tensor();
    factor.whitening_order.clear();
    return out;
  }
  if (kind == Whitening::kCholesky) {
    auto s = be_.CholeskyWhitening(stats.gram, recipe_.gptq.damp);
    if (!s.ok()) {
      return Annotate(s.status(),
                      absl::StrCat("whitening of block ", b_, " (", RecipeName(kind), ")"));
    }
    out.factor = *std::move(s);
    QCAL_ASSIGN_OR_RETURN(out.delta, be_.WhiteningDelta(stats.gram, recipe_.gptq.damp));
    out.cholesky = true;
    return out;
  }
  if (kind == Whitening::kDiagonal) {
    if (!stats.abs_stats) {
      return absl::InternalError("diagonal whitening without activation statistics");
    }
    QCAL_ASSIGN_OR_RETURN(const WhiteningFactor f, DiagonalWhitening(stats.abs_stats->MeanAbs()));
    const std::vector<float> s(f.factor.begin(), f.factor.end());
    QCAL_ASSIGN_OR_RETURN(out.factor, be_.ToDevice(Tensor::FromVector(s, {f.d_in})));
  }
  return out;
}

// With the backend's solver ops: one factorization per input shared by its consumers; the weights
// never leave the device (the dequantized result replaces them there). Only codes, scales and
// zeros are copied to the host; their conversion into QuantizedLinear runs on a host thread while
// the device goes on with the next stage. Error reconstruction runs on the device (randomized SVD,
// ReconstructOnDevice) when the backend has it, else on the host (LAPACK, the full SVD of the
// reference: the CPU backend's case) with the weight, its quantized form and the statistics copied
// there; that host whitening comes before the factorization, as it always has on the host.
absl::StatusOr<std::vector<SolvedLinear>> BlockRunner::SolveInput(
    const InputStatistics& stats, const std::vector<LinearKind>& kinds, int expert) {
  const LinearInput in = stats.input;
  const Tensor& gram = stats.gram;
  BlockWeights& bw = model_.block(b_);
  std::vector<SolvedLinear> solved;
  const std::vector<LinearKind> consumers = ConsumersOf(in);
  const bool gptq = recipe_.method == QuantMethod::kGptq;
  const std::vector<int32_t>& outliers = OutliersOf(in);
  auto t0 = Clock::now();
  QCAL_RETURN_IF_ERROR(
      CheckFiniteOnHost(gram, absl::StrCat("calibration statistics of block ", b_)));
  const bool device_er = DeviceReconstruction();
  Tensor gram_host;
  std::optional<WhiteningFactor> whitening;
  if (recipe_.error_reconstruction.enabled && !device_er) {
    QCAL_ASSIGN_OR_RETURN(gram_host, be_.ToHost(gram));
    QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
    QCAL_ASSIGN_OR_RETURN(whitening, WhiteningOf(stats, gram_host));
    QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
  }
  kernels::GptqFactor factor;
  kernels::GptqSolveOptions gopt = gopt_;
  gopt.outlier_columns = outliers;
  // Output-adaptive Hessians are per linear: each consumer is factorized in the loop below.
  const bool output_adaptive = recipe_.NeedsGradientPass();
  if (gptq && !output_adaptive) {
    // GPTQ factors G + δI of this input with the recipe's damping: where it can, that factor is
    // also error reconstruction's whitening (DeviceWhiteningOf).
    kernels::GptqSolveOptions shared = gopt;
    shared.keep_whitening =
        device_er && recipe_.error_reconstruction.whitening == Whitening::kCholesky;
    auto f = be_.GptqFactorize(gram, shared);
    if (!f.ok()) {
      return Annotate(f.status(),
                      LinearPrefix(model_.config(), b_, LinearId(consumers[0], expert)));
    }
    factor = std::move(f).value();
    QCAL_RETURN_IF_ERROR(Charge(t_.factor));
  }
  DeviceWhitening device_whitening;
  if (device_er) {
    QCAL_ASSIGN_OR_RETURN(device_whitening, DeviceWhiteningOf(stats, factor));
    QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
  }
  for (LinearKind k : kinds) {
    if (std::find(consumers.begin(), consumers.end(), k) == consumers.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(LinearPrefix(b_, k), " does not read input ", LinearInputName(in)));
    }
    const LinearId id(k, expert);
    const std::string name = LinearPrefix(model_.config(), b_, id);
    Linear& lin = bw.at(id);
    const Tensor w = lin.weight;
    QCAL_RETURN_IF_ERROR(CheckFiniteOnHost(w, absl::StrCat("weight ", name)));
    LayerResult r = NewResult(id, w.dim(0), w.dim(1));
    if (gptq && output_adaptive) {
      QCAL_ASSIGN_OR_RETURN(factor, OutputAdaptiveFactor(in, k, gopt));
      QCAL_RETURN_IF_ERROR(Charge(t_.factor));
    }
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
      auto solved = be_.GptqSolve(w, factor, spec_, gopt_.block_size, Retrains());
      if (!solved.ok()) return Annotate(solved.status(), name);
      q = std::move(solved).value();
      r.report.dead_columns = factor.dead_columns;
      r.report.damp_used = factor.damp_used;
    }
    // The host buffers the codes and parameters come back into, taken while the solve is queued:
    // a size's first page-locked allocation (6.6 to 18.9 ms at 7B sizes on an H100 host) can
    // then overlap the device's work; taken after the next read-back, it left the device idle.
    QCAL_ASSIGN_OR_RETURN(PendingDownload codes, LandingFor(q.codes));
    QCAL_ASSIGN_OR_RETURN(PendingDownload scales, LandingFor(q.scales));
    QCAL_ASSIGN_OR_RETURN(PendingDownload zeros, LandingFor(q.zeros));
    // Retraining's frozen base: W̃ for GPTQ, the weight RTN rounded.
    Tensor retrain_base, retrain_fisher;
    if (Retrains()) {
      QCAL_ASSIGN_OR_RETURN(retrain_base, be_.ToHost(gptq ? q.pre_round : w_normal));
      q.pre_round = Tensor();
      if (recipe_.NeedsFisher()) {
        QCAL_ASSIGN_OR_RETURN(retrain_fisher, FisherOf(in, k));
      }
    }
    r.report.outlier_columns = static_cast<int>(outliers.size());
    QCAL_RETURN_IF_ERROR(Charge(t_.quantize));
    // The norm and the RTN baseline are only reported; the recipe's error feeds reconstruction.
    QCAL_ASSIGN_OR_RETURN(const double norm, be_.ReportOutputError(w, Tensor(), gram));
    if (!std::isfinite(norm)) {
      return absl::InvalidArgumentError(
          absl::StrCat("calibration statistics of block ", b_, " contain NaN or Inf"));
    }
    const double denom = norm > 0 ? norm : 1.0;
    QCAL_ASSIGN_OR_RETURN(const double error, be_.OutputError(w, q.dequantized, gram));
    double error_rtn = error;
    if (gptq) {
      QCAL_ASSIGN_OR_RETURN(error_rtn, be_.ReportOutputError(w, rtn->dequantized, gram));
    }
    r.report.rel_error = error / denom;
    r.report.rel_error_rtn = error_rtn / denom;
    QCAL_RETURN_IF_ERROR(Charge(t_.error));
    if (device_er) {
      QCAL_RETURN_IF_ERROR(
          ReconstructOnDevice(in, w, q.dequantized, gram, device_whitening, error, denom, r));
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
    // The codes and parameters come back while the device goes on; the host conversion waits.
    QCAL_RETURN_IF_ERROR(StartDownload(q.codes, codes));
    QCAL_RETURN_IF_ERROR(StartDownload(q.scales, scales));
    QCAL_RETURN_IF_ERROR(StartDownload(q.zeros, zeros));
    r.act_bits = recipe_.activations.bits;
    if (expert == kNoExpert) r.folded = folded_[static_cast<int>(k)];
    const Tensor w_hat = q.dequantized;
    q.codes = q.scales = q.zeros = q.dequantized = Tensor();
    const QuantSpec spec = spec_;
    std::future<absl::StatusOr<QuantizedLinear>> conversion =
        RunAsync([q, spec, codes, scales, zeros]() -> absl::StatusOr<QuantizedLinear> {
          for (const PendingDownload* d : {&codes, &scales, &zeros}) {
            QCAL_RETURN_IF_ERROR(d->wait());
          }
          return ToQuantizedLinear(q, spec, codes.host, scales.host, zeros.host);
        });
    QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
    const auto now = Clock::now();
    r.report.solve_seconds = std::chrono::duration<double>(now - t0).count();
    t0 = now;
    solved.push_back(SolvedLinear{std::move(r), std::move(retrain_base), std::move(retrain_fisher),
                                  w_hat, std::move(conversion)});
  }
  return solved;
}

}  // namespace qcal::engine
