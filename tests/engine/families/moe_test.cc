// Mixture-of-experts models (issue 17, phase 1; docs/MOE.md) on the synthetic checkpoints of
// `qcal synth --arch mixtral|qwen2_moe|qwen3_moe`: the routing rule (top-k order, ties,
// renormalisation), an MoE block's MLP against a scalar reference written here from the
// checkpoint's tensors (router, experts, shared expert and its gate), the staged forward, streamed
// and resident loading, cached generation against the full forward, a missing expert tensor named
// at load, and `qcal eval --dump-routing` (quantization: moe_quantize_test). Agreement with
// transformers is checked by tools/families/compare_transformers.py on a GPU machine (not here).
#include "services/engine/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/hf_config.h"
#include "common/safetensors.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/evaluate.h"
#include "services/engine/model.h"
#include "services/engine/pipeline.h"
#include "services/engine/quantize.h"
#include "services/engine/recipe.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/engine/families/family_checkpoints.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::vector<SynthArch> kMoeFamilies = {SynthArch::kMixtral, SynthArch::kQwen2Moe,
                                             SynthArch::kQwen3Moe};

TEST(RouteTokensTest, TopKOrderAndRenormalisation) {
  // Probabilities 0.1, 0.2, 0.3, 0.4: top 2 is experts 3, 2.
  const float logits[] = {std::log(1.0f), std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  Routing plain = RouteTokens(logits, 1, 4, 2, /*renormalize=*/false);
  EXPECT_EQ(plain.experts, (std::vector<int32_t>{3, 2}));
  EXPECT_NEAR(plain.weights[0], 0.4, 1e-7);
  EXPECT_NEAR(plain.weights[1], 0.3, 1e-7);
  Routing norm = RouteTokens(logits, 1, 4, 2, /*renormalize=*/true);
  EXPECT_EQ(norm.experts, (std::vector<int32_t>{3, 2}));
  EXPECT_NEAR(norm.weights[0], 4.0 / 7.0, 1e-7);
  EXPECT_NEAR(norm.weights[1], 3.0 / 7.0, 1e-7);
  // top_k = E keeps every expert; renormalised weights are then the probabilities.
  Routing all = RouteTokens(logits, 1, 4, 4, true);
  EXPECT_EQ(all.experts, (std::vector<int32_t>{3, 2, 1, 0}));
  EXPECT_NEAR(all.weights[3], 0.1, 1e-7);
}

TEST(RouteTokensTest, TiesKeepTheLowerIndexFirst) {
  // Row 0: three equal maxima; row 1: a smaller first value then three equal; row 2: all equal.
  const float logits[] = {1, 1, 1, 0, /**/ 0, 2, 2, 2, /**/ 5, 5, 5, 5};
  Routing r = RouteTokens(logits, 3, 4, 3, /*renormalize=*/true);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1, 2, /**/ 1, 2, 3, /**/ 0, 1, 2}));
  for (int s = 0; s < 3; ++s) EXPECT_FLOAT_EQ(r.weight(2, s), 1.0f / 3.0f);
  std::vector<int32_t> rows;
  std::vector<float> weights;
  r.RowsOf(0, &rows, &weights);
  EXPECT_EQ(rows, (std::vector<int32_t>{0, 2}));
  r.RowsOf(3, &rows, &weights);
  EXPECT_EQ(rows, (std::vector<int32_t>{1}));
}

// Synthetic MoE checkpoints of every family, written once for the suite.
class MoeTest : public FamilyCheckpointTest {
 protected:
  static void SetUpTestSuite() { WriteCheckpoints("moe", kMoeFamilies); }
};

