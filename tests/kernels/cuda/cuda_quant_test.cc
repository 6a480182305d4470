// Parity of the CUDA backend's solver ops (GptqFactorize, GptqSolve, QuantizeRtn, OutputError)
// with the CPU reference quantizers of services/engine/quant, and of ActQuant and FillUniform with
// their CPU twins. Tolerances are DESIGN section 3's fp32 ones: given the same W and U (computed
// once on the CPU) the GPTQ solve's layer error agrees within 1e-5 relative and at most 0.1% of
// the codes differ; RTN codes, scales and zeros are identical on the uniform grid. Skips without
// a GPU.
#include <lapacke.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/quant_ref.h"
#include "kernels/cpu/ref_ops.h"
#include "kernels/cuda/cuda_backend.h"
#include "services/engine/quant/gptq.h"
#include "services/engine/quant/quantized_linear.h"
#include "tests/engine/quant/quant_test_data.h"
#include "tests/kernels/cuda/cuda_test_fixture.h"

namespace qcal::kernels {
namespace {

using engine::GptqOptions;
using engine::GptqStats;
using engine::QuantizedLinear;

// Same W and U: the column loops agree operation for operation; only the lazy-update GEMMs sum in
// different orders (DESIGN section 3, fp32 block-size oracle).
constexpr double kSolveErrorBound = 1e-5;
constexpr double kSolveCodeFraction = 1e-3;
// W̃ (record_pre_round) against the CPU reference's with the same U: over the weight rows whose
// codes all match, ‖W̃_gpu − W̃_cpu‖_F ≤ kPreRoundBound·‖W̃_cpu‖_F (the lazy-update GEMMs'
// rounding carried through the column loop; the same relative bound as the layer error). A row
// with a differing code (at most the code fraction above) takes another error path from there on
// and is held only to the exact rounding check.
constexpr double kPreRoundBound = kSolveErrorBound;
// Factorization on the GPU (potrf + trtri of the reversed matrix) against LAPACK's potrf, potri,
// potrf on the CPU, both fp32, on Hessians with outlier channels (condition ~1e4 after damping):
// a check against gross errors; the layer errors below are the real measure.
constexpr double kFactorBound = 1e-2;
// End to end (U from each side's own factorization): the per-layer error of the brief.
constexpr double kEndToEndErrorBound = 1e-3;
// EᵀE as one product of E rounded to TF32 (to nearest: 2^-11 relative a value, unbiased) against
// the CPU's double precision. PyTorch's TF32 product on the H200 was 5e-6 to 3e-5 off on random
// 7B-shape errors (tools/gpu/solver_probe.py); this test's heavy-tailed weights and outlier
// channels gave up to 1.5e-4 on an H100 (docs/BENCHMARKS.md, 2026-12-05).
constexpr double kOutputErrorBound = 5e-4;
// ReportOutputError: E rounded to bf16, bf16 products. Each value moves by at most 2^-9 (2e-3)
// of itself; where a few heavy-tailed values carry the norm the figure moves by nearly that (H100:
// up to 9.1e-4 at 1 x 1 and 40 x 1500, 2026-12-07).
constexpr double kReportErrorBound = 2.5e-3;

using CudaQuantTest = CudaBackendTest;

// A symmetric Gram matrix of correlated activations with outlier channels; `dead` columns get no
// signal (H_jj = 0).
std::vector<float> TestGram(int64_t n, int64_t tokens, const std::vector<int>& dead,
                            uint64_t seed) {
  std::vector<double> x = testing::CorrelatedActivations(tokens, n, 2, seed);
  for (int j : dead) {
    for (int64_t t = 0; t < tokens; ++t) x[t * n + j] = 0;
  }
  return testing::Gram<float>(x, tokens, n);
}

// What gptq.cc computes before its column loop, on the CPU: removed columns, visiting order and
// U (LAPACK potrf, potri, potrf in fp32 on the damped Hessian), as a GptqFactor with U uploaded.
struct CpuFactor {
  GptqFactor factor;
  std::vector<float> u;
};

CpuFactor FactorOnCpu(Backend& be, const std::vector<float>& h, int64_t n,
                      const GptqSolveOptions& options) {
  CpuFactor out;
  GptqFactor& f = out.factor;
  f.n = n;
  f.act_order = options.act_order;
  f.removed.assign(n, 0);
  for (int64_t j = 0; j < n; ++j) f.removed[j] = h[j * n + j] == 0.0f;
  for (int32_t c : options.outlier_columns) f.removed[c] = 1;
  auto diag = [&](int64_t j) { return f.removed[j] ? 1.0f : h[j * n + j]; };
  f.perm.resize(n);
  std::iota(f.perm.begin(), f.perm.end(), 0);
  if (options.act_order) {
    std::stable_sort(f.perm.begin(), f.perm.end(),
                     [&](int32_t a, int32_t b) { return diag(a) > diag(b); });
  }
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += diag(j);
  const float damp_add = static_cast<float>(options.damp * (sum / n));
  std::vector<float>& u = out.u;
  u.assign(n * n, 0.0f);
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = a; b < n; ++b) {
      const int64_t i = f.perm[a], j = f.perm[b];
      float v = (f.removed[i] || f.removed[j]) ? (a == b ? 1.0f : 0.0f)
                                               : (i <= j ? h[i * n + j] : h[j * n + i]);
      u[a * n + b] = a == b ? v + damp_add : v;
    }
  }
  const lapack_int ln = static_cast<lapack_int>(n);
  EXPECT_EQ(LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', ln, u.data(), ln), 0);
  EXPECT_EQ(LAPACKE_spotri(LAPACK_COL_MAJOR, 'L', ln, u.data(), ln), 0);
  EXPECT_EQ(LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', ln, u.data(), ln), 0);
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < a; ++b) u[a * n + b] = 0.0f;
  }
  auto device_u = be.ToDevice(Tensor::FromVector(u, {n, n}));
  EXPECT_TRUE(device_u.ok());
  if (device_u.ok()) f.u = *device_u;
  return out;
}

