// qcal bench: GPTQ of a synthetic 7B-, 13B- or 70B-shaped model, timed per stage against the floors
// of DESIGN section 9 (services/engine/bench.h); or of a Mixtral-8x7B- or Qwen3-30B-A3B-shaped
// mixture-of-experts model through the MoE driver, with its fallback experts counted. Default
// compute dtype bf16, the GPU fast path. qcal bench --er: the device error-reconstruction ops
// (whitening, full and randomized SVD) on the 7B shape's linears, with their projected share of the
// 7B GPTQ job. qcal bench --abq: the ABQ arbitrary-bit GEMMs per shape and token count against
// cuBLAS (kernels/abq_bench.h), with bytes moved as a share of the H100/H200 HBM bandwidth. qcal
// bench --decode: greedy decoding tokens/s of a synthetic model of --shape, dense bf16 against
// W4A16, W4A8 and W2*A8 through the ABQ kernels (services/engine/bench.h).
#include <cinttypes>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/abq_bench.h"
#include "nlohmann/json.hpp"
#include "services/engine/bench.h"
#include "services/engine/oac/oac_job.h"
#include "services/engine/recipe.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

// The bf16 tensor-core ceiling measured on an H100 (DESIGN section 9).
constexpr double kCeilingTflops = 790;
// The 7B GPTQ W4 g128 job on one H100 (docs/BENCHMARKS.md, 2026-11-22, median of three runs): what
// the error-reconstruction projection is a share of.
constexpr double kGptq7bJobSeconds = 27.75;
// The HBM bandwidth that qcal bench --abq reports bytes moved against (H200: 4.8 TB/s).
constexpr double kHbmBytesPerSecond = 4.8e12;

struct BenchArgs {
  std::string shape = "7b";
  int samples = 128;
  int seq_len = 2048;
  int blocks = -1;  // -1: all for 7b and 13b, 3 for 70b and the MoE shapes
  uint64_t seed = 0;
  int64_t retrain_profiler_step = -1;
  bool retrain_profile = false;
  // The reference GPTQ's measured seconds per block on the same GPU and shape; 0: no ratio.
  double reference_seconds_per_layer = 0;
  bool json = false;
  bool er = false;   // the error-reconstruction bench instead
  bool abq = false;  // the ABQ GEMM bench instead
  kernels::AbqBenchOptions abq_options;
  bool decode = false;  // the decode bench instead
  engine::DecodeBenchOptions decode_options;
  std::string recipe_path;  // empty: GPTQ W4 g128
  engine::ErBenchOptions er_options;
  DeviceFlags dev;
};

