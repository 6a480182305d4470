#include "services/engine/oac/factor_prefetch.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qcal::engine {

OacFactorPrefetch::OacFactorPrefetch(kernels::Backend& side, std::vector<LinearKind> kinds,
                                     Factorize factorize) {
  std::vector<Promise> promises(kinds.size());
  for (size_t i = 0; i < kinds.size(); ++i) pending_[kinds[i]] = promises[i].get_future();
  thread_ = std::thread(&OacFactorPrefetch::Run, this, std::ref(side), std::move(kinds),
                        std::move(factorize), std::move(promises));
}

OacFactorPrefetch::~OacFactorPrefetch() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<kernels::GptqFactor> OacFactorPrefetch::Take(LinearKind kind) {
  auto it = pending_.find(kind);
  if (it == pending_.end()) {
    return absl::InternalError(
        absl::StrCat("no prefetched factor for ", LinearName(kind), " (or taken twice)"));
  }
  absl::StatusOr<kernels::GptqFactor> f = it->second.get();
  pending_.erase(it);
  return f;
}

void OacFactorPrefetch::Run(kernels::Backend& side, std::vector<LinearKind> kinds,
                            Factorize factorize, std::vector<Promise> promises) {
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (stop_) {
      promises[i].set_value(absl::CancelledError("the block ended before this factorization"));
      continue;
    }
    promises[i].set_value(factorize(side, kinds[i]));
  }
}

}  // namespace qcal::engine
