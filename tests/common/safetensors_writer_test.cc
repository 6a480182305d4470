// Tests of the streaming sharded safetensors writer (common/safetensors_writer.h): shard planning
// and names, the index, round trips through CheckpointReader, byte equality with WriteSafetensors
// and between runs, that data reaches the file as each tensor is written, and refusals.
#include "common/safetensors_writer.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "common/files.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// A tensor of `dtype` and `shape` whose bytes are a function of `seed` and the byte position.
Tensor Filled(DType dtype, Shape shape, int seed) {
  Tensor t = Tensor::Zeros(dtype, std::move(shape));
  auto* p = static_cast<uint8_t*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(seed * 31 + i * 7 + 1);
  return t;
}

std::string Bytes(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw()), t.nbytes());
}

struct Named {
  std::string name;
  Tensor tensor;
};

std::vector<PlannedTensor> PlanOf(const std::vector<Named>& tensors) {
  std::vector<PlannedTensor> plan;
  for (const auto& t : tensors) plan.push_back({t.name, t.tensor.dtype(), t.tensor.shape()});
  return plan;
}

// Sorted file names in `dir`.
std::vector<std::string> FilesIn(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

class SafetensorsWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("safetensors_writer_test");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Sub(const std::string& name) const {
    const std::string d = (fs::path(dir_) / name).string();
    fs::create_directories(d);
    return d;
  }

  // Writes `tensors` in order through a writer into `dir`.
  static void WriteAll(const std::string& dir, const std::vector<Named>& tensors,
                       int64_t max_shard_bytes,
                       const std::map<std::string, std::string>& metadata = {}) {
    auto writer =
        ShardedSafetensorsWriter::Create(dir, PlanOf(tensors), max_shard_bytes, "model", metadata);
    ASSERT_TRUE(writer.ok()) << writer.status();
    for (const auto& t : tensors) {
      const absl::Status s = (*writer)->Write(t.name, t.tensor);
      ASSERT_TRUE(s.ok()) << s;
    }
    const absl::Status s = (*writer)->Finish();
    ASSERT_TRUE(s.ok()) << s;
  }

  static void ExpectRoundTrip(const std::string& dir, const std::vector<Named>& tensors) {
    auto reader = CheckpointReader::Open(dir);
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_EQ((*reader)->Names().size(), tensors.size());
    for (const auto& t : tensors) {
      auto got = (*reader)->Get(t.name);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->dtype(), t.tensor.dtype()) << t.name;
      EXPECT_EQ(got->shape(), t.tensor.shape()) << t.name;
      EXPECT_EQ(Bytes(*got), Bytes(t.tensor)) << t.name;
    }
  }

  std::string dir_;
};

// Five tensors in a non-sorted plan order: 40, 40, 400, 24 and 40 bytes.
std::vector<Named> FiveTensors() {
  return {{"layers.1.w", Filled(DType::kF32, {2, 5}, 1)},
          {"layers.0.w", Filled(DType::kF16, {4, 5}, 2)},
          {"big", Filled(DType::kBF16, {10, 20}, 3)},
          {"ids", Filled(DType::kI32, {6}, 4)},
          {"a.scale", Filled(DType::kF64, {5}, 5)}};
}

