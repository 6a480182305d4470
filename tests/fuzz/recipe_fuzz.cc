// Fuzzes the recipe YAML parser (services/engine/recipe.h, DESIGN section 6) and the recipe's
// trip through the API: a recipe that parses must survive RecipeToProto -> RecipeFromProto with
// the same canonical form and sha256.
//
// Input: the recipe's YAML text.
#include <cstdint>
#include <string>

#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/engine/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<qcal::engine::Recipe> recipe = qcal::engine::ParseRecipeYaml(text, "fuzz.yaml");
  if (!recipe.ok()) {
    QCAL_CHECK(!recipe.status().message().empty());
    return 0;
  }
  const std::string canonical = recipe->ToCanonicalJson().dump();
  (void)qcal::engine::SpecOf(*recipe);
  absl::StatusOr<qcal::engine::Recipe> again =
      qcal::service::RecipeFromProto(qcal::service::RecipeToProto(*recipe));
  QCAL_CHECK(again.ok());
  QCAL_CHECK(again->ToCanonicalJson().dump() == canonical);
  QCAL_CHECK(again->Sha256() == recipe->Sha256());
  return 0;
}
