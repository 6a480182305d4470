// BlockRunner's output-adaptive Hessians (block_runner.h, "Output-adaptive Hessians"): each
// linear's own H_oac or H_tok from the gradient pass, smoothed, factorized or prefetched.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/oac/factor_prefetch.h"

namespace qcal::engine {

absl::Status SmoothLinearOac(const std::vector<float>& m, LinearOac& oac) {
  if (m.empty()) return absl::OkStatus();
  const int64_t n = static_cast<int64_t>(m.size());
  for (size_t j = 0; j < m.size(); ++j) {
    if (!std::isfinite(m[j]) || !(m[j] > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("smoothing scale ", j, " is ", m[j], "; it must be finite and > 0"));
    }
  }
  Tensor& h = oac.hessian;
  if (h.defined()) {
    if (h.device() != Device::kHost || h.dtype() != DType::kF32 || h.shape() != Shape{n, n}) {
      return absl::InvalidArgumentError(
          absl::StrCat("an output-adaptive Hessian to smooth must be a host F32 [", n, ", ", n,
                       "] tensor, got ", ShapeString(h.shape())));
    }
    float* hp = h.data<float>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) hp[i * n + j] = hp[i * n + j] / m[i] / m[j];
    }
  }
  Tensor& f = oac.fisher;
  if (!f.defined()) return absl::OkStatus();
  if (f.device() != Device::kHost || f.dtype() != DType::kF32 || f.shape().size() != 2 ||
      f.dim(1) != n) {
    return absl::InvalidArgumentError(absl::StrCat("a Fisher to smooth must be a host F32 [d_out, ",
                                                   n, "] tensor, got ", ShapeString(f.shape())));
  }
  float* fp = f.data<float>();
  for (int64_t o = 0; o < f.dim(0); ++o) {
    for (int64_t j = 0; j < n; ++j) fp[o * n + j] = fp[o * n + j] / m[j] / m[j];
  }
  return absl::OkStatus();
}

namespace {

// Linear `name`'s output-adaptive statistics from `source`, its Hessian checked against its
// input's width.
absl::StatusOr<LinearOac> FetchOac(const OacSource& source, int block, LinearKind k, int64_t d_in,
                                   const std::string& name) {
  auto got = source(block, k);
  if (!got.ok()) {
    return Annotate(got.status(), absl::StrCat("output-adaptive statistics of ", name));
  }
  LinearOac stats = *std::move(got);
  if (!stats.hessian.defined() || stats.hessian.dtype() != DType::kF32 ||
      stats.hessian.shape() != Shape{d_in, d_in}) {
    return absl::InvalidArgumentError(absl::StrCat("output-adaptive Hessian of ", name,
                                                   ": expected F32 [", d_in, ", ", d_in, "], got ",
                                                   ShapeString(stats.hessian.shape())));
  }
  return stats;
}

// GptqFactorize of a host or device Hessian on `be` (uploaded there first when on the host).
// No host scan for non-finite values: GptqFactorize refuses them on every backend (naming the
// Hessian), and scanning 0.9 GB a block on the host cost a 7B job 10 s.
absl::StatusOr<kernels::GptqFactor> FactorizeOac(kernels::Backend& be, Tensor h,
                                                 const kernels::GptqSolveOptions& gopt,
                                                 const std::string& name) {
  if (h.device() != be.device()) {
    QCAL_ASSIGN_OR_RETURN(h, be.ToDevice(h));
  }
  auto f = be.GptqFactorize(h, gopt);
  if (!f.ok()) return Annotate(f.status(), name);
  return f;
}

}  // namespace

