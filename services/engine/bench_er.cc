// `qcal bench --er` (bench.h, RunErBench): the device error-reconstruction ops timed on the 7B
// shape's layers, and their cost projected onto the whole model.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/bench.h"
#include "services/engine/bench_internal.h"

namespace qcal::engine {
namespace {

using bench_internal::Clock;
using bench_internal::Since;
using bench_internal::StreamSeed;
using bench_internal::Uniform;

// Latent factors shared by the channels of the error-reconstruction bench's activations.
constexpr int64_t kLatentFactors = 8;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs `op` once to warm up, then `runs` times; returns the median seconds (each run ends with the
// backend synchronized).
template <typename Op>
absl::StatusOr<double> TimeMedian(kernels::Backend& be, int runs, Op op) {
  QCAL_RETURN_IF_ERROR(op());
  QCAL_RETURN_IF_ERROR(be.Synchronize());
  std::vector<double> seconds;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = Clock::now();
    QCAL_RETURN_IF_ERROR(op());
    QCAL_RETURN_IF_ERROR(be.Synchronize());
    seconds.push_back(Since(t0));
  }
  return Median(std::move(seconds));
}

// G = XᵀX for X [tokens, d_in] = F·Mᵀ + N: F [tokens, 8] and the mixing M [d_in, 8] uniform in
// [-1, 1), the noise N uniform in [-0.5, 0.5): channels correlated through the shared factors.
absl::StatusOr<Tensor> BenchGram(kernels::Backend& be, int64_t d_in, int64_t tokens,
                                 uint64_t seed) {
  QCAL_ASSIGN_OR_RETURN(Tensor f,
                        Uniform(be, {tokens, kLatentFactors}, StreamSeed(seed, 0, 0), -1.0f, 1.0f));
  QCAL_ASSIGN_OR_RETURN(Tensor mix,
                        Uniform(be, {d_in, kLatentFactors}, StreamSeed(seed, 0, 1), -1.0f, 1.0f));
  QCAL_ASSIGN_OR_RETURN(Tensor x, Uniform(be, {tokens, d_in}, StreamSeed(seed, 0, 2), -0.5f, 0.5f));
  QCAL_RETURN_IF_ERROR(be.Linear(f, mix, nullptr, x, /*accumulate=*/true));
  QCAL_ASSIGN_OR_RETURN(Tensor gram, be.Alloc(DType::kF32, {d_in, d_in}));
  QCAL_RETURN_IF_ERROR(be.AccumulateGram(x, gram));
  return gram;
}

absl::StatusOr<ErBenchLayer> RunErLayer(kernels::Backend& be, const ErBenchOptions& options,
                                        int64_t d_out, int64_t d_in, int index) {
  ErBenchLayer l;
  l.d_out = d_out;
  l.d_in = d_in;
  const uint64_t seed = StreamSeed(options.seed, index, 0);
  const float a = std::sqrt(3.0f / static_cast<float>(d_in));
  QCAL_ASSIGN_OR_RETURN(Tensor w, Uniform(be, {d_out, d_in}, StreamSeed(seed, 1, 0), -a, a));
  kernels::QuantSpec spec;
  spec.bits = 4;
  spec.group_size = 128;
  QCAL_ASSIGN_OR_RETURN(kernels::QuantizedTensors q, be.QuantizeRtn(w, spec));
  const Tensor w_hat = q.dequantized;
  QCAL_ASSIGN_OR_RETURN(Tensor gram, BenchGram(be, d_in, options.tokens, StreamSeed(seed, 2, 0)));
  QCAL_RETURN_IF_ERROR(be.Synchronize());

  Tensor s;
  QCAL_ASSIGN_OR_RETURN(l.whitening_seconds, TimeMedian(be, options.runs, [&]() -> absl::Status {
                          QCAL_ASSIGN_OR_RETURN(s, be.CholeskyWhitening(gram, options.damp));
                          return absl::OkStatus();
                        }));
  gram = Tensor();
  kernels::LowRankOptions lr;
  lr.rank = options.rank;
  lr.oversample = options.oversample;
  lr.power_iterations = options.power_iterations;
  lr.seed = StreamSeed(seed, 3, 0);
  kernels::LowRankTensors out;
  auto reconstruct = [&]() -> absl::Status {
    QCAL_ASSIGN_OR_RETURN(out, be.ReconstructError(w, w_hat, s, lr));
    return absl::OkStatus();
  };
  lr.svd = kernels::SvdMethod::kRandomized;
  QCAL_ASSIGN_OR_RETURN(l.randomized_seconds, TimeMedian(be, options.runs, reconstruct));
  l.error_after_randomized = out.error_after;
  lr.svd = kernels::SvdMethod::kFull;
  QCAL_ASSIGN_OR_RETURN(l.full_seconds, TimeMedian(be, options.runs, reconstruct));
  l.error_before = out.error_before;
  l.error_after_full = out.error_after;
  return l;
}

}  // namespace

absl::Status ErBenchOptions::Validate() const {
  if (shapes.empty()) return absl::InvalidArgumentError("er bench: no layer shapes");
  for (const auto& [d_out, d_in] : shapes) {
    if (d_out < 1 || d_in < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("er bench: bad layer shape ", d_out, " x ", d_in));
    }
  }
  if (rank < 1) return absl::InvalidArgumentError(absl::StrCat("er-rank must be >= 1, got ", rank));
  if (oversample < 0 || power_iterations < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("er bench: oversample and power iterations must be >= 0, got ", oversample,
                     " and ", power_iterations));
  }
  if (tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("er-tokens must be >= 1, got ", tokens));
  }
  if (!std::isfinite(damp) || damp < 0) {
    return absl::InvalidArgumentError(absl::StrCat("er bench: damp must be >= 0, got ", damp));
  }
  if (runs < 1) return absl::InvalidArgumentError(absl::StrCat("er-runs must be >= 1, got ", runs));
  return absl::OkStatus();
}