TEST_F(SafetensorsWriterTest, OneShardRoundTripsWithSortedHeaderAndPlanOrderData) {
  const auto tensors = FiveTensors();
  const std::string dir = Sub("one");
  auto writer = ShardedSafetensorsWriter::Create(dir, PlanOf(tensors), 0);
  ASSERT_TRUE(writer.ok()) << writer.status();
  EXPECT_EQ((*writer)->shard_files(), std::vector<std::string>{"model.safetensors"});
  for (const auto& t : tensors) ASSERT_TRUE((*writer)->Write(t.name, t.tensor).ok());
  ASSERT_TRUE((*writer)->Finish().ok());
  EXPECT_EQ(FilesIn(dir), std::vector<std::string>{"model.safetensors"});
  ExpectRoundTrip(dir, tensors);

  auto raw = ReadFileToString((fs::path(dir) / "model.safetensors").string());
  ASSERT_TRUE(raw.ok());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>((*raw)[i]);
  EXPECT_EQ(header_len % 8, 0u);
  auto json = nlohmann::ordered_json::parse(raw->substr(8, header_len));
  std::vector<std::string> keys;
  for (auto it = json.begin(); it != json.end(); ++it) keys.push_back(it.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"a.scale", "big", "ids", "layers.0.w", "layers.1.w"}));
  // Data in plan order, contiguous.
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    EXPECT_EQ(json[t.name]["data_offsets"][0].get<uint64_t>(), offset) << t.name;
    offset += t.tensor.nbytes();
    EXPECT_EQ(json[t.name]["data_offsets"][1].get<uint64_t>(), offset) << t.name;
    EXPECT_EQ(raw->substr(8 + header_len + offset - t.tensor.nbytes(), t.tensor.nbytes()),
              Bytes(t.tensor))
        << t.name;
  }
  EXPECT_EQ(raw->size(), 8 + header_len + offset);
}

TEST_F(SafetensorsWriterTest, ShardsWithOversizedTensorAndIndex) {
  // With 100-byte shards: [layers.1.w 40, layers.0.w 40], [big 400] alone, [ids 24, a.scale 40].
  const auto tensors = FiveTensors();
  const std::string dir = Sub("sharded");
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  auto writer = ShardedSafetensorsWriter::Create(dir, PlanOf(tensors), 100, "model", metadata);
  ASSERT_TRUE(writer.ok()) << writer.status();
  const std::vector<std::string> shards = {"model-00001-of-00003.safetensors",
                                           "model-00002-of-00003.safetensors",
                                           "model-00003-of-00003.safetensors"};
  EXPECT_EQ((*writer)->shard_files(), shards);
  for (const auto& t : tensors) ASSERT_TRUE((*writer)->Write(t.name, t.tensor).ok());
  ASSERT_TRUE((*writer)->Finish().ok());

  std::vector<std::string> want_files = shards;
  want_files.push_back("model.safetensors.index.json");
  std::sort(want_files.begin(), want_files.end());
  EXPECT_EQ(FilesIn(dir), want_files);
  ExpectRoundTrip(dir, tensors);

  auto reader = CheckpointReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(*(*reader)->FileOf("layers.1.w"), shards[0]);
  EXPECT_EQ(*(*reader)->FileOf("layers.0.w"), shards[0]);
  EXPECT_EQ(*(*reader)->FileOf("big"), shards[1]);
  EXPECT_EQ(*(*reader)->FileOf("ids"), shards[2]);
  EXPECT_EQ(*(*reader)->FileOf("a.scale"), shards[2]);
  for (const auto& shard : shards) {
    auto file = SafetensorsFile::Open((fs::path(dir) / shard).string());
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ((*file)->metadata(), metadata);
  }

  auto text = ReadFileToString((fs::path(dir) / "model.safetensors.index.json").string());
  ASSERT_TRUE(text.ok());
  const auto index = nlohmann::ordered_json::parse(*text);
  std::vector<std::string> top;
  for (auto it = index.begin(); it != index.end(); ++it) top.push_back(it.key());
  EXPECT_EQ(top, (std::vector<std::string>{"metadata", "weight_map"}));
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), 40u + 40 + 400 + 24 + 40);
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    weight_map.emplace_back(it.key(), it.value().get<std::string>());
  }
  EXPECT_EQ(weight_map,
            (std::vector<std::pair<std::string, std::string>>{{"a.scale", shards[2]},
                                                              {"big", shards[1]},
                                                              {"ids", shards[2]},
                                                              {"layers.0.w", shards[0]},
                                                              {"layers.1.w", shards[0]}}));
}

