#include "services/engine/recipe.h"

#include <array>
#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "yaml-cpp/yaml.h"

namespace qcal::engine {
namespace {

absl::Status KeyError(const std::string& source, const std::string& key, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": recipe key \"", key, "\" ", what));
}

absl::Status CheckKeys(const YAML::Node& node, const std::string& source, const std::string& path,
                       const std::set<std::string>& allowed) {
  if (!node.IsMap()) return KeyError(source, path, "must be a mapping");
  for (const auto& kv : node) {
    // A complex key ("? [a, b]: ...") is a sequence or a mapping: no recipe key is.
    if (!kv.first.IsScalar()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": recipe keys must be plain names",
                       path.empty() ? std::string() : absl::StrCat(" (under \"", path, "\")")));
    }
    const std::string key = kv.first.Scalar();
    if (!allowed.count(key)) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": unknown recipe key \"",
                                                     path.empty() ? key : path + "." + key, "\""));
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status Read(const YAML::Node& parent, const char* key, const std::string& source,
                  const std::string& path, T* out) {
  const YAML::Node n = parent[key];
  if (!n) return absl::OkStatus();
  const std::string full = path.empty() ? key : path + "." + key;
  if (!n.IsScalar()) return KeyError(source, full, "must be a scalar");
  try {
    *out = n.as<T>();
  } catch (const YAML::Exception&) {
    return KeyError(source, full, absl::StrCat("has an invalid value \"", n.Scalar(), "\""));
  }
  return absl::OkStatus();
}

// A recipe enum's names, in the order its error message lists them.
template <typename E, size_t N>
using Names = std::array<std::pair<E, const char*>, N>;

constexpr Names<QuantMethod, 2> kMethodNames = {
    {{QuantMethod::kRtn, "rtn"}, {QuantMethod::kGptq, "gptq"}}};
constexpr Names<kernels::GridKind, 3> kGridNames = {{{kernels::GridKind::kUniform, "uniform"},
                                                     {kernels::GridKind::kCuberoot, "cuberoot"},
                                                     {kernels::GridKind::kBalanced, "balanced"}}};
constexpr Names<SmoothingMethod, 3> kSmoothingNames = {
    {{SmoothingMethod::kNone, "none"},
     {SmoothingMethod::kSmoothQuant, "smoothquant"},
     {SmoothingMethod::kAser, "aser"}}};
constexpr Names<Whitening, 3> kWhiteningNames = {{{Whitening::kCholesky, "cholesky"},
                                                  {Whitening::kDiagonal, "diagonal"},
                                                  {Whitening::kNone, "none"}}};
constexpr Names<HessianKind, 3> kHessianNames = {
    {{HessianKind::kLayer, "layer"},
     {HessianKind::kOutputAdaptive, "output_adaptive"},
     {HessianKind::kOutputAdaptiveToken, "output_adaptive_token"}}};
constexpr Names<RetrainMethod, 2> kRetrainMethodNames = {
    {{RetrainMethod::kApiq, "apiq"}, {RetrainMethod::kSaliency, "saliency"}}};
constexpr Names<MoeRouting, 2> kMoeRoutingNames = {
    {{MoeRouting::kQuantized, "quantized"}, {MoeRouting::kFullPrecision, "full_precision"}}};

template <typename E, size_t N>
const char* NameOf(const Names<E, N>& names, E v) {
  for (const auto& [value, name] : names) {
    if (value == v) return name;
  }
  return "?";
}

// `recipe key "<key>" must be a, b or c, got "<name>"` for a name that is not in `names`.
template <typename E, size_t N>
absl::StatusOr<E> ValueOf(const Names<E, N>& names, const char* key, std::string_view name) {
  std::string expected;
  for (size_t i = 0; i < N; ++i) {
    if (name == names[i].second) return names[i].first;
    absl::StrAppend(&expected, i == 0 ? "" : (i + 1 == N ? " or " : ", "), names[i].second);
  }
  return absl::InvalidArgumentError(absl::StrCat("recipe key \"", key, "\" must be ", expected,
                                                 ", got \"", std::string(name), "\""));
}