absl::Status RunErBench(BenchArgs& a) {
  QCAL_ASSIGN_OR_RETURN(kernels::BackendOptions bo, a.dev.ToOptions());
  QCAL_ASSIGN_OR_RETURN(auto backend, kernels::CreateBackend(bo));
  engine::ErBenchOptions& o = a.er_options;
  o.seed = a.seed;
  QCAL_ASSIGN_OR_RETURN(engine::ErBenchResult r,
                        engine::RunErBench(*backend, o, [](const std::string& line) {
                          spdlog::info("bench --er: {}", line);
                        }));
  const engine::ErProjection& p = r.projection_7b;
  const double projected = p.randomized_seconds + p.whitening_seconds;
  if (a.json) {
    nlohmann::ordered_json j;
    j["bench"] = "error_reconstruction";
    j["device"] = r.device_kind;
    j["compute_dtype"] = a.dev.compute_dtype;
    j["rank"] = o.rank;
    j["oversample"] = o.oversample;
    j["power_iterations"] = o.power_iterations;
    j["tokens"] = o.tokens;
    j["damp"] = o.damp;
    j["runs"] = o.runs;
    nlohmann::ordered_json layers = nlohmann::ordered_json::array();
    for (const engine::ErBenchLayer& l : r.layers) {
      layers.push_back({{"d_out", l.d_out},
                        {"d_in", l.d_in},
                        {"seconds",
                         {{"whitening", l.whitening_seconds},
                          {"full", l.full_seconds},
                          {"randomized", l.randomized_seconds}}},
                        {"error_before", l.error_before},
                        {"error_after_full", l.error_after_full},
                        {"error_after_randomized", l.error_after_randomized},
                        {"error_ratio", l.error_after_randomized / l.error_after_full}});
    }
    j["layers"] = layers;
    if (p.blocks > 0) {
      j["projection_7b"] = {{"blocks", p.blocks},
                            {"randomized_seconds", p.randomized_seconds},
                            {"whitening_seconds", p.whitening_seconds},
                            {"seconds", projected},
                            {"full_seconds", p.full_seconds + p.whitening_seconds},
                            {"gptq_job_seconds", kGptq7bJobSeconds},
                            {"share_of_gptq_job", projected / kGptq7bJobSeconds}};
    }
    std::printf("%s\n", j.dump().c_str());
    return absl::OkStatus();
  }
  std::printf(
      "qcal bench --er: error reconstruction, rank %d (randomized: oversample %d, %d power "
      "iterations), Gram of %d random tokens with correlated channels, damp %g; median of %d runs "
      "after a warm-up\n",
      o.rank, o.oversample, o.power_iterations, o.tokens, o.damp, o.runs);
  std::printf("device: %s\n", r.device_kind.c_str());
  std::printf("  %-15s %10s %10s %11s %8s   %-11s %-11s %-11s %7s\n", "d_out x d_in", "whitening",
              "full SVD", "randomized", "speedup", "error_in", "after_full", "after_rand", "ratio");
  for (const engine::ErBenchLayer& l : r.layers) {
    const std::string shape = std::to_string(l.d_out) + " x " + std::to_string(l.d_in);
    std::printf("  %-15s %8.4f s %8.3f s %9.4f s %7.0fx   %-11.5g %-11.5g %-11.5g %7.4f\n",
                shape.c_str(), l.whitening_seconds, l.full_seconds, l.randomized_seconds,
                l.full_seconds / l.randomized_seconds, l.error_before, l.error_after_full,
                l.error_after_randomized, l.error_after_randomized / l.error_after_full);
  }
  if (p.blocks > 0) {
    std::printf(
        "7B shape (%d blocks x 7 linears, 4 whitening factors per block), randomized SVD: "
        "%.2f s (reconstruction %.2f s + whitening %.2f s) = %.1f%% of the %.2f s 7B GPTQ job "
        "(docs/BENCHMARKS.md); with the full SVD: %.0f s\n",
        p.blocks, projected, p.randomized_seconds, p.whitening_seconds,
        100 * projected / kGptq7bJobSeconds, kGptq7bJobSeconds,
        p.full_seconds + p.whitening_seconds);
  }
  return absl::OkStatus();
}

absl::Status RunAbqBench(BenchArgs& a) {
  kernels::AbqBenchOptions& o = a.abq_options;
  o.seed = a.seed;
  QCAL_ASSIGN_OR_RETURN(std::vector<kernels::AbqBenchRow> rows,
                        kernels::RunAbqBench(o, [](const std::string& line) {
                          spdlog::info("bench --abq: {}", line);
                        }));
  // cuBLAS bf16 per (shape, m): what the speedups are relative to.
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> bf16;
  for (const kernels::AbqBenchRow& r : rows) {
    if (r.kernel == "cublas") bf16[{r.d_out, r.d_in, r.m}] = r.seconds;
  }
  // (0 for the empty launch, which computes nothing.)
  auto speedup = [&](const kernels::AbqBenchRow& r) {
    const auto it = bf16.find({r.d_out, r.d_in, r.m});
    return it == bf16.end() || r.kernel == "null" ? 0.0 : it->second / r.seconds;
  };
  if (a.json) {
    nlohmann::ordered_json j;
    j["bench"] = "abq";
    j["group_size"] = o.group_size;
    j["iters"] = o.iters;
    j["timing"] = o.timing == kernels::AbqTiming::kSequence ? "sequence" : "alone";
    j["hbm_bytes_per_second"] = kHbmBytesPerSecond;
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const kernels::AbqBenchRow& r : rows) {
      list.push_back({{"d_out", r.d_out},
                      {"d_in", r.d_in},
                      {"m", r.m},
                      {"config", r.config},
                      {"kernel", r.kernel},
                      {"seconds", r.seconds},
                      {"bytes", r.bytes},
                      {"hbm_share", r.bytes / r.seconds / kHbmBytesPerSecond},
                      {"speedup_vs_cublas_bf16", speedup(r)}});
    }
    j["rows"] = list;
    std::printf("%s\n", j.dump().c_str());
    return absl::OkStatus();
  }
  const bool sequence = o.timing == kernels::AbqTiming::kSequence;
  std::printf(
      "qcal bench --abq: whole-layer GEMM time (ABQ prologue included), weights g%d, mean of %d "
      "runs after 3 warm-ups, %s; bytes = the least each call moves, as a share of %.1f TB/s\n",
      o.group_size, o.iters,
      sequence ? "per call of a CUDA graph of calls back to back on weight copies that pass twice "
                 "L2, after an L2 eviction"
               : "each run alone after an L2 eviction",
      kHbmBytesPerSecond * 1e-12);
  std::printf("%-14s %4s  %-7s %-11s %10s %10s %8s %8s\n", "d_out x d_in", "m", "config", "kernel",
              "us", "MB", "HBM %", "x bf16");
  for (const kernels::AbqBenchRow& r : rows) {
    const std::string shape = std::to_string(r.d_out) + " x " + std::to_string(r.d_in);
    std::printf("%-14s %4lld  %-7s %-11s %10.2f %10.2f %7.1f%% %8.2f\n", shape.c_str(),
                static_cast<long long>(r.m), r.config.c_str(), r.kernel.c_str(), r.seconds * 1e6,
                r.bytes * 1e-6, 100 * r.bytes / r.seconds / kHbmBytesPerSecond, speedup(r));
  }
  return absl::OkStatus();
}

