// The /metrics HTTP server in-process on 127.0.0.1 port 0, against hostile clients (issue 15,
// acceptance 1): one connection trickles its request head a byte a second, another sends a whole
// request and never reads its response (several MiB, more than the loopback socket buffers hold,
// so the server's writes stall). Meanwhile 50 scrapes from 10 concurrent clients must each finish
// within 1 s. Then the server's deadlines must cut both bad connections.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "services/coordinator/prometheus_metrics.h"

namespace qcal::coordinator {
namespace {

// A connected loopback socket (a test failure, -1, otherwise). `rcvbuf` > 0 shrinks the receive
// buffer before connecting, so that the advertised window stays small.
int Connect(int port, int rcvbuf = 0) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
  timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ADD_FAILURE() << "connect: " << std::strerror(errno);
    close(fd);
    return -1;
  }
  return fd;
}

bool SendAll(int fd, const std::string& data) {
  return send(fd, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size());
}

// Reads until EOF, an error or the 5 s receive timeout.
std::string ReadAll(int fd) {
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// One HTTP exchange: the status code and body, with the body checked against Content-Length.
struct Reply {
  int status = 0;
  std::string body;
};
absl::StatusOr<Reply> Request(int port, const std::string& request) {
  const int fd = Connect(port);
  if (fd < 0) return absl::UnavailableError("connect failed");
  const bool sent = SendAll(fd, request);
  const std::string response = ReadAll(fd);
  close(fd);
  if (!sent) return absl::UnavailableError("send failed");
  const size_t head_end = response.find("\r\n\r\n");
  Reply reply;
  if (response.rfind("HTTP/1.", 0) != 0 || head_end == std::string::npos ||
      !absl::SimpleAtoi(response.substr(9, 3), &reply.status)) {
    return absl::DataLossError(absl::StrCat("bad response: ", response.substr(0, 100)));
  }
  const std::string head = response.substr(0, head_end);
  const size_t cl = head.find("Content-Length: ");
  size_t length = 0;
  if (cl == std::string::npos ||
      !absl::SimpleAtoi(head.substr(cl + 16, head.find("\r\n", cl) - cl - 16), &length)) {
    return absl::DataLossError(absl::StrCat("no Content-Length: ", head));
  }
  reply.body = response.substr(head_end + 4);
  if (reply.body.size() != length) {
    return absl::DataLossError(absl::StrCat("body ", reply.body.size(), " of ", length, " bytes"));
  }
  return reply;
}

constexpr char kScrape[] = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

TEST(MetricsHttpTest, ScrapesSucceedBesideASlowSenderAndANonReader) {
  PrometheusMetricsOptions options;
  options.listen = "127.0.0.1:0";
  options.http_threads = 4;
  options.http_request_timeout = absl::Seconds(4);
  options.http_response_timeout = absl::Seconds(5);
  auto metrics = PrometheusMetrics::Create(options);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  PrometheusMetrics& m = **metrics;
  const int port = m.port();
  ASSERT_GT(port, 0);
  // Enough series for a response several times what the server's 256 KiB send buffer and the
  // non-reader's 4 KiB receive buffer hold (each doubled by Linux), so that its writes stall.
  for (int i = 0; i < 800; ++i) m.ObserveRpc(absl::StrCat("Method", i), "OK", 0.01);
  const size_t full = m.Text().size();
  ASSERT_GT(full, size_t{1} << 20);

  // Both bad clients connect before any thread starts, so that no ASSERT leaves one running.
  const absl::Time slow_start = absl::Now();
  const int slow = Connect(port);
  ASSERT_GE(slow, 0);
  const absl::Time stalled_start = absl::Now();
  const int stalled = Connect(port, 4096);
  ASSERT_GE(stalled, 0);

  // The slow sender: a request head that never ends, a byte a second, until the server closes.
  std::atomic<bool> slow_closed{false};
  absl::Time slow_end;  // read after the join
  std::thread slow_sender([&] {
    const std::string head = "GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    for (size_t i = 0; absl::Now() < slow_start + absl::Seconds(10); ++i) {
      if (send(slow, &head[i % head.size()], 1, MSG_NOSIGNAL) != 1) break;
      pollfd p = {slow, POLLIN | POLLRDHUP, 0};
      if (poll(&p, 1, 1000) > 0) {  // the server wrote nothing, so this is its close
        char c;
        if (recv(slow, &c, 1, 0) <= 0) break;
      }
    }
    slow_end = absl::Now();
    slow_closed = true;
  });

  // The non-reader: a whole request, then nothing.
  EXPECT_TRUE(SendAll(stalled, kScrape));
  absl::SleepFor(absl::Milliseconds(500));  // its response is rendered and its writes stall

  // 10 clients, 5 scrapes each, all at once.
  absl::Mutex mu;
  std::vector<double> seconds;
  std::vector<std::string> errors;
  std::vector<std::thread> clients;
  const absl::Time scrapes_start = absl::Now();
  for (int c = 0; c < 10; ++c) {
    clients.emplace_back([&] {
      for (int i = 0; i < 5; ++i) {
        const absl::Time t0 = absl::Now();
        absl::StatusOr<Reply> r = Request(port, kScrape);
        const double s = absl::ToDoubleSeconds(absl::Now() - t0);
        absl::MutexLock lock(&mu);
        seconds.push_back(s);
        if (!r.ok()) {
          errors.push_back(r.status().ToString());
        } else if (r->status != 200 || r->body.find("qcal_rpcs_total") == std::string::npos) {
          errors.push_back(absl::StrCat("HTTP ", r->status));
        }
      }
    });
  }
  for (std::thread& t : clients) t.join();
  const absl::Time scrapes_done = absl::Now();
  EXPECT_TRUE(errors.empty()) << errors.size() << " failed, first: " << errors.front();
  std::sort(seconds.begin(), seconds.end());
  std::printf("scrapes of %zu bytes: 50 in %.2f s, median %.3f s, max %.3f s\n", full,
              absl::ToDoubleSeconds(scrapes_done - scrapes_start), seconds[25], seconds.back());
  EXPECT_LT(seconds.back(), 1.0);
  // Both bad connections were still held open while the scrapes ran.
  EXPECT_LT(scrapes_done, slow_start + options.http_request_timeout);
  EXPECT_LT(scrapes_done, stalled_start + options.http_response_timeout);
  EXPECT_FALSE(slow_closed.load());

  // The deadlines: the slow sender is closed at its request timeout; the non-reader's response is
  // cut short of the whole by the time it starts reading, a second past its response timeout.
  slow_sender.join();
  const double slow_s = absl::ToDoubleSeconds(slow_end - slow_start);
  EXPECT_GT(slow_s, 3.5);
  EXPECT_LT(slow_s, 6.0);
  // Read only once the response deadline has passed: reading earlier would let it complete.
  absl::SleepFor(stalled_start + options.http_response_timeout + absl::Seconds(1) - absl::Now());
  const std::string got = ReadAll(stalled);
  std::printf("slow sender closed after %.2f s; non-reader got %zu of %zu bytes\n", slow_s,
              got.size(), full);
  EXPECT_EQ(got.rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_LT(got.size(), full);
  close(slow);
  close(stalled);
}

// Idle connections fill every slot; a scrape then waits for the request deadline to free one.
TEST(MetricsHttpTest, ConnectionLimitHoldsUntilDeadlinesFreeSlots) {
  PrometheusMetricsOptions options;
  options.listen = "127.0.0.1:0";
  options.http_threads = 2;
  options.http_max_connections = 4;
  options.http_request_timeout = absl::Seconds(1);
  auto metrics = PrometheusMetrics::Create(options);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  const int port = (*metrics)->port();
  std::vector<int> idle;
  for (int i = 0; i < 4; ++i) idle.push_back(Connect(port));
  absl::SleepFor(absl::Milliseconds(200));  // all four accepted
  const absl::Time t0 = absl::Now();
  absl::StatusOr<Reply> r = Request(port, kScrape);
  const double waited = absl::ToDoubleSeconds(absl::Now() - t0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 200);
  std::printf("scrape behind 4 idle connections at the limit: %.2f s\n", waited);
  EXPECT_GT(waited, 0.5);
  EXPECT_LT(waited, 3.0);
  for (int fd : idle) close(fd);
}

TEST(MetricsHttpTest, OnlyGetMetricsIsServed) {
  PrometheusMetricsOptions options;
  options.listen = "127.0.0.1:0";
  auto metrics = PrometheusMetrics::Create(options);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  const int port = (*metrics)->port();
  absl::StatusOr<Reply> ok = Request(port, kScrape);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->status, 200);
  EXPECT_NE(ok->body.find("# TYPE qcal_jobs gauge"), std::string::npos);
  absl::StatusOr<Reply> missing = Request(port, "GET /other HTTP/1.0\r\n\r\n");
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_EQ(missing->status, 404);
  absl::StatusOr<Reply> post =
      Request(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
  ASSERT_TRUE(post.ok()) << post.status();
  EXPECT_EQ(post->status, 405);
}

TEST(MetricsHttpTest, OptionsAreValidated) {
  PrometheusMetricsOptions options;
  options.http_threads = 0;
  EXPECT_FALSE(PrometheusMetrics::Create(options).ok());
  options = {};
  options.http_threads = 8;
  options.http_max_connections = 4;
  EXPECT_FALSE(PrometheusMetrics::Create(options).ok());
  options = {};
  options.http_response_timeout = absl::ZeroDuration();
  EXPECT_FALSE(PrometheusMetrics::Create(options).ok());
  options = {};
  options.listen = "no-port";
  EXPECT_FALSE(PrometheusMetrics::Create(options).ok());
}

}  // namespace
}  // namespace qcal::coordinator