GptqOptions CpuOptions(const GptqSolveOptions& o) {
  GptqOptions c;
  c.damp = o.damp;
  c.block_size = o.block_size;
  c.act_order = o.act_order;
  c.outlier_columns = o.outlier_columns;
  return c;
}

double LayerError(const std::vector<float>& w, const std::vector<float>& w_hat,
                  const std::vector<float>& h, int64_t d_out, int64_t d_in) {
  return engine::OutputError(w.data(), w_hat.data(), h.data(), d_out, d_in);
}

struct SolveCase {
  int64_t d_out, n;
  QuantSpec spec;
  GptqSolveOptions options;
  std::vector<int> dead;
};

std::vector<SolveCase> SolveCases() {
  std::vector<SolveCase> cases;
  auto add = [&](int64_t d_out, int64_t n, int bits, int group, int block, bool act_order,
                 std::vector<int32_t> outliers, std::vector<int> dead) {
    SolveCase c;
    c.d_out = d_out;
    c.n = n;
    c.spec.bits = bits;
    c.spec.group_size = group;
    c.options.block_size = block;
    c.options.act_order = act_order;
    c.options.outlier_columns = std::move(outliers);
    c.dead = std::move(dead);
    cases.push_back(std::move(c));
  };
  add(96, 256, 4, 128, 128, false, {}, {});  // the usual 128/128
  add(1, 1, 4, 128, 128, false, {}, {});     // size 1
  add(37, 161, 3, 32, 48, true, {}, {5});    // act-order, groups straddling blocks, a dead column
  add(65, 200, 4, -1, 64, false, {7, 7, 150},
      {});                                       // one group per row (cut at every block), outliers
  add(50, 131, 2, 96, 64, false, {}, {0, 130});  // g > block: cut blocks
  add(33, 100, 8, 8, 1, false, {}, {});          // block size 1
  cases.back().spec.symmetric = true;
  add(20, 70, 4, 16, 32, false, {}, {});
  cases.back().spec.grid = GridKind::kCuberoot;
  add(24, 96, 2, 32, 32, false, {}, {});
  cases.back().spec.grid = GridKind::kBalanced;
  return cases;
}

TEST_F(CudaQuantTest, GptqSolveWithCpuUMatchesCpu) {
  uint64_t seed = 10;
  for (const SolveCase& c : SolveCases()) {
    SCOPED_TRACE(::testing::Message()
                 << "d_out=" << c.d_out << " n=" << c.n << " bits=" << c.spec.bits
                 << " g=" << c.spec.group_size << " block=" << c.options.block_size
                 << " act_order=" << c.options.act_order);
    const auto w = testing::HeavyTailedWeights<float>(c.d_out, c.n, seed++);
    const auto h = TestGram(c.n, 4 * c.n + 8, c.dead, seed++);
    GptqStats stats;
    auto cpu = engine::QuantizeGptq<float>(w.data(), h.data(), c.d_out, c.n, c.spec,
                                           CpuOptions(c.options), &stats);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    CpuFactor f = FactorOnCpu(*be_, h, c.n, c.options);
    auto gpu =
        be_->GptqSolve(Upload(w, {c.d_out, c.n}), f.factor, c.spec, c.options.block_size, false);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    const auto codes = Download<uint8_t>(gpu->codes);
    int64_t differ = 0;
    for (size_t i = 0; i < codes.size(); ++i) differ += codes[i] != cpu->codes[i];
    EXPECT_LE(differ, kSolveCodeFraction * codes.size()) << differ << " codes differ";
    EXPECT_EQ(gpu->g_idx, cpu->g_idx);
    EXPECT_EQ(gpu->perm, cpu->perm);
    EXPECT_EQ(gpu->n_groups, cpu->n_groups);
    const auto deq = Download<float>(gpu->dequantized);
    const double e_cpu = LayerError(w, cpu->Dequantized(), h, c.d_out, c.n);
    const double e_gpu = LayerError(w, deq, h, c.d_out, c.n);
    EXPECT_LE(std::abs(e_gpu - e_cpu), kSolveErrorBound * std::max(e_cpu, 1e-30))
        << "cpu " << e_cpu << " gpu " << e_gpu;
    // Group parameters are fitted on the same values up to the lazy updates' rounding.
    const auto scales = Download<float>(gpu->scales);
    int64_t scales_differ = 0;
    for (size_t i = 0; i < scales.size(); ++i) scales_differ += scales[i] != cpu->scales[i];
    EXPECT_LE(scales_differ, std::max<double>(1, kSolveCodeFraction * scales.size()));
  }
}

