#include "common/logging.h"

#include "spdlog/sinks/stdout_color_sinks.h"

namespace qcal {

void InitLogging(bool verbose) {
  static bool done = false;
  if (!done) {
    auto logger = spdlog::stderr_color_mt("qcal");
    logger->set_pattern("[%H:%M:%S.%e] %^%l%$ %v");
    spdlog::set_default_logger(logger);
    done = true;
  }
  spdlog::set_level(verbose ? spdlog::level::debug : spdlog::level::info);
}

}  // namespace qcal
