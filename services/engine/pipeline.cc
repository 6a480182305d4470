#include "services/engine/pipeline.h"

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/files.h"
#include "common/memory_usage.h"
#include "common/status.h"
#include "services/engine/driver/memory_plan.h"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/export/checkpoint_writer.h"
#include "services/engine/oac/oac_job.h"

namespace qcal::engine {
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

constexpr const char* kQcalVersion = "0.1.0";

absl::StatusOr<nlohmann::ordered_json> HashInput(const std::string& role, const std::string& path,
                                                 const std::string& rel) {
  QCAL_ASSIGN_OR_RETURN(std::string sha, Sha256File(path));
  nlohmann::ordered_json j;
  j["role"] = role;
  if (!rel.empty()) j["path"] = rel;
  j["sha256"] = sha;
  return j;
}

int64_t DirBytes(const fs::path& dir, const std::string& suffix) {
  int64_t total = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() >= suffix.size() &&
        n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0) {
      total += static_cast<int64_t>(e.file_size(ec));
    }
  }
  return total;
}

// The model files an input record lists: config, weights (and index), tokenizer.
std::vector<std::string> ModelFiles(const std::string& dir) {
  std::vector<std::string> weights;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0) weights.push_back(n);
  }
  std::sort(weights.begin(), weights.end());
  std::vector<std::string> files = {"config.json"};
  files.insert(files.end(), weights.begin(), weights.end());
  if (fs::exists(fs::path(dir) / "model.safetensors.index.json"))
    files.push_back("model.safetensors.index.json");
  for (const char* f : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}) {
    if (fs::exists(fs::path(dir) / f)) files.push_back(f);
  }
  return files;
}

}  // namespace

