// Installing solved linears into the in-memory model: the dequantized weight, the low-rank
// branch, the activation bits and the tensors that folded smoothing changed. Every worker installs
// every linear of a block (its own solves and the committed artifacts of others) before pushing
// the calibration activations through the quantized block.
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "services/engine/driver/results.h"
#include "services/engine/model.h"

namespace qcal::engine {

// Replaces linear `id` of block b (a dense linear, or an expert's) by the dequantized weight of q
// (InvalidArgument when the shape does not match the model).
absl::Status InstallWeight(Model& model, int b, LinearId id, const QuantizedLinear& q);

// Installs r's low-rank branch (or removes one when r.report.rank is 0), activation bits and
// folded tensors (norm weights and biases of block b, by checkpoint name) into linear `id` of block
// b; the weight is installed separately. InvalidArgument for factors or folded tensors of the
// wrong shape, NotFound for a folded name that is not a norm or bias of the block.
absl::Status InstallExtras(Model& model, int b, LinearId id, const LayerResult& r);

// Installs a block's committed results (from artifacts: quantized weights, low-rank factors,
// activation bits, folded tensors) into block `b`: its linears in BlockLinears order.
absl::Status InstallBlock(Model& model, int b, const std::vector<LayerResult>& linears);

}  // namespace qcal::engine