absl::StatusOr<ErBenchResult> RunErBench(kernels::Backend& be, const ErBenchOptions& options,
                                         const BenchLogFn& log) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  if (!be.SupportsSolverOp(kernels::SolverOp::kQuantizeRtn) ||
      !be.SupportsSolverOp(kernels::SolverOp::kErrorReconstruction)) {
    return absl::UnimplementedError(
        absl::StrCat("the error-reconstruction bench needs the device solver ops, which the ",
                     be.name(), " backend does not have (use --device cuda)"));
  }
  ErBenchResult r;
  r.device_kind = be.DeviceKind();
  for (size_t i = 0; i < options.shapes.size(); ++i) {
    const auto [d_out, d_in] = options.shapes[i];
    QCAL_ASSIGN_OR_RETURN(ErBenchLayer l,
                          RunErLayer(be, options, d_out, d_in, static_cast<int>(i)));
    if (log) {
      log(absl::StrCat(d_out, " x ", d_in, ": whitening ", l.whitening_seconds, " s, full ",
                       l.full_seconds, " s, randomized ", l.randomized_seconds, " s"));
    }
    r.layers.push_back(l);
  }
  auto find = [&](int64_t d_out, int64_t d_in) -> const ErBenchLayer* {
    for (const ErBenchLayer& l : r.layers) {
      if (l.d_out == d_out && l.d_in == d_in) return &l;
    }
    return nullptr;
  };
  const ErBenchLayer *attn = find(4096, 4096), *up = find(11008, 4096), *down = find(4096, 11008);
  if (attn && up && down) {
    ErProjection& p = r.projection_7b;
    p.blocks = 32;
    const ErBenchLayer &a = *attn, &u = *up, &d = *down;
    p.randomized_seconds =
        p.blocks * (4 * a.randomized_seconds + 2 * u.randomized_seconds + d.randomized_seconds);
    p.full_seconds = p.blocks * (4 * a.full_seconds + 2 * u.full_seconds + d.full_seconds);
    // Whitening depends on d_in alone: three 4096-wide inputs and one 11008-wide per block.
    p.whitening_seconds = p.blocks * (3 * a.whitening_seconds + d.whitening_seconds);
  }
  return r;
}

}  // namespace qcal::engine
