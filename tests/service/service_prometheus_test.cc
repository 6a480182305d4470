// A real Prometheus server (Debian package prometheus, started directly on a free loopback port
// with a generated config that also loads deploy/prometheus/alerts.yml) scrapes the coordinator
// while a job runs; its HTTP query API then returns the job-state and blocks-done series (issue 5
// acceptance 7).
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/service/service_harness.h"
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

// The value of an instant query's single sample, or "" while there is none.
std::string QueryValue(int port, const std::string& encoded_query) {
  absl::StatusOr<std::string> body = HttpGet(port, "/api/v1/query?query=" + encoded_query);
  if (!body.ok()) return "";
  const nlohmann::json j = nlohmann::json::parse(*body, nullptr, false);
  if (j.is_discarded() || j.value("status", "") != "success") return "";
  const nlohmann::json& result = j["data"]["result"];
  if (!result.is_array() || result.size() != 1) return "";
  return result[0]["value"][1].get<std::string>();
}

TEST(ServicePrometheusTest, PrometheusScrapesJobStateAndBlocks) {
  const std::string prometheus = FindProgram("prometheus");
  ASSERT_FALSE(prometheus.empty())
      << "prometheus is missing (Debian package; tools/ci/install_deps.sh)";
  Cluster c("prometheus");
  c.StartCoordinator();
  c.StartWorker();
  v1::SubmitJobRequest request;
  *request.mutable_spec() = c.Spec("out");
  auto submitted = c.Client()->Submit(request);
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  auto job = c.WaitFinal(submitted->job().job_id(), absl::Seconds(90));
  ASSERT_TRUE(job.ok() && job->state() == v1::JOB_STATE_SUCCEEDED) << c.Logs();

  const std::string config = c.root() + "/prometheus.yml";
  ASSERT_TRUE(
      WriteStringToFile(
          config,
          absl::StrCat("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       "rule_files:\n  - ",
                       SourceDir(),
                       "/deploy/prometheus/alerts.yml\n"
                       "scrape_configs:\n  - job_name: qcal-coordinator\n    static_configs:\n"
                       "      - targets: ['127.0.0.1:",
                       c.metrics_port(), "']\n"))
          .ok());
  const int port = FreePort();
  std::unique_ptr<Process> server = Process::Start(
      prometheus,
      {"--config.file=" + config, absl::StrCat("--web.listen-address=127.0.0.1:", port),
       "--storage.tsdb.path=" + c.root() + "/tsdb", "--log.level=warn"},
      {}, c.root() + "/logs/prometheus.log");

  const std::string want_blocks = absl::StrCat(c.model().num_blocks);
  std::string succeeded, blocks, leases;
  for (absl::Time end = absl::Now() + absl::Seconds(90); absl::Now() < end;) {
    succeeded = QueryValue(port, "qcal_jobs%7Bstate%3D%22succeeded%22%7D");
    blocks = QueryValue(port, "qcal_blocks_committed_total");
    leases = QueryValue(port, "qcal_worker_leases");
    if (succeeded == "1" && blocks == want_blocks && leases == "1") break;
    ASSERT_TRUE(server->running()) << server->LogTail();
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_EQ(succeeded, "1") << server->LogTail();
  EXPECT_EQ(blocks, want_blocks);
  EXPECT_EQ(leases, "1");
  EXPECT_EQ(QueryValue(port, "qcal_jobs%7Bstate%3D%22running%22%7D"), "0");
  EXPECT_EQ(QueryValue(port, "qcal_job_blocks_done"), "0");  // no active job is left
  // The committed alert rules load into the real server.
  absl::StatusOr<std::string> rules = HttpGet(port, "/api/v1/rules");
  ASSERT_TRUE(rules.ok()) << rules.status();
  const nlohmann::json j = nlohmann::json::parse(*rules);
  ASSERT_EQ(j["data"]["groups"].size(), 1u);
  EXPECT_EQ(j["data"]["groups"][0]["rules"].size(), 7u);
  server->Signal(SIGTERM);
  EXPECT_TRUE(server->Wait(absl::Seconds(20)));
}

}  // namespace
}  // namespace qcal::testing
