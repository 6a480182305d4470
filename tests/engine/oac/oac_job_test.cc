// Output-adaptive calibration as a job (services/engine/oac/oac_job.h, JobSession's gradient
// pass, BlockRunner with an OacSource), on stories260k and the CPU backend:
//   - the solve uses each linear's own Hessian: H = I without damping gives exactly RTN's codes
//     (DESIGN section 3's known answer), linear by linear; smoothing transforms H and F as
//     H' = diag(m)⁻¹·H·diag(m)⁻¹ and F' = F·diag(m)⁻²;
//   - a job with hessian output_adaptive (and _token) gives byte-identical outputs twice, and
//     different model bytes from hessian layer;
//   - W = 1 and gangs of 2, 3 and 4 ranks (threads over LocalTransport) export the same bytes, with
//     GPTQ and with ASER (smoothing, extracted columns, error reconstruction), and each rank's
//     files are exactly the linears it owns;
//   - a job restored from the pass's files gives the output of the job that ran the pass, and a
//     file whose sha256 does not match fails the job naming it;
//   - the refusals name recipe key "hessian": seq_len < 2, scratch space too small, a block
//     before the pass;
//   - the bench runs the pass on a tiny shape and GPTQ alone beside it;
//   - the output-adaptive partials round-trip their wire format and go only to the linear's owner.
#include "services/engine/oac/oac_job.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/files.h"
#include "common/hf_config.h"
#include "common/status.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/bench.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/gang/exchange.h"
#include "services/engine/gang/local_transport.h"
#include "services/engine/pipeline.h"
#include "services/engine/quantize.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {
namespace fs = std::filesystem;

// 20 samples make C = 3 chunks (8, 8, 4): W = 2 splits them 1 + 2, W = 3 one each.
constexpr int kSamples = 20;

std::string ModelDir() { return testing::SharedDir() + "/models/stories260k"; }

Recipe Oac(HessianKind kind) {
  Recipe r;
  r.method = QuantMethod::kGptq;
  r.weights.bits = 3;
  r.weights.group_size = 32;
  r.hessian = kind;
  return r;
}

JobOptions Options(const Recipe& recipe, const std::string& out_dir) {
  JobOptions o;
  o.model_dir = ModelDir();
  o.calib_path = testing::SharedDir() + "/data/tinystories-calib.txt";
  o.eval_text = testing::SharedDir() + "/data/tinystories-eval.txt";
  o.eval_max_windows = 2;
  o.samples = kSamples;
  o.seq_len = 32;
  o.threads = 1;
  o.recipe = recipe;
  o.out_dir = out_dir;
  o.overwrite = true;
  return o;
}

using testing::OutputFiles;

void ExpectSameFiles(const std::map<std::string, std::string>& got,
                     const std::map<std::string, std::string>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, bytes] : want) {
    ASSERT_TRUE(got.count(name)) << name;
    EXPECT_TRUE(got.at(name) == bytes) << name << " differs";
  }
}

// ---- The solve.

TEST(SmoothLinearOacTest, DividesRowsAndColumnsOfHAndColumnsOfF) {
  const int64_t n = 5, d_out = 3;
  std::vector<float> h(n * n), f(d_out * n);
  for (int64_t i = 0; i < n * n; ++i) h[i] = 0.37f * static_cast<float>(i % 11) - 1.1f;
  for (int64_t i = 0; i < d_out * n; ++i) f[i] = 0.5f + 0.25f * static_cast<float>(i);
  const std::vector<float> m = {1.0f, 0.5f, 3.0f, 0.7f, 2.5f};
  LinearOac oac;
  oac.hessian = Tensor::FromVector(h, {n, n});
  oac.fisher = Tensor::FromVector(f, {d_out, n});
  ASSERT_TRUE(SmoothLinearOac(m, oac).ok());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      EXPECT_EQ(oac.hessian.data<float>()[i * n + j], h[i * n + j] / m[i] / m[j]) << i << "," << j;
    }
  }
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j = 0; j < n; ++j) {
      EXPECT_EQ(oac.fisher.data<float>()[o * n + j], f[o * n + j] / m[j] / m[j]);
    }
  }
  std::vector<float> bad = m;
  bad[2] = 0;
  EXPECT_EQ(SmoothLinearOac(bad, oac).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SmoothLinearOac({1.0f, 2.0f}, oac).code(), absl::StatusCode::kInvalidArgument);
}

