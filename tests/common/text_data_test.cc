// Tests of the data protocols of DESIGN section 4 (common/text_data.h) and of the tokenizer
// wrapper (common/tokenizer.h). Calibration sampling is checked against an independent
// re-implementation of SplitMix64 and of the sampling rule, pinned by the generator's published
// test vector.
#include "common/text_data.h"

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "common/files.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int kBos = 1;

// SplitMix64 as published by Vigna (splitmix64.c), written out independently of the library.
uint64_t ReferenceSplitMix64(uint64_t& state) {
  state += 0x9e3779b97f4a7c15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Tokens whose values identify their positions: T[i] = 1000 + i.
std::vector<int> PositionTokens(int n) {
  std::vector<int> t(n);
  for (int i = 0; i < n; ++i) t[i] = 1000 + i;
  return t;
}

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("text_data_test");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Write(const std::string& name, const std::string& contents) {
    const std::string path = (fs::path(dir_) / name).string();
    EXPECT_TRUE(WriteStringToFile(path, contents).ok());
    return path;
  }
  std::string dir_;
};

TEST(SplitMix64Test, PublishedTestVectorAndReferenceAgree) {
  uint64_t state = 0;
  EXPECT_EQ(ReferenceSplitMix64(state), 0xe220a8397b1dcdafull);
  EXPECT_EQ(SplitMix64(0).Next(), 0xe220a8397b1dcdafull);
  for (uint64_t seed : {0ull, 1ull, 42ull, 0xffffffffffffffffull}) {
    SplitMix64 rng(seed);
    uint64_t ref_state = seed;
    for (int i = 0; i < 1000; ++i) ASSERT_EQ(rng.Next(), ReferenceSplitMix64(ref_state)) << seed;
  }
}

TEST(EvalWindowsTest, BosPlusFirstLMinusOneTokensPredictingL) {
  const std::vector<int> tokens = PositionTokens(11);  // two windows of 4, tail of 3 dropped
  auto w = MakeEvalWindows(tokens, 4, -1, kBos, "eval.txt");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->seq_len, 4);
  ASSERT_EQ(w->inputs.size(), 2u);
  ASSERT_EQ(w->targets.size(), 2u);
  EXPECT_EQ(w->inputs[0], (std::vector<int>{kBos, 1000, 1001, 1002}));
  EXPECT_EQ(w->targets[0], (std::vector<int>{1000, 1001, 1002, 1003}));
  EXPECT_EQ(w->inputs[1], (std::vector<int>{kBos, 1004, 1005, 1006}));
  EXPECT_EQ(w->targets[1], (std::vector<int>{1004, 1005, 1006, 1007}));
}

TEST(EvalWindowsTest, MaxWindowsKeepsTheFirstK) {
  const std::vector<int> tokens = PositionTokens(40);
  auto w = MakeEvalWindows(tokens, 8, 3, kBos, "eval.txt");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(w->inputs.size(), 3u);
  EXPECT_EQ(w->targets[2].front(), 1016);
  // K beyond the number of windows keeps them all.
  w = MakeEvalWindows(tokens, 8, 100, kBos, "eval.txt");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->inputs.size(), 5u);
  // Exactly one window's worth of tokens is enough.
  w = MakeEvalWindows(PositionTokens(8), 8, -1, kBos, "eval.txt");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->inputs.size(), 1u);
}

TEST(EvalWindowsTest, TooShortTextIsAnErrorNamingTheSource) {
  auto w = MakeEvalWindows(PositionTokens(7), 8, -1, kBos, "data/short.txt");
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("data/short.txt"));
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("7 tokens"));
  EXPECT_FALSE(MakeEvalWindows({}, 8, -1, kBos, "empty").ok());
  EXPECT_FALSE(MakeEvalWindows(PositionTokens(10), 1, -1, kBos, "x").ok());
}

TEST(CalibrationTest, MatchesIndependentSamplingRule) {
  const std::vector<int> tokens = PositionTokens(100);
  for (uint64_t seed : {0ull, 7ull, 123456789ull}) {
    const int n = 20, len = 16;
    auto samples = SampleCalibration(tokens, n, len, seed, kBos, "calib.txt");
    ASSERT_TRUE(samples.ok()) << samples.status();
    ASSERT_EQ(samples->size(), size_t(n));
    uint64_t state = seed;
    for (int i = 0; i < n; ++i) {
      const uint64_t p = ReferenceSplitMix64(state) % (tokens.size() - len + 2);
      std::vector<int> want = {kBos};
      for (int j = 0; j < len - 1; ++j) want.push_back(tokens[p + j]);
      EXPECT_EQ((*samples)[i], want) << "seed " << seed << " sample " << i;
    }
  }
}

TEST(CalibrationTest, SeedZeroFirstSamplePosition) {
  // p = 0xe220a8397b1dcdaf mod (100 - 16 + 2) = 61, so sample 0 is BOS, T[61..75].
  ASSERT_EQ(0xe220a8397b1dcdafull % 86, 61u);
  auto samples = SampleCalibration(PositionTokens(100), 1, 16, 0, kBos, "calib.txt");
  ASSERT_TRUE(samples.ok());
  EXPECT_EQ((*samples)[0][1], 1061);
  EXPECT_EQ((*samples)[0].back(), 1075);
}

TEST(CalibrationTest, DeterministicAndSeedDependent) {
  const std::vector<int> tokens = PositionTokens(5000);
  auto a = SampleCalibration(tokens, 16, 64, 3, kBos, "c");
  auto b = SampleCalibration(tokens, 16, 64, 3, kBos, "c");
  auto c = SampleCalibration(tokens, 16, 64, 4, kBos, "c");
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_NE(*a, *c);
}

