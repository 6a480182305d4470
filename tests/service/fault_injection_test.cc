// The probabilistic mode of QCAL_FAULT (services/common/fault_injection.h): p= faults fire many
// times per process at about the rate asked, the decisions replay exactly for the same seed and
// sequence of points (whatever the interleaving of different points), differ for another seed,
// and mix with one-shot faults; malformed p= and seed= are refused with the part named.
#include "services/common/fault_injection.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qcal::service {
namespace {

using ::testing::HasSubstr;

// Which of `n` visits of each point in `points` (visited round-robin, or point by point when
// `grouped`) fail under `spec`.
std::vector<bool> Fired(const std::string& spec,
                        const std::vector<std::pair<std::string, int>>& points, int n,
                        bool grouped) {
  auto f = FaultInjector::Parse(spec, "coordinator");
  EXPECT_TRUE(f.ok()) << f.status();
  // Indexed by (point, visit) whatever the order of the visits.
  std::vector<bool> fired(points.size() * static_cast<size_t>(n));
  if (grouped) {
    for (size_t p = 0; p < points.size(); ++p) {
      for (int i = 0; i < n; ++i) {
        fired[p * static_cast<size_t>(n) + static_cast<size_t>(i)] =
            !(*f)->Hit(points[p].first, points[p].second).ok();
      }
    }
  } else {
    for (int i = 0; i < n; ++i) {
      for (size_t p = 0; p < points.size(); ++p) {
        fired[p * static_cast<size_t>(n) + static_cast<size_t>(i)] =
            !(*f)->Hit(points[p].first, points[p].second).ok();
      }
    }
  }
  return fired;
}

TEST(FaultInjectionTest, ProbabilisticFaultsFireRepeatedlyAtTheirRate) {
  auto f = FaultInjector::Parse("coordinator:stage=write:p=0.05:seed=11:error", "coordinator");
  ASSERT_TRUE(f.ok()) << f.status();
  int fired = 0;
  constexpr int kVisits = 20000;
  for (int i = 0; i < kVisits; ++i) fired += (*f)->Hit("write", -1).ok() ? 0 : 1;
  // Binomial(20000, 0.05): mean 1000, sd 31; 5 sd either side.
  EXPECT_GT(fired, 845);
  EXPECT_LT(fired, 1155);
  // Other points never fire.
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE((*f)->Hit("commit", 3).ok());
}

TEST(FaultInjectionTest, TheSameSeedReplaysTheSameDecisionsWhateverTheInterleaving) {
  const std::vector<std::pair<std::string, int>> points = {
      {"write", -1}, {"commit", 0}, {"commit", 1}, {"precommit", 2}};
  const std::string spec = "coordinator:stage=*:p=0.1:seed=42:error";
  const std::vector<bool> a = Fired(spec, points, 500, /*grouped=*/false);
  const std::vector<bool> b = Fired(spec, points, 500, /*grouped=*/true);
  EXPECT_EQ(a, b);
  // Every point fires, each at about its rate (500 visits at 0.1: mean 50, sd 6.7).
  for (size_t p = 0; p < points.size(); ++p) {
    int n = 0;
    for (int i = 0; i < 500; ++i) n += a[p * 500 + static_cast<size_t>(i)] ? 1 : 0;
    EXPECT_GT(n, 16) << points[p].first << " " << points[p].second;
    EXPECT_LT(n, 84) << points[p].first << " " << points[p].second;
  }
  // Another seed decides otherwise.
  EXPECT_NE(a, Fired("coordinator:stage=*:p=0.1:seed=43:error", points, 500, false));
  // block= restricts a probabilistic fault as it does a one-shot one.
  const std::vector<bool> only1 =
      Fired("coordinator:block=1:stage=commit:p=1:error", points, 10, false);
  for (size_t p = 0; p < points.size(); ++p) {
    for (int i = 0; i < 10; ++i) EXPECT_EQ(only1[p * 10 + static_cast<size_t>(i)], p == 2);
  }
}

TEST(FaultInjectionTest, DrawIsAPureFunctionOfItsArguments) {
  int differ_by_stage = 0, differ_by_block = 0, differ_by_visit = 0;
  for (int64_t v = 0; v < 2000; ++v) {
    const bool d = FaultInjector::Draw(5, 0.5, "solve", 3, v);
    EXPECT_EQ(d, FaultInjector::Draw(5, 0.5, "solve", 3, v));
    differ_by_stage += d != FaultInjector::Draw(5, 0.5, "commit", 3, v);
    differ_by_block += d != FaultInjector::Draw(5, 0.5, "solve", 4, v);
    differ_by_visit += d != FaultInjector::Draw(5, 0.5, "solve", 3, v + 1);
  }
  // Independent fair coins differ about half the time.
  for (int n : {differ_by_stage, differ_by_block, differ_by_visit}) {
    EXPECT_GT(n, 800);
    EXPECT_LT(n, 1200);
  }
  EXPECT_TRUE(FaultInjector::Draw(1, 1.0, "x", 0, 0));
}

TEST(FaultInjectionTest, OneShotAndProbabilisticFaultsMix) {
  // The one-shot error fires on the first visit of commit/2 only; the p=1 kill would fire on
  // every visit of solve, so solve is not visited here.
  auto f = FaultInjector::Parse(
      "worker:block=2:stage=commit:error,worker:stage=open:p=1:seed=3:error", "worker");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_FALSE((*f)->Hit("commit", 2).ok());
  EXPECT_TRUE((*f)->Hit("commit", 2).ok());
  for (int i = 0; i < 5; ++i) EXPECT_FALSE((*f)->Hit("open", i).ok());
}

TEST(FaultInjectionTest, AProbabilisticKillEndsTheProcess) {
  // Each child hits "solve" until the fault SIGKILLs it (p = 0.25: about 4 visits), with its own
  // seed; a child that survives 1000 visits exits 0 instead.
  int kills = 0;
  for (int life = 0; life < 8; ++life) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      auto f = FaultInjector::Parse(absl::StrCat("worker:stage=solve:p=0.25:seed=", life, ":kill"),
                                    "worker");
      if (!f.ok()) _exit(2);
      for (int b = 0; b < 1000; ++b) (void)(*f)->Hit("solve", b);
      _exit(0);  // survived 1000 visits: the fault did not work
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) ++kills;
  }
  EXPECT_EQ(kills, 8);
}

TEST(FaultInjectionTest, RefusesMalformedProbabilisticParts) {
  for (const char* bad :
       {"worker:stage=solve:p=0:kill", "worker:stage=solve:p=1.5:kill",
        "worker:stage=solve:p=x:kill", "worker:stage=solve:seed=3:kill",
        "worker:stage=solve:p=0.1:seed=-1:kill", "worker:stage=solve:p=0.1:seed=x:kill"}) {
    const absl::Status s = FaultInjector::Parse(bad, "worker").status();
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr(bad));
  }
  EXPECT_TRUE(FaultInjector::Parse("worker:stage=*:p=1:kill", "worker").ok());
}

}  // namespace
}  // namespace qcal::service
