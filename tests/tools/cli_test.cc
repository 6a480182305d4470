// End-to-end tests of the `qcal` binary, run as a subprocess (DESIGN section 6 conventions):
// results on stdout only, exactly one JSON object with --json, the reference perplexities and the
// golden greedy sample, and bad input failing with exit status 1 and one stderr line naming the
// culprit. Broken model directories are built in a temp dir from copies of stories260k's files.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::QcalPath;
using testing::RunQcal;
using testing::RunResult;
using ::testing::StartsWith;

// Reference perplexities (shared/README.md): within 0.1%.
constexpr double kPerplexityTolerance = 1e-3;

std::string Shared(const std::string& rel) { return testing::SharedDir() + "/" + rel; }

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(QcalPath())) << QcalPath() << " is not built";
    dir_ = testing::MakeTempDir("cli_test");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& rel) const { return (fs::path(dir_) / rel).string(); }

  void WriteFile(const std::string& path, const std::string& contents) {
    ASSERT_TRUE(WriteStringToFile(path, contents).ok()) << path;
  }

  // A writable copy of stories260k's config, weights and tokenizer in the temp dir. The shared
  // files are read-only and must never be written, so each is read and written anew.
  std::string CopyStories(const std::string& name) {
    const std::string dst = Path(name);
    fs::create_directories(dst);
    for (const char* file : {"config.json", "model.safetensors", "tokenizer.model"}) {
      auto bytes = ReadFileToString(Shared(std::string("models/stories260k/") + file));
      EXPECT_TRUE(bytes.ok()) << bytes.status();
      if (bytes.ok()) WriteFile(dst + "/" + file, *bytes);
    }
    return dst;
  }

  // Rewrites `model_dir`/config.json through `edit`.
  void EditConfig(const std::string& model_dir, void (*edit)(nlohmann::json&)) {
    auto text = ReadFileToString(model_dir + "/config.json");
    ASSERT_TRUE(text.ok());
    nlohmann::json j = nlohmann::json::parse(*text);
    edit(j);
    WriteFile(model_dir + "/config.json", j.dump(2));
  }

  // A failed run: exit status 1 (not a signal), nothing on stdout, and exactly one stderr line
  // that names every string in `culprits`.
  static void ExpectCleanFailure(const RunResult& r, const std::vector<std::string>& culprits) {
    EXPECT_TRUE(r.exited) << "killed by signal " << r.signal;
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.out, "");
    EXPECT_THAT(r.err, StartsWith("qcal: error: "));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.back(), '\n') << r.err;
    for (const std::string& c : culprits) EXPECT_THAT(r.err, HasSubstr(c));
  }

  RunResult EvalStories(const std::string& model_dir, const std::string& text, int seq_len = 256) {
    return RunQcal({"eval", "--model", model_dir, "--text", text, "--seq-len",
                    std::to_string(seq_len), "--threads", "2"});
  }

  std::string dir_;
};

// Parses stdout as exactly one line holding one JSON object.
nlohmann::json ParseJsonLine(const std::string& out) {
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  EXPECT_FALSE(out.empty());
  EXPECT_EQ(out.back(), '\n');
  nlohmann::json j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
  EXPECT_TRUE(j.is_object()) << out;
  return j;
}

void ExpectEvalJson(const nlohmann::json& j, double perplexity, int64_t tokens, int64_t windows) {
  ASSERT_TRUE(j.is_object());
  for (const char* key : {"perplexity", "nll", "tokens", "windows", "seconds"}) {
    ASSERT_TRUE(j.contains(key)) << key;
  }
  EXPECT_EQ(j.size(), 5u) << j.dump();
  const double ppl = j["perplexity"].get<double>();
  EXPECT_NEAR(ppl, perplexity, perplexity * kPerplexityTolerance);
  EXPECT_NEAR(std::log(ppl), j["nll"].get<double>(), 1e-9);
  EXPECT_EQ(j["tokens"].get<int64_t>(), tokens);
  EXPECT_EQ(j["windows"].get<int64_t>(), windows);
  EXPECT_GT(j["seconds"].get<double>(), 0.0);
}

