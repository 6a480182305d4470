// Whole jobs on a gang of W = 1..4 ranks, as threads of one process (each with its own backend,
// model and JobSession, connected by LocalTransport): every exported file (qcal_run.json aside)
// is byte-identical to the plain local run (RunQuantizeJob, no transport), every rank ends each
// block with the same seven artifacts, and each rank's transport counted exactly the bytes
// ExchangeBytesPerBlock predicts. Recipes: GPTQ 4-bit; ASER (smoothing, error reconstruction
// rank 16, 8-bit activations); and a two-pass GPTQ with LQER's diagonal whitening (the
// full-precision statistics pass and the |x| statistics inside InputStatistics). On the CPU
// backend, and on CUDA too when a GPU is present (owners install their device-dequantized
// weights, the other ranks the artifact's: the same bits).
//
// 36 samples make C = 5 chunks (the last of 4 samples): W = 4 splits them 1, 1, 1, 2.
#include <array>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/files.h"
#include "common/hf_config.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/gang/exchange.h"
#include "services/engine/gang/local_transport.h"
#include "services/engine/pipeline.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {
namespace fs = std::filesystem;

constexpr int kSamples = 36;

JobOptions Options(const Recipe& recipe, const std::string& device, const std::string& out_dir) {
  JobOptions o;
  o.device = device;
  o.model_dir = testing::SharedDir() + "/models/stories260k";
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

struct GangRun {
  // Per rank, per block: the seven artifacts and reports as they travel.
  std::vector<std::vector<std::vector<std::string>>> layers;
  std::vector<int64_t> bytes_sent;
  std::vector<int64_t> bytes_expected;
};

// One rank's whole job; rank 0 finishes into out_dir.
absl::Status RunRank(const JobOptions& o, const GangPlan& plan, Transport* transport,
                     const std::string& out_dir, std::vector<std::vector<std::string>>& layers) {
  QCAL_ASSIGN_OR_RETURN(auto session, JobSession::Open(o, nullptr, plan));
  if (session->activations().first_chunk != plan.local().begin ||
      static_cast<int>(session->activations().chunks.size()) != plan.local().size()) {
    return absl::InternalError("the session did not embed its own chunks");
  }
  GangBlockOptions gopt;
  gopt.receive_timeout = absl::Seconds(120);
  while (session->next_block() < session->num_blocks()) {
    QCAL_ASSIGN_OR_RETURN(BlockArtifactsPtr block, session->RunNextBlock(transport, gopt));
    std::vector<std::string> bytes;
    for (const LayerResult& r : *block) bytes.push_back(SerializeSolvedLayer(r));
    layers.push_back(std::move(bytes));
  }
  if (plan.rank != 0) {
    if (session->Finish(out_dir).status().code() != absl::StatusCode::kFailedPrecondition) {
      return absl::InternalError("a rank other than 0 was allowed to finish");
    }
    return absl::OkStatus();
  }
  fs::create_directories(out_dir);
  return session->Finish(out_dir).status();
}

GangRun RunGang(const JobOptions& o, int world, const std::string& out_dir) {
  auto config = LoadModelConfig(o.model_dir);
  EXPECT_TRUE(config.ok()) << config.status();
  std::vector<GangPlan> plans;
  for (int r = 0; r < world; ++r) plans.push_back(MakeGangPlan(*config, o.samples, world, r, 7));
  auto transports = LocalTransport::Connect(plans[0]);
  GangRun run;
  run.layers.resize(static_cast<size_t>(world));
  std::vector<absl::Status> status(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      const size_t i = static_cast<size_t>(r);
      status[i] = RunRank(o, plans[i], transports[i].get(), out_dir, run.layers[i]);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < world; ++r) {
    EXPECT_TRUE(status[static_cast<size_t>(r)].ok()) << "rank " << r << ": " << status[r];
    run.bytes_sent.push_back(transports[static_cast<size_t>(r)]->bytes_sent());
  }
  run.bytes_expected.assign(static_cast<size_t>(world), 0);
  for (const auto& block : run.layers[0]) {
    std::array<int64_t, kNumLinears> layer_bytes{};
    for (size_t k = 0; k < block.size() && k < layer_bytes.size(); ++k) {
      layer_bytes[k] = static_cast<int64_t>(block[k].size());
    }
    const std::vector<int64_t> per_rank =
        ExchangeBytesPerBlock(plans[0], *config, o.recipe, layer_bytes);
    for (int r = 0; r < world; ++r) run.bytes_expected[r] += per_rank[static_cast<size_t>(r)];
  }
  return run;
}

Recipe Gptq4() {
  Recipe r;
  r.method = QuantMethod::kGptq;
  r.weights.bits = 4;
  r.weights.group_size = 32;
  return r;
}

Recipe Aser() {
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

Recipe DiagonalTwoPass() {
  Recipe r;
  r.method = QuantMethod::kGptq;
  r.weights.bits = 3;
  r.weights.group_size = 32;
  r.gptq.true_sequential = false;
  r.error_reconstruction.enabled = true;
  r.error_reconstruction.rank = 8;
  r.error_reconstruction.whitening = Whitening::kDiagonal;
  return r;
}

Recipe RecipeNamed(const std::string& name) {
  if (name == "aser") return Aser();
  if (name == "diagonal_two_pass") return DiagonalTwoPass();
  return Gptq4();
}

void CheckEveryGangSize(const Recipe& recipe, const std::string& device);

class GangPipelineTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GangPipelineTest, EveryGangSizeExportsTheSameBytes) {
  QCAL_REQUIRE_SHARED();
  const Recipe recipe = RecipeNamed(GetParam());
  std::vector<std::string> devices = {"cpu"};
  if (kernels::CudaAvailable()) devices.push_back("cuda");
  for (const std::string& device : devices) {
    SCOPED_TRACE(device);
    CheckEveryGangSize(recipe, device);
  }
}

void CheckEveryGangSize(const Recipe& recipe, const std::string& device) {
  const std::string tmp = testing::MakeTempDir("gang_pipeline");
  const std::string direct = tmp + "/direct";
  auto plain = RunQuantizeJob(Options(recipe, device, direct));
  ASSERT_TRUE(plain.ok()) << plain.status();
  const std::map<std::string, std::string> expected = OutputFiles(direct);
  ASSERT_TRUE(expected.count("qcal_report.json"));
  ASSERT_GE(expected.size(), 3u);
  for (int world = 1; world <= 4; ++world) {
    SCOPED_TRACE(world);
    const std::string out = tmp + "/w" + std::to_string(world);
    const GangRun run = RunGang(Options(recipe, device, out), world, out);
    const std::map<std::string, std::string> got = OutputFiles(out);
    ASSERT_EQ(got.size(), expected.size());
    for (const auto& [name, bytes] : expected) {
      ASSERT_TRUE(got.count(name)) << name;
      EXPECT_TRUE(got.at(name) == bytes) << name << " differs from the direct run";
    }
    // Every rank holds every block's seven linears, the same bytes as rank 0.
    for (int r = 1; r < world; ++r) EXPECT_TRUE(run.layers[r] == run.layers[0]) << "rank " << r;
    EXPECT_EQ(run.bytes_sent, run.bytes_expected);
    if (world > 1) {
      EXPECT_GT(run.bytes_sent[0] + run.bytes_sent[1], 0);
    }
  }
  std::error_code ec;
  fs::remove_all(tmp, ec);
}

INSTANTIATE_TEST_SUITE_P(Recipes, GangPipelineTest,
                         ::testing::Values("gptq4", "aser", "diagonal_two_pass"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace qcal::engine