// Reads a string key and parses it with `parse` (a Parse* function), naming the source.
template <typename E>
absl::Status ReadEnum(const YAML::Node& parent, const char* key, const std::string& source,
                      const std::string& path, absl::StatusOr<E> (*parse)(std::string_view),
                      E* out) {
  if (!parent[key]) return absl::OkStatus();
  std::string name;
  QCAL_RETURN_IF_ERROR(Read(parent, key, source, path, &name));
  absl::StatusOr<E> v = parse(name);
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", v.status().message()));
  *out = *v;
  return absl::OkStatus();
}

}  // namespace

const char* RecipeName(QuantMethod v) { return NameOf(kMethodNames, v); }
const char* RecipeName(kernels::GridKind v) { return NameOf(kGridNames, v); }
const char* RecipeName(SmoothingMethod v) { return NameOf(kSmoothingNames, v); }
const char* RecipeName(Whitening v) { return NameOf(kWhiteningNames, v); }
const char* RecipeName(HessianKind v) { return NameOf(kHessianNames, v); }
const char* RecipeName(RetrainMethod v) { return NameOf(kRetrainMethodNames, v); }
const char* RecipeName(MoeRouting v) { return NameOf(kMoeRoutingNames, v); }

absl::StatusOr<QuantMethod> ParseQuantMethod(std::string_view name) {
  return ValueOf(kMethodNames, "method", name);
}
absl::StatusOr<kernels::GridKind> ParseGrid(std::string_view name) {
  return ValueOf(kGridNames, "weights.grid", name);
}
absl::StatusOr<SmoothingMethod> ParseSmoothingMethod(std::string_view name) {
  return ValueOf(kSmoothingNames, "smoothing.method", name);
}
absl::StatusOr<Whitening> ParseWhitening(std::string_view name) {
  return ValueOf(kWhiteningNames, "error_reconstruction.whitening", name);
}
absl::StatusOr<HessianKind> ParseHessianKind(std::string_view name) {
  return ValueOf(kHessianNames, "hessian", name);
}
absl::StatusOr<RetrainMethod> ParseRetrainMethod(std::string_view name) {
  return ValueOf(kRetrainMethodNames, "retrain.method", name);
}
absl::StatusOr<MoeRouting> ParseMoeRouting(std::string_view name) {
  return ValueOf(kMoeRoutingNames, "moe.routing", name);
}

