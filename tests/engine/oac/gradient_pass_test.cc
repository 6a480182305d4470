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

// The CPU backend with a memory budget, optionally posing as a device backend (its "device"
// memory is host memory either way), so that the pass must keep its boundaries on the host or
// the scratch disk.
class BudgetBackend final : public kernels::Backend {
 public:
  BudgetBackend(std::unique_ptr<kernels::Backend> inner, int64_t budget, Device device)
      : inner_(std::move(inner)), budget_(budget), device_(device) {}
  std::string name() const override { return "budget-" + inner_->name(); }
  Device device() const override { return device_; }
  bool SupportsOp(kernels::Op op) const override { return inner_->SupportsOp(op); }
  kernels::ComputeDType compute_dtype() const override { return inner_->compute_dtype(); }
  int threads() const override { return inner_->threads(); }
  std::string DeviceKind() const override { return inner_->DeviceKind(); }
  int64_t AvailableMemory() override { return budget_; }
  absl::StatusOr<Tensor> Alloc(DType dtype, const Shape& shape) override {
    return inner_->Alloc(dtype, shape);
  }
  absl::StatusOr<Tensor> ToDevice(const Tensor& host) override { return inner_->ToDevice(host); }
  absl::StatusOr<Tensor> ToHost(const Tensor& t) override { return inner_->ToHost(t); }
  absl::Status Synchronize() override { return inner_->Synchronize(); }
  absl::Status Copy(const Tensor& src, Tensor& dst) override { return inner_->Copy(src, dst); }
  absl::Status Convert(const Tensor& src, Tensor& dst) override {
    return inner_->Convert(src, dst);
  }
  absl::Status ConcatColumns(const Tensor& a, const Tensor& b, Tensor& out) override {
    return inner_->ConcatColumns(a, b, out);
  }
  absl::Status WriteColumns(const Tensor& src, int64_t first, Tensor& out) override {
    return inner_->WriteColumns(src, first, out);
  }
  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                      bool accumulate) override {
    return inner_->Linear(x, w, bias, y, accumulate);
  }
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y) override {
    return inner_->RmsNorm(x, weight, eps, y);
  }
  absl::Status Rope(Tensor& x, const kernels::RopeShape& shape) override {
    return inner_->Rope(x, shape);
  }
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         const kernels::AttentionShape& shape, Tensor& out) override {
    return inner_->Attention(q, k, v, shape, out);
  }
  absl::Status SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    return inner_->SiluMul(gate, up, out);
  }
  absl::Status Add(const Tensor& x, Tensor& y) override { return inner_->Add(x, y); }
  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor& out) override {
    return inner_->Embedding(table, ids, out);
  }
  absl::Status Nll(const Tensor& logits, const Tensor& targets, Tensor& nll) override {
    return inner_->Nll(logits, targets, nll);
  }
  absl::Status AccumulateGram(const Tensor& x, Tensor& h) override {
    return inner_->AccumulateGram(x, h);
  }
  absl::Status Gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                    float beta, Tensor& c) override {
    return inner_->Gemm(a, trans_a, b, trans_b, alpha, beta, c);
  }
  absl::Status RmsNormBackward(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy,
                               Tensor& dx) override {
    return inner_->RmsNormBackward(x, weight, eps, dy, dx);
  }
  absl::Status RopeBackward(Tensor& g, const kernels::RopeShape& shape) override {
    return inner_->RopeBackward(g, shape);
  }
  absl::Status AttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& dout, const kernels::AttentionShape& shape,
                                 Tensor& dq, Tensor& dk, Tensor& dv) override {
    return inner_->AttentionBackward(q, k, v, dout, shape, dq, dk, dv);
  }
  absl::Status SiluMulBackward(const Tensor& gate, const Tensor& up, const Tensor& dout,
                               Tensor& dgate, Tensor& dup) override {
    return inner_->SiluMulBackward(gate, up, dout, dgate, dup);
  }
  absl::Status NllBackward(const Tensor& logits, const Tensor& targets, float scale,
                           Tensor& dlogits) override {
    return inner_->NllBackward(logits, targets, scale, dlogits);
  }
  absl::Status ScaleRowsByNorm(const Tensor& g, Tensor& x) override {
    return inner_->ScaleRowsByNorm(g, x);
  }
  absl::Status GemmLower(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                         float beta, Tensor& c) override {
    return inner_->GemmLower(a, trans_a, b, trans_b, alpha, beta, c);
  }
  absl::Status MirrorLower(Tensor& c) override { return inner_->MirrorLower(c); }
  absl::Status AccumulateSquares(const Tensor& g, Tensor& f) override {
    return inner_->AccumulateSquares(g, f);
  }

 private:
  std::unique_ptr<kernels::Backend> inner_;
  int64_t budget_;
  Device device_;
};

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

