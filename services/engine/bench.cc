#include "services/engine/bench.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/hash_random.h"
#include "services/engine/bench_internal.h"
#include "services/engine/model.h"
#include "services/engine/oac/oac_job.h"

namespace qcal::engine {
namespace {

using bench_internal::Clock;
using bench_internal::DrawBlock;
using bench_internal::Since;
using bench_internal::StreamSeed;
using bench_internal::Uniform;

}  // namespace

Recipe BenchOptions::DefaultRecipe() {
  Recipe r;
  r.method = QuantMethod::kGptq;
  r.weights.bits = 4;
  r.weights.group_size = 128;
  return r;
}

absl::Status BenchOptions::Validate() const {
  if (config.num_layers < 1 || config.hidden_size < 1 || config.intermediate_size < 1 ||
      config.num_heads < 1 || config.num_kv_heads < 1 || config.head_dim < 1 ||
      config.vocab_size < 2 || config.num_heads % config.num_kv_heads != 0) {
    return absl::InvalidArgumentError("bench: the model config is incomplete");
  }
  if (samples < 1)
    return absl::InvalidArgumentError(absl::StrCat("samples must be >= 1, got ", samples));
  if (seq_len < 1)
    return absl::InvalidArgumentError(absl::StrCat("seq-len must be >= 1, got ", seq_len));
  if (blocks < 0)
    return absl::InvalidArgumentError(absl::StrCat("blocks must be >= 0, got ", blocks));
  return recipe.Validate();
}

absl::StatusOr<BenchResult> RunBench(kernels::Backend& be, const BenchOptions& options,
                                     const BenchLogFn& log) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  const ModelConfig& c = options.config;
  // As a job does (JobSession::Open): an MoE model gets the moe defaults.
  Recipe recipe = options.recipe;
  QCAL_RETURN_IF_ERROR(recipe.ResolveForModel(c));
  const int total = c.num_layers;
  const int run = options.blocks == 0 ? total : std::min(options.blocks, total);
  auto say = [&](const std::string& line) {
    if (log) log(line);
  };
  BenchResult r;
  r.device_kind = be.DeviceKind();
  r.blocks_total = total;
  r.blocks_run = run;
  r.extrapolated = run < total;
  r.flops = CountFlops(c, options.samples, options.seq_len);
  if (recipe.moe) r.moe_min_tokens = recipe.moe->min_tokens;

  // Setup (not timed in the totals): the embedding table and the calibration tokens.
  auto t0 = Clock::now();
  QCAL_ASSIGN_OR_RETURN(Tensor embed, Uniform(be, {c.vocab_size, c.hidden_size},
                                              StreamSeed(options.seed, -1, 0), -1.0f, 1.0f));
  QCAL_ASSIGN_OR_RETURN(Tensor final_norm,
                        Uniform(be, {c.hidden_size}, StreamSeed(options.seed, -1, 1), 0.8f, 1.2f));
  std::unique_ptr<Model> model =
      Model::FromWeights(c, &be, embed, final_norm, embed, std::vector<BlockWeights>(total));
  std::vector<std::vector<int>> samples(options.samples);
  const uint64_t token_seed = StreamSeed(options.seed, -1, 2);
  for (int i = 0; i < options.samples; ++i) {
    samples[i].resize(options.seq_len);
    samples[i][0] = c.bos_token_id;
    for (int j = 1; j < options.seq_len; ++j) {
      const uint64_t index = static_cast<uint64_t>(i) * options.seq_len + j;
      samples[i][j] = static_cast<int>(kernels::HashBits(token_seed, index) % c.vocab_size);
    }
  }
  QCAL_RETURN_IF_ERROR(be.Synchronize());
  r.setup_seconds += Since(t0);

  // Output-adaptive recipes (and saliency, for the Fisher): the gradient pass over the whole
  // full-precision model first.
  const bool output_adaptive = recipe.RunsGradientPass();
  OacMemoryStore oac;
  if (output_adaptive) {
    t0 = Clock::now();
    for (int b = 0; b < total; ++b) {
      QCAL_ASSIGN_OR_RETURN(model->block(b), DrawBlock(be, c, options.seed, b));
    }
    QCAL_RETURN_IF_ERROR(be.Synchronize());
    r.setup_seconds += Since(t0);
    const ChunkRange all{0, NumChunks(options.samples)};
    QCAL_ASSIGN_OR_RETURN(const GradientChunks chunks, GradientChunksOf(samples, all));
    // The statistics stay on the device when the pass can plan room for them beside its kept
    // boundaries (no host copies: a 7B model's are 28 GB, which page-locked host buffers take
    // 16 s to allocate and fill); else they go to page-locked host memory.
    GradientPassOptions pass = GradientPassOptionsOf(recipe, "");
    bool on_device = false;
    if (be.device() != Device::kHost) {
      GradientPassOptions keep = pass;
      keep.sink_device_bytes_per_block = OacMemoryStore::DeviceBytesPerBlock(c, pass.fisher);
      if (PlanGradientPass(*model, chunks, keep).ok()) {
        pass = keep;
        on_device = true;
      }
    }
    say(absl::StrCat("gradient pass: statistics kept in ",
                     on_device ? "device memory" : "page-locked host memory"));
    QCAL_ASSIGN_OR_RETURN(r.gradient_pass, RunGradientPass(*model, chunks, pass,
                                                           oac.Sink(be, all.end, on_device), log));
    r.has_gradient_pass = true;
    r.oac_on_device = on_device;
    say(absl::StrCat("gradient pass: ", r.gradient_pass.seconds, " s (forward ",
                     r.gradient_pass.forward_seconds, " s, backward ",
                     r.gradient_pass.backward_seconds, " s, Hessians ",
                     r.gradient_pass.hessian_seconds, " s), statistics ",
                     oac.bytes() / double(1 << 30), " GiB"));
  }
  const OacSource source = output_adaptive ? oac.Source() : OacSource();

