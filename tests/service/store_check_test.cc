// The store consistency check (services/coordinator/store_check.h) on a real RocksDB store and
// data directory: a consistent store of one running and one finished job passes with its counts;
// each kind of damage (a changed or missing artifact file, records or files a finished job left,
// an idempotency key naming no job, counters behind, unreferenced and staging files, a done mark
// disagreeing with its layers, a stale checkpoint chunk, a record that does not parse, a record of
// an unknown job) is reported naming the key or file; and `qcal-coordinator --check-store` exits
// 0, then 1 with the problems as JSON.
#include "services/coordinator/store_check.h"

#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/coordinator/rocks_store.h"
#include "services/coordinator/store_schema.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::coordinator {
namespace {

namespace fs = std::filesystem;
using store::v1::ActivationRecord;
using store::v1::ArtifactRecord;
using store::v1::BlockRecord;
using store::v1::Counters;
using store::v1::IdempotencyRecord;
using store::v1::JobRecord;
using store::v1::LayerRecord;
using store::v1::WorkerRecord;
using ::testing::HasSubstr;

constexpr char kLive[] = "job-00000000000000aa";
constexpr char kDone[] = "job-00000000000000bb";

class StoreCheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = testing::MakeTempDir("store_check_test");
    auto s = RocksStore::Open({(fs::path(data_) / "store").string()});
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = *std::move(s);
    WriteBatch batch;
    Counters counters;
    counters.set_next_epoch(5);
    counters.set_next_seq(3);
    counters.set_next_gang_epoch(9);
    batch.Put(Column::kJobs, kCountersKey, Encode(counters));
    WorkerRecord w;
    w.set_worker_id("w-4");
    w.set_epoch(4);
    batch.Put(Column::kWorkers, "w-4", Encode(w));

    // A finished job with its idempotency key.
    JobRecord done;
    done.mutable_job()->set_job_id(kDone);
    done.mutable_job()->set_state(v1::JOB_STATE_SUCCEEDED);
    done.mutable_job()->set_client("alice");
    done.mutable_job()->set_num_blocks(2);
    done.mutable_job()->set_blocks_done(2);
    done.mutable_job()->set_gang_epoch(3);
    done.set_seq(1);
    done.set_spec_sha256("spec-a");
    batch.Put(Column::kJobs, JobKey(kDone), Encode(done));
    IdempotencyRecord idem;
    idem.set_client("alice");
    idem.set_key("k1");
    idem.set_spec_sha256("spec-a");
    idem.set_job_id(kDone);
    batch.Put(Column::kJobs, IdempotencyKey("alice", "k1"), Encode(idem));

    // A running job: block 0 of 2 done (seven layers, files in the data directory), its one
    // chunk (8 samples) checkpointed at block 1.
    JobRecord live;
    live.mutable_job()->set_job_id(kLive);
    live.mutable_job()->set_state(v1::JOB_STATE_RUNNING);
    live.mutable_job()->set_client("bob");
    live.mutable_job()->set_num_blocks(2);
    live.mutable_job()->set_blocks_done(1);
    live.mutable_job()->set_checkpoint_block(1);
    live.mutable_job()->set_gang_epoch(8);
    live.mutable_job()->mutable_spec()->set_samples(8);
    live.set_seq(2);
    batch.Put(Column::kJobs, JobKey(kLive), Encode(live));
    PutCommittedBlock(batch, 0, 7);
    const std::string act =
        absl::StrFormat("activations/%s/block-%06d/chunk-%06d.safetensors", kLive, 1, 0);
    WriteFile(act, "activations");
    ActivationRecord ar;
    ar.set_block(1);
    ar.set_chunk(0);
    ar.set_file(act);
    ar.set_sha256(Sha256Hex("activations"));
    ar.set_size(11);
    batch.Put(Column::kActivations, ActivationKey(kLive, 1, 0), Encode(ar));
    ASSERT_TRUE(store_->Write(batch).ok());
  }

  void TearDown() override {
    store_.reset();
    std::error_code ec;
    fs::remove_all(data_, ec);
  }

  // Block `block` of kLive committed with `layers` layers (files in the data directory, artifact
  // and layer records, the done mark) into `batch`; returns the done mark.
  BlockRecord PutCommittedBlock(WriteBatch& batch, int block, int layers) {
    BlockRecord mark;
    mark.set_block(block);
    for (int l = 0; l < layers; ++l) {
      const std::string bytes = absl::StrCat("quantized layer ", block, "/", l);
      const std::string file = absl::StrFormat("artifacts/%s/%06d-%02d.bin", kLive, block, l);
      WriteFile(file, bytes);
      ArtifactRecord a;
      a.set_name(absl::StrCat("layer", l));
      a.set_file(file);
      a.set_report_json("{}");
      batch.Put(Column::kArtifacts, ArtifactKey(kLive, block, l), Encode(a));
      LayerRecord lr;
      lr.mutable_digest()->set_name(a.name());
      lr.mutable_digest()->set_sha256(Sha256Hex(bytes));
      lr.mutable_digest()->set_size(static_cast<int64_t>(bytes.size()));
      lr.mutable_digest()->set_report_sha256(Sha256Hex("{}"));
      batch.Put(Column::kTasks, LayerKey(kLive, block, l), Encode(lr));
      *mark.add_layers() = lr.digest();
    }
    batch.Put(Column::kTasks, BlockKey(kLive, block), Encode(mark));
    return mark;
  }

  void WriteFile(const std::string& rel, const std::string& bytes) {
    const fs::path p = fs::path(data_) / rel;
    fs::create_directories(p.parent_path());
    ASSERT_TRUE(WriteStringToFile(p.string(), bytes).ok());
  }

  StoreCheckResult Check() {
    absl::StatusOr<StoreCheckResult> r = CheckStore(*store_, data_);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : StoreCheckResult();
  }

  // Applies `damage`, expects exactly one problem containing `expected`, then applies `repair`
  // and expects the store consistent again.
  void ExpectDetected(const std::function<void()>& damage, const std::string& expected,
                      const std::function<void()>& repair) {
    damage();
    const StoreCheckResult r = Check();
    EXPECT_EQ(r.problems.size(), 1u) << r.ToJson();
    if (!r.problems.empty()) {
      EXPECT_THAT(r.problems[0], HasSubstr(expected));
    }
    repair();
    EXPECT_TRUE(Check().ok()) << Check().ToJson();
  }

  void Put(Column c, const std::string& key, const std::string& value) {
    WriteBatch b;
    b.Put(c, key, value);
    ASSERT_TRUE(store_->Write(b).ok());
  }
  void Delete(Column c, const std::string& key) {
    WriteBatch b;
    b.Delete(c, key);
    ASSERT_TRUE(store_->Write(b).ok());
  }
  std::string Get(Column c, const std::string& key) { return **store_->Get(c, key); }

  std::string data_;
  std::unique_ptr<RocksStore> store_;
};

