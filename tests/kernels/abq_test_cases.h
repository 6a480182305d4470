// The (weight bits, activation bits, group) combinations and case names shared by the ABQ tests
// (abq_ref_test, cuda/cuda_abq_test).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

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

}  // namespace qcal::kernels::abq_tests
