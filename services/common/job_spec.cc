#include "services/common/job_spec.h"

#include <cctype>
#include <filesystem>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/files.h"
#include "common/status.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "services/engine/model.h"

namespace qcal::service {
namespace fs = std::filesystem;

namespace {

absl::Status FieldError(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("spec.", field, " ", what));
}

// Worded like engine::Recipe::Validate's errors.
absl::Status RankError(const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("recipe: recipe key \"error_reconstruction.rank\" ", what));
}

// The value of a recipe enum key spelled `name` (engine::Parse*), worded like
// engine::Recipe::Validate's errors.
template <typename E>
absl::Status ParseEnum(absl::StatusOr<E> (*parse)(std::string_view), const std::string& name,
                       E* out) {
  absl::StatusOr<E> v = parse(name);
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat("recipe: ", v.status().message()));
  *out = *v;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<engine::Recipe> RecipeFromProto(const v1::Recipe& p) {
  engine::Recipe r;
  // An empty method reads as a missing one (Validate: "is required").
  if (p.has_method() && !p.method().empty()) {
    engine::QuantMethod method{};
    QCAL_RETURN_IF_ERROR(ParseEnum(&engine::ParseQuantMethod, p.method(), &method));
    r.method = method;
  }
  const v1::WeightsRecipe& w = p.weights();
  if (w.has_bits()) r.weights.bits = w.bits();
  if (w.has_group_size()) r.weights.group_size = w.group_size();
  if (w.has_symmetric()) r.weights.symmetric = w.symmetric();
  if (w.has_grid()) {
    QCAL_RETURN_IF_ERROR(ParseEnum(&engine::ParseGrid, w.grid(), &r.weights.grid));
  }
  const v1::GptqRecipe& g = p.gptq();
  if (g.has_damp()) r.gptq.damp = g.damp();
  if (g.has_block_size()) r.gptq.block_size = g.block_size();
  if (g.has_act_order()) r.gptq.act_order = g.act_order();
  if (g.has_true_sequential()) r.gptq.true_sequential = g.true_sequential();
  const v1::ActivationsRecipe& a = p.activations();
  if (a.has_bits()) r.activations.bits = a.bits();
  const v1::SmoothingRecipe& m = p.smoothing();
  if (m.has_method()) {
    QCAL_RETURN_IF_ERROR(ParseEnum(&engine::ParseSmoothingMethod, m.method(), &r.smoothing.method));
  }
  if (m.has_alpha()) r.smoothing.alpha = m.alpha();
  if (m.has_outlier_channels()) r.smoothing.outlier_channels = m.outlier_channels();
  if (p.has_error_reconstruction()) {
    const v1::ErrorReconstructionRecipe& e = p.error_reconstruction();
    engine::ErrorReconstructionRecipe& er = r.error_reconstruction;
    er.enabled = true;
    const bool rank_auto = e.has_rank_auto() && e.rank_auto();
    if (e.has_rank()) {
      if (rank_auto) return RankError("is set together with rank_auto (set one)");
      // An explicit rank < 1 must not read as missing (0) or as kRecipeAutoRank (-1).
      if (e.rank() < 1) {
        return RankError(absl::StrCat("must be an integer >= 1 or auto, got ", e.rank()));
      }
      er.rank = e.rank();
    } else if (rank_auto) {
      er.rank = engine::kRecipeAutoRank;
    }  // neither: rank stays 0, which Validate reports as required
    if (e.has_energy()) er.energy = e.energy();
    if (e.has_max_extra_params()) er.max_extra_params = e.max_extra_params();
    if (e.has_whitening()) {
      QCAL_RETURN_IF_ERROR(ParseEnum(&engine::ParseWhitening, e.whitening(), &er.whitening));
    }
  }
  if (p.has_hessian()) {
    QCAL_RETURN_IF_ERROR(ParseEnum(&engine::ParseHessianKind, p.hessian(), &r.hessian));
  }
  if (p.has_retrain()) {
    const v1::RetrainRecipe& t = p.retrain();
    engine::RetrainRecipe& rt = r.retrain;
    rt.enabled = true;
    if (t.has_method()) {
      QCAL_RETURN_IF_ERROR(ParseEnum(&engine::ParseRetrainMethod, t.method(), &rt.method));
    }
    if (t.has_rank()) rt.rank = t.rank();
    if (t.epochs().has_weight()) rt.epochs.weight = t.epochs().weight();
    if (t.epochs().has_mixed()) rt.epochs.mixed = t.epochs().mixed();
    if (t.epochs().has_output()) rt.epochs.output = t.epochs().output();
    if (t.has_lambda()) rt.lambda = t.lambda();
    if (t.has_lr_lora()) rt.lr_lora = t.lr_lora();
    if (t.has_lr_clip()) rt.lr_clip = t.lr_clip();
    if (t.has_weight_decay()) rt.weight_decay = t.weight_decay();
  }
  if (p.has_moe()) {
    const v1::MoeRecipe& m = p.moe();
    engine::MoeRecipe& moe = r.moe.emplace();
    if (m.has_routing()) {
      QCAL_RETURN_IF_ERROR(ParseEnum(&engine::ParseMoeRouting, m.routing(), &moe.routing));
    }
    if (m.has_min_tokens()) moe.min_tokens = m.min_tokens();
  }
  QCAL_RETURN_IF_ERROR(r.Validate());
  return r;
}

