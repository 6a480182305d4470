#include <cstdio>

#include "tools/qcal/commands.h"

namespace qcal::cli {

int ReportError(const absl::Status& status) {
  std::string msg(status.message());
  for (char& c : msg) {
    if (c == '\n') c = ' ';
  }
  std::fprintf(stderr, "qcal: error: %s\n", msg.c_str());
  return 1;
}

}  // namespace qcal::cli
