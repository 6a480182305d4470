// The gradient pass as a step of a job (DESIGN section 2, step 4): what feeds it (this rank's
// calibration token ids as GradientChunks), where its results go (files under the session's
// scratch directory, one per linear, written by the linear's owner; or host memory for the direct
// engine path and the bench), and how the solve gets them back (an OacSource).
//
// JobSession's gradient-pass methods (pipeline.h) are implemented in oac_job.cc on top of these.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "nlohmann/json_fwd.hpp"
#include "services/engine/gang/plan.h"
#include "services/engine/oac/gradient_pass.h"
#include "services/engine/oac/oac_statistics.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// The chunks [chunks.begin, chunks.end) of the whole calibration set `samples` (equal lengths) as
// the gradient pass's input: the same chunking as EmbedCalibration (kCalibChunk samples a chunk,
// the last one possibly short). InvalidArgument for no samples, unequal lengths or a range outside
// the set's chunks.
absl::StatusOr<GradientChunks> GradientChunksOf(const std::vector<std::vector<int>>& samples,
                                                ChunkRange chunks);

// The pass's options for `recipe` (Recipe::GradientPassKind; the Fisher for saliency), spilling
// boundaries that fit no memory under `scratch_dir`.
GradientPassOptions GradientPassOptionsOf(const Recipe& recipe, const std::string& scratch_dir);

// Bytes the statistics files of the linears rank plan.rank owns take, over every block of
// `config` (ModelOacBytes for a gang of one).
int64_t OwnedOacBytes(const ModelConfig& config, const GangPlan& plan, bool fisher);

// Refuses a pass whose files (`bytes`) would not fit the free space of the file system holding
// `dir` (statvfs): FailedPrecondition naming recipe key "hessian", both numbers and the directory.
absl::Status CheckOacStorage(const Recipe& recipe, int64_t bytes, const std::string& dir);

// "<dir>/NNNNNN-LL.safetensors": block (6 digits) and LinearKind index (2 digits).
std::string OacFilePath(const std::string& dir, int block, LinearKind kind);

// Every linear's completed statistics in host memory, for one process holding every chunk (the
// direct engine path, QuantizeModel, and the bench). Sink and Source refer to the store, which must
// outlive them. Not thread-safe.
class OacMemoryStore {
 public:
  // A sink for a pass over all `total_chunks` chunks: completes each linear's tree on `backend`
  // (its one root, for a rank holding every chunk) and keeps it in the backend's page-locked host
  // memory, or, with `on_device`, where it was summed (the pass must have planned for it:
  // GradientPassOptions::sink_device_bytes_per_block = DeviceBytesPerBlock).
  OacSink Sink(kernels::Backend& backend, int total_chunks, bool on_device = false);
  // What Sink(..., on_device = true) keeps per block: every linear's full d_in × d_in F32
  // Hessian, and its Fisher when `fisher`.
  static int64_t DeviceBytesPerBlock(const ModelConfig& config, bool fisher);
  // The statistics kept for (block, kind); NotFound naming the linear when absent.
  OacSource Source() const;
  // Bytes held.
  int64_t bytes() const { return bytes_; }

 private:
  std::map<std::pair<int, LinearKind>, LinearOac> stats_;
  int64_t bytes_ = 0;
};

// The gradient pass's facts for qcal_run.json (and the bench): seconds by part, loss, tokens,
// boundary interval and peak device memory.
nlohmann::ordered_json GradientPassJson(const GradientPassStats& stats);

}  // namespace qcal::engine
