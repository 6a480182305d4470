// Tests of safetensors reading and writing (common/safetensors.h): round trips of every stored
// dtype, the on-disk layout (sorted names, 8-byte padded header, metadata), sharded checkpoints,
// and malformed files, each of which must give an error naming the file and the problem.
#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("safetensors_test");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Writes a file made of an 8-byte little-endian header length, `header` and `data`.
  std::string WriteRaw(const std::string& name, const std::string& header,
                       const std::string& data = "", uint64_t header_len = UINT64_MAX) {
    if (header_len == UINT64_MAX) header_len = header.size();
    std::string bytes;
    for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
    bytes += header;
    bytes += data;
    const std::string path = Path(name);
    EXPECT_TRUE(WriteStringToFile(path, bytes).ok());
    return path;
  }

  // Opening `path` fails with InvalidArgument and a message naming the file and `problem`.
  static void ExpectOpenError(const std::string& path, const std::string& problem) {
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << path;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(problem));
  }

  std::string dir_;
};

Tensor I32Tensor(const std::vector<int32_t>& values, Shape shape) {
  Tensor t = Tensor::Zeros(DType::kI32, std::move(shape));
  for (size_t i = 0; i < values.size(); ++i) t.data<int32_t>()[i] = values[i];
  return t;
}

std::string Bytes(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw()), t.nbytes());
}

TEST_F(SafetensorsTest, RoundTripsEveryDTypeWithSortedPaddedHeader) {
  const std::vector<float> values = {1.0f, -2.5f, 0.1f, 65504.0f, -1e-7f, 3.0f};
  Tensor f32 = Tensor::FromVector(values, {2, 3});
  Tensor f16 = *f32.ConvertTo(DType::kF16);
  Tensor bf16 = *f32.ConvertTo(DType::kBF16);
  Tensor i32 = I32Tensor({7, -1, 1 << 30}, {3});
  Tensor scalar = Tensor::FromVector({42.0f}, {});
  const std::map<std::string, Tensor> tensors = {
      {"z.weight", f32}, {"a.half", f16}, {"m.bf16", bf16}, {"b.ids", i32}, {"scalar", scalar}};
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"origin", "qcal test"}};
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
  ASSERT_EQ((*file)->tensors().size(), tensors.size());
  for (const auto& [name, want] : tensors) {
    auto got = (*file)->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->dtype(), want.dtype()) << name;
    EXPECT_EQ(got->shape(), want.shape()) << name;
    EXPECT_EQ(Bytes(*got), Bytes(want)) << name;
  }
  auto bf16_back = (*file)->Get("m.bf16")->ToF32();
  ASSERT_TRUE(bf16_back.ok());
  EXPECT_EQ(bf16_back->data<float>()[2], RoundToBf16(0.1f));
  EXPECT_EQ(bf16_back->data<float>()[3], 65536.0f);  // 65504 rounds up on bf16's 8-bit grid
  EXPECT_FALSE((*file)->Get("missing").ok());

  // On-disk layout: the header length is a multiple of 8, the JSON is padded with spaces, the
  // metadata comes first, names follow in sorted order, and the data offsets are contiguous.
  auto raw = ReadFileToString(path);
  ASSERT_TRUE(raw.ok());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>((*raw)[i]);
  EXPECT_EQ(header_len % 8, 0u);
  const std::string header = raw->substr(8, header_len);
  const size_t json_end = header.find_last_not_of(' ') + 1;
  EXPECT_EQ(header[json_end - 1], '}');
  EXPECT_LT(header.size() - json_end, 8u);
  auto json = nlohmann::ordered_json::parse(header);
  std::vector<std::string> keys;
  for (auto it = json.begin(); it != json.end(); ++it) keys.push_back(it.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"__metadata__", "a.half", "b.ids", "m.bf16", "scalar",
                                            "z.weight"}));
  uint64_t offset = 0;
  for (size_t i = 1; i < keys.size(); ++i) {
    const auto& offsets = json[keys[i]]["data_offsets"];
    EXPECT_EQ(offsets[0].get<uint64_t>(), offset) << keys[i];
    offset = offsets[1].get<uint64_t>();
  }
  EXPECT_EQ(raw->size(), 8 + header_len + offset);

  // Writing the same tensors again gives the same bytes.
  const std::string again = Path("again.safetensors");
  ASSERT_TRUE(WriteSafetensors(again, tensors, metadata).ok());
  EXPECT_EQ(*ReadFileToString(again), *raw);
}

