#include "common/memory_usage.h"

#include <cstdio>
#include <cstring>

namespace qcal {
namespace {

// The value of `key` ("VmRSS:", "VmHWM:", "MemAvailable:") in a /proc file of "key: N kB" lines,
// in bytes; `missing` when the file or key is absent.
int64_t ProcKilobytes(const char* path, const char* key, int64_t missing) {
  std::FILE* f = std::fopen(path, "r");
  if (f == nullptr) return missing;
  char line[256];
  int64_t bytes = missing;
  const size_t n = std::strlen(key);
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, key, n) == 0) {
      long long v = 0;
      if (std::sscanf(line + n, "%lld", &v) == 1) bytes = static_cast<int64_t>(v) * 1024;
      break;
    }
  }
  std::fclose(f);
  return bytes;
}

}  // namespace

int64_t CurrentRssBytes() { return ProcKilobytes("/proc/self/status", "VmRSS:", 0); }

int64_t PeakRssBytes() { return ProcKilobytes("/proc/self/status", "VmHWM:", 0); }

int64_t AvailableHostMemoryBytes() { return ProcKilobytes("/proc/meminfo", "MemAvailable:", -1); }

bool ResetPeakRss() {
  // "5" resets the peak resident set size (Documentation/filesystems/proc.rst, clear_refs).
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

}  // namespace qcal