namespace {

// The retrain section's rules (Recipe::Validate), naming the key.
absl::Status ValidateRetrain(const Recipe& r, const std::string& src) {
  const RetrainRecipe& t = r.retrain;
  if (r.weights.grid != kernels::GridKind::kUniform) {
    return KeyError(src, "weights.grid",
                    absl::StrCat("must be uniform with a retrain section (the clipped grid's "
                                 "straight-through estimator is defined for it), got \"",
                                 RecipeName(r.weights.grid), "\""));
  }
  if (t.rank) {
    if (r.error_reconstruction.enabled) {
      return KeyError(src, "retrain.rank",
                      "must be absent with error_reconstruction (the LoRA starts from its factors, "
                      "at their ranks)");
    }
    if (*t.rank < 1) {
      return KeyError(src, "retrain.rank", absl::StrCat("must be an integer >= 1, got ", *t.rank));
    }
  }
  const std::pair<const char*, int> stages[] = {{"retrain.epochs.weight", t.epochs.weight},
                                                {"retrain.epochs.mixed", t.epochs.mixed},
                                                {"retrain.epochs.output", t.epochs.output}};
  for (const auto& [key, epochs] : stages) {
    if (epochs < 0) return KeyError(src, key, absl::StrCat("must be >= 0, got ", epochs));
  }
  // Summed in 64 bits: each count may be up to INT_MAX.
  if (int64_t{t.epochs.weight} + t.epochs.mixed + t.epochs.output == 0) {
    return KeyError(src, "retrain.epochs", "must give at least one stage a positive epoch count");
  }
  if (!(t.lambda >= 0 && std::isfinite(t.lambda))) {
    return KeyError(src, "retrain.lambda", absl::StrCat("must be finite and >= 0, got ", t.lambda));
  }
  if (!(t.lr_lora > 0 && std::isfinite(t.lr_lora))) {
    return KeyError(src, "retrain.lr_lora",
                    absl::StrCat("must be finite and > 0, got ", t.lr_lora));
  }
  if (!(t.lr_clip > 0 && std::isfinite(t.lr_clip))) {
    return KeyError(src, "retrain.lr_clip",
                    absl::StrCat("must be finite and > 0, got ", t.lr_clip));
  }
  if (!(t.weight_decay >= 0 && std::isfinite(t.weight_decay))) {
    return KeyError(src, "retrain.weight_decay",
                    absl::StrCat("must be finite and >= 0, got ", t.weight_decay));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Recipe::Validate() const {
  const std::string src = "recipe";
  if (!method) return KeyError(src, "method", "is required (rtn or gptq)");
  if (weights.bits == 0) return KeyError(src, "weights.bits", "is required (2..8)");
  if (weights.bits < 2 || weights.bits > 8) {
    return KeyError(src, "weights.bits", absl::StrCat("must be in 2..8, got ", weights.bits));
  }
  if (weights.grid == kernels::GridKind::kBalanced && weights.bits != 2) {
    return KeyError(src, "weights.grid",
                    absl::StrCat("balanced requires weights.bits 2 (its five levels are the 2-bit "
                                 "grid plus one), got weights.bits ",
                                 weights.bits));
  }
  if (weights.group_size == 0 || weights.group_size < -1) {
    return KeyError(src, "weights.group_size",
                    absl::StrCat("must be -1 or a positive integer, got ", weights.group_size));
  }
  if (!(gptq.damp >= 0 && gptq.damp <= 1)) {
    return KeyError(src, "gptq.damp", absl::StrCat("must be in [0, 1], got ", gptq.damp));
  }
  if (gptq.block_size < 1 || gptq.block_size > 4096) {
    return KeyError(src, "gptq.block_size",
                    absl::StrCat("must be in 1..4096, got ", gptq.block_size));
  }
  if (hessian != HessianKind::kLayer && method != QuantMethod::kGptq) {
    return KeyError(src, "hessian",
                    absl::StrCat("\"", RecipeName(hessian), "\" requires method gptq, got \"",
                                 RecipeName(*method), "\""));
  }
  const int ab = activations.bits;
  if (ab != 16 && (ab < 4 || ab > 8)) {
    return KeyError(src, "activations.bits", absl::StrCat("must be 16 (off) or 4..8, got ", ab));
  }
  if (!(smoothing.alpha >= 0 && smoothing.alpha <= 1)) {
    return KeyError(src, "smoothing.alpha",
                    absl::StrCat("must be in [0, 1], got ", smoothing.alpha));
  }
  if (smoothing.outlier_channels < 1) {
    return KeyError(src, "smoothing.outlier_channels",
                    absl::StrCat("must be >= 1, got ", smoothing.outlier_channels));
  }
  const ErrorReconstructionRecipe& er = error_reconstruction;
  if (smoothing.method == SmoothingMethod::kAser && !er.enabled) {
    return KeyError(src, "smoothing.method",
                    "aser requires an error_reconstruction section (it reconstructs the "
                    "extracted outlier channels)");
  }
  if (er.enabled) {
    if (er.rank == 0) {
      return KeyError(src, "error_reconstruction.rank", "is required (an integer >= 1, or auto)");
    }
    if (er.rank < 1 && er.rank != kRecipeAutoRank) {
      return KeyError(src, "error_reconstruction.rank",
                      absl::StrCat("must be an integer >= 1 or auto, got ", er.rank));
    }
    if (!(er.energy > 0 && er.energy <= 1)) {
      return KeyError(src, "error_reconstruction.energy",
                      absl::StrCat("must be in (0, 1], got ", er.energy));
    }
    if (!(er.max_extra_params > 0 && er.max_extra_params <= 1)) {
      return KeyError(src, "error_reconstruction.max_extra_params",
                      absl::StrCat("must be in (0, 1], got ", er.max_extra_params));
    }
    if (smoothing.method == SmoothingMethod::kAser && er.rank != kRecipeAutoRank &&
        smoothing.outlier_channels > er.rank) {
      return KeyError(src, "smoothing.outlier_channels",
                      absl::StrCat("must not exceed error_reconstruction.rank (", er.rank,
                                   "), got ", smoothing.outlier_channels));
    }
  }
  if (retrain.enabled) QCAL_RETURN_IF_ERROR(ValidateRetrain(*this, src));
  if (moe && moe->min_tokens < 1) {
    return KeyError(src, "moe.min_tokens",
                    absl::StrCat("must be an integer >= 1, got ", moe->min_tokens));
  }
  return absl::OkStatus();
}

absl::Status Recipe::CheckForModel(const ModelConfig& config, const std::string& source) const {
  if (!config.moe()) {
    if (!moe) return absl::OkStatus();
    return KeyError(source, "moe",
                    absl::StrCat("is for mixture-of-experts models; this model (",
                                 config.model_type, ") is dense"));
  }
  const std::string why = absl::StrCat(" on a mixture-of-experts model (", config.model_type,
                                       "): phase 2 calibrates experts with GPTQ or RTN only");
  if (smoothing.enabled()) {
    return KeyError(
        source, "smoothing.method",
        absl::StrCat("must be none", why, ", got \"", RecipeName(smoothing.method), "\""));
  }
  if (error_reconstruction.enabled) {
    return KeyError(source, "error_reconstruction",
                    absl::StrCat("must be absent", why,
                                 " (PEFT cannot address one expert's linear of a transformers 5 "
                                 "model: docs/MOE.md)"));
  }
  if (hessian != HessianKind::kLayer) {
    return KeyError(source, "hessian",
                    absl::StrCat("must be layer", why, ", got \"", RecipeName(hessian), "\""));
  }
  if (retrain.enabled) return KeyError(source, "retrain", absl::StrCat("must be absent", why));
  if (!gptq.true_sequential) {
    return KeyError(source, "gptq.true_sequential",
                    absl::StrCat("must be true", why,
                                 " (each expert's down_proj statistics follow its quantized "
                                 "gate/up_proj)"));
  }
  return absl::OkStatus();
}

absl::Status Recipe::ResolveForModel(const ModelConfig& config, const std::string& source) {
  QCAL_RETURN_IF_ERROR(CheckForModel(config, source));
  if (config.moe() && !moe) moe = MoeRecipe{};
  return absl::OkStatus();
}

nlohmann::json Recipe::ToCanonicalJson() const {
  nlohmann::json j;  // nlohmann::json objects keep keys sorted
  j["method"] = method ? std::string(RecipeName(*method)) : "";
  j["weights"] = {{"bits", weights.bits},
                  {"group_size", weights.group_size},
                  {"symmetric", weights.symmetric},
                  {"grid", std::string(RecipeName(weights.grid))}};
  j["gptq"] = {{"damp", gptq.damp},
               {"block_size", gptq.block_size},
               {"act_order", gptq.act_order},
               {"true_sequential", gptq.true_sequential}};
  j["activations"] = {{"bits", activations.bits}};
  j["hessian"] = std::string(RecipeName(hessian));
  j["smoothing"] = {{"method", std::string(RecipeName(smoothing.method))},
                    {"alpha", smoothing.alpha},
                    {"outlier_channels", smoothing.outlier_channels}};
  if (error_reconstruction.enabled) {
    const ErrorReconstructionRecipe& er = error_reconstruction;
    j["error_reconstruction"] = {
        {"rank", er.rank == kRecipeAutoRank ? nlohmann::json("auto") : nlohmann::json(er.rank)},
        {"energy", er.energy},
        {"max_extra_params", er.max_extra_params},
        {"whitening", std::string(RecipeName(er.whitening))}};
  } else {
    j["error_reconstruction"] = nullptr;
  }
  if (retrain.enabled) {
    const RetrainRecipe& t = retrain;
    // With error_reconstruction the rank is absent (its factors' ranks): null.
    j["retrain"] = {
        {"method", std::string(RecipeName(t.method))},
        {"rank", error_reconstruction.enabled ? nlohmann::json(nullptr)
                                              : nlohmann::json(t.RankOrDefault())},
        {"epochs",
         {{"weight", t.epochs.weight}, {"mixed", t.epochs.mixed}, {"output", t.epochs.output}}},
        {"lambda", t.lambda},
        {"lr_lora", t.lr_lora},
        {"lr_clip", t.lr_clip},
        {"weight_decay", t.weight_decay}};
  }
  if (moe) {
    j["moe"] = {{"routing", std::string(RecipeName(moe->routing))},
                {"min_tokens", moe->min_tokens}};
  }
  return j;
}

kernels::QuantSpec SpecOf(const Recipe& recipe) {
  kernels::QuantSpec spec;
  spec.bits = recipe.weights.bits;
  spec.group_size = recipe.weights.group_size;
  spec.symmetric = recipe.weights.symmetric;
  spec.grid = recipe.weights.grid;
  return spec;
}

std::string Recipe::Sha256() const { return Sha256Hex(ToCanonicalJson().dump()); }

absl::StatusOr<Recipe> ParseRecipeYaml(const std::string& text, const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": malformed YAML: ", e.what()));
  }
  if (!root || root.IsNull())
    return absl::InvalidArgumentError(absl::StrCat(source, ": recipe is empty"));
  QCAL_RETURN_IF_ERROR(CheckKeys(root, source, "",
                                 {"method", "weights", "gptq", "activations", "smoothing",
                                  "error_reconstruction", "hessian", "retrain", "moe"}));
  Recipe r;
  // An empty method reads as a missing one (Validate: "is required").
  if (root["method"] && !(root["method"].IsScalar() && root["method"].Scalar().empty())) {
    QuantMethod method{};
    QCAL_RETURN_IF_ERROR(ReadEnum(root, "method", source, "", &ParseQuantMethod, &method));
    r.method = method;
  }
  QCAL_RETURN_IF_ERROR(ReadEnum(root, "hessian", source, "", &ParseHessianKind, &r.hessian));
  if (root["weights"]) {
    const YAML::Node w = root["weights"];
    QCAL_RETURN_IF_ERROR(
        CheckKeys(w, source, "weights", {"bits", "group_size", "symmetric", "grid"}));
    QCAL_RETURN_IF_ERROR(Read(w, "bits", source, "weights", &r.weights.bits));
    QCAL_RETURN_IF_ERROR(Read(w, "group_size", source, "weights", &r.weights.group_size));
    QCAL_RETURN_IF_ERROR(Read(w, "symmetric", source, "weights", &r.weights.symmetric));
    QCAL_RETURN_IF_ERROR(ReadEnum(w, "grid", source, "weights", &ParseGrid, &r.weights.grid));
  }
  if (root["gptq"]) {
    const YAML::Node g = root["gptq"];
    QCAL_RETURN_IF_ERROR(
        CheckKeys(g, source, "gptq", {"damp", "block_size", "act_order", "true_sequential"}));
    QCAL_RETURN_IF_ERROR(Read(g, "damp", source, "gptq", &r.gptq.damp));
    QCAL_RETURN_IF_ERROR(Read(g, "block_size", source, "gptq", &r.gptq.block_size));
    QCAL_RETURN_IF_ERROR(Read(g, "act_order", source, "gptq", &r.gptq.act_order));
    QCAL_RETURN_IF_ERROR(Read(g, "true_sequential", source, "gptq", &r.gptq.true_sequential));
  }
  if (root["activations"]) {
    const YAML::Node a = root["activations"];
    QCAL_RETURN_IF_ERROR(CheckKeys(a, source, "activations", {"bits"}));
    QCAL_RETURN_IF_ERROR(Read(a, "bits", source, "activations", &r.activations.bits));
  }
  if (root["smoothing"]) {
    const YAML::Node m = root["smoothing"];
    QCAL_RETURN_IF_ERROR(
        CheckKeys(m, source, "smoothing", {"method", "alpha", "outlier_channels"}));
    QCAL_RETURN_IF_ERROR(
        ReadEnum(m, "method", source, "smoothing", &ParseSmoothingMethod, &r.smoothing.method));
    QCAL_RETURN_IF_ERROR(Read(m, "alpha", source, "smoothing", &r.smoothing.alpha));
    QCAL_RETURN_IF_ERROR(
        Read(m, "outlier_channels", source, "smoothing", &r.smoothing.outlier_channels));
  }
  if (root["error_reconstruction"]) {
    const YAML::Node e = root["error_reconstruction"];
    QCAL_RETURN_IF_ERROR(CheckKeys(e, source, "error_reconstruction",
                                   {"rank", "energy", "max_extra_params", "whitening"}));
    ErrorReconstructionRecipe& er = r.error_reconstruction;
    er.enabled = true;
    const YAML::Node rank = e["rank"];
    if (!rank) {
      return KeyError(source, "error_reconstruction.rank",
                      "is required (an integer >= 1, or auto)");
    }
    if (rank.IsScalar() && rank.Scalar() == "auto") {
      er.rank = kRecipeAutoRank;
    } else {
      QCAL_RETURN_IF_ERROR(Read(e, "rank", source, "error_reconstruction", &er.rank));
      if (er.rank < 1) {
        return KeyError(source, "error_reconstruction.rank",
                        absl::StrCat("must be an integer >= 1 or auto, got ", rank.Scalar()));
      }
    }
    QCAL_RETURN_IF_ERROR(Read(e, "energy", source, "error_reconstruction", &er.energy));
    QCAL_RETURN_IF_ERROR(
        Read(e, "max_extra_params", source, "error_reconstruction", &er.max_extra_params));
    QCAL_RETURN_IF_ERROR(
        ReadEnum(e, "whitening", source, "error_reconstruction", &ParseWhitening, &er.whitening));
  }
  if (root["retrain"]) {
    const YAML::Node t = root["retrain"];
    QCAL_RETURN_IF_ERROR(
        CheckKeys(t, source, "retrain",
                  {"method", "rank", "epochs", "lambda", "lr_lora", "lr_clip", "weight_decay"}));
    RetrainRecipe& rt = r.retrain;
    rt.enabled = true;
    QCAL_RETURN_IF_ERROR(ReadEnum(t, "method", source, "retrain", &ParseRetrainMethod, &rt.method));
    if (t["rank"]) {
      int rank = 0;
      QCAL_RETURN_IF_ERROR(Read(t, "rank", source, "retrain", &rank));
      rt.rank = rank;
    }
    if (t["epochs"]) {
      const YAML::Node e = t["epochs"];
      QCAL_RETURN_IF_ERROR(CheckKeys(e, source, "retrain.epochs", {"weight", "mixed", "output"}));
      QCAL_RETURN_IF_ERROR(Read(e, "weight", source, "retrain.epochs", &rt.epochs.weight));
      QCAL_RETURN_IF_ERROR(Read(e, "mixed", source, "retrain.epochs", &rt.epochs.mixed));
      QCAL_RETURN_IF_ERROR(Read(e, "output", source, "retrain.epochs", &rt.epochs.output));
    }
    QCAL_RETURN_IF_ERROR(Read(t, "lambda", source, "retrain", &rt.lambda));
    QCAL_RETURN_IF_ERROR(Read(t, "lr_lora", source, "retrain", &rt.lr_lora));
    QCAL_RETURN_IF_ERROR(Read(t, "lr_clip", source, "retrain", &rt.lr_clip));
    QCAL_RETURN_IF_ERROR(Read(t, "weight_decay", source, "retrain", &rt.weight_decay));
  }
  if (root["moe"]) {
    const YAML::Node m = root["moe"];
    QCAL_RETURN_IF_ERROR(CheckKeys(m, source, "moe", {"routing", "min_tokens"}));
    MoeRecipe& moe = r.moe.emplace();
    QCAL_RETURN_IF_ERROR(ReadEnum(m, "routing", source, "moe", &ParseMoeRouting, &moe.routing));
    QCAL_RETURN_IF_ERROR(Read(m, "min_tokens", source, "moe", &moe.min_tokens));
  }
  absl::Status st = r.Validate();
  if (!st.ok()) {
    // Validate() names the key; re-prefix with the file.
    std::string msg(st.message());
    if (msg.rfind("recipe: ", 0) == 0) msg = msg.substr(8);
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", msg));
  }
  return r;
}

absl::StatusOr<Recipe> LoadRecipeFile(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseRecipeYaml(text, path);
}

}  // namespace qcal::engine