TEST_F(SafetensorsTest, InMemoryBytesMatchTheFile) {
  const std::map<std::string, Tensor> tensors = {
      {"b", *Tensor::FromVector({1, 2, 3}, {3}).ConvertTo(DType::kF16)},
      {"a", I32Tensor({-4, 5}, {1, 2})}};
  const std::map<std::string, std::string> metadata = {{"k", "v"}};
  auto bytes = SerializeSafetensors(tensors, metadata);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const std::string path = Path("mem.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());
  EXPECT_EQ(*ReadFileToString(path), *bytes);

  auto file = SafetensorsFile::FromBytes(*bytes, "artifact");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
  auto a = (*file)->Get("a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(Bytes(*a), Bytes(tensors.at("a")));

  auto truncated = SafetensorsFile::FromBytes(bytes->substr(0, 7), "artifact");
  ASSERT_FALSE(truncated.ok());
  EXPECT_THAT(std::string(truncated.status().message()), HasSubstr("artifact: truncated"));
  auto cut = SafetensorsFile::FromBytes(bytes->substr(0, bytes->size() - 1), "artifact");
  ASSERT_FALSE(cut.ok());
  EXPECT_THAT(std::string(cut.status().message()), HasSubstr("artifact: "));
  EXPECT_THAT(std::string(cut.status().message()), HasSubstr("run past the end"));
}

TEST_F(SafetensorsTest, NoMetadataMeansNoMetadataKey) {
  const std::string path = Path("plain.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w", Tensor::FromVector({1, 2}, {2})}}).ok());
  auto raw = ReadFileToString(path);
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(raw->find("__metadata__"), std::string::npos);
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->metadata().empty());
}

TEST_F(SafetensorsTest, ReadsShardedCheckpointThroughIndex) {
  ASSERT_TRUE(WriteSafetensors(
                  Path("model-00001-of-00002.safetensors"),
                  {{"layer.0.w", Tensor::FromVector({1, 2, 3, 4}, {2, 2})},
                   {"layer.0.b", *Tensor::FromVector({0.5f, -0.5f}, {2}).ConvertTo(DType::kBF16)}})
                  .ok());
  ASSERT_TRUE(
      WriteSafetensors(Path("model-00002-of-00002.safetensors"),
                       {{"lm_head.weight",
                         *Tensor::FromVector({1, 2, 3, 4, 5, 6}, {3, 2}).ConvertTo(DType::kF16)},
                        {"ids", I32Tensor({1, 2}, {2})}})
          .ok());
  const std::string index = R"({
    "metadata": {"total_size": 48},
    "weight_map": {
      "layer.0.w": "model-00001-of-00002.safetensors",
      "layer.0.b": "model-00001-of-00002.safetensors",
      "lm_head.weight": "model-00002-of-00002.safetensors",
      "ids": "model-00002-of-00002.safetensors"
    }})";
  ASSERT_TRUE(WriteStringToFile(Path("model.safetensors.index.json"), index).ok());

  auto reader = CheckpointReader::Open(dir_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->Names(),
            (std::vector<std::string>{"ids", "layer.0.b", "layer.0.w", "lm_head.weight"}));
  EXPECT_EQ(*(*reader)->FileOf("lm_head.weight"), "model-00002-of-00002.safetensors");
  EXPECT_EQ(*(*reader)->FileOf("layer.0.w"), "model-00001-of-00002.safetensors");
  auto info = (*reader)->Info("lm_head.weight");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->dtype, DType::kF16);
  EXPECT_EQ(info->shape, (Shape{3, 2}));

  auto head = (*reader)->GetF32("lm_head.weight", {3, 2});
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ(head->dtype(), DType::kF32);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(head->data<float>()[i], float(i + 1));
  auto bias = (*reader)->GetF32("layer.0.b");
  ASSERT_TRUE(bias.ok()) << bias.status();
  EXPECT_EQ(bias->data<float>()[1], -0.5f);
  auto ids = (*reader)->Get("ids");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->data<int32_t>()[1], 2);

  EXPECT_FALSE((*reader)->Has("nope"));
  EXPECT_EQ((*reader)->Get("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*reader)->Info("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, ReadsSingleFileCheckpoint) {
  ASSERT_TRUE(
      WriteSafetensors(Path("model.safetensors"), {{"w", Tensor::FromVector({3}, {1})}}).ok());
  auto reader = CheckpointReader::Open(dir_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->Names(), std::vector<std::string>{"w"});
  EXPECT_EQ(*(*reader)->FileOf("w"), "model.safetensors");
}

TEST_F(SafetensorsTest, DirectoryWithoutWeightsIsNotFound) {
  auto reader = CheckpointReader::Open(dir_);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr(dir_));
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr("model.safetensors"));
}

