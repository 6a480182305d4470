// One quantization job end to end. JobSession is the stepwise form the worker drives (one block at
// a time, committing artifacts, resuming from a boundary checkpoint); RunQuantizeJob is the local
// form `qcal quantize` uses: open, run every block, finish into a temporary directory beside the
// target, rename it into place.
//
// Memory (DESIGN section 2): the session streams the model (Model with BlockResidency::kStreaming):
// it holds the embeddings, lm_head, the calibration activations and the block in flight (plus the
// next one, prefetched). Each finished block's artifacts are spilled to a scratch directory and
// dropped from memory; Finish() streams them into the export shard by shard. A recipe that
// retrains holds about three times the activations (CalibActivationBytes: the quantized path, its
// copy at the block input, the full-precision path), and a gang's training rank also the other
// ranks' inputs and targets while a block trains.
//
// Retraining (recipe.retrain; DESIGN section 2, step 3.4): RunNextBlock trains the block after
// its linears are solved (BlockRunner::TrainBlock; in a gang on rank 0, gang/gang_block.h), and
// the artifacts it returns and spills are the retrained linears (codes re-rounded on the clipped
// grid, the LoRA as their low-rank factors), so the export is a GPTQ checkpoint plus the adapter.
// Saliency also runs the gradient pass for the Fisher (Recipe::RunsGradientPass).
//
// Gang mode (DESIGN section 7): a session is one rank of a GangPlan. Every rank samples the whole
// calibration set exactly as a single worker does, then embeds only its own chunks; RunNextBlock
// runs the block over a Transport (gang/gang_block.h) and returns, and spills, all the block's
// linears on every rank; only rank 0 calls Finish. W = 1 (the default plan) needs no transport.
//
// Output-adaptive recipes (hessian != layer): RunGradientPass (or RestoreGradientPass) comes
// before the first block (oac/oac_job.cc); each linear's statistics are then read from its file
// when its block is solved. In a gang each rank keeps the files of the linears it owns, and the
// pass's facts in qcal_run.json are rank 0's share.
//
// Finish() exports the checkpoint, then evaluates the full-precision model (streamed afresh from
// the source directory) and the exported checkpoint (streamed back from disk), layer-major, and
// writes qcal_report.json (deterministic) and qcal_run.json (timings, peak host RSS and peak
// device memory, host facts).
#pragma once

#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/gang/gang_block.h"
#include "services/engine/gang/plan.h"
#include "services/engine/gang/transport.h"
#include "services/engine/model.h"
#include "services/engine/oac/gradient_pass.h"
#include "services/engine/oac/oac_statistics.h"
#include "services/engine/quantize.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

struct JobOptions {
  std::string model_dir;  // Hugging Face checkpoint directory (full precision)
  Recipe recipe;
  std::string calib_path;      // .txt or .jsonl
  int samples = 128;           // calibration samples N. Default: 128.
  int seq_len = 2048;          // calibration sample length L (tokens, BOS included). Default: 2048.
  uint64_t seed = 0;           // calibration sampling seed. Default: 0.
  std::string out_dir;         // the output directory (see overwrite)
  bool overwrite = false;      // replace an existing non-empty out_dir. Default: false.
  std::string eval_text;       // optional evaluation text
  int eval_seq_len = 0;        // 0: seq_len
  int eval_max_windows = -1;   // -1: all windows
  int threads = 0;             // CPU threads; 0 = number of cores
  std::string device = "cpu";  // backend device: cpu, cuda, cuda:N. Default: cpu.
  std::string compute_dtype = "f32";  // f32 | bf16 (GEMM operands). Default: f32.
  std::string job_id;                 // recorded in qcal_run.json (service jobs); "" locally
  // Where finished blocks' artifacts wait for the export (a private directory is made inside).
  // Default: "" = the system temporary directory ($TMPDIR or /tmp).
  std::string scratch_dir;
  // Shard size of the exported checkpoint in bytes (DESIGN section 5). Default: 4 GiB.
  int64_t shard_size = 4ll << 30;
  absl::Status Validate() const;
};

struct JobResult {
  std::string out_dir;
  nlohmann::ordered_json report;  // the contents of qcal_report.json
  bool has_perplexity = false;
  double perplexity = 0;           // exported checkpoint, loaded back from disk
  double perplexity_fp = 0;        // the input model
  int64_t peak_rss_bytes = 0;      // host resident set, highest during the job
  int64_t peak_device_bytes = -1;  // device memory held by tensors, highest (-1: host backend)
};

// Progress lines for humans (stderr).
using JobLogFn = std::function<void(const std::string& line)>;

// A committed block: its linears in BlockLinears order (quantized form and report): the seven in
// forward order, or an MoE block's q, k, v, o and then each expert unit's gate, up and down.
using BlockArtifacts = std::vector<LayerResult>;
// Shared with the background thread that spills it to the scratch directory.
using BlockArtifactsPtr = std::shared_ptr<const BlockArtifacts>;

class JobSession {
 public:
  ~JobSession();
  // Loads the model, tokenizer and calibration samples and embeds this rank's chunks of them
  // (block 0's inputs). `gang`: this worker's plan (InvalidArgument when it is not valid or not
  // made for options.samples); default: the single-rank plan.
  static absl::StatusOr<std::unique_ptr<JobSession>> Open(
      const JobOptions& options, JobLogFn log = nullptr,
      std::optional<GangPlan> gang = std::nullopt);

