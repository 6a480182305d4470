// The coordinator's gRPC connection limits (rpc::ServerLimits, the --grpc-* flags) against a real
// qcal-coordinator on loopback, with small values: calls beyond the per-connection stream limit
// wait in the client until a stream ends (another connection is served at once); an idle
// connection is closed after the idle limit (an open stream keeps it); a client pinging more
// often than the enforcement interval gets its connection closed, ours do not; and `qcal watch`
// follows a job to SUCCEEDED across the GOAWAYs of a short maximum connection age.
#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "qcal/v1/quant_service.grpc.pb.h"
#include "services/common/rpc.h"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

std::shared_ptr<grpc::Channel> Channel(Cluster& c, grpc::ChannelArguments args = {}) {
  return grpc::CreateCustomChannel(c.address(), grpc::InsecureChannelCredentials(), args);
}

// One WatchJob stream read on its own thread: records when the first event arrived and how the
// stream ended.
class Watcher {
 public:
  Watcher(v1::QuantService::Stub* stub, const std::string& job_id, absl::Duration deadline) {
    context_.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    thread_ = std::thread([this, stub, job_id] {
      v1::WatchJobRequest request;
      request.set_job_id(job_id);
      std::unique_ptr<grpc::ClientReader<v1::ProgressEvent>> reader =
          stub->WatchJob(&context_, request);
      v1::ProgressEvent event;
      if (reader->Read(&event)) first_.Notify();
      while (reader->Read(&event)) {
      }
      status_ = reader->Finish();
      ended_.Notify();
    });
  }
  ~Watcher() {
    context_.TryCancel();
    thread_.join();
  }
  bool FirstEventWithin(absl::Duration d) { return first_.WaitForNotificationWithTimeout(d); }
  bool EndedWithin(absl::Duration d) { return ended_.WaitForNotificationWithTimeout(d); }
  void Cancel() { context_.TryCancel(); }
  // Valid once ended.
  const grpc::Status& status() const { return status_; }

 private:
  grpc::ClientContext context_;
  absl::Notification first_, ended_;
  grpc::Status status_;
  std::thread thread_;
};

// A job that stays QUEUED (no worker), so that its WatchJob streams stay open and quiet.
std::string QueuedJob(Cluster& c) { return c.SubmitSpec(c.Spec("queued")); }

TEST(GrpcLimitsTest, CallsBeyondTheStreamLimitWaitForAStreamToEnd) {
  Cluster c("grpc-streams");
  c.StartCoordinator({"--grpc-max-concurrent-streams", "2"});
  const std::string id = QueuedJob(c);
  auto stub = v1::QuantService::NewStub(Channel(c));
  Watcher first(stub.get(), id, absl::Seconds(30));
  Watcher second(stub.get(), id, absl::Seconds(30));
  ASSERT_TRUE(first.FirstEventWithin(absl::Seconds(10)));
  ASSERT_TRUE(second.FirstEventWithin(absl::Seconds(10)));
  // The third stream on the same connection is held by the client: no first event.
  Watcher third(stub.get(), id, absl::Seconds(30));
  EXPECT_FALSE(third.FirstEventWithin(absl::Seconds(2)));
  // Another connection is not limited by this one's streams.
  grpc::ChannelArguments separate;
  separate.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // its own connection
  auto other = v1::QuantService::NewStub(Channel(c, separate));
  Watcher elsewhere(other.get(), id, absl::Seconds(30));
  EXPECT_TRUE(elsewhere.FirstEventWithin(absl::Seconds(5)));
  EXPECT_FALSE(third.FirstEventWithin(absl::ZeroDuration()));
  // One stream ends: the waiting one starts.
  first.Cancel();
  ASSERT_TRUE(first.EndedWithin(absl::Seconds(5)));
  EXPECT_TRUE(third.FirstEventWithin(absl::Seconds(5))) << c.Logs();
}

