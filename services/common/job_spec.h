// The JobSpec of the API as the engine needs it: the recipe proto <-> engine::Recipe, the
// normalized spec (every default of DESIGN section 6 filled in, ranges checked) that idempotency
// compares and workers run, engine::JobOptions for a worker, output names, and the JSON the CLI
// prints for a job.
//
// When a later issue adds a recipe section to engine::Recipe, RecipeFromProto/RecipeToProto gain
// the matching message field (numbers are reserved in types.proto).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"
#include "qcal/v1/types.pb.h"
#include "services/engine/pipeline.h"
#include "services/engine/recipe.h"

namespace qcal::service {

// Spec defaults not set by the recipe (DESIGN section 6, engine::JobOptions).
inline constexpr int kDefaultSamples = 128;
inline constexpr int kDefaultSeqLen = 2048;
// Longest accepted output name and idempotency key, bytes.
inline constexpr size_t kMaxOutputNameBytes = 200;
inline constexpr size_t kMaxIdempotencyKeyBytes = 128;
// Largest gang a job may ask for (JobSpec.workers.max).
inline constexpr int kMaxGangWorkers = 64;

// The recipe of a spec with unset fields at their defaults, validated (errors name the key, e.g.
// "recipe key \"weights.bits\" is required (2..8)"). An absent error_reconstruction message means
// off; a present one needs exactly one of `rank` (>= 1) and `rank_auto` = true.
absl::StatusOr<engine::Recipe> RecipeFromProto(const v1::Recipe& proto);
// Every field set, except error_reconstruction (absent when off) and its `rank` (absent when
// rank_auto).
v1::Recipe RecipeToProto(const engine::Recipe& recipe);

// Fills every default and checks every value that needs no file: the recipe, samples, seq_len,
// eval options, threads, workers (min default 1, max default min, 1 <= min <= max <=
// kMaxGangWorkers), the output name, and that model/calib are given. Paths are checked by
// the coordinator against its input root (services/common/input_paths.h). INVALID_ARGUMENT names
// the field.
absl::StatusOr<v1::JobSpec> NormalizeJobSpec(const v1::JobSpec& spec);
// sha256 of the deterministic serialization of a normalized spec.
std::string SpecSha256(const v1::JobSpec& normalized);

// One path component: not empty, not "." or "..", no '/', no NUL, not starting with '.' (those
// names are the temporary directories), at most kMaxOutputNameBytes.
absl::Status ValidateOutputName(const std::string& name);
// The temporary output directory of one attempt of a job under the output root:
// ".<name>.<job_id>.<gang_epoch>.qcal-tmp". Each plan has its own, so that an attempt that goes
// on exporting after it lost its lease (a worker stopped past its lease, then continued) never
// writes into the directory that another attempt exports into and the coordinator renames.
std::string TempOutputName(const std::string& output_name, const std::string& job_id,
                           uint64_t gang_epoch);
// The job id in a TempOutputName, or "" when `name` is not one.
std::string JobOfTempOutputName(const std::string& name);

// The engine's options for running a normalized spec with the given roots (paths joined, not
// re-validated), thread count, device and job id. out_dir is the final output directory.
absl::StatusOr<engine::JobOptions> JobOptionsFromSpec(const v1::JobSpec& spec,
                                                      const std::string& input_root,
                                                      const std::string& output_root, int threads,
                                                      const std::string& device,
                                                      const std::string& job_id);

// "QUEUED", "RUNNING", ... and "loading", "quantizing", ...
std::string JobStateName(v1::JobState state);
std::string JobStageName(v1::JobStage stage);
bool IsFinal(v1::JobState state);

// The job as one JSON object (`qcal status --json`, `qcal list --json`): job_id, state, stage,
// client, blocks_done, num_blocks, checkpoint_block, attempts, device_kind, threads, worker_id,
// error, output, recipe_sha256, perplexity/perplexity_fp when present, gang_epoch and gang (rank,
// worker_id, peer_address, chunks [begin, end), owned_linears, and owned_expert_units for an MoE
// model) while it has one, and the spec.
nlohmann::ordered_json JobToJson(const v1::Job& job);
// A gang member's linears for people: "q_proj,o_proj" (its owned linears, "-" for none), then
// " expert units 0,3" when it owns expert units of an MoE model.
std::string OwnedLinearsText(const v1::GangMember& member);

}  // namespace qcal::service