v1::Recipe RecipeToProto(const engine::Recipe& r) {
  v1::Recipe p;
  if (r.method) p.set_method(std::string(engine::RecipeName(*r.method)));
  v1::WeightsRecipe* w = p.mutable_weights();
  w->set_bits(r.weights.bits);
  w->set_group_size(r.weights.group_size);
  w->set_symmetric(r.weights.symmetric);
  w->set_grid(std::string(engine::RecipeName(r.weights.grid)));
  v1::GptqRecipe* g = p.mutable_gptq();
  g->set_damp(r.gptq.damp);
  g->set_block_size(r.gptq.block_size);
  g->set_act_order(r.gptq.act_order);
  g->set_true_sequential(r.gptq.true_sequential);
  p.mutable_activations()->set_bits(r.activations.bits);
  v1::SmoothingRecipe* m = p.mutable_smoothing();
  m->set_method(std::string(engine::RecipeName(r.smoothing.method)));
  m->set_alpha(r.smoothing.alpha);
  m->set_outlier_channels(r.smoothing.outlier_channels);
  if (r.error_reconstruction.enabled) {
    const engine::ErrorReconstructionRecipe& er = r.error_reconstruction;
    v1::ErrorReconstructionRecipe* e = p.mutable_error_reconstruction();
    // rank_auto is always set; rank only when fixed (RecipeFromProto refuses both).
    e->set_rank_auto(er.rank == engine::kRecipeAutoRank);
    if (er.rank != engine::kRecipeAutoRank) e->set_rank(er.rank);
    e->set_energy(er.energy);
    e->set_max_extra_params(er.max_extra_params);
    e->set_whitening(std::string(engine::RecipeName(er.whitening)));
  }
  p.set_hessian(std::string(engine::RecipeName(r.hessian)));
  if (r.retrain.enabled) {
    const engine::RetrainRecipe& rt = r.retrain;
    v1::RetrainRecipe* t = p.mutable_retrain();
    t->set_method(std::string(engine::RecipeName(rt.method)));
    // Absent with error reconstruction (its factors start the LoRA; Validate refuses a rank then),
    // else the rank trained, default filled in.
    if (!r.error_reconstruction.enabled) t->set_rank(rt.RankOrDefault());
    t->mutable_epochs()->set_weight(rt.epochs.weight);
    t->mutable_epochs()->set_mixed(rt.epochs.mixed);
    t->mutable_epochs()->set_output(rt.epochs.output);
    t->set_lambda(rt.lambda);
    t->set_lr_lora(rt.lr_lora);
    t->set_lr_clip(rt.lr_clip);
    t->set_weight_decay(rt.weight_decay);
  }
  if (r.moe) {
    v1::MoeRecipe* m = p.mutable_moe();
    m->set_routing(std::string(engine::RecipeName(r.moe->routing)));
    m->set_min_tokens(r.moe->min_tokens);
  }
  return p;
}