TEST_F(CliTest, GenerateReproducesGoldenSample) {
  QCAL_REQUIRE_SHARED();
  const RunResult r =
      RunQcal({"generate", "--model", Shared("models/stories260k"), "--max-new-tokens", "256"});
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.err;
  auto golden = ReadFileToString(Shared("models/stories260k/greedy_256.txt"));
  ASSERT_TRUE(golden.ok());
  EXPECT_EQ(r.out, *golden);
}

TEST_F(CliTest, EvalStories260kMatchesReference) {
  QCAL_REQUIRE_SHARED();
  const RunResult r = RunQcal({"eval", "--model", Shared("models/stories260k"), "--text",
                               Shared("data/tinystories-eval.txt"), "--seq-len", "256", "--json",
                               "--threads", "2"});
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.err;
  ExpectEvalJson(ParseJsonLine(r.out), 6.8908, 24064, 94);
}

TEST_F(CliTest, EvalSotuMatchesReference) {
  QCAL_REQUIRE_SHARED();
  const RunResult r = RunQcal({"eval", "--model", Shared("models/sotu-llama-16m"), "--text",
                               Shared("data/sotu-eval.txt"), "--seq-len", "512", "--max-windows",
                               "32", "--json", "--threads", "2"});
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.err;
  ExpectEvalJson(ParseJsonLine(r.out), 28.728, 16384, 32);
}

// DESIGN section 4, "Text files": a CRLF copy with a BOM is read as the LF file, so the
// perplexity is exactly the same; an invalid byte is an error naming its offset.
TEST_F(CliTest, EvalOfACrlfCopyWithABomIsExactlyTheLfPerplexity) {
  QCAL_REQUIRE_SHARED();
  auto lf = ReadFileToString(Shared("data/tinystories-eval.txt"));
  ASSERT_TRUE(lf.ok());
  std::string crlf = "\xEF\xBB\xBF";
  for (char c : *lf) {
    if (c == '\n') crlf += '\r';
    crlf += c;
  }
  WriteFile(Path("crlf.txt"), crlf);
  const RunResult a = RunQcal({"eval", "--model", Shared("models/stories260k"), "--text",
                               Shared("data/tinystories-eval.txt"), "--seq-len", "256", "--json"});
  const RunResult b = RunQcal({"eval", "--model", Shared("models/stories260k"), "--text",
                               Path("crlf.txt"), "--seq-len", "256", "--json"});
  ASSERT_TRUE(a.exit_code == 0 && b.exit_code == 0) << a.err << b.err;
  const nlohmann::json ja = ParseJsonLine(a.out), jb = ParseJsonLine(b.out);
  EXPECT_EQ(ja["perplexity"].get<double>(), jb["perplexity"].get<double>());
  EXPECT_EQ(jb["tokens"].get<int64_t>(), 24064);

  WriteFile(Path("bad.txt"), *lf + "\xC3(");
  ExpectCleanFailure(EvalStories(Shared("models/stories260k"), Path("bad.txt")),
                     {Path("bad.txt"), absl::StrCat("byte offset ", lf->size())});
}