struct Calibration {
  std::unique_ptr<kernels::Backend> backend;
  std::vector<std::vector<int>> samples;
};

Calibration LoadCalibration(int samples, int seq_len) {
  Calibration c;
  kernels::BackendOptions bo;
  bo.threads = 1;
  auto be = kernels::CreateBackend(bo);
  EXPECT_TRUE(be.ok()) << be.status();
  c.backend = *std::move(be);
  auto tok = Tokenizer::Load(ModelDir());
  EXPECT_TRUE(tok.ok()) << tok.status();
  auto text = LoadCorpusText(testing::SharedDir() + "/data/tinystories-calib.txt");
  EXPECT_TRUE(text.ok()) << text.status();
  auto tokens = (*tok)->Encode(*text);
  EXPECT_TRUE(tokens.ok()) << tokens.status();
  auto s = SampleCalibration(*tokens, samples, seq_len, 0, 1, "calib");
  EXPECT_TRUE(s.ok()) << s.status();
  c.samples = *std::move(s);
  return c;
}

// H = I and no damping: GPTQ is RTN (DESIGN section 3), so every linear solved with its own
// identity Hessian must reproduce RTN's codes exactly, though the layer Gram is far from I.
TEST(OacSolveTest, IdentityHessianGivesRtnCodesPerLinear) {
  QCAL_REQUIRE_SHARED();
  Calibration cal = LoadCalibration(12, 32);
  auto model = Model::Load(ModelDir(), cal.backend.get());
  ASSERT_TRUE(model.ok()) << model.status();
  auto acts = EmbedCalibration(**model, cal.samples);
  ASSERT_TRUE(acts.ok()) << acts.status();
  Recipe recipe = Oac(HessianKind::kOutputAdaptive);
  recipe.gptq.damp = 0;
  std::vector<std::pair<int, LinearKind>> asked;
  const ModelConfig& cfg = (*model)->config();
  OacSource identity = [&](int b, LinearKind k) -> absl::StatusOr<LinearOac> {
    asked.push_back({b, k});
    const int64_t n = LinearShape(cfg, k).second;
    LinearOac oac;
    oac.hessian = Tensor::Zeros(DType::kF32, {n, n});
    for (int64_t i = 0; i < n; ++i) oac.hessian.data<float>()[i * n + i] = 1.0f;
    return oac;
  };
  StageTimes times;
  auto block = QuantizeBlock(**model, *acts, recipe, &times, identity);
  ASSERT_TRUE(block.ok()) << block.status();
  ASSERT_EQ(block->size(), 7u);
  ASSERT_EQ(asked.size(), 7u);
  for (size_t i = 0; i < asked.size(); ++i) {
    EXPECT_EQ(asked[i].first, 0);
    EXPECT_EQ(asked[i].second, kAllLinears[i]);
  }
  for (const LayerResult& r : *block) {
    SCOPED_TRACE(r.report.name);
    // The report's errors are measured with the layer Gram: RTN's error, exactly.
    EXPECT_EQ(r.report.rel_error, r.report.rel_error_rtn);
    EXPECT_GT(r.report.rel_error, 0);
  }
  // Without a source the block refuses, naming the key.
  auto again = QuantizeBlock(**model, *acts, recipe, &times);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(again.status().message().find("\"hessian\""), std::string::npos) << again.status();
}

// ---- Whole jobs.

class OacJobTest : public ::testing::TestWithParam<HessianKind> {};

