// The gang's payloads and in-process transport: partial statistics, activation statistics and
// solved layers survive serialization bit for bit, in deterministic bytes of the documented size;
// malformed payloads are DataLoss; LocalTransport refuses what the contract says
// (FAILED_PRECONDITION naming the message), times out, and counts payload bytes.
#include "services/engine/gang/exchange.h"

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/gang/local_transport.h"
#include "services/engine/pipeline.h"

namespace qcal::engine {
namespace {

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

ActivationStats RandomStats(int64_t width, uint32_t seed) {
  ActivationStats s(width);
  const std::vector<float> x = Random(static_cast<size_t>(width * 6), seed);
  EXPECT_TRUE(s.Accumulate(x.data(), 6, width, 3).ok());
  return s;
}

bool SameStats(const ActivationStats& a, const ActivationStats& b) {
  return a.width() == b.width() && a.tokens() == b.tokens() && a.skipped() == b.skipped() &&
         std::memcmp(a.max_abs().data(), b.max_abs().data(), a.width() * sizeof(float)) == 0 &&
         std::memcmp(a.sum_abs().data(), b.sum_abs().data(), a.width() * sizeof(double)) == 0;
}

// A small model's shapes: hidden 16, intermediate 40, q 16, kv 8.
ModelConfig SmallConfig() {
  ModelConfig c;
  c.hidden_size = 16;
  c.intermediate_size = 40;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 32;
  return c;
}

class ExchangeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kernels::BackendOptions bo;
    bo.threads = 1;
    auto be = kernels::CreateBackend(bo);
    ASSERT_TRUE(be.ok()) << be.status();
    be_ = *std::move(be);
  }
  std::unique_ptr<kernels::Backend> be_;
};