// The reference MoE MLP, in double, from the checkpoint's fp32 tensors.
class ReferenceMoe {
 public:
  ReferenceMoe(const CheckpointReader& reader, const ModelConfig& c, int b) : c_(c) {
    router_ = Get(reader, RouterWeightName(c, b));
    for (int e = 0; e < c.num_experts; ++e) {
      experts_.push_back({Get(reader, ExpertLinearPrefix(c, b, e, LinearKind::kGate) + ".weight"),
                          Get(reader, ExpertLinearPrefix(c, b, e, LinearKind::kUp) + ".weight"),
                          Get(reader, ExpertLinearPrefix(c, b, e, LinearKind::kDown) + ".weight"),
                          c.moe_intermediate_size});
    }
    if (c.shared_expert_intermediate_size > 0) {
      shared_ = {Get(reader, SharedExpertPrefix(b, LinearKind::kGate) + ".weight"),
                 Get(reader, SharedExpertPrefix(b, LinearKind::kUp) + ".weight"),
                 Get(reader, SharedExpertPrefix(b, LinearKind::kDown) + ".weight"),
                 c.shared_expert_intermediate_size};
      shared_gate_ = Get(reader, SharedExpertGateWeightName(b));
    }
  }

  // The chosen experts of token x (top-k order) and the MLP output.
  std::vector<int> Experts(const float* x) const {
    std::vector<double> p = Probabilities(x);
    std::vector<int> order(c_.num_experts);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) {
      return p[a] != p[b] ? p[a] > p[b] : a < b;  // ties: the lower index first
    });
    order.resize(c_.num_experts_per_tok);
    return order;
  }
  std::vector<double> Output(const float* x) const {
    const std::vector<double> p = Probabilities(x);
    const std::vector<int> chosen = Experts(x);
    double kept = 0;
    for (int e : chosen) kept += p[e];
    std::vector<double> y(c_.hidden_size, 0.0);
    for (int e : chosen) {
      const double w = c_.norm_topk_prob ? p[e] / kept : p[e];
      const std::vector<double> ye = Mlp(experts_[e], x);
      for (int i = 0; i < c_.hidden_size; ++i) y[i] += w * ye[i];
    }
    if (!shared_gate_.empty()) {
      const double g = 1.0 / (1.0 + std::exp(-Dot(shared_gate_.data(), x)));
      const std::vector<double> ys = Mlp(shared_, x);
      for (int i = 0; i < c_.hidden_size; ++i) y[i] += g * ys[i];
    }
    return y;
  }

 private:
  struct Mlp3 {
    std::vector<float> gate, up, down;
    int inter = 0;
  };
  static std::vector<float> Get(const CheckpointReader& reader, const std::string& name) {
    auto t = reader.GetF32(name);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return {};
    return std::vector<float>(t->data<float>(), t->data<float>() + t->numel());
  }
  double Dot(const float* w, const float* x) const {
    double s = 0;
    for (int j = 0; j < c_.hidden_size; ++j) s += double(w[j]) * x[j];
    return s;
  }
  std::vector<double> Probabilities(const float* x) const {
    std::vector<double> l(c_.num_experts), p(c_.num_experts);
    for (int e = 0; e < c_.num_experts; ++e) l[e] = Dot(router_.data() + e * c_.hidden_size, x);
    const double mx = *std::max_element(l.begin(), l.end());
    double sum = 0;
    for (int e = 0; e < c_.num_experts; ++e) sum += p[e] = std::exp(l[e] - mx);
    for (double& v : p) v /= sum;
    return p;
  }
  std::vector<double> Mlp(const Mlp3& m, const float* x) const {
    std::vector<double> h(m.inter);
    for (int i = 0; i < m.inter; ++i) {
      const double g = Dot(m.gate.data() + int64_t{i} * c_.hidden_size, x);
      const double u = Dot(m.up.data() + int64_t{i} * c_.hidden_size, x);
      h[i] = g / (1.0 + std::exp(-g)) * u;
    }
    std::vector<double> y(c_.hidden_size, 0.0);
    for (int o = 0; o < c_.hidden_size; ++o) {
      for (int i = 0; i < m.inter; ++i) y[o] += double(m.down[int64_t{o} * m.inter + i]) * h[i];
    }
    return y;
  }

  const ModelConfig c_;
  std::vector<float> router_, shared_gate_;
  std::vector<Mlp3> experts_;
  Mlp3 shared_;
};

