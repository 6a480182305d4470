// The payloads a gang exchanges during a block (transport.h names the messages), as deterministic
// byte strings: the same values give the same bytes on every worker.
//
//   kPartials / kStatistic of a group step: InputStatistics partials (tree nodes with their fp32
//     Gram matrices and, for LQER's diagonal whitening, their |x| statistics). A completed
//     statistic travels as the single root node of its tree, so one format serves both and the
//     receiver completes it with the same call (BlockRunner::Complete).
//   kPartials / kStatistic of the smoothing step: ActivationStats partials of one linear input,
//     the same way.
//   kOacPartials (the gradient pass): output-adaptive statistics partials of one linear.
//   kLayer: a solved linear: its artifact (SerializeLayerArtifact: the quantized linear, low-rank
//     factors, activation bits, folded tensors) and its report (LayerReportJson): everything
//     Install and the export need.
//
// Layout (host byte order; workers of a gang share a device kind, so one byte order): a 4-byte
// magic, then fixed-size fields; ExchangeBytesPerBlock is derived from the same layout.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/gang/plan.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// Partial (or completed) statistics of `input`, whose channels number `width`: the Gram matrices
// are copied from the backend's device, each first mirrored from its lower triangle in place (a
// partial holds only that triangle, Backend::GramLower; a completed one is already symmetric), so
// every byte sent is set. Errors: a partial of another input or width (InvalidArgument), the
// mirror's and the device copy's.
absl::StatusOr<std::string> SerializeInputPartials(kernels::Backend& backend, LinearInput input,
                                                   int64_t width, const InputPartials& partials);
// The partials back, Gram matrices on the backend's device. DataLoss for malformed bytes or
// another input or width than expected.
absl::StatusOr<InputPartials> ParseInputPartials(kernels::Backend& backend, LinearInput input,
                                                 int64_t width, const std::string& bytes);

// ActivationStats partials of one linear input of `width` channels (InvalidArgument for a partial
// of another width).
absl::StatusOr<std::string> SerializeActivationStatsPartials(
    int64_t width, const TreePartials<ActivationStats>& partials);
absl::StatusOr<TreePartials<ActivationStats>> ParseActivationStatsPartials(
    int64_t width, const std::string& bytes);

// Partial output-adaptive statistics of linear `kind` (d_out x d_in) from the gradient pass
// (kOacPartials), on the backend's device: per node the Hessian's upper triangle (row i holds
// H[i, i..d_in-1]; the solve and the files read nothing else) and, when `fisher`, the Fisher.
// Parsing mirrors the triangle into both (LinearOac's form). InvalidArgument for a partial of
// another shape or Fisher presence; DataLoss for malformed bytes or another linear or shape.
absl::StatusOr<std::string> SerializeOacPartials(kernels::Backend& backend, LinearKind kind,
                                                 int64_t d_out, int64_t d_in, bool fisher,
                                                 const TreePartials<LinearOac>& partials);
absl::StatusOr<TreePartials<LinearOac>> ParseOacPartials(kernels::Backend& backend, LinearKind kind,
                                                         int64_t d_out, int64_t d_in, bool fisher,
                                                         const std::string& bytes);

// Retraining: a linear's frozen base W̃ and Fisher (undefined: none) as kRetrainBase carries them
// (host F32 [d_out, d_in]); one chunk's quantized-path inputs and full-precision targets
// (kRetrainSamples; copied from and parsed onto the backend's device). InvalidArgument for
// tensors of other shapes; DataLoss for malformed bytes or other shapes than expected.
absl::StatusOr<std::string> SerializeRetrainBase(const Tensor& base, const Tensor& fisher);
absl::Status ParseRetrainBase(const std::string& bytes, int64_t d_out, int64_t d_in, Tensor* base,
                              Tensor* fisher);
absl::StatusOr<std::string> SerializeRetrainSamples(kernels::Backend& backend, const Tensor& inputs,
                                                    const Tensor& targets);
absl::Status ParseRetrainSamples(kernels::Backend& backend, const std::string& bytes, int64_t rows,
                                 int64_t hidden, Tensor* inputs, Tensor* targets);

// A solved linear: artifact and report. Parsing gives back the artifact's fields and the report's
// deterministic fields (LayerReportFromJson: the timing solve_seconds stays behind).
std::string SerializeSolvedLayer(const LayerResult& r);
absl::StatusOr<LayerResult> ParseSolvedLayer(const std::string& bytes);

// Bytes of the formats above, for `nodes` nodes.
int64_t InputPartialsBytes(int64_t nodes, int64_t width, bool abs_stats);
int64_t ActivationStatsPartialsBytes(int64_t nodes, int64_t width);
int64_t OacPartialsBytes(int64_t nodes, int64_t d_out, int64_t d_in, bool fisher);

// The payload bytes each rank (index) sends during one block of a job of `config` and `recipe`
// under `plan` (gang/gang_block.h): its cover of every statistic to the statistic's owner (the
// smoothing statistics too, when the recipe smooths), each owner's completed statistics to the
// other owners of its consumers (smoothing statistics: to every other rank), and every solved
// linear to every other rank, linear k's payload being layer_bytes[k] (SerializeSolvedLayer's
// size). Framing excluded, as Transport::bytes_sent counts. Retraining's messages (step
// kStepRetrain: bases, samples and retrained linears) are not included.
std::vector<int64_t> ExchangeBytesPerBlock(const GangPlan& plan, const ModelConfig& config,
                                           const Recipe& recipe,
                                           const std::array<int64_t, kNumLinears>& layer_bytes);

}  // namespace qcal::engine
