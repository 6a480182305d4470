// Deterministic synthetic data for the quantizer tests: weights, activations and Gram matrices
// drawn from SplitMix64 (portable: no <random> distributions, whose output differs across standard
// libraries).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "common/text_data.h"
#include "kernels/backend.h"

namespace qcal::testing {

class TestRng {
 public:
  explicit TestRng(uint64_t seed) : gen_(seed) {}
  // Uniform in [0, 1).
  double Uniform() { return static_cast<double>(gen_.Next() >> 11) * 0x1.0p-53; }
  // Standard normal (Box-Muller).
  double Normal() {
    const double u1 = 1.0 - Uniform();  // (0, 1]
    const double u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  // Student t with 3 degrees of freedom: heavy tails like real weight matrices.
  double StudentT3() {
    double chi2 = 0;
    for (int i = 0; i < 3; ++i) {
      const double z = Normal();
      chi2 += z * z;
    }
    return Normal() / std::sqrt(chi2 / 3.0);
  }

 private:
  SplitMix64 gen_;
};

// W [d_out][d_in]: heavy-tailed entries, row scales spread over a decade.
template <typename T>
std::vector<T> HeavyTailedWeights(int64_t d_out, int64_t d_in, uint64_t seed) {
  TestRng rng(seed);
  std::vector<T> w(static_cast<size_t>(d_out * d_in));
  for (int64_t o = 0; o < d_out; ++o) {
    const double row_scale = 0.02 * std::pow(10.0, rng.Uniform());
    for (int64_t j = 0; j < d_in; ++j)
      w[o * d_in + j] = static_cast<T>(row_scale * rng.StudentT3());
  }
  return w;
}

// X [tokens][d_in] like a transformer linear's input: columns correlated through a few shared
// latent factors, plus `outliers` channels with 30x larger magnitude.
inline std::vector<double> CorrelatedActivations(int64_t tokens, int64_t d_in, int outliers,
                                                 uint64_t seed) {
  TestRng rng(seed);
  constexpr int kFactors = 8;
  std::vector<double> mix(static_cast<size_t>(kFactors * d_in));
  for (double& m : mix) m = rng.Normal();
  std::vector<double> x(static_cast<size_t>(tokens * d_in));
  for (int64_t t = 0; t < tokens; ++t) {
    double f[kFactors];
    for (double& v : f) v = rng.Normal();
    for (int64_t j = 0; j < d_in; ++j) {
      double v = 0.5 * rng.Normal();
      for (int k = 0; k < kFactors; ++k) v += 0.4 * f[k] * mix[k * d_in + j];
      x[t * d_in + j] = v;
    }
  }
  for (int c = 0; c < outliers; ++c) {
    const int64_t j = (c * 37 + 5) % d_in;
    for (int64_t t = 0; t < tokens; ++t) x[t * d_in + j] *= 30.0;
  }
  return x;
}

// G = X^T X [d_in][d_in], accumulated in double, returned in T.
template <typename T>
std::vector<T> Gram(const std::vector<double>& x, int64_t tokens, int64_t d_in) {
  std::vector<double> g(static_cast<size_t>(d_in * d_in), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    const double* row = x.data() + t * d_in;
    for (int64_t a = 0; a < d_in; ++a) {
      for (int64_t b = a; b < d_in; ++b) g[a * d_in + b] += row[a] * row[b];
    }
  }
  std::vector<T> out(g.size());
  for (int64_t a = 0; a < d_in; ++a) {
    for (int64_t b = a; b < d_in; ++b) {
      out[a * d_in + b] = out[b * d_in + a] = static_cast<T>(g[a * d_in + b]);
    }
  }
  return out;
}

// The identity [n][n].
template <typename T>
std::vector<T> Identity(int64_t n) {
  std::vector<T> out(static_cast<size_t>(n * n), T(0));
  for (int64_t i = 0; i < n; ++i) out[i * n + i] = T(1);
  return out;
}

template <typename T, typename U>
std::vector<T> Convert(const std::vector<U>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// A CPU backend with `threads` threads (results depend on the thread count only through BLAS).
inline std::unique_ptr<kernels::Backend> CpuBackend(int threads = 1) {
  kernels::BackendOptions options;
  options.threads = threads;
  auto backend = kernels::CreateBackend(options);
  QCAL_CHECK(backend.ok());
  return std::move(backend).value();
}

// A host fp32 tensor of N(0, 1) · scale entries.
inline Tensor RandomTensor(TestRng& rng, Shape shape, double scale) {
  std::vector<float> v(static_cast<size_t>(NumElements(shape)));
  for (float& x : v) x = static_cast<float>(scale * rng.Normal());
  return Tensor::FromVector(v, std::move(shape));
}

}  // namespace qcal::testing
