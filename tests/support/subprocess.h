// Runs a program as a subprocess with stdout and stderr captured separately (tests only).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qcal::testing {

struct RunResult {
  bool exited = false;  // false when killed by a signal
  int exit_code = -1;
  int signal = 0;
  std::string out;
  std::string err;
  int64_t max_rss_bytes = 0;  // the process's peak resident set (getrusage of the child)
};

// Runs `path` with `args`, waits for it, and returns what it printed and how it ended.
RunResult RunProcess(const std::string& path, const std::vector<std::string>& args);

// The qcal CLI of this build tree (BinaryDir()/bin/qcal).
std::string QcalPath();
inline RunResult RunQcal(const std::vector<std::string>& args) {
  return RunProcess(QcalPath(), args);
}

}  // namespace qcal::testing
