// A client in another language (issue 5 acceptance 8): tests/service/node/submit_job.js, with
// @grpc/grpc-js and @grpc/proto-loader installed by `npm ci` from the committed package-lock.json
// (into the build tree), loads proto/qcal/v1/*.proto, submits a job to a real coordinator and
// waits for SUCCEEDED.
#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_split.h"
#include "common/files.h"
#include "gtest/gtest.h"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

namespace fs = std::filesystem;

std::string FindProgram(const std::string& name) {
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "", ':', absl::SkipEmpty())) {
    const fs::path p = fs::path(std::string(dir)) / name;
    if (fs::exists(p)) return p.string();
  }
  return "";
}

TEST(NodeClientTest, SubmitsFromTheProtoFilesAndWaitsForSucceeded) {
  const std::string node = FindProgram("node");
  const std::string npm = FindProgram("npm");
  ASSERT_FALSE(node.empty() || npm.empty())
      << "node and npm are required (tools/ci/install_deps.sh)";
  // npm ci into the build tree, again only when the lockfile changed.
  const std::string src = SourceDir() + "/tests/service/node";
  const std::string dir = BinaryDir() + "/node-client";
  fs::create_directories(dir);
  const absl::StatusOr<std::string> lock = ReadFileToString(src + "/package-lock.json");
  ASSERT_TRUE(lock.ok()) << lock.status();
  const absl::StatusOr<std::string> installed = ReadFileToString(dir + "/node_modules/.qcal-lock");
  if (!installed.ok() || *installed != *lock) {
    for (const char* f : {"package.json", "package-lock.json"}) {
      fs::copy_file(src + "/" + f, dir + "/" + f, fs::copy_options::overwrite_existing);
    }
    const RunResult ci = RunProcess(npm, {"ci", "--prefix", dir, "--no-audit", "--no-fund",
                                          "--ignore-scripts", "--loglevel=error"});
    ASSERT_EQ(ci.exit_code, 0) << ci.out << ci.err;
    ASSERT_TRUE(WriteStringToFile(dir + "/node_modules/.qcal-lock", *lock).ok());
  }
  fs::copy_file(src + "/submit_job.js", dir + "/submit_job.js",
                fs::copy_options::overwrite_existing);

  Cluster c("node-client");
  c.StartCoordinator();
  c.StartWorker();
  const RunResult r =
      RunProcess(node, {dir + "/submit_job.js", "--address", c.address(), "--proto-dir",
                        SourceDir() + "/proto", "--model", c.model().model, "--calib",
                        c.model().calib, "--output-name", "from-node"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << c.Logs();
  const std::string job_id = r.out.substr(0, r.out.find('\n'));
  absl::StatusOr<v1::Job> job = c.Client()->Get(job_id);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job->client(), "node");
  EXPECT_EQ(job->spec().samples(), 16);
  EXPECT_EQ(job->spec().recipe().weights().group_size(), 32);
  EXPECT_EQ(job->spec().recipe().gptq().block_size(), 128);  // unset: the default, not 0
  EXPECT_TRUE(fs::exists(c.output_root() + "/from-node/model.safetensors"));
}

}  // namespace
}  // namespace qcal::testing
