// The phases of driver::BlockRunner called one by one, as separate processes would call them:
// every solved linear travels as its serialized artifact (weight undefined: Install dequantizes
// it) before it is installed. The results, the installed weights and the pushed activations must
// be bit-identical to QuantizeBlock's, with and without true_sequential and with smoothing.
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/model.h"
#include "services/engine/quantize.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

std::string ModelDir() { return testing::SharedDir() + "/models/stories260k"; }

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// A solved linear as another process receives it: its artifact (once converted) and its report.
SolvedLinear Transported(SolvedLinear& s) {
  if (s.conversion.valid()) {
    auto converted = s.conversion.get();
    EXPECT_TRUE(converted.ok()) << converted.status();
    if (converted.ok()) s.result.quantized = *std::move(converted);
  }
  auto parsed = ParseLayerArtifact(SerializeLayerArtifact(s.result));
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  SolvedLinear out;
  out.result = *std::move(parsed);
  out.result.report = s.result.report;
  return out;
}

std::vector<SolvedLinear> TransportedAll(std::vector<SolvedLinear> solved) {
  std::vector<SolvedLinear> out;
  for (SolvedLinear& s : solved) out.push_back(Transported(s));
  return out;
}

// One block through the phases, each solve's results transported before Install.
absl::StatusOr<std::vector<LayerResult>> RunPhases(Model& model, CalibActivations& acts,
                                                   const Recipe& recipe) {
  StageTimes times;
  BlockRunner runner(model, acts, recipe, times);
  QCAL_RETURN_IF_ERROR(runner.Begin());
  if (recipe.smoothing.enabled()) {
    QCAL_ASSIGN_OR_RETURN(SmoothingPartials partials, runner.CollectSmoothingPartials());
    QCAL_ASSIGN_OR_RETURN(const SmoothingStatistics stats,
                          runner.CompleteSmoothing(std::move(partials)));
    QCAL_ASSIGN_OR_RETURN(BlockSmoothing smoothing, runner.SolveSmoothing(stats));
    QCAL_RETURN_IF_ERROR(runner.InstallSmoothing(std::move(smoothing)));
  }
  if (recipe.gptq.true_sequential) {
    for (LinearInput group :
         {LinearInput::kQkv, LinearInput::kO, LinearInput::kGateUp, LinearInput::kDown}) {
      QCAL_ASSIGN_OR_RETURN(InputPartials partials, runner.CollectPartials(group));
      QCAL_ASSIGN_OR_RETURN(const InputStatistics stats,
                            runner.Complete(group, std::move(partials)));
      QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved,
                            runner.Solve(stats, ConsumersOf(group)));
      EXPECT_EQ(solved.size(), ConsumersOf(group).size());
      QCAL_RETURN_IF_ERROR(runner.Install(TransportedAll(std::move(solved))));
      QCAL_RETURN_IF_ERROR(runner.Push(group));
    }
  } else {
    QCAL_ASSIGN_OR_RETURN(auto all, runner.CollectFullPrecisionPartials());
    for (LinearInput group : kAllLinearInputs) {
      QCAL_ASSIGN_OR_RETURN(const InputStatistics stats,
                            runner.Complete(group, std::move(all[static_cast<int>(group)])));
      QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved,
                            runner.Solve(stats, ConsumersOf(group)));
      QCAL_RETURN_IF_ERROR(runner.Install(TransportedAll(std::move(solved))));
    }
    QCAL_RETURN_IF_ERROR(runner.PushBlock());
  }
  return runner.Finish();
}

Recipe AserRecipe() {
  Recipe r;
  r.method = QuantMethod::kGptq;
  r.weights.bits = 4;
  r.weights.group_size = -1;
  r.activations.bits = 8;
  r.smoothing.method = SmoothingMethod::kAser;
  r.smoothing.outlier_channels = 8;
  r.error_reconstruction.enabled = true;
  r.error_reconstruction.rank = 16;
  return r;
}

Recipe DiagonalTwoPassRecipe() {
  Recipe r;
  r.method = QuantMethod::kGptq;
  r.weights.bits = 3;
  r.weights.group_size = 32;
  r.gptq.true_sequential = false;
  r.gptq.act_order = true;
  r.error_reconstruction.enabled = true;
  r.error_reconstruction.rank = kRecipeAutoRank;
  r.error_reconstruction.whitening = Whitening::kDiagonal;
  return r;
}

class BlockPhasesTest : public ::testing::TestWithParam<Recipe> {};

TEST_P(BlockPhasesTest, PhasesWithTransportedResultsMatchQuantizeBlock) {
  QCAL_REQUIRE_SHARED();
  const Recipe& recipe = GetParam();
  kernels::BackendOptions bo;
  bo.threads = 2;
  auto be = kernels::CreateBackend(bo);
  ASSERT_TRUE(be.ok()) << be.status();
  auto tok = Tokenizer::Load(ModelDir());
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto text = LoadCorpusText(testing::SharedDir() + "/data/tinystories-calib.txt");
  ASSERT_TRUE(text.ok()) << text.status();
  auto tokens = (*tok)->Encode(*text);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  // 12 samples: a full chunk of 8 and a short one of 4.
  auto samples = SampleCalibration(*tokens, 12, 64, 0, 1, "calib");
  ASSERT_TRUE(samples.ok()) << samples.status();

  auto whole = Model::Load(ModelDir(), be->get());
  auto phased = Model::Load(ModelDir(), be->get());
  ASSERT_TRUE(whole.ok() && phased.ok());
  auto acts_whole = EmbedCalibration(**whole, *samples);
  auto acts_phased = EmbedCalibration(**phased, *samples);
  ASSERT_TRUE(acts_whole.ok() && acts_phased.ok());
  for (int b = 0; b < 2; ++b) {
    SCOPED_TRACE(b);
    auto expected = QuantizeBlock(**whole, *acts_whole, recipe);
    ASSERT_TRUE(expected.ok()) << expected.status();
    auto got = RunPhases(**phased, *acts_phased, recipe);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), expected->size());
    for (size_t i = 0; i < got->size(); ++i) {
      const LayerResult& g = (*got)[i];
      const LayerResult& e = (*expected)[i];
      EXPECT_EQ(g.report.name, e.report.name);
      EXPECT_EQ(SerializeLayerArtifact(g), SerializeLayerArtifact(e)) << e.report.name;
      EXPECT_EQ(g.report.rel_error, e.report.rel_error) << e.report.name;
      EXPECT_EQ(g.report.rel_error_er, e.report.rel_error_er) << e.report.name;
      const Linear& lg = (*phased)->block(b).at(g.report.kind);
      const Linear& le = (*whole)->block(b).at(e.report.kind);
      EXPECT_TRUE(SameBytes(lg.weight, le.weight)) << e.report.name;
    }
    EXPECT_EQ(acts_phased->next_block, b + 1);
    ASSERT_EQ(acts_phased->chunks.size(), 2u);
    for (size_t c = 0; c < acts_phased->chunks.size(); ++c) {
      EXPECT_TRUE(SameBytes(acts_phased->chunks[c], acts_whole->chunks[c])) << "chunk " << c;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Recipes, BlockPhasesTest,
                         ::testing::Values(AserRecipe(), DiagonalTwoPassRecipe()));

}  // namespace
}  // namespace qcal::engine
