// The quality expectation of issue 14 (acceptance 2), measured on stories260k through `qcal
// quantize` with the settings of the docs/QUALITY.md ABQ table (tools/quality/abq_quality.sh): at
// 2 bits (group 32) GPTQ on the balanced grid (W2*, five levels) gives a lower perplexity than on
// the plain 2-bit grid.
#include <string>

#include "gtest/gtest.h"
#include "tests/engine/pipeline/stories_quality.h"

namespace qcal {
namespace {

using AbqQualityTest = testing::StoriesQualityTest;

TEST_F(AbqQualityTest, BalancedGridBeatsTwoBitsWithGptq) {
  const double w2 = Perplexity("method: gptq\nweights: {bits: 2, group_size: 32}\n");
  const double w2_star =
      Perplexity("method: gptq\nweights: {bits: 2, group_size: 32, grid: balanced}\n");
  ASSERT_GT(w2, 0);
  ASSERT_GT(w2_star, 0);
  EXPECT_LT(w2_star, w2);
}

}  // namespace
}  // namespace qcal