TEST(GrpcLimitsTest, AnIdleConnectionIsClosedAfterTheIdleLimit) {
  Cluster c("grpc-idle");
  c.StartCoordinator({"--grpc-max-connection-idle-seconds", "1"});
  const std::string id = QueuedJob(c);
  std::shared_ptr<grpc::Channel> channel = Channel(c);
  auto stub = v1::QuantService::NewStub(channel);
  {
    // An open stream is not idle: the connection stays up well past the limit.
    Watcher open(stub.get(), id, absl::Seconds(30));
    ASSERT_TRUE(open.FirstEventWithin(absl::Seconds(10)));
    absl::SleepFor(absl::Seconds(3));
    EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
    EXPECT_FALSE(open.EndedWithin(absl::ZeroDuration()));
  }
  // No call open: the server closes the connection about a second later.
  const absl::Time idle_since = absl::Now();
  absl::Time closed_at = absl::InfiniteFuture();
  while (absl::Now() - idle_since < absl::Seconds(10)) {
    if (channel->GetState(false) != GRPC_CHANNEL_READY) {
      closed_at = absl::Now();
      break;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_NE(closed_at, absl::InfiniteFuture()) << "the idle connection was not closed";
  EXPECT_GE(closed_at - idle_since, absl::Milliseconds(800));
  // The next call reconnects.
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  v1::GetJobRequest request;
  request.set_job_id(id);
  v1::Job job;
  EXPECT_TRUE(stub->GetJob(&context, request, &job).ok());
  EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
}

TEST(GrpcLimitsTest, PingsMoreOftenThanAllowedCloseTheConnection) {
  Cluster c("grpc-pings");
  c.StartCoordinator({"--grpc-min-ping-interval-seconds", "5"});
  const std::string id = QueuedJob(c);
  // A client pinging every 100 ms on a quiet stream: two strikes and GOAWAY.
  grpc::ChannelArguments aggressive;
  aggressive.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 100);
  aggressive.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  aggressive.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  aggressive.SetInt(GRPC_ARG_HTTP2_MIN_SENT_PING_INTERVAL_WITHOUT_DATA_MS, 100);
  auto bad = v1::QuantService::NewStub(Channel(c, aggressive));
  Watcher pinging(bad.get(), id, absl::Seconds(30));
  ASSERT_TRUE(pinging.FirstEventWithin(absl::Seconds(10)));
  ASSERT_TRUE(pinging.EndedWithin(absl::Seconds(10)));
  EXPECT_EQ(pinging.status().error_code(), grpc::StatusCode::UNAVAILABLE)
      << pinging.status().error_message();
  // Our clients' keepalive is within the limit: their quiet stream stays open.
  grpc::ChannelArguments ours;
  rpc::SetClientKeepalive(ours);
  auto good = v1::QuantService::NewStub(Channel(c, ours));
  Watcher quiet(good.get(), id, absl::Seconds(30));
  ASSERT_TRUE(quiet.FirstEventWithin(absl::Seconds(10)));
  EXPECT_FALSE(quiet.EndedWithin(absl::Seconds(3)));
}

TEST(GrpcLimitsTest, WatchFollowsAJobAcrossMaxAgeGoaways) {
  Cluster c("grpc-age");
  // Every connection is sent GOAWAY after about a second and cut a second later: each WatchJob
  // stream (and every worker call) lives at most about two seconds.
  c.StartCoordinator(
      {"--grpc-max-connection-age-seconds", "1", "--grpc-max-connection-age-grace-seconds", "1"});
  const std::string id = QueuedJob(c);
  RunResult watch;
  std::thread watcher([&] { watch = RunQcal({"watch", "--coordinator", c.address(), id}); });
  absl::SleepFor(absl::Seconds(5));  // queued: several streams cut meanwhile
  c.StartWorker();
  absl::StatusOr<v1::Job> job = c.WaitFinal(id, absl::Seconds(120));
  watcher.join();
  ASSERT_TRUE(job.ok()) << job.status() << c.Logs();
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error() << c.Logs();
  EXPECT_EQ(watch.exit_code, 0) << watch.err;
  EXPECT_EQ(watch.out, "SUCCEEDED\n") << watch.err;
  // The watch took several streams: each one the server ended counts once.
  EXPECT_GE(Metric(c, "qcal_rpc_duration_seconds_count{method=\"WatchJob\"}"), 3) << watch.err;
  EXPECT_EQ(CompareOutputs(LocalBaseline(c), c.output_root() + "/queued"), "");
}

TEST(GrpcLimitsTest, BadLimitsAreRefusedNamingTheFlag) {
  Cluster c("grpc-bad");
  const RunResult r =
      RunProcess(BinaryDir() + "/bin/qcal-coordinator",
                 {"--data-dir", c.data_dir(), "--input-root", c.input_root(), "--output-root",
                  c.output_root(), "--listen", "127.0.0.1:0", "--metrics-listen", "",
                  "--grpc-min-ping-interval-seconds", "60"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--grpc-* flags"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("min_ping_interval"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace qcal::testing