absl::Status JobOptions::Validate() const {
  QCAL_RETURN_IF_ERROR(recipe.Validate());
  if (recipe.RunsGradientPass() && seq_len < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "recipe key \"hessian\" is ", RecipeName(recipe.hessian),
        ": the gradient pass needs seq_len >= 2 (a next-token prediction per sample), got ",
        seq_len));
  }
  if (model_dir.empty()) return absl::InvalidArgumentError("the model directory is required");
  if (calib_path.empty()) return absl::InvalidArgumentError("the calibration text is required");
  if (samples < 1)
    return absl::InvalidArgumentError(absl::StrCat("samples must be >= 1, got ", samples));
  if (seq_len < 2)
    return absl::InvalidArgumentError(absl::StrCat("seq_len must be >= 2, got ", seq_len));
  if (compute_dtype != "f32" && compute_dtype != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("compute dtype must be f32 or bf16, got \"", compute_dtype, "\""));
  }
  if (shard_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard size must be at least 1 byte, got ", shard_size));
  }
  if (eval_seq_len < 0 || eval_seq_len == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("eval_seq_len must be >= 2, got ", eval_seq_len));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<JobSession>> JobSession::Open(const JobOptions& o, JobLogFn log,
                                                             std::optional<GangPlan> gang) {
  QCAL_RETURN_IF_ERROR(o.Validate());
  if (gang) {
    QCAL_RETURN_IF_ERROR(gang->Validate());
    if (gang->total_chunks != NumChunks(o.samples)) {
      return absl::InvalidArgumentError(absl::StrCat("the gang plan has ", gang->total_chunks,
                                                     " chunks; ", o.samples, " samples make ",
                                                     NumChunks(o.samples)));
    }
  }
  auto s = std::unique_ptr<JobSession>(new JobSession());
  s->options_ = o;
  s->log_ = std::move(log);
  auto t0 = Clock::now();
  kernels::BackendOptions bo;
  bo.device = o.device;
  bo.threads = o.threads;
  bo.compute_dtype =
      o.compute_dtype == "bf16" ? kernels::ComputeDType::kBF16 : kernels::ComputeDType::kF32;
  QCAL_ASSIGN_OR_RETURN(s->backend_, kernels::CreateBackend(bo));
  // This job's peaks: a worker process runs many jobs.
  ResetPeakRss();
  s->backend_->ResetPeakMemory();
  QCAL_ASSIGN_OR_RETURN(s->tokenizer_, Tokenizer::Load(o.model_dir));
  QCAL_ASSIGN_OR_RETURN(CheckpointQuantization input_q, ReadCheckpointQuantization(o.model_dir));
  if (!input_q.quant_method.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(o.model_dir, ": model is already quantized (",
                                                   input_q.quant_method,
                                                   "); quantize a full-precision checkpoint"));
  }
  {
    // Before anything is read: a recipe the model cannot take is refused up front, and an MoE
    // model's recipe gets its moe defaults (they are in its report and recipe_sha256).
    QCAL_ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(o.model_dir));
    QCAL_RETURN_IF_ERROR(Annotate(s->options_.recipe.ResolveForModel(config), o.model_dir));
  }
  ModelLoadOptions load;
  load.residency = BlockResidency::kStreaming;
  QCAL_ASSIGN_OR_RETURN(s->model_, Model::Load(o.model_dir, s->backend_.get(), load));
  const ModelConfig& cfg = s->model_->config();
  s->gang_ = gang ? *std::move(gang) : MakeGangPlan(cfg, o.samples, 1, 0, 0);
  if (static_cast<int>(s->gang_.expert_owners.size()) != NumExpertUnits(cfg)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the gang plan owns ", s->gang_.expert_owners.size(), " expert units; ",
                     o.model_dir, " has ", NumExpertUnits(cfg), " per mixture-of-experts block"));
  }
  QCAL_RETURN_IF_ERROR(Annotate(CheckSequenceLength(cfg, o.seq_len), o.model_dir));
  if (!o.eval_text.empty() && o.eval_seq_len > 0) {
    QCAL_RETURN_IF_ERROR(Annotate(CheckSequenceLength(cfg, o.eval_seq_len), o.model_dir));
  }
  std::string scratch_root = o.scratch_dir;
  if (scratch_root.empty()) {
    std::error_code ec;
    scratch_root = fs::temp_directory_path(ec).string();
    if (ec) scratch_root = "/tmp";
  }
  std::string templ = (fs::path(scratch_root) / "qcal-job-XXXXXX").string();
  if (mkdtemp(templ.data()) == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat(scratch_root, ": cannot create a scratch directory: ", std::strerror(errno)));
  }
  s->scratch_ = templ;
  s->timings_["load"] = Since(t0);
  if (s->log_) {
    s->log_(absl::StrFormat(
        "loaded %s: %d blocks, hidden %d, intermediate %d, vocab %d (%s, %d threads)", o.model_dir,
        cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, s->backend_->name(),
        s->backend_->threads()));
  }
  t0 = Clock::now();
  QCAL_ASSIGN_OR_RETURN(std::string calib_text, LoadCorpusText(o.calib_path));
  QCAL_ASSIGN_OR_RETURN(std::vector<int> calib_tokens,
                        TokenizeCorpus(*s->tokenizer_, calib_text, o.calib_path));
  s->calib_tokens_ = calib_tokens.size();
  // BOS as DESIGN section 4 says: tokenizer_config.json decides; none for Qwen.
  QCAL_ASSIGN_OR_RETURN(auto samples, SampleCalibration(calib_tokens, o.samples, o.seq_len, o.seed,
                                                        s->tokenizer_->bos_id(), o.calib_path));
  QCAL_ASSIGN_OR_RETURN(s->acts_, EmbedCalibration(*s->model_, samples, s->gang_.local()));
  if (s->log_) {
    int64_t rows = 0;
    for (int b : s->acts_.chunk_batch) rows += int64_t{b} * o.seq_len;
    s->log_(absl::StrFormat(
        "calibration activations: %.3f GiB%s",
        CalibActivationBytes(cfg, rows, o.recipe.retrain.enabled) / double(1 << 30),
        o.recipe.retrain.enabled ? " (three copies while a block retrains: quantized path, its "
                                   "block input, full-precision path)"
                                 : ""));
  }
  if (o.recipe.RunsGradientPass()) {
    QCAL_ASSIGN_OR_RETURN(s->gradient_chunks_, GradientChunksOf(samples, s->gang_.local()));
  }
  s->timings_["calibration_data"] = Since(t0);
  return s;
}

