// The fixture of the CUDA solver-op tests: a CUDA backend (the test skips without a GPU) and
// upload/download helpers that record a failure and return an empty value on error.
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "common/tensor.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"

namespace qcal::kernels {

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    BackendOptions options;
    options.device = "cuda";
    auto backend = CreateBackend(options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    be_ = std::move(*backend);
  }

  Tensor Upload(const std::vector<float>& v, Shape shape) {
    auto t = be_->ToDevice(Tensor::FromVector(v, std::move(shape)));
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : Tensor();
  }
  template <typename T = float>
  std::vector<T> Download(const Tensor& t) {
    auto host = be_->ToHost(t);
    EXPECT_TRUE(host.ok()) << host.status();
    if (!host.ok()) return {};
    const T* p = host->data<T>();
    return std::vector<T>(p, p + host->numel());
  }

  std::unique_ptr<Backend> be_;
};

}  // namespace qcal::kernels