TEST_F(SafetensorsTest, MissingFileIsNotFoundNamingThePath) {
  const std::string path = Path("absent.safetensors");
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
}

TEST_F(SafetensorsTest, TruncatedFileShorterThanHeaderLength) {
  ASSERT_TRUE(WriteStringToFile(Path("empty.safetensors"), "").ok());
  ExpectOpenError(Path("empty.safetensors"), "truncated");
  ASSERT_TRUE(WriteStringToFile(Path("short.safetensors"), std::string("\x10\x00\x00", 3)).ok());
  ExpectOpenError(Path("short.safetensors"), "truncated");
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFile) {
  ExpectOpenError(WriteRaw("past.safetensors", "{}", "", 64), "runs past the end of the file");
}

TEST_F(SafetensorsTest, OversizedHeaderLength) {
  ExpectOpenError(WriteRaw("huge.safetensors", "{}", "", kMaxSafetensorsHeaderBytes + 1),
                  "exceeds the limit");
  ExpectOpenError(WriteRaw("max.safetensors", "{}", "", UINT64_MAX - 1), "exceeds the limit");
}

TEST_F(SafetensorsTest, MalformedJson) {
  ExpectOpenError(WriteRaw("json.safetensors", R"({"w": {"dtype": "F32", )"), "malformed");
}

TEST_F(SafetensorsTest, HeaderThatIsNotAnObject) {
  ExpectOpenError(WriteRaw("array.safetensors", "[1, 2, 3]"), "not a JSON object");
}

TEST_F(SafetensorsTest, UnknownDType) {
  const std::string path =
      WriteRaw("dtype.safetensors",
               R"({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", "ab");
  ExpectOpenError(path, "unsupported dtype \"F8_E4M3\"");
  ExpectOpenError(path, "tensor \"w\"");
}

TEST_F(SafetensorsTest, NegativeOrNonIntegerShape) {
  ExpectOpenError(
      WriteRaw("neg.safetensors",
               R"({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}})", "12345678"),
      "non-integer or negative dimension");
  ExpectOpenError(
      WriteRaw("frac.safetensors",
               R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", "1234"),
      "non-integer or negative dimension");
  ExpectOpenError(
      WriteRaw("str.safetensors",
               R"({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}})", "12345678"),
      "shape is not an array");
}

TEST_F(SafetensorsTest, DataOffsetsPastEndOfData) {
  ExpectOpenError(
      WriteRaw("offsets.safetensors",
               R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", "12345678"),
      "run past the end of the file");
}

TEST_F(SafetensorsTest, ByteCountNotMatchingShape) {
  ExpectOpenError(
      WriteRaw("count.safetensors",
               R"({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 8]}})", "12345678"),
      "8 bytes do not match BF16[3] (6 bytes)");
}

TEST_F(SafetensorsTest, EndBeforeBegin) {
  ExpectOpenError(
      WriteRaw("order.safetensors",
               R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", "12345678"),
      "end < begin");
}

TEST_F(SafetensorsTest, MalformedEntries) {
  ExpectOpenError(WriteRaw("fields.safetensors", R"({"w": {"dtype": "F32", "shape": [1]}})"),
                  "needs dtype, shape and data_offsets");
  ExpectOpenError(
      WriteRaw("neg_offset.safetensors",
               R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", "1234"),
      "data_offsets must be two non-negative integers");
  ExpectOpenError(WriteRaw("meta.safetensors", R"({"__metadata__": {"n": 3}})"),
                  "__metadata__ values must be strings");
}

TEST_F(SafetensorsTest, IndexPointingToMissingShard) {
  ASSERT_TRUE(WriteSafetensors(Path("a.safetensors"), {{"w", Tensor::FromVector({1}, {1})}}).ok());
  ASSERT_TRUE(WriteStringToFile(Path("model.safetensors.index.json"),
                                R"({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}})")
                  .ok());
  auto reader = CheckpointReader::Open(dir_);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr(Path("b.safetensors")));
}

TEST_F(SafetensorsTest, IndexListingTensorMissingFromShard) {
  ASSERT_TRUE(WriteSafetensors(Path("a.safetensors"), {{"w", Tensor::FromVector({1}, {1})}}).ok());
  ASSERT_TRUE(WriteStringToFile(Path("model.safetensors.index.json"),
                                R"({"weight_map": {"w": "a.safetensors", "v": "a.safetensors"}})")
                  .ok());
  auto reader = CheckpointReader::Open(dir_);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(reader.status().message());
  EXPECT_THAT(msg, HasSubstr(Path("a.safetensors")));
  EXPECT_THAT(msg, HasSubstr("tensor \"v\" listed in model.safetensors.index.json is missing"));
}

TEST_F(SafetensorsTest, MalformedIndex) {
  const std::string index = Path("model.safetensors.index.json");
  ASSERT_TRUE(WriteStringToFile(index, "{\"weight_map\": ").ok());
  auto reader = CheckpointReader::Open(dir_);
  ASSERT_FALSE(reader.ok());
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr(index));
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr("malformed JSON"));

  ASSERT_TRUE(WriteStringToFile(index, R"({"metadata": {}})").ok());
  reader = CheckpointReader::Open(dir_);
  ASSERT_FALSE(reader.ok());
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr("missing \"weight_map\" object"));

  // Shard names are plain file names: no escaping the checkpoint directory.
  ASSERT_TRUE(WriteStringToFile(index, R"({"weight_map": {"w": "../x.safetensors"}})").ok());
  reader = CheckpointReader::Open(dir_);
  ASSERT_FALSE(reader.ok());
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr("is not a plain file name"));
}