TEST_F(CliTest, TokenizePrintsIdsOrTheirNumber) {
  QCAL_REQUIRE_SHARED();
  const std::string model = Shared("models/stories260k");
  const RunResult count = RunQcal(
      {"tokenize", "--model", model, "--text", Shared("data/tinystories-eval.txt"), "--count"});
  ASSERT_EQ(count.exit_code, 0) << count.err;
  EXPECT_EQ(count.out, "24183\n");  // 94 windows of 256 and a tail of 119
  WriteFile(Path("two.jsonl"), "{\"text\": \"Once upon a time\"}\n{\"text\": \"Lily\"}\n");
  const RunResult each = RunQcal(
      {"tokenize", "--model", model, "--text", Path("two.jsonl"), "--json", "--each-record"});
  ASSERT_EQ(each.exit_code, 0) << each.err;
  const std::vector<std::string> lines = absl::StrSplit(each.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << each.out;
  const nlohmann::json first = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(first["count"].get<size_t>(), first["ids"].size());
  EXPECT_GT(first["ids"].size(), 1u);
  const RunResult plain = RunQcal({"tokenize", "--model", model, "--text", Path("two.jsonl")});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  std::vector<std::string> ids;
  for (const auto& id : first["ids"]) ids.push_back(std::to_string(id.get<int>()));
  EXPECT_THAT(plain.out, StartsWith(absl::StrJoin(ids, " ") + " "));
  ExpectCleanFailure(RunQcal({"tokenize", "--model", Path("none"), "--text", Path("two.jsonl")}),
                     {Path("none")});
}

TEST_F(CliTest, MissingModelDirectory) {
  const std::string model = Path("no-such-model");
  WriteFile(Path("text.txt"), "Once upon a time.\n");
  ExpectCleanFailure(EvalStories(model, Path("text.txt")), {model});
  ExpectCleanFailure(RunQcal({"generate", "--model", model, "--max-new-tokens", "4"}), {model});
}

TEST_F(CliTest, TruncatedSafetensors) {
  QCAL_REQUIRE_SHARED();
  const std::string model = CopyStories("truncated");
  const std::string weights = model + "/model.safetensors";
  auto bytes = ReadFileToString(weights);
  ASSERT_TRUE(bytes.ok());
  // Cut inside the data section: the header is intact but its offsets run past the end.
  WriteFile(weights, bytes->substr(0, bytes->size() / 2));
  ExpectCleanFailure(EvalStories(model, Shared("data/tinystories-eval.txt")),
                     {weights, "run past the end"});
  // Cut inside the 8-byte length prefix.
  WriteFile(weights, bytes->substr(0, 5));
  ExpectCleanFailure(EvalStories(model, Shared("data/tinystories-eval.txt")),
                     {weights, "truncated"});
  ExpectCleanFailure(RunQcal({"generate", "--model", model, "--max-new-tokens", "4"}),
                     {weights, "truncated"});
}

TEST_F(CliTest, UnsupportedArchitecture) {
  QCAL_REQUIRE_SHARED();
  const std::string model = CopyStories("gpt2");
  EditConfig(model, [](nlohmann::json& j) { j["model_type"] = "gpt2"; });
  ExpectCleanFailure(EvalStories(model, Shared("data/tinystories-eval.txt")),
                     {model + "/config.json", "gpt2"});
}

TEST_F(CliTest, ConfigMissingKey) {
  QCAL_REQUIRE_SHARED();
  const std::string model = CopyStories("no-hidden-size");
  EditConfig(model, [](nlohmann::json& j) { j.erase("hidden_size"); });
  ExpectCleanFailure(EvalStories(model, Shared("data/tinystories-eval.txt")),
                     {model + "/config.json", "hidden_size"});
}

TEST_F(CliTest, UnreadableTokenizer) {
  QCAL_REQUIRE_SHARED();
  const std::string model = CopyStories("bad-tokenizer");
  std::string garbage(4096, '\0');
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<char>((i * 131 + 7) & 0xff);
  WriteFile(model + "/tokenizer.model", garbage);
  ExpectCleanFailure(EvalStories(model, Shared("data/tinystories-eval.txt")),
                     {model + "/tokenizer.model"});
}

TEST_F(CliTest, EmptyText) {
  QCAL_REQUIRE_SHARED();
  WriteFile(Path("empty.txt"), "");
  ExpectCleanFailure(EvalStories(Shared("models/stories260k"), Path("empty.txt")),
                     {Path("empty.txt"), "empty"});
}

TEST_F(CliTest, TextShorterThanOneWindow) {
  QCAL_REQUIRE_SHARED();
  WriteFile(Path("short.txt"), "Once upon a time, there was a little girl.\n");
  ExpectCleanFailure(EvalStories(Shared("models/stories260k"), Path("short.txt"), 256),
                     {Path("short.txt"), "too short"});
}

TEST_F(CliTest, MissingTextFile) {
  QCAL_REQUIRE_SHARED();
  ExpectCleanFailure(EvalStories(Shared("models/stories260k"), Path("absent.txt")),
                     {Path("absent.txt")});
}

// Usage errors (the option parser's) follow DESIGN section 6 too: a non-zero exit, nothing on
// stdout, one stderr line naming the option; --help is not an error.
TEST_F(CliTest, UsageErrorsGoToStderr) {
  auto expect_usage_error = [](const RunResult& r, const std::string& culprit) {
    EXPECT_TRUE(r.exited);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_EQ(r.out, "");
    EXPECT_THAT(r.err, StartsWith("qcal: error: "));
    EXPECT_THAT(r.err, HasSubstr(culprit));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  };
  expect_usage_error(RunQcal({"eval", "--model", Path("m")}), "--text");
  expect_usage_error(RunQcal({"frobnicate"}), "frobnicate");
  expect_usage_error(RunQcal({"eval", "--model", Path("m"), "--text", Path("t"), "--seq-len", "1"}),
                     "--seq-len");
  // CLI11 alone would take -1 as 2^64 - 1.
  expect_usage_error(RunQcal({"synth", "--out", Path("s"), "--seed", "-1"}),
                     "--seed: must be a non-negative integer, got -1");
  const RunResult help = RunQcal({"eval", "--help"});
  EXPECT_TRUE(help.exited);
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.out, HasSubstr("--compute-dtype"));
}