TEST_P(OacJobTest, TwoRunsAreByteIdenticalAndDifferFromLayer) {
  QCAL_REQUIRE_SHARED();
  const std::string tmp = testing::MakeTempDir("oac_job");
  auto a = RunQuantizeJob(Options(Oac(GetParam()), tmp + "/a"));
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = RunQuantizeJob(Options(Oac(GetParam()), tmp + "/b"));
  ASSERT_TRUE(b.ok()) << b.status();
  const auto files = OutputFiles(tmp + "/a");
  ExpectSameFiles(OutputFiles(tmp + "/b"), files);
  EXPECT_EQ(a->report["recipe"]["hessian"], RecipeName(GetParam()));
  EXPECT_TRUE(std::isfinite(a->perplexity));

  auto run = ReadFileToString(tmp + "/a/qcal_run.json");
  ASSERT_TRUE(run.ok()) << run.status();
  const nlohmann::json j = nlohmann::json::parse(*run);
  ASSERT_TRUE(j.contains("gradient_pass")) << *run;
  EXPECT_EQ(j["gradient_pass"]["tokens"].get<int64_t>(), int64_t{kSamples} * (32 - 1));
  EXPECT_GT(j["gradient_pass"]["loss"].get<double>(), 0);
  auto config = LoadModelConfig(ModelDir());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(j["gradient_pass"]["files"].get<int>(), kNumLinears * config->num_layers);
  EXPECT_GT(j["gradient_pass"]["seconds"].get<double>(), 0);

  auto layer = RunQuantizeJob(Options(Oac(HessianKind::kLayer), tmp + "/layer"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  const auto layer_files = OutputFiles(tmp + "/layer");
  ASSERT_TRUE(layer_files.count("model.safetensors"));
  EXPECT_FALSE(layer_files.at("model.safetensors") == files.at("model.safetensors"))
      << "the output-adaptive Hessians changed no code";
  fs::remove_all(tmp);
}

INSTANTIATE_TEST_SUITE_P(Kinds, OacJobTest,
                         ::testing::Values(HessianKind::kOutputAdaptive,
                                           HessianKind::kOutputAdaptiveToken),
                         [](const auto& info) { return std::string(RecipeName(info.param)); });

// One rank's whole job: the pass (its files checked against the plan), the blocks, and for rank
// 0 the export into out_dir.
absl::Status RunRank(const JobOptions& o, const GangPlan& plan, Transport* transport,
                     const std::string& out_dir) {
  QCAL_ASSIGN_OR_RETURN(auto session, JobSession::Open(o, nullptr, plan));
  GangBlockOptions gopt;
  gopt.receive_timeout = absl::Seconds(120);
  if (!session->NeedsGradientPass()) return absl::InternalError("no gradient pass needed");
  QCAL_ASSIGN_OR_RETURN(std::vector<OacFile> files, session->RunGradientPass(transport, gopt));
  if (session->NeedsGradientPass()) return absl::InternalError("the pass did not take");
  std::map<std::pair<int, LinearKind>, int> seen;
  for (const OacFile& f : files) {
    if (!plan.Owns(f.kind) || f.sha256.size() != 64 || f.bytes <= 0 || !fs::exists(f.path)) {
      return absl::InternalError(absl::StrCat("rank ", plan.rank, " completed ", f.path));
    }
    ++seen[{f.block, f.kind}];
  }
  int owned = 0;
  for (LinearKind k : kAllLinears) owned += plan.Owns(k) ? 1 : 0;
  if (static_cast<int>(seen.size()) != owned * session->num_blocks() ||
      files.size() != seen.size()) {
    return absl::InternalError(absl::StrCat("rank ", plan.rank, " completed ", files.size(),
                                            " files for ", owned, " owned linears"));
  }
  while (session->next_block() < session->num_blocks()) {
    QCAL_RETURN_IF_ERROR(session->RunNextBlock(transport, gopt).status());
  }
  if (plan.rank != 0) return absl::OkStatus();
  fs::create_directories(out_dir);
  return session->Finish(out_dir).status();
}

void RunGang(const JobOptions& o, int world, const std::string& out_dir) {
  auto config = LoadModelConfig(o.model_dir);
  ASSERT_TRUE(config.ok()) << config.status();
  std::vector<GangPlan> plans;
  for (int r = 0; r < world; ++r) plans.push_back(MakeGangPlan(*config, o.samples, world, r, 3));
  auto transports = LocalTransport::Connect(plans[0]);
  std::vector<absl::Status> status(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      const size_t i = static_cast<size_t>(r);
      status[i] = RunRank(o, plans[i], transports[i].get(), out_dir);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < world; ++r) {
    EXPECT_TRUE(status[static_cast<size_t>(r)].ok()) << "rank " << r << ": " << status[r];
  }
}

// ASER with OAC: each linear's Hessian smoothed by its input's scales, the extracted columns dead
// in it, error reconstruction whitened by the layer Gram.
Recipe OacAser() {
  Recipe r = Oac(HessianKind::kOutputAdaptive);
  r.weights.bits = 4;
  r.weights.group_size = -1;
  r.smoothing.method = SmoothingMethod::kAser;
  r.smoothing.outlier_channels = 8;
  r.error_reconstruction.enabled = true;
  r.error_reconstruction.rank = 16;
  return r;
}

class OacGangTest : public ::testing::TestWithParam<bool> {};

// W = 4 > C = 3: rank 3 holds no chunk, sends empty covers and still owns a linear.
TEST_P(OacGangTest, GangsOfTwoThreeAndFourExportTheBytesOfOneWorker) {
  QCAL_REQUIRE_SHARED();
  const std::string tmp = testing::MakeTempDir("oac_gang");
  const Recipe recipe = GetParam() ? OacAser() : Oac(HessianKind::kOutputAdaptive);
  auto direct = RunQuantizeJob(Options(recipe, tmp + "/direct"));
  ASSERT_TRUE(direct.ok()) << direct.status();
  const auto expected = OutputFiles(tmp + "/direct");
  for (int world : {1, 2, 3, 4}) {
    SCOPED_TRACE(world);
    const std::string out = tmp + "/w" + std::to_string(world);
    RunGang(Options(recipe, out), world, out);
    ExpectSameFiles(OutputFiles(out), expected);
  }
  fs::remove_all(tmp);
}

INSTANTIATE_TEST_SUITE_P(Recipes, OacGangTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "aser" : "gptq"; });

// ---- Resume.

TEST(OacRestoreTest, RestoredFilesGiveTheOutputOfThePass) {
  QCAL_REQUIRE_SHARED();
  const std::string tmp = testing::MakeTempDir("oac_restore");
  const JobOptions o = Options(Oac(HessianKind::kOutputAdaptive), tmp + "/unused");
  std::vector<OacFile> kept;
  {
    auto session = JobSession::Open(o);
    ASSERT_TRUE(session.ok()) << session.status();
    auto files = (*session)->RunGradientPass();
    ASSERT_TRUE(files.ok()) << files.status();
    // The scratch directory goes with the session: keep copies, as a job's store would.
    fs::create_directories(tmp + "/kept");
    for (OacFile f : *files) {
      const std::string copy = tmp + "/kept/" + fs::path(f.path).filename().string();
      fs::copy_file(f.path, copy);
      f.path = copy;
      kept.push_back(f);
    }
    while ((*session)->next_block() < (*session)->num_blocks()) {
      ASSERT_TRUE((*session)->RunNextBlock().ok());
    }
    fs::create_directories(tmp + "/ran");
    ASSERT_TRUE((*session)->Finish(tmp + "/ran").ok());
  }
  {
    auto session = JobSession::Open(o);
    ASSERT_TRUE(session.ok()) << session.status();
    ASSERT_TRUE((*session)->NeedsGradientPass());
    ASSERT_TRUE((*session)->RestoreGradientPass(kept).ok());
    EXPECT_FALSE((*session)->NeedsGradientPass());
    while ((*session)->next_block() < (*session)->num_blocks()) {
      auto block = (*session)->RunNextBlock();
      ASSERT_TRUE(block.ok()) << block.status();
    }
    fs::create_directories(tmp + "/restored");
    ASSERT_TRUE((*session)->Finish(tmp + "/restored").ok());
  }
  ExpectSameFiles(OutputFiles(tmp + "/restored"), OutputFiles(tmp + "/ran"));

  // A file that is not the one recorded fails the block that reads it, naming the file.
  std::vector<OacFile> tampered = kept;
  tampered[0].sha256 = std::string(64, '0');
  auto session = JobSession::Open(o);
  ASSERT_TRUE(session.ok()) << session.status();
  ASSERT_TRUE((*session)->RestoreGradientPass(tampered).ok());
  absl::Status failed = absl::OkStatus();
  while (failed.ok() && (*session)->next_block() < (*session)->num_blocks()) {
    failed = (*session)->RunNextBlock().status();
  }
  EXPECT_FALSE(failed.ok());
  EXPECT_NE(failed.message().find(fs::path(tampered[0].path).filename().string()),
            std::string::npos)
      << failed;
  fs::remove_all(tmp);
}

// ---- Refusals.

TEST(OacRefusalTest, SeqLenBelowTwoNamesHessian) {
  // Validate only: the model and texts are not read.
  JobOptions o = Options(Oac(HessianKind::kOutputAdaptiveToken), "/nonexistent");
  o.seq_len = 1;
  const absl::Status s = o.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("\"hessian\""), std::string::npos) << s;
  EXPECT_NE(s.message().find("seq_len"), std::string::npos) << s;
}

