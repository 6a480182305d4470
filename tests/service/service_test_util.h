// Helpers shared by the service tests: a synthetic model tree (input root with a tiny model and
// its texts, output root, data dir), job specs for it, and a simulated clock.
#pragma once

#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "qcal/v1/types.pb.h"
#include "services/coordinator/clock.h"

namespace qcal::testing {

// A directory with input/ (input root: synthetic tiny model at input/tiny with calib.txt and
// eval.txt), output/ (output root) and data/ (coordinator state). Created once per process and
// copied for each caller, since synthesizing trains a tokenizer.
struct ServiceTree {
  std::string root, input, output, data;
};
ServiceTree MakeServiceTree(const std::string& prefix);

// A GPTQ 4-bit spec of input/tiny: 16 samples of 32 tokens, seed 1, output `output_name`.
v1::JobSpec TinySpec(const std::string& output_name);

class FakeClock final : public coordinator::Clock {
 public:
  absl::Time Now() override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  absl::Mutex mu_;
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
};

}  // namespace qcal::testing
