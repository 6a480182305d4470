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

TEST_F(SchedulerTest, RestoredRunningJobsAreReplannedOnLiveMembersOrQueued) {
  Scheduler s(Options());
  s.SetNextGangEpoch(40);
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.WorkerJoined("w-2", 2, kCpu1, t0_);
  // w-3's lease was not restored: the gang goes on with w-1 and w-2 under a new epoch.
  Action a = s.JobRestored("job-a", 1, kCpu1, 2, {2, 3}, false, {"w-1", "w-2", "w-3"});
  EXPECT_EQ(a.kind, Kind::kReplan);
  EXPECT_EQ(a.gang_epoch, 40u);
  EXPECT_EQ(a.members, (std::vector<std::string>{"w-1", "w-2"}));
  EXPECT_EQ(a.attempt, 2) << "a restart counts no attempt";
  EXPECT_EQ(s.next_gang_epoch(), 41u);
  // A member learns its part when it asks; until then its heartbeats say drop.
  EXPECT_TRUE(s.ShouldDrop("w-2", "job-a", 7));
  auto part = s.Acquire("w-2", 2);
  ASSERT_TRUE(part.ok() && part->has_value());
  EXPECT_EQ((*part)->kind, Kind::kDeliver);
  EXPECT_EQ((*part)->rank, 1);
  EXPECT_FALSE(s.ShouldDrop("w-2", "job-a", 40));
  EXPECT_TRUE(s.ShouldDrop("w-2", "job-a", 39));
  // Too few live members: queued.
  Action b = s.JobRestored("job-b", 2, kCpu1, 1, {2, 2}, false, {"w-7", "w-8"});
  EXPECT_EQ(b.kind, Kind::kRequeue);
  EXPECT_EQ(s.queued_jobs(), 1);
  EXPECT_TRUE(s.CheckHolds("w-1", 1, "job-a").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(s.CheckHolds("w-1", 1, "job-b")));
}

TEST_F(SchedulerTest, AGangStartsWithMinWorkersAndTakesUpToMaxRankedById) {
  Scheduler s(Options());
  s.JobQueued("job-a", 1, kAny, 0, {2, 3});
  s.WorkerJoined("w-2", 2, kCpu1, t0_);
  auto none = s.Acquire("w-2", 2);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value()) << "one worker is fewer than min 2";
  s.WorkerJoined("w-9", 9, kCpu2, t0_);  // other caps: not a gang mate
  EXPECT_FALSE(s.Acquire("w-9", 9)->has_value());
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.WorkerJoined("w-3", 3, kCpu1, t0_);
  s.WorkerJoined("w-4", 4, kCpu1, t0_);
  auto a = s.Acquire("w-3", 3);
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ((*a)->kind, Kind::kAssign);
  // The asker plus the lowest ids up to max, ranked by id.
  EXPECT_EQ((*a)->members, (std::vector<std::string>{"w-1", "w-2", "w-3"}));
  EXPECT_EQ((*a)->rank, 2);
  EXPECT_EQ((*a)->attempt, 1);
  EXPECT_EQ((*a)->caps, kCpu1);
  const uint64_t epoch = (*a)->gang_epoch;
  EXPECT_EQ(s.JobOf("w-1"), "job-a");
  EXPECT_EQ(s.JobOf("w-4"), "");
  // Other members get their part when they ask (no new attempt, same epoch).
  auto part = s.Acquire("w-1", 1);
  ASSERT_TRUE(part.ok() && part->has_value());
  EXPECT_EQ((*part)->kind, Kind::kDeliver);
  EXPECT_EQ((*part)->rank, 0);
  EXPECT_EQ((*part)->gang_epoch, epoch);
  EXPECT_EQ((*part)->attempt, 1);
  EXPECT_EQ(*s.CheckGang("w-1", 1, "job-a", epoch), 0);
  EXPECT_TRUE(absl::IsFailedPrecondition(s.CheckGang("w-1", 1, "job-a", epoch + 1).status()));
  EXPECT_TRUE(absl::IsFailedPrecondition(s.CheckGang("w-4", 4, "job-a", epoch).status()));
}