TEST_F(MoeTest, PresetsCarryEachFamilysKeysAndTensors) {
  for (SynthArch a : kMoeFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto c = LoadModelConfig(Dir(a));
    ASSERT_TRUE(c.ok()) << c.status();
    auto reader = CheckpointReader::Open(Dir(a));
    ASSERT_TRUE(reader.ok());
    const CheckpointReader& r = **reader;
    EXPECT_TRUE(c->moe());
    switch (a) {
      case SynthArch::kMixtral:
        EXPECT_EQ(c->model_type, "mixtral");
        EXPECT_EQ(c->num_experts, 4);
        EXPECT_TRUE(c->norm_topk_prob);
        EXPECT_TRUE(r.Has("model.layers.1.block_sparse_moe.gate.weight"));
        EXPECT_TRUE(r.Has("model.layers.1.block_sparse_moe.experts.3.w1.weight"));
        EXPECT_TRUE(r.Has("model.layers.1.block_sparse_moe.experts.3.w2.weight"));
        EXPECT_TRUE(r.Has("model.layers.1.block_sparse_moe.experts.3.w3.weight"));
        EXPECT_FALSE(r.Has("model.layers.1.mlp.gate_proj.weight"));
        break;
      case SynthArch::kQwen2Moe:
        EXPECT_EQ(c->model_type, "qwen2_moe");
        EXPECT_FALSE(c->norm_topk_prob);
        EXPECT_EQ(c->shared_expert_intermediate_size, 256);
        EXPECT_TRUE(r.Has("model.layers.0.self_attn.q_proj.bias"));
        EXPECT_TRUE(r.Has("model.layers.0.mlp.gate.weight"));
        EXPECT_TRUE(r.Has("model.layers.0.mlp.experts.7.down_proj.weight"));
        EXPECT_TRUE(r.Has("model.layers.0.mlp.shared_expert.up_proj.weight"));
        EXPECT_TRUE(r.Has("model.layers.0.mlp.shared_expert_gate.weight"));
        break;
      case SynthArch::kQwen3Moe:
        EXPECT_EQ(c->model_type, "qwen3_moe");
        EXPECT_TRUE(c->norm_topk_prob);
        EXPECT_TRUE(c->qk_norm);
        EXPECT_FALSE(c->IsMoeBlock(0));  // mlp_only_layers [0]
        EXPECT_TRUE(c->IsMoeBlock(1));
        EXPECT_TRUE(r.Has("model.layers.0.mlp.gate_proj.weight"));
        EXPECT_FALSE(r.Has("model.layers.0.mlp.gate.weight"));
        EXPECT_TRUE(r.Has("model.layers.1.mlp.experts.0.gate_proj.weight"));
        EXPECT_FALSE(r.Has("model.layers.1.mlp.shared_expert_gate.weight"));
        break;
      default:
        FAIL();
    }
    // Every block's bytes are its tensors' (fp32 presets): the experts are counted.
    for (int b = 0; b < c->num_layers; ++b) {
      int64_t bytes = 0;
      const std::string prefix = absl::StrCat("model.layers.", b, ".");
      for (const std::string& name : r.Names()) {
        if (name.rfind(prefix, 0) != 0) continue;
        auto info = r.Info(name);
        ASSERT_TRUE(info.ok());
        int64_t n = 1;
        for (int64_t s : info->shape) n *= s;
        bytes += n * 4;
      }
      EXPECT_EQ(BlockBytesOf(*c, b), bytes) << "block " << b;
    }
  }
}

