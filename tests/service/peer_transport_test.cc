// The internal peer service and the gRPC Transport (services/worker/peer/): three ranks, each with
// its own PeerServer on loopback port 0 and its own GrpcTransport, exchanging real messages.
#include <chrono>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "qcal/v1/peer_service.grpc.pb.h"
#include "services/worker/peer/grpc_transport.h"
#include "services/worker/peer/peer_server.h"

namespace qcal::worker {
namespace {

using engine::GangPlan;
using engine::LinearInput;
using engine::LinearKind;
using engine::MessageKey;
using engine::MessageKind;

constexpr char kJob[] = "job-1";
constexpr uint64_t kEpoch = 7;
constexpr int kWorld = 3;

// Owners: q 0, k 1, v 2, o 0, gate 1, up 2, down 0. So the statistic owners are qkv 0 (consumers
// 0, 1, 2), o 0 (0), gate/up 1 (1, 2), down 0 (0). Four expert units (an MoE model's) owned by
// 0, 1, 2, 1.
GangPlan Plan(int rank, uint64_t epoch = kEpoch) {
  GangPlan p;
  p.epoch = epoch;
  p.rank = rank;
  p.world = kWorld;
  p.total_chunks = 3;
  p.chunks = {{0, 1}, {1, 2}, {2, 3}};
  p.owners = {0, 1, 2, 0, 1, 2, 0};
  p.expert_owners = {0, 1, 2, 1};
  return p;
}

MessageKey Key(MessageKind kind, int item, int from, int step = 1, int block = 0) {
  MessageKey k;
  k.block = block;
  k.step = step;
  k.kind = kind;
  k.item = item;
  k.from = from;
  return k;
}

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

double SecondsSince(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

class PeerTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int r = 0; r < kWorld; ++r) {
      absl::StatusOr<std::unique_ptr<PeerServer>> s = PeerServer::Start({});
      ASSERT_TRUE(s.ok()) << s.status();
      servers_.push_back(*std::move(s));
      addresses_.push_back(servers_.back()->address());
      ASSERT_TRUE(servers_.back()->SetTask(kJob, Plan(r)).ok());
    }
    for (int r = 0; r < kWorld; ++r) transports_.push_back(MakeTransport(Plan(r)));
  }

  std::unique_ptr<GrpcTransport> MakeTransport(const GangPlan& plan,
                                               absl::Duration timeout = absl::Seconds(20)) {
    GrpcTransportOptions options;
    options.timeout = timeout;
    options.timeout_per_mib = absl::ZeroDuration();
    absl::StatusOr<std::unique_ptr<GrpcTransport>> t = GrpcTransport::Create(
        kJob, plan, addresses_, servers_[static_cast<size_t>(plan.rank)].get(), options);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *std::move(t) : nullptr;
  }

  std::vector<std::unique_ptr<PeerServer>> servers_;
  std::vector<std::string> addresses_;
  std::vector<std::unique_ptr<GrpcTransport>> transports_;
};

TEST_F(PeerTransportTest, LargePayloadArrivesIntactInChunks) {
  const std::string payload = RandomBytes(9 << 20, 1);
  const MessageKey key = Key(MessageKind::kLayer, static_cast<int>(LinearKind::kQ), 0, 1, 4);
  ASSERT_TRUE(transports_[0]->Send(1, key, payload).ok());
  absl::StatusOr<std::string> got = transports_[1]->Receive(key, absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->size(), payload.size());
  EXPECT_TRUE(*got == payload);
  const PeerServer::Stats stats = servers_[1]->stats();
  EXPECT_EQ(stats.messages, 1);
  EXPECT_GE(stats.data_chunks, 3);
  EXPECT_EQ(stats.bytes, 9 << 20);
  // Each message is received once.
  absl::StatusOr<std::string> again = transports_[1]->Receive(key, absl::Milliseconds(50));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST_F(PeerTransportTest, ReceiveWaitsForTheMessage) {
  const MessageKey key = Key(MessageKind::kControl, 0, 0, engine::kStepBoundary);
  std::thread sender([&] {
    absl::SleepFor(absl::Milliseconds(300));
    EXPECT_TRUE(transports_[0]->Send(2, key, "checkpoint").ok());
  });
  const absl::Time start = absl::Now();
  absl::StatusOr<std::string> got = transports_[2]->Receive(key, absl::Seconds(10));
  const double waited = SecondsSince(start);
  sender.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "checkpoint");
  EXPECT_GE(waited, 0.25);
  EXPECT_LT(waited, 5.0);
  EXPECT_GE(transports_[2]->receive_wait_seconds(), 0.25);
  EXPECT_LE(transports_[2]->receive_wait_seconds(), waited + 0.01);
}