// The subcommand names listed under "Subcommands:" in `qcal --help`.
std::vector<std::string> ListedSubcommands(const std::string& help) {
  std::vector<std::string> names;
  const size_t start = help.find("Subcommands:\n");
  if (start == std::string::npos) return names;
  size_t pos = start + 13;
  while (pos < help.size()) {
    size_t eol = help.find('\n', pos);
    if (eol == std::string::npos) eol = help.size();
    const std::string line = help.substr(pos, eol - pos);
    pos = eol + 1;
    const size_t name_begin = line.find_first_not_of(' ');
    if (name_begin == std::string::npos || name_begin == 0) break;
    names.push_back(line.substr(name_begin, line.find(' ', name_begin) - name_begin));
  }
  return names;
}

TEST_F(CliTest, HelpListsEveryOption) {
  const RunResult top = RunQcal({"--help"});
  EXPECT_EQ(top.exit_code, 0);
  const std::vector<std::string> subcommands = ListedSubcommands(top.out);
  for (const char* required : {"eval", "generate", "synth", "tokenize"}) {
    EXPECT_THAT(subcommands, ::testing::Contains(required)) << top.out;
  }
  // Every subcommand's help goes to stdout with status 0.
  for (const std::string& command : subcommands) {
    const RunResult r = RunQcal({command, "--help"});
    EXPECT_TRUE(r.exited) << command;
    EXPECT_EQ(r.exit_code, 0) << command;
    EXPECT_EQ(r.err, "") << command;
    EXPECT_THAT(r.out, HasSubstr("qcal " + command + " [OPTIONS]"));
  }
  const std::vector<std::pair<std::string, std::vector<std::string>>> documented = {
      {"eval",
       {"--model", "--text", "--seq-len", "--max-windows", "--device", "--compute-dtype",
        "--threads", "--json"}},
      {"generate",
       {"--model", "--prompt", "--max-new-tokens", "--device", "--compute-dtype", "--threads"}},
  };
  for (const auto& [command, options] : documented) {
    const RunResult r = RunQcal({command, "--help"});
    for (const std::string& option : options) EXPECT_THAT(r.out, HasSubstr(option)) << command;
  }
}

}  // namespace
}  // namespace qcal