absl::StatusOr<v1::JobSpec> NormalizeJobSpec(const v1::JobSpec& spec) {
  v1::JobSpec n;
  if (spec.model().empty()) return FieldError("model", "is required");
  if (spec.calib().empty()) return FieldError("calib", "is required");
  n.set_model(spec.model());
  n.set_calib(spec.calib());
  const int samples = spec.has_samples() ? spec.samples() : kDefaultSamples;
  if (samples < 1 || samples > (1 << 20)) {
    return FieldError("samples", absl::StrCat("must be in 1..1048576, got ", samples));
  }
  n.set_samples(samples);
  const int seq_len = spec.has_seq_len() ? spec.seq_len() : kDefaultSeqLen;
  if (seq_len < 2 || seq_len > (1 << 20)) {
    return FieldError("seq_len", absl::StrCat("must be in 2..1048576, got ", seq_len));
  }
  n.set_seq_len(seq_len);
  n.set_seed(spec.has_seed() ? spec.seed() : 0);
  QCAL_ASSIGN_OR_RETURN(engine::Recipe recipe, RecipeFromProto(spec.recipe()));
  *n.mutable_recipe() = RecipeToProto(recipe);
  QCAL_RETURN_IF_ERROR(ValidateOutputName(spec.output_name()));
  n.set_output_name(spec.output_name());
  if (spec.has_eval_text() && !spec.eval_text().empty()) {
    n.set_eval_text(spec.eval_text());
    const int eval_len = spec.has_eval_seq_len() ? spec.eval_seq_len() : seq_len;
    if (eval_len < 2 || eval_len > (1 << 20)) {
      return FieldError("eval_seq_len", absl::StrCat("must be in 2..1048576, got ", eval_len));
    }
    n.set_eval_seq_len(eval_len);
    const int windows = spec.has_eval_max_windows() ? spec.eval_max_windows() : -1;
    if (windows == 0 || windows < -1) {
      return FieldError("eval_max_windows",
                        absl::StrCat("must be -1 (all) or >= 1, got ", windows));
    }
    n.set_eval_max_windows(windows);
  }
  if (spec.has_threads()) {
    if (spec.threads() < 1 || spec.threads() > 4096) {
      return FieldError("threads", absl::StrCat("must be in 1..4096, got ", spec.threads()));
    }
    n.set_threads(spec.threads());
  }
  n.set_overwrite(spec.has_overwrite() && spec.overwrite());
  const int64_t shard_size = spec.has_shard_size() ? spec.shard_size() : int64_t{4} << 30;
  if (shard_size < 1) {
    return FieldError("shard_size", absl::StrCat("must be at least 1 byte, got ", shard_size));
  }
  n.set_shard_size(shard_size);
  const std::string dtype = spec.has_compute_dtype() ? spec.compute_dtype() : "f32";
  if (dtype != "f32" && dtype != "bf16") {
    return FieldError("compute_dtype",
                      absl::StrCat("must be \"f32\" or \"bf16\", got \"", dtype, "\""));
  }
  n.set_compute_dtype(dtype);
  const int min_workers = spec.workers().has_min() ? spec.workers().min() : 1;
  const int max_workers = spec.workers().has_max() ? spec.workers().max() : min_workers;
  if (min_workers < 1 || min_workers > kMaxGangWorkers) {
    return FieldError("workers.min",
                      absl::StrCat("must be in 1..", kMaxGangWorkers, ", got ", min_workers));
  }
  if (max_workers < min_workers || max_workers > kMaxGangWorkers) {
    return FieldError("workers.max", absl::StrCat("must be in workers.min (", min_workers, ")..",
                                                  kMaxGangWorkers, ", got ", max_workers));
  }
  n.mutable_workers()->set_min(min_workers);
  n.mutable_workers()->set_max(max_workers);
  return n;
}

