#include "services/common/fault_injection.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"

namespace qcal::service {

absl::StatusOr<std::unique_ptr<FaultInjector>> FaultInjector::Parse(const std::string& spec,
                                                                    const std::string& process) {
  auto injector = std::make_unique<FaultInjector>();
  for (absl::string_view item : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    const std::string text(item);
    auto bad = [&](const std::string& why) {
      return absl::InvalidArgumentError(absl::StrCat("QCAL_FAULT \"", text, "\": ", why));
    };
    std::vector<std::string> parts = absl::StrSplit(text, ':');
    if (parts.size() < 3) return bad("expected PROCESS[:block=N]:stage=NAME:ACTION");
    const std::string& proc = parts.front();
    if (proc != "worker" && proc != "coordinator")
      return bad("process must be worker or coordinator");
    Fault f;
    const std::string& action = parts.back();
    if (action == "kill") {
      f.kill = true;
    } else if (action != "error") {
      return bad("action must be kill or error");
    }
    for (size_t i = 1; i + 1 < parts.size(); ++i) {
      const std::string& kv = parts[i];
      if (kv.rfind("block=", 0) == 0) {
        if (!absl::SimpleAtoi(kv.substr(6), &f.block) || f.block < 0) return bad("bad block=");
      } else if (kv.rfind("stage=", 0) == 0 && kv.size() > 6) {
        f.stage = kv.substr(6);
      } else {
        return bad(absl::StrCat("unknown part \"", kv, "\""));
      }
    }
    if (f.stage.empty()) return bad("stage= is required");
    if (proc == process) {
      absl::MutexLock lock(&injector->mu_);
      injector->faults_.push_back(f);
    }
  }
  return injector;
}

absl::StatusOr<std::unique_ptr<FaultInjector>> FaultInjector::FromEnv(const std::string& process) {
  const char* env = std::getenv("QCAL_FAULT");
  if (env == nullptr || *env == '\0') return std::make_unique<FaultInjector>();
#if QCAL_FAULT_INJECTION
  return Parse(env, process);
#else
  spdlog::warn("QCAL_FAULT is set but this build has no fault injection (QCAL_TESTS=OFF)");
  return std::make_unique<FaultInjector>();
#endif
}

absl::Status FaultInjector::Hit(const std::string& stage, int block) {
  absl::MutexLock lock(&mu_);
  for (Fault& f : faults_) {
    if (f.fired || f.stage != stage || (f.block >= 0 && f.block != block)) continue;
    f.fired = true;
    spdlog::warn("fault injection: stage={} block={}: {}", stage, block, f.kill ? "kill" : "error");
    if (f.kill) {
      spdlog::default_logger()->flush();
      kill(getpid(), SIGKILL);
    }
    return absl::InternalError(absl::StrCat("injected fault at stage=", stage, " block=", block));
  }
  return absl::OkStatus();
}

}  // namespace qcal::service