  t0 = Clock::now();
  QCAL_ASSIGN_OR_RETURN(CalibActivations acts, EmbedCalibration(*model, samples));
  QCAL_RETURN_IF_ERROR(be.Synchronize());
  r.embed_seconds = Since(t0);
  say(absl::StrCat("embedded ", options.samples, " x ", options.seq_len, " tokens in ",
                   r.embed_seconds, " s"));

  int layers = 0;
  r.times.profile_retrain = options.retrain_profile;
  r.times.retrain_profiler_step = options.retrain_profiler_step;
  for (int b = 0; b < run; ++b) {
    if (!output_adaptive) {
      t0 = Clock::now();
      QCAL_ASSIGN_OR_RETURN(model->block(b), DrawBlock(be, c, options.seed, b));
      QCAL_RETURN_IF_ERROR(be.Synchronize());
      r.setup_seconds += Since(t0);
    }

    t0 = Clock::now();
    QCAL_ASSIGN_OR_RETURN(std::vector<LayerResult> block,
                          QuantizeBlock(*model, acts, recipe, &r.times, source));
    QCAL_RETURN_IF_ERROR(be.Synchronize());
    r.block_seconds.push_back(Since(t0));
    for (const LayerResult& l : block) {
      // A routed expert's count and fallback, once (its gate_proj's report).
      if (l.report.expert >= 0 && l.report.kind == LinearKind::kGate) {
        const int64_t n = l.report.routed_tokens;
        r.fallback_experts += l.report.fallback ? 1 : 0;
        r.routed_tokens += n;
        r.min_routed_tokens = r.min_routed_tokens < 0 ? n : std::min(r.min_routed_tokens, n);
        r.max_routed_tokens = std::max(r.max_routed_tokens, n);
      }
      r.mean_rel_error += l.report.rel_error;
      r.mean_rel_error_rtn += l.report.rel_error_rtn;
      r.mean_rel_error_er += l.report.rank > 0 ? l.report.rel_error_er : l.report.rel_error;
      r.mean_rank += l.report.rank;
      r.extra_params += static_cast<double>(l.report.rank) * (l.report.d_out + l.report.d_in);
      r.base_params += static_cast<double>(l.report.d_out) * l.report.d_in;
      ++layers;
    }
    const int64_t available = be.AvailableMemory();
    if (available >= 0 && (r.min_available_bytes < 0 || available < r.min_available_bytes)) {
      r.min_available_bytes = available;
    }
    model->block(b) = BlockWeights();  // this block is done: free its weights
    say(absl::StrCat("block ", b + 1, "/", run, ": ", r.block_seconds.back(), " s"));
  }
  if (layers > 0) {
    r.mean_rel_error /= layers;
    r.mean_rel_error_rtn /= layers;
    r.mean_rel_error_er /= layers;
    r.mean_rank /= layers;
  }
  double blocks_sum = 0;
  for (double s : r.block_seconds) blocks_sum += s;
  r.measured_seconds = r.embed_seconds + blocks_sum;
  if (r.extrapolated) {
    // The first block pays warm-up (library initialisation, pool growth): leave it out when others
    // ran.
    const bool skip_first = r.block_seconds.size() > 1;
    const double per_block = (blocks_sum - (skip_first ? r.block_seconds[0] : 0.0)) /
                             (r.block_seconds.size() - (skip_first ? 1 : 0));
    r.model_seconds = r.embed_seconds + per_block * total;
  } else {
    r.model_seconds = r.measured_seconds;
  }
  if (output_adaptive) {
    r.measured_seconds += r.gradient_pass.seconds;
    r.model_seconds += r.gradient_pass.seconds;
  }
  r.tflops = r.model_seconds > 0 ? r.flops.total() / r.model_seconds * 1e-12 : 0;
  if (output_adaptive) {
    // GPTQ alone on the same weights and tokens, for the ratio.
    acts = CalibActivations();
    model.reset();
    oac = OacMemoryStore();
    BenchOptions layer = options;
    layer.recipe.hessian = HessianKind::kLayer;
    say("the same recipe with hessian layer (GPTQ alone), for comparison");
    QCAL_ASSIGN_OR_RETURN(const BenchResult baseline, RunBench(be, layer, log));
    r.layer_model_seconds = baseline.model_seconds;
  }
  return r;
}

}  // namespace qcal::engine
