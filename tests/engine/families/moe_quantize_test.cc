// Mixture-of-experts quantization (issue 17, phase 2; docs/MOE.md) on the synthetic checkpoints of
// `qcal synth --arch mixtral|qwen2_moe|qwen3_moe`:
//   - an expert's gate/up Hessian is XᵀX over exactly the tokens routed to it (computed here in
//     double from the routing of the quantized path's MLP input), its down_proj Hessian the same
//     over silu(gate x)·(up x) of those tokens, and the min_tokens fallback applies exactly below
//     min_tokens (min_tokens = count: routed rows; count + 1: every row);
//   - per family: quantize -> export -> reload equals the in-memory model's perplexity within 1e-4
//     relative, every expert linear is in the export, two runs give the same bytes, and a gang of
//     2 ranks gives the bytes of one worker; full-precision routing runs;
//   - recipe keys the phase does not do on experts and a moe section on a dense model are refused
//     naming the key.
// The same jobs through the service (`qcal quantize --workers N`, worker kills): service_moe_test.
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/safetensors.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/gang/local_transport.h"
#include "services/engine/pipeline.h"
#include "services/engine/quantize.h"
#include "tests/engine/families/family_checkpoints.h"
#include "tests/support/numeric.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

using testing::RelativeError;

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int kSamples = 16;  // two chunks
constexpr int kSeqLen = 32;

Recipe Gptq4(int min_tokens = 128) {
  Recipe r;
  r.method = QuantMethod::kGptq;
  r.weights.bits = 4;
  r.weights.group_size = 32;
  r.moe = MoeRecipe{};
  r.moe->min_tokens = min_tokens;
  return r;
}

// Host F32 copy of a backend tensor.
std::vector<float> HostValues(kernels::Backend& be, const Tensor& t) {
  auto h = be.ToHost(t);
  EXPECT_TRUE(h.ok()) << h.status();
  return std::vector<float>(h->data<float>(), h->data<float>() + h->numel());
}

class MoeQuantizeTest : public FamilyCheckpointTest {
 protected:
  static void SetUpTestSuite() {
    WriteCheckpoints("moe_quantize",
                     {SynthArch::kMixtral, SynthArch::kQwen2Moe, SynthArch::kQwen3Moe});
  }

  JobOptions Options(SynthArch a, const Recipe& recipe, const std::string& out) const {
    JobOptions o;
    o.model_dir = Dir(a);
    o.recipe = recipe;
    o.calib_path = Dir(a) + "/calib.txt";
    o.eval_text = Dir(a) + "/eval.txt";
    o.eval_max_windows = 2;
    o.samples = kSamples;
    o.seq_len = kSeqLen;
    o.threads = 2;
    o.out_dir = out;
    o.overwrite = true;
    return o;
  }

  // The job's calibration samples and evaluation windows, as JobSession draws them.
  void Data(SynthArch a, std::vector<std::vector<int>>* samples, TokenWindows* windows) {
    auto tok = Tokenizer::Load(Dir(a));
    ASSERT_TRUE(tok.ok()) << tok.status();
    for (const char* f : {"calib.txt", "eval.txt"}) {
      const std::string path = Dir(a) + "/" + f;
      auto text = LoadCorpusText(path);
      ASSERT_TRUE(text.ok());
      auto ids = TokenizeCorpus(**tok, *text, path);
      ASSERT_TRUE(ids.ok());
      if (std::string(f) == "calib.txt") {
        auto s = SampleCalibration(*ids, kSamples, kSeqLen, 0, (*tok)->bos_id(), path);
        ASSERT_TRUE(s.ok()) << s.status();
        *samples = *std::move(s);
      } else {
        auto w = MakeEvalWindows(*ids, kSeqLen, 2, (*tok)->bos_id(), path);
        ASSERT_TRUE(w.ok()) << w.status();
        *windows = *std::move(w);
      }
    }
  }
};

// Block 0 of Mixtral (every block is MoE) through its attention groups, then the routing; returns
// the per-expert counts. The runner is left before the expert statistics.
std::vector<int64_t> RouteBlock0(BlockRunner& runner) {
  EXPECT_TRUE(runner.Begin().ok());
  for (LinearInput g : {LinearInput::kQkv, LinearInput::kO}) {
    auto partials = runner.CollectPartials(g);
    EXPECT_TRUE(partials.ok()) << partials.status();
    auto stats = runner.Complete(g, *std::move(partials));
    EXPECT_TRUE(stats.ok()) << stats.status();
    auto solved = runner.Solve(*stats, ConsumersOf(g));
    EXPECT_TRUE(solved.ok()) << solved.status();
    EXPECT_TRUE(runner.Install(*std::move(solved)).ok());
    EXPECT_TRUE(runner.Push(g).ok());
  }
  auto counts = runner.RouteChunks();
  EXPECT_TRUE(counts.ok()) << counts.status();
  return counts.ok() ? *counts : std::vector<int64_t>();
}

