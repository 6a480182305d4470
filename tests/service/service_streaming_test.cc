// A shard damaged while a job streams the model (DESIGN sections 2 and 7): the worker reads block
// b's tensors only when it reaches block b, so a shard truncated or deleted after the job started
// is found by that read. The job FAILS with an error naming the file, nothing appears under the
// output root, and the same coordinator and worker go on to run the next job.
//
// The worker is frozen at an exact point (QCAL_FAULT=worker:block=1:stage=commit:stop: blocks 0
// and 1 committed, block 2 at most prefetched) while the test damages a shard that holds only
// tensors of blocks 3 and later, so the damage is found by a read that happens after it.
#include <signal.h>

#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/service/service_harness.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int kBlocks = 6;
// The block whose tensors' shard is damaged, and the fault point the worker stops at.
constexpr int kDamagedBlock = 3;
constexpr char kStopFault[] = "worker:block=1:stage=commit:stop";

// The synthetic tiny model with 6 blocks in bf16, in shards of at most 400,000 bytes (about one
// block each, block boundaries falling inside shards), written once per test process.
const std::string& ShardedModel() {
  static const std::string* dir = [] {
    const std::string out = MakeTempDir("qcal-synth-sharded") + "/model";
    engine::SynthOptions o;
    o.out_dir = out;
    o.layers = kBlocks;
    o.dtype = DType::kBF16;
    o.shard_bytes = 400'000;
    o.sha256 = false;
    absl::StatusOr<engine::SynthResult> r = engine::WriteSyntheticCheckpoint(o);
    EXPECT_TRUE(r.ok()) << r.status();
    return new std::string(out);
  }();
  return *dir;
}

// The block of a tensor name "model.layers.N....", or -1 for tensors outside the blocks.
int BlockOf(const std::string& tensor) {
  std::vector<std::string> parts = absl::StrSplit(tensor, '.');
  int block = -1;
  if (parts.size() > 2 && parts[0] == "model" && parts[1] == "layers" &&
      absl::SimpleAtoi(parts[2], &block)) {
    return block;
  }
  return -1;
}

// /proc/PID/stat's state letter ('T': stopped), or '?' when it cannot be read.
char ProcessState(pid_t pid) {
  absl::StatusOr<std::string> stat = ReadFileToString(absl::StrCat("/proc/", pid, "/stat"));
  if (!stat.ok()) return '?';
  // "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'.
  const size_t paren = stat->rfind(')');
  return paren != std::string::npos && paren + 2 < stat->size() ? (*stat)[paren + 2] : '?';
}

enum class Damage { kTruncate, kDelete };

class ServiceStreamingTest : public ::testing::TestWithParam<Damage> {};

