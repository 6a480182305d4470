// Load (issue 5 acceptance 6): 8 concurrent clients (distinct x-qcal-client values) each submit
// 4 jobs, one of them a retry with a duplicate idempotency key, against 2 workers. Every
// acknowledged job reaches SUCCEEDED, the retries return the original job (no duplicates), a
// duplicate key with a different spec gets ALREADY_EXISTS, and all outputs are byte-identical
// whichever worker ran them.
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "tests/service/service_harness.h"

namespace qcal::testing {
namespace {

constexpr int kClients = 8;
constexpr int kJobsPerClient = 4;  // the 4th repeats the 1st's idempotency key and spec

TEST(ServiceLoadTest, ConcurrentClientsWithDuplicateKeys) {
  Cluster c("load");
  c.StartCoordinator();
  c.StartWorker();
  c.StartWorker();
  auto spec_for = [&](int client, int job) {
    v1::JobSpec spec = c.Spec(absl::StrCat("c", client, "-j", job));
    spec.set_samples(8);
    spec.set_seq_len(32);
    spec.clear_eval_text();
    spec.clear_eval_max_windows();
    return spec;
  };

  absl::Mutex mu;
  std::vector<std::string> acknowledged;  // unique jobs
  std::vector<std::string> problems;
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      std::unique_ptr<service::QuantClient> client = c.Client(absl::StrCat("client-", i));
      std::string first_id;
      for (int j = 0; j < kJobsPerClient; ++j) {
        const int job = j == kJobsPerClient - 1 ? 0 : j;
        v1::SubmitJobRequest request;
        *request.mutable_spec() = spec_for(i, job);
        request.set_idempotency_key(absl::StrCat("key-", job));
        absl::StatusOr<v1::SubmitJobResponse> r = client->Submit(request);
        absl::MutexLock lock(&mu);
        if (!r.ok()) {
          problems.push_back(absl::StrCat("client ", i, " job ", j, ": ", r.status().ToString()));
          continue;
        }
        if (j == 0) first_id = r->job().job_id();
        if (j == kJobsPerClient - 1) {
          if (!r->existing() || r->job().job_id() != first_id) {
            problems.push_back(absl::StrCat("client ", i, ": the retry made a new job"));
          }
        } else {
          acknowledged.push_back(r->job().job_id());
        }
      }
      // The same key with another spec is a conflict, not a new job.
      v1::SubmitJobRequest conflict;
      *conflict.mutable_spec() = spec_for(i, 7);
      conflict.set_idempotency_key("key-1");
      const absl::Status s = client->Submit(conflict).status();
      if (!absl::IsAlreadyExists(s)) {
        absl::MutexLock lock(&mu);
        problems.push_back(absl::StrCat("client ", i, ": conflicting key gave ", s.ToString()));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_TRUE(problems.empty()) << problems.front();
  ASSERT_EQ(acknowledged.size(), static_cast<size_t>(kClients * (kJobsPerClient - 1)));
  EXPECT_EQ(std::set<std::string>(acknowledged.begin(), acknowledged.end()).size(),
            acknowledged.size());

  for (const std::string& id : acknowledged) {
    absl::StatusOr<v1::Job> job = c.WaitFinal(id, absl::Seconds(240));
    ASSERT_TRUE(job.ok()) << job.status() << c.Logs();
    EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << id << ": " << job->error();
    EXPECT_EQ(job->attempts(), 1);
  }
  absl::StatusOr<std::vector<v1::Job>> all = c.Client()->List(v1::JOB_STATE_UNSPECIFIED);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), acknowledged.size());  // nothing beyond the acknowledged jobs
  std::set<std::string> clients;
  for (const v1::Job& job : *all) clients.insert(job.client());
  EXPECT_EQ(clients.size(), static_cast<size_t>(kClients));
  const std::string reference = c.output_root() + "/c0-j0";
  for (const v1::Job& job : *all) {
    EXPECT_EQ(CompareOutputs(reference, c.output_root() + "/" + job.spec().output_name()), "");
  }
}

}  // namespace
}  // namespace qcal::testing
