// RunGradientPass (DESIGN section 2, step 4): the statistics are bit-identical however the chunks
// are split among ranks (each rank's cover completed by the canonical reduction), whatever the
// boundary spacing k, and for a streaming model as for a resident one; the sink sees the blocks
// last to first; a sample's statistics do not depend on the other samples of its chunk.
#include "services/engine/oac/gradient_pass.h"

#include <filesystem>
#include <map>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/engine/oac/oac_test_util.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;
using ::qcal::testing::OacConfig;
using ::qcal::testing::OacRandomModel;
using ::qcal::testing::OacVariant;
using ::qcal::testing::TestRng;
using ::qcal::testing::Values;

// Chunks of random ids: batches[c] samples of seq_len tokens each.
GradientChunks MakeChunks(int vocab, int seq_len, const std::vector<int>& batches, uint64_t seed) {
  TestRng rng(seed);
  GradientChunks chunks;
  chunks.seq_len = seq_len;
  chunks.total_chunks = static_cast<int>(batches.size());
  for (int b : batches) {
    std::vector<int32_t> ids(int64_t{b} * seq_len);
    for (int32_t& id : ids) id = static_cast<int32_t>(rng.Uniform() * vocab);
    chunks.ids.push_back(std::move(ids));
    chunks.chunk_batch.push_back(b);
  }
  return chunks;
}

// Chunks [begin, end) of `all`, as a rank holding them sees them.
GradientChunks Range(const GradientChunks& all, int begin, int end) {
  GradientChunks r;
  r.seq_len = all.seq_len;
  r.total_chunks = all.total_chunks;
  r.first_chunk = begin;
  r.ids.assign(all.ids.begin() + begin, all.ids.begin() + end);
  r.chunk_batch.assign(all.chunk_batch.begin() + begin, all.chunk_batch.begin() + end);
  return r;
}

// Every linear's complete statistics as host values, by (block, linear).
struct Statistics {
  std::map<std::pair<int, int>, std::vector<float>> hessian, fisher;
  std::vector<int> sink_order;  // of the first rank
  double loss = 0;
  int64_t tokens = 0;
};

// Runs the pass once per rank over `splits` (chunk boundaries, e.g. {0, 2, 5}) and completes
// every linear's tree from the ranks' covers.
Statistics RunRanks(Model& model, const GradientChunks& all, const std::vector<int>& splits,
                    const GradientPassOptions& options) {
  kernels::Backend& be = model.backend();
  std::map<std::pair<int, int>, TreePartials<LinearOac>> covers;
  Statistics out;
  for (size_t r = 0; r + 1 < splits.size(); ++r) {
    auto stats = RunGradientPass(model, Range(all, splits[r], splits[r + 1]), options,
                                 [&](int block, BlockOacPartials partials) -> absl::Status {
                                   if (r == 0) out.sink_order.push_back(block);
                                   for (int l = 0; l < kNumLinears; ++l) {
                                     for (TreePartial<LinearOac>& p : partials[l]) {
                                       covers[{block, l}].push_back(std::move(p));
                                     }
                                   }
                                   return absl::OkStatus();
                                 });
    QCAL_CHECK(stats.ok());
    out.loss += stats->loss;
    out.tokens += stats->tokens;
  }
  for (auto& [key, partials] : covers) {
    auto root = CompleteTree(std::move(partials), all.total_chunks, LinearOacCombine(be));
    QCAL_CHECK(root.ok());
    out.hessian[key] = Values(root->hessian);
    if (root->fisher.defined()) out.fisher[key] = Values(root->fisher);
  }
  return out;
}

void ExpectSameBits(const Statistics& a, const Statistics& b, const std::string& what) {
  ASSERT_EQ(a.hessian.size(), b.hessian.size()) << what;
  for (const auto& [key, values] : a.hessian) {
    EXPECT_EQ(values, b.hessian.at(key))
        << what << ": block " << key.first << " " << LinearName(LinearKind(key.second));
  }
  ASSERT_EQ(a.fisher.size(), b.fisher.size()) << what;
  for (const auto& [key, values] : a.fisher) EXPECT_EQ(values, b.fisher.at(key)) << what;
}