// Wider than two super-blocks (kSuperBlock = 1024 columns in cuda_quant.cc): the lazy updates'
// outer products, three-TF32 on the GPU (GemmSplitTf32), against the CPU's fp32 updates with the
// same U. The same bounds as the narrow cases: the split product's rounding is of fp32's order.
TEST_F(CudaQuantTest, GptqSolveAcrossSuperBlocksMatchesCpu) {
  const int64_t d_out = 40, n = 2200;
  QuantSpec spec;
  spec.bits = 4;
  spec.group_size = 128;
  GptqSolveOptions options;
  options.block_size = 128;
  const auto w = testing::HeavyTailedWeights<float>(d_out, n, 41);
  const auto h = TestGram(n, n + 200, {17}, 42);
  auto cpu = engine::QuantizeGptq<float>(w.data(), h.data(), d_out, n, spec, CpuOptions(options));
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  CpuFactor f = FactorOnCpu(*be_, h, n, options);
  auto gpu = be_->GptqSolve(Upload(w, {d_out, n}), f.factor, spec, options.block_size, false);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const auto codes = Download<uint8_t>(gpu->codes);
  int64_t differ = 0;
  for (size_t i = 0; i < codes.size(); ++i) differ += codes[i] != cpu->codes[i];
  const double e_cpu = LayerError(w, cpu->Dequantized(), h, d_out, n);
  const double e_gpu = LayerError(w, Download<float>(gpu->dequantized), h, d_out, n);
  std::printf("[ measured ] %lld of %zu codes differ, layer errors %.9g (CPU) %.9g (GPU)\n",
              static_cast<long long>(differ), codes.size(), e_cpu, e_gpu);
  EXPECT_LE(differ, kSolveCodeFraction * codes.size()) << differ << " codes differ";
  EXPECT_LE(std::abs(e_gpu - e_cpu), kSolveErrorBound * e_cpu)
      << "cpu " << e_cpu << " gpu " << e_gpu;
}

// W̃ rounds to the returned codes exactly on the returned scales and zeros (QuantizeCode, the same
// function the kernel rounded with; on the cuberoot grid up to the code fraction, cbrt being the
// device's), and agrees with the CPU reference's W̃ for the same U.
TEST_F(CudaQuantTest, GptqSolveRecordsPreRoundValues) {
  uint64_t seed = 70;
  for (const SolveCase& c : SolveCases()) {
    SCOPED_TRACE(::testing::Message()
                 << "d_out=" << c.d_out << " n=" << c.n << " bits=" << c.spec.bits
                 << " g=" << c.spec.group_size << " block=" << c.options.block_size
                 << " act_order=" << c.options.act_order);
    const auto w = testing::HeavyTailedWeights<float>(c.d_out, c.n, seed++);
    const auto h = TestGram(c.n, 4 * c.n + 8, c.dead, seed++);
    CpuFactor f = FactorOnCpu(*be_, h, c.n, c.options);
    std::vector<float> cpu_pre;
    auto cpu = ref::GptqSolve<float>(w.data(), c.d_out, f.factor, f.u.data(), c.spec,
                                     c.options.block_size, &cpu_pre);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto gpu = be_->GptqSolve(Upload(w, {c.d_out, c.n}), f.factor, c.spec, c.options.block_size,
                              /*record_pre_round=*/true);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    ASSERT_TRUE(gpu->pre_round.defined());
    EXPECT_EQ(gpu->pre_round.shape(), (Shape{c.d_out, c.n}));
    const auto pre = Download<float>(gpu->pre_round);
    const auto codes = Download<uint8_t>(gpu->codes);
    const auto scales = Download<float>(gpu->scales);
    const auto zeros = Download<int32_t>(gpu->zeros);
    ASSERT_EQ(pre.size(), static_cast<size_t>(c.d_out * c.n));
    int64_t wrong_codes = 0, rows_differ = 0;
    double diff2 = 0, norm2 = 0;  // over the rows whose codes all match the CPU's
    for (int64_t o = 0; o < c.d_out; ++o) {
      bool same_codes = true;
      double row_diff2 = 0, row_norm2 = 0;
      for (int64_t j = 0; j < c.n; ++j) {
        const int64_t k = gpu->g_idx[j];
        const GroupParams p{scales[k * c.d_out + o], zeros[k * c.d_out + o]};
        const int64_t idx = o * c.n + j;
        wrong_codes += QuantizeCode(pre[idx], p, c.spec) != codes[idx];
        same_codes = same_codes && codes[idx] == cpu->codes[idx];
        const double d = static_cast<double>(pre[idx]) - cpu_pre[idx];
        row_diff2 += d * d;
        row_norm2 += static_cast<double>(cpu_pre[idx]) * cpu_pre[idx];
      }
      if (same_codes) {
        diff2 += row_diff2;
        norm2 += row_norm2;
      } else {
        ++rows_differ;
      }
    }
    EXPECT_LE(std::sqrt(diff2), kPreRoundBound * std::sqrt(norm2));
    if (c.spec.grid == GridKind::kUniform) {
      EXPECT_EQ(wrong_codes, 0) << "W̃ does not round to the returned codes";
    } else {  // the device's cbrtf and the host's may differ in the last bit
      EXPECT_LE(wrong_codes, kSolveCodeFraction * codes.size());
    }
    EXPECT_LE(rows_differ, std::max<double>(1, kSolveCodeFraction * codes.size()));
    for (int64_t j = 0; j < c.n; ++j) {
      if (!f.factor.removed[j]) continue;
      for (int64_t o = 0; o < c.d_out; ++o) EXPECT_EQ(pre[o * c.n + j], 0.0f) << "column " << j;
    }
    // Without the request nothing is recorded, and the codes are the same.
    auto plain = be_->GptqSolve(Upload(w, {c.d_out, c.n}), f.factor, c.spec, c.options.block_size,
                                /*record_pre_round=*/false);
    ASSERT_TRUE(plain.ok()) << plain.status();
    EXPECT_FALSE(plain->pre_round.defined());
    EXPECT_EQ(Download<uint8_t>(plain->codes), codes);
  }
}