std::string SpecSha256(const v1::JobSpec& normalized) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream out(&bytes);
    google::protobuf::io::CodedOutputStream coded(&out);
    coded.SetSerializationDeterministic(true);
    normalized.SerializeToCodedStream(&coded);
  }
  return Sha256Hex(bytes);
}

absl::Status ValidateOutputName(const std::string& name) {
  if (name.empty()) return FieldError("output_name", "is required");
  if (name.size() > kMaxOutputNameBytes) {
    return FieldError("output_name",
                      absl::StrCat("is longer than ", kMaxOutputNameBytes, " bytes"));
  }
  if (name.find('/') != std::string::npos || name.find('\0') != std::string::npos) {
    return FieldError("output_name",
                      absl::StrCat("\"", name, "\" must be one path component (no '/')"));
  }
  if (name[0] == '.') {
    return FieldError("output_name", absl::StrCat("\"", name, "\" must not start with '.'"));
  }
  return absl::OkStatus();
}

std::string TempOutputName(const std::string& output_name, const std::string& job_id,
                           uint64_t gang_epoch) {
  return absl::StrCat(".", output_name, ".", job_id, ".", gang_epoch, ".qcal-tmp");
}

std::string JobOfTempOutputName(const std::string& name) {
  constexpr absl::string_view kSuffix = ".qcal-tmp";
  absl::string_view s = name;
  if (s.size() <= kSuffix.size() || s.front() != '.' || !absl::EndsWith(s, kSuffix)) return "";
  s.remove_suffix(kSuffix.size());
  // ".<name>.<job_id>.<epoch>": job ids and epochs hold no '.', output names may.
  const size_t epoch_dot = s.rfind('.');
  uint64_t epoch = 0;
  if (epoch_dot == absl::string_view::npos || !absl::SimpleAtoi(s.substr(epoch_dot + 1), &epoch)) {
    return "";
  }
  s = s.substr(0, epoch_dot);
  const size_t job_dot = s.rfind('.');
  if (job_dot == absl::string_view::npos || job_dot == 0) return "";
  return std::string(s.substr(job_dot + 1));
}

absl::StatusOr<engine::JobOptions> JobOptionsFromSpec(const v1::JobSpec& spec,
                                                      const std::string& input_root,
                                                      const std::string& output_root, int threads,
                                                      const std::string& device,
                                                      const std::string& job_id) {
  engine::JobOptions o;
  const fs::path in(input_root);
  o.model_dir = (in / spec.model()).string();
  QCAL_ASSIGN_OR_RETURN(o.recipe, RecipeFromProto(spec.recipe()));
  o.calib_path = (in / spec.calib()).string();
  o.samples = spec.samples();
  o.seq_len = spec.seq_len();
  o.seed = spec.seed();
  o.out_dir = (fs::path(output_root) / spec.output_name()).string();
  o.overwrite = spec.overwrite();
  if (spec.has_eval_text()) {
    o.eval_text = (in / spec.eval_text()).string();
    o.eval_seq_len = spec.eval_seq_len();
    o.eval_max_windows = spec.eval_max_windows();
  }
  o.threads = threads;
  o.device = device;
  o.job_id = job_id;
  if (spec.has_shard_size()) o.shard_size = spec.shard_size();
  if (spec.has_compute_dtype()) o.compute_dtype = spec.compute_dtype();
  return o;
}

std::string JobStateName(v1::JobState state) {
  std::string name = v1::JobState_Name(state);
  const std::string prefix = "JOB_STATE_";
  return name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name;
}