TEST_F(PeerTransportTest, StaleGangEpochIsRefusedNamingBothEpochs) {
  std::unique_ptr<GrpcTransport> stale = MakeTransport(Plan(0, kEpoch - 1));
  const absl::Time start = absl::Now();
  const absl::Status s = stale->Send(1, Key(MessageKind::kLayer, 0, 0), "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "stale gang epoch 6, the gang runs under 7")) << s;
  EXPECT_LT(SecondsSince(start), 2.0);  // refused at once, not retried
  EXPECT_EQ(stale->bytes_sent(), 0);
}

TEST_F(PeerTransportTest, LayerFromNonOwnerIsRefused) {
  // Linear q is rank 0's; rank 1 sends it (several chunks: refused while the sender streams).
  const absl::Status s = transports_[1]->Send(
      2, Key(MessageKind::kLayer, static_cast<int>(LinearKind::kQ), 1), RandomBytes(8 << 20, 5));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "does not own that linear (rank 0 does)")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), addresses_[2])) << s;
}

TEST_F(PeerTransportTest, PartialsToNonOwnerAreRefused) {
  // The gate/up statistic is completed at rank 1, not rank 2.
  const int gate_up = static_cast<int>(LinearInput::kGateUp);
  const absl::Status s = transports_[0]->Send(2, Key(MessageKind::kPartials, gate_up, 0), "p");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 2 does not own that statistic (rank 1 does)"))
      << s;
  EXPECT_TRUE(transports_[0]->Send(1, Key(MessageKind::kPartials, gate_up, 0), "p").ok());
}

