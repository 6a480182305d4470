// The coordinator's source of time, injected so that tests can run it on a simulated clock.
#pragma once

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace qcal::coordinator {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() = 0;
};

// Wall-clock time.
class RealClock final : public Clock {
 public:
  absl::Time Now() override { return absl::Now(); }
};

}  // namespace qcal::coordinator