TEST_F(StoreCheckTest, AConsistentStorePassesWithItsCounts) {
  const StoreCheckResult r = Check();
  EXPECT_TRUE(r.ok()) << r.ToJson();
  EXPECT_EQ(r.jobs, 2);
  EXPECT_EQ(r.final_jobs, 1);
  EXPECT_EQ(r.idempotency_keys, 1);
  EXPECT_EQ(r.workers, 1);
  EXPECT_EQ(r.layers, 7);
  EXPECT_EQ(r.files_checked, 8);
  // A live job's artifact file whose batch never landed is allowed, and counted.
  WriteFile(absl::StrFormat("artifacts/%s/%06d-%02d.bin", kLive, 1, 0), "uncommitted");
  EXPECT_TRUE(Check().ok());
  EXPECT_EQ(Check().unreferenced_artifact_files, 1);
}

TEST_F(StoreCheckTest, DamagedFilesAreReported) {
  const std::string art = absl::StrFormat("artifacts/%s/%06d-%02d.bin", kLive, 0, 3);
  const std::string bytes = *ReadFileToString((fs::path(data_) / art).string());
  std::string changed = bytes;
  changed.back() ^= 1;
  ExpectDetected([&] { WriteFile(art, changed); }, "does not match its sha256",
                 [&] { WriteFile(art, bytes); });
  ExpectDetected([&] { fs::remove(fs::path(data_) / art); }, art + " is missing",
                 [&] { WriteFile(art, bytes); });
  const std::string stray =
      absl::StrFormat("activations/%s/block-%06d/chunk-%06d.safetensors", kLive, 2, 0);
  ExpectDetected([&] { WriteFile(stray, "x"); }, stray + ": no record references it",
                 [&] { fs::remove(fs::path(data_) / stray); });
  const std::string staging = absl::StrFormat("activations/%s/.upload-2-0-4", kLive);
  ExpectDetected([&] { WriteFile(staging, "x"); }, "staging file",
                 [&] { fs::remove(fs::path(data_) / staging); });
}

TEST_F(StoreCheckTest, WhatAFinishedJobLeftIsReported) {
  const std::string dir = absl::StrCat("artifacts/", kDone);
  ExpectDetected([&] { WriteFile(dir + "/000000-00.bin", "x"); },
                 dir + "/ remains, and its job is final",
                 [&] { fs::remove_all(fs::path(data_) / dir); });
  ExpectDetected([&] { Put(Column::kTasks, BlockKey(kDone, 0), Encode(BlockRecord())); },
                 "is SUCCEEDED but tasks/", [&] { Delete(Column::kTasks, BlockKey(kDone, 0)); });
  const std::string unknown = "job-00000000000000cc";
  ExpectDetected([&] { Put(Column::kArtifacts, ArtifactKey(unknown, 0, 0), ""); },
                 "names job " + unknown + ", which the store lacks",
                 [&] { Delete(Column::kArtifacts, ArtifactKey(unknown, 0, 0)); });
}