TEST_F(SafetensorsWriterTest, OversizedFirstTensorGetsAShardOfItsOwn) {
  const std::vector<Named> tensors = {{"big", Filled(DType::kF32, {30}, 1)},
                                      {"small", Filled(DType::kF32, {2}, 2)}};
  const std::string dir = Sub("first");
  auto writer = ShardedSafetensorsWriter::Create(dir, PlanOf(tensors), 100);
  ASSERT_TRUE(writer.ok()) << writer.status();
  EXPECT_EQ((*writer)->shard_files(),
            (std::vector<std::string>{"model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors"}));
}

TEST_F(SafetensorsWriterTest, CustomStem) {
  const auto tensors = FiveTensors();
  const std::string dir = Sub("stem");
  auto writer = ShardedSafetensorsWriter::Create(dir, PlanOf(tensors), 100, "adapter_model");
  ASSERT_TRUE(writer.ok()) << writer.status();
  EXPECT_EQ((*writer)->shard_files()[1], "adapter_model-00002-of-00003.safetensors");
}

TEST_F(SafetensorsWriterTest, DataReachesTheFileAsEachTensorIsWritten) {
  const auto tensors = FiveTensors();
  const std::string dir = Sub("stream");
  auto writer = ShardedSafetensorsWriter::Create(dir, PlanOf(tensors), 100);
  ASSERT_TRUE(writer.ok()) << writer.status();
  const std::string first = (fs::path(dir) / "model-00001-of-00003.safetensors").string();
  EXPECT_FALSE(fs::exists(first));  // Create makes no file
  ASSERT_TRUE((*writer)->Write(tensors[0].name, tensors[0].tensor).ok());
  auto raw = ReadFileToString(first);
  ASSERT_TRUE(raw.ok());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>((*raw)[i]);
  EXPECT_EQ(raw->size(), 8 + header_len + tensors[0].tensor.nbytes());
  EXPECT_FALSE(fs::exists(fs::path(dir) / "model-00002-of-00003.safetensors"));
}

TEST_F(SafetensorsWriterTest, TwoRunsAreByteIdentical) {
  const auto tensors = FiveTensors();
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  const std::string a = Sub("a");
  const std::string b = Sub("b");
  WriteAll(a, tensors, 100, metadata);
  WriteAll(b, tensors, 100, metadata);
  const auto files = FilesIn(a);
  ASSERT_EQ(files.size(), 4u);
  EXPECT_EQ(FilesIn(b), files);
  for (const auto& f : files) {
    EXPECT_EQ(*ReadFileToString((fs::path(a) / f).string()),
              *ReadFileToString((fs::path(b) / f).string()))
        << f;
  }
}

TEST_F(SafetensorsWriterTest, SingleShardEqualsWriteSafetensors) {
  // WriteSafetensors stores data in name order, so plan in name order to compare bytes.
  std::vector<Named> tensors = FiveTensors();
  std::sort(tensors.begin(), tensors.end(),
            [](const Named& x, const Named& y) { return x.name < y.name; });
  std::map<std::string, Tensor> map;
  for (const auto& t : tensors) map[t.name] = t.tensor;
  for (const auto& metadata :
       std::vector<std::map<std::string, std::string>>{{}, {{"format", "pt"}, {"qcal", "1"}}}) {
    const std::string dir = Sub(metadata.empty() ? "plain" : "meta");
    WriteAll(dir, tensors, 0, metadata);
    const std::string reference = (fs::path(dir) / "reference.safetensors").string();
    ASSERT_TRUE(WriteSafetensors(reference, map, metadata).ok());
    EXPECT_EQ(*ReadFileToString((fs::path(dir) / "model.safetensors").string()),
              *ReadFileToString(reference));
  }
}

