#include "services/engine/recipe.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
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
    const std::string key = kv.first.as<std::string>();
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

}  // namespace

absl::Status Recipe::Validate() const {
  const std::string src = "recipe";
  if (method.empty()) return KeyError(src, "method", "is required (rtn or gptq)");
  if (method != "rtn" && method != "gptq") {
    return KeyError(src, "method", absl::StrCat("must be rtn or gptq, got \"", method, "\""));
  }
  if (weights.bits == 0) return KeyError(src, "weights.bits", "is required (2..8)");
  if (weights.bits < 2 || weights.bits > 8) {
    return KeyError(src, "weights.bits", absl::StrCat("must be in 2..8, got ", weights.bits));
  }
  if (weights.group_size == 0 || weights.group_size < -1) {
    return KeyError(src, "weights.group_size",
                    absl::StrCat("must be -1 or a positive integer, got ", weights.group_size));
  }
  if (weights.grid != "uniform" && weights.grid != "cuberoot") {
    return KeyError(src, "weights.grid",
                    absl::StrCat("must be uniform or cuberoot, got \"", weights.grid, "\""));
  }
  if (!(gptq.damp >= 0 && gptq.damp <= 1)) {
    return KeyError(src, "gptq.damp", absl::StrCat("must be in [0, 1], got ", gptq.damp));
  }
  if (gptq.block_size < 1 || gptq.block_size > 4096) {
    return KeyError(src, "gptq.block_size",
                    absl::StrCat("must be in 1..4096, got ", gptq.block_size));
  }
  const int ab = activations.bits;
  if (ab != 16 && (ab < 4 || ab > 8)) {
    return KeyError(src, "activations.bits", absl::StrCat("must be 16 (off) or 4..8, got ", ab));
  }
  if (smoothing.method != "none" && smoothing.method != "smoothquant" &&
      smoothing.method != "aser") {
    return KeyError(
        src, "smoothing.method",
        absl::StrCat("must be none, smoothquant or aser, got \"", smoothing.method, "\""));
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
  if (smoothing.method == "aser" && !er.enabled) {
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
    if (er.whitening != "cholesky" && er.whitening != "diagonal" && er.whitening != "none") {
      return KeyError(
          src, "error_reconstruction.whitening",
          absl::StrCat("must be cholesky, diagonal or none, got \"", er.whitening, "\""));
    }
    if (smoothing.method == "aser" && er.rank != kRecipeAutoRank &&
        smoothing.outlier_channels > er.rank) {
      return KeyError(src, "smoothing.outlier_channels",
                      absl::StrCat("must not exceed error_reconstruction.rank (", er.rank,
                                   "), got ", smoothing.outlier_channels));
    }
  }
  return absl::OkStatus();
}

nlohmann::json Recipe::ToCanonicalJson() const {
  nlohmann::json j;  // nlohmann::json objects keep keys sorted
  j["method"] = method;
  j["weights"] = {{"bits", weights.bits},
                  {"group_size", weights.group_size},
                  {"symmetric", weights.symmetric},
                  {"grid", weights.grid}};
  j["gptq"] = {{"damp", gptq.damp},
               {"block_size", gptq.block_size},
               {"act_order", gptq.act_order},
               {"true_sequential", gptq.true_sequential}};
  j["activations"] = {{"bits", activations.bits}};
  j["smoothing"] = {{"method", smoothing.method},
                    {"alpha", smoothing.alpha},
                    {"outlier_channels", smoothing.outlier_channels}};
  if (error_reconstruction.enabled) {
    const ErrorReconstructionRecipe& er = error_reconstruction;
    j["error_reconstruction"] = {
        {"rank", er.rank == kRecipeAutoRank ? nlohmann::json("auto") : nlohmann::json(er.rank)},
        {"energy", er.energy},
        {"max_extra_params", er.max_extra_params},
        {"whitening", er.whitening}};
  } else {
    j["error_reconstruction"] = nullptr;
  }
  return j;
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
  QCAL_RETURN_IF_ERROR(
      CheckKeys(root, source, "",
                {"method", "weights", "gptq", "activations", "smoothing", "error_reconstruction"}));
  Recipe r;
  QCAL_RETURN_IF_ERROR(Read(root, "method", source, "", &r.method));
  if (root["weights"]) {
    const YAML::Node w = root["weights"];
    QCAL_RETURN_IF_ERROR(
        CheckKeys(w, source, "weights", {"bits", "group_size", "symmetric", "grid"}));
    QCAL_RETURN_IF_ERROR(Read(w, "bits", source, "weights", &r.weights.bits));
    QCAL_RETURN_IF_ERROR(Read(w, "group_size", source, "weights", &r.weights.group_size));
    QCAL_RETURN_IF_ERROR(Read(w, "symmetric", source, "weights", &r.weights.symmetric));
    QCAL_RETURN_IF_ERROR(Read(w, "grid", source, "weights", &r.weights.grid));
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
    QCAL_RETURN_IF_ERROR(Read(m, "method", source, "smoothing", &r.smoothing.method));
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
    QCAL_RETURN_IF_ERROR(Read(e, "whitening", source, "error_reconstruction", &er.whitening));
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
