// Cases of the training-op tests (cpu_train_test, cuda/cuda_train_test): clipping layouts with odd
// sizes and size 1, act-order permutations, with and without the solver's grid, symmetric and
// asymmetric grids, 2 to 8 bits; weights that reach every fit branch (a row of positive weights:
// the z = 0 fallback; a zero row: the empty range; outliers: clamped codes) and logits across the
// sigmoid's range, saturated ones included. Deterministic (kernel_tests::Random).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/train_ops.h"
#include "tests/kernels/kernel_test_random.h"

namespace qcal::kernels::kernel_tests {

struct TrainCase {
  std::string name;
  ClipLayout layout;  // host arrays
  Tensor w;           // F32 [d_out, d_in] (host)
  Tensor gamma;       // F32 [d_out, n_groups] (host)
  Tensor beta;        // F32 [d_out, n_groups] (host)
  Tensor dy;          // F32 [d_out, d_in] (host): an upstream gradient dŵ
};

inline TrainCase MakeTrainCase(int64_t d_out, int64_t d_in, int bits, int group_size,
                               bool symmetric, bool permuted, bool grid, uint32_t seed) {
  Random rng(seed);
  TrainCase c;
  c.name = absl::StrCat(d_out, "x", d_in, " b", bits, " g", group_size, symmetric ? " sym" : "",
                        permuted ? " perm" : "", grid ? " grid" : "");
  ClipLayout& l = c.layout;
  l.d_out = d_out;
  l.d_in = d_in;
  l.spec.bits = bits;
  l.spec.group_size = group_size;
  l.spec.symmetric = symmetric;
  if (permuted) {
    l.perm.resize(d_in);
    std::iota(l.perm.begin(), l.perm.end(), 0);
    for (int64_t i = d_in - 1; i > 0; --i) std::swap(l.perm[i], l.perm[rng.Below(i + 1)]);
  }
  if (grid) {
    const int32_t maxq = MaxCode(l.spec);
    const size_t n = static_cast<size_t>(l.n_groups() * d_out);
    l.grid_scales.resize(n);
    l.grid_zeros.resize(n);
    for (size_t i = 0; i < n; ++i) {
      l.grid_scales[i] = RoundScaleToHalf(0.26f + rng.Uniform(0.24f));
      l.grid_zeros[i] = symmetric ? 1 << (bits - 1) : 1 + rng.Below(maxq);
    }
    if (!symmetric) l.grid_zeros[0] = maxq;  // the edge z = maxq
  }
  c.w = rng.Floats({d_out, d_in});
  float* w = c.w.data<float>();
  for (int64_t j = 0; j < d_in; ++j) {
    if (d_out > 1) w[1 * d_in + j] = std::abs(w[1 * d_in + j]) + 0.05f;
    if (d_out > 2) w[2 * d_in + j] = 0.0f;
    if (d_out > 3 && j % 5 == 0) w[3 * d_in + j] *= 6.0f;
  }
  const Shape logits = {d_out, l.n_groups()};
  c.gamma = rng.Floats(logits, 7.0f);
  c.beta = rng.Floats(logits, 7.0f);
  for (int64_t i = 0; i < c.gamma.numel(); ++i) {
    c.gamma.data<float>()[i] += 1.0f;
    if (i % 7 == 3) c.beta.data<float>()[i] = 40.0f;  // σ = 1: unclipped
    if (i % 11 == 5) c.gamma.data<float>()[i] = -30.0f;
  }
  c.dy = rng.Floats({d_out, d_in});
  return c;
}

inline std::vector<TrainCase> TrainCases() {
  std::vector<TrainCase> cases;
  uint32_t seed = 100;
  // d_out, d_in, bits, g, symmetric, permuted, grid
  cases.push_back(MakeTrainCase(1, 1, 4, 128, false, false, false, seed++));  // size 1
  cases.push_back(MakeTrainCase(1, 1, 3, -1, true, true, true, seed++));
  cases.push_back(MakeTrainCase(7, 45, 4, 16, false, true, false, seed++));  // odd, act-order
  cases.push_back(MakeTrainCase(7, 45, 2, 16, true, true, true, seed++));
  cases.push_back(MakeTrainCase(33, 100, 3, 32, false, false, true, seed++));
  cases.push_back(MakeTrainCase(5, 37, 8, 8, true, false, false, seed++));
  cases.push_back(MakeTrainCase(3, 130, 4, -1, false, false, false, seed++));  // one group a row
  cases.push_back(MakeTrainCase(64, 256, 4, 128, false, true, true, seed++));
  cases.push_back(MakeTrainCase(61, 200, 5, 64, true, false, false, seed++));
  // Whole groups of 8 to 128 without act-order: the CUDA kernels' fast path (a lane's weights in
  // registers), with a last block of fewer groups than threads.
  cases.push_back(MakeTrainCase(11, 48, 3, 16, true, false, true, seed++));
  cases.push_back(MakeTrainCase(13, 40, 4, 8, false, false, false, seed++));
  cases.push_back(MakeTrainCase(67, 256, 4, 64, false, false, true, seed++));
  cases.push_back(MakeTrainCase(45, 384, 2, 128, true, false, false, seed++));
  cases.push_back(MakeTrainCase(9, 96, 3, 32, false, false, false, seed++));
  cases.push_back(MakeTrainCase(300, 64, 4, -1, false, false, false, seed++));
  // Many lanes a group: whole groups of 256 and 512 (16 and 32 lanes, each lane's 16 weights in
  // registers), and rows of 1000 (32 lanes of 31 or 32 weights).
  cases.push_back(MakeTrainCase(5, 512, 3, 256, false, false, false, seed++));
  cases.push_back(MakeTrainCase(3, 1024, 4, 512, false, false, true, seed++));
  cases.push_back(MakeTrainCase(4, 1000, 4, -1, true, false, false, seed++));
  return cases;
}

// The layout's arrays as tensors on `be`.
inline ClipTensors ToClipTensors(Backend& be, const ClipLayout& l) {
  ClipTensors t;
  t.d_out = l.d_out;
  t.d_in = l.d_in;
  t.spec = l.spec;
  auto i32 = [&](const std::vector<int32_t>& v, const Shape& shape) {
    Tensor h = Tensor::Zeros(DType::kI32, shape);
    std::copy(v.begin(), v.end(), h.data<int32_t>());
    auto d = be.ToDevice(h);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *d : Tensor();
  };
  if (!l.perm.empty()) t.perm = i32(l.perm, {l.d_in});
  if (l.has_grid()) {
    const Shape grid = {l.n_groups(), l.d_out};
    auto s = be.ToDevice(Tensor::FromVector(l.grid_scales, grid));
    EXPECT_TRUE(s.ok()) << s.status();
    if (s.ok()) t.grid_scales = *s;
    t.grid_zeros = i32(l.grid_zeros, grid);
  }
  return t;
}

// The index of the first element whose bits differ, or -1 (same element count assumed).
inline int64_t FirstBitDifference(const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(a + i, b + i, sizeof(float)) != 0) return i;
  }
  return -1;
}

}  // namespace qcal::kernels::kernel_tests