TEST_F(StoreCheckTest, InconsistentRecordsAreReported) {
  // An idempotency key naming a job the store lacks.
  IdempotencyRecord idem;
  idem.set_client("carol");
  idem.set_key("k9");
  idem.set_job_id("job-00000000000000dd");
  const std::string idem_key = IdempotencyKey("carol", "k9");
  ExpectDetected([&] { Put(Column::kJobs, idem_key, Encode(idem)); }, "which the store lacks",
                 [&] { Delete(Column::kJobs, idem_key); });
  // Counters behind the jobs.
  const std::string counters = Get(Column::kJobs, kCountersKey);
  Counters behind;
  behind.set_next_epoch(5);
  behind.set_next_seq(2);
  behind.set_next_gang_epoch(9);
  ExpectDetected([&] { Put(Column::kJobs, kCountersKey, Encode(behind)); },
                 "seq 2 not below next_seq 2", [&] { Put(Column::kJobs, kCountersKey, counters); });
  // A done mark whose digest disagrees with its layer's record.
  const std::string mark = Get(Column::kTasks, BlockKey(kLive, 0));
  BlockRecord other;
  ASSERT_TRUE(other.ParseFromString(mark));
  other.mutable_layers(5)->set_sha256(Sha256Hex("other bytes"));
  ExpectDetected([&] { Put(Column::kTasks, BlockKey(kLive, 0), Encode(other)); },
                 "block 0 layer 5: the done mark's digest has no equal layer record",
                 [&] { Put(Column::kTasks, BlockKey(kLive, 0), mark); });
  // A chunk of a boundary older than the checkpoint.
  const std::string old_file =
      absl::StrFormat("activations/%s/block-%06d/chunk-%06d.safetensors", kLive, 0, 0);
  ActivationRecord old;
  old.set_block(0);
  old.set_chunk(0);
  old.set_file(old_file);
  old.set_sha256(Sha256Hex("old"));
  old.set_size(3);
  ExpectDetected(
      [&] {
        WriteFile(old_file, "old");
        Put(Column::kActivations, ActivationKey(kLive, 0, 0), Encode(old));
      },
      "older than the checkpoint at block 1",
      [&] {
        Delete(Column::kActivations, ActivationKey(kLive, 0, 0));
        fs::remove(fs::path(data_) / old_file);
      });
  // A record that does not parse.
  const std::string worker = Get(Column::kWorkers, "w-4");
  ExpectDetected([&] { Put(Column::kWorkers, "w-4", "\xff\xff\xff"); },
                 "workers/w-4 does not parse", [&] { Put(Column::kWorkers, "w-4", worker); });
}

// A mixture-of-experts block commits more than seven layers, at places past 99 (a three-digit key):
// a complete one passes, and its done mark must list every one of its layer records.
TEST_F(StoreCheckTest, AnMoeBlocksLayersPastNinetyNinePass) {
  constexpr int kLayers = 4 + 3 * 34;  // q, k, v, o and 34 expert units
  WriteBatch batch;
  const BlockRecord mark = PutCommittedBlock(batch, 1, kLayers);
  ASSERT_TRUE(store_->Write(batch).ok());
  EXPECT_EQ(LayerKey(kLive, 1, 105), absl::StrCat(kLive, "/layer/000001/105"));
  const StoreCheckResult r = Check();
  EXPECT_TRUE(r.ok()) << r.ToJson();
  EXPECT_EQ(r.layers, 7 + kLayers);
  BlockRecord short_mark = mark;
  short_mark.mutable_layers()->RemoveLast();
  ExpectDetected([&] { Put(Column::kTasks, BlockKey(kLive, 1), Encode(short_mark)); },
                 "block 1's done mark lists 105 layers, the block has 106 layer records",
                 [&] { Put(Column::kTasks, BlockKey(kLive, 1), Encode(mark)); });
}

TEST_F(StoreCheckTest, TheCoordinatorsCheckStoreFlagExitsByTheResult) {
  const std::string bin = testing::BinaryDir() + "/bin/qcal-coordinator";
  const testing::RunResult good = testing::RunProcess(bin, {"--check-store", "--data-dir", data_});
  EXPECT_EQ(good.exit_code, 0) << good.err;
  EXPECT_TRUE(nlohmann::json::parse(good.out)["ok"].get<bool>()) << good.out;
  fs::remove(fs::path(data_) / absl::StrFormat("artifacts/%s/%06d-%02d.bin", kLive, 0, 0));
  const testing::RunResult bad = testing::RunProcess(bin, {"--check-store", "--data-dir", data_});
  EXPECT_EQ(bad.exit_code, 1) << bad.err;
  const nlohmann::json j = nlohmann::json::parse(bad.out);
  EXPECT_FALSE(j["ok"].get<bool>());
  ASSERT_EQ(j["problems"].size(), 1u);
  EXPECT_THAT(j["problems"][0].get<std::string>(), HasSubstr("is missing"));
  // No store there: exit 2, and nothing created.
  const std::string empty = testing::MakeTempDir("store_check_empty");
  const testing::RunResult none = testing::RunProcess(bin, {"--check-store", "--data-dir", empty});
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_FALSE(fs::exists(fs::path(empty) / "store"));
}

}  // namespace
}  // namespace qcal::coordinator