absl::StatusOr<BlockArtifactsPtr> JobSession::RunNextBlock(Transport* transport,
                                                           const GangBlockOptions& gang_options) {
  if (next_block() >= num_blocks())
    return absl::FailedPreconditionError("every block is already quantized");
  if (transport == nullptr && gang_.world > 1) {
    return absl::FailedPreconditionError(absl::StrCat("rank ", gang_.rank, " of a gang of ",
                                                      gang_.world, " runs a block without peers"));
  }
  if (options_.recipe.RunsGradientPass() && !has_oac_) {
    return absl::FailedPreconditionError(absl::StrCat(
        options_.recipe.NeedsGradientPass()
            ? absl::StrCat("recipe key \"hessian\" is ", RecipeName(options_.recipe.hessian))
            : std::string("recipe key \"retrain.method\" is saliency"),
        ": run (or restore) the gradient pass before block ", next_block()));
  }
  const OacSource oac = options_.recipe.RunsGradientPass() ? OacFiles() : OacSource();
  const int b = next_block();
  auto t0 = Clock::now();
  QCAL_RETURN_IF_ERROR(model_->AcquireBlock(b));
  const double wait = Since(t0);
  load_wait_ += wait;
  t0 = Clock::now();
  absl::StatusOr<BlockArtifacts> run =
      transport == nullptr ? QuantizeBlock(*model_, acts_, options_.recipe, &times_, oac,
                                           options_.seed, gang_options.retrain_block)
                           : RunGangBlock(*model_, acts_, options_.recipe, gang_, transport,
                                          gang_options, times_, oac, options_.seed);
  QCAL_ASSIGN_OR_RETURN(BlockArtifacts quantized, std::move(run));
  model_->ReleaseBlock(b);
  auto block = std::make_shared<const BlockArtifacts>(std::move(quantized));
  QCAL_RETURN_IF_ERROR(Spill(b, block));
  blocks_seconds_ += wait + Since(t0);
  if (log_) {
    double err = 0;
    for (const auto& r : *block) err += r.report.rel_error;
    std::string memory = absl::StrFormat("host RSS %.2f GiB", CurrentRssBytes() / double(1 << 30));
    if (backend_->MemoryInUse() >= 0) {
      absl::StrAppendFormat(&memory, ", device %.2f GiB",
                            backend_->MemoryInUse() / double(1 << 30));
    }
    log_(
        absl::StrFormat("block %d/%d: mean relative output error %.5f (%.2f s + %.2f s waiting "
                        "for weights; %s)",
                        next_block(), num_blocks(), err / block->size(), Since(t0), wait, memory));
  }
  return block;
}

absl::Status JobSession::Restore(const std::vector<BlockArtifacts>& committed,
                                 CalibActivations acts) {
  // Only rank 0 exports: the other ranks restore without the earlier blocks' artifacts.
  const bool exporter = gang_.rank == 0;
  if ((exporter ? static_cast<int>(committed.size()) != acts.next_block : !committed.empty()) ||
      acts.next_block > num_blocks()) {
    return absl::InvalidArgumentError(absl::StrCat("restore: ", committed.size(),
                                                   " committed blocks for a checkpoint at block ",
                                                   acts.next_block));
  }
  if (acts.seq_len != acts_.seq_len || acts.chunk_batch != acts_.chunk_batch ||
      acts.first_chunk != acts_.first_chunk || acts.total_chunks != acts_.total_chunks) {
    return absl::DataLossError(absl::StrCat(
        "restore: the activation checkpoint (chunks from ", acts.first_chunk, " of ",
        acts.total_chunks, ") does not match this rank's calibration data (chunks [",
        gang_.local().begin, ", ", gang_.local().end, ") of ", gang_.total_chunks, ")"));
  }
  // A recipe that retrains, or routes an MoE model's statistics by the full-precision path,
  // continues the full-precision path too (both start at the embeddings).
  const bool fp_path =
      (options_.recipe.retrain.enabled ||
       (options_.recipe.moe && options_.recipe.moe->routing == MoeRouting::kFullPrecision)) &&
      acts.next_block > 0;
  if (fp_path ? acts.fp_chunks.size() != acts.chunks.size() : !acts.fp_chunks.empty()) {
    return absl::DataLossError(absl::StrCat(
        "restore: the activation checkpoint at block ", acts.next_block, " holds ",
        acts.fp_chunks.size(), " full-precision chunks for ", acts.chunks.size(),
        " chunks; the recipe ", fp_path ? "retrains and needs" : "holds no", " one per chunk"));
  }
  // Blocks before the boundary are never run again: their artifacts only feed the export.
  layers_.clear();
  adapter_ranks_.clear();
  for (size_t b = 0; b < committed.size(); ++b) {
    QCAL_RETURN_IF_ERROR(
        Spill(static_cast<int>(b), std::make_shared<const BlockArtifacts>(committed[b])));
  }
  QCAL_RETURN_IF_ERROR(WaitForSpill());
  acts_ = std::move(acts);
  return absl::OkStatus();
}

