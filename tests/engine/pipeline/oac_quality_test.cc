// The quality expectation of issue 12 (acceptance 3), measured on stories260k through `qcal
// quantize` with the settings of the docs/QUALITY.md OAC table (tools/quality/oac_quality.sh): at
// 2 bits (group 32) the sample-wise output-adaptive Hessian gives a lower perplexity than GPTQ's
// layer Hessian.
#include <string>

#include "gtest/gtest.h"
#include "tests/engine/pipeline/stories_quality.h"

namespace qcal {
namespace {

using OacQualityTest = testing::StoriesQualityTest;

constexpr char kW2[] = "method: gptq\nweights: {bits: 2, group_size: 32}\n";

TEST_F(OacQualityTest, SampleWiseOacBeatsGptqAtTwoBits) {
  const double gptq = Perplexity(kW2);
  const double oac = Perplexity(std::string(kW2) + "hessian: output_adaptive\n");
  ASSERT_GT(gptq, 0);
  ASSERT_GT(oac, 0);
  EXPECT_LT(oac, gptq);
}

}  // namespace
}  // namespace qcal