TEST_F(MoeQuantizeTest, ExpertHessianIsTheGramOfItsRoutedTokens) {
  constexpr int kExpert = 1;
  std::vector<std::vector<int>> samples;
  TokenWindows windows;
  Data(SynthArch::kMixtral, &samples, &windows);
  int64_t count = -1;
  for (int extra : {-1, 0, 1}) {  // -1: the count is not known yet (min_tokens 1)
    SCOPED_TRACE(extra);
    auto model = Load(SynthArch::kMixtral);
    ASSERT_NE(model, nullptr);
    kernels::Backend& be = *backend_;
    auto acts = EmbedCalibration(*model, samples);
    ASSERT_TRUE(acts.ok());
    const Recipe recipe = Gptq4(extra < 0 ? 1 : static_cast<int>(count + extra));
    StageTimes times;
    BlockRunner runner(*model, *acts, recipe, times);
    const std::vector<int64_t> counts = RouteBlock0(runner);
    ASSERT_EQ(counts.size(), 4u);
    // Independently: the quantized path's MLP input of every chunk (acts now hold the
    // post-attention residual), its routing, and expert kExpert's rows.
    const int64_t d = model->config().hidden_size;
    std::vector<double> routed(d * d, 0), all(d * d, 0);
    std::vector<double> down_routed;
    int64_t rows_routed = 0;
    const ExpertWeights& ew = model->block(0).moe.experts[kExpert];
    const std::vector<float> wg = HostValues(be, ew.gate.weight), wu = HostValues(be, ew.up.weight);
    const int64_t inter = ew.gate.weight.dim(0);
    down_routed.assign(inter * inter, 0);
    for (const Tensor& h : acts->chunks) {
      auto x = model->NormedInput(0, h, LinearInput::kGateUp);
      ASSERT_TRUE(x.ok());
      auto routing = model->Route(0, *x);
      ASSERT_TRUE(routing.ok());
      const std::vector<float> xs = HostValues(be, *x);
      std::set<int64_t> mine;
      for (int64_t r = 0; r < routing->rows; ++r) {
        for (int s = 0; s < routing->top_k; ++s) {
          if (routing->expert(r, s) == kExpert) mine.insert(r);
        }
      }
      rows_routed += static_cast<int64_t>(mine.size());
      for (int64_t r = 0; r < routing->rows; ++r) {
        const float* v = xs.data() + r * d;
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t j = 0; j < d; ++j) {
            all[i * d + j] += double(v[i]) * v[j];
            if (mine.count(r)) routed[i * d + j] += double(v[i]) * v[j];
          }
        }
        if (!mine.count(r)) continue;
        std::vector<double> p(inter);
        for (int64_t o = 0; o < inter; ++o) {
          double g = 0, u = 0;
          for (int64_t i = 0; i < d; ++i) {
            g += double(wg[o * d + i]) * v[i];
            u += double(wu[o * d + i]) * v[i];
          }
          p[o] = g / (1 + std::exp(-g)) * u;
        }
        for (int64_t i = 0; i < inter; ++i) {
          for (int64_t j = 0; j < inter; ++j) down_routed[i * inter + j] += p[i] * p[j];
        }
      }
    }
    EXPECT_EQ(counts[kExpert], rows_routed);
    ASSERT_GT(rows_routed, 0);
    count = rows_routed;
    ASSERT_TRUE(runner.SetExpertCounts(counts).ok());
    auto partials = runner.CollectExpertPartials(kExpert, LinearInput::kGateUp);
    ASSERT_TRUE(partials.ok()) << partials.status();
    auto stats = runner.Complete(LinearInput::kGateUp, *std::move(partials));
    ASSERT_TRUE(stats.ok()) << stats.status();
    const std::vector<float> gram = HostValues(be, stats->gram);
    // min_tokens = count + 1: the expert falls back to every row; = count (or 1): its own rows.
    const bool fallback = extra == 1;
    EXPECT_LT(RelativeError(gram, fallback ? all : routed), 1e-5);
    EXPECT_GT(RelativeError(gram, fallback ? routed : all), 1e-2);
    if (!fallback) {
      // down_proj's statistics through the (still full-precision) gate/up of the same rows.
      auto dp = runner.CollectExpertPartials(kExpert, LinearInput::kDown);
      ASSERT_TRUE(dp.ok()) << dp.status();
      auto ds = runner.Complete(LinearInput::kDown, *std::move(dp));
      ASSERT_TRUE(ds.ok()) << ds.status();
      EXPECT_LT(RelativeError(HostValues(be, ds->gram), down_routed), 1e-5);
    }
    // The solved linears report the count and the fallback.
    auto solved = runner.Solve(*stats, ConsumersOf(LinearInput::kGateUp), kExpert);
    ASSERT_TRUE(solved.ok()) << solved.status();
    ASSERT_EQ(solved->size(), 2u);
    EXPECT_EQ((*solved)[0].result.report.routed_tokens, rows_routed);
    EXPECT_EQ((*solved)[0].result.report.fallback, fallback);
    EXPECT_EQ((*solved)[1].result.report.name, "model.layers.0.block_sparse_moe.experts.1.w3");
  }
}