class GradientPassTest : public ::testing::TestWithParam<HessianKind> {
 protected:
  void SetUp() override {
    be_ = testing::OacCpuBackend();
    model_ = OacRandomModel(OacConfig(OacVariant::kLlama, 5), be_.get(), 31);
    chunks_ = MakeChunks(model_->config().vocab_size, 6, {2, 1, 2, 1, 1}, 4);
    options_.kind = GetParam();
    options_.fisher = true;
    options_.boundary_every = 1;
  }
  std::unique_ptr<kernels::Backend> be_;
  std::unique_ptr<Model> model_;
  GradientChunks chunks_;
  GradientPassOptions options_;
};

TEST_P(GradientPassTest, RanksAndBoundarySpacingGiveTheSameBits) {
  const Statistics one = RunRanks(*model_, chunks_, {0, 5}, options_);
  EXPECT_EQ(one.sink_order, (std::vector<int>{4, 3, 2, 1, 0}));
  EXPECT_EQ(one.hessian.size(), 5u * kNumLinears);
  EXPECT_EQ(one.tokens, 7 * 5);
  EXPECT_GT(one.loss, 0);
  ExpectSameBits(one, RunRanks(*model_, chunks_, {0, 2, 5}, options_), "2 ranks");
  ExpectSameBits(one, RunRanks(*model_, chunks_, {0, 1, 3, 5}, options_), "3 ranks");
  const Statistics with_empty = RunRanks(*model_, chunks_, {0, 0, 4, 5}, options_);
  ExpectSameBits(one, with_empty, "3 ranks, the first without chunks");
  EXPECT_EQ(with_empty.sink_order, one.sink_order);
  const Statistics three = RunRanks(*model_, chunks_, {0, 1, 3, 5}, options_);
  EXPECT_NEAR(three.loss, one.loss, 1e-9 * one.loss);
  for (int k : {2, 3, 5}) {
    GradientPassOptions o = options_;
    o.boundary_every = k;
    ExpectSameBits(one, RunRanks(*model_, chunks_, {0, 5}, o), absl::StrCat("k ", k));
  }
  // Two runs: the same bits.
  ExpectSameBits(one, RunRanks(*model_, chunks_, {0, 5}, options_), "second run");
}

