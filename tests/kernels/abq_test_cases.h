// The (weight bits, activation bits, group) combinations, case names and random operands shared by
// the ABQ tests (abq_ref_test, cuda/cuda_abq_test).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cpu/abq_ref.h"
#include "tests/kernels/kernel_test_random.h"

namespace qcal::kernels::abq_tests {

struct Shape3 {
  int64_t m, n, k;
};

struct Combo {
  int wb;
  bool balanced;  // codes 0..4 on 3 planes
  int ab;
  int group;
};

// Every supported combination: weight bits 2, 3, 4, 8 and the balanced grid, activation bits 4
// and 8, groups -1 (per channel), 32 and 128.
inline std::vector<Combo> AllCombos() {
  std::vector<Combo> out;
  for (int ab : {4, 8}) {
    for (int group : {-1, 32, 128}) {
      for (int wb : {2, 3, 4, 8}) out.push_back({wb, false, ab, group});
      out.push_back({3, true, ab, group});
    }
  }
  return out;
}

inline std::string Name(const Combo& c, const Shape3& s) {
  return absl::StrCat(c.balanced ? "W2*" : absl::StrCat("W", c.wb), "A", c.ab, " g", c.group, " m",
                      s.m, " n", s.n, " k", s.k);
}

// Random packed weights: codes over the whole range (0..4 for the balanced grid), GPTQ v1 zero
// points in [1, 2^wb], positive scales over a few binades.
inline AbqWeights RandomWeights(const Combo& c, int64_t n, int64_t k, kernel_tests::Random& rng) {
  const AbqSpec spec{c.wb, c.ab, c.group};
  const int64_t n_groups = AbqNumGroups(spec, k);
  const int max_code = c.balanced ? 4 : (1 << c.wb) - 1;
  std::vector<int32_t> codes, zeros;
  std::vector<float> scales;
  for (int64_t i = 0; i < n * k; ++i) codes.push_back(rng.Below(max_code + 1));
  for (int64_t i = 0; i < n_groups * n; ++i) {
    zeros.push_back(1 + rng.Below(1 << c.wb));
    scales.push_back(std::ldexp(1.0f + rng.Uniform(0.5f), -3 - rng.Below(6)));
  }
  auto w = PackAbqWeights(codes, zeros, scales, n, k, spec);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *std::move(w) : AbqWeights{};
}

// x [m][k] uniform, with an outlier column per token and (m >= 3) token 1 all zero (s_a = 0).
inline std::vector<float> RandomX(int64_t m, int64_t k, kernel_tests::Random& rng) {
  std::vector<float> x(static_cast<size_t>(m * k));
  for (float& v : x) v = rng.Uniform(1.0f);
  for (int64_t t = 0; t < m; ++t) x[t * k + rng.Below(static_cast<int>(k))] = 8.0f;
  if (m >= 3) std::fill(x.begin() + k, x.begin() + 2 * k, 0.0f);
  return x;
}

}  // namespace qcal::kernels::abq_tests