TEST(GradientPassTiersTest, BoundariesOnTheHostOrScratchDiskGiveTheSameBits) {
  const ModelConfig config = OacConfig(OacVariant::kQwen3, 5);
  const GradientChunks chunks = MakeChunks(config.vocab_size, 6, {2, 1, 2}, 12);
  GradientPassOptions options;
  options.kind = HessianKind::kOutputAdaptive;
  options.fisher = true;
  auto reference_be = testing::OacCpuBackend();
  auto reference = OacRandomModel(config, reference_be.get(), 41);
  auto unlimited = PlanGradientPass(*reference, chunks, options);
  ASSERT_TRUE(unlimited.ok()) << unlimited.status();
  EXPECT_EQ(unlimited->tier, BoundaryTier::kDevice);
  EXPECT_EQ(unlimited->boundary_every, 1);
  const int64_t act = unlimited->activation_bytes;
  EXPECT_EQ(act, 5 * 6 * 24 * 4);
  EXPECT_EQ(unlimited->kept_bytes, 4 * act);
  // The working set, and a budget that holds k + 1 = 2 activations beside it but not the 5 that
  // the best device-only plan (k = 2: the segment's 2, one carried, 2 other boundaries) needs.
  const int64_t working = unlimited->device_bytes - 6 * act;
  const int64_t budget = working + 3 * act;
  const Statistics want = RunRanks(*reference, chunks, {0, 3}, options);

  struct Case {
    Device device;
    std::string scratch;
    BoundaryTier tier;
    int k;
  };
  const std::string scratch = testing::MakeTempDir("oac_scratch");
  for (const Case& c : {Case{Device::kCuda, "", BoundaryTier::kHost, 1},
                        Case{Device::kHost, scratch, BoundaryTier::kScratch, 1}}) {
    SCOPED_TRACE(BoundaryTierName(c.tier));
    BudgetBackend be(testing::OacCpuBackend(), budget, c.device);
    auto model = OacRandomModel(config, &be, 41);
    GradientPassOptions o = options;
    o.scratch_dir = c.scratch;
    auto plan = PlanGradientPass(*model, chunks, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->tier, c.tier);
    EXPECT_EQ(plan->boundary_every, c.k);
    EXPECT_LE(plan->device_bytes, budget);
    ExpectSameBits(want, RunRanks(*model, chunks, {0, 1, 3}, o), BoundaryTierName(c.tier));
    o.boundary_every = 2;
    ExpectSameBits(want, RunRanks(*model, chunks, {0, 3}, o), "k 2");
  }
  // The scratch directory is left as it was.
  EXPECT_TRUE(fs::is_empty(scratch));
  fs::remove_all(scratch);
  // Nowhere to go: refused before any work, naming the sizes.
  BudgetBackend tight(testing::OacCpuBackend(), budget, Device::kHost);
  auto model = OacRandomModel(config, &tight, 41);
  auto refused = PlanGradientPass(*model, chunks, options);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(),
              ::testing::HasSubstr(absl::StrCat(act, " bytes a block, 5 blocks")));
  EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("none given"));
  EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("recipe key \"hessian\""));
  int calls = 0;
  EXPECT_EQ(RunGradientPass(*model, chunks, options,
                            [&](int, BlockOacPartials) {
                              ++calls;
                              return absl::OkStatus();
                            })
                .status()
                .code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(calls, 0);
}

// With bf16 compute the kept boundaries are BF16 (half the bytes) and every block input is rounded
// to bf16 in the sweep and in recomputation alike: the boundary spacing, the scratch tier and the
// ranks leave the statistics' bits unchanged.
TEST(GradientPassTiersTest, Bf16BoundariesGiveTheSameBitsForAnySpacingTierOrRanks) {
  const ModelConfig config = OacConfig(OacVariant::kLlama, 4);
  const GradientChunks chunks = MakeChunks(config.vocab_size, 5, {2, 1, 2}, 14);
  kernels::BackendOptions bo;
  bo.threads = 2;
  bo.compute_dtype = kernels::ComputeDType::kBF16;
  auto make_backend = [&] {
    auto be = kernels::CreateBackend(bo);
    QCAL_CHECK(be.ok());
    return std::move(be).value();
  };
  GradientPassOptions options;
  options.kind = HessianKind::kOutputAdaptive;
  options.fisher = true;
  auto be = make_backend();
  EXPECT_EQ(BoundaryDType(*be), DType::kBF16);
  auto model = OacRandomModel(config, be.get(), 43);
  auto plan = PlanGradientPass(*model, chunks, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->boundary_dtype, DType::kBF16);
  EXPECT_EQ(plan->boundary_every, 1);
  EXPECT_EQ(plan->kept_bytes, 3 * plan->activation_bytes / 2);  // 3 boundaries at half the bytes
  const Statistics want = RunRanks(*model, chunks, {0, 3}, options);
  GradientPassOptions spaced = options;
  spaced.boundary_every = 3;
  ExpectSameBits(want, RunRanks(*model, chunks, {0, 2, 3}, spaced), "k 3, two ranks");
  const std::string scratch = testing::MakeTempDir("oac_bf16_scratch");
  BudgetBackend tight(make_backend(), plan->device_bytes - plan->kept_bytes, Device::kHost);
  auto on_disk = OacRandomModel(config, &tight, 43);
  GradientPassOptions o = options;
  o.scratch_dir = scratch;
  auto disk_plan = PlanGradientPass(*on_disk, chunks, o);
  ASSERT_TRUE(disk_plan.ok()) << disk_plan.status();
  EXPECT_EQ(disk_plan->tier, BoundaryTier::kScratch);
  ExpectSameBits(want, RunRanks(*on_disk, chunks, {0, 1, 3}, o), "scratch");
  EXPECT_TRUE(fs::is_empty(scratch));
  fs::remove_all(scratch);
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
