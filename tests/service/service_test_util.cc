#include "tests/service/service_test_util.h"

#include <filesystem>

#include "gtest/gtest.h"
#include "services/common/job_spec.h"
#include "services/engine/recipe.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace fs = std::filesystem;

ServiceTree MakeServiceTree(const std::string& prefix) {
  static const std::string* model = [] {
    const std::string dir = MakeTempDir("qcal-synth-tiny");
    engine::SynthOptions o;
    o.out_dir = dir + "/tiny";
    absl::StatusOr<engine::SynthResult> r = engine::WriteSyntheticCheckpoint(o);
    EXPECT_TRUE(r.ok()) << r.status();
    return new std::string(o.out_dir);
  }();
  ServiceTree t;
  t.root = MakeTempDir(prefix);
  t.input = t.root + "/input";
  t.output = t.root + "/output";
  t.data = t.root + "/data";
  fs::create_directories(t.input);
  fs::create_directories(t.output);
  fs::copy(*model, t.input + "/tiny", fs::copy_options::recursive);
  return t;
}

v1::JobSpec TinySpec(const std::string& output_name) {
  v1::JobSpec spec;
  spec.set_model("tiny");
  spec.set_calib("tiny/calib.txt");
  spec.set_samples(16);
  spec.set_seq_len(32);
  spec.set_seed(1);
  engine::Recipe recipe;
  recipe.method = engine::QuantMethod::kGptq;
  recipe.weights.bits = 4;
  *spec.mutable_recipe() = service::RecipeToProto(recipe);
  spec.set_output_name(output_name);
  return spec;
}

}  // namespace qcal::testing