absl::Status RunDecodeBench(BenchArgs& a) {
  QCAL_ASSIGN_OR_RETURN(engine::BenchShape shape, engine::BenchShapeNamed(a.shape));
  QCAL_ASSIGN_OR_RETURN(kernels::BackendOptions bo, a.dev.ToOptions());
  QCAL_ASSIGN_OR_RETURN(auto backend, kernels::CreateBackend(bo));
  engine::DecodeBenchOptions& o = a.decode_options;
  o.config = shape.config;
  o.group_size = a.abq_options.group_size;
  o.seed = a.seed;
  QCAL_ASSIGN_OR_RETURN(engine::DecodeBenchResult r,
                        engine::RunDecodeBench(*backend, o, [](const std::string& line) {
                          spdlog::info("bench --decode: {}", line);
                        }));
  double dense_rate = 0;
  std::map<std::string, std::vector<int>> b1_ids;  // config -> the b1 kernel's tokens
  for (const engine::DecodeBenchRow& row : r.rows) {
    if (row.kernel == "dense") dense_rate = row.tokens_per_second;
    if (row.kernel == "b1") b1_ids[row.config] = row.generated;
  }
  // int8 computes b1's integers: its greedy tokens must be b1's ("-" where there is no b1 row).
  auto same_as_b1 = [&](const engine::DecodeBenchRow& row) -> std::string {
    const auto it = b1_ids.find(row.config);
    if (row.kernel != "int8" || it == b1_ids.end()) return "-";
    return it->second == row.generated ? "yes" : "NO";
  };
  if (a.json) {
    nlohmann::ordered_json j;
    j["bench"] = "decode";
    j["shape"] = shape.name;
    j["device"] = r.device_kind;
    j["compute_dtype"] = a.dev.compute_dtype;
    j["dense_dtype"] = r.dense_dtype;
    j["group_size"] = o.group_size;
    j["prompt"] = o.prompt;
    j["tokens"] = o.tokens;
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const engine::DecodeBenchRow& row : r.rows) {
      list.push_back(
          {{"config", row.config},
           {"kernel", row.kernel},
           {"seconds", row.seconds},
           {"tokens_per_second", row.tokens_per_second},
           {"speedup_vs_dense", dense_rate > 0 ? row.tokens_per_second / dense_rate : 0.0},
           {"weight_bytes", row.weight_bytes},
           {"device_bytes", row.device_bytes},
           {"same_tokens_as_b1", same_as_b1(row)}});
    }
    j["rows"] = list;
    std::printf("%s\n", j.dump().c_str());
    return absl::OkStatus();
  }
  const ModelConfig& c = shape.config;
  std::printf(
      "qcal bench --decode: %s shape (hidden %d, intermediate %d, %d layers), greedy decoding "
      "with a KV cache, batch 1: %d prompt tokens, then %d timed steps; compute %s, dense "
      "weights %s, quantized weights RTN g%d\n",
      shape.name.c_str(), c.hidden_size, c.intermediate_size, c.num_layers, o.prompt, o.tokens,
      a.dev.compute_dtype.c_str(), r.dense_dtype.c_str(), o.group_size);
  std::printf("device: %s\n", r.device_kind.c_str());
  std::printf("%-7s %-6s %10s %9s %8s %10s %10s %8s\n", "config", "kernel", "tokens/s", "ms/token",
              "x dense", "weights GB", "device GB", "= b1");
  for (const engine::DecodeBenchRow& row : r.rows) {
    std::printf("%-7s %-6s %10.1f %9.3f %8.2f %10.2f %10.2f %8s\n", row.config.c_str(),
                row.kernel.c_str(), row.tokens_per_second, 1e3 / row.tokens_per_second,
                dense_rate > 0 ? row.tokens_per_second / dense_rate : 0.0, row.weight_bytes * 1e-9,
                row.device_bytes * 1e-9, same_as_b1(row).c_str());
  }
  for (const engine::DecodeBenchRow& row : r.rows) {
    if (same_as_b1(row) == "NO") {
      return absl::InternalError(
          absl::StrCat("bench --decode: the int8 kernel's tokens differ "
                       "from b1's for ",
                       row.config));
    }
  }
  return absl::OkStatus();
}