// Without smoothing, every output-adaptive factor of a dense block is known before the block
// starts: a host thread factorizes them on the backend's side queue in solve order
// (oac/factor_prefetch.h) while this thread runs the block. Only for a runner holding every chunk
// (a gang member solves only the linears it owns) on a backend with a side queue.
absl::Status BlockRunner::StartFactorPrefetch() {
  if (!recipe_.NeedsGradientPass() || recipe_.method != QuantMethod::kGptq ||
      recipe_.smoothing.enabled() || model_.config().IsMoeBlock(b_) || !oac_ ||
      !CheckHoldsEveryChunk().ok()) {
    return absl::OkStatus();
  }
  QCAL_ASSIGN_OR_RETURN(kernels::Backend * side, be_.SideBackend());
  if (side == nullptr) return absl::OkStatus();
  // Room for every factor of the block at once and one factorization's working copies, twice
  // over, beside the block's working set; else the solves factorize as they go.
  std::vector<LinearKind> kinds;
  int64_t factors = 0, widest = 0;
  for (LinearInput in : kAllLinearInputs) {
    const int64_t n = widths_[static_cast<int>(in)];
    for (LinearKind k : ConsumersOf(in)) {
      kinds.push_back(k);
      factors += n * n * int64_t{sizeof(float)};
    }
    widest = std::max(widest, n * n * int64_t{sizeof(float)});
  }
  const int64_t available = be_.AvailableMemory();
  if (available >= 0 && available < 2 * (factors + 2 * widest) + reserve_) {
    return absl::OkStatus();
  }
  auto factorize = [source = oac_, block = b_, widths = widths_, gopt = gopt_](
                       kernels::Backend& side_be,
                       LinearKind k) -> absl::StatusOr<kernels::GptqFactor> {
    const std::string name = LinearPrefix(block, k);
    QCAL_ASSIGN_OR_RETURN(LinearOac stats,
                          FetchOac(source, block, k, widths[static_cast<int>(InputOf(k))], name));
    QCAL_ASSIGN_OR_RETURN(kernels::GptqFactor f, FactorizeOac(side_be, stats.hessian, gopt, name));
    QCAL_RETURN_IF_ERROR(side_be.Synchronize());
    return f;
  };
  prefetch_ = std::make_unique<OacFactorPrefetch>(*side, std::move(kinds), std::move(factorize));
  return absl::OkStatus();
}

// Linear k's own output-adaptive Hessian from the gradient pass, smoothed like its input (the
// Fisher with it), uploaded and factorized with the options of its input (ASER's extracted columns
// among them); or the factor prefetched.
absl::StatusOr<kernels::GptqFactor> BlockRunner::OutputAdaptiveFactor(
    LinearInput in, LinearKind k, const kernels::GptqSolveOptions& gopt) {
  const std::string name = LinearPrefix(b_, k);
  if (!oac_) {
    return absl::FailedPreconditionError(
        absl::StrCat(name, ": recipe key \"hessian\" is ", RecipeName(recipe_.hessian),
                     " but the solve was given no gradient-pass statistics"));
  }
  if (prefetch_ != nullptr && prefetch_->Has(k)) {
    ++t_.prefetched_factors;
    return prefetch_->Take(k);
  }
  QCAL_ASSIGN_OR_RETURN(LinearOac stats,
                        FetchOac(oac_, b_, k, widths_[static_cast<int>(in)], name));
  const std::vector<float>& m = smoothing_.at(in).m;
  if (!m.empty()) {
    // The transform runs on the host, in one fixed order, whatever the backend.
    QCAL_ASSIGN_OR_RETURN(stats.hessian, be_.ToHost(stats.hessian));
    if (stats.fisher.defined()) {
      QCAL_ASSIGN_OR_RETURN(stats.fisher, be_.ToHost(stats.fisher));
    }
    QCAL_RETURN_IF_ERROR(
        Annotate(SmoothLinearOac(m, stats), absl::StrCat("output-adaptive statistics of ", name)));
  }
  Tensor h = stats.hessian;
  if (h.device() != be_.device()) {
    QCAL_ASSIGN_OR_RETURN(h, be_.ToDevice(h));
  }
  QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
  return FactorizeOac(be_, std::move(h), gopt, name);
}

}  // namespace qcal::engine