TEST_F(PeerTransportTest, StatisticAndControlRules) {
  const int gate_up = static_cast<int>(LinearInput::kGateUp);
  // From its owner (1) to another consumer owner (2): accepted; to rank 0, which owns no consumer
  // of it: refused, except at the smoothing step, whose statistics go to every rank.
  EXPECT_TRUE(transports_[1]->Send(2, Key(MessageKind::kStatistic, gate_up, 1), "s").ok());
  EXPECT_EQ(transports_[1]->Send(0, Key(MessageKind::kStatistic, gate_up, 1), "s").code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(transports_[1]
                  ->Send(0, Key(MessageKind::kStatistic, gate_up, 1, engine::kStepSmoothing), "s")
                  .ok());
  // From a rank that does not own it: refused, smoothing step or not.
  EXPECT_EQ(transports_[2]
                ->Send(0, Key(MessageKind::kStatistic, gate_up, 2, engine::kStepSmoothing), "s")
                .code(),
            absl::StatusCode::kFailedPrecondition);
  // Control comes from rank 0 only.
  EXPECT_EQ(transports_[1]->Send(2, Key(MessageKind::kControl, 0, 1, 5), "c").code(),
            absl::StatusCode::kFailedPrecondition);
  // The transport refuses a key whose sender is not this rank, before any RPC.
  EXPECT_EQ(transports_[1]->Send(2, Key(MessageKind::kControl, 0, 0, 5), "c").code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PeerTransportTest, GradientPartialsGoOnlyToTheLinearsOwner) {
  const int k = static_cast<int>(LinearKind::kK);  // owned by rank 1
  const MessageKey key = Key(MessageKind::kOacPartials, k, 0, engine::kStepGradientPass, 3);
  ASSERT_TRUE(transports_[0]->Send(1, key, "h").ok());
  EXPECT_EQ(*transports_[1]->Receive(key, absl::Seconds(1)), "h");
  const absl::Status s = transports_[0]->Send(2, key, "h");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 2 does not own that linear (rank 1 does)")) << s;
  // The pass's partials have their own step, and only they use it.
  EXPECT_FALSE(transports_[0]->Send(1, Key(MessageKind::kOacPartials, k, 0, 1), "h").ok());
  EXPECT_FALSE(transports_[2]
                   ->Send(0, Key(MessageKind::kPartials, 0, 2, engine::kStepGradientPass), "p")
                   .ok());
}

// Mixture-of-experts blocks: unit u's partials go to its owner and its solved linears come from
// it, at step ExpertStep(u); token counts go from every rank to every other at kStepRouting.
TEST_F(PeerTransportTest, ExpertMessagesFollowTheUnitsOwner) {
  const int gate_up = static_cast<int>(LinearInput::kGateUp);
  const int down = static_cast<int>(LinearInput::kDown);
  const int up = static_cast<int>(LinearKind::kUp);
  const MessageKey partials = Key(MessageKind::kPartials, down, 0, engine::ExpertStep(3), 1);
  ASSERT_TRUE(transports_[0]->Send(1, partials, "p").ok());
  EXPECT_EQ(*transports_[1]->Receive(partials, absl::Seconds(1)), "p");
  // Unit 3's partials to rank 2, which does not own it (the dense gate/up statistic's owner
  // would be rank 1 too: the refusal names the unit).
  absl::Status s = transports_[0]->Send(
      2, Key(MessageKind::kPartials, gate_up, 0, engine::ExpertStep(3), 1), "p");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 2 does not own that expert unit (rank 1 does)"))
      << s;
  // Unit 2's up_proj from its owner, and from a rank that does not own it.
  EXPECT_TRUE(
      transports_[2]->Send(0, Key(MessageKind::kLayer, up, 2, engine::ExpertStep(2), 1), "l").ok());
  s = transports_[1]->Send(0, Key(MessageKind::kLayer, up, 1, engine::ExpertStep(2), 1), "l");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "the sender does not own that expert unit (rank 2 "))
      << s;
  // A unit the plan does not have; an expert step's item that is no expert's; a statistic at an
  // expert step.
  s = transports_[0]->Send(1, Key(MessageKind::kPartials, down, 0, engine::ExpertStep(4), 1), "p");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "the plan has 4 expert units")) << s;
  EXPECT_EQ(transports_[0]
                ->Send(1,
                       Key(MessageKind::kLayer, static_cast<int>(LinearKind::kQ), 0,
                           engine::ExpertStep(0), 1),
                       "l")
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(transports_[0]
                ->Send(1, Key(MessageKind::kStatistic, down, 0, engine::ExpertStep(0), 1), "s")
                .code(),
            absl::StatusCode::kInvalidArgument);
  // Token counts: any rank to any other, at their own step only.
  const MessageKey counts = Key(MessageKind::kTokenCounts, 0, 2, engine::kStepRouting, 1);
  ASSERT_TRUE(transports_[2]->Send(1, counts, "c").ok());
  EXPECT_EQ(*transports_[1]->Receive(counts, absl::Seconds(1)), "c");
  EXPECT_EQ(transports_[2]->Send(1, Key(MessageKind::kTokenCounts, 0, 2, 1, 1), "c").code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PeerTransportTest, ResentMessageIsAcceptedOnceAndAnotherPayloadRefused) {
  const MessageKey key = Key(MessageKind::kLayer, static_cast<int>(LinearKind::kK), 1);
  ASSERT_TRUE(transports_[1]->Send(0, key, "same").ok());
  ASSERT_TRUE(transports_[1]->Send(0, key, "same").ok());
  const absl::Status s = transports_[1]->Send(0, key, "other");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "already delivered")) << s;
  EXPECT_EQ(*transports_[0]->Receive(key, absl::Seconds(1)), "same");
  // Still a duplicate once received: not queued again.
  ASSERT_TRUE(transports_[1]->Send(0, key, "same").ok());
  EXPECT_EQ(transports_[0]->Receive(key, absl::Milliseconds(50)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(servers_[0]->stats().messages, 1);
}

TEST_F(PeerTransportTest, SlowerPeerIsRetriedUntilItOpensTheTask) {
  servers_[2]->ClearTask();
  const MessageKey key = Key(MessageKind::kLayer, static_cast<int>(LinearKind::kDown), 0);
  std::thread opener([&] {
    absl::SleepFor(absl::Milliseconds(400));
    EXPECT_TRUE(servers_[2]->SetTask(kJob, Plan(2)).ok());
  });
  const absl::Time start = absl::Now();
  const std::string down = RandomBytes(6 << 20, 6);
  const absl::Status s = transports_[0]->Send(2, key, down);
  opener.join();
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_GE(SecondsSince(start), 0.35);
  EXPECT_TRUE(*transports_[2]->Receive(key, absl::Seconds(1)) == down);
  EXPECT_EQ(transports_[0]->bytes_sent(), static_cast<int64_t>(down.size()));
}

TEST_F(PeerTransportTest, NewerEpochIsNotReadyUntilTheDeadline) {
  // Rank 0 already runs the newer epoch (its own server too); rank 1 does not yet.
  ASSERT_TRUE(servers_[0]->SetTask(kJob, Plan(0, kEpoch + 1)).ok());
  std::unique_ptr<GrpcTransport> ahead = MakeTransport(Plan(0, kEpoch + 1), absl::Seconds(1));
  const absl::Time start = absl::Now();
  const absl::Status s = ahead->Send(1, Key(MessageKind::kLayer, 0, 0), "x");
  const double elapsed = SecondsSince(start);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "not ready: gang epoch 8")) << s;
  EXPECT_GE(elapsed, 0.5);
  EXPECT_LT(elapsed, 3.0);
}

