// RocksStore: the five column families, typed records, prefix deletes, and the commit point's
// atomicity: a writer process SIGKILLed at a random moment leaves every batch either fully
// visible or not at all after reopening.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "services/coordinator/rocks_store.h"
#include "services/coordinator/store_schema.h"
#include "tests/support/test_paths.h"

namespace qcal::coordinator {
namespace {

namespace fs = std::filesystem;

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir("store_test"); }
  void TearDown() override { fs::remove_all(dir_); }
  std::unique_ptr<RocksStore> Open() {
    auto s = RocksStore::Open({dir_ + "/db"});
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }
  std::string dir_;
};

TEST_F(StoreTest, ColumnFamiliesAreSeparateAndScansArePrefixed) {
  auto store = Open();
  WriteBatch batch;
  batch.Put(Column::kJobs, "job/a", "1");
  batch.Put(Column::kTasks, "job/a", "2");
  batch.Put(Column::kArtifacts, "j1/000000/00", "x");
  batch.Put(Column::kArtifacts, "j1/000001/00", "y");
  batch.Put(Column::kArtifacts, "j10/000000/00", "z");  // shares "j1" but not "j1/"
  ASSERT_TRUE(store->Write(batch).ok());
  EXPECT_EQ(**store->Get(Column::kJobs, "job/a"), "1");
  EXPECT_EQ(**store->Get(Column::kTasks, "job/a"), "2");
  EXPECT_FALSE(store->Get(Column::kWorkers, "job/a")->has_value());
  std::vector<std::string> keys;
  ASSERT_TRUE(store
                  ->Scan(Column::kArtifacts, "j1/",
                         [&](const std::string& k, const std::string&) {
                           keys.push_back(k);
                           return true;
                         })
                  .ok());
  EXPECT_EQ(keys, (std::vector<std::string>{"j1/000000/00", "j1/000001/00"}));
  WriteBatch drop;
  drop.DeletePrefix(Column::kArtifacts, "j1/");
  ASSERT_TRUE(store->Write(drop).ok());
  EXPECT_FALSE(store->Get(Column::kArtifacts, "j1/000001/00")->has_value());
  EXPECT_TRUE(store->Get(Column::kArtifacts, "j10/000000/00")->has_value());
}

TEST_F(StoreTest, RecordsRoundTripAndCorruptOnesAreDataLoss) {
  {
    auto store = Open();
    store::v1::WorkerRecord w;
    w.set_worker_id("w-3");
    w.set_epoch(3);
    WriteBatch batch;
    batch.Put(Column::kWorkers, "w-3", Encode(w));
    batch.Put(Column::kWorkers, "w-4", "\xff\xff not a record");
    ASSERT_TRUE(store->Write(batch).ok());
  }
  auto store = Open();  // reopened: the data is durable
  auto w = GetRecord<store::v1::WorkerRecord>(*store, Column::kWorkers, "w-3");
  ASSERT_TRUE(w.ok() && w->has_value());
  EXPECT_EQ((*w)->epoch(), 3u);
  auto bad = GetRecord<store::v1::WorkerRecord>(*store, Column::kWorkers, "w-4");
  EXPECT_TRUE(absl::IsDataLoss(bad.status())) << bad.status();
  EXPECT_NE(bad.status().message().find("workers/w-4"), std::string::npos);
}

TEST_F(StoreTest, ASecondOpenOfTheSameDirectoryIsRefused) {
  auto store = Open();
  auto again = RocksStore::Open({dir_ + "/db"});
  EXPECT_FALSE(again.ok());
  EXPECT_NE(again.status().message().find(dir_), std::string::npos) << again.status();
}

// Quantized layers go to RocksDB blob files (out of the LSM tree): large artifacts round-trip,
// survive a reopen, and the artifacts family's data lands in *.blob files.
TEST_F(StoreTest, LargeArtifactsGoToBlobFilesAndSurviveAReopen) {
  std::vector<std::string> values;
  {
    auto store = Open();
    ASSERT_NE(store, nullptr);
    std::mt19937_64 rng(7);
    for (int i = 0; i < 3; ++i) {
      std::string v(size_t{12} << 20, '\0');
      for (char& c : v) c = static_cast<char>(rng());
      WriteBatch batch;
      batch.Put(Column::kArtifacts, absl::StrCat("job-a/00000", i, "/00"), v);
      batch.Put(Column::kTasks, absl::StrCat("job-a/block/00000", i), "done");
      ASSERT_TRUE(store->Write(batch).ok());
      values.push_back(std::move(v));
    }
  }
  auto store = Open();
  ASSERT_NE(store, nullptr);
  for (int i = 0; i < 3; ++i) {
    auto got = store->Get(Column::kArtifacts, absl::StrCat("job-a/00000", i, "/00"));
    ASSERT_TRUE(got.ok() && got->has_value()) << i;
    EXPECT_TRUE(**got == values[static_cast<size_t>(i)]) << i;
  }
  int64_t blob_bytes = 0;
  for (const auto& e : fs::directory_iterator(dir_ + "/db")) {
    if (e.path().extension() == ".blob") blob_bytes += static_cast<int64_t>(e.file_size());
  }
  EXPECT_GE(blob_bytes, int64_t{24} << 20) << "artifacts should be in blob files";
}

// Batch i writes "b<i>/k<j>" = i for j < kKeysPerBatch in three column families, plus the commit
// counter. After a SIGKILL at a random moment every batch is whole or absent, and the batches
// present are exactly 0..counter.
TEST_F(StoreTest, BatchesSurviveASigkillWholeOrNotAtAll) {
  constexpr int kKeysPerBatch = 20;
  const std::string db = dir_ + "/db";
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto store = RocksStore::Open({db});
    if (!store.ok()) _exit(2);
    for (int i = 0;; ++i) {
      WriteBatch batch;
      for (int j = 0; j < kKeysPerBatch; ++j) {
        for (Column c : {Column::kTasks, Column::kArtifacts, Column::kActivations}) {
          batch.Put(c, absl::StrFormat("b%06d/k%02d", i, j),
                    std::string(1000, static_cast<char>('a' + i % 26)));
        }
      }
      batch.Put(Column::kJobs, "counter", absl::StrCat(i));
      if (!(*store)->Write(batch).ok()) _exit(3);
    }
  }
  std::random_device rd;
  usleep(200000 + rd() % 300000);
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the writer stopped on its own: " << status;

  auto store = Open();
  auto counter = store->Get(Column::kJobs, "counter");
  ASSERT_TRUE(counter.ok() && counter->has_value()) << "no batch committed before the kill";
  const int last = std::stoi(**counter);
  for (Column c : {Column::kTasks, Column::kArtifacts, Column::kActivations}) {
    std::map<int, int> keys_per_batch;
    ASSERT_TRUE(store
                    ->Scan(c, "b",
                           [&](const std::string& k, const std::string& v) {
                             keys_per_batch[std::stoi(k.substr(1, 6))]++;
                             return v.size() == 1000;
                           })
                    .ok());
    ASSERT_EQ(static_cast<int>(keys_per_batch.size()), last + 1) << ColumnName(c);
    for (const auto& [batch, n] : keys_per_batch) {
      EXPECT_LE(batch, last);
      EXPECT_EQ(n, kKeysPerBatch) << ColumnName(c) << " batch " << batch << " is partial";
    }
  }
  RecordProperty("batches_committed", last + 1);
}

}  // namespace
}  // namespace qcal::coordinator
