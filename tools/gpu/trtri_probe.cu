// Times the GPTQ factorization's pieces at the 7B and 70B widths with cuSOLVER and cuBLAS directly
// (issue 16): potrf, the triangular inverse by cusolverDnXtrtri (what GptqFactorize runs), by TRSM
// against I, and by a recursive blocked inversion whose work is all TRMM products
// (inv([A 0; B C]) = [A⁻¹ 0; -C⁻¹ B A⁻¹  C⁻¹]), with each inverse's residual max|L X - I|.
// Built and run on the GPU machine:
//   nvcc -O2 -std=c++17 -arch=sm_90 tools/gpu/trtri_probe.cu -lcusolver -lcublas -o
//   /tmp/trtri_probe /tmp/trtri_probe 4096 11008
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CHECK(x)                                                                                 \
  do {                                                                                           \
    auto status = (x);                                                                           \
    if (static_cast<int>(status) != 0) {                                                         \
      std::fprintf(stderr, "%s:%d %s = %d\n", __FILE__, __LINE__, #x, static_cast<int>(status)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace {

cublasHandle_t blas;
cusolverDnHandle_t solver;
cusolverDnParams_t params;

// X (column-major, lower, n × n, leading dimension ld) is replaced by its inverse, recursively.
void InvertLower(float* x, int n, int ld, float* work) {
  if (n <= 256) {
    size_t dev = 0, host = 0;
    CHECK(cusolverDnXtrtri_bufferSize(solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n,
                                      CUDA_R_32F, x, ld, &dev, &host));
    static void* dwork = nullptr;
    static size_t dsize = 0;
    if (dev > dsize) {
      if (dwork) cudaFree(dwork);
      CHECK(cudaMalloc(&dwork, dev));
      dsize = dev;
    }
    std::vector<char> hwork(std::max<size_t>(host, 1));
    static int* info = nullptr;
    if (!info) CHECK(cudaMalloc(&info, sizeof(int)));
    CHECK(cusolverDnXtrtri(solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F, x,
                           ld, dwork, dev, hwork.data(), host, info));
    return;
  }
  const int n1 = n / 2, n2 = n - n1;
  float* a = x;                         // [n1, n1]
  float* b = x + n1;                    // [n2, n1] below A
  float* c = x + n1 + size_t(n1) * ld;  // [n2, n2]
  InvertLower(a, n1, ld, work);
  InvertLower(c, n2, ld, work);
  const float one = 1.0f, minus = -1.0f;
  // B ← B A⁻¹ (TRMM right, out of place into work), then B ← -C⁻¹ B.
  CHECK(cublasStrmm(blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                    CUBLAS_DIAG_NON_UNIT, n2, n1, &one, a, ld, b, ld, work, n2));
  CHECK(cublasStrmm(blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                    CUBLAS_DIAG_NON_UNIT, n2, n1, &minus, c, ld, work, n2, b, ld));
}

float Ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms;
}

}  // namespace

int main(int argc, char** argv) {
  CHECK(cublasCreate(&blas));
  CHECK(cusolverDnCreate(&solver));
  CHECK(cusolverDnCreateParams(&params));
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("%s\n", prop.name);
  for (int arg = 1; arg < argc; ++arg) {
    const int n = std::atoi(argv[arg]);
    // H = XᵀX / t + 0.01 mean(diag) I, X uniform [t × n], t = 2n: condition like a damped Gram.
    const int t = 2 * n;
    std::vector<float> xh(size_t(t) * n);
    std::mt19937 gen(n);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (float& v : xh) v = dist(gen);
    float *x, *h, *l, *inv, *work, *eye;
    CHECK(cudaMalloc(&x, xh.size() * 4));
    CHECK(cudaMalloc(&h, size_t(n) * n * 4));
    CHECK(cudaMalloc(&l, size_t(n) * n * 4));
    CHECK(cudaMalloc(&inv, size_t(n) * n * 4));
    CHECK(cudaMalloc(&work, size_t(n) * n * 4));
    CHECK(cudaMalloc(&eye, size_t(n) * n * 4));
    CHECK(cudaMemcpy(x, xh.data(), xh.size() * 4, cudaMemcpyHostToDevice));
    const float alpha = 1.0f / t, zero = 0.0f, one = 1.0f;
    CHECK(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, t, &alpha, x, t, x, t, &zero, h, n));
    std::vector<float> hh(size_t(n) * n);
    CHECK(cudaMemcpy(hh.data(), h, hh.size() * 4, cudaMemcpyDeviceToHost));
    double mean = 0;
    for (int i = 0; i < n; ++i) mean += hh[size_t(i) * n + i];
    for (int i = 0; i < n; ++i) hh[size_t(i) * n + i] += 0.01 * mean / n;
    CHECK(cudaMemcpy(h, hh.data(), hh.size() * 4, cudaMemcpyHostToDevice));
    std::vector<float> ih(size_t(n) * n, 0.0f);
    for (int i = 0; i < n; ++i) ih[size_t(i) * n + i] = 1.0f;
    CHECK(cudaMemcpy(eye, ih.data(), ih.size() * 4, cudaMemcpyHostToDevice));

    size_t pdev = 0, phost = 0, tdev = 0, thost = 0;
    CHECK(cusolverDnXpotrf_bufferSize(solver, params, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F, l, n,
                                      CUDA_R_32F, &pdev, &phost));
    CHECK(cusolverDnXtrtri_bufferSize(solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n,
                                      CUDA_R_32F, inv, n, &tdev, &thost));
    void* dwork;
    CHECK(cudaMalloc(&dwork, std::max(pdev, tdev)));
    std::vector<char> hwork(std::max<size_t>({phost, thost, 1}));
    int* info;
    CHECK(cudaMalloc(&info, sizeof(int)));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    auto residual = [&](const float* xinv) {
      // R = L · X - I (X lower); max |R| on the host.
      CHECK(cudaMemcpy(work, eye, size_t(n) * n * 4, cudaMemcpyDeviceToDevice));
      CHECK(cudaMemcpy(x, xinv, size_t(n) * n * 4, cudaMemcpyDeviceToDevice));  // x reused
      std::vector<float> xl(size_t(n) * n);
      CHECK(cudaMemcpy(xl.data(), xinv, xl.size() * 4, cudaMemcpyDeviceToHost));
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < j; ++i) xl[size_t(j) * n + i] = 0;  // upper part: not the inverse's
      CHECK(cudaMemcpy(x, xl.data(), xl.size() * 4, cudaMemcpyHostToDevice));
      CHECK(cublasStrmm(blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                        CUBLAS_DIAG_NON_UNIT, n, n, &one, l, n, x, n, work, n));
      std::vector<float> r(size_t(n) * n);
      CHECK(cudaMemcpy(r.data(), work, r.size() * 4, cudaMemcpyDeviceToHost));
      double worst = 0;
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < n; ++i)
          worst = std::max(worst, std::abs(double(r[size_t(j) * n + i]) - (i == j ? 1.0 : 0.0)));
      return worst;
    };
    auto timed = [&](auto&& op) {
      cudaEventRecord(e0);
      op();
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      return Ms(e0, e1);
    };
    for (int rep = 0; rep < 3; ++rep) {
      CHECK(cudaMemcpy(l, h, size_t(n) * n * 4, cudaMemcpyDeviceToDevice));
      const float potrf = timed([&] {
        CHECK(cusolverDnXpotrf(solver, params, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F, l, n,
                               CUDA_R_32F, dwork, pdev, hwork.data(), phost, info));
      });
      CHECK(cudaMemcpy(inv, l, size_t(n) * n * 4, cudaMemcpyDeviceToDevice));
      const float trtri = timed([&] {
        CHECK(cusolverDnXtrtri(solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F,
                               inv, n, dwork, tdev, hwork.data(), thost, info));
      });
      const double r_trtri = rep == 2 ? residual(inv) : 0;
      CHECK(cudaMemcpy(inv, eye, size_t(n) * n * 4, cudaMemcpyDeviceToDevice));
      const float trsm = timed([&] {
        CHECK(cublasStrsm(blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                          CUBLAS_DIAG_NON_UNIT, n, n, &one, l, n, inv, n));
      });
      const double r_trsm = rep == 2 ? residual(inv) : 0;
      CHECK(cudaMemcpy(inv, l, size_t(n) * n * 4, cudaMemcpyDeviceToDevice));
      const float rec = timed([&] { InvertLower(inv, n, n, work); });
      const double r_rec = rep == 2 ? residual(inv) : 0;
      std::printf(
          "n=%d rep %d: potrf %.3f ms, trtri %.3f ms, trsm(L,I) %.3f ms, recursive trmm %.3f ms", n,
          rep, potrf, trtri, trsm, rec);
      if (rep == 2)
        std::printf("; residual max|LX-I| trtri %.2e trsm %.2e recursive %.2e", r_trtri, r_trsm,
                    r_rec);
      std::printf("\n");
    }
    cudaFree(x);
    cudaFree(h);
    cudaFree(l);
    cudaFree(inv);
    cudaFree(work);
    cudaFree(eye);
    cudaFree(dwork);
    cudaFree(info);
  }
  return 0;
}
