// A test fixture over synthetic tiny checkpoints of some model families (`qcal synth --arch`),
// written once per test suite into a temporary directory, with a CPU backend of 2 threads per test.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/model.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {

class FamilyCheckpointTest : public ::testing::Test {
 protected:
  // Writes a checkpoint of every arch of `archs` under a new temporary directory named after
  // `prefix` (call from SetUpTestSuite).
  static void WriteCheckpoints(const std::string& prefix, const std::vector<SynthArch>& archs) {
    root_ = new std::string(qcal::testing::MakeTempDir(prefix));
    for (SynthArch a : archs) {
      SynthOptions o;
      o.out_dir = Dir(a);
      o.arch = a;
      o.sha256 = false;
      o.threads = 2;
      auto r = WriteSyntheticCheckpoint(o);
      ASSERT_TRUE(r.ok()) << r.status();
    }
  }
  static void TearDownTestSuite() {
    if (root_ != nullptr && !root_->empty()) std::filesystem::remove_all(*root_);
    delete root_;
    root_ = nullptr;
  }
  void SetUp() override {
    kernels::BackendOptions bo;
    bo.threads = 2;
    auto be = kernels::CreateBackend(bo);
    ASSERT_TRUE(be.ok()) << be.status();
    backend_ = std::move(be).value();
  }

  static std::string Dir(SynthArch a) { return *root_ + "/" + SynthArchName(a); }

  std::unique_ptr<Model> Load(const std::string& dir,
                              BlockResidency residency = BlockResidency::kAll) {
    ModelLoadOptions o;
    o.residency = residency;
    auto m = Model::Load(dir, backend_.get(), o);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(m).value() : nullptr;
  }
  std::unique_ptr<Model> Load(SynthArch a) { return Load(Dir(a)); }

  // Deterministic ids in [3, vocab).
  static std::vector<int> Ids(int n, int vocab, int salt = 0) {
    std::vector<int> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = 3 + (i * 37 + salt * 11 + 5) % (vocab - 3);
    return ids;
  }

  // The suite's temporary directory (one suite per test binary uses this fixture).
  static inline std::string* root_ = nullptr;
  std::unique_ptr<kernels::Backend> backend_;
};

}  // namespace qcal::engine