// Tensor names of an exported checkpoint's model.safetensors.
std::set<std::string> ExportedNames(const std::string& dir) {
  auto f = SafetensorsFile::Open(dir + "/model.safetensors");
  EXPECT_TRUE(f.ok()) << f.status();
  std::set<std::string> names;
  if (f.ok()) {
    for (const auto& t : (*f)->tensors()) names.insert(t.first);
  }
  return names;
}

// One rank of a gang job (JobSession over LocalTransport); rank 0 finishes into `out`.
absl::Status RunRank(const JobOptions& o, const GangPlan& plan, Transport* transport,
                     const std::string& out) {
  QCAL_ASSIGN_OR_RETURN(auto session, JobSession::Open(o, nullptr, plan));
  GangBlockOptions gopt;
  gopt.receive_timeout = absl::Seconds(60);
  while (session->next_block() < session->num_blocks()) {
    QCAL_RETURN_IF_ERROR(session->RunNextBlock(transport, gopt).status());
  }
  if (plan.rank != 0) return absl::OkStatus();
  fs::create_directories(out);
  return session->Finish(out).status();
}

TEST_F(MoeQuantizeTest, RoundTripEveryExpertTwoRunsAndTwoWorkers) {
  const std::string tmp = testing::MakeTempDir("moe_round_trip");
  for (SynthArch a : {SynthArch::kMixtral, SynthArch::kQwen2Moe, SynthArch::kQwen3Moe}) {
    SCOPED_TRACE(SynthArchName(a));
    const std::string out = tmp + "/" + SynthArchName(a);
    auto job = RunQuantizeJob(Options(a, Gptq4(), out + "-1"));
    ASSERT_TRUE(job.ok()) << job.status();
    // In memory: the same samples through QuantizeModel, evaluated before any export.
    std::vector<std::vector<int>> samples;
    TokenWindows windows;
    Data(a, &samples, &windows);
    auto model = Load(a);
    ASSERT_NE(model, nullptr);
    auto q = QuantizeModel(*model, samples, Gptq4());
    ASSERT_TRUE(q.ok()) << q.status();
    auto in_memory = EvaluatePerplexity(*model, windows);
    ASSERT_TRUE(in_memory.ok());
    EXPECT_NEAR(job->perplexity / in_memory->perplexity, 1.0, 1e-4);
    // Every linear of every block is exported as GPTQ tensors, the router is copied.
    const ModelConfig& config = model->config();
    const std::set<std::string> names = ExportedNames(out + "-1");
    size_t linears = 0;
    for (int b = 0; b < config.num_layers; ++b) {
      for (const LinearId& id : BlockLinears(config, b)) {
        ++linears;
        for (const char* t : {".qweight", ".qzeros", ".scales", ".g_idx"}) {
          EXPECT_TRUE(names.count(LinearPrefix(config, b, id) + t))
              << LinearPrefix(config, b, id) << t;
        }
      }
      if (config.IsMoeBlock(b)) {
        EXPECT_TRUE(names.count(RouterWeightName(config, b)));
      }
    }
    EXPECT_EQ(q->layers.size(), linears);
    EXPECT_EQ(job->report["layers"].size(), linears);
    ASSERT_TRUE(job->report.contains("moe"));
    EXPECT_EQ(job->report["recipe"]["moe"]["min_tokens"].get<int>(), 128);
    // Two runs, and a gang of two ranks, give the same bytes.
    ASSERT_TRUE(RunQuantizeJob(Options(a, Gptq4(), out + "-2")).ok());
    const auto expected = testing::OutputFiles(out + "-1");
    EXPECT_TRUE(testing::OutputFiles(out + "-2") == expected);
    const JobOptions o = Options(a, Gptq4(), out + "-gang");
    std::vector<GangPlan> plans = {MakeGangPlan(config, kSamples, 2, 0, 3),
                                   MakeGangPlan(config, kSamples, 2, 1, 3)};
    ASSERT_EQ(plans[0].expert_owners.size(), static_cast<size_t>(NumExpertUnits(config)));
    auto transports = LocalTransport::Connect(plans[0]);
    std::vector<absl::Status> status(2);
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back(
          [&, r] { status[r] = RunRank(o, plans[r], transports[r].get(), o.out_dir); });
    }
    for (std::thread& t : threads) t.join();
    ASSERT_TRUE(status[0].ok()) << status[0];
    ASSERT_TRUE(status[1].ok()) << status[1];
    EXPECT_GT(transports[1]->bytes_sent(), 0);
    const auto gang = testing::OutputFiles(o.out_dir);
    ASSERT_EQ(gang.size(), expected.size());
    for (const auto& [name, bytes] : expected) {
      EXPECT_TRUE(gang.count(name) && gang.at(name) == bytes) << name;
    }
  }
  // Full-precision routing runs, is recorded, and picks its own tokens.
  Recipe fp = Gptq4();
  fp.moe->routing = MoeRouting::kFullPrecision;
  auto job = RunQuantizeJob(Options(SynthArch::kQwen3Moe, fp, tmp + "/fp"));
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->report["moe"]["routing"].get<std::string>(), "full_precision");
  std::error_code ec;
  fs::remove_all(tmp, ec);
}

