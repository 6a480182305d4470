#include "common/memory_usage.h"

#include <cstdio>
#include <cstring>

namespace qcal {
namespace {

// The value of `key` ("VmRSS:", "VmHWM:") in /proc/self/status, in bytes.
int64_t StatusKilobytes(const char* key) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  int64_t kb = 0;
  const size_t n = std::strlen(key);
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, key, n) == 0) {
      long long v = 0;
      if (std::sscanf(line + n, "%lld", &v) == 1) kb = v;
      break;
    }
  }
  std::fclose(f);
  return kb * 1024;
}

}  // namespace

int64_t CurrentRssBytes() { return StatusKilobytes("VmRSS:"); }

int64_t PeakRssBytes() { return StatusKilobytes("VmHWM:"); }

bool ResetPeakRss() {
  // "5" resets the peak resident set size (Documentation/filesystems/proc.rst, clear_refs).
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

}  // namespace qcal