TEST_F(PeerTransportTest, DroppedTaskStopsRetriesAtOnce) {
  // Rank 1 is down; rank 0's task is cleared (a heartbeat's drop_task) while it retries.
  servers_[1].reset();
  std::thread dropper([&] {
    absl::SleepFor(absl::Milliseconds(300));
    servers_[0]->ClearTask();
  });
  const absl::Time start = absl::Now();
  const absl::Status s = transports_[0]->Send(1, Key(MessageKind::kPartials, 0, 0), "x");
  dropper.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
  EXPECT_LT(SecondsSince(start), 5.0);
}

TEST_F(PeerTransportTest, UnreachablePeerFailsWithinTheDeadline) {
  const std::string dead = addresses_[2];
  servers_[2].reset();  // shut down: nobody listens on that port any more
  std::unique_ptr<GrpcTransport> t = MakeTransport(Plan(0), absl::Seconds(1));
  const absl::Time start = absl::Now();
  const absl::Status s = t->Send(2, Key(MessageKind::kLayer, 0, 0), RandomBytes(1 << 20, 2));
  const double elapsed = SecondsSince(start);
  EXPECT_TRUE(s.code() == absl::StatusCode::kDeadlineExceeded ||
              s.code() == absl::StatusCode::kUnavailable)
      << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "to rank 2 at " + dead)) << s;
  EXPECT_LT(elapsed, 3.0);
  EXPECT_EQ(t->bytes_sent(), 0);
  // The rest of the gang goes on.
  EXPECT_TRUE(t->Send(1, Key(MessageKind::kLayer, 0, 0), "alive").ok());
}

TEST_F(PeerTransportTest, ReceiveTimesOutNamingTheKey) {
  const MessageKey key = Key(MessageKind::kStatistic, 0, 0, 2, 3);
  const absl::Time start = absl::Now();
  absl::StatusOr<std::string> got = transports_[1]->Receive(key, absl::Milliseconds(200));
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(got.status().message(), engine::DescribeKey(key))) << got.status();
  EXPECT_GE(SecondsSince(start), 0.19);
}

TEST_F(PeerTransportTest, ByteCountersEqualThePayloadsSent) {
  const std::string a = RandomBytes(5 << 20, 3), b = RandomBytes(12345, 4), c;
  ASSERT_TRUE(transports_[0]->Send(1, Key(MessageKind::kLayer, 0, 0), a).ok());
  ASSERT_TRUE(transports_[0]->Send(2, Key(MessageKind::kLayer, 0, 0), b).ok());
  ASSERT_TRUE(transports_[0]->Send(2, Key(MessageKind::kLayer, 3, 0), c).ok());
  // A refused message counts nothing.
  EXPECT_FALSE(transports_[0]->Send(2, Key(MessageKind::kLayer, 1, 0), b).ok());
  EXPECT_EQ(transports_[0]->bytes_sent(), static_cast<int64_t>(a.size() + b.size()));
  EXPECT_EQ(transports_[1]->bytes_sent(), 0);
  EXPECT_EQ(servers_[1]->stats().bytes, static_cast<int64_t>(a.size()));
  EXPECT_EQ(*transports_[2]->Receive(Key(MessageKind::kLayer, 3, 0), absl::Seconds(1)), "");
}

TEST_F(PeerTransportTest, ClearTaskWakesAWaitingReceive) {
  absl::StatusOr<std::string> got;
  const absl::Time start = absl::Now();
  std::thread waiter([&] {
    got = transports_[1]->Receive(Key(MessageKind::kControl, 0, 0, 5), absl::Seconds(30));
  });
  absl::SleepFor(absl::Milliseconds(200));
  servers_[1]->ClearTask();
  waiter.join();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kCancelled) << got.status();
  EXPECT_LT(SecondsSince(start), 5.0);
  // Without the task, the transport refuses to receive, and deliveries are not ready.
  EXPECT_EQ(transports_[1]
                ->Receive(Key(MessageKind::kControl, 0, 0, 5), absl::Seconds(1))
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
}

