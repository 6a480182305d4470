#include "tests/support/test_paths.h"

#include <cstdlib>
#include <filesystem>

#include "common/files.h"

namespace qcal::testing {
namespace fs = std::filesystem;

std::string SourceDir() {
  const char* s = std::getenv("QCAL_SOURCE_DIR");
  return s ? s : fs::current_path().string();
}

std::string BinaryDir() {
  const char* s = std::getenv("QCAL_BINARY_DIR");
  return s ? s : fs::current_path().string();
}

std::string SharedDir() {
  if (const char* s = std::getenv("QCAL_SHARED_DIR")) return fs::exists(s) ? s : "";
  fs::path p = fs::path(SourceDir()).parent_path() / "shared";
  if (fs::exists(p / "models")) return p.string();
  return "";
}

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TEST_TMPDIR");
  fs::path root = base ? fs::path(base) : fs::temp_directory_path();
  std::string templ = (root / (prefix + "-XXXXXX")).string();
  char* made = mkdtemp(templ.data());
  return made ? std::string(made) : std::string();
}

std::map<std::string, std::string> OutputFiles(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file() || e.path().filename() == "qcal_run.json") continue;
    absl::StatusOr<std::string> bytes = ReadFileToString(e.path().string());
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    files[fs::relative(e.path(), dir).string()] = bytes.ok() ? *bytes : "";
  }
  return files;
}

}  // namespace qcal::testing