// With one lazy block (block_size >= n) there is no cuBLAS update, so the column loop alone
// decides: given the CPU's U, every code, scale, zero, dequantized value and W̃ is the CPU
// reference's, bit for bit. Widths up to 128 stage U in shared memory (several rows a warp), wider
// ones read it from global memory (a warp a row); row counts leave a partial block of warps and a
// partial warp of rows.
TEST_F(CudaQuantTest, GptqSolveOneLazyBlockIsBitIdenticalToCpu) {
  struct Case {
    int64_t d_out, n;
    int bits, group;
    bool act_order;
    GridKind grid;
    std::vector<int> dead;
  };
  const Case cases[] = {
      {64, 128, 4, 32, false, GridKind::kUniform, {}},    // four groups in the block
      {40, 100, 3, -1, false, GridKind::kUniform, {7}},   // width not a multiple of 32
      {33, 200, 2, 64, true, GridKind::kUniform, {5}},    // U from global memory, act-order
      {17, 96, 2, 32, false, GridKind::kBalanced, {}},    // the balanced grid
      {1, 1, 4, 128, false, GridKind::kUniform, {}},      // size 1
      {21, 300, 4, 128, false, GridKind::kUniform, {0}},  // a last group shorter than g
      // Several rows a warp in blocks of several warps, the last warp part live.
      {4099, 128, 3, 64, false, GridKind::kUniform, {}},
  };
  uint64_t seed = 90;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << "d_out=" << c.d_out << " n=" << c.n << " bits=" << c.bits << " g=" << c.group);
    QuantSpec spec;
    spec.bits = c.bits;
    spec.group_size = c.group;
    spec.grid = c.grid;
    GptqSolveOptions options;
    options.act_order = c.act_order;
    options.block_size = static_cast<int>(c.n);
    const auto w = testing::HeavyTailedWeights<float>(c.d_out, c.n, seed++);
    const auto h = TestGram(c.n, 4 * c.n + 8, c.dead, seed++);
    CpuFactor f = FactorOnCpu(*be_, h, c.n, options);
    std::vector<float> cpu_pre;
    auto cpu = ref::GptqSolve<float>(w.data(), c.d_out, f.factor, f.u.data(), spec,
                                     options.block_size, &cpu_pre);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto gpu = be_->GptqSolve(Upload(w, {c.d_out, c.n}), f.factor, spec, options.block_size,
                              /*record_pre_round=*/true);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ(Download<uint8_t>(gpu->codes), cpu->codes);
    EXPECT_EQ(Download<float>(gpu->scales), cpu->scales);
    EXPECT_EQ(Download<int32_t>(gpu->zeros), cpu->zeros);
    EXPECT_EQ(Download<float>(gpu->dequantized), cpu->Dequantized());
    EXPECT_EQ(Download<float>(gpu->pre_round), cpu_pre);
  }
}

