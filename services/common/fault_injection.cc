#include "services/common/fault_injection.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
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
    if (parts.size() < 3) return bad("expected PROCESS[:block=N]:stage=NAME[:p=P[:seed=S]]:ACTION");
    const std::string& proc = parts.front();
    if (proc != "worker" && proc != "coordinator")
      return bad("process must be worker or coordinator");
    Fault f;
    bool has_seed = false;
    const std::string& action = parts.back();
    if (action == "kill") {
      f.action = Action::kKill;
    } else if (action == "error") {
      f.action = Action::kError;
    } else if (action == "stop") {
      f.action = Action::kStop;
    } else {
      return bad("action must be kill, error or stop");
    }
    for (size_t i = 1; i + 1 < parts.size(); ++i) {
      const std::string& kv = parts[i];
      if (kv.rfind("block=", 0) == 0) {
        if (!absl::SimpleAtoi(kv.substr(6), &f.block) || f.block < 0) return bad("bad block=");
      } else if (kv.rfind("stage=", 0) == 0 && kv.size() > 6) {
        f.stage = kv.substr(6);
      } else if (kv.rfind("p=", 0) == 0) {
        if (!absl::SimpleAtod(kv.substr(2), &f.p) || !(f.p > 0 && f.p <= 1)) {
          return bad("p= must be a probability in (0, 1]");
        }
      } else if (kv.rfind("seed=", 0) == 0) {
        if (!absl::SimpleAtoi(kv.substr(5), &f.seed)) return bad("bad seed= (an unsigned integer)");
        has_seed = true;
      } else {
        return bad(absl::StrCat("unknown part \"", kv, "\""));
      }
    }
    if (f.stage.empty()) return bad("stage= is required");
    if (has_seed && f.p == 0) return bad("seed= needs p=");
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

bool FaultInjector::Draw(uint64_t seed, double p, const std::string& stage, int block,
                         int64_t visit) {
  // splitmix64's finalizer over the seed, FNV-1a of the stage, the block and the visit.
  auto mix = [](uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : stage) h = (h ^ c) * 0x100000001b3ULL;
  uint64_t x = mix(seed ^ h);
  x = mix(x ^ static_cast<uint64_t>(static_cast<int64_t>(block)));
  x = mix(x ^ static_cast<uint64_t>(visit));
  // The top 53 bits as a uniform double in [0, 1).
  return static_cast<double>(x >> 11) * 0x1.0p-53 < p;
}

absl::Status FaultInjector::Hit(const std::string& stage, int block) {
  Action action = Action::kError;
  {
    absl::MutexLock lock(&mu_);
    if (faults_.empty()) return absl::OkStatus();
    const int64_t visit = visits_[{stage, block}]++;
    auto it = std::find_if(faults_.begin(), faults_.end(), [&](const Fault& f) {
      if (f.stage != "*" && f.stage != stage) return false;
      if (f.block >= 0 && f.block != block) return false;
      return f.p > 0 ? Draw(f.seed, f.p, stage, block, visit) : !f.fired;
    });
    if (it == faults_.end()) return absl::OkStatus();
    it->fired = true;
    action = it->action;
  }
  const std::string where = absl::StrCat("fault injection: stage=", stage, " block=", block);
  switch (action) {
    case Action::kKill:
      spdlog::warn("{}: kill", where);
      spdlog::default_logger()->flush();
      kill(getpid(), SIGKILL);
      break;
    case Action::kStop:
      spdlog::warn("{}: stop (SIGSTOP; waiting for SIGCONT)", where);
      spdlog::default_logger()->flush();
      raise(SIGSTOP);
      spdlog::warn("{}: continued", where);
      return absl::OkStatus();
    case Action::kError:
      spdlog::warn("{}: error", where);
      break;
  }
  return absl::InternalError(absl::StrCat("injected fault at stage=", stage, " block=", block));
}

}  // namespace qcal::service
