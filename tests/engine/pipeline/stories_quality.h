// The fixture of the quality-expectation tests (issues 6 and 12): quantizes stories260k through
// `qcal quantize` with the calibration and evaluation settings of the docs/QUALITY.md tables
// (128 x 256 on tinystories-calib, seed 0; tinystories-eval at L = 256, all windows) and returns
// the exported checkpoint's perplexity. Skips without ../shared.
#pragma once

#include <filesystem>
#include <map>
#include <string>

#include "common/files.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {

class StoriesQualityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    QCAL_REQUIRE_SHARED();
    dir_ = MakeTempDir("stories-quality");
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // Quantizes stories260k with `yaml` (calibration 128 x 256 on tinystories-calib, seed 0) and
  // returns the exported checkpoint's perplexity on tinystories-eval (L = 256, all windows), or a
  // negative number after recording a failure. A recipe is quantized once per test process: the
  // runs are deterministic (DESIGN section 2), so a second run of the same recipe (a baseline two
  // tests compare against) would give the same number; each test still runs alone
  // (--gtest_filter) with all of its own quantizations.
  double Perplexity(const std::string& yaml) {
    static std::map<std::string, double>& measured = *new std::map<std::string, double>();
    if (const auto it = measured.find(yaml); it != measured.end()) return it->second;
    const std::string recipe = dir_ + "/recipe-" + std::to_string(++n_) + ".yaml";
    EXPECT_TRUE(::qcal::WriteStringToFile(recipe, yaml).ok());
    const std::string shared = SharedDir();
    const RunResult r = RunQcal({"quantize",
                                 "--model",
                                 shared + "/models/stories260k",
                                 "--recipe",
                                 recipe,
                                 "--calib",
                                 shared + "/data/tinystories-calib.txt",
                                 "--samples",
                                 "128",
                                 "--seq-len",
                                 "256",
                                 "--eval-text",
                                 shared + "/data/tinystories-eval.txt",
                                 "--out",
                                 dir_ + "/out",
                                 "--overwrite",
                                 "--threads",
                                 "2",
                                 "--device",
                                 "cpu",
                                 "--json"});
    if (!r.exited || r.exit_code != 0) {
      ADD_FAILURE() << "qcal quantize failed (exit " << r.exit_code << ", signal " << r.signal
                    << ") for recipe:\n"
                    << yaml << r.err;
      return -1;
    }
    const nlohmann::json j = nlohmann::json::parse(r.out);
    const double ppl = j.at("perplexity").get<double>();
    RecordProperty("perplexity_" + std::to_string(n_), std::to_string(ppl));
    measured.emplace(yaml, ppl);
    return ppl;
  }

  std::string dir_;
  int n_ = 0;
};

}  // namespace qcal::testing