TEST_F(SafetensorsTest, GetF32ChecksShapeAndDType) {
  ASSERT_TRUE(
      WriteSafetensors(Path("model.safetensors"),
                       {{"w", Tensor::FromVector({1, 2}, {2, 1})}, {"ids", I32Tensor({1, 2}, {2})}})
          .ok());
  auto reader = CheckpointReader::Open(dir_);
  ASSERT_TRUE(reader.ok()) << reader.status();

  auto shape = (*reader)->GetF32("w", {1, 2});
  ASSERT_FALSE(shape.ok());
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  std::string msg(shape.status().message());
  EXPECT_THAT(msg, HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(msg, HasSubstr("tensor \"w\" has shape [2, 1], expected [1, 2]"));

  auto dtype = (*reader)->GetF32("ids");
  ASSERT_FALSE(dtype.ok());
  msg = std::string(dtype.status().message());
  EXPECT_THAT(msg, HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(msg, HasSubstr("tensor \"ids\" has dtype I32"));

  auto missing = (*reader)->GetF32("absent");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("absent"));
}

// Reads of a file that changed after Open: a DataLoss error naming the file, never a SIGBUS.
class ChangedFileTest : public SafetensorsTest {
 protected:
  void SetUp() override {
    SafetensorsTest::SetUp();
    path_ = Path("model.safetensors");
    ASSERT_TRUE(WriteSafetensors(path_, {{"a", Tensor::FromVector({1, 2, 3, 4}, {4})},
                                         {"b", Tensor::FromVector({5, 6, 7, 8}, {2, 2})}})
                    .ok());
    auto file = SafetensorsFile::Open(path_);
    ASSERT_TRUE(file.ok()) << file.status();
    file_ = std::move(*file);
    ASSERT_TRUE(file_->Get("b").ok());  // readable before the change
  }

  // Every read of every tensor fails with DataLoss naming the file and `why`.
  void ExpectReadsFail(const std::string& why) {
    for (const std::string name : {"a", "b"}) {
      auto got = file_->Get(name);
      ASSERT_FALSE(got.ok()) << name;
      EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
      const std::string msg(got.status().message());
      EXPECT_THAT(msg, HasSubstr(path_ + ": the file changed while it was being read"));
      EXPECT_THAT(msg, HasSubstr(why));
      float buf[4];
      const absl::Status s = file_->ReadInto(name, buf, sizeof(buf));
      EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
      EXPECT_THAT(std::string(s.message()), HasSubstr(path_));
    }
  }

  std::string path_;
  std::unique_ptr<SafetensorsFile> file_;
};

TEST_F(ChangedFileTest, TruncatedAfterOpen) {
  const auto size = fs::file_size(path_);
  fs::resize_file(path_, size - 4);
  ExpectReadsFail(absl::StrCat("its size went from ", size, " to ", size - 4, " bytes"));
}

TEST_F(ChangedFileTest, DeletedAfterOpen) {
  fs::remove(path_);
  ExpectReadsFail("it can no longer be found");
}

TEST_F(ChangedFileTest, ReplacedByAnotherFileOfTheSameSize) {
  const std::string other = Path("other.safetensors");
  ASSERT_TRUE(WriteSafetensors(other, {{"a", Tensor::FromVector({9, 9, 9, 9}, {4})},
                                       {"b", Tensor::FromVector({9, 9, 9, 9}, {2, 2})}})
                  .ok());
  ASSERT_EQ(fs::file_size(other), fs::file_size(path_));
  fs::rename(other, path_);
  ExpectReadsFail("the path now names another file");
}

TEST_F(ChangedFileTest, RewrittenInPlace) {
  // Same inode and size, new contents; the modification time is set apart explicitly, since two
  // writes within one kernel clock tick may share a timestamp.
  struct stat before;
  ASSERT_EQ(::stat(path_.c_str(), &before), 0);
  auto raw = ReadFileToString(path_);
  ASSERT_TRUE(raw.ok());
  std::string changed = *raw;
  changed.back() ^= 1;
  const int fd = ::open(path_.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, changed.data(), changed.size(), 0), static_cast<ssize_t>(changed.size()));
  struct timespec times[2] = {before.st_atim, before.st_mtim};
  times[1].tv_sec += 1;
  ASSERT_EQ(::futimens(fd, times), 0);
  ::close(fd);
  ExpectReadsFail("it was modified");
}