TEST_P(ServiceStreamingTest, ShardDamagedWhileRunningFailsTheJobAndTheServiceGoesOn) {
  const Damage damage = GetParam();
  Cluster c(damage == Damage::kTruncate ? "streaming-truncate" : "streaming-delete");
  // Two copies under the input root: one to damage, one to run intact afterwards.
  for (const char* name : {"damaged", "intact"}) {
    fs::copy(ShardedModel(), c.input_root() + "/" + name, fs::copy_options::recursive);
  }
  const std::string model_dir = c.input_root() + "/damaged";
  absl::StatusOr<std::string> index_text =
      ReadFileToString(model_dir + "/model.safetensors.index.json");
  ASSERT_TRUE(index_text.ok()) << index_text.status();
  const nlohmann::json weight_map = nlohmann::json::parse(*index_text).at("weight_map");
  const std::string shard =
      weight_map.at(absl::StrCat("model.layers.", kDamagedBlock, ".self_attn.q_proj.weight"))
          .get<std::string>();
  std::set<std::string> shards;
  for (const auto& [tensor, file] : weight_map.items()) {
    shards.insert(file.get<std::string>());
    // Every tensor of the shard is read after the stop point: the damage cannot go unread.
    if (file.get<std::string>() == shard) {
      ASSERT_GE(BlockOf(tensor), kDamagedBlock) << tensor << " is in " << shard;
    }
  }
  ASSERT_GT(shards.size(), 2u) << "the model should be sharded";

  c.StartCoordinator();
  Process* worker = c.StartWorker({}, {{"QCAL_FAULT", kStopFault}});
  auto spec_for = [&](const std::string& model, const std::string& output_name) {
    v1::JobSpec spec = c.Spec(output_name);
    spec.set_model(model);
    spec.set_calib(model + "/calib.txt");
    spec.set_eval_text(model + "/eval.txt");
    v1::SubmitJobRequest request;
    *request.mutable_spec() = spec;
    return request;
  };
  auto submitted = c.Client()->Submit(spec_for("damaged", "damaged-out"));
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  const std::string job_id = submitted->job().job_id();

  // Wait for the worker to stop itself at the fault point.
  const absl::Time end = absl::Now() + absl::Seconds(120);
  while (ProcessState(worker->pid()) != 'T') {
    ASSERT_TRUE(worker->running()) << "the worker ended before the fault point\n" << c.Logs();
    ASSERT_LT(absl::Now(), end) << "the worker did not reach " << kStopFault << "\n" << c.Logs();
    absl::SleepFor(absl::Milliseconds(5));
  }
  // Blocks 0 and 1 are committed; the job is mid-run.
  auto running = c.Client()->Get(job_id);
  ASSERT_TRUE(running.ok()) << running.status();
  EXPECT_EQ(running->state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(running->blocks_done(), 2);
  EXPECT_EQ(running->num_blocks(), kBlocks);
  // Heartbeats sent while the job ran carried the memory its backend held (at least the
  // calibration activations; before the worker filled it, the gauge was always 0).
  EXPECT_GT(Metric(c, "qcal_device_memory_bytes"), 0);

  const std::string shard_path = model_dir + "/" + shard;
  if (damage == Damage::kTruncate) {
    fs::resize_file(shard_path, fs::file_size(shard_path) / 2);
  } else {
    ASSERT_TRUE(fs::remove(shard_path));
  }
  worker->Signal(SIGCONT);

  auto failed = c.WaitFinal(job_id, absl::Seconds(120));
  ASSERT_TRUE(failed.ok()) << failed.status() << "\n" << c.Logs();
  EXPECT_EQ(failed->state(), v1::JOB_STATE_FAILED) << failed->error();
  EXPECT_THAT(failed->error(), HasSubstr("damaged/" + shard));
  EXPECT_THAT(failed->error(), HasSubstr("the file changed while it was being read"));
  EXPECT_THAT(failed->error(), HasSubstr(damage == Damage::kTruncate ? "its size went from"
                                                                     : "can no longer be found"));
  // It failed in the run, at the block that needed the file, not at a start-up check nor later.
  EXPECT_GE(failed->blocks_done(), 2);
  EXPECT_LE(failed->blocks_done(), kDamagedBlock);
  EXPECT_EQ(failed->attempts(), 1);
  // Nothing under the output root: no output directory, no temporary one.
  std::vector<std::string> outputs;
  for (const auto& e : fs::directory_iterator(c.output_root())) {
    outputs.push_back(e.path().filename().string());
  }
  EXPECT_THAT(outputs, ::testing::IsEmpty());

  // The service keeps serving: the same coordinator and worker run a job on the intact copy.
  ASSERT_TRUE(c.coordinator()->running());
  ASSERT_TRUE(worker->running()) << worker->LogTail();
  auto next = c.Client()->Submit(spec_for("intact", "intact-out"));
  ASSERT_TRUE(next.ok()) << next.status();
  auto succeeded = c.WaitFinal(next->job().job_id(), absl::Seconds(120));
  ASSERT_TRUE(succeeded.ok()) << succeeded.status() << "\n" << c.Logs();
  EXPECT_EQ(succeeded->state(), v1::JOB_STATE_SUCCEEDED) << succeeded->error() << "\n" << c.Logs();
  EXPECT_EQ(succeeded->blocks_done(), kBlocks);
  EXPECT_TRUE(fs::exists(c.output_root() + "/intact-out/config.json"));
  EXPECT_TRUE(fs::exists(c.output_root() + "/intact-out/qcal_report.json"));
  EXPECT_FALSE(fs::exists(c.output_root() + "/damaged-out"));
  EXPECT_TRUE(worker->running());
}

INSTANTIATE_TEST_SUITE_P(Damages, ServiceStreamingTest,
                         ::testing::Values(Damage::kTruncate, Damage::kDelete),
                         [](const ::testing::TestParamInfo<Damage>& info) {
                           return info.param == Damage::kTruncate ? "TruncatedShard"
                                                                  : "DeletedShard";
                         });

}  // namespace
}  // namespace qcal::testing