TEST(OacRefusalTest, StorageThatDoesNotFitNamesHessianAndBothNumbers) {
  const std::string dir = testing::MakeTempDir("oac_storage");
  const Recipe recipe = Oac(HessianKind::kOutputAdaptive);
  EXPECT_TRUE(CheckOacStorage(recipe, 1 << 20, dir).ok());
  const int64_t huge = int64_t{1} << 60;
  const absl::Status s = CheckOacStorage(recipe, huge, dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("\"hessian\""), std::string::npos) << s;
  EXPECT_NE(s.message().find(std::to_string(huge)), std::string::npos) << s;
  EXPECT_NE(s.message().find("free"), std::string::npos) << s;
  EXPECT_NE(s.message().find(dir), std::string::npos) << s;
  fs::remove_all(dir);
}

TEST(OacRefusalTest, ABlockBeforeThePassAndAPassWithoutPeersAreRefused) {
  QCAL_REQUIRE_SHARED();
  const std::string tmp = testing::MakeTempDir("oac_refusal");
  const JobOptions o = Options(Oac(HessianKind::kOutputAdaptive), tmp + "/out");
  auto session = JobSession::Open(o);
  ASSERT_TRUE(session.ok()) << session.status();
  auto block = (*session)->RunNextBlock();
  EXPECT_EQ(block.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(block.status().message().find("\"hessian\""), std::string::npos) << block.status();

  auto config = LoadModelConfig(o.model_dir);
  ASSERT_TRUE(config.ok());
  auto rank1 = JobSession::Open(o, nullptr, MakeGangPlan(*config, o.samples, 2, 1, 0));
  ASSERT_TRUE(rank1.ok()) << rank1.status();
  EXPECT_EQ((*rank1)->RunGradientPass().status().code(), absl::StatusCode::kFailedPrecondition);

  JobOptions layer = o;
  layer.recipe.hessian = HessianKind::kLayer;
  auto plain = JobSession::Open(layer);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE((*plain)->NeedsGradientPass());
  EXPECT_EQ((*plain)->RunGradientPass().status().code(), absl::StatusCode::kFailedPrecondition);
  fs::remove_all(tmp);
}

// ---- The bench.

// `qcal bench --recipe oac.yaml` on a tiny shape: the pass over all three blocks though two are
// quantized, its time inside the whole-job time, and GPTQ alone timed beside it.
TEST(OacBenchTest, BenchRunsThePassAndGptqAloneBesideIt) {
  kernels::BackendOptions bo;
  bo.threads = 1;
  auto be = kernels::CreateBackend(bo);
  ASSERT_TRUE(be.ok()) << be.status();
  BenchOptions options;
  options.config = BenchShapeNamed("7b")->config;
  options.config.hidden_size = 64;
  options.config.intermediate_size = 160;
  options.config.num_heads = 4;
  options.config.num_kv_heads = 2;
  options.config.head_dim = 16;
  options.config.num_layers = 3;
  options.config.vocab_size = 100;
  options.samples = 12;
  options.seq_len = 32;
  options.blocks = 2;
  options.recipe = Oac(HessianKind::kOutputAdaptiveToken);
  options.recipe.weights.group_size = 16;
  auto r = RunBench(**be, options);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->has_gradient_pass);
  EXPECT_EQ(r->gradient_pass.tokens, int64_t{12} * 31);
  EXPECT_GT(r->gradient_pass.loss, 0);
  EXPECT_GT(r->gradient_pass.seconds, 0);
  EXPECT_GT(r->model_seconds, r->gradient_pass.seconds);
  EXPECT_GT(r->layer_model_seconds, 0);
  EXPECT_EQ(r->blocks_run, 2);
  EXPECT_GT(r->mean_rel_error, 0);
  options.recipe.hessian = HessianKind::kLayer;
  auto layer = RunBench(**be, options);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_FALSE(layer->has_gradient_pass);
  EXPECT_EQ(layer->layer_model_seconds, 0);
  // GPTQ minimizes the layer error the report measures; the output-adaptive Hessian does not.
  EXPECT_NE(r->mean_rel_error, layer->mean_rel_error);
}