TEST_F(SafetensorsTest, ReadIntoCopiesTheStoredBytesAndChecksTheSize) {
  const Tensor w = Tensor::FromVector({1, 2, 3, 4, 5, 6}, {2, 3});
  const Tensor ids = I32Tensor({7, 8}, {2});
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), {{"w", w}, {"ids", ids}}).ok());
  auto reader = CheckpointReader::Open(dir_);
  ASSERT_TRUE(reader.ok()) << reader.status();

  std::string buf(w.nbytes(), '\0');
  ASSERT_TRUE((*reader)->ReadInto("w", buf.data(), buf.size()).ok());
  EXPECT_EQ(buf, Bytes(w));
  std::string small(ids.nbytes(), '\0');
  ASSERT_TRUE((*reader)->ReadInto("ids", small.data(), small.size()).ok());
  EXPECT_EQ(small, Bytes(ids));

  const absl::Status wrong = (*reader)->ReadInto("w", buf.data(), buf.size() - 1);
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument) << wrong;
  EXPECT_THAT(std::string(wrong.message()), HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(std::string(wrong.message()), HasSubstr("tensor \"w\" has 24 bytes"));
  EXPECT_EQ((*reader)->ReadInto("nope", buf.data(), buf.size()).code(),
            absl::StatusCode::kNotFound);

  // Concurrent reads from several threads all see the stored bytes.
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int k = 0; k < 50; ++k) {
        std::string out(w.nbytes(), '\0');
        if ((*reader)->ReadInto("w", out.data(), out.size()).ok() && out == Bytes(w)) ++good;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), 200);

  // In-memory files read the same way.
  auto bytes = SerializeSafetensors({{"w", w}});
  ASSERT_TRUE(bytes.ok());
  auto mem = SafetensorsFile::FromBytes(*bytes, "artifact");
  ASSERT_TRUE(mem.ok()) << mem.status();
  std::string from_mem(w.nbytes(), '\0');
  ASSERT_TRUE((*mem)->ReadInto("w", from_mem.data(), from_mem.size()).ok());
  EXPECT_EQ(from_mem, Bytes(w));
}

TEST_F(SafetensorsTest, GetReturnsAnIndependentCopy) {
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w", Tensor::FromVector({1, 2}, {2})}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto first = (*file)->Get("w");
  ASSERT_TRUE(first.ok());
  first->data<float>()[0] = 99;  // callers must not, but a copy cannot corrupt later reads
  auto second = (*file)->Get("w");
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->data<float>()[0], 1.0f);
}

TEST_F(SafetensorsTest, OpensThroughProcSelfFd) {
  // services/common/input_paths.cc validates model files through /proc/self/fd/N.
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w", Tensor::FromVector({1, 2}, {2})}}).ok());
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  const std::string proc = absl::StrCat("/proc/self/fd/", fd);
  {
    auto file = SafetensorsFile::Open(proc);
    ASSERT_TRUE(file.ok()) << file.status();
    auto w = (*file)->Get("w");
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->data<float>()[1], 2.0f);
  }
  ::close(fd);
}

TEST_F(SafetensorsTest, DirectoryIsNotASafetensorsFile) {
  ExpectOpenError(dir_, "not a regular file");
}

}  // namespace
}  // namespace qcal