  int num_blocks() const { return model_->num_blocks(); }
  const ModelConfig& config() const { return model_->config(); }
  // Seconds per stage so far, summed over the blocks this session ran.
  const StageTimes& times() const { return times_; }
  // The block RunNextBlock will quantize.
  int next_block() const { return acts_.next_block; }
  // This rank's chunks of the calibration activations.
  const CalibActivations& activations() const { return acts_; }
  const GangPlan& gang() const { return gang_; }
  kernels::Backend& backend() { return *backend_; }

  // Quantizes the next block: with `transport` as this rank of the gang (RunGangBlock, all ranks
  // at once), without (only for a gang of one) directly on this worker (QuantizeBlock); both give
  // the same bits. Returns all the block's linears. They are also spilled for Finish(), on a
  // background thread that overlaps the next block (one spill in flight; its error, if any, is
  // returned by the next call or by Finish).
  absl::StatusOr<BlockArtifactsPtr> RunNextBlock(Transport* transport = nullptr,
                                                 const GangBlockOptions& gang_options = {});

  // ---- The gradient pass (recipes with hessian != layer; DESIGN section 2, step 4).
  // Whether the recipe needs the pass and this session has no statistics yet (it has neither run
  // nor restored them).
  bool NeedsGradientPass() const;
  // Runs the pass over this rank's chunks, before the first RunNextBlock. With `transport`, as
  // this rank of the gang: each linear's partials go to its owner in the plan (gang/plan.h),
  // which completes the canonical reduction; without, a gang of one. Returns the files this rank
  // completed (the linears it owns; every linear for W = 1), under the session's scratch
  // directory, for the caller to commit; blocks then read their statistics from them.
  absl::StatusOr<std::vector<OacFile>> RunGradientPass(Transport* transport = nullptr,
                                                       const GangBlockOptions& gang_options = {});
  // Resume: the statistics of an earlier pass of this job (at least the linears this rank owns
  // from the next block on), read when their block is solved and checked against their sha256.
  absl::Status RestoreGradientPass(std::vector<OacFile> files);

  // Resumes from a boundary: takes the committed artifacts of blocks [0, acts.next_block) (for the
  // export; rank 0 only, the other ranks pass none) and continues from `acts`: this rank's chunks
  // at that boundary (SaveActivations, or AssembleActivations of per-chunk checkpoints), with the
  // full-precision path's chunks when the recipe retrains (past block 0). DataLoss when they are
  // not this rank's chunks of this job's calibration data, or lack (or hold without retraining)
  // the full-precision path.
  absl::Status Restore(const std::vector<BlockArtifacts>& committed, CalibActivations acts);

  // Peak host RSS and device memory since Open, in bytes (device: -1 on a host backend).
  int64_t PeakRssBytes() const;
  int64_t PeakDeviceBytes() const;

  // After every block, on rank 0 only (FailedPrecondition elsewhere): writes the checkpoint,
  // report and run facts into `dir` (existing, empty) and evaluates. The caller moves `dir` into
  // place.
  absl::StatusOr<JobResult> Finish(const std::string& dir);

 private:
  JobSession() = default;
  // Records block b's reports and writes its artifacts to the scratch directory, in the background
  // (the previous spill is waited for first); WaitForSpill returns the last spill's outcome.
  absl::Status Spill(int b, BlockArtifactsPtr block);
  absl::Status WaitForSpill();
  // Block b's artifacts, read back from the scratch directory.
  absl::StatusOr<BlockArtifacts> Unspill(int b) const;
  // The solve's output-adaptive statistics: the files of oac_files_, read and checked against
  // their sha256 (oac/oac_job.cc).
  OacSource OacFiles() const;

  JobOptions options_;
  JobLogFn log_;
  std::unique_ptr<kernels::Backend> backend_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Model> model_;
  GangPlan gang_;
  CalibActivations acts_;
  std::string scratch_;                           // this session's private scratch directory
  std::future<absl::Status> spill_;               // the spill in flight, if any
  std::vector<LayerReport> layers_;               // every finished linear's report, in order
  std::map<std::string, int64_t> adapter_ranks_;  // error reconstruction: rank per linear
  size_t calib_tokens_ = 0;
  double load_wait_ = 0;       // seconds spent waiting for block weights (not overlapped)
  double blocks_seconds_ = 0;  // seconds in RunNextBlock, waits included
  StageTimes times_;
  nlohmann::ordered_json timings_;
  // The gradient pass (oac/oac_job.cc): this rank's calibration token ids (kept only when the
  // recipe needs the pass), the statistics files this rank solves from by (block, linear), whether
  // they are in place (run or restored), and the pass's facts for qcal_run.json.
  GradientChunks gradient_chunks_;
  std::map<std::pair<int, LinearKind>, OacFile> oac_files_;
  bool has_oac_ = false;
  nlohmann::ordered_json gradient_pass_;
};

// `qcal quantize`: the whole job in this process. Refuses an existing non-empty out_dir unless
// overwrite; writes "<parent>/.<name>.qcal-tmp" and renames it to out_dir at the end.
absl::StatusOr<JobResult> RunQuantizeJob(const JobOptions& options, const JobLogFn& log = nullptr);

}  // namespace qcal::engine
