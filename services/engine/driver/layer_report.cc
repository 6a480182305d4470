// A linear's report as JSON and back (driver/results.h): the layer entries of qcal_report.json,
// and the report half of a committed artifact and of the gang's kLayer payload.
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "services/engine/driver/results.h"

namespace qcal::engine {

nlohmann::ordered_json LayerReportJson(const LayerReport& r) {
  nlohmann::ordered_json j;
  j["name"] = r.name;
  j["block"] = r.block;
  if (r.expert != kNoExpert) {
    j["expert"] = r.expert == kSharedExpert ? nlohmann::ordered_json("shared")
                                            : nlohmann::ordered_json(r.expert);
    if (r.expert >= 0) {
      j["routed_tokens"] = r.routed_tokens;
      j["fallback"] = r.fallback;
    }
  }
  j["d_out"] = r.d_out;
  j["d_in"] = r.d_in;
  j["rel_error"] = r.rel_error;
  j["rel_error_rtn"] = r.rel_error_rtn;
  j["dead_columns"] = r.dead_columns;
  j["damp"] = r.damp_used;
  if (r.outlier_columns > 0) j["outlier_columns"] = r.outlier_columns;
  if (r.rank > 0) j["rank"] = r.rank;
  if (r.reconstructed) {
    j["rel_error_er"] = r.rel_error_er;
    j["whitened_error_before"] = r.whitened_error_before;
    j["whitened_error_after"] = r.whitened_error_after;
  }
  if (r.rank > 0) j["extra_params"] = r.extra_params;
  if (r.retrained) j["rel_error_retrained"] = r.rel_error_retrained;
  if (r.block_retrain) {
    const BlockRetrainReport& t = *r.block_retrain;
    nlohmann::ordered_json epochs = nlohmann::ordered_json::array();
    for (const BlockRetrainReport::Epoch& e : t.epochs) {
      epochs.push_back({{"stage", e.stage},
                        {"epoch", e.epoch},
                        {"loss", e.loss},
                        {"output_mse", e.output_mse},
                        {"regularizer", e.regularizer}});
    }
    j["block_retrain"] = {{"epochs", epochs},
                          {"output_mse_before", t.output_mse_before},
                          {"output_mse_after", t.output_mse_after}};
  }
  return j;
}

absl::StatusOr<LayerReport> LayerReportFromJson(const nlohmann::json& j) {
  LayerReport r;
  try {
    r.name = j.at("name").get<std::string>();
    r.block = j.at("block").get<int>();
    r.d_out = j.at("d_out").get<int64_t>();
    r.d_in = j.at("d_in").get<int64_t>();
    r.rel_error = j.at("rel_error").get<double>();
    r.rel_error_rtn = j.at("rel_error_rtn").get<double>();
    r.dead_columns = j.at("dead_columns").get<int>();
    r.damp_used = j.at("damp").get<double>();
    r.outlier_columns = j.value("outlier_columns", 0);
    if (j.contains("rank")) {
      r.rank = j.at("rank").get<int64_t>();
      r.extra_params = j.at("extra_params").get<double>();
    }
    r.reconstructed = j.contains("rel_error_er");
    if (r.reconstructed) {
      r.rel_error_er = j.at("rel_error_er").get<double>();
      r.whitened_error_before = j.at("whitened_error_before").get<double>();
      r.whitened_error_after = j.at("whitened_error_after").get<double>();
    }
    r.retrained = j.contains("rel_error_retrained");
    if (r.retrained) r.rel_error_retrained = j.at("rel_error_retrained").get<double>();
    if (j.contains("block_retrain")) {
      const nlohmann::json& t = j.at("block_retrain");
      BlockRetrainReport b;
      for (const nlohmann::json& e : t.at("epochs")) {
        b.epochs.push_back({e.at("stage").get<std::string>(), e.at("epoch").get<int>(),
                            e.at("loss").get<double>(), e.at("output_mse").get<double>(),
                            e.at("regularizer").get<double>()});
      }
      b.output_mse_before = t.at("output_mse_before").get<double>();
      b.output_mse_after = t.at("output_mse_after").get<double>();
      r.block_retrain = std::move(b);
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(absl::StrCat("malformed layer report: ", e.what()));
  }
  try {
    if (j.contains("expert")) {
      const nlohmann::json& e = j.at("expert");
      r.expert = e.is_string() && e.get<std::string>() == "shared" ? kSharedExpert : e.get<int>();
      r.routed_tokens = j.value("routed_tokens", int64_t{0});
      r.fallback = j.value("fallback", false);
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(absl::StrCat("malformed layer report: ", e.what()));
  }
  for (LinearKind k : kAllLinears) {
    if (LinearPrefix(r.block, k) == r.name) r.kind = k;
  }
  if (r.expert != kNoExpert) {
    // An expert's name ends in its kind: Mixtral's w1 (gate), w3 (up), w2 (down), else the dense
    // projection names.
    const std::string tail = r.name.substr(r.name.rfind('.') + 1);
    const std::pair<const char*, LinearKind> tails[] = {
        {"w1", LinearKind::kGate},    {"w3", LinearKind::kUp},
        {"w2", LinearKind::kDown},    {"gate_proj", LinearKind::kGate},
        {"up_proj", LinearKind::kUp}, {"down_proj", LinearKind::kDown}};
    for (const auto& [name, k] : tails) {
      if (tail == name) r.kind = k;
    }
  }
  return r;
}

}  // namespace qcal::engine