// An MoE block's MLP equals the scalar reference, with the reference's experts for every token;
// BlockForward equals the staged ops bit for bit.
TEST_F(MoeTest, MoeMlpMatchesScalarReference) {
  for (SynthArch a : kMoeFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto model = Load(a);
    ASSERT_NE(model, nullptr);
    const ModelConfig& c = model->config();
    auto reader = CheckpointReader::Open(Dir(a));
    ASSERT_TRUE(reader.ok());
    const int rows = 64;
    auto h0 = model->Embed(Ids(rows, c.vocab_size, 3));
    ASSERT_TRUE(h0.ok());
    Tensor h = *h0;
    int moe_blocks = 0;
    for (int b = 0; b < c.num_layers; ++b) {
      SCOPED_TRACE(b);
      const SeqShape shape{1, rows, 0};
      // Staged: attention, then the MLP input, its routing and the experts.
      Tensor staged = h.Clone();
      auto x = model->NormedInput(b, staged, LinearInput::kQkv);
      ASSERT_TRUE(x.ok());
      auto attn = model->AttentionOutput(b, *x, shape);
      ASSERT_TRUE(attn.ok());
      ASSERT_TRUE(model->AddProjection(b, LinearKind::kO, *attn, staged).ok());
      auto xm = model->NormedInput(b, staged, LinearInput::kGateUp);
      ASSERT_TRUE(xm.ok());
      Tensor after_attention = staged.Clone();
      ASSERT_EQ(c.IsMoeBlock(b), model->block(b).moe.defined());
      if (c.IsMoeBlock(b)) {
        ++moe_blocks;
        EXPECT_FALSE(model->block(b).at(LinearKind::kGate).weight.defined());
        EXPECT_FALSE(model->MlpProduct(b, *xm).ok());
        auto routing = model->Route(b, *xm);
        ASSERT_TRUE(routing.ok()) << routing.status();
        ASSERT_TRUE(model->AddMoeOutput(b, *xm, *routing, staged).ok());
        ReferenceMoe ref(**reader, c, b);
        double num = 0, den = 0;
        std::set<int> used;
        for (int t = 0; t < rows; ++t) {
          const float* xt = xm->data<float>() + int64_t{t} * c.hidden_size;
          const std::vector<int> want = ref.Experts(xt);
          for (int s = 0; s < c.num_experts_per_tok; ++s) {
            EXPECT_EQ(routing->expert(t, s), want[s]) << "row " << t << " slot " << s;
            used.insert(want[s]);
          }
          const std::vector<double> y = ref.Output(xt);
          for (int i = 0; i < c.hidden_size; ++i) {
            const int64_t k = int64_t{t} * c.hidden_size + i;
            const double got = double(staged.data<float>()[k]) - after_attention.data<float>()[k];
            num += (got - y[i]) * (got - y[i]);
            den += y[i] * y[i];
          }
        }
        EXPECT_LT(std::sqrt(num / den), 1e-5);
        // The routing spreads the tokens: the comparison covers several experts.
        EXPECT_GE(static_cast<int>(used.size()), std::min(c.num_experts, 4));
      } else {
        auto m = model->MlpProduct(b, *xm);
        ASSERT_TRUE(m.ok());
        ASSERT_TRUE(model->AddProjection(b, LinearKind::kDown, *m, staged).ok());
      }
      ASSERT_TRUE(model->BlockForward(b, h, shape).ok());
      EXPECT_EQ(0, std::memcmp(h.raw(), staged.raw(), h.numel() * sizeof(float)));
    }
    EXPECT_EQ(moe_blocks, a == SynthArch::kQwen3Moe ? 1 : 2);
  }
}