// Raw streams: what a misbehaving sender gets.
class RawDeliverTest : public PeerTransportTest {
 protected:
  absl::Status Deliver(const v1::PeerHeader& header, const std::vector<std::string>& pieces) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(64 << 20);
    auto stub = v1::PeerService::NewStub(
        grpc::CreateCustomChannel(addresses_[1], grpc::InsecureChannelCredentials(), args));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::DeliverResponse response;
    auto writer = stub->Deliver(&context, &response);
    v1::PeerChunk chunk;
    *chunk.mutable_header() = header;
    bool ok = writer->Write(chunk);
    for (const std::string& p : pieces) {
      chunk.set_data(p);
      ok = ok && writer->Write(chunk);
    }
    if (ok) writer->WritesDone();
    return rpc::FromGrpcStatus(writer->Finish());
  }

  v1::PeerHeader Header(const std::string& payload) {
    v1::PeerHeader h;
    h.set_job_id(kJob);
    h.set_gang_epoch(kEpoch);
    *h.mutable_key() = ToProto(Key(MessageKind::kLayer, 0, 0));
    h.set_size(static_cast<int64_t>(payload.size()));
    h.set_sha256(Sha256Hex(payload));
    return h;
  }
};

TEST_F(RawDeliverTest, CorruptOrShortPayloadIsDataLoss) {
  v1::PeerHeader h = Header("payload");
  EXPECT_EQ(Deliver(h, {"paYload"}).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Deliver(h, {"pay"}).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Deliver(h, {"payload", "more"}).code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Deliver(h, {"pay", "load"}).ok());
}

TEST_F(RawDeliverTest, MalformedStreamsAreRefused) {
  EXPECT_EQ(Deliver(v1::PeerHeader(), {}).code(), absl::StatusCode::kFailedPrecondition);
  v1::PeerHeader h = Header("x");
  h.mutable_key()->set_kind(9);
  EXPECT_EQ(Deliver(h, {"x"}).code(), absl::StatusCode::kInvalidArgument);
  h = Header("x");
  h.set_job_id("job-2");
  const absl::Status other = Deliver(h, {"x"});
  EXPECT_EQ(other.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(other.message(), "runs job job-1, not job job-2")) << other;
  h = Header("x");
  h.mutable_key()->set_from(1);  // the receiver itself
  EXPECT_EQ(Deliver(h, {"x"}).code(), absl::StatusCode::kFailedPrecondition);
  // A piece over 3.5 MiB: over the explicit 4 MiB message limit, or refused by the server.
  const std::string big(5 << 20, 'b');
  EXPECT_NE(Deliver(Header(big), {big}).code(), absl::StatusCode::kOk);
}

TEST(AdvertiseAddressTest, WildcardHostBecomesTheHostname) {
  EXPECT_EQ(AdvertiseAddress("peer-3:7000", "0.0.0.0:41000"), "peer-3:7000");
  EXPECT_EQ(AdvertiseAddress("", "127.0.0.1:41000"), "127.0.0.1:41000");
  const std::string any = AdvertiseAddress("", "0.0.0.0:41000");
  EXPECT_TRUE(absl::EndsWith(any, ":41000")) << any;
  EXPECT_FALSE(absl::StartsWith(any, "0.0.0.0")) << any;
  EXPECT_FALSE(absl::StartsWith(AdvertiseAddress("", "[::]:41000"), "[::]"));
}

TEST(PeerServerTest, ListensOnTheRequestedHostWithAChosenPort) {
  absl::StatusOr<std::unique_ptr<PeerServer>> s = PeerServer::Start({});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(absl::StartsWith((*s)->address(), "127.0.0.1:"));
  EXPECT_NE((*s)->address(), "127.0.0.1:0");
  PeerServerOptions bad;
  bad.listen = "nope";
  EXPECT_EQ(PeerServer::Start(bad).status().code(), absl::StatusCode::kInvalidArgument);
  // A port in use cannot be bound twice.
  PeerServerOptions taken;
  taken.listen = (*s)->address();
  EXPECT_EQ(PeerServer::Start(taken).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace qcal::worker
