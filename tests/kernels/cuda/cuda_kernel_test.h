// The shared fixture of the CUDA kernel tests (cuda_ops_test, cuda_backward_test): an f32 and a
// bf16 CUDA backend (the test is skipped without a device), host/device moves, NaN-poisoned
// outputs, normal random inputs and the relative error of an output against its reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"

namespace qcal::kernels::kernel_tests {

inline std::vector<float> Random(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// ‖out − ref‖ / ‖ref‖ (‖out − ref‖ when ref is zero); infinity when out holds a NaN or Inf.
inline double RelError(const std::vector<float>& out, const std::vector<float>& ref) {
  EXPECT_EQ(out.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(out.size(), ref.size()); ++i) {
    if (!std::isfinite(out[i])) return std::numeric_limits<double>::infinity();
    num += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

class CudaKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
      BackendOptions options;
      options.device = "cuda";
      options.compute_dtype = dtype;
      auto backend = CreateBackend(options);
      ASSERT_TRUE(backend.ok()) << backend.status();
      (dtype == ComputeDType::kF32 ? f32_ : bf16_) = std::move(*backend);
    }
  }

  Backend& Get(ComputeDType dtype) { return dtype == ComputeDType::kF32 ? *f32_ : *bf16_; }

  Tensor Upload(Backend& be, const std::vector<float>& v, Shape shape) {
    auto t = be.ToDevice(Tensor::FromVector(v, std::move(shape)));
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : Tensor();
  }
  // A device tensor full of NaN.
  Tensor Poisoned(Backend& be, Shape shape) {
    const int64_t n = NumElements(shape);
    return Upload(be, std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()),
                  std::move(shape));
  }
  std::vector<float> Download(Backend& be, const Tensor& t) {
    auto host = be.ToHost(t);
    EXPECT_TRUE(host.ok()) << host.status();
    if (!host.ok()) return {};
    const float* p = host->data<float>();
    return std::vector<float>(p, p + host->numel());
  }
  Tensor Ids(const std::vector<int32_t>& ids) {
    Tensor t = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(ids.size())});
    std::copy(ids.begin(), ids.end(), t.data<int32_t>());
    return t;
  }

  std::unique_ptr<Backend> f32_, bf16_;
};

}  // namespace qcal::kernels::kernel_tests