// Qwen2-MoE's shared expert is scaled per token by sigmoid(shared_expert_gate · x): with the gate
// weights zeroed (sigmoid 1/2) and with the shared expert removed, the three outputs give the
// shared expert's contribution and show the gated output adds exactly sigmoid(g·x) times it.
TEST_F(MoeTest, SharedExpertGateScalesTheSharedExpert) {
  auto model = Load(SynthArch::kQwen2Moe);
  ASSERT_NE(model, nullptr);
  const ModelConfig& c = model->config();
  auto h = model->Embed(Ids(16, c.vocab_size, 5));
  ASSERT_TRUE(h.ok());
  auto x = model->NormedInput(0, *h, LinearInput::kGateUp);
  ASSERT_TRUE(x.ok());
  auto routing = model->Route(0, *x);
  ASSERT_TRUE(routing.ok());
  auto run = [&]() {
    Tensor out = Tensor::Zeros(DType::kF32, h->shape());
    EXPECT_TRUE(model->AddMoeOutput(0, *x, *routing, out).ok());
    return out;
  };
  const Tensor gated = run();
  MoeWeights& m = model->block(0).moe;
  const Tensor gate = m.shared_expert_gate.Clone();
  std::fill(m.shared_expert_gate.data<float>(),
            m.shared_expert_gate.data<float>() + m.shared_expert_gate.numel(), 0.0f);
  const Tensor half = run();
  // Without the shared expert at all (its down projection zeroed).
  std::fill(m.shared.down.weight.data<float>(),
            m.shared.down.weight.data<float>() + m.shared.down.weight.numel(), 0.0f);
  const Tensor none = run();
  m.shared_expert_gate = gate;
  // half - none = shared / 2 for every token; gated - none = sigmoid(g·x) · shared.
  double max_rel = 0;
  for (int64_t t = 0; t < h->dim(0); ++t) {
    double g = 0;
    for (int j = 0; j < c.hidden_size; ++j) {
      g += double(gate.data<float>()[j]) * x->data<float>()[t * c.hidden_size + j];
    }
    const double sig = 1.0 / (1.0 + std::exp(-g));
    for (int i = 0; i < c.hidden_size; ++i) {
      const int64_t k = t * c.hidden_size + i;
      const double shared = 2.0 * (double(half.data<float>()[k]) - none.data<float>()[k]);
      const double want = sig * shared;
      const double got = double(gated.data<float>()[k]) - none.data<float>()[k];
      max_rel = std::max(max_rel, std::abs(got - want) / (std::abs(shared) + 1e-3));
    }
  }
  EXPECT_LT(max_rel, 1e-4);
  EXPECT_NE(0, std::memcmp(gated.raw(), none.raw(), gated.numel() * sizeof(float)));
}

// Streaming (a block at a time) and resident models give the same logits, bit for bit.
TEST_F(MoeTest, StreamingEqualsResident) {
  for (SynthArch a : kMoeFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto all = Load(a);
    auto streamed = Load(Dir(a), BlockResidency::kStreaming);
    ASSERT_NE(all, nullptr);
    ASSERT_NE(streamed, nullptr);
    EXPECT_EQ(streamed->BlockBytes(), BlockBytesOf(streamed->config()));
    const std::vector<int> ids = Ids(40, all->config().vocab_size, 1);
    auto l1 = SequenceLogits(*all, ids);
    auto l2 = SequenceLogits(*streamed, ids);
    ASSERT_TRUE(l1.ok()) << l1.status();
    ASSERT_TRUE(l2.ok()) << l2.status();
    EXPECT_EQ(0, std::memcmp(l1->raw(), l2->raw(), l1->numel() * sizeof(float)));
  }
}

// Greedy generation with the KV cache (one token per step through the experts) chooses the
// tokens the full forward chooses at every step.
TEST_F(MoeTest, CachedGenerationEqualsFullForward) {
  for (SynthArch a : kMoeFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto model = Load(a);
    ASSERT_NE(model, nullptr);
    const ModelConfig& c = model->config();
    GenerateOptions o;
    o.max_new_tokens = 24;
    const std::vector<int> prompt = Ids(5, c.vocab_size, 2);
    auto cached = GenerateGreedy(*model, prompt, o);
    ASSERT_TRUE(cached.ok()) << cached.status();
    std::vector<int> seq = {c.bos_token_id};
    seq.insert(seq.end(), prompt.begin(), prompt.end());
    std::vector<int> full;
    while (static_cast<int>(full.size()) < o.max_new_tokens) {
      auto logits = SequenceLogits(*model, seq);
      ASSERT_TRUE(logits.ok());
      const float* l = logits->data<float>() + (logits->dim(0) - 1) * c.vocab_size;
      const int best = static_cast<int>(std::max_element(l, l + c.vocab_size) - l);
      if (best == c.bos_token_id || best == c.eos_token_id) break;
      full.push_back(best);
      seq.push_back(best);
    }
    EXPECT_EQ(*cached, full);
    EXPECT_GE(full.size(), 8u);
  }
}

