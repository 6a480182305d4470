// The driver's bytes on disk and on the wire: boundary checkpoints of the calibration activations
// (so a job resumes at a block boundary with bit-identical results), the deterministic
// serialization of a solved linear (the artifact a worker commits), and what the export writes
// besides the quantized linears.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "services/engine/driver/results.h"
#include "services/engine/export/checkpoint_writer.h"

namespace qcal::engine {

// Boundary checkpoints: the activations as one safetensors file (deterministic bytes), with their
// global chunk indices (a file without them holds chunks [0, n) of n), and the full-precision
// path's chunks when acts holds them (recipes that retrain: "fp_chunk.<index>" beside
// "chunk.<index>"; a resumed job needs both paths for identical bytes).
absl::Status SaveActivations(kernels::Backend& backend, const CalibActivations& acts,
                             const std::string& path);
absl::StatusOr<CalibActivations> LoadActivations(kernels::Backend& backend,
                                                 const std::string& path);

// Per-chunk boundary checkpoints (DESIGN section 7: a job resumes on any number of workers). One
// chunk, by its global index (held by acts), in SaveActivations' format; InvalidArgument for a
// chunk acts does not hold.
absl::Status SaveActivationChunk(kernels::Backend& backend, const CalibActivations& acts, int chunk,
                                 const std::string& path);
// A rank's activations from the per-chunk files of its contiguous chunks, in chunk order (at
// least one). DataLoss when the files are not consecutive chunks of one boundary and job (block,
// sequence length, total chunks).
absl::StatusOr<CalibActivations> AssembleActivations(kernels::Backend& backend,
                                                     const std::vector<std::string>& chunk_paths);

// Deterministic serialization of one quantized linear (a safetensors byte string).
std::string SerializeQuantizedLinear(const QuantizedLinear& q);
absl::StatusOr<QuantizedLinear> ParseQuantizedLinear(const std::string& bytes);
// The same for a layer's whole artifact: the quantized linear plus the low-rank factors, the
// activation bits and the folded tensors (the report travels separately, as JSON).
std::string SerializeLayerArtifact(const LayerResult& r);
absl::StatusOr<LayerResult> ParseLayerArtifact(const std::string& bytes);

// Adds a layer's folded tensors and low-rank factors to what the export writes besides the
// quantized linears.
void AddToExtras(const LayerResult& r, CheckpointExtras& extras);

}  // namespace qcal::engine
