// Activation statistics and smoothing (DESIGN.md section 3, "Smoothing"): the statistics skip BOS
// and merge deterministically; the scales match hand-computed values (SmoothQuant, ASER, GQA
// tying); folded smoothing leaves full-precision blocks and stories260k's logits unchanged.
#include "services/engine/aser/smoothing.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/engine/aser/activation_stats.h"
#include "tests/engine/aser/aser_test_util.h"

namespace qcal::engine {
namespace {

using qcal::testing::CapturedInputs;
using qcal::testing::CpuBackend;
using qcal::testing::ForwardCapturing;
using qcal::testing::RandomModel;
using qcal::testing::RandomTensor;
using qcal::testing::RelativeError;
using qcal::testing::TestRng;

SmoothingOptions SmoothQuant() { return SmoothingOptions{SmoothingMethod::kSmoothQuant, 0.5, 0}; }
SmoothingOptions Aser(int f) { return SmoothingOptions{SmoothingMethod::kAser, 0.5, f}; }

// ---- Statistics ----

TEST(ActivationStatsTest, ExcludesBosAndAveragesTheRest) {
  // Two samples of three tokens; the BOS rows (0 and 3) hold the largest values.
  const std::vector<float> x = {100, -100,  //
                                1,   -2,    //
                                -3,  0.5f,  //
                                -50, 50,    //
                                2,   4,     //
                                0,   -1};
  ActivationStats stats(2);
  ASSERT_TRUE(stats.Accumulate(x.data(), 6, 2, 3).ok());
  EXPECT_EQ(stats.tokens(), 4);
  EXPECT_EQ(stats.skipped(), 2);
  EXPECT_EQ(stats.max_abs(), (std::vector<float>{3, 4}));
  EXPECT_EQ(stats.MeanAbs(), (std::vector<double>{6.0 / 4, 7.5 / 4}));
}

TEST(ActivationStatsTest, ChunkedAccumulationEqualsMergedPartialsBitForBit) {
  TestRng rng(3);
  const int64_t width = 19, seq_len = 7;
  std::vector<std::vector<float>> chunks(4);
  for (auto& c : chunks) {
    c.resize(static_cast<size_t>(3 * seq_len * width));
    for (float& v : c) v = float(rng.StudentT3());
  }
  ActivationStats one(width), owner(width);
  for (const auto& c : chunks) {
    ASSERT_TRUE(one.Accumulate(c.data(), 3 * seq_len, width, seq_len).ok());
    ActivationStats partial(width);  // a worker's chunk, merged at the owner in chunk order
    ASSERT_TRUE(partial.Accumulate(c.data(), 3 * seq_len, width, seq_len).ok());
    ASSERT_TRUE(owner.Merge(partial).ok());
  }
  EXPECT_EQ(one.tokens(), 4 * 3 * (seq_len - 1));
  EXPECT_EQ(one.max_abs(), owner.max_abs());
  EXPECT_EQ(std::memcmp(one.sum_abs().data(), owner.sum_abs().data(), width * sizeof(double)), 0);
}

// The CPU backend's ChannelAbsStats sums in Accumulate's order: its totals, added with AddTotals,
// give Accumulate's bits, so the statistics do not depend on which of the two paths took them.
TEST(ActivationStatsTest, CpuChannelAbsStatsTotalsEqualAccumulateBitForBit) {
  const std::unique_ptr<kernels::Backend> be = CpuBackend();
  TestRng rng(5);
  const int64_t width = 23, seq_len = 5;
  ActivationStats host(width), totals(width);
  for (int chunk = 0; chunk < 3; ++chunk) {
    std::vector<float> x(static_cast<size_t>(2 * seq_len * width));
    for (float& v : x) v = float(rng.StudentT3());
    ASSERT_TRUE(host.Accumulate(x.data(), 2 * seq_len, width, seq_len).ok());
    auto c = be->ChannelAbsStats(Tensor::FromVector(x, {2 * seq_len, width}), seq_len);
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_TRUE(totals.AddTotals(c->max_abs, c->sum_abs, c->tokens, c->skipped).ok());
  }
  EXPECT_EQ(host.tokens(), totals.tokens());
  EXPECT_EQ(host.skipped(), totals.skipped());
  EXPECT_EQ(host.max_abs(), totals.max_abs());
  EXPECT_EQ(std::memcmp(host.sum_abs().data(), totals.sum_abs().data(), width * sizeof(double)), 0);
}

TEST(ActivationStatsTest, RejectsBadChunks) {
  ActivationStats stats(2);
  const std::vector<float> x = {1, 2, 3, NAN};
  EXPECT_EQ(stats.Accumulate(x.data(), 2, 3, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(stats.Accumulate(x.data(), 2, 2, 3).code(), absl::StatusCode::kInvalidArgument);
  const absl::Status nan = stats.Accumulate(x.data(), 2, 2, 1);
  EXPECT_EQ(nan.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(nan.message().find("x[1, 1]"), std::string::npos) << nan;
  EXPECT_EQ(stats.tokens(), 0);
  EXPECT_EQ(stats.Merge(ActivationStats(3)).code(), absl::StatusCode::kInvalidArgument);
}

// ---- Scales ----

TEST(SmoothingScalesTest, SmoothQuantAndAserByHand) {
  // w = max over both consumers' rows = [2, 1, 1, 0 -> 1e-5]; a = [1, 100, 4, 0 -> 1e-5].
  const std::vector<Tensor> consumers = {Tensor::FromVector({1, 1, 1, 0}, {1, 4}),
                                         Tensor::FromVector({-2, 0.25f, 0.5f, 0}, {1, 4})};
  const std::vector<float> a = {1, 100, 4, 0};
  auto sq = ComputeSmoothingScales(a, consumers, SmoothQuant());
  ASSERT_TRUE(sq.ok()) << sq.status();
  EXPECT_FLOAT_EQ(sq->m[0], std::sqrt(0.5f));
  EXPECT_FLOAT_EQ(sq->m[1], 10.0f);
  EXPECT_FLOAT_EQ(sq->m[2], 2.0f);
  EXPECT_FLOAT_EQ(sq->m[3], 1.0f);
  EXPECT_TRUE(sq->outliers.empty());
  EXPECT_TRUE(sq->v_rows.empty());

  // α = 1 moves everything into the weights: m = a.
  auto full = ComputeSmoothingScales(a, consumers, {SmoothingMethod::kSmoothQuant, 1.0, 0});
  ASSERT_TRUE(full.ok());
  EXPECT_FLOAT_EQ(full->m[1], 100.0f);

  // a·w = [2, 100, 4, 1e-10]: ASER f = 1 takes channel 1, f = 2 channels 1 and 2.
  auto aser1 = ComputeSmoothingScales(a, consumers, Aser(1));
  ASSERT_TRUE(aser1.ok());
  EXPECT_EQ(aser1->outliers, (std::vector<int32_t>{1}));
  EXPECT_EQ(aser1->m, (std::vector<float>{1, 10, 1, 1}));
  auto aser2 = ComputeSmoothingScales(a, consumers, Aser(2));
  ASSERT_TRUE(aser2.ok());
  EXPECT_EQ(aser2->outliers, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(aser2->m, (std::vector<float>{1, 10, 2, 1}));
  // f = 0 smooths nothing.
  auto aser0 = ComputeSmoothingScales(a, consumers, Aser(0));
  ASSERT_TRUE(aser0.ok());
  EXPECT_EQ(aser0->m, (std::vector<float>{1, 1, 1, 1}));
  EXPECT_TRUE(aser0->outliers.empty());
}

TEST(SmoothingScalesTest, AserTiesTakeTheLowerChannel) {
  const std::vector<Tensor> w = {Tensor::FromVector({1, 1, 1}, {1, 3})};
  auto s = ComputeSmoothingScales({1, 4, 4}, w, Aser(1));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->outliers, (std::vector<int32_t>{1}));
}

TEST(SmoothingScalesTest, OProjTiesScalesAcrossQueryHeadsOfAKvGroup) {
  // 4 heads over 2 KV heads (n_rep 2), head_dim 2: o channel c = 2h + i reads v row 2(h/2) + i, so
  // channels {0, 2} -> v row 0, {1, 3} -> 1, {4, 6} -> 2, {5, 7} -> 3.
  const std::vector<float> a = {4, 1, 9, 1, 1, 16, 1, 1};
  const Tensor o = Tensor::FromVector({1, 1, 1, 4, 1, 1, 1, 1}, {1, 8});
  auto sq = ComputeOProjSmoothingScales(a, o, 4, 2, SmoothQuant());
  ASSERT_TRUE(sq.ok()) << sq.status();
  // Row 0: max a 9, max w 1 -> 3; row 1: max a 1, max w 4 -> 1/2; row 2: 1; row 3: 16, 1 -> 4.
  EXPECT_EQ(sq->v_rows, (std::vector<float>{3, 0.5f, 1, 4}));
  EXPECT_EQ(sq->m, (std::vector<float>{3, 0.5f, 3, 0.5f, 1, 4, 1, 4}));
  EXPECT_TRUE(sq->outliers.empty());

  // Scores per v row (max a·w over its channels): 9, 4, 1, 16. f = 2 or 3: ⌊f/2⌋ = 1 row (3),
  // extracted as both of its channels; f = 4: rows 3 and 0.
  for (int f : {2, 3}) {
    auto aser = ComputeOProjSmoothingScales(a, o, 4, 2, Aser(f));
    ASSERT_TRUE(aser.ok());
    EXPECT_EQ(aser->outliers, (std::vector<int32_t>{5, 7})) << f;
    EXPECT_EQ(aser->v_rows, (std::vector<float>{1, 1, 1, 4}));
    EXPECT_EQ(aser->m, (std::vector<float>{1, 1, 1, 1, 1, 4, 1, 4}));
  }
  auto aser4 = ComputeOProjSmoothingScales(a, o, 4, 2, Aser(4));
  ASSERT_TRUE(aser4.ok());
  EXPECT_EQ(aser4->outliers, (std::vector<int32_t>{0, 2, 5, 7}));
  EXPECT_EQ(aser4->m, (std::vector<float>{3, 1, 3, 1, 1, 4, 1, 4}));
  // f = 1 < n_rep extracts nothing.
  auto aser1 = ComputeOProjSmoothingScales(a, o, 4, 2, Aser(1));
  ASSERT_TRUE(aser1.ok());
  EXPECT_TRUE(aser1->outliers.empty());
}

TEST(SmoothingScalesTest, RejectsBadInputs) {
  const std::vector<Tensor> w = {Tensor::FromVector({1, 1, 1}, {1, 3})};
  EXPECT_FALSE(ComputeSmoothingScales({1, 1}, w, SmoothQuant()).ok());
  EXPECT_FALSE(ComputeSmoothingScales({1, NAN, 1}, w, SmoothQuant()).ok());
  EXPECT_FALSE(ComputeSmoothingScales({1, 1, 1}, w, Aser(4)).ok());
  EXPECT_FALSE(ComputeSmoothingScales({1, 1, 1}, w, {SmoothingMethod::kSmoothQuant, 1.5, 0}).ok());
  EXPECT_FALSE(ComputeSmoothingScales({1, 1, 1}, {}, SmoothQuant()).ok());
  EXPECT_FALSE(ComputeOProjSmoothingScales({1, 1, 1}, w[0], 3, 2, SmoothQuant()).ok());
}

// ---- Folding ----

// Statistics of every input of one block forward, BOS excluded.
std::array<ActivationStats, kNumLinearInputs> StatsOf(const CapturedInputs& x, int seq_len) {
  std::array<ActivationStats, kNumLinearInputs> stats = {
      ActivationStats(x[0].dim(1)), ActivationStats(x[1].dim(1)), ActivationStats(x[2].dim(1)),
      ActivationStats(x[3].dim(1))};
  for (int i = 0; i < kNumLinearInputs; ++i) {
    QCAL_CHECK(stats[i].Accumulate(x[i].data<float>(), x[i].dim(0), x[i].dim(1), seq_len).ok());
  }
  return stats;
}

std::array<const ActivationStats*, kNumLinearInputs> Pointers(
    const std::array<ActivationStats, kNumLinearInputs>& stats) {
  return {&stats[0], &stats[1], &stats[2], &stats[3]};
}

// X / m, row by row.
Tensor Unscaled(const Tensor& x, const std::vector<float>& m) {
  Tensor out = x.Clone();
  const int64_t width = x.dim(1);
  for (int64_t i = 0; i < x.numel(); ++i) out.data<float>()[i] /= m[i % width];
  return out;
}

class FoldRandomBlockTest : public ::testing::TestWithParam<int> {};

// Folds one input (param 0..3) or all four (param 4) of block 0 of the random GQA model, with
// SmoothQuant and ASER: the block output is unchanged, each smoothed input is X / m, and
// SmoothQuant balances max|X'_j| against max|W'_j| on the q/k/v input.
TEST_P(FoldRandomBlockTest, LeavesBlockOutputUnchanged) {
  auto backend = CpuBackend();
  auto model = RandomModel(backend.get(), 21);
  const ModelConfig& config = model->config();
  const SeqShape shape{3, 24, 0};
  TestRng rng(8);
  const Tensor hidden_in = RandomTensor(rng, {3 * 24, config.hidden_size}, 1.0);

  Tensor ref_out = hidden_in.Clone();
  auto ref_x = ForwardCapturing(*model, 0, ref_out, shape);
  ASSERT_TRUE(ref_x.ok()) << ref_x.status();
  const auto stats = StatsOf(*ref_x, shape.seq_len);
  const BlockWeights original = model->block(0);

  for (const SmoothingOptions& options : {SmoothQuant(), Aser(7)}) {
    SCOPED_TRACE(options.method == SmoothingMethod::kAser ? "aser" : "smoothquant");
    auto all = ComputeBlockSmoothing(*backend, original, config, Pointers(stats), options);
    ASSERT_TRUE(all.ok()) << all.status();
    BlockSmoothing smoothing;
    for (int i = 0; i < kNumLinearInputs; ++i) {
      if (GetParam() == 4 || GetParam() == i) smoothing.inputs[i] = all->inputs[i];
    }
    model->block(0) = original;
    ASSERT_TRUE(FoldBlockSmoothing(*backend, config, smoothing, model->block(0)).ok());

    Tensor out = hidden_in.Clone();
    auto x = ForwardCapturing(*model, 0, out, shape);
    ASSERT_TRUE(x.ok());
    EXPECT_LT(RelativeError(out, ref_out), 1e-5);
    // The block's own contribution (output minus residual) is unchanged too.
    Tensor delta = out.Clone(), ref_delta = ref_out.Clone();
    for (int64_t i = 0; i < out.numel(); ++i) {
      delta.data<float>()[i] -= hidden_in.data<float>()[i];
      ref_delta.data<float>()[i] -= hidden_in.data<float>()[i];
    }
    EXPECT_LT(RelativeError(delta, ref_delta), 1e-5);

    for (int i = 0; i < kNumLinearInputs; ++i) {
      const std::vector<float>& m = smoothing.inputs[i].m;
      if (m.empty()) {
        EXPECT_LT(RelativeError((*x)[i], (*ref_x)[i]), 1e-5) << "input " << i;
        continue;
      }
      // Not a no-op: some scale is far from 1, and the input became X / m.
      EXPECT_GT(*std::max_element(m.begin(), m.end()), 1.5f) << "input " << i;
      EXPECT_LT(RelativeError((*x)[i], Unscaled((*ref_x)[i], m)), 1e-5) << "input " << i;
    }
    if (options.method == SmoothingMethod::kAser) {
      EXPECT_EQ(all->at(LinearInput::kQkv).outliers.size(), 7u);
      EXPECT_EQ(all->at(LinearInput::kO).outliers.size(), 6u);  // ⌊7/3⌋ v rows x n_rep 3
    }
    // Only with the q/k/v fold alone: the o fold rescales v rows, which the q/k/v maxima include.
    if (options.method == SmoothingMethod::kSmoothQuant && GetParam() == 0) {
      const auto after = StatsOf(*x, shape.seq_len);
      auto w_after = WeightColumnMax({model->block(0).at(LinearKind::kQ).weight,
                                      model->block(0).at(LinearKind::kK).weight,
                                      model->block(0).at(LinearKind::kV).weight});
      ASSERT_TRUE(w_after.ok());
      for (int64_t j = 0; j < config.hidden_size; ++j) {
        EXPECT_NEAR(after[0].max_abs()[j], (*w_after)[j], 1e-5 * (*w_after)[j]) << j;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Inputs, FoldRandomBlockTest, ::testing::Range(0, 5));

TEST(FoldSmoothingTest, RejectsInconsistentScalesAndLeavesTheBlockUnchanged) {
  auto backend = CpuBackend();
  auto model = RandomModel(backend.get(), 2);
  const ModelConfig& config = model->config();
  const Tensor q_before = model->block(0).at(LinearKind::kQ).weight;
  BlockSmoothing bad;
  bad.at(LinearInput::kQkv).m.assign(config.hidden_size, 2.0f);
  bad.at(LinearInput::kDown).m.assign(config.intermediate_size, 2.0f);
  bad.at(LinearInput::kDown).m[3] = 0.0f;
  EXPECT_EQ(FoldBlockSmoothing(*backend, config, bad, model->block(0)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model->block(0).at(LinearKind::kQ).weight.raw(), q_before.raw());

  BlockSmoothing untied;  // o input scales that differ within a KV group
  untied.at(LinearInput::kO).m.assign(config.q_dim(), 1.0f);
  untied.at(LinearInput::kO).v_rows.assign(config.kv_dim(), 1.0f);
  untied.at(LinearInput::kO).m[config.head_dim * 1] = 2.0f;  // head 1 shares v rows with head 0
  EXPECT_EQ(FoldBlockSmoothing(*backend, config, untied, model->block(0)).code(),
            absl::StatusCode::kInvalidArgument);
}

// stories260k (5 blocks, 8 heads over 4 KV heads): statistics from 8 calibration samples, every
// block folded, logits of evaluation-like sequences unchanged within 1e-5 relative.
TEST(FoldSmoothingTest, Stories260kLogitsUnchanged) {
  QCAL_REQUIRE_SHARED();
  auto backend = CpuBackend();
  constexpr int kSamples = 8, kSeqLen = 128;
  auto samples = qcal::testing::StoriesCalibration(kSamples, kSeqLen);
  ASSERT_TRUE(samples.ok()) << samples.status();
  auto model = Model::Load(qcal::testing::StoriesDir(), backend.get());
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig config = (*model)->config();

  // Full-precision statistics of every block; the last sample's logits as the reference.
  std::vector<int> ids;
  for (const auto& s : *samples) ids.insert(ids.end(), s.begin(), s.end());
  auto hidden = (*model)->Embed(ids);
  ASSERT_TRUE(hidden.ok());
  const Tensor embedded = hidden->Clone();
  std::vector<std::array<ActivationStats, kNumLinearInputs>> stats;
  for (int b = 0; b < (*model)->num_blocks(); ++b) {
    auto x = ForwardCapturing(**model, b, *hidden, SeqShape{kSamples, kSeqLen, 0});
    ASSERT_TRUE(x.ok());
    stats.push_back(StatsOf(*x, kSeqLen));
  }
  auto ref_logits = (*model)->Logits(*hidden);
  ASSERT_TRUE(ref_logits.ok());

  for (const SmoothingOptions& options : {SmoothQuant(), Aser(8)}) {
    SCOPED_TRACE(options.method == SmoothingMethod::kAser ? "aser" : "smoothquant");
    auto folded = Model::Load(qcal::testing::StoriesDir(), backend.get());
    ASSERT_TRUE(folded.ok());
    for (int b = 0; b < (*folded)->num_blocks(); ++b) {
      auto s =
          ComputeBlockSmoothing(*backend, (*folded)->block(b), config, Pointers(stats[b]), options);
      ASSERT_TRUE(s.ok()) << s.status();
      ASSERT_TRUE(FoldBlockSmoothing(*backend, config, *s, (*folded)->block(b)).ok());
    }
    Tensor h = embedded.Clone();
    for (int b = 0; b < (*folded)->num_blocks(); ++b) {
      ASSERT_TRUE((*folded)->BlockForward(b, h, SeqShape{kSamples, kSeqLen, 0}).ok());
    }
    auto logits = (*folded)->Logits(h);
    ASSERT_TRUE(logits.ok());
    const double rel = RelativeError(*logits, *ref_logits);
    EXPECT_LT(rel, 1e-5);
    RecordProperty(options.method == SmoothingMethod::kAser ? "logits_rel_error_aser"
                                                            : "logits_rel_error_smoothquant",
                   absl::StrCat(rel));
    EXPECT_GT(RelativeError((*folded)->block(0).input_norm, (*model)->block(0).input_norm), 1e-2)
        << "the fold changed the weights";
  }
}

}  // namespace
}  // namespace qcal::engine