absl::Status RunBench(BenchArgs& a) {
  if (a.er) return RunErBench(a);
  if (a.abq) return RunAbqBench(a);
  if (a.decode) return RunDecodeBench(a);
  QCAL_ASSIGN_OR_RETURN(engine::BenchShape shape, engine::BenchShapeNamed(a.shape));
  const double reference_seconds = a.reference_seconds_per_layer * shape.config.num_layers;
  QCAL_ASSIGN_OR_RETURN(kernels::BackendOptions bo, a.dev.ToOptions());
  QCAL_ASSIGN_OR_RETURN(auto backend, kernels::CreateBackend(bo));
  engine::BenchOptions options;
  options.config = shape.config;
  options.samples = a.samples;
  options.seq_len = a.seq_len;
  const bool moe = shape.config.moe();
  options.blocks = a.blocks >= 0 ? a.blocks : (a.shape == "70b" || moe ? 3 : 0);
  options.seed = a.seed;
  options.retrain_profiler_step = a.retrain_profiler_step;
  options.retrain_profile = a.retrain_profile;
  std::string recipe_name = "GPTQ W4 g128";
  if (!a.recipe_path.empty()) {
    QCAL_ASSIGN_OR_RETURN(options.recipe, engine::LoadRecipeFile(a.recipe_path));
    recipe_name = "recipe " + a.recipe_path;
  }
  QCAL_ASSIGN_OR_RETURN(engine::BenchResult r,
                        engine::RunBench(*backend, options, [](const std::string& line) {
                          spdlog::info("bench: {}", line);
                        }));
  const double per_block =
      r.block_seconds.empty() ? 0 : (r.model_seconds - r.embed_seconds) / r.blocks_total;
  const double ceiling_share = r.tflops / kCeilingTflops;
  const bool floors = shape.ideal_floor_seconds > 0;
  const ModelConfig& c = shape.config;
  // Tokens each routed expert gets in a block if the router spreads them evenly.
  const double even_share =
      moe ? double(a.samples) * a.seq_len * c.num_experts_per_tok / c.num_experts : 0.0;
  if (a.json) {
    nlohmann::ordered_json j;
    j["shape"] = shape.name;
    j["recipe"] = recipe_name;
    j["device"] = r.device_kind;
    j["compute_dtype"] = a.dev.compute_dtype;
    j["samples"] = a.samples;
    j["seq_len"] = a.seq_len;
    j["blocks_run"] = r.blocks_run;
    j["blocks_total"] = r.blocks_total;
    j["extrapolated"] = r.extrapolated;
    j["seconds"] = {{"model", r.model_seconds},
                    {"measured", r.measured_seconds},
                    {"per_block", per_block},
                    {"embed", r.embed_seconds},
                    {"smooth", r.times.smooth},
                    {"forward", r.times.forward},
                    {"hessian", r.times.hessian},
                    {"solve", r.times.solve},
                    {"solve_factor", r.times.factor},
                    {"solve_quantize", r.times.quantize},
                    {"solve_error", r.times.error},
                    {"solve_reconstruct", r.times.reconstruct},
                    {"solve_transfer", r.times.transfer},
                    {"retrain", r.times.retrain},
                    {"retrain_steps",
                     {{"weights", r.times.retrain_parts.weights},
                      {"forward", r.times.retrain_parts.forward},
                      {"backward", r.times.retrain_parts.backward},
                      {"regularizer", r.times.retrain_parts.regularizer},
                      {"params", r.times.retrain_parts.params},
                      {"optimizer", r.times.retrain_parts.optimizer},
                      {"setup", r.times.retrain_parts.setup},
                      {"mse", r.times.retrain_parts.mse},
                      {"finish", r.times.retrain_parts.finish},
                      {"gather", r.times.retrain_parts.gather},
                      {"install", r.times.retrain_parts.install}}},
                    {"setup_untimed", r.setup_seconds},
                    {"blocks", r.block_seconds}};
    j["pflop"] = {{"forward", r.flops.forward * 1e-15},
                  {"hessian", r.flops.hessian * 1e-15},
                  {"solve", r.flops.solve * 1e-15},
                  {"total", r.flops.total() * 1e-15}};
    j["tflops"] = r.tflops;
    j["ceiling_tflops"] = kCeilingTflops;
    j["ceiling_share"] = ceiling_share;
    j["floors"] = {{"ideal_seconds", nullptr},
                   {"library_seconds", nullptr},
                   {"floors_scaled_from_7b", shape.floors_scaled},
                   {"reference_seconds_per_layer", nullptr},
                   {"reference_seconds", nullptr},
                   {"x_ideal", nullptr},
                   {"x_library", nullptr},
                   {"speedup_vs_reference", nullptr}};
    if (floors) {  // null for the MoE shapes, which have none
      j["floors"]["ideal_seconds"] = shape.ideal_floor_seconds;
      j["floors"]["library_seconds"] = shape.library_floor_seconds;
      j["floors"]["x_ideal"] = r.model_seconds / shape.ideal_floor_seconds;
      j["floors"]["x_library"] = r.model_seconds / shape.library_floor_seconds;
    }
    if (reference_seconds > 0) {  // null without --reference-seconds-per-layer
      j["floors"]["reference_seconds_per_layer"] = a.reference_seconds_per_layer;
      j["floors"]["reference_seconds"] = reference_seconds;
      j["floors"]["speedup_vs_reference"] = reference_seconds / r.model_seconds;
    }
    j["mean_rel_error"] = r.mean_rel_error;
    j["mean_rel_error_rtn"] = r.mean_rel_error_rtn;
    j["mean_rel_error_er"] = r.mean_rel_error_er;
    j["mean_rank"] = r.mean_rank;
    j["extra_params_pct"] = r.base_params > 0 ? 100 * r.extra_params / r.base_params : 0.0;
    j["min_available_bytes"] = r.min_available_bytes;
    if (moe) {
      j["moe"] = {{"experts", c.num_experts},
                  {"top_k", c.num_experts_per_tok},
                  {"min_tokens", r.moe_min_tokens},
                  {"fallback_experts", r.fallback_experts},
                  {"experts_run", c.num_experts * r.blocks_run},
                  {"routed_tokens_min", r.min_routed_tokens},
                  {"routed_tokens_max", r.max_routed_tokens},
                  {"routed_tokens_even_share", even_share}};
    }
    if (r.has_gradient_pass) {
      j["gradient_pass"] = engine::GradientPassJson(r.gradient_pass);
      j["gradient_pass"]["statistics_on_device"] = r.oac_on_device;
      j["layer_model_seconds"] = r.layer_model_seconds;
      j["x_layer"] = r.layer_model_seconds > 0 ? r.model_seconds / r.layer_model_seconds : 0.0;
    }
    std::printf("%s\n", j.dump().c_str());
    return absl::OkStatus();
  }
  const std::string mlp =
      moe ? absl::StrCat(c.num_experts, " experts of intermediate ", c.moe_intermediate_size,
                         ", top ", c.num_experts_per_tok)
          : absl::StrCat("intermediate ", c.intermediate_size);
  std::printf(
      "qcal bench: %s shape (hidden %d, %s, %d heads / %d KV, %d layers), %s, %d x %d "
      "calibration tokens, compute %s\n",
      shape.name.c_str(), c.hidden_size, mlp.c_str(), c.num_heads, c.num_kv_heads, c.num_layers,
      recipe_name.c_str(), a.samples, a.seq_len, a.dev.compute_dtype.c_str());
  std::printf("device: %s\n", r.device_kind.c_str());
  if (r.extrapolated) {
    std::printf("ran %d of %d blocks: the whole-model time is EXTRAPOLATED from them%s\n",
                r.blocks_run, r.blocks_total,
                r.blocks_run > 1 ? " (the first, warm-up, block left out)" : "");
  } else {
    std::printf("ran all %d blocks: the whole-model time is measured\n", r.blocks_total);
  }
  const double staged =
      r.times.smooth + r.times.forward + r.times.hessian + r.times.solve + r.times.retrain;
  auto row = [&](const char* name, double s) {
    std::printf("  %-10s %9.3f s  %5.1f%%\n", name, s, staged > 0 ? 100 * s / staged : 0.0);
  };
  std::printf("stages over the %d blocks run:\n", r.blocks_run);
  if (r.times.smooth > 0) row("smoothing", r.times.smooth);
  row("forward", r.times.forward);
  row("hessians", r.times.hessian);
  row("solves", r.times.solve);
  if (r.times.retrain > 0) {
    row("retraining", r.times.retrain);
    const engine::RetrainSeconds& t = r.times.retrain_parts;
    if (r.times.profile_retrain) {
      std::printf(
          "    training steps: fake-quantized bases %.3f s, forward %.3f s, backward %.3f s, "
          "regularizer %.3f s, parameter gradients %.3f s, AdamW %.3f s\n",
          t.weights, t.forward, t.backward, t.regularizer, t.params, t.optimizer);
      std::printf(
          "    of which: weight-gradient products dyT.x %.3f s (in backward), clipping STE sums "
          "%.3f s (in parameter gradients), attention %.3f s (in forward) and %.3f s (in "
          "backward)\n",
          t.weight_grads, t.clip_grads, t.attention_forward, t.attention_backward);
    } else {
      std::printf("    training steps: not broken down (--retrain-profile does, at a cost)\n");
    }
    std::printf(
        "    outside the steps: setup %.3f s, output MSE before and after %.3f s, parameters back "
        "and codes re-rounded %.3f s, gathering the samples %.3f s, installing, pushing and "
        "output errors %.3f s\n",
        t.setup, t.mse, t.finish, t.gather, t.install);
  }
  std::printf(
      "    factorizations %.3f s, column loops and updates %.3f s, output errors %.3f s, "
      "transfers %.3f s, error reconstruction %.3f s\n",
      r.times.factor, r.times.quantize, r.times.error, r.times.transfer, r.times.reconstruct);
  if (r.times.prefetched_factors > 0) {
    std::printf(
        "    %d output-adaptive factorizations ran ahead on the side queue (the wait for them is "
        "in factorizations)\n",
        r.times.prefetched_factors);
  }
  std::printf("  %-10s %9.3f s\n", "embedding", r.embed_seconds);
  if (r.has_gradient_pass) {
    const engine::GradientPassStats& g = r.gradient_pass;
    std::printf(
        "gradient pass (whole model, before block 0): %.3f s (forward %.3f s, backward %.3f s "
        "with the loss head %.3f s, Hessians %.3f s, handing them over %.3f s; statistics kept "
        "in %s memory; boundaries every %d blocks; peak device %.2f GiB), loss %.4f per token\n",
        g.seconds, g.forward_seconds, g.backward_seconds, g.head_seconds, g.hessian_seconds,
        g.sink_seconds, r.oac_on_device ? "device" : "host", g.boundary_every,
        g.peak_device_bytes / double(1 << 30),
        g.tokens > 0 ? g.loss / static_cast<double>(g.tokens) : 0.0);
  }
  std::printf("per block:");
  for (double s : r.block_seconds) std::printf(" %.3f", s);
  std::printf(" s\n");
  std::printf("whole model: %.2f s (%.3f s per block), excluding disk I/O; untimed setup %.2f s\n",
              r.model_seconds, per_block, r.setup_seconds);
  if (r.has_gradient_pass) {
    std::printf("the same recipe with hessian layer (GPTQ alone): %.2f s; this job is %.2fx that\n",
                r.layer_model_seconds,
                r.layer_model_seconds > 0 ? r.model_seconds / r.layer_model_seconds : 0.0);
  }
  std::printf(
      "achieved: %.1f TFLOP/s of useful work = %.1f%% of the %.0f TFLOP/s bf16 ceiling "
      "(counted: forward %.3f, Hessians %.3f, solves %.3f PFLOP)\n",
      r.tflops, 100 * ceiling_share, kCeilingTflops, r.flops.forward * 1e-15,
      r.flops.hessian * 1e-15, r.flops.solve * 1e-15);
  if (floors) {
    std::printf(
        "floors (DESIGN section 9%s): %.2fx the ideal %.0f s, %.2fx the library-kernel %.0f s",
        shape.floors_scaled ? ", 7B's scaled by FLOPs" : "",
        r.model_seconds / shape.ideal_floor_seconds, shape.ideal_floor_seconds,
        r.model_seconds / shape.library_floor_seconds, shape.library_floor_seconds);
  } else {
    std::printf("floors: none for this shape (DESIGN section 9 has no MoE figures)");
  }
  if (reference_seconds > 0) {
    std::printf("; %.1fx faster than the reference GPTQ at the given %.3g s a layer (%.0f s)",
                reference_seconds / r.model_seconds, a.reference_seconds_per_layer,
                reference_seconds);
  }
  std::printf("\n");
  std::printf("mean relative output error %.5f (RTN %.5f)\n", r.mean_rel_error,
              r.mean_rel_error_rtn);
  if (moe) {
    std::printf(
        "fallback experts (fewer than moe.min_tokens = %d routed tokens): %d of %d in the %d "
        "blocks run; routed tokens per expert %lld to %lld (an even share is %.0f). Zero is "
        "expected with random tokens: the router's rows are drawn i.i.d. like every other "
        "weight, so no expert is favoured and each gets a share of the even one's order, far "
        "above min_tokens at 128 x 2048 tokens; real text routes unevenly and can leave experts "
        "below it\n",
        r.moe_min_tokens, r.fallback_experts, c.num_experts * r.blocks_run, r.blocks_run,
        static_cast<long long>(r.min_routed_tokens), static_cast<long long>(r.max_routed_tokens),
        even_share);
  }
  if (r.mean_rank > 0) {
    std::printf(
        "mean relative output error after reconstruction %.5f; mean rank %.1f, extra parameters "
        "%.2f%%\n",
        r.mean_rel_error_er, r.mean_rank,
        r.base_params > 0 ? 100 * r.extra_params / r.base_params : 0.0);
  }
  return absl::OkStatus();
}

}  // namespace

