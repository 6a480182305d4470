// ParallelFor: the one way qcal code splits CPU work across threads.
//
// Why not OpenMP: libgomp's barriers spin, and on an oversubscribed machine (CI runs tests in
// parallel on 2 cores) a descheduled spinning thread turned a 1 s quantization into 50 s. Here the
// calling thread and short-lived worker threads split [0, n) into one contiguous range each, and
// the caller blocks in join() — nothing spins. The split depends only on n and the thread count,
// and callers write disjoint outputs, so results do not depend on scheduling.
#pragma once

#include <cstdint>
#include <functional>

namespace qcal {

// Sets the process-wide thread count for ParallelFor (0 = number of cores); returns the count used.
int SetParallelThreads(int threads);
int ParallelThreads();

// Calls fn(begin, end) on contiguous ranges that cover [0, n), one range per thread, and returns
// when all have finished. Runs on the calling thread alone when n * work_per_item is below
// kMinParallelWork (thread start-up would cost more than it saves) or when one thread is set.
inline constexpr int64_t kMinParallelWork = int64_t{1} << 16;
void ParallelFor(int64_t n, int64_t work_per_item, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qcal
