// Fuzzes what SubmitJob checks before it accepts a job (services/coordinator/job_api.cc):
// the SubmitJobRequest as it arrives from the wire, the idempotency key's length, the JobSpec's
// normalization and recipe validation (services/common/job_spec.h), and the input paths under a
// fixed input root (services/common/input_paths.h: confinement, config.json, safetensors headers,
// tokenizer, calibration and evaluation files), plus the JSON the CLI prints for a job. A
// normalized spec must normalize to itself, with the same sha256.
//
// Input: a serialized qcal.v1.SubmitJobRequest. The input root holds model/ (the tiny checkpoint
// of fuzz_util.h with a tokenizer.json), calib.txt, eval.txt, and a symlink "escape" to "/".
#include <cstdint>
#include <filesystem>
#include <string>

#include "common/status.h"
#include "google/protobuf/stubs/logging.h"
#include "qcal/v1/quant_service.pb.h"
#include "services/common/input_paths.h"
#include "services/common/job_spec.h"
#include "services/engine/oac/oac_statistics.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

const qcal::service::InputRoot& Root() {
  static const qcal::service::InputRoot* root = [] {
    const qcal::fuzz::ScratchDir& dir = qcal::fuzz::ScratchDir::Get();
    std::map<std::string, std::string> files;
    for (const auto& [name, bytes] : qcal::fuzz::TinyModelFiles()) files["model/" + name] = bytes;
    files["model/tokenizer.json"] = qcal::fuzz::TinyTokenizerJson();
    files["calib.txt"] = "the quick brown fox jumps over the lazy dog\n";
    files["eval.txt"] = "a b c d e f g\n";
    qcal::fuzz::WriteFiles(dir.path(), files);
    std::filesystem::create_symlink("/", std::filesystem::path(dir.path()) / "escape");
    auto r = qcal::service::InputRoot::Open(dir.path());
    QCAL_CHECK(r.ok());
    return new qcal::service::InputRoot(*std::move(r));
  }();
  return *root;
}

}  // namespace

// Protobuf logs every string field with invalid UTF-8 it refuses: millions of lines.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const qcal::service::InputRoot& root = Root();
  qcal::v1::SubmitJobRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  if (request.idempotency_key().size() > qcal::service::kMaxIdempotencyKeyBytes) return 0;
  absl::StatusOr<qcal::v1::JobSpec> spec = qcal::service::NormalizeJobSpec(request.spec());
  if (!spec.ok()) {
    QCAL_CHECK(absl::IsInvalidArgument(spec.status()));
    return 0;
  }
  absl::StatusOr<qcal::v1::JobSpec> again = qcal::service::NormalizeJobSpec(*spec);
  QCAL_CHECK(again.ok());
  QCAL_CHECK(qcal::service::SpecSha256(*again) == qcal::service::SpecSha256(*spec));
  absl::StatusOr<qcal::engine::Recipe> recipe = qcal::service::RecipeFromProto(spec->recipe());
  QCAL_CHECK(recipe.ok());
  qcal::v1::Job job;
  *job.mutable_spec() = *spec;
  (void)qcal::service::JobToJson(job).dump();
  QCAL_CHECK(qcal::service::JobOptionsFromSpec(*spec, root.path(), "/nonexistent-output", 1, "cpu",
                                               "job-0")
                 .ok());
  absl::StatusOr<qcal::service::ModelFacts> facts = qcal::service::ValidateJobInputs(root, *spec);
  if (!facts.ok()) return 0;
  // Confinement: whatever path was accepted names the model inside the root.
  QCAL_CHECK(facts->config.hidden_size == 32 && facts->num_blocks == 1);
  if (recipe->RunsGradientPass()) {
    QCAL_CHECK(qcal::engine::ModelOacBytes(facts->config, recipe->NeedsFisher()) > 0);
  }
  return 0;
}
