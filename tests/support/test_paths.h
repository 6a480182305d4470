// Paths and skip helpers shared by the tests.
#pragma once

#include <map>
#include <string>

#include "gtest/gtest.h"

namespace qcal::testing {

// The source tree (QCAL_SOURCE_DIR, set by ctest).
std::string SourceDir();
// The build tree (QCAL_BINARY_DIR, set by ctest); binaries are under bin/.
std::string BinaryDir();
// `../shared` beside the source tree, or "" when it is absent (QCAL_SHARED_DIR overrides).
std::string SharedDir();
// A fresh empty directory under the test temp dir; removed by the caller if wanted.
std::string MakeTempDir(const std::string& prefix);
// Every regular file under dir but qcal_run.json (which byte comparisons leave out), by path
// relative to dir, with its bytes; a file that cannot be read fails the test (EXPECT) and maps to
// "". What tests compare to show two runs wrote the same output.
std::map<std::string, std::string> OutputFiles(const std::string& dir);

}  // namespace qcal::testing

// Skips the current test when ../shared is absent (a fresh user machine has none).
#define QCAL_REQUIRE_SHARED()                                                        \
  do {                                                                               \
    if (::qcal::testing::SharedDir().empty()) GTEST_SKIP() << "../shared is absent"; \
  } while (0)
