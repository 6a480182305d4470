#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

namespace qcal {
namespace {

std::atomic<int> g_threads{0};

int Cores() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

}  // namespace

int SetParallelThreads(int threads) {
  if (threads <= 0) threads = Cores();
  g_threads.store(threads);
  return threads;
}

int ParallelThreads() {
  const int t = g_threads.load();
  return t > 0 ? t : Cores();
}

void ParallelFor(int64_t n, int64_t work_per_item,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(ParallelThreads(), n);
  if (threads <= 1 || n * std::max<int64_t>(work_per_item, 1) < kMinParallelWork) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  auto range = [&](int64_t t) {
    return std::pair<int64_t, int64_t>(n * t / threads, n * (t + 1) / threads);
  };
  for (int64_t t = 1; t < threads; ++t) {
    // Captured by name: clang 14 (the fuzz build) cannot capture structured bindings.
    const std::pair<int64_t, int64_t> r = range(t);
    workers.emplace_back([&fn, r] { fn(r.first, r.second); });
  }
  const auto [b0, e0] = range(0);
  fn(b0, e0);
  for (auto& w : workers) w.join();
}

}  // namespace qcal
