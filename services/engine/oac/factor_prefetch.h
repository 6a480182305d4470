// Output-adaptive factorizations ahead of the solves.
//
// With a layer Hessian, a linear's GPTQ factor depends on the quantized path up to it, so the
// block loop factorizes each input's Gram matrix when its statistics are complete. An
// output-adaptive Hessian (H_oac or H_tok) is fixed by the gradient pass before the block loop
// starts, so nothing in the block feeds its factorization: OacFactorPrefetch runs them on a host
// thread, on the backend's side queue (Backend::SideBackend), in the order the solves take them,
// while the block's statistics, solves and pushes go on on the main queue. The solve then waits
// only for a factor not yet done. The factors are the ones the solve would compute itself (the same
// GptqFactorize on the same Hessian and options: bit-identical), so prefetching never changes a
// result; it is used where that holds by construction: no smoothing (whose scales transform the
// Hessian, and whose ASER columns change the options, are known only during the block).
//
// Memory: the factors of a block not yet taken (U, d_in × d_in F32 each, up to 0.9 GB a 7B block)
// and one factorization's workspace, on the side queue's pool.
#pragma once

#include <atomic>
#include <functional>
#include <future>
#include <map>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/quant_ops.h"
#include "services/engine/model.h"

namespace qcal::engine {

class OacFactorPrefetch {
 public:
  // Factorizes one linear's output-adaptive Hessian on the side backend it is given, complete
  // (synchronized) on return.
  using Factorize =
      std::function<absl::StatusOr<kernels::GptqFactor>(kernels::Backend& side, LinearKind kind)>;

  // Starts factorizing `kinds` in this order with `factorize` on `side` (a side backend, used by
  // this object's thread only until it is destroyed). `factorize` runs on that thread: what it
  // reads must be safe to read from there and outlive this object.
  OacFactorPrefetch(kernels::Backend& side, std::vector<LinearKind> kinds, Factorize factorize);
  // Stops after the factorization in progress and joins the thread. The caller must have
  // synchronized its own backend after its last use of a taken factor.
  ~OacFactorPrefetch();
  OacFactorPrefetch(const OacFactorPrefetch&) = delete;
  OacFactorPrefetch& operator=(const OacFactorPrefetch&) = delete;

  // Whether `kind` was asked for and not yet taken.
  bool Has(LinearKind kind) const { return pending_.count(kind) > 0; }
  // Waits for the factor of `kind` (Has(kind) must hold): the factor, on the side backend's device
  // and complete, or the error that factorizing it gave.
  absl::StatusOr<kernels::GptqFactor> Take(LinearKind kind);

 private:
  using Promise = std::promise<absl::StatusOr<kernels::GptqFactor>>;
  void Run(kernels::Backend& side, std::vector<LinearKind> kinds, Factorize factorize,
           std::vector<Promise> promises);

  std::map<LinearKind, std::future<absl::StatusOr<kernels::GptqFactor>>> pending_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace qcal::engine
