// Throughput of Sha256File (common/files.h) on one file: not a test, a timing program whose numbers
// go into docs/BENCHMARKS.md.
//
//   build/tests/sha256_bench PATH [MIB [RUNS]]
//
// Creates PATH with MIB MiB (default 1024) of deterministic pseudo-random bytes when it does not
// exist, hashes it once to warm the page cache, then RUNS times (default 3) and prints each run's
// MB/s (10^6 bytes per second) of wall time and of this process's CPU time (user + system; the
// steadier number on a shared machine), and the medians.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/files.h"

namespace {

double CpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s PATH [MIB [RUNS]]\n", argv[0]);
    return 2;
  }
  const std::string path = argv[1];
  const int64_t mib = argc > 2 ? std::atoll(argv[2]) : 1024;
  const int runs = argc > 3 ? std::atoi(argv[3]) : 3;
  if (mib <= 0 || runs <= 0) {
    std::fprintf(stderr, "MIB and RUNS must be positive\n");
    return 2;
  }
  if (!std::filesystem::exists(path)) {
    std::ofstream out(path, std::ios::binary);
    std::vector<uint64_t> block((1 << 20) / sizeof(uint64_t));
    uint64_t state = 0x9e3779b97f4a7c15ull;  // SplitMix64
    for (int64_t m = 0; m < mib && out; ++m) {
      for (uint64_t& v : block) {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        v = z ^ (z >> 31);
      }
      out.write(reinterpret_cast<const char*>(block.data()), block.size() * sizeof(uint64_t));
    }
    if (!out) {
      std::fprintf(stderr, "%s: cannot write\n", path.c_str());
      return 1;
    }
  }
  const double bytes = static_cast<double>(std::filesystem::file_size(path));
  auto warm = qcal::Sha256File(path);
  if (!warm.ok()) {
    std::fprintf(stderr, "%s\n", warm.status().ToString().c_str());
    return 1;
  }
  std::printf("%s  %s (%.0f bytes)\n", warm->c_str(), path.c_str(), bytes);
  std::vector<double> rates, cpu_rates;
  for (int r = 0; r < runs; ++r) {
    const auto start = std::chrono::steady_clock::now();
    const double cpu_start = CpuSeconds();
    auto digest = qcal::Sha256File(path);
    const double cpu = CpuSeconds() - cpu_start;
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!digest.ok() || *digest != *warm) {
      std::fprintf(stderr, "run %d: digest changed or failed\n", r);
      return 1;
    }
    rates.push_back(bytes / seconds / 1e6);
    cpu_rates.push_back(bytes / cpu / 1e6);
    std::printf("run %d: %.3f s wall, %.1f MB/s; %.3f s CPU, %.1f MB/s\n", r + 1, seconds,
                rates.back(), cpu, cpu_rates.back());
  }
  std::printf("median: %.1f MB/s wall, %.1f MB/s CPU\n", Median(rates), Median(cpu_rates));
  return 0;
}
