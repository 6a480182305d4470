// `qcal quantize` bad input through the command line (issue 3): each case exits 1 with one line on
// stderr naming the key, value or path at fault, prints nothing on stdout, and leaves no output or
// temporary directory behind.
#include <filesystem>
#include <string>
#include <vector>

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

class QuantizeCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    QCAL_REQUIRE_SHARED();
    dir_ = testing::MakeTempDir("quantize-cli");
    model_ = testing::SharedDir() + "/models/stories260k";
    calib_ = testing::SharedDir() + "/data/tinystories-calib.txt";
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  std::string WriteRecipe(const std::string& yaml) {
    const std::string path = dir_ + "/recipe-" + std::to_string(++n_) + ".yaml";
    EXPECT_TRUE(WriteStringToFile(path, yaml).ok());
    return path;
  }

  testing::RunResult Quantize(const std::string& recipe, const std::string& out,
                              const std::string& calib, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"quantize", "--model", model_,      "--recipe",  recipe,
                                     "--calib",  calib,     "--samples", "4",         "--seq-len",
                                     "32",       "--out",   out,         "--threads", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    return testing::RunQcal(args);
  }

  // Exit status 1, nothing on stdout, and exactly one error line on stderr (progress logs may
  // precede it), which contains `needle`.
  void ExpectCleanError(const testing::RunResult& r, const std::string& needle) {
    EXPECT_TRUE(r.exited) << "killed by signal " << r.signal;
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.out, "");
    std::vector<std::string> errors;
    size_t pos = 0;
    while (pos < r.err.size()) {
      size_t nl = r.err.find('\n', pos);
      if (nl == std::string::npos) nl = r.err.size();
      const std::string line = r.err.substr(pos, nl - pos);
      if (line.rfind("qcal: error: ", 0) == 0) errors.push_back(line);
      pos = nl + 1;
    }
    ASSERT_EQ(errors.size(), 1u) << r.err;
    EXPECT_THAT(errors[0], HasSubstr(needle));
  }

  std::string dir_, model_, calib_;
  int n_ = 0;
};

TEST_F(QuantizeCliTest, RecipeErrorsNameTheKey) {
  const struct {
    std::string yaml, needle;
  } cases[] = {
      {"method: gptq\nweights: {bits: 4, groupsize: 128}\n", "weights.groupsize"},
      {"method: gptq\nweights: {bits: 4}\nturbo: true\n", "\"turbo\""},
      {"method: gptq\nweights: {bits: 9}\n", "weights.bits"},
      {"method: gptq\nweights: {bits: 1}\n", "weights.bits"},
      {"method: gptq\nweights: {bits: 4, group_size: 0}\n", "weights.group_size"},
      {"method: gptq\nweights: {bits: 4, group_size: -2}\n", "weights.group_size"},
      {"method: awq\nweights: {bits: 4}\n", "method"},
      {"weights: {bits: 4}\n", "method"},
      {"method: rtn\n", "weights.bits"},
      {"method: gptq\nweights: {bits: four}\n", "weights.bits"},
      {"method: gptq\nweights: {bits: 4}\ngptq: {damp: 2}\n", "gptq.damp"},
      {"method: [gptq\n", "malformed YAML"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.yaml);
    const std::string out = dir_ + "/out";
    ExpectCleanError(Quantize(WriteRecipe(c.yaml), out, calib_), c.needle);
    EXPECT_FALSE(fs::exists(out));
  }
}

TEST_F(QuantizeCliTest, CalibrationTextShorterThanOneSample) {
  const std::string short_text = dir_ + "/short.txt";
  ASSERT_TRUE(WriteStringToFile(short_text, "Once upon a time.").ok());
  const std::string out = dir_ + "/out";
  ExpectCleanError(Quantize(WriteRecipe("method: rtn\nweights: {bits: 4}\n"), out, short_text),
                   "too short");
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(dir_ + "/.out.qcal-tmp"));
}

