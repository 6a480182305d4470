#include "services/engine/quantize.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/text_data.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/driver/memory_plan.h"
#include "services/engine/oac/oac_job.h"

namespace qcal::engine {

absl::StatusOr<CalibActivations> EmbedCalibration(Model& model,
                                                  const std::vector<std::vector<int>>& samples) {
  return EmbedCalibration(model, samples, {0, NumChunks(static_cast<int>(samples.size()))});
}

absl::StatusOr<CalibActivations> EmbedCalibration(Model& model,
                                                  const std::vector<std::vector<int>>& samples,
                                                  ChunkRange chunks) {
  if (samples.empty()) return absl::InvalidArgumentError("no calibration samples");
  CalibActivations acts;
  acts.seq_len = static_cast<int>(samples[0].size());
  for (const auto& s : samples) {
    if (static_cast<int>(s.size()) != acts.seq_len) {
      return absl::InvalidArgumentError("calibration samples must have equal length");
    }
  }
  acts.total_chunks = NumChunks(static_cast<int>(samples.size()));
  if (chunks.begin < 0 || chunks.end < chunks.begin || chunks.end > acts.total_chunks) {
    return absl::InvalidArgumentError(absl::StrCat("chunks [", chunks.begin, ", ", chunks.end,
                                                   ") outside the ", acts.total_chunks,
                                                   " chunks of the calibration set"));
  }
  acts.first_chunk = chunks.begin;
  const int64_t reserve = WorkingSetBytes(model.config(), int64_t{kCalibChunk} * acts.seq_len);
  for (int c = chunks.begin; c < chunks.end; ++c) {
    const size_t c0 = static_cast<size_t>(c) * kCalibChunk;
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

absl::StatusOr<std::vector<LayerResult>> QuantizeBlock(
    Model& model, CalibActivations& acts, const Recipe& recipe, StageTimes* times,
    const OacSource& oac, uint64_t seed, const std::function<absl::Status(int)>& before_training) {
  QCAL_RETURN_IF_ERROR(recipe.Validate());
  QCAL_RETURN_IF_ERROR(recipe.CheckForModel(model.config()));
  const int b = acts.next_block;
  if (b < 0 || b >= model.num_blocks()) {
    return absl::OutOfRangeError(absl::StrCat("block ", b, " is outside the model"));
  }
  StageTimes local;
  BlockRunner runner(model, acts, recipe, times ? *times : local, oac, seed);
  runner.set_before_training(before_training);
  return runner.Run();
}

absl::StatusOr<QuantizeOutcome> QuantizeModel(Model& model,
                                              const std::vector<std::vector<int>>& samples,
                                              const Recipe& recipe, const BlockProgressFn& progress,
                                              uint64_t seed) {
  QCAL_RETURN_IF_ERROR(recipe.Validate());
  QCAL_RETURN_IF_ERROR(recipe.CheckForModel(model.config()));
  QuantizeOutcome out;
  OacMemoryStore oac;
  const bool pass = recipe.NeedsGradientPass() || recipe.NeedsFisher();
  if (pass) {
    const ChunkRange all{0, NumChunks(static_cast<int>(samples.size()))};
    QCAL_ASSIGN_OR_RETURN(const GradientChunks chunks, GradientChunksOf(samples, all));
    QCAL_ASSIGN_OR_RETURN(out.gradient_pass,
                          RunGradientPass(model, chunks, GradientPassOptionsOf(recipe, ""),
                                          oac.Sink(model.backend(), all.end)));
  }
  const OacSource source = pass ? oac.Source() : OacSource();
  QCAL_ASSIGN_OR_RETURN(CalibActivations acts, EmbedCalibration(model, samples));
  const int nb = model.num_blocks();
  for (int b = 0; b < nb; ++b) {
    QCAL_ASSIGN_OR_RETURN(std::vector<LayerResult> block,
                          QuantizeBlock(model, acts, recipe, &out.times, source, seed));
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