TEST_F(MoeQuantizeTest, RecipesThePhaseDoesNotDoAreRefusedNamingTheKey) {
  auto config = LoadModelConfig(Dir(SynthArch::kMixtral));
  ASSERT_TRUE(config.ok());
  const std::pair<const char*, const char*> cases[] = {
      {"smoothing: {method: smoothquant}\n", "\"smoothing.method\""},
      {"error_reconstruction: {rank: 8}\n", "\"error_reconstruction\""},
      {"hessian: output_adaptive\n", "\"hessian\""},
      {"retrain: {epochs: {output: 1}}\n", "\"retrain\""},
      {"gptq: {true_sequential: false}\n", "\"gptq.true_sequential\""},
  };
  for (const auto& [extra, key] : cases) {
    auto r = ParseRecipeYaml(std::string("method: gptq\nweights: {bits: 4}\n") + extra, "r.yaml");
    ASSERT_TRUE(r.ok()) << r.status();
    const absl::Status s = r->ResolveForModel(*config);
    EXPECT_TRUE(absl::IsInvalidArgument(s));
    EXPECT_THAT(std::string(s.message()), HasSubstr(key));
    EXPECT_THAT(std::string(s.message()), HasSubstr("mixtral"));
  }
  // Bad moe keys.
  for (const auto& [text, key] :
       std::vector<std::pair<std::string, std::string>>{{"moe: {min_tokens: 0}", "moe.min_tokens"},
                                                        {"moe: {routing: fp}", "moe.routing"},
                                                        {"moe: {top_k: 2}", "moe.top_k"}}) {
    auto r = ParseRecipeYaml("method: gptq\nweights: {bits: 4}\n" + text + "\n", "r.yaml");
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(key));
  }
  // A moe section on a dense model; the section is filled in for an MoE model only.
  auto with_moe = ParseRecipeYaml("method: gptq\nweights: {bits: 4}\nmoe: {min_tokens: 8}\n", "r");
  ASSERT_TRUE(with_moe.ok());
  ModelConfig dense = *config;
  dense.num_experts = 0;
  EXPECT_THAT(std::string(with_moe->ResolveForModel(dense).message()),
              HasSubstr("recipe key \"moe\" is for mixture-of-experts models"));
  Recipe plain = Gptq4();
  plain.moe.reset();
  const std::string dense_sha = plain.Sha256();
  EXPECT_TRUE(plain.ResolveForModel(dense).ok());
  EXPECT_EQ(plain.Sha256(), dense_sha);
  EXPECT_TRUE(plain.ResolveForModel(*config).ok());
  ASSERT_TRUE(plain.moe.has_value());
  EXPECT_EQ(plain.moe->min_tokens, 128);
  EXPECT_NE(plain.Sha256(), dense_sha);
}

}  // namespace
}  // namespace qcal::engine
