// The engine's gang over the real peer service: three ranks as threads of one process, each with
// its own PeerServer on loopback and GrpcTransport, run a whole job. The bytes each transport
// counted equal ExchangeBytesPerBlock (the plan's formula) summed over the blocks, and the export
// is byte-identical to the engine run directly (qcal_run.json aside).
#include <array>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/hf_config.h"
#include "gtest/gtest.h"
#include "services/engine/gang/exchange.h"
#include "services/engine/pipeline.h"
#include "services/worker/peer/grpc_transport.h"
#include "services/worker/peer/peer_server.h"
#include "tests/service/service_harness.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {
namespace fs = std::filesystem;

constexpr int kWorld = 3;

engine::JobOptions Job(const Cluster& c, const std::string& out) {
  engine::JobOptions j;
  const std::string in = c.input_root() + "/";
  j.model_dir = in + c.model().model;
  j.calib_path = in + c.model().calib;
  j.samples = 36;  // five chunks: 1, 2, 2 over three ranks
  j.seq_len = 32;
  j.seed = 5;
  j.threads = 1;
  j.recipe.method = engine::QuantMethod::kGptq;
  j.recipe.weights.bits = 4;
  j.recipe.weights.group_size = 32;
  j.recipe.activations.bits = 8;
  j.recipe.smoothing.method = engine::SmoothingMethod::kAser;
  j.recipe.smoothing.outlier_channels = 4;
  j.recipe.error_reconstruction.enabled = true;
  j.recipe.error_reconstruction.rank = 16;
  j.out_dir = out;
  return j;
}

TEST(GangGrpcTest, BytesCountedAtTheTransportEqualThePlansFormula) {
  Cluster cluster("gang_grpc");
  const std::string dir = MakeTempDir("qcal-gang-grpc");
  const engine::JobOptions job = Job(cluster, dir + "/gang");
  absl::StatusOr<ModelConfig> config = LoadModelConfig(job.model_dir);
  ASSERT_TRUE(config.ok()) << config.status();

  std::vector<engine::GangPlan> plans;
  std::vector<std::unique_ptr<worker::PeerServer>> servers;
  std::vector<std::string> addresses;
  for (int r = 0; r < kWorld; ++r) {
    plans.push_back(engine::MakeGangPlan(*config, job.samples, kWorld, r, /*epoch=*/3));
    absl::StatusOr<std::unique_ptr<worker::PeerServer>> s = worker::PeerServer::Start({});
    ASSERT_TRUE(s.ok()) << s.status();
    servers.push_back(*std::move(s));
    addresses.push_back(servers.back()->address());
  }
  std::vector<std::unique_ptr<worker::GrpcTransport>> transports;
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_TRUE(servers[r]->SetTask("job-grpc", plans[r]).ok());
    auto t = worker::GrpcTransport::Create("job-grpc", plans[r], addresses, servers[r].get(), {});
    ASSERT_TRUE(t.ok()) << t.status();
    transports.push_back(*std::move(t));
  }
  // Rank 0's serialized layers per block, for the formula.
  std::vector<std::array<int64_t, engine::kNumLinears>> layer_bytes;
  std::vector<absl::Status> status(kWorld);
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r]() {
      auto run = [&]() -> absl::Status {
        QCAL_ASSIGN_OR_RETURN(auto session, engine::JobSession::Open(job, nullptr, plans[r]));
        while (session->next_block() < session->num_blocks()) {
          QCAL_ASSIGN_OR_RETURN(engine::BlockArtifactsPtr block,
                                session->RunNextBlock(transports[r].get()));
          if (r != 0) continue;
          std::array<int64_t, engine::kNumLinears> sizes{};
          for (size_t k = 0; k < sizes.size(); ++k) {
            sizes[k] = static_cast<int64_t>(engine::SerializeSolvedLayer((*block)[k]).size());
          }
          layer_bytes.push_back(sizes);
        }
        if (r != 0) return absl::OkStatus();
        fs::create_directories(job.out_dir);
        return session->Finish(job.out_dir).status();
      };
      status[r] = run();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kWorld; ++r) ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];

  std::vector<int64_t> expected(kWorld, 0);
  for (const auto& sizes : layer_bytes) {
    const std::vector<int64_t> per_rank =
        engine::ExchangeBytesPerBlock(plans[0], *config, job.recipe, sizes);
    for (int r = 0; r < kWorld; ++r) expected[r] += per_rank[r];
  }
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_GT(expected[r], 0) << "rank " << r;
    EXPECT_EQ(transports[r]->bytes_sent(), expected[r]) << "rank " << r;
  }
  engine::JobOptions direct = Job(cluster, dir + "/direct");
  absl::StatusOr<engine::JobResult> d = engine::RunQuantizeJob(direct);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(CompareOutputs(dir + "/direct", dir + "/gang"), "");
}

}  // namespace
}  // namespace qcal::testing
