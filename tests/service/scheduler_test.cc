// The scheduler and lease state machine on a simulated clock (no network, no threads): leases and
// epochs, placement by device kind and thread count, requeue / fail / cancel on expiry, and that
// the same events give the same actions.
#include "services/coordinator/scheduler.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace qcal::coordinator {
namespace {

using Kind = Action::Kind;

const WorkerCaps kCpu1{"cpu/avx2", 1};
const WorkerCaps kCpu2{"cpu/avx2", 2};
const WorkerCaps kAny{"", 0};

class SchedulerTest : public ::testing::Test {
 protected:
  SchedulerOptions Options() {
    SchedulerOptions o;
    o.lease = absl::Seconds(10);
    o.max_attempts = 3;
    return o;
  }
  absl::Time t0_ = absl::FromUnixSeconds(1000);
};

TEST_F(SchedulerTest, AssignsOldestMatchingJobAndPinsIt) {
  Scheduler s(Options());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.JobQueued("job-b", 2, kAny, 0);
  s.JobQueued("job-a", 1, kAny, 0);
  auto a = s.Acquire("w-1", 1);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(a->has_value());
  EXPECT_EQ((*a)->kind, Kind::kAssign);
  EXPECT_EQ((*a)->job_id, "job-a");  // lower sequence number first
  EXPECT_EQ((*a)->attempt, 1);
  EXPECT_EQ((*a)->caps, kCpu1);
  EXPECT_EQ(s.JobOf("w-1"), "job-a");
  EXPECT_EQ(s.queued_jobs(), 1);
}

TEST_F(SchedulerTest, RequirementsKeepJobsFromMismatchedWorkers) {
  Scheduler s(Options());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.WorkerJoined("w-2", 2, WorkerCaps{"cuda/H100", 1}, t0_);
  s.JobQueued("job-2threads", 1, WorkerCaps{"", 2}, 0);
  s.JobQueued("job-cpu", 2, WorkerCaps{"cpu/avx2", 0}, 0);
  auto gpu = s.Acquire("w-2", 2);
  ASSERT_TRUE(gpu.ok());
  EXPECT_FALSE(gpu->has_value()) << "neither job matches a CUDA worker with 1 thread";
  auto cpu = s.Acquire("w-1", 1);
  ASSERT_TRUE(cpu.ok() && cpu->has_value());
  EXPECT_EQ((*cpu)->job_id, "job-cpu");  // job-2threads needs 2 threads
  s.WorkerJoined("w-3", 3, kCpu2, t0_);
  auto two = s.Acquire("w-3", 3);
  ASSERT_TRUE(two.ok() && two->has_value());
  EXPECT_EQ((*two)->job_id, "job-2threads");
}

TEST_F(SchedulerTest, StaleAndUnknownLeasesAreRefused) {
  Scheduler s(Options());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  EXPECT_TRUE(absl::IsFailedPrecondition(s.Heartbeat("w-1", 7, t0_)));
  EXPECT_TRUE(absl::IsFailedPrecondition(s.Heartbeat("w-9", 1, t0_)));
  EXPECT_TRUE(absl::IsFailedPrecondition(s.Acquire("w-1", 2).status()));
  EXPECT_TRUE(s.Heartbeat("w-1", 1, t0_).ok());
  // After expiry the same lease is stale.
  s.Tick(t0_ + absl::Seconds(11));
  EXPECT_TRUE(absl::IsFailedPrecondition(s.Heartbeat("w-1", 1, t0_ + absl::Seconds(11))));
  EXPECT_TRUE(absl::IsFailedPrecondition(s.CheckLease("w-1", 1)));
}

TEST_F(SchedulerTest, HeartbeatsKeepALeaseAlive) {
  Scheduler s(Options());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  for (int i = 1; i <= 5; ++i) {
    const absl::Time now = t0_ + absl::Seconds(8 * i);
    ASSERT_TRUE(s.Heartbeat("w-1", 1, now).ok()) << i;
    EXPECT_TRUE(s.Tick(now + absl::Seconds(9)).empty()) << i;
  }
  const std::vector<Action> actions = s.Tick(t0_ + absl::Seconds(40 + 10));
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0].kind, Kind::kExpireLease);
  EXPECT_EQ(actions[0].worker_id, "w-1");
  EXPECT_EQ(s.live_leases(), 0);
}