JobSession::~JobSession() {
  if (spill_.valid()) spill_.wait();
  if (scratch_.empty()) return;
  std::error_code ec;
  fs::remove_all(scratch_, ec);
}

int64_t JobSession::PeakRssBytes() const { return qcal::PeakRssBytes(); }

int64_t JobSession::PeakDeviceBytes() const { return backend_->PeakMemoryInUse(); }

namespace {

constexpr char kSpillMagic[8] = {'Q', 'C', 'A', 'L', 'S', 'P', 'L', '1'};

void AppendRecord(std::string& out, const std::string& bytes) {
  const uint64_t n = bytes.size();
  out.append(reinterpret_cast<const char*>(&n), sizeof(n));
  out.append(bytes);
}

absl::StatusOr<std::string> NextRecord(const std::string& in, size_t& pos,
                                       const std::string& path) {
  uint64_t n = 0;
  if (in.size() - pos < sizeof(n)) return absl::DataLossError(absl::StrCat(path, ": truncated"));
  std::memcpy(&n, in.data() + pos, sizeof(n));
  pos += sizeof(n);
  if (in.size() - pos < n) return absl::DataLossError(absl::StrCat(path, ": truncated"));
  std::string out = in.substr(pos, n);
  pos += n;
  return out;
}

std::string SpillPath(const std::string& scratch, int b) {
  return (fs::path(scratch) / absl::StrFormat("block-%05d.artifacts", b)).string();
}

}  // namespace

absl::Status JobSession::Spill(int b, BlockArtifactsPtr block) {
  QCAL_RETURN_IF_ERROR(WaitForSpill());
  for (const LayerResult& r : *block) {
    layers_.push_back(r.report);
    if (r.report.rank > 0) adapter_ranks_[r.report.name] = r.report.rank;
  }
  // Serializing and writing a 70B block's artifacts takes seconds: it overlaps the next block.
  spill_ =
      std::async(std::launch::async, [path = SpillPath(scratch_, b), block = std::move(block)] {
        std::string bytes(kSpillMagic, sizeof(kSpillMagic));
        for (const LayerResult& r : *block) {
          AppendRecord(bytes, SerializeLayerArtifact(r));
          AppendRecord(bytes, LayerReportJson(r.report).dump());
        }
        return Annotate(WriteStringToFile(path, bytes),
                        "writing a finished block to the scratch directory");
      });
  return absl::OkStatus();
}

absl::Status JobSession::WaitForSpill() {
  if (!spill_.valid()) return absl::OkStatus();
  return spill_.get();
}

absl::StatusOr<BlockArtifacts> JobSession::Unspill(int b) const {
  const std::string path = SpillPath(scratch_, b);
  QCAL_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  if (bytes.compare(0, sizeof(kSpillMagic), std::string(kSpillMagic, sizeof(kSpillMagic))) != 0) {
    return absl::DataLossError(absl::StrCat(path, ": not a spilled block"));
  }
  size_t pos = sizeof(kSpillMagic);
  BlockArtifacts block;
  while (pos < bytes.size()) {
    QCAL_ASSIGN_OR_RETURN(std::string artifact, NextRecord(bytes, pos, path));
    QCAL_ASSIGN_OR_RETURN(std::string report, NextRecord(bytes, pos, path));
    QCAL_ASSIGN_OR_RETURN(LayerResult r, ParseLayerArtifact(artifact));
    const nlohmann::json j = nlohmann::json::parse(report, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) return absl::DataLossError(absl::StrCat(path, ": malformed report"));
    QCAL_ASSIGN_OR_RETURN(r.report, LayerReportFromJson(j));
    block.push_back(std::move(r));
  }
  return block;
}