TEST_F(CudaQuantTest, GptqFactorizeMatchesCpuFactorAndStats) {
  uint64_t seed = 40;
  for (const SolveCase& c : SolveCases()) {
    SCOPED_TRACE(::testing::Message() << "n=" << c.n << " act_order=" << c.options.act_order);
    const auto h = TestGram(c.n, 4 * c.n + 8, c.dead, seed++);
    CpuFactor cpu = FactorOnCpu(*be_, h, c.n, c.options);
    auto gpu = be_->GptqFactorize(Upload(h, {c.n, c.n}), c.options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ(gpu->perm, cpu.factor.perm);
    EXPECT_EQ(gpu->removed, cpu.factor.removed);
    const std::vector<float> u = Download<float>(gpu->u);
    double num = 0, den = 0;
    for (size_t i = 0; i < u.size(); ++i) {
      num += (double(u[i]) - cpu.u[i]) * (double(u[i]) - cpu.u[i]);
      den += double(cpu.u[i]) * cpu.u[i];
    }
    EXPECT_LE(std::sqrt(num / den), kFactorBound);
    GptqStats stats;
    const auto w = testing::HeavyTailedWeights<float>(c.d_out, c.n, seed++);
    auto q = engine::QuantizeGptq<float>(w.data(), h.data(), c.d_out, c.n, c.spec,
                                         CpuOptions(c.options), &stats);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_EQ(gpu->dead_columns, stats.dead_columns);
    EXPECT_EQ(gpu->outlier_columns, stats.outlier_columns);
    EXPECT_EQ(gpu->damp_used, stats.damp_used);
    // End to end: each side's own U.
    auto solved =
        be_->GptqSolve(Upload(w, {c.d_out, c.n}), *gpu, c.spec, c.options.block_size, false);
    ASSERT_TRUE(solved.ok()) << solved.status();
    const double e_cpu = LayerError(w, q->Dequantized(), h, c.d_out, c.n);
    const double e_gpu = LayerError(w, Download<float>(solved->dequantized), h, c.d_out, c.n);
    EXPECT_LE(std::abs(e_gpu - e_cpu), kEndToEndErrorBound * std::max(e_cpu, 1e-30))
        << "cpu " << e_cpu << " gpu " << e_gpu;
  }
}

TEST_F(CudaQuantTest, GptqFactorizeRetriesDampingLikeTheCpu) {
  // H = diag(1, ..., 1, d, 1, ...): with d = -0.05 the damping of 0.01 mean(diag) is too small and
  // 10x suffices; with d = -5 even 100x fails; with d = 0.5 the first attempt succeeds.
  const int64_t n = 24;
  const std::pair<float, int> cases[] = {{0.5f, 0}, {-0.05f, 1}, {-5.0f, 3}};
  for (auto [d, failures] : cases) {
    SCOPED_TRACE(::testing::Message() << "d = " << d);
    std::vector<float> h(n * n, 0.0f);
    for (int64_t j = 0; j < n; ++j) h[j * n + j] = j == 5 ? d : 1.0f;
    GptqSolveOptions options;
    GptqStats stats;
    const auto w = testing::HeavyTailedWeights<float>(4, n, 8);
    auto cpu = engine::QuantizeGptq<float>(w.data(), h.data(), 4, n, QuantSpec(),
                                           CpuOptions(options), &stats);
    EXPECT_EQ(stats.cholesky_failures, failures);
    auto gpu = be_->GptqFactorize(Upload(h, {n, n}), options);
    ASSERT_EQ(gpu.ok(), cpu.ok()) << "cpu " << cpu.status() << ", gpu " << gpu.status();
    if (gpu.ok()) {
      EXPECT_EQ(gpu->cholesky_failures, stats.cholesky_failures);
      EXPECT_EQ(gpu->damp_used, stats.damp_used);
    } else {
      EXPECT_EQ(gpu.status().code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_EQ(cpu.status().code(), absl::StatusCode::kFailedPrecondition);
    }
  }
  // damp 0 is not retried: a singular H fails at once.
  std::vector<float> singular(n * n, 1.0f);
  GptqSolveOptions no_damp;
  no_damp.damp = 0;
  auto gpu = be_->GptqFactorize(Upload(singular, {n, n}), no_damp);
  ASSERT_FALSE(gpu.ok());
  EXPECT_EQ(gpu.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CudaQuantTest, RtnIsIdenticalToCpu) {
  struct Case {
    int64_t d_out, d_in;
    int bits, group;
    bool symmetric;
    GridKind grid;
  };
  const Case cases[] = {
      {1, 1, 4, 128, false, GridKind::kUniform},    {7, 33, 3, 8, false, GridKind::kUniform},
      {64, 300, 4, 128, false, GridKind::kUniform}, {33, 130, 2, -1, false, GridKind::kUniform},
      {16, 257, 8, 64, true, GridKind::kUniform},   {9, 50, 4, 16, false, GridKind::kCuberoot},
      {12, 70, 2, 32, false, GridKind::kBalanced}};
  uint64_t seed = 70;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << c.d_out << "x" << c.d_in << " bits " << c.bits << " g " << c.group);
    QuantSpec spec;
    spec.bits = c.bits;
    spec.group_size = c.group;
    spec.symmetric = c.symmetric;
    spec.grid = c.grid;
    auto w = testing::HeavyTailedWeights<float>(c.d_out, c.d_in, seed++);
    if (c.d_in > 20) {
      for (int64_t o = 0; o < c.d_out; ++o) {
        for (int64_t j = 0; j < 16; ++j) w[o * c.d_in + j] = 0;  // an all-zero group
      }
    }
    auto cpu = engine::QuantizeRtn<float>(w.data(), c.d_out, c.d_in, spec);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto gpu = be_->QuantizeRtn(Upload(w, {c.d_out, c.d_in}), spec);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    const auto codes = Download<uint8_t>(gpu->codes);
    ASSERT_EQ(codes.size(), cpu->codes.size());
    if (c.grid == GridKind::kUniform) {
      EXPECT_TRUE(std::equal(codes.begin(), codes.end(), cpu->codes.begin()));
      EXPECT_EQ(Download<float>(gpu->scales), cpu->scales);
      EXPECT_EQ(Download<int32_t>(gpu->zeros), cpu->zeros);
      EXPECT_EQ(Download<float>(gpu->dequantized), cpu->Dequantized());
    } else {
      // The cube roots come from CUDA's and the host's libm, which may differ by an ulp.
      int64_t differ = 0;
      for (size_t i = 0; i < codes.size(); ++i) differ += codes[i] != cpu->codes[i];
      EXPECT_LE(differ, std::max<double>(1, kSolveCodeFraction * codes.size()));
    }
    EXPECT_EQ(gpu->g_idx, cpu->g_idx);
  }
}

TEST_F(CudaQuantTest, OutputErrorMatchesCpu) {
  uint64_t seed = 90;
  for (auto [d_out, d_in] : {std::pair<int64_t, int64_t>{1, 1}, {5, 7}, {40, 1500}, {300, 129}}) {
    SCOPED_TRACE(::testing::Message() << d_out << "x" << d_in);
    const auto w = testing::HeavyTailedWeights<float>(d_out, d_in, seed++);
    auto w_hat = w;
    for (size_t i = 0; i < w_hat.size(); ++i) w_hat[i] += float(1e-3 * std::sin(double(i)));
    const auto h = TestGram(d_in, 64, {}, seed++);
    const Tensor wd = Upload(w, {d_out, d_in}), hd = Upload(h, {d_in, d_in});
    const std::vector<float> zeros(w.size(), 0.0f);
    for (bool with_hat : {false, true}) {
      const double cpu = LayerError(w, with_hat ? w_hat : zeros, h, d_out, d_in);
      auto gpu = be_->OutputError(wd, with_hat ? Upload(w_hat, {d_out, d_in}) : Tensor(), hd);
      ASSERT_TRUE(gpu.ok()) << gpu.status();
      EXPECT_LE(std::abs(*gpu - cpu), kOutputErrorBound * cpu) << "cpu " << cpu << " gpu " << *gpu;
      auto report =
          be_->ReportOutputError(wd, with_hat ? Upload(w_hat, {d_out, d_in}) : Tensor(), hd);
      ASSERT_TRUE(report.ok()) << report.status();
      std::printf("[ measured ] %lldx%lld%s: TF32 %.3g, bf16 %.3g relative\n",
                  static_cast<long long>(d_out), static_cast<long long>(d_in),
                  with_hat ? " E" : " W", std::abs(*gpu - cpu) / cpu,
                  std::abs(*report - cpu) / cpu);
      EXPECT_LE(std::abs(*report - cpu), kReportErrorBound * cpu)
          << "cpu " << cpu << " report " << *report;
    }
  }
}

TEST_F(CudaQuantTest, SolverResultsAreBitIdenticalRunToRun) {
  const int64_t d_out = 70, n = 300;
  const auto w = testing::HeavyTailedWeights<float>(d_out, n, 5);
  const auto h = TestGram(n, 900, {3}, 6);
  GptqSolveOptions options;
  options.act_order = true;
  QuantSpec spec;
  std::vector<uint8_t> codes[2];
  std::vector<float> deq[2];
  double error[2];
  for (int run = 0; run < 2; ++run) {
    const Tensor hd = Upload(h, {n, n}), wd = Upload(w, {d_out, n});
    auto f = be_->GptqFactorize(hd, options);
    ASSERT_TRUE(f.ok()) << f.status();
    auto q = be_->GptqSolve(wd, *f, spec, options.block_size, false);
    ASSERT_TRUE(q.ok()) << q.status();
    codes[run] = Download<uint8_t>(q->codes);
    deq[run] = Download<float>(q->dequantized);
    auto e = be_->OutputError(wd, q->dequantized, hd);
    ASSERT_TRUE(e.ok());
    error[run] = *e;
  }
  EXPECT_EQ(codes[0], codes[1]);
  EXPECT_EQ(deq[0], deq[1]);
  EXPECT_EQ(error[0], error[1]);
}

TEST_F(CudaQuantTest, SolverOpsRejectBadInputWithStatuses) {
  const int64_t n = 16;
  auto h = TestGram(n, 40, {}, 3);
  auto w = testing::HeavyTailedWeights<float>(4, n, 4);
  QuantSpec spec;
  GptqSolveOptions options;
  auto f = be_->GptqFactorize(Upload(h, {n, n}), options);
  ASSERT_TRUE(f.ok()) << f.status();

  auto bad_w = w;
  bad_w[2 * n + 5] = std::numeric_limits<float>::quiet_NaN();
  auto nan_weight = be_->GptqSolve(Upload(bad_w, {4, n}), *f, spec, 128, false);
  EXPECT_EQ(nan_weight.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(nan_weight.status().message().find("weight[2, 5]"), std::string::npos)
      << nan_weight.status();
  EXPECT_EQ(be_->QuantizeRtn(Upload(bad_w, {4, n}), spec).status().code(),
            absl::StatusCode::kInvalidArgument);

  auto bad_h = h;
  bad_h[3 * n + 9] = std::numeric_limits<float>::infinity();
  auto inf_hessian = be_->GptqFactorize(Upload(bad_h, {n, n}), options);
  EXPECT_EQ(inf_hessian.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(inf_hessian.status().message().find("hessian[3, 9]"), std::string::npos)
      << inf_hessian.status();
  // Only the upper triangle is read.
  bad_h = h;
  bad_h[9 * n + 3] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(be_->GptqFactorize(Upload(bad_h, {n, n}), options).ok());

  GptqSolveOptions outlier = options;
  outlier.outlier_columns = {n};
  EXPECT_EQ(be_->GptqFactorize(Upload(h, {n, n}), outlier).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->GptqSolve(Upload(w, {2, 2 * n}), *f, spec, 128, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  QuantSpec bad_spec;
  bad_spec.bits = 9;
  EXPECT_EQ(be_->GptqSolve(Upload(w, {4, n}), *f, bad_spec, 128, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->GptqSolve(Upload(w, {4, n}), *f, spec, 0, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->OutputError(Upload(w, {4, n}), Tensor(), Upload(w, {4, n})).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Heavy-tailed activations [rows, width] (Student t with 3 degrees of freedom) drawn from `seed`,
// the first row all zero.
std::vector<float> ActivationRows(int64_t rows, int64_t width, uint64_t seed) {
  testing::TestRng rng(seed);
  std::vector<float> x(rows * width);
  for (float& v : x) v = float(rng.StudentT3());
  for (int64_t c = 0; c < width; ++c) x[c] = 0;
  return x;
}

// Calls check(rows, width, bits, x, ref) for each shape and bit width of the ActQuant tests: x from
// ActivationRows (seeds from `seed` on), ref = ref::ActQuant(x, bits).
template <typename Check>
void ForEachActQuantCase(uint64_t seed, Check check) {
  for (auto [rows, width] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {17, 300}, {5, 4096}}) {
    for (int bits : {2, 4, 8}) {
      SCOPED_TRACE(::testing::Message() << rows << "x" << width << " bits " << bits);
      const std::vector<float> x = ActivationRows(rows, width, seed++);
      std::vector<float> ref(x.size());
      ref::ActQuant(x.data(), rows, width, bits, ref.data());
      check(rows, width, bits, x, ref);
    }
  }
}

TEST_F(CudaQuantTest, ActQuantIsBitIdenticalToReference) {
  ForEachActQuantCase(120, [&](int64_t rows, int64_t width, int bits, const std::vector<float>& x,
                               const std::vector<float>& ref) {
    Tensor xd = Upload(x, {rows, width});
    auto out = be_->Alloc(DType::kF32, {rows, width});
    ASSERT_TRUE(out.ok());
    ASSERT_TRUE(be_->ActQuant(xd, bits, *out).ok());
    EXPECT_EQ(Download<float>(*out), ref);
    ASSERT_TRUE(be_->ActQuant(xd, bits, xd).ok());  // in place
    EXPECT_EQ(Download<float>(xd), ref);
  });
  EXPECT_TRUE(be_->SupportsOp(Op::kActQuant));
}

// ActQuantOperand: ref::ActQuant's values rounded to bf16 (as Convert rounds them) in the left
// columns of a wider bf16 operand, the other columns untouched (the joined [x̂ | t] of Model).
TEST_F(CudaQuantTest, ActQuantOperandIsActQuantRoundedIntoTheLeftColumns) {
  ForEachActQuantCase(140, [&](int64_t rows, int64_t width, int bits, const std::vector<float>& x,
                               const std::vector<float>& ref) {
    const int64_t ld = width + 5;
    std::vector<float> want(rows * ld, 7.0f);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(ref.begin() + r * width, width, want.begin() + r * ld);
    }
    auto want_bf16 = be_->Alloc(DType::kBF16, {rows, ld});
    auto out = be_->Alloc(DType::kBF16, {rows, ld});
    ASSERT_TRUE(want_bf16.ok() && out.ok());
    ASSERT_TRUE(be_->Convert(Upload(want, {rows, ld}), *want_bf16).ok());
    ASSERT_TRUE(be_->Convert(Upload(std::vector<float>(rows * ld, 7.0f), {rows, ld}), *out).ok());
    ASSERT_TRUE(be_->ActQuantOperand(Upload(x, {rows, width}), bits, *out).ok());
    auto got = be_->Alloc(DType::kF32, {rows, ld}), expect = be_->Alloc(DType::kF32, {rows, ld});
    ASSERT_TRUE(got.ok() && expect.ok());
    ASSERT_TRUE(be_->Convert(*out, *got).ok() && be_->Convert(*want_bf16, *expect).ok());
    EXPECT_EQ(Download<float>(*got), Download<float>(*expect));
  });
  auto narrow = be_->Alloc(DType::kBF16, {2, 3});
  ASSERT_TRUE(narrow.ok());
  const absl::Status bad =
      be_->ActQuantOperand(Upload(std::vector<float>(8, 1.0f), {2, 4}), 8, *narrow);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_NE(bad.message().find("ActQuantOperand"), std::string::npos) << bad;
}

// The rounding itself, bit for bit (memcmp, so that −0 and +0 differ): s = 127 / 127 = 1 makes
// x / s = x, and x holds exact ties of both parities and signs, quotients in [−0.5, 0) (whose
// code is +0 in the reference's floor form, −0 under a plain rint), ±0 and values an ulp from a
// tie.
TEST_F(CudaQuantTest, ActQuantRoundsTiesAndZerosLikeTheReference) {
  std::vector<float> x = {127.0f,  0.5f,  1.5f,  2.5f, -0.5f, -1.5f,   -2.5f,  126.5f,
                          -125.5f, -0.3f, -0.0f, 0.0f, 0.3f,  -1e-30f, 1e-30f, -0.49999997f};
  for (float t : {0.5f, 3.5f, -4.5f}) {
    x.push_back(std::nextafter(t, 0.0f));
    x.push_back(std::nextafter(t, 2 * t));
  }
  const auto width = static_cast<int64_t>(x.size());
  std::vector<float> ref(x.size());
  ref::ActQuant(x.data(), 1, width, 8, ref.data());
  Tensor xd = Upload(x, {1, width});
  auto out = be_->Alloc(DType::kF32, {1, width});
  ASSERT_TRUE(out.ok());
  ASSERT_TRUE(be_->ActQuant(xd, 8, *out).ok());
  const std::vector<float> got = Download<float>(*out);
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_EQ(std::memcmp(&got[i], &ref[i], sizeof(float)), 0)
        << "x = " << x[i] << ": " << got[i] << " vs " << ref[i];
  }
  EXPECT_TRUE(std::signbit(ref[9]) == false && std::signbit(ref[10]));  // −0.3 → +0, −0 → −0
}

// ActQuantLinear in f32: ref::ActQuantLinear's bits when the fp64 sums are exact (weights that are
// fp16 scales times small integers, as a checkpoint's), with and without bias and accumulation,
// bf16 weights included; within fp64 rounding of it (so at most an fp32 ulp apart, rarely) for
// arbitrary fp32 weights. With compute dtype bf16: ActQuant, then Linear.
TEST_F(CudaQuantTest, ActQuantLinearMatchesReference) {
  uint64_t seed = 300;
  for (auto [m, n, k] : {std::array<int64_t, 3>{1, 1, 1}, {5, 7, 129}, {33, 200, 1000}}) {
    for (int bits : {4, 8}) {
      SCOPED_TRACE(::testing::Message() << m << "x" << n << "x" << k << " bits " << bits);
      testing::TestRng rng(seed++);
      std::vector<float> x(m * k), w(n * k), bias(n), start(m * n);
      for (float& v : x) v = float(rng.StudentT3());
      if (m > 1) std::fill(x.begin(), x.begin() + k, 0.0f);  // s = 0 row
      for (int64_t i = 0; i < n * k; ++i) {
        const float scale = RoundToHalf(std::ldexp(1.0f, -4 - static_cast<int>((i / k) % 5)) *
                                        (1.0f + 0.25f * float(rng.StudentT3())));
        w[i] = scale * static_cast<float>(static_cast<int>(i * 7 % 16) - 8);
      }
      for (float& v : bias) v = float(rng.StudentT3());
      for (float& v : start) v = float(rng.StudentT3());
      const Tensor xd = Upload(x, {m, k}), wd = Upload(w, {n, k}), bd = Upload(bias, {n});
      for (bool with_bias : {false, true}) {
        for (bool accumulate : {false, true}) {
          std::vector<float> want = start;
          ref::ActQuantLinear(x.data(), m, k, bits, w.data(), n, with_bias ? bias.data() : nullptr,
                              want.data(), accumulate);
          Tensor y = Upload(start, {m, n});
          ASSERT_TRUE(
              be_->ActQuantLinear(xd, bits, wd, with_bias ? &bd : nullptr, y, accumulate).ok());
          EXPECT_EQ(Download<float>(y), want) << "bias " << with_bias << " acc " << accumulate;
        }
      }
      // The same weights as bf16 operands (exact when they are bf16 values: round them first).
      std::vector<float> wb(w.size());
      for (size_t i = 0; i < w.size(); ++i) wb[i] = RoundToBf16(w[i]);
      std::vector<float> want(m * n);
      ref::ActQuantLinear(x.data(), m, k, bits, wb.data(), n, nullptr, want.data(), false);
      auto wb16 = be_->Alloc(DType::kBF16, {n, k});
      ASSERT_TRUE(wb16.ok());
      ASSERT_TRUE(be_->Convert(Upload(wb, {n, k}), *wb16).ok());
      Tensor y = Upload(start, {m, n});
      ASSERT_TRUE(be_->ActQuantLinear(xd, bits, *wb16, nullptr, y, false).ok());
      EXPECT_EQ(Download<float>(y), want);
      // Arbitrary fp32 weights: the sums are rounded in fp64 in another order.
      std::vector<float> wf(n * k);
      for (float& v : wf) v = float(rng.StudentT3());
      ref::ActQuantLinear(x.data(), m, k, bits, wf.data(), n, nullptr, want.data(), false);
      ASSERT_TRUE(be_->ActQuantLinear(xd, bits, Upload(wf, {n, k}), nullptr, y, false).ok());
      const std::vector<float> got = Download<float>(y);
      for (int64_t i = 0; i < m * n; ++i) {
        EXPECT_LE(std::fabs(got[i] - want[i]), std::ldexp(std::fabs(want[i]), -23) + 1e-30) << i;
      }
    }
  }
}

TEST_F(CudaQuantTest, ActQuantLinearInBf16IsActQuantThenLinear) {
  BackendOptions options;
  options.device = "cuda";
  options.compute_dtype = ComputeDType::kBF16;
  auto bf16 = CreateBackend(options);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  testing::TestRng rng(410);
  const int64_t m = 9, n = 40, k = 300;
  std::vector<float> x(m * k), w(n * k);
  for (float& v : x) v = float(rng.StudentT3());
  for (float& v : w) v = float(rng.StudentT3());
  auto up = [&](const std::vector<float>& v, Shape shape) {
    auto t = (*bf16)->ToDevice(Tensor::FromVector(v, std::move(shape)));
    EXPECT_TRUE(t.ok());
    return *t;
  };
  const Tensor xd = up(x, {m, k}), wd = up(w, {n, k});
  Tensor got = up(std::vector<float>(m * n, 0.0f), {m, n});
  Tensor want = up(std::vector<float>(m * n, 0.0f), {m, n});
  Tensor xq = up(std::vector<float>(m * k, 0.0f), {m, k});
  ASSERT_TRUE((*bf16)->ActQuantLinear(xd, 8, wd, nullptr, got, false).ok());
  ASSERT_TRUE((*bf16)->ActQuant(xd, 8, xq).ok());
  ASSERT_TRUE((*bf16)->Linear(xq, wd, nullptr, want, false).ok());
  // The weight as a held bf16 operand (Model::HoldWeightOperands) gives the same bits.
  auto wb = (*bf16)->AllocUninitialized(DType::kBF16, {n, k});
  ASSERT_TRUE(wb.ok());
  ASSERT_TRUE((*bf16)->Convert(wd, *wb).ok());
  Tensor got_held = up(std::vector<float>(m * n, 0.0f), {m, n});
  ASSERT_TRUE((*bf16)->ActQuantLinear(xd, 8, *wb, nullptr, got_held, false).ok());
  auto gh = (*bf16)->ToHost(got), wh = (*bf16)->ToHost(want), hh = (*bf16)->ToHost(got_held);
  ASSERT_TRUE(gh.ok() && wh.ok() && hh.ok());
  EXPECT_EQ(std::memcmp(gh->raw(), wh->raw(), gh->nbytes()), 0);
  EXPECT_EQ(std::memcmp(hh->raw(), wh->raw(), hh->nbytes()), 0);
}

TEST_F(CudaQuantTest, FillUniformMatchesTheHostFill) {
  BackendOptions cpu_options;
  auto cpu = CreateBackend(cpu_options);
  ASSERT_TRUE(cpu.ok());
  for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{1} << 20}) {
    Tensor host = Tensor::Zeros(DType::kF32, {n});
    ASSERT_TRUE((*cpu)->FillUniform(host, 77, -0.5f, 1.5f).ok());
    auto dev = be_->Alloc(DType::kF32, {n});
    ASSERT_TRUE(dev.ok());
    ASSERT_TRUE(be_->FillUniform(*dev, 77, -0.5f, 1.5f).ok());
    const auto got = Download<float>(*dev);
    const float* want = host.data<float>();
    EXPECT_TRUE(std::equal(got.begin(), got.end(), want));
    EXPECT_GE(*std::min_element(got.begin(), got.end()), -0.5f);
    EXPECT_LT(*std::max_element(got.begin(), got.end()), 1.5f);
  }
}

}  // namespace
}  // namespace qcal::kernels