TEST(CalibrationTest, ShortestTextAndTooShortText) {
  // |T| = L - 1: the only start is 0, and every sample is BOS followed by the whole text.
  auto s = SampleCalibration(PositionTokens(15), 3, 16, 9, kBos, "calib.txt");
  ASSERT_TRUE(s.ok()) << s.status();
  for (const auto& sample : *s) {
    ASSERT_EQ(sample.size(), 16u);
    EXPECT_EQ(sample[1], 1000);
    EXPECT_EQ(sample[15], 1014);
  }
  auto short_text = SampleCalibration(PositionTokens(14), 3, 16, 0, kBos, "data/calib.txt");
  ASSERT_FALSE(short_text.ok());
  EXPECT_THAT(std::string(short_text.status().message()), HasSubstr("data/calib.txt"));
  EXPECT_THAT(std::string(short_text.status().message()), HasSubstr("too short"));
  EXPECT_FALSE(SampleCalibration(PositionTokens(100), 0, 16, 0, kBos, "c").ok());
  EXPECT_FALSE(SampleCalibration(PositionTokens(100), 4, 1, 0, kBos, "c").ok());
}

using CorpusTest = TempDirTest;

TEST_F(CorpusTest, PlainTextIsReturnedVerbatim) {
  const std::string text = "First story.\n\nSecond story,\twith a tab.\n";
  auto got = LoadCorpusText(Write("corpus.txt", text));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, text);
}

TEST_F(CorpusTest, JsonlTextFieldsJoinedByBlankLines) {
  const std::string path =
      Write("corpus.jsonl",
            "{\"text\": \"alpha\", \"id\": 1}\n\n{\"text\": \"beta\\ngamma\"}\r\n"
            "{\"id\": 3, \"text\": \"delta\"}");
  auto got = LoadCorpusText(path);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "alpha\n\nbeta\ngamma\n\ndelta");
}

TEST_F(CorpusTest, MalformedJsonlLineIsNamedByNumber) {
  const std::string path = Write("bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": oops}\n");
  auto got = LoadCorpusText(path);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr(path + ":3:"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("malformed JSON line"));

  const std::string no_text = Write("no_text.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
  got = LoadCorpusText(no_text);
  ASSERT_FALSE(got.ok());
  EXPECT_THAT(std::string(got.status().message()), HasSubstr(no_text + ":2:"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("\"text\""));
}

TEST_F(CorpusTest, EmptyTextIsAnError) {
  for (const auto& [name, contents] :
       std::vector<std::pair<std::string, std::string>>{{"empty.txt", ""},
                                                        {"blank.txt", " \n\n\t\r\n"},
                                                        {"empty.jsonl", "{\"text\": \"\"}\n"}}) {
    const std::string path = Write(name, contents);
    auto got = LoadCorpusText(path);
    ASSERT_FALSE(got.ok()) << name;
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_THAT(std::string(got.status().message()), HasSubstr(path + ": text is empty"));
  }
}

TEST_F(CorpusTest, MissingFileNamesThePath) {
  const std::string path = (fs::path(dir_) / "absent.txt").string();
  auto got = LoadCorpusText(path);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr(path));
}

using TokenizerTest = TempDirTest;

TEST_F(TokenizerTest, GarbageFileIsAnErrorNamingThePath) {
  std::string garbage;
  for (int i = 0; i < 4096; ++i) garbage.push_back(static_cast<char>((i * 7919 + 13) & 0xff));
  const std::string path = Write("tokenizer.model", garbage);
  auto tok = Tokenizer::Load(path);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(path));
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("unreadable tokenizer"));
  // Loading the directory finds the same file.
  tok = Tokenizer::Load(dir_);
  ASSERT_FALSE(tok.ok());
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(path));
}

TEST_F(TokenizerTest, MissingFileIsNotFound) {
  auto tok = Tokenizer::Load(dir_);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(dir_));
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("tokenizer.json or tokenizer.model"));
}

TEST(SharedTokenizerTest, Stories260kEncodeDecodeRoundTrip) {
  QCAL_REQUIRE_SHARED();
  auto tok = Tokenizer::Load(testing::SharedDir() + "/models/stories260k");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 512);
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);

  const std::string text =
      "Once upon a time, there was a little girl named Lily. She loved to play outside.";
  auto ids = (*tok)->Encode(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_FALSE(ids->empty());
  EXPECT_LT(ids->size(), text.size());  // pieces longer than one byte are used
  for (int id : *ids) {
    EXPECT_GE(id, 3);  // no BOS, EOS or unknown
    EXPECT_LT(id, 512);
  }
  auto back = (*tok)->Decode(*ids);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, text);

  auto bad = (*tok)->Decode({5, 512});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("512"));
  EXPECT_FALSE((*tok)->Decode({-1}).ok());
}

TEST(SharedTokenizerTest, EvalTextRoundTrips) {
  QCAL_REQUIRE_SHARED();
  auto tok = Tokenizer::Load(testing::SharedDir() + "/models/stories260k/tokenizer.model");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto text = LoadCorpusText(testing::SharedDir() + "/data/tinystories-eval.txt");
  ASSERT_TRUE(text.ok()) << text.status();
  auto ids = (*tok)->Encode(*text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  // 24,064 predicted tokens at L = 256 (shared/README.md): 94 full windows.
  EXPECT_EQ(ids->size() / 256, 94u);
}

}  // namespace
}  // namespace qcal