// `qcal generate` (its own residency choice, the checkpoint's tokenizer) prints the decoded ids
// of the in-process cached greedy generation.
TEST_F(MoeTest, GenerateCliPrintsTheGreedyTokens) {
  for (SynthArch a : kMoeFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto model = Load(a);
    ASSERT_NE(model, nullptr);
    auto tokenizer = Tokenizer::Load(Dir(a));
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    GenerateOptions o;
    o.max_new_tokens = 16;
    o.bos_id = (*tokenizer)->bos_id();
    o.eos_ids = (*tokenizer)->eos_ids();
    auto ids = GenerateGreedy(*model, {}, o);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_FALSE(ids->empty());
    auto text = (*tokenizer)->Decode(*ids);
    ASSERT_TRUE(text.ok());
    auto r = testing::RunQcal(
        {"generate", "--model", Dir(a), "--max-new-tokens", "16", "--threads", "2"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, *text + "\n");
  }
}

// A checkpoint without one expert tensor is refused at load, naming the tensor.
TEST_F(MoeTest, MissingExpertTensorIsNamed) {
  for (SynthArch a : kMoeFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto c = LoadModelConfig(Dir(a));
    ASSERT_TRUE(c.ok());
    std::vector<std::string> drop = {ExpertLinearPrefix(*c, 1, 2, LinearKind::kUp) + ".weight",
                                     RouterWeightName(*c, 1)};
    if (a == SynthArch::kQwen2Moe) drop.push_back(SharedExpertGateWeightName(1));
    for (const std::string& missing : drop) {
      SCOPED_TRACE(missing);
      const std::string dir = *root_ + "/missing";
      fs::remove_all(dir);
      fs::create_directories(dir);
      fs::copy_file(Dir(a) + "/config.json", dir + "/config.json");
      auto reader = CheckpointReader::Open(Dir(a));
      ASSERT_TRUE(reader.ok());
      std::map<std::string, Tensor> tensors;
      for (const std::string& name : (*reader)->Names()) {
        if (name == missing) continue;
        auto t = (*reader)->Get(name);
        ASSERT_TRUE(t.ok());
        tensors[name] = *t;
      }
      ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
      ModelLoadOptions o;
      auto m = Model::Load(dir, backend_.get(), o);
      ASSERT_FALSE(m.ok());
      EXPECT_THAT(std::string(m.status().message()), HasSubstr(missing));
    }
  }
}

// `qcal eval --dump-routing` writes the experts the model chose for the logged sequence: those
// the routing observer sees in process, for the MoE blocks only.
TEST_F(MoeTest, EvalDumpsRouting) {
  const std::string dir = Dir(SynthArch::kQwen3Moe);
  auto model = Load(dir);
  ASSERT_NE(model, nullptr);
  const std::vector<int> ids = Ids(24, model->config().vocab_size, 4);
  std::map<int, Routing> seen;
  model->set_routing_observer([&](int b, const Routing& r) { seen[b] = r; });
  ASSERT_TRUE(SequenceLogits(*model, ids).ok());
  ASSERT_EQ(seen.size(), 1u);  // block 0 is dense
  const std::string ids_path = *root_ + "/ids.json";
  ASSERT_TRUE(WriteStringToFile(ids_path, absl::StrCat("[", absl::StrJoin(ids, ","), "]")).ok());
  const std::string out = *root_ + "/routing.safetensors";
  auto r =
      testing::RunQcal({"eval", "--model", dir, "--ids", ids_path, "--logits-out",
                        *root_ + "/logits.safetensors", "--dump-routing", out, "--threads", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto file = SafetensorsFile::Open(out);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_FALSE((*file)->Has("layers.0.experts"));
  auto experts = (*file)->Get("layers.1.experts");
  auto weights = (*file)->Get("layers.1.weights");
  ASSERT_TRUE(experts.ok() && weights.ok());
  EXPECT_EQ(experts->shape(), (Shape{24, 2}));
  const Routing& want = seen[1];
  EXPECT_EQ(std::vector<int32_t>(experts->data<int32_t>(), experts->data<int32_t>() + 48),
            want.experts);
  EXPECT_EQ(std::vector<float>(weights->data<float>(), weights->data<float>() + 48), want.weights);
}

}  // namespace
}  // namespace qcal::engine