TEST_F(SchedulerTest, LostMemberReplansWhileMinRemainsElseRequeuesUntilAWorkerJoins) {
  Scheduler s(Options());  // max_attempts 3
  s.JobQueued("job-a", 1, kAny, 0, {2, 3});
  for (int w = 1; w <= 3; ++w) s.WorkerJoined(absl::StrCat("w-", w), w, kCpu1, t0_);
  auto a = s.Acquire("w-1", 1);
  ASSERT_TRUE(a.ok() && a->has_value());
  ASSERT_EQ((*a)->members.size(), 3u);
  const uint64_t first = (*a)->gang_epoch;
  // w-1 and w-3 heartbeat; w-2's lease expires.
  const absl::Time t1 = t0_ + absl::Seconds(5);
  ASSERT_TRUE(s.Heartbeat("w-1", 1, t1).ok());
  ASSERT_TRUE(s.Heartbeat("w-3", 3, t1).ok());
  std::vector<Action> actions = s.Tick(t0_ + absl::Seconds(10));
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(actions[0].kind, Kind::kExpireLease);
  EXPECT_EQ(actions[1].kind, Kind::kReplan);
  EXPECT_EQ(actions[1].members, (std::vector<std::string>{"w-1", "w-3"}));
  EXPECT_GT(actions[1].gang_epoch, first);
  EXPECT_EQ(actions[1].attempt, 2);
  EXPECT_EQ(actions[1].reason, "re-planned on 2 workers: the lease of w-2 expired");
  // The old epoch is stale; the survivors get the new plan when they ask.
  EXPECT_TRUE(s.ShouldDrop("w-1", "job-a", first));
  EXPECT_TRUE(absl::IsFailedPrecondition(s.CheckGang("w-1", 1, "job-a", first).status()));
  auto part = s.Acquire("w-3", 3);
  ASSERT_TRUE(part.ok() && part->has_value());
  EXPECT_EQ((*part)->kind, Kind::kDeliver);
  EXPECT_EQ((*part)->rank, 1) << "re-ranked";
  // w-3 goes too: one left is fewer than min 2, so the job is requeued and w-1 freed.
  ASSERT_TRUE(s.Heartbeat("w-1", 1, t0_ + absl::Seconds(14)).ok());
  actions = s.Tick(t1 + absl::Seconds(10));
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(actions[1].kind, Kind::kRequeue);
  EXPECT_EQ(s.JobOf("w-1"), "");
  EXPECT_EQ(s.queued_jobs(), 1);
  EXPECT_FALSE(s.Acquire("w-1", 1)->has_value()) << "still fewer than min";
  // A worker joins: the job starts again on two.
  s.WorkerJoined("w-5", 5, kCpu1, t0_ + absl::Seconds(16));
  auto again = s.Acquire("w-5", 5);
  ASSERT_TRUE(again.ok() && again->has_value());
  EXPECT_EQ((*again)->kind, Kind::kAssign);
  EXPECT_EQ((*again)->members, (std::vector<std::string>{"w-1", "w-5"}));
  EXPECT_EQ((*again)->attempt, 3);
}