TEST_F(SchedulerTest, ExpiredLeaseRequeuesThenFailsAfterMaxAttempts) {
  Scheduler s(Options());  // max_attempts 3
  s.JobQueued("job-a", 1, kAny, 0);
  absl::Time now = t0_;
  for (int attempt = 1; attempt <= 3; ++attempt) {
    const std::string w = absl::StrCat("w-", attempt);
    s.WorkerJoined(w, attempt, kCpu1, now);
    auto a = s.Acquire(w, attempt);
    ASSERT_TRUE(a.ok() && a->has_value());
    EXPECT_EQ((*a)->attempt, attempt);
    now += absl::Seconds(10);
    const std::vector<Action> actions = s.Tick(now);
    ASSERT_EQ(actions.size(), 2u);
    EXPECT_EQ(actions[0].kind, Kind::kExpireLease);
    EXPECT_EQ(actions[1].job_id, "job-a");
    EXPECT_EQ(actions[1].kind, attempt < 3 ? Kind::kRequeue : Kind::kFailJob) << attempt;
  }
  EXPECT_EQ(s.queued_jobs(), 0);
}

TEST_F(SchedulerTest, CancelPendingTurnsExpiryIntoCancel) {
  Scheduler s(Options());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.JobQueued("job-a", 1, kAny, 0);
  ASSERT_TRUE(s.Acquire("w-1", 1).ok());
  s.RequestCancel("job-a");
  const std::vector<Action> actions = s.Tick(t0_ + absl::Seconds(10));
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(actions[1].kind, Kind::kCancelJob);
  EXPECT_EQ(s.queued_jobs(), 0);
}

TEST_F(SchedulerTest, ReacquireReturnsTheHeldJobAsANewAttempt) {
  Scheduler s(Options());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.JobQueued("job-a", 1, kAny, 0);
  s.JobQueued("job-b", 2, kAny, 0);
  ASSERT_EQ((*s.Acquire("w-1", 1))->job_id, "job-a");
  auto again = s.Acquire("w-1", 1);  // e.g. the first reply was lost
  ASSERT_TRUE(again.ok() && again->has_value());
  EXPECT_EQ((*again)->job_id, "job-a");
  EXPECT_EQ((*again)->attempt, 2);
  s.JobFinished("job-a");
  EXPECT_EQ((*s.Acquire("w-1", 1))->job_id, "job-b");
}

TEST_F(SchedulerTest, RestoredHeldJobsNeedALiveLease) {
  Scheduler s(Options());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  EXPECT_TRUE(s.JobHeld("job-a", 1, kCpu1, 1, "w-1", 1).ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(s.JobHeld("job-b", 2, kCpu1, 1, "w-1", 1)));
  EXPECT_TRUE(absl::IsFailedPrecondition(s.JobHeld("job-c", 3, kCpu1, 1, "w-2", 5)));
  EXPECT_TRUE(s.CheckHolds("w-1", 1, "job-a").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(s.CheckHolds("w-1", 1, "job-b")));
}

TEST_F(SchedulerTest, SameEventsGiveSameActions) {
  auto run = [&]() {
    Scheduler s(Options());
    std::vector<std::string> log;
    for (int w = 1; w <= 4; ++w)
      s.WorkerJoined(absl::StrCat("w-", w), w, w % 2 ? kCpu1 : kCpu2, t0_);
    for (int j = 1; j <= 6; ++j) s.JobQueued(absl::StrCat("job-", j), j, kAny, 0);
    for (int w = 1; w <= 4; ++w) {
      auto a = s.Acquire(absl::StrCat("w-", w), w);
      if (a.ok() && a->has_value())
        log.push_back(absl::StrCat("assign ", (*a)->job_id, " ", (*a)->worker_id));
    }
    s.Heartbeat("w-2", 2, t0_ + absl::Seconds(5)).IgnoreError();
    for (const Action& a : s.Tick(t0_ + absl::Seconds(12))) {
      log.push_back(absl::StrCat(static_cast<int>(a.kind), " ", a.job_id, " ", a.worker_id));
    }
    return log;
  };
  const std::vector<std::string> first = run();
  EXPECT_EQ(first.size(), 4u + 3u * 2u);  // 4 assignments; 3 expired leases, each with its job
  EXPECT_EQ(first, run());
}

}  // namespace
}  // namespace qcal::coordinator
