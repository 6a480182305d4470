// OacFactorPrefetch on the CPU backend (the CUDA side queue runs the same class:
// cuda_engine_test's PrefetchedOutputAdaptiveFactorsChangeNothing): factors taken from the thread
// equal GptqFactorize's on this thread bit for bit, in the order asked; a factorization's error
// reaches the taker; a prefetcher dropped with factors untaken joins its thread.
#include "services/engine/oac/factor_prefetch.h"

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/hash_random.h"

namespace qcal::engine {
namespace {

std::unique_ptr<kernels::Backend> Cpu() {
  kernels::BackendOptions options;
  options.threads = 1;
  auto be = kernels::CreateBackend(options);
  EXPECT_TRUE(be.ok()) << be.status();
  return be.ok() ? std::move(*be) : nullptr;
}

// XᵀX of a uniform X with 2n rows (positive definite), seeded by `seed`; with `negate`, −XᵀX
// (no damping makes it positive definite).
Tensor Hessian(int64_t n, uint64_t seed, bool negate = false) {
  const int64_t rows = 2 * n;
  std::vector<float> x(static_cast<size_t>(rows * n));
  for (size_t i = 0; i < x.size(); ++i) x[i] = kernels::HashUniform(seed, i, -1.0f, 1.0f);
  Tensor h = Tensor::Zeros(DType::kF32, {n, n});
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0;
      for (int64_t r = 0; r < rows; ++r) sum += double(x[r * n + i]) * x[r * n + j];
      h.data<float>()[i * n + j] = static_cast<float>(negate ? -sum : sum);
    }
  }
  return h;
}

kernels::GptqSolveOptions Options() {
  kernels::GptqSolveOptions o;
  o.damp = 0.01;
  o.act_order = true;
  return o;
}

void ExpectSameFactor(const kernels::GptqFactor& a, const kernels::GptqFactor& b) {
  EXPECT_EQ(a.n, b.n);
  EXPECT_EQ(a.perm, b.perm);
  EXPECT_EQ(a.removed, b.removed);
  EXPECT_EQ(a.damp_used, b.damp_used);
  ASSERT_EQ(a.u.nbytes(), b.u.nbytes());
  EXPECT_EQ(std::memcmp(a.u.raw(), b.u.raw(), a.u.nbytes()), 0);
}

int64_t Width(LinearKind k) { return k == LinearKind::kDown ? 40 : 24; }

TEST(OacFactorPrefetchTest, FactorsEqualTheSolvesOwnInTheOrderAsked) {
  auto main = Cpu(), side = Cpu();
  ASSERT_TRUE(main && side);
  const std::vector<LinearKind> kinds = {LinearKind::kQ, LinearKind::kK, LinearKind::kDown};
  std::mutex mu;
  std::vector<LinearKind> order;
  OacFactorPrefetch prefetch(*side, kinds, [&](kernels::Backend& be, LinearKind k) {
    {
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(k);
    }
    return be.GptqFactorize(Hessian(Width(k), static_cast<uint64_t>(k)), Options());
  });
  EXPECT_FALSE(prefetch.Has(LinearKind::kV));
  // Taken out of order: each waits for its own.
  for (LinearKind k : {LinearKind::kDown, LinearKind::kQ, LinearKind::kK}) {
    SCOPED_TRACE(LinearName(k));
    ASSERT_TRUE(prefetch.Has(k));
    auto ahead = prefetch.Take(k);
    ASSERT_TRUE(ahead.ok()) << ahead.status();
    EXPECT_FALSE(prefetch.Has(k));
    auto own = main->GptqFactorize(Hessian(Width(k), static_cast<uint64_t>(k)), Options());
    ASSERT_TRUE(own.ok()) << own.status();
    ExpectSameFactor(*ahead, *own);
  }
  EXPECT_EQ(order, kinds);
  EXPECT_EQ(prefetch.Take(LinearKind::kQ).status().code(), absl::StatusCode::kInternal);
}

TEST(OacFactorPrefetchTest, AFailedFactorizationReachesTheTaker) {
  auto side = Cpu();
  ASSERT_TRUE(side);
  kernels::GptqSolveOptions undamped = Options();
  undamped.damp = 0;
  OacFactorPrefetch prefetch(*side, {LinearKind::kO}, [&](kernels::Backend& be, LinearKind k) {
    return be.GptqFactorize(Hessian(Width(k), 7, /*negate=*/true), undamped);
  });
  auto f = prefetch.Take(LinearKind::kO);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kFailedPrecondition) << f.status();
  EXPECT_NE(f.status().message().find("positive definite"), std::string::npos) << f.status();
}

TEST(OacFactorPrefetchTest, DroppedWithFactorsUntakenJoins) {
  auto side = Cpu();
  ASSERT_TRUE(side);
  int calls = 0;
  {
    OacFactorPrefetch prefetch(*side, {LinearKind::kGate, LinearKind::kUp},
                               [&](kernels::Backend& be, LinearKind k) {
                                 ++calls;
                                 return be.GptqFactorize(Hessian(Width(k), 3), Options());
                               });
    ASSERT_TRUE(prefetch.Take(LinearKind::kGate).ok());
  }
  // The thread is joined: nothing runs after the scope, and at most the two asked for ran.
  EXPECT_GE(calls, 1);
  EXPECT_LE(calls, 2);
}

}  // namespace
}  // namespace qcal::engine
