// Paths and skip helpers shared by the tests.
#pragma once

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

}  // namespace qcal::testing

// Skips the current test when ../shared is absent (a fresh user machine has none).
#define QCAL_REQUIRE_SHARED()                                                        \
  do {                                                                               \
    if (::qcal::testing::SharedDir().empty()) GTEST_SKIP() << "../shared is absent"; \
  } while (0)