absl::StatusOr<JobResult> JobSession::Finish(const std::string& dir_str) {
  if (gang_.rank != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("Finish: rank ", gang_.rank, " of the gang; rank 0 exports"));
  }
  if (next_block() != num_blocks()) {
    return absl::FailedPreconditionError(
        absl::StrCat("Finish: only ", next_block(), " of ", num_blocks(), " blocks are quantized"));
  }
  const JobOptions& o = options_;
  const fs::path dir(dir_str);
  QCAL_RETURN_IF_ERROR(WaitForSpill());
  // The quantized-path activations and the streaming model are not needed any more.
  acts_ = CalibActivations();
  const int blocks = num_blocks();
  model_.reset();
  auto t0 = Clock::now();
  ExportOptions export_options;
  export_options.shard_size = o.shard_size;
  // Block b + 1 is read back from the scratch directory while block b is written.
  std::future<absl::StatusOr<BlockArtifacts>> next;
  auto read_ahead = [&](int b) {
    if (b < blocks) next = std::async(std::launch::async, [this, b] { return Unspill(b); });
  };
  read_ahead(0);
  QCAL_RETURN_IF_ERROR(WriteQuantizedCheckpoint(
      o.model_dir, dir.string(), o.recipe, blocks,
      [&](int b) -> absl::StatusOr<BlockExport> {
        absl::StatusOr<BlockArtifacts> read = next.get();
        read_ahead(b + 1);
        QCAL_ASSIGN_OR_RETURN(BlockArtifacts block, std::move(read));
        BlockExport e;
        for (LayerResult& r : block) {
          AddToExtras(r, e.extras);
          e.quantized[r.report.name] = std::move(r.quantized);
        }
        return e;
      },
      adapter_ranks_, export_options));
  timings_["export"] = Since(t0);
  const std::vector<LayerReport>& layers = layers_;

  JobResult result;
  result.out_dir = o.out_dir;
  TokenWindows windows;
  const int eval_len = o.eval_seq_len > 0 ? o.eval_seq_len : o.seq_len;
  if (!o.eval_text.empty()) {
    t0 = Clock::now();
    QCAL_ASSIGN_OR_RETURN(std::string eval_text, LoadCorpusText(o.eval_text));
    QCAL_ASSIGN_OR_RETURN(std::vector<int> eval_tokens,
                          TokenizeCorpus(*tokenizer_, eval_text, o.eval_text));
    ModelLoadOptions stream;
    stream.residency = BlockResidency::kStreaming;
    QCAL_ASSIGN_OR_RETURN(auto fp_model, Model::Load(o.model_dir, backend_.get(), stream));
    QCAL_ASSIGN_OR_RETURN(windows, MakeEvalWindows(eval_tokens, eval_len, o.eval_max_windows,
                                                   tokenizer_->bos_id(), o.eval_text));
    QCAL_ASSIGN_OR_RETURN(PerplexityResult fp, EvaluatePerplexity(*fp_model, windows));
    fp_model.reset();
    result.perplexity_fp = fp.perplexity;
    LoadOptions exported_stream;
    exported_stream.residency = BlockResidency::kStreaming;
    QCAL_ASSIGN_OR_RETURN(auto exported,
                          LoadCheckpoint(dir.string(), backend_.get(), exported_stream));
    QCAL_ASSIGN_OR_RETURN(PerplexityResult qp, EvaluatePerplexity(*exported, windows));
    exported.reset();
    result.perplexity = qp.perplexity;
    result.has_perplexity = true;
    timings_["eval"] = Since(t0);
    if (log_) {
      log_(
          absl::StrFormat("perplexity %.4f (full precision %.4f; exported checkpoint loaded back, "
                          "%d windows of %d)",
                          qp.perplexity, fp.perplexity, fp.windows, eval_len));
    }
  }

  // The deterministic report.
  nlohmann::ordered_json rep;
  rep["qcal_version"] = kQcalVersion;
  rep["recipe"] = o.recipe.ToCanonicalJson();
  rep["recipe_sha256"] = o.recipe.Sha256();
  rep["format"] = IsGptqExportable(o.recipe) ? "gptq" : "qcal_fake";
  nlohmann::ordered_json inputs = nlohmann::ordered_json::array();
  t0 = Clock::now();
  for (const std::string& f : ModelFiles(o.model_dir)) {
    QCAL_ASSIGN_OR_RETURN(auto j,
                          HashInput("model", (fs::path(o.model_dir) / f).string(), "model/" + f));
    inputs.push_back(j);
  }
  QCAL_ASSIGN_OR_RETURN(auto calib_j, HashInput("calib", o.calib_path, ""));
  inputs.push_back(calib_j);
  if (!o.eval_text.empty()) {
    QCAL_ASSIGN_OR_RETURN(auto eval_j, HashInput("eval", o.eval_text, ""));
    inputs.push_back(eval_j);
  }
  rep["inputs"] = inputs;
  timings_["hash_inputs"] = Since(t0);
  rep["calibration"] = {{"samples", o.samples},
                        {"seq_len", o.seq_len},
                        {"seed", o.seed},
                        {"tokens_in_text", calib_tokens_}};
  nlohmann::ordered_json layer_json = nlohmann::ordered_json::array();
  nlohmann::ordered_json compat = nlohmann::ordered_json::array();
  double sum_err = 0, sum_rtn = 0, sum_er = 0, sum_retrained = 0;
  int64_t params = 0, extra_params = 0;
  const int g = o.recipe.weights.group_size;
  nlohmann::ordered_json retrain_json = nlohmann::ordered_json::array();
  for (const LayerReport& l : layers) {
    nlohmann::ordered_json lj = LayerReportJson(l);
    // The block's retraining goes to the report's "retrain" list, not to its first linear.
    if (lj.contains("block_retrain")) {
      nlohmann::ordered_json bj = {{"block", l.block}};
      for (auto& [key, value] : lj["block_retrain"].items()) bj[key] = value;
      retrain_json.push_back(std::move(bj));
      lj.erase("block_retrain");
    }
    layer_json.push_back(std::move(lj));
    sum_err += l.rel_error;
    sum_rtn += l.rel_error_rtn;
    sum_er += l.reconstructed ? l.rel_error_er : l.rel_error;
    sum_retrained += l.rel_error_retrained;
    params += l.d_out * l.d_in;
    extra_params += l.rank * (l.d_out + l.d_in);
    if (l.d_in % 32 != 0 || l.d_out % 32 != 0 || (g > 0 && g < l.d_in && l.d_in % g != 0)) {
      compat.push_back(l.name);
    }
  }
  rep["layers"] = layer_json;
  if (o.recipe.retrain.enabled) rep["retrain"] = retrain_json;
  if (o.recipe.moe) {
    // Every expert was calibrated; these on all of their block's tokens (docs/MOE.md).
    nlohmann::ordered_json fallback = nlohmann::ordered_json::array();
    for (const LayerReport& l : layers) {
      if (l.expert >= 0 && l.kind == LinearKind::kGate && l.fallback) {
        fallback.push_back(
            {{"block", l.block}, {"expert", l.expert}, {"routed_tokens", l.routed_tokens}});
      }
    }
    rep["moe"] = {{"min_tokens", o.recipe.moe->min_tokens},
                  {"routing", std::string(RecipeName(o.recipe.moe->routing))},
                  {"fallback_experts", fallback}};
  }
  const double n_layers = static_cast<double>(std::max<size_t>(1, layers.size()));
  nlohmann::ordered_json summary;
  summary["layers"] = layers.size();
  summary["mean_rel_error"] = sum_err / n_layers;
  summary["mean_rel_error_rtn"] = sum_rtn / n_layers;
  if (o.recipe.error_reconstruction.enabled) summary["mean_rel_error_er"] = sum_er / n_layers;
  if (o.recipe.retrain.enabled) summary["mean_rel_error_retrained"] = sum_retrained / n_layers;
  if (o.recipe.error_reconstruction.enabled || o.recipe.retrain.enabled) {
    summary["extra_params"] = extra_params;
    summary["extra_params_pct"] = params > 0 ? 100.0 * extra_params / params : 0.0;
  }
  summary["model_bytes_in"] = DirBytes(o.model_dir, ".safetensors");
  summary["model_bytes_out"] = DirBytes(dir, ".safetensors");
  rep["summary"] = summary;
  rep["layers_other_engines_may_refuse"] = compat;
  if (result.has_perplexity) {
    rep["evaluation"] = {{"seq_len", eval_len},
                         {"max_windows", o.eval_max_windows},
                         {"windows", windows.inputs.size()},
                         {"tokens", windows.inputs.size() * static_cast<size_t>(eval_len)},
                         {"perplexity_fp", result.perplexity_fp},
                         {"perplexity", result.perplexity}};
  }
  QCAL_RETURN_IF_ERROR(WriteStringToFile((dir / "qcal_report.json").string(), rep.dump(2) + "\n"));

  nlohmann::ordered_json run;
  run["job_id"] = o.job_id;
  run["device_kind"] = backend_->DeviceKind();
  run["threads"] = backend_->threads();
  run["compute_dtype"] = o.compute_dtype;
  timings_["forward"] = times_.forward;
  timings_["hessian"] = times_.hessian;
  timings_["solve"] = times_.solve;
  timings_["smooth"] = times_.smooth;
  if (o.recipe.retrain.enabled) timings_["retrain"] = times_.retrain;
  timings_["solve_parts"] = {{"factor", times_.factor},
                             {"quantize", times_.quantize},
                             {"error", times_.error},
                             {"reconstruct", times_.reconstruct},
                             {"transfer", times_.transfer}};
  timings_["load_wait"] = load_wait_;
  timings_["blocks"] = blocks_seconds_;
  run["seconds"] = timings_;
  if (!gradient_pass_.is_null()) run["gradient_pass"] = gradient_pass_;
  result.peak_rss_bytes = PeakRssBytes();
  result.peak_device_bytes = PeakDeviceBytes();
  run["peak_rss_bytes"] = result.peak_rss_bytes;
  if (result.peak_device_bytes >= 0) run["peak_device_bytes"] = result.peak_device_bytes;
  QCAL_RETURN_IF_ERROR(WriteStringToFile((dir / "qcal_run.json").string(), run.dump(2) + "\n"));
  result.report = std::move(rep);
  return result;
}