// A partial's Gram matrix holds its lower triangle (Backend::GramLower): it is sent mirrored, so
// the receiver gets the lower triangle and its mirror image whatever the sender's upper triangle
// held (here random values, not a symmetric matrix).
TEST_F(ExchangeTest, InputPartialsRoundTripBitExact) {
  const int64_t w = 5;
  for (bool abs : {false, true}) {
    SCOPED_TRACE(abs);
    InputPartials partials;
    std::vector<Tensor> mirrored;
    for (int i = 0; i < 3; ++i) {
      TreePartial<InputStatistics> p;
      p.node = {i, i + 1};
      p.value.input = LinearInput::kGateUp;
      const std::vector<float> values = Random(w * w, 7u + i);
      std::vector<float> lower = values;
      for (int64_t r = 0; r < w; ++r) {
        for (int64_t c = r + 1; c < w; ++c) lower[r * w + c] = values[c * w + r];
      }
      mirrored.push_back(Tensor::FromVector(lower, {w, w}));
      auto gram = be_->ToDevice(Tensor::FromVector(values, {w, w}));
      ASSERT_TRUE(gram.ok());
      p.value.gram = *gram;
      if (abs) p.value.abs_stats = RandomStats(w, 11u + i);
      partials.push_back(std::move(p));
    }
    auto bytes = SerializeInputPartials(*be_, LinearInput::kGateUp, w, partials);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ(static_cast<int64_t>(bytes->size()), InputPartialsBytes(3, w, abs));
    auto again = SerializeInputPartials(*be_, LinearInput::kGateUp, w, partials);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*bytes, *again);
    auto back = ParseInputPartials(*be_, LinearInput::kGateUp, w, *bytes);
    ASSERT_TRUE(back.ok()) << back.status();
    ASSERT_EQ(back->size(), 3u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ((*back)[i].node, partials[i].node);
      EXPECT_EQ((*back)[i].value.input, LinearInput::kGateUp);
      EXPECT_TRUE(SameBytes((*back)[i].value.gram, mirrored[i]));
      ASSERT_EQ((*back)[i].value.abs_stats.has_value(), abs);
      if (abs) {
        EXPECT_TRUE(SameStats(*(*back)[i].value.abs_stats, *partials[i].value.abs_stats));
      }
    }
    // Another input or width, a truncated or padded payload.
    EXPECT_EQ(ParseInputPartials(*be_, LinearInput::kO, w, *bytes).status().code(),
              absl::StatusCode::kDataLoss);
    EXPECT_EQ(ParseInputPartials(*be_, LinearInput::kGateUp, w + 1, *bytes).status().code(),
              absl::StatusCode::kDataLoss);
    EXPECT_EQ(ParseInputPartials(*be_, LinearInput::kGateUp, w, bytes->substr(0, bytes->size() - 1))
                  .status()
                  .code(),
              absl::StatusCode::kDataLoss);
    EXPECT_EQ(ParseInputPartials(*be_, LinearInput::kGateUp, w, *bytes + "x").status().code(),
              absl::StatusCode::kDataLoss);
  }
  // An empty cover (a rank without chunks) still travels.
  auto empty = SerializeInputPartials(*be_, LinearInput::kQkv, w, {});
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(static_cast<int64_t>(empty->size()), InputPartialsBytes(0, w, false));
  auto none = ParseInputPartials(*be_, LinearInput::kQkv, w, *empty);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST_F(ExchangeTest, ActivationStatsPartialsRoundTripBitExact) {
  TreePartials<ActivationStats> partials;
  partials.push_back({{2, 1}, RandomStats(9, 3)});
  partials.push_back({{0, 12}, RandomStats(9, 4)});
  auto bytes = SerializeActivationStatsPartials(9, partials);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(static_cast<int64_t>(bytes->size()), ActivationStatsPartialsBytes(2, 9));
  auto back = ParseActivationStatsPartials(9, *bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ((*back)[i].node, partials[i].node);
    EXPECT_TRUE(SameStats((*back)[i].value, partials[i].value));
  }
  EXPECT_EQ(SerializeActivationStatsPartials(8, partials).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseActivationStatsPartials(8, *bytes).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseActivationStatsPartials(9, "QGIS").status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(ExchangeTest, SolvedLayerCarriesEverythingInstallNeeds) {
  LayerResult r;
  r.report.block = 3;
  r.report.kind = LinearKind::kUp;
  r.report.name = LinearPrefix(3, LinearKind::kUp);
  r.report.d_out = 4;
  r.report.d_in = 6;
  r.report.rel_error = 0.1234567890123;
  r.report.rel_error_rtn = 1.0 / 3.0;
  r.report.rank = 2;
  r.report.rel_error_er = 0.01;
  r.report.whitened_error_before = 2.5;
  r.report.whitened_error_after = 1.25;
  r.report.extra_params = 0.4;
  r.report.outlier_columns = 1;
  r.report.solve_seconds = 9;
  QuantizedLinear& q = r.quantized;
  q.d_out = 4;
  q.d_in = 6;
  q.spec.bits = 4;
  q.spec.group_size = 3;
  q.group_size = 3;
  q.n_groups = 2;
  q.codes.assign(24, 7);
  q.scales = Random(8, 1);
  q.zeros.assign(8, 8);
  q.g_idx = {0, 0, 0, 1, 1, 1};
  r.lora_a = Random(8, 2);
  r.lora_b = Random(12, 3);
  r.act_bits = 8;
  r.folded["model.layers.3.mlp.up_proj.bias"] = Tensor::FromVector(Random(4, 5), {4});
  const std::string bytes = SerializeSolvedLayer(r);
  EXPECT_EQ(bytes, SerializeSolvedLayer(r));
  auto back = ParseSolvedLayer(bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(SerializeLayerArtifact(*back), SerializeLayerArtifact(r));
  EXPECT_EQ(LayerReportJson(back->report).dump(), LayerReportJson(r.report).dump());
  EXPECT_EQ(back->report.kind, LinearKind::kUp);
  EXPECT_EQ(back->report.rel_error, r.report.rel_error);
  EXPECT_EQ(back->report.rel_error_rtn, r.report.rel_error_rtn);
  EXPECT_EQ(back->act_bits, 8);
  EXPECT_EQ(back->lora_a, r.lora_a);
  EXPECT_EQ(back->lora_b, r.lora_b);
  EXPECT_EQ(back->quantized.Dequantized(), r.quantized.Dequantized());
  ASSERT_EQ(back->folded.size(), 1u);
  EXPECT_EQ(SerializeSolvedLayer(*back), bytes);
  EXPECT_EQ(ParseSolvedLayer(bytes.substr(0, 20)).status().code(), absl::StatusCode::kDataLoss);
}

TEST(LocalTransportTest, RefusesWhatTheContractRefuses) {
  const GangPlan plan = MakeGangPlan(SmallConfig(), 40, 3, 0, 42);
  auto t = LocalTransport::Connect(plan);
  ASSERT_EQ(t.size(), 3u);
  const int qkv_owner = plan.StatOwner(LinearInput::kQkv);
  const int other = (qkv_owner + 1) % 3;
  const int third = (qkv_owner + 2) % 3;
  auto key = [](MessageKind kind, int item, int from) {
    return MessageKey{1, StepOf(0), kind, item, from};
  };
  auto expect_refused = [](const absl::Status& s, const MessageKey& k) {
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(s.message().find(DescribeKey(k)), std::string::npos) << s;
  };
  // kPartials to a rank that does not complete the statistic.
  MessageKey k = key(MessageKind::kPartials, 0, other);
  expect_refused(t[other]->Send(third, k, "p"), k);
  // kStatistic from a rank that does not complete it.
  k = key(MessageKind::kStatistic, 0, other);
  expect_refused(t[other]->Send(third, k, "s"), k);
  // kLayer from a rank that does not own the linear.
  const int q_owner = plan.OwnerOf(LinearKind::kQ);
  const int not_owner = (q_owner + 1) % 3;
  k = key(MessageKind::kLayer, 0, not_owner);
  expect_refused(t[not_owner]->Send((not_owner + 1) % 3, k, "l"), k);
  // Another epoch.
  k = key(MessageKind::kPartials, 0, other);
  expect_refused(t[other]->WithEpoch(41)->Send(qkv_owner, k, "p"), k);
  // Not the sender's key, itself as the receiver, an item out of range.
  EXPECT_EQ(t[other]->Send(qkv_owner, key(MessageKind::kPartials, 0, third), "p").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t[other]->Send(other, key(MessageKind::kPartials, 0, other), "p").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t[other]->Send(qkv_owner, key(MessageKind::kPartials, 4, other), "p").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t[other]->bytes_sent(), 0);
  // Accepted: counted, received once, and a second delivery of the same key is refused.
  k = key(MessageKind::kPartials, 0, other);
  ASSERT_TRUE(t[other]->Send(qkv_owner, k, "hello").ok());
  EXPECT_EQ(t[other]->Send(qkv_owner, k, "again").code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(t[other]->bytes_sent(), 5);
  auto got = t[qkv_owner]->Receive(k, absl::Seconds(1));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "hello");
  auto twice = t[qkv_owner]->Receive(k, absl::Milliseconds(20));
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(twice.status().message().find(DescribeKey(k)), std::string::npos);
  EXPECT_GE(t[qkv_owner]->receive_wait_seconds(), 0.015);
}

TEST(LocalTransportTest, ReceiveWaitsForALaterSend) {
  const GangPlan plan = MakeGangPlan(SmallConfig(), 16, 2, 0, 1);
  auto t = LocalTransport::Connect(plan);
  const int owner = plan.OwnerOf(LinearKind::kDown);
  const MessageKey k{0, StepOf(3), MessageKind::kLayer, static_cast<int>(LinearKind::kDown), owner};
  std::thread sender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_TRUE(t[owner]->Send(1 - owner, k, "layer").ok());
  });
  auto got = t[1 - owner]->Receive(k, absl::Seconds(10));
  sender.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "layer");
}

TEST(ExchangeBytesTest, NothingTravelsForOneRank) {
  Recipe recipe;
  recipe.smoothing.method = SmoothingMethod::kAser;
  const GangPlan plan = MakeGangPlan(SmallConfig(), 40, 1, 0, 0);
  const std::vector<int64_t> bytes =
      ExchangeBytesPerBlock(plan, SmallConfig(), recipe, {1, 1, 1, 1, 1, 1, 1});
  EXPECT_EQ(bytes, std::vector<int64_t>{0});
}

}  // namespace
}  // namespace qcal::engine
