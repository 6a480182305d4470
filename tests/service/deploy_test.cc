// The deployment files (deploy/) are checked, since no cluster exists here: promtool accepts the
// alert rules and the scrape config; every qcal_ metric the alerts and the Grafana dashboard use
// is one the coordinator exports; the Kubernetes manifests and systemd units parse, and every
// flag they pass to qcal-coordinator / qcal-worker is one those binaries accept.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/coordinator/prometheus_metrics.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"
#include "yaml-cpp/yaml.h"

namespace qcal::testing {
namespace {

namespace fs = std::filesystem;

std::string Deploy(const std::string& rel) { return SourceDir() + "/deploy/" + rel; }

// `name` on PATH, or "" when absent.
std::string FindProgram(const std::string& name) {
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "", ':', absl::SkipEmpty())) {
    const fs::path p = fs::path(std::string(dir)) / name;
    if (fs::exists(p)) return p.string();
  }
  return "";
}

std::string Read(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

// Series names the coordinator exports (histograms with their _bucket, _sum and _count).
std::set<std::string> ExportedMetrics() {
  auto metrics = coordinator::PrometheusMetrics::Create("");
  EXPECT_TRUE(metrics.ok());
  std::set<std::string> names;
  for (absl::string_view line : absl::StrSplit((*metrics)->Text(), '\n')) {
    if (!absl::ConsumePrefix(&line, "# TYPE ")) continue;
    const std::vector<std::string> parts = absl::StrSplit(line, ' ');
    names.insert(parts[0]);
    if (parts[1] == "histogram") {
      for (const char* suffix : {"_bucket", "_sum", "_count"}) names.insert(parts[0] + suffix);
    }
  }
  return names;
}

std::set<std::string> ReferencedMetrics(const std::string& text) {
  std::set<std::string> names;
  const std::regex re("qcal_[a-z_]+");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator();
       ++it) {
    names.insert(it->str());
  }
  return names;
}

// The long flags a binary's --help lists.
std::set<std::string> HelpFlags(const std::string& binary) {
  const RunResult r = RunProcess(BinaryDir() + "/bin/" + binary, {"--help"});
  EXPECT_EQ(r.exit_code, 0) << binary << ": " << r.err;
  std::set<std::string> flags;
  const std::regex re("--[a-z][a-z0-9-]*");
  for (auto it = std::sregex_iterator(r.out.begin(), r.out.end(), re); it != std::sregex_iterator();
       ++it) {
    flags.insert(it->str());
  }
  return flags;
}

// Checks a command line (binary, then flags as "--flag=value" or "--flag value").
void CheckCommand(const std::vector<std::string>& argv, const std::string& where) {
  ASSERT_FALSE(argv.empty()) << where;
  const std::string binary = fs::path(argv[0]).filename().string();
  ASSERT_TRUE(binary == "qcal-coordinator" || binary == "qcal-worker") << where << ": " << binary;
  const std::set<std::string> known = HelpFlags(binary);
  for (size_t i = 1; i < argv.size(); ++i) {
    if (argv[i].rfind("--", 0) != 0) continue;
    const std::string flag = argv[i].substr(0, argv[i].find('='));
    EXPECT_EQ(known.count(flag), 1u) << where << ": " << binary << " has no " << flag;
  }
}

TEST(DeployTest, PromtoolAcceptsTheRulesAndTheScrapeConfig) {
  const std::string promtool = FindProgram("promtool");
  ASSERT_FALSE(promtool.empty())
      << "promtool is missing (Debian package prometheus; tools/ci/install_deps.sh)";
  const RunResult rules = RunProcess(promtool, {"check", "rules", Deploy("prometheus/alerts.yml")});
  EXPECT_EQ(rules.exit_code, 0) << rules.out << rules.err;
  EXPECT_NE((rules.out + rules.err).find("SUCCESS: 7 rules found"), std::string::npos)
      << rules.out << rules.err;
  const RunResult config =
      RunProcess(promtool, {"check", "config", Deploy("prometheus/prometheus.yml")});
  EXPECT_EQ(config.exit_code, 0) << config.out << config.err;
}