TEST_P(GradientPassTest, SamplesAreIndependentOfTheirChunk) {
  // The same three samples as one chunk of 3 and as chunks of 1 and 2: equal to rounding (the
  // sums are grouped differently).
  GradientChunks together = MakeChunks(model_->config().vocab_size, 6, {3}, 8);
  GradientChunks apart;
  apart.seq_len = 6;
  apart.total_chunks = 2;
  apart.ids = {std::vector<int32_t>(together.ids[0].begin(), together.ids[0].begin() + 6),
               std::vector<int32_t>(together.ids[0].begin() + 6, together.ids[0].end())};
  apart.chunk_batch = {1, 2};
  const Statistics a = RunRanks(*model_, together, {0, 1}, options_);
  const Statistics b = RunRanks(*model_, apart, {0, 2}, options_);
  for (const auto& [key, values] : a.hessian) {
    const std::vector<float>& other = b.hessian.at(key);
    double num = 0, den = 0;
    for (size_t i = 0; i < values.size(); ++i) {
      num += double(values[i] - other[i]) * (values[i] - other[i]);
      den += double(values[i]) * values[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-5) << key.first << " " << key.second;
  }
  // Sample-wise: trace(H_oac) = Σ_n ‖G_n‖²_F = Σ F.
  if (GetParam() == HessianKind::kOutputAdaptive) {
    for (const auto& [key, h] : a.hessian) {
      const std::vector<float>& f = a.fisher.at(key);
      const int64_t n = static_cast<int64_t>(std::sqrt(double(h.size())));
      double trace = 0, total = 0;
      for (int64_t i = 0; i < n; ++i) trace += h[i * n + i];
      for (float v : f) total += v;
      EXPECT_NEAR(trace, total, 1e-5 * total) << key.first << " " << key.second;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, GradientPassTest,
                         ::testing::Values(HessianKind::kOutputAdaptive,
                                           HessianKind::kOutputAdaptiveToken),
                         [](const ::testing::TestParamInfo<HessianKind>& info) {
                           return info.param == HessianKind::kOutputAdaptive ? "SampleWise"
                                                                             : "PerToken";
                         });

TEST(GradientPassStreamingTest, StreamingModelGivesTheResidentModelsBits) {
  const std::string dir = testing::MakeTempDir("oac_streaming");
  SynthOptions so;
  so.out_dir = dir + "/model";
  so.layers = 3;
  so.sha256 = false;
  so.threads = 2;
  ASSERT_TRUE(WriteSyntheticCheckpoint(so).ok());
  auto be = testing::OacCpuBackend();
  ModelLoadOptions resident_options, streaming_options;
  streaming_options.residency = BlockResidency::kStreaming;
  auto resident = Model::Load(so.out_dir, be.get(), resident_options);
  auto streaming = Model::Load(so.out_dir, be.get(), streaming_options);
  ASSERT_TRUE(resident.ok() && streaming.ok());
  ASSERT_TRUE((*streaming)->streaming());
  const GradientChunks chunks = MakeChunks(512, 12, {2, 1, 1}, 6);
  GradientPassOptions options;
  options.boundary_every = 1;
  const Statistics want = RunRanks(**resident, chunks, {0, 3}, options);
  for (int k : {1, 2}) {
    options.boundary_every = k;
    const Statistics got = RunRanks(**streaming, chunks, {0, 1, 3}, options);
    ExpectSameBits(want, got, absl::StrCat("streaming, k ", k));
    EXPECT_EQ(got.sink_order, (std::vector<int>{2, 1, 0}));
    for (int b = 0; b < 3; ++b) EXPECT_FALSE((*streaming)->resident(b)) << "block " << b;
  }
  fs::remove_all(dir);
}

TEST(GradientPassErrorsTest, BadInputAndSinkErrors) {
  auto be = testing::OacCpuBackend();
  auto model = OacRandomModel(OacConfig(OacVariant::kLlama, 2), be.get(), 3);
  const GradientChunks chunks = MakeChunks(37, 5, {1, 2}, 1);
  auto ok_sink = [](int, BlockOacPartials) { return absl::OkStatus(); };
  GradientPassOptions layer;
  layer.kind = HessianKind::kLayer;
  EXPECT_EQ(RunGradientPass(*model, chunks, layer, ok_sink).status().code(),
            absl::StatusCode::kInvalidArgument);
  GradientChunks short_ids = chunks;
  short_ids.ids[1].pop_back();
  EXPECT_THAT(RunGradientPass(*model, short_ids, {}, ok_sink).status().message(),
              ::testing::HasSubstr("chunk 1 has 9 ids for 2 samples of 5 tokens"));
  GradientChunks past = chunks;
  past.first_chunk = 1;
  EXPECT_EQ(RunGradientPass(*model, past, {}, ok_sink).status().code(),
            absl::StatusCode::kInvalidArgument);
  int calls = 0;
  auto failing = [&](int block, BlockOacPartials) {
    ++calls;
    return absl::DataLossError(absl::StrCat("disk full at block ", block));
  };
  EXPECT_THAT(RunGradientPass(*model, chunks, {}, failing).status().message(),
              ::testing::HasSubstr("disk full at block 1"));
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace qcal::engine
