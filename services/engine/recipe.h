// The quantization recipe (DESIGN section 6): what a job computes, parsed from YAML or built from
// the gRPC JobSpec, with every default filled in.
//
// Unknown keys and out-of-range values are errors naming the key. `method` and `weights.bits` have
// no default. The canonical form (sorted-key JSON with defaults filled in) is what recipe_sha256
// hashes, so two recipes that mean the same thing hash the same.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace qcal::engine {

struct WeightsRecipe {
  int bits = 0;                  // required: 2..8
  int group_size = 128;          // -1: one group per row; >= d_in same as -1. Default: 128.
  bool symmetric = false;        // Default: false (asymmetric).
  std::string grid = "uniform";  // uniform | cuberoot. Default: uniform.
};

struct GptqRecipe {
  double damp = 0.01;           // λ in H += λ·mean(diag H)·I; 0 <= damp <= 1. Default: 0.01.
  int block_size = 128;         // lazy-batch width, 1..4096. Default: 128.
  bool act_order = false;       // Default: false.
  bool true_sequential = true;  // Default: true.
};

struct Recipe {
  std::string method;  // required: rtn | gptq
  WeightsRecipe weights;
  GptqRecipe gptq;

  absl::Status Validate() const;
  // Sorted-key JSON with every default filled in.
  nlohmann::json ToCanonicalJson() const;
  // sha256 of ToCanonicalJson().dump().
  std::string Sha256() const;
};

// Parses recipe YAML text; `source` names the file in error messages.
absl::StatusOr<Recipe> ParseRecipeYaml(const std::string& text, const std::string& source);
absl::StatusOr<Recipe> LoadRecipeFile(const std::string& path);

}  // namespace qcal::engine