TEST_F(SchedulerTest, DroppedTaskAndAbandonReplanUnderANewEpochAndCountAttempts) {
  Scheduler s(Options());  // max_attempts 3
  s.JobQueued("job-a", 1, kAny, 0, {2, 2});
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.WorkerJoined("w-2", 2, kCpu1, t0_);
  auto a = s.Acquire("w-2", 2);
  ASSERT_TRUE(a.ok() && a->has_value());
  ASSERT_EQ((*s.Acquire("w-1", 1))->kind, Kind::kDeliver);
  const uint64_t e1 = (*a)->gang_epoch;
  // w-1 asks again while the job runs: it dropped its task.
  auto dropped = s.Acquire("w-1", 1);
  ASSERT_TRUE(dropped.ok() && dropped->has_value());
  EXPECT_EQ((*dropped)->kind, Kind::kReplan);
  EXPECT_EQ((*dropped)->rank, 0);
  EXPECT_EQ((*dropped)->attempt, 2);
  const uint64_t e2 = (*dropped)->gang_epoch;
  EXPECT_GT(e2, e1);
  // w-2 still runs e1: refused, and told to drop.
  EXPECT_TRUE(absl::IsFailedPrecondition(s.Abandon("w-2", 2, "job-a", e1, "x").status()));
  EXPECT_TRUE(s.ShouldDrop("w-2", "job-a", e1));
  EXPECT_EQ((*s.Acquire("w-2", 2))->kind, Kind::kDeliver);
  // AbandonTask under the current epoch: a re-plan, then out of attempts.
  auto abandoned = s.Abandon("w-2", 2, "job-a", e2, "peer w-1 unreachable");
  ASSERT_TRUE(abandoned.ok()) << abandoned.status();
  EXPECT_EQ(abandoned->kind, Kind::kReplan);
  EXPECT_EQ(abandoned->attempt, 3);
  EXPECT_NE(abandoned->reason.find("peer w-1 unreachable"), std::string::npos);
  auto last = s.Abandon("w-1", 1, "job-a", abandoned->gang_epoch, "again");
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(last->kind, Kind::kFailJob);
  EXPECT_EQ(s.JobOf("w-1"), "");
  EXPECT_EQ(s.JobOf("w-2"), "");
}

TEST_F(SchedulerTest, MemberDoneLeavesTheGangAndExportNeedsOneWorker) {
  Scheduler s(Options());
  s.JobQueued("job-a", 1, kAny, 0, {2, 2});
  s.JobQueued("job-b", 2, kAny, 0);
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  s.WorkerJoined("w-2", 2, kCpu1, t0_);
  auto a = s.Acquire("w-1", 1);
  ASSERT_TRUE(a.ok() && a->has_value());
  const uint64_t epoch = (*a)->gang_epoch;
  ASSERT_EQ((*s.Acquire("w-2", 2))->kind, Kind::kDeliver);
  EXPECT_TRUE(absl::IsFailedPrecondition(s.MemberDone("w-1", 1, "job-a", epoch)))
      << "rank 0 completes the job";
  EXPECT_TRUE(absl::IsFailedPrecondition(s.MemberDone("w-2", 2, "job-a", epoch + 1)));
  s.SetExportOnly("job-a");
  ASSERT_TRUE(s.MemberDone("w-2", 2, "job-a", epoch).ok());
  EXPECT_EQ(s.JobOf("w-2"), "");
  // The freed member takes other work; rank 0 keeps its rank and epoch.
  auto b = s.Acquire("w-2", 2);
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ((*b)->job_id, "job-b");
  EXPECT_EQ(*s.CheckGang("w-1", 1, "job-a", epoch), 0);
  // Rank 0 lost during the export: requeued, and it starts again on one worker.
  ASSERT_TRUE(s.Heartbeat("w-2", 2, t0_ + absl::Seconds(5)).ok());
  std::vector<Action> actions = s.Tick(t0_ + absl::Seconds(10));
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(actions[1].kind, Kind::kRequeue);
  s.JobFinished("job-b");
  s.WorkerJoined("w-3", 3, kCpu1, t0_ + absl::Seconds(10));
  auto exporter = s.Acquire("w-3", 3);
  ASSERT_TRUE(exporter.ok() && exporter->has_value());
  EXPECT_EQ((*exporter)->job_id, "job-a");
  EXPECT_EQ((*exporter)->members, (std::vector<std::string>{"w-3"}));
}

TEST_F(SchedulerTest, AJobThatCannotFormDoesNotBlockYoungerOnes) {
  Scheduler s(Options());
  s.JobQueued("job-big", 1, kAny, 0, {4, 4});
  s.JobQueued("job-small", 2, kAny, 0);
  s.WorkerJoined("w-1", 1, kCpu1, t0_);
  auto a = s.Acquire("w-1", 1);
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ((*a)->job_id, "job-small");
  EXPECT_EQ(s.queued_jobs(), 1);
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