TEST_F(SafetensorsWriterTest, EmptyPlanWritesAnEmptyCheckpoint) {
  const std::string dir = Sub("empty");
  WriteAll(dir, {}, 100);
  EXPECT_EQ(FilesIn(dir), std::vector<std::string>{"model.safetensors"});
  auto reader = CheckpointReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE((*reader)->Names().empty());
}

TEST_F(SafetensorsWriterTest, RefusesWritesThatDoNotMatchThePlan) {
  const auto tensors = FiveTensors();
  const std::string dir = Sub("refuse");
  auto created = ShardedSafetensorsWriter::Create(dir, PlanOf(tensors), 100);
  ASSERT_TRUE(created.ok()) << created.status();
  ShardedSafetensorsWriter& w = **created;
  const std::string shard1 = (fs::path(dir) / "model-00001-of-00003.safetensors").string();

  absl::Status s = w.Write("layers.0.w", tensors[1].tensor);  // out of order
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(shard1));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("got tensor \"layers.0.w\" but the plan's next tensor is \"layers.1.w\""));

  s = w.Write("layers.1.w", Filled(DType::kI32, {2, 5}, 1));  // wrong dtype, same bytes
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tensor \"layers.1.w\" is I32[2, 5] but the plan has F32[2, 5]"));

  s = w.Write("layers.1.w", Filled(DType::kF32, {5, 2}, 1));  // wrong shape, same bytes
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("is F32[5, 2] but the plan has F32[2, 5]"));

  const std::string short_bytes(36, 'x');
  s = w.WriteBytes("layers.1.w", short_bytes.data(), short_bytes.size());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(
      std::string(s.message()),
      HasSubstr("tensor \"layers.1.w\" has 36 bytes but the plan has F32[2, 5] (40 bytes)"));
  s = w.WriteBytes("layers.0.w", short_bytes.data(), short_bytes.size());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;

  // Refusals write nothing: the writer goes on as planned.
  EXPECT_FALSE(fs::exists(shard1));
  ASSERT_TRUE(w.WriteBytes("layers.1.w", tensors[0].tensor.raw(), 40).ok());
  ASSERT_TRUE(w.Write("layers.0.w", tensors[1].tensor).ok());

  s = w.Finish();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("Finish after 2 of 5 planned tensors; the next is \"big\""));
  EXPECT_FALSE(fs::exists(fs::path(dir) / "model.safetensors.index.json"));

  for (size_t i = 2; i < tensors.size(); ++i) {
    ASSERT_TRUE(w.Write(tensors[i].name, tensors[i].tensor).ok());
  }
  s = w.Write("extra", tensors[0].tensor);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("after all 5 planned tensors"));
  ASSERT_TRUE(w.Finish().ok());
  EXPECT_EQ(w.Finish().code(), absl::StatusCode::kFailedPrecondition);
  ExpectRoundTrip(dir, tensors);
}

TEST_F(SafetensorsWriterTest, RefusesBadPlans) {
  auto missing = ShardedSafetensorsWriter::Create(dir_ + "/absent", {}, 0);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(dir_ + "/absent"));

  auto twice =
      ShardedSafetensorsWriter::Create(dir_, {{"w", DType::kF32, {1}}, {"w", DType::kF16, {2}}}, 0);
  ASSERT_FALSE(twice.ok());
  EXPECT_THAT(std::string(twice.status().message()), HasSubstr("tensor \"w\" is planned twice"));

  auto negative = ShardedSafetensorsWriter::Create(dir_, {{"w", DType::kF32, {2, -1}}}, 0);
  ASSERT_FALSE(negative.ok());
  EXPECT_THAT(std::string(negative.status().message()), HasSubstr("[2, -1]"));

  auto reserved = ShardedSafetensorsWriter::Create(dir_, {{"__metadata__", DType::kF32, {1}}}, 0);
  EXPECT_FALSE(reserved.ok());
  auto stem = ShardedSafetensorsWriter::Create(dir_, {}, 0, "../model");
  EXPECT_FALSE(stem.ok());
}

}  // namespace
}  // namespace qcal