std::string JobStageName(v1::JobStage stage) {
  std::string name = v1::JobStage_Name(stage);
  const std::string prefix = "JOB_STAGE_";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

bool IsFinal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

std::string OwnedLinearsText(const v1::GangMember& member) {
  std::vector<std::string> names;
  for (int l : member.owned_linears()) {
    if (l >= 0 && l < engine::kNumLinears) {
      names.push_back(engine::LinearName(engine::kAllLinears[static_cast<size_t>(l)]));
    }
  }
  std::string out = names.empty() ? std::string("-") : absl::StrJoin(names, ",");
  if (member.owned_expert_units_size() > 0) {
    absl::StrAppend(&out, " expert units ", absl::StrJoin(member.owned_expert_units(), ","));
  }
  return out;
}

nlohmann::ordered_json JobToJson(const v1::Job& job) {
  nlohmann::ordered_json j;
  j["job_id"] = job.job_id();
  j["state"] = JobStateName(job.state());
  j["stage"] = JobStageName(job.stage());
  j["client"] = job.client();
  j["blocks_done"] = job.blocks_done();
  j["num_blocks"] = job.num_blocks();
  j["checkpoint_block"] = job.checkpoint_block();
  j["gradient_pass_done"] = job.gradient_pass_done();
  j["attempts"] = job.attempts();
  j["device_kind"] = job.device_kind();
  j["threads"] = job.threads();
  j["worker_id"] = job.worker_id();
  if (job.gang_size() > 0) {
    j["gang_epoch"] = job.gang_epoch();
    nlohmann::ordered_json gang = nlohmann::ordered_json::array();
    for (const v1::GangMember& m : job.gang()) {
      nlohmann::ordered_json g;
      g["rank"] = m.rank();
      g["worker_id"] = m.worker_id();
      g["peer_address"] = m.peer_address();
      g["chunks"] = {m.chunk_begin(), m.chunk_end()};
      g["owned_linears"] = nlohmann::ordered_json::array();
      for (int l : m.owned_linears()) g["owned_linears"].push_back(l);
      if (m.owned_expert_units_size() > 0) {
        g["owned_expert_units"] = nlohmann::ordered_json::array();
        for (int u : m.owned_expert_units()) g["owned_expert_units"].push_back(u);
      }
      gang.push_back(std::move(g));
    }
    j["gang"] = std::move(gang);
  }
  j["cancel_requested"] = job.cancel_requested();
  j["error"] = job.error();
  j["output"] = job.spec().output_name();
  j["recipe_sha256"] = job.recipe_sha256();
  if (job.has_result()) {
    j["perplexity"] = job.result().perplexity();
    j["perplexity_fp"] = job.result().perplexity_fp();
  }
  j["created_unix_ms"] = job.created_unix_ms();
  j["started_unix_ms"] = job.started_unix_ms();
  j["finished_unix_ms"] = job.finished_unix_ms();
  const v1::JobSpec& s = job.spec();
  nlohmann::ordered_json spec;
  spec["model"] = s.model();
  spec["calib"] = s.calib();
  spec["samples"] = s.samples();
  spec["seq_len"] = s.seq_len();
  spec["seed"] = s.seed();
  if (s.has_eval_text()) {
    spec["eval_text"] = s.eval_text();
    spec["eval_seq_len"] = s.eval_seq_len();
    spec["eval_max_windows"] = s.eval_max_windows();
  }
  if (s.has_threads()) spec["threads"] = s.threads();
  if (s.has_workers()) {
    spec["workers"] = {{"min", s.workers().min()}, {"max", s.workers().max()}};
  }
  absl::StatusOr<engine::Recipe> recipe = RecipeFromProto(s.recipe());
  if (recipe.ok()) spec["recipe"] = recipe->ToCanonicalJson();
  j["spec"] = spec;
  return j;
}

}  // namespace qcal::service