// ---- The exchange.

TEST(OacExchangeTest, PartialsRoundTripAndGoOnlyToTheOwner) {
  kernels::BackendOptions bo;
  bo.threads = 1;
  auto be = kernels::CreateBackend(bo);
  ASSERT_TRUE(be.ok()) << be.status();
  const int64_t d_out = 3, d_in = 4;
  TreePartials<LinearOac> partials;
  for (int node = 0; node < 2; ++node) {
    std::vector<float> h(d_in * d_in), f(d_out * d_in);
    for (int64_t i = 0; i < d_in; ++i) {
      for (int64_t j = i; j < d_in; ++j) {
        h[i * d_in + j] = h[j * d_in + i] = 0.1f * static_cast<float>(node + i * 7 + j) + 0.03f;
      }
    }
    for (size_t i = 0; i < f.size(); ++i) f[i] = 1.5f * static_cast<float>(i + node);
    partials.push_back({TreeNode{node, 1 - node}, LinearOac{Tensor::FromVector(h, {d_in, d_in}),
                                                            Tensor::FromVector(f, {d_out, d_in})}});
  }
  auto bytes = SerializeOacPartials(**be, LinearKind::kK, d_out, d_in, true, partials);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(static_cast<int64_t>(bytes->size()), OacPartialsBytes(2, d_out, d_in, true));
  auto back = ParseOacPartials(**be, LinearKind::kK, d_out, d_in, true, *bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 2u);
  for (size_t p = 0; p < 2; ++p) {
    EXPECT_EQ((*back)[p].node, partials[p].node);
    const LinearOac& a = (*back)[p].value;
    const LinearOac& b = partials[p].value;
    EXPECT_EQ(std::memcmp(a.hessian.raw(), b.hessian.raw(), b.hessian.nbytes()), 0);
    EXPECT_EQ(std::memcmp(a.fisher.raw(), b.fisher.raw(), b.fisher.nbytes()), 0);
  }
  EXPECT_EQ(ParseOacPartials(**be, LinearKind::kV, d_out, d_in, true, *bytes).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseOacPartials(**be, LinearKind::kK, d_out, d_in, true, bytes->substr(0, 40))
                .status()
                .code(),
            absl::StatusCode::kDataLoss);

  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.head_dim = 16;
  c.num_layers = 1;
  const GangPlan plan = MakeGangPlan(c, 24, 3, 0, 9);
  auto transports = LocalTransport::Connect(plan);
  const LinearKind k = LinearKind::kDown;
  const int owner = plan.OwnerOf(k);
  const int other = (owner + 1) % 3, sender = (owner + 2) % 3;
  const MessageKey key{0, kStepGradientPass, MessageKind::kOacPartials, static_cast<int>(k),
                       sender};
  EXPECT_EQ(transports[sender]->Send(other, key, "x").code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(transports[sender]->Send(owner, key, "x").ok());
  auto got = transports[owner]->Receive(key, absl::Seconds(1));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "x");
}

}  // namespace
}  // namespace qcal::engine