namespace {

bool IsNonEmptyDir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec) && !fs::is_empty(p, ec);
}

absl::Status PrepareTempDir(const fs::path& target, bool overwrite, fs::path* tmp) {
  if (target.filename().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("output directory \"", target.string(), "\" has no name"));
  }
  std::error_code ec;
  if (fs::exists(target, ec) && !fs::is_directory(target, ec)) {
    return absl::AlreadyExistsError(
        absl::StrCat(target.string(), ": output path exists and is not a directory"));
  }
  if (IsNonEmptyDir(target) && !overwrite) {
    return absl::AlreadyExistsError(absl::StrCat(
        target.string(), ": output directory is not empty (use --overwrite to replace it)"));
  }
  *tmp = target.parent_path() / absl::StrCat(".", target.filename().string(), ".qcal-tmp");
  fs::remove_all(*tmp, ec);
  fs::create_directories(*tmp, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(target.string(), ": cannot create the output directory: ", ec.message()));
  }
  QCAL_RETURN_IF_ERROR(Annotate(WriteStringToFile((*tmp / ".write-test").string(), "ok"),
                                "the output directory is not writable"));
  fs::remove(*tmp / ".write-test", ec);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<JobResult> RunQuantizeJob(const JobOptions& o, const JobLogFn& log) {
  QCAL_RETURN_IF_ERROR(o.Validate());
  if (o.out_dir.empty()) return absl::InvalidArgumentError("the output directory is required");
  const auto t_start = Clock::now();
  const fs::path target = fs::absolute(o.out_dir).lexically_normal();
  fs::path tmp;
  QCAL_RETURN_IF_ERROR(PrepareTempDir(target, o.overwrite, &tmp));
  auto body = [&]() -> absl::StatusOr<JobResult> {
    QCAL_ASSIGN_OR_RETURN(auto session, JobSession::Open(o, log));
    if (session->NeedsGradientPass()) QCAL_RETURN_IF_ERROR(session->RunGradientPass().status());
    while (session->next_block() < session->num_blocks()) {
      QCAL_RETURN_IF_ERROR(session->RunNextBlock().status());
    }
    return session->Finish(tmp.string());
  };
  absl::StatusOr<JobResult> result = body();
  std::error_code ec;
  if (!result.ok()) {
    fs::remove_all(tmp, ec);
    return result.status();
  }
  if (fs::exists(target, ec)) fs::remove_all(target, ec);
  if (!ec) fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove_all(tmp, ec);
    return absl::InternalError(
        absl::StrCat("cannot move the output into ", target.string(), ": ", ec.message()));
  }
  result->out_dir = target.string();
  if (log) log(absl::StrFormat("done in %.1f s: %s", Since(t_start), target.string()));
  return result;
}

}  // namespace qcal::engine