TEST(DeployTest, AlertsAndDashboardUseExportedMetrics) {
  const std::set<std::string> exported = ExportedMetrics();
  EXPECT_GT(exported.count("qcal_jobs"), 0u);
  const std::string alerts = Read(Deploy("prometheus/alerts.yml"));
  const nlohmann::json dashboard =
      nlohmann::json::parse(Read(Deploy("grafana/qcal-dashboard.json")));
  ASSERT_TRUE(dashboard.contains("panels"));
  std::string exprs;
  for (const auto& panel : dashboard["panels"]) {
    ASSERT_FALSE(panel["targets"].empty()) << panel["title"];
    for (const auto& target : panel["targets"]) exprs += target["expr"].get<std::string>() + "\n";
  }
  const YAML::Node rules = YAML::Load(alerts);
  int alert_count = 0;
  for (const auto& group : rules["groups"]) {
    for (const auto& rule : group["rules"]) {
      ++alert_count;
      EXPECT_TRUE(rule["annotations"]["description"]) << rule["alert"].as<std::string>();
    }
  }
  EXPECT_EQ(alert_count, 7);
  for (const std::string& name : ReferencedMetrics(alerts + exprs)) {
    EXPECT_EQ(exported.count(name), 1u) << name << " is used by deploy/ but not exported";
  }
  // Every exported family appears on the dashboard.
  for (const std::string& name : exported) {
    if (name.size() > 7 &&
        (name.ends_with("_bucket") || name.ends_with("_count") || name.ends_with("_sum"))) {
      continue;
    }
    EXPECT_NE(exprs.find(name), std::string::npos) << name << " has no dashboard panel";
  }
}

TEST(DeployTest, KubernetesManifestsParseAndUseRealFlags) {
  int documents = 0, commands = 0;
  for (const auto& e : fs::directory_iterator(Deploy("kubernetes"))) {
    for (const YAML::Node& doc : YAML::LoadAllFromFile(e.path().string())) {
      ++documents;
      const std::string where = e.path().filename().string();
      ASSERT_TRUE(doc["apiVersion"] && doc["kind"] && doc["metadata"]["name"]) << where;
      // Pod templates (Deployment, StatefulSet) carry the commands.
      const YAML::Node spec = doc["spec"];
      if (!spec || !spec["template"]) continue;
      const YAML::Node containers = spec["template"]["spec"]["containers"];
      ASSERT_TRUE(containers) << where;
      for (const YAML::Node& c : containers) {
        CheckCommand(c["command"].as<std::vector<std::string>>(), where);
        ++commands;
      }
    }
  }
  EXPECT_EQ(documents, 4);
  EXPECT_EQ(commands, 2);
}

TEST(DeployTest, SystemdUnitsParseAndUseRealFlags) {
  int units = 0;
  for (const auto& e : fs::directory_iterator(Deploy("systemd"))) {
    std::set<std::string> sections;
    std::string section;
    for (absl::string_view line : absl::StrSplit(Read(e.path().string()), '\n')) {
      line = absl::StripAsciiWhitespace(line);
      if (line.empty() || line[0] == '#') continue;
      if (line.front() == '[') {
        ASSERT_EQ(line.back(), ']') << e.path();
        section = std::string(line);
        sections.insert(section);
        continue;
      }
      ASSERT_NE(line.find('='), absl::string_view::npos) << e.path() << ": " << line;
      if (section == "[Service]" && absl::ConsumePrefix(&line, "ExecStart=")) {
        std::vector<std::string> argv = absl::StrSplit(line, ' ', absl::SkipEmpty());
        CheckCommand(argv, e.path().filename().string());
      }
    }
    EXPECT_EQ(sections, (std::set<std::string>{"[Unit]", "[Service]", "[Install]"})) << e.path();
    ++units;
  }
  EXPECT_EQ(units, 2);
}

}  // namespace
}  // namespace qcal::testing
