// Deterministic random inputs of the CPU kernel tests (cpu_ops_test, cpu_backward_test).
#pragma once

#include <cstdint>
#include <random>

#include "common/tensor.h"

namespace qcal::kernels::kernel_tests {

// Deterministic uniform floats in [-scale, scale), independent of the standard library's
// distribution implementation.
class Random {
 public:
  explicit Random(uint32_t seed) : gen_(seed) {}
  float Uniform(float scale) {
    const float u = static_cast<float>(gen_() >> 8) * (1.0f / 16777216.0f);
    return (2.0f * u - 1.0f) * scale;
  }
  int Below(int n) { return static_cast<int>(gen_() % static_cast<uint32_t>(n)); }
  // An fp32 host tensor of uniform values.
  Tensor Floats(const Shape& shape, float scale = 1.0f) {
    Tensor t = Tensor::Zeros(DType::kF32, shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = Uniform(scale);
    return t;
  }
  // An I32 host tensor of n ids in [0, vocab).
  Tensor Ids(int64_t n, int vocab) {
    Tensor t = Tensor::Zeros(DType::kI32, {n});
    for (int64_t i = 0; i < n; ++i) t.data<int32_t>()[i] = Below(vocab);
    return t;
  }

 private:
  std::mt19937 gen_;
};

}  // namespace qcal::kernels::kernel_tests
