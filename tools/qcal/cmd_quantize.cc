// qcal quantize: one local quantization job (DESIGN section 6 and 7: local mode, paths as given,
// output exactly at --out). With the service built in, the job runs through an in-process
// coordinator and --workers workers (services/local); the engine-only build calls the engine
// directly. Both give byte-identical outputs.
#include <cstdio>
#include <memory>

#include "common/hf_config.h"
#include "common/logging.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/engine/export/checkpoint_writer.h"
#include "services/engine/pipeline.h"
#include "services/engine/recipe.h"
#include "tools/qcal/commands.h"

#if QCAL_WITH_SERVICE
#include "services/local/local_run.h"
#endif

namespace qcal::cli {
namespace {

struct QuantizeArgs {
  engine::JobOptions job;
  std::string recipe_path;
  bool json = false;
  bool table = false;
  std::string shard_size;
  int workers = 1;
  DeviceFlags dev;
};

absl::Status RunQuantize(QuantizeArgs& a) {
  QCAL_ASSIGN_OR_RETURN(a.job.recipe, engine::LoadRecipeFile(a.recipe_path));
  // What the model refuses of the recipe, named by the recipe's file before the job starts (the
  // job would name only its spec). A model directory that does not load is the job's to report.
  if (absl::StatusOr<ModelConfig> config = LoadModelConfig(a.job.model_dir); config.ok()) {
    engine::Recipe resolved = a.job.recipe;
    QCAL_RETURN_IF_ERROR(resolved.ResolveForModel(*config, a.recipe_path));
  }
  QCAL_ASSIGN_OR_RETURN(kernels::BackendOptions bo, a.dev.ToOptions());
  a.job.device = bo.device;
  a.job.threads = bo.threads;
  a.job.compute_dtype = a.dev.compute_dtype;
  if (!a.shard_size.empty()) {
    absl::StatusOr<int64_t> size = engine::ParseByteSize(a.shard_size);
    if (!size.ok()) return Annotate(size.status(), "--shard-size");
    a.job.shard_size = *size;
  }
  const engine::JobLogFn log = [](const std::string& line) { spdlog::info("quantize: {}", line); };
#if QCAL_WITH_SERVICE
  local::LocalRunOptions lo;
  lo.job = a.job;
  lo.workers = a.workers;
  QCAL_ASSIGN_OR_RETURN(engine::JobResult r, local::RunLocalJob(lo, log));
#else
  QCAL_ASSIGN_OR_RETURN(engine::JobResult r, engine::RunQuantizeJob(a.job, log));
#endif
  const auto& summary = r.report["summary"];
  if (r.peak_device_bytes >= 0) {
    spdlog::info("quantize: peak host RSS {:.2f} GiB, peak device memory {:.2f} GiB",
                 r.peak_rss_bytes / double(1ll << 30), r.peak_device_bytes / double(1ll << 30));
  } else {
    spdlog::info("quantize: peak host RSS {:.2f} GiB", r.peak_rss_bytes / double(1ll << 30));
  }
  if (a.json) {
    nlohmann::ordered_json j;
    if (r.has_perplexity) {
      j["perplexity"] = r.perplexity;
      j["perplexity_fp"] = r.perplexity_fp;
    }
    j["out"] = r.out_dir;
    j["summary"] = summary;
    std::printf("%s\n", j.dump().c_str());
  } else {
    const bool er = summary.contains("mean_rel_error_er");
    if (a.table) {
      std::printf("%-36s %12s %10s %10s", "layer", "d_out x d_in", "RTN err", "err");
      if (er) std::printf(" %6s %10s %8s", "rank", "err + ER", "extra %");
      std::printf("\n");
      for (const auto& l : r.report["layers"]) {
        const std::string shape = std::to_string(l["d_out"].get<int64_t>()) + "x" +
                                  std::to_string(l["d_in"].get<int64_t>());
        std::printf("%-36s %12s %10.5f %10.5f", l["name"].get<std::string>().c_str(), shape.c_str(),
                    l["rel_error_rtn"].get<double>(), l["rel_error"].get<double>());
        if (er && l.contains("rank")) {
          std::printf(" %6lld %10.5f %8.2f", static_cast<long long>(l["rank"].get<int64_t>()),
                      l["rel_error_er"].get<double>(), 100 * l["extra_params"].get<double>());
        }
        std::printf("\n");
      }
    }
    std::printf("wrote %s\n", r.out_dir.c_str());
    std::printf("layers %d  mean relative output error %.5f (RTN %.5f)  size %.2f MB -> %.2f MB\n",
                summary["layers"].get<int>(), summary["mean_rel_error"].get<double>(),
                summary["mean_rel_error_rtn"].get<double>(),
                summary["model_bytes_in"].get<double>() / 1e6,
                summary["model_bytes_out"].get<double>() / 1e6);
    if (er) {
      std::printf(
          "error reconstruction: mean relative output error %.5f, %lld extra parameters "
          "(%.2f%% of the quantized linears; OUT/adapter)\n",
          summary["mean_rel_error_er"].get<double>(),
          static_cast<long long>(summary["extra_params"].get<int64_t>()),
          summary["extra_params_pct"].get<double>());
    }
    if (r.has_perplexity) {
      std::printf("perplexity %.4f (full precision %.4f)\n", r.perplexity, r.perplexity_fp);
    }
  }
  return absl::OkStatus();
}

}  // namespace

RunFn AddQuantize(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  engine::JobOptions& j = a->job;
  app.add_option("--model", j.model_dir, "Model directory (Hugging Face layout, full precision)")
      ->required();
  app.add_option("--recipe", a->recipe_path, "Recipe YAML (see the README's recipe reference)")
      ->required();
  app.add_option("--calib", j.calib_path,
                 "Calibration text (.txt, or .jsonl with a \"text\" field)")
      ->required();
  app.add_option("--samples", j.samples, "Number of calibration samples N")
      ->required()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--seq-len", j.seq_len, "Calibration sample length L in tokens (BOS included)")
      ->required()
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--seed", j.seed, "Calibration sampling seed (default: 0)")
      ->check(NonNegativeInteger());
  app.add_option("--out", j.out_dir,
                 "Output directory (written to a temporary directory, then renamed)")
      ->required();
  app.add_flag("--overwrite", j.overwrite, "Replace an existing non-empty output directory");
  app.add_option("--eval-text", j.eval_text, "Evaluate perplexity on this text before and after");
  app.add_option("--eval-seq-len", j.eval_seq_len, "Evaluation window length (default: --seq-len)")
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--eval-max-windows", j.eval_max_windows,
                 "Evaluate only the first K windows (default: all)")
      ->check(CLI::PositiveNumber);
  app.add_option("--shard-size", a->shard_size,
                 "Largest output shard, e.g. 4GiB, 500MB or a byte count (default: 4GiB); larger "
                 "checkpoints are written as model-0000i-of-0000N.safetensors with an index");
  app.add_option("--scratch-dir", j.scratch_dir,
                 "Where finished blocks wait for the export (default: $TMPDIR or /tmp)");
  a->dev.Add(app);
#if QCAL_WITH_SERVICE
  app.add_option("--workers", a->workers,
                 "In-process workers sharing the job, each with --threads (default: 1)")
      ->check(CLI::Range(1, 64));
#endif
  app.add_flag("--table", a->table,
               "Also print the per-layer relative output errors (RTN vs the recipe)");
  app.add_flag("--json", a->json, "Print one JSON object: perplexity, perplexity_fp, out, summary");
  return [a] { return RunQuantize(*a); };
}

}  // namespace qcal::cli