RunFn AddBench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  a->dev.compute_dtype = "bf16";
  app.add_option("--shape", a->shape,
                 "Model shape: 7b, 13b, 70b, mixtral-8x7b or qwen3-30b-a3b (default: 7b)")
      ->check(CLI::IsMember({"7b", "13b", "70b", "mixtral-8x7b", "qwen3-30b-a3b"}));
  app.add_option("--samples", a->samples, "Calibration samples (default: 128)")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--seq-len", a->seq_len, "Calibration sample length in tokens (default: 2048)")
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--blocks", a->blocks,
                 "Blocks to quantize; fewer than the model has extrapolates the total "
                 "(default: all for 7b and 13b, 3 for 70b, mixtral-8x7b and qwen3-30b-a3b)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--seed", a->seed, "Seed of the random weights and tokens (default: 0)")
      ->check(NonNegativeInteger());
  app.add_flag("--retrain-profile", a->retrain_profile,
               "With a retraining recipe: time the parts of every training step (synchronizes "
               "the device several times a step, which adds to the block times)");
  app.add_option("--retrain-profiler-step", a->retrain_profiler_step,
                 "With a retraining recipe: bracket this training step (0-based) of every block "
                 "with cudaProfilerStart/Stop, for ncu or nsys --profile-from-start off");
  app.add_option("--recipe", a->recipe_path,
                 "Recipe YAML to run instead of GPTQ W4 g128 (smoothing, error reconstruction "
                 "and activation bits included; hessian output_adaptive* adds the gradient pass "
                 "and a GPTQ-alone run to compare with); the FLOP counts stay GPTQ's")
      ->check(CLI::ExistingFile);
  app.add_flag("--er", a->er,
               "Time error reconstruction (whitening, full and randomized SVD) on the 7B shape's "
               "linears instead of GPTQ; --shape, --samples, --seq-len and --blocks are ignored");
  app.add_option("--er-rank", a->er_options.rank, "With --er: the correction's rank (default: 64)")
      ->check(CLI::PositiveNumber);
  app.add_option("--er-tokens", a->er_options.tokens,
                 "With --er: calibration tokens of the Gram matrices (default: 2048)")
      ->check(CLI::PositiveNumber);
  app.add_option("--er-runs", a->er_options.runs,
                 "With --er: timed runs of each op after a warm-up; the median is reported "
                 "(default: 3)")
      ->check(CLI::PositiveNumber);
  app.add_flag("--abq", a->abq,
               "Time the ABQ arbitrary-bit GEMMs (b1 and int8 IMMA, weight-only A16) against "
               "cuBLAS bf16 and int8 per shape and token count on CUDA device 0; the other "
               "options except --seed and --json are ignored");
  app.add_option("--abq-tokens", a->abq_options.tokens,
                 "With --abq: token counts m (default: 1 4 8 16 64)")
      ->check(CLI::PositiveNumber);
  app.add_option_function<std::vector<std::string>>(
         "--abq-shapes",
         [a](const std::vector<std::string>& shapes) {
           a->abq_options.shapes.clear();
           for (const std::string& s : shapes) {
             int64_t n = 0, k = 0;
             char x = 0, extra = 0;
             if (std::sscanf(s.c_str(), "%" SCNd64 "%c%" SCNd64 "%c", &n, &x, &k, &extra) != 3 ||
                 x != 'x' || n < 1 || k < 1) {
               throw CLI::ValidationError(
                   "--abq-shapes", "expected D_OUTxD_IN with positive sizes, got '" + s + "'");
             }
             a->abq_options.shapes.push_back({n, k});
           }
         },
         "With --abq: GEMM shapes d_outxd_in (default: 4096x4096 11008x4096 4096x11008 "
         "8192x28672)")
      ->expected(1, 64);
  app.add_option("--abq-iters", a->abq_options.iters,
                 "With --abq: timed runs per measurement after 3 warm-ups (default: 20)")
      ->check(CLI::PositiveNumber);
  app.add_option("--abq-timing", a->abq_options.timing,
                 "With --abq: 'alone' (each call between its own events after an L2 eviction: "
                 "latency, launch included) or 'sequence' (per call of a CUDA graph of calls back "
                 "to back on copies of the weights that pass twice the L2 size: a decode step's "
                 "chain of layers) (default: alone)")
      ->transform(CLI::CheckedTransformer(
          std::map<std::string, kernels::AbqTiming>{{"alone", kernels::AbqTiming::kAlone},
                                                    {"sequence", kernels::AbqTiming::kSequence}},
          CLI::ignore_case));
  app.add_option("--abq-group", a->abq_options.group_size,
                 "With --abq or --decode: weight group size, -1 or a multiple of 32 (default: "
                 "128)");
  app.add_flag("--decode", a->decode,
               "Time greedy decoding (batch 1, KV cache) of a synthetic --shape model: dense bf16 "
               "against W4A16 (a16 kernel), W4A8 and W2*A8 (b1 and int8 kernels); --samples, "
               "--seq-len, --blocks and --recipe are ignored");
  app.add_option("--decode-tokens", a->decode_options.tokens,
                 "With --decode: timed decode steps (default: 64)")
      ->check(CLI::Range(1, 1 << 16));
  app.add_option("--decode-prompt", a->decode_options.prompt,
                 "With --decode: prompt tokens, prefilled before the timed steps (default: 16)")
      ->check(CLI::Range(1, 1 << 16));
  a->dev.Add(app);
  app.add_option("--reference-seconds-per-layer", a->reference_seconds_per_layer,
                 "The reference GPTQ's measured seconds per layer on this GPU and shape, for the "
                 "printed ratio (docs/BENCHMARKS.md; H200, 7b: 9.61). Default: no ratio")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--json", a->json, "Print one JSON object");
  return [a] { return RunBench(*a); };
}

}  // namespace qcal::cli