TEST_F(QuantizeCliTest, OutputDirectoryNotEmptyNeedsOverwrite) {
  const std::string out = dir_ + "/taken";
  fs::create_directories(out);
  ASSERT_TRUE(WriteStringToFile(out + "/keep.txt", "precious").ok());
  const std::string recipe = WriteRecipe("method: rtn\nweights: {bits: 4}\n");
  ExpectCleanError(Quantize(recipe, out, calib_), "--overwrite");
  EXPECT_EQ(*ReadFileToString(out + "/keep.txt"), "precious");
  // With --overwrite the job replaces it.
  testing::RunResult r = Quantize(recipe, out, calib_, {"--overwrite", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(out + "/keep.txt"));
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  EXPECT_THAT(r.out, HasSubstr("\"out\""));
}

TEST_F(QuantizeCliTest, SlidingWindowShorterThanTheSequenceRuns) {
  // stories260k as a Mistral checkpoint with a 16-token sliding window: a 32-token job and a
  // 32-token evaluation run with the window's mask (issue 20), so the perplexity differs from the
  // full-attention model's; 16 tokens (the window covers every position) give the same.
  const std::string model = dir_ + "/windowed";
  fs::copy(model_, model, fs::copy_options::recursive);
  auto config = ReadFileToString(model + "/config.json");
  ASSERT_TRUE(config.ok());
  nlohmann::json j = nlohmann::json::parse(*config);
  j["model_type"] = "mistral";
  j["sliding_window"] = 16;
  ASSERT_TRUE(WriteStringToFile(model + "/config.json", j.dump()).ok());
  const std::string recipe = WriteRecipe("method: rtn\nweights: {bits: 4}\n");
  const std::string out = dir_ + "/out";
  const std::string full_model = model_;
  model_ = model;
  const testing::RunResult q = Quantize(recipe, out, calib_);
  EXPECT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(fs::exists(out + "/config.json"));
  auto ppl = [&](const std::string& m, int seq_len) {
    const testing::RunResult r =
        testing::RunQcal({"eval", "--model", m, "--text", calib_, "--seq-len",
                          std::to_string(seq_len), "--max-windows", "2", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? nlohmann::json::parse(r.out)["perplexity"].get<double>() : -1.0;
  };
  EXPECT_NE(ppl(model, 32), ppl(full_model, 32));
  EXPECT_EQ(ppl(model, 16), ppl(full_model, 16));
}

TEST_F(QuantizeCliTest, UnsupportedModelTypeAndOutOfRangeConfigValuesAreNamed) {
  const std::string recipe = WriteRecipe("method: rtn\nweights: {bits: 4}\n");
  const struct {
    const char* key;
    nlohmann::json value;
    std::string needle;
  } cases[] = {
      {"model_type", "gemma2", "key \"model_type\" is \"gemma2\""},
      {"rms_norm_eps", 0.0, "key \"rms_norm_eps\" is 0"},
      {"rope_theta", 1e308, "key \"rope_theta\""},
      {"max_position_embeddings", -1, "key \"max_position_embeddings\" is -1"},
      {"rope_scaling",
       {{"rope_type", "dynamic"}, {"factor", 2.0}},
       "key \"rope_scaling.rope_type\" is \"dynamic\""},
  };
  const std::string base = model_;
  int n = 0;
  for (const auto& c : cases) {
    const std::string model = dir_ + "/bad" + std::to_string(n++);
    fs::copy(base, model, fs::copy_options::recursive);
    auto config = ReadFileToString(model + "/config.json");
    ASSERT_TRUE(config.ok());
    nlohmann::json j = nlohmann::json::parse(*config);
    j[c.key] = c.value;
    ASSERT_TRUE(WriteStringToFile(model + "/config.json", j.dump()).ok());
    model_ = model;
    const std::string out = dir_ + "/out-bad";
    ExpectCleanError(Quantize(recipe, out, calib_), c.needle);
    EXPECT_FALSE(fs::exists(out)) << c.key;
  }
}

TEST_F(QuantizeCliTest, OutputDirectoryNotWritable) {
  // A regular file where the parent directory should be: nothing can be created there (this holds
  // for root too, unlike permission bits).
  const std::string blocker = dir_ + "/blocker";
  ASSERT_TRUE(WriteStringToFile(blocker, "x").ok());
  ExpectCleanError(
      Quantize(WriteRecipe("method: rtn\nweights: {bits: 4}\n"), blocker + "/out", calib_),
      blocker);
}

TEST_F(QuantizeCliTest, MissingInputsNameThePath) {
  const std::string recipe = WriteRecipe("method: rtn\nweights: {bits: 4}\n");
  ExpectCleanError(Quantize(recipe, dir_ + "/out", dir_ + "/no-such-calib.txt"),
                   "no-such-calib.txt");
  ExpectCleanError(Quantize(dir_ + "/no-such-recipe.yaml", dir_ + "/out", calib_),
                   "no-such-recipe.yaml");
}

}  // namespace
}  // namespace qcal
