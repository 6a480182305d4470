// Parity tests of every CUDA backend op against its scalar CPU twin (kernels/cpu/ref_ops.h), like
// with like: fp32 compute against the reference in fp32 operands, bf16 compute against the
// reference with bf16_operands. Random data, odd sizes and size 1; outputs are poisoned with NaN
// first so that an unwritten element fails. Error is ‖out − ref‖ / ‖ref‖ against a per-op bound.
// Every test skips when no CUDA device is present.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/ref_ops.h"
#include "kernels/cuda/cuda_backend.h"
#include "tests/kernels/cuda/cuda_kernel_test.h"

namespace qcal::kernels {
namespace {

// fp32 GEMMs against a double-accumulating reference: fp32 summation error only.
constexpr double kLinearF32Bound = 1e-5;
// bf16 operands multiply exactly in fp32; only the fp32 accumulation differs from the reference
// (not rounding the operands would give ~3e-3).
constexpr double kLinearBf16Bound = 1e-4;
constexpr double kGramF32Bound = 1e-5;
constexpr double kGramBf16Bound = 1e-4;
constexpr double kRmsNormBound = 1e-6;
// Same host-computed angles and no fused multiply-add: identical up to the last bit in practice.
constexpr double kRopeBound = 1e-6;
constexpr double kAttentionF32Bound = 1e-5;
// Probabilities rounded to bf16 from an fp32 rather than double softmax: a rare 1-ulp flip
// (not rounding them at all gives ~1e-3).
constexpr double kAttentionBf16Bound = 5e-4;
constexpr double kSiluMulBound = 1e-6;
constexpr double kNllBound = 1e-6;
// Large-shape checks against the CPU backend (both fp32, different summation orders).
constexpr double kLargeF32Bound = 1e-5;
// bf16 compute against those fp32 results: the rounding of the operands (~3e-3).
constexpr double kLargeBf16VsF32Bound = 1e-2;

using kernel_tests::Random;
using kernel_tests::RelError;

class CudaOpsTest : public kernel_tests::CudaKernelTest {};

const char* Name(ComputeDType dtype) { return dtype == ComputeDType::kF32 ? "f32" : "bf16"; }

TEST_F(CudaOpsTest, LinearMatchesReference) {
  struct Case {
    int64_t m, n, k;
  };
  const Case cases[] = {{1, 1, 1},     {1, 7, 5},      {3, 1, 9}, {17, 33, 65},
                        {64, 128, 96}, {130, 67, 257}, {5, 3, 0}, {2, 300, 1001}};
  uint64_t seed = 1;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    for (const Case& c : cases) {
      for (bool with_bias : {false, true}) {
        for (bool accumulate : {false, true}) {
          SCOPED_TRACE(testing::Message()
                       << Name(dtype) << " m=" << c.m << " n=" << c.n << " k=" << c.k
                       << " bias=" << with_bias << " accumulate=" << accumulate);
          const auto x = Random(c.m * c.k, seed++), w = Random(c.n * c.k, seed++);
          const auto b = Random(c.n, seed++), y0 = Random(c.m * c.n, seed++);
          std::vector<float> ref = y0;
          ref::Linear(x.data(), w.data(), with_bias ? b.data() : nullptr, ref.data(), c.m, c.n, c.k,
                      accumulate, bf16);
          Tensor xd = Upload(be, x, {c.m, c.k}), wd = Upload(be, w, {c.n, c.k});
          Tensor bd = Upload(be, b, {c.n});
          Tensor yd = accumulate ? Upload(be, y0, {c.m, c.n}) : Poisoned(be, {c.m, c.n});
          ASSERT_TRUE(be.Linear(xd, wd, with_bias ? &bd : nullptr, yd, accumulate).ok());
          EXPECT_LE(RelError(Download(be, yd), ref), bf16 ? kLinearBf16Bound : kLinearF32Bound);
        }
      }
    }
  }
}

TEST_F(CudaOpsTest, LinearTakesBf16Weights) {
  const int64_t m = 9, n = 31, k = 77;
  const auto x = Random(m * k, 11), w = Random(n * k, 12);
  std::vector<float> w_rounded = w;
  for (float& v : w_rounded) v = RoundToBf16(v);
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    SCOPED_TRACE(Name(dtype));
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    std::vector<float> ref(m * n);
    ref::Linear(x.data(), w_rounded.data(), nullptr, ref.data(), m, n, k, false, bf16);
    auto w_host = Tensor::FromVector(w, {n, k}).ConvertTo(DType::kBF16);
    ASSERT_TRUE(w_host.ok());
    auto wd = be.ToDevice(*w_host);
    ASSERT_TRUE(wd.ok());
    Tensor xd = Upload(be, x, {m, k}), yd = Poisoned(be, {m, n});
    ASSERT_TRUE(be.Linear(xd, *wd, nullptr, yd, false).ok());
    EXPECT_LE(RelError(Download(be, yd), ref), bf16 ? kLinearBf16Bound : kLinearF32Bound);
  }
}

TEST_F(CudaOpsTest, RmsNormMatchesReference) {
  Backend& be = *f32_;
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {5, 64}, {33, 4097}};
  uint64_t seed = 100;
  for (const auto& s : shapes) {
    for (bool in_place : {false, true}) {
      SCOPED_TRACE(testing::Message() << s[0] << "x" << s[1] << " in_place=" << in_place);
      const auto x = Random(s[0] * s[1], seed++, 3.0f), w = Random(s[1], seed++);
      std::vector<float> ref(x.size());
      ref::RmsNorm(x.data(), w.data(), 1e-5f, ref.data(), s[0], s[1]);
      Tensor xd = Upload(be, x, {s[0], s[1]}), wd = Upload(be, w, {s[1]});
      Tensor yd = in_place ? xd : Poisoned(be, {s[0], s[1]});
      ASSERT_TRUE(be.RmsNorm(xd, wd, 1e-5f, yd).ok());
      EXPECT_LE(RelError(Download(be, yd), ref), kRmsNormBound);
    }
  }
}

TEST_F(CudaOpsTest, RopeMatchesReference) {
  Backend& be = *f32_;
  struct Case {
    int batch, seq_len, offset, heads, head_dim;
    double theta;
  };
  const Case cases[] = {{1, 1, 0, 1, 2, 10000.0},
                        {2, 5, 0, 3, 8, 10000.0},
                        {1, 1, 37, 4, 64, 10000.0},
                        {3, 17, 5, 2, 128, 500000.0},
                        {1, 300, 0, 1, 6, 10000.0}};
  uint64_t seed = 200;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << "batch=" << c.batch << " seq_len=" << c.seq_len
                                    << " offset=" << c.offset << " head_dim=" << c.head_dim);
    const int64_t rows = int64_t(c.batch) * c.seq_len, width = int64_t(c.heads) * c.head_dim;
    const RopeShape shape{c.seq_len, c.offset, c.head_dim, c.theta};
    std::vector<float> ref = Random(rows * width, seed++);
    Tensor xd = Upload(be, ref, {rows, width});
    ref::Rope(ref.data(), rows, width, shape);
    ASSERT_TRUE(be.Rope(xd, shape).ok());
    EXPECT_LE(RelError(Download(be, xd), ref), kRopeBound);
  }
}

TEST_F(CudaOpsTest, AttentionMatchesReference) {
  const AttentionShape cases[] = {// batch, q_len, kv_len, heads, kv_heads, head_dim, q_offset
                                  {1, 1, 1, 1, 1, 1, 0},       {1, 1, 1, 1, 1, 8, 0},
                                  {2, 17, 17, 4, 2, 8, 0},     {1, 70, 70, 6, 2, 64, 0},
                                  {1, 1, 37, 4, 4, 64, 36},    {1, 5, 133, 3, 1, 96, 128},
                                  {2, 130, 130, 2, 1, 128, 0}, {1, 65, 200, 2, 2, 33, 135},
                                  {3, 64, 64, 8, 8, 7, 0},     {1, 129, 129, 1, 1, 128, 0}};
  uint64_t seed = 300;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    for (const AttentionShape& s : cases) {
      SCOPED_TRACE(testing::Message()
                   << Name(dtype) << " batch=" << s.batch << " q_len=" << s.q_len
                   << " kv_len=" << s.kv_len << " heads=" << s.num_heads << "/" << s.num_kv_heads
                   << " head_dim=" << s.head_dim << " q_offset=" << s.q_offset);
      const int64_t qn = int64_t(s.batch) * s.q_len * s.num_heads * s.head_dim;
      const int64_t kvn = int64_t(s.batch) * s.kv_len * s.num_kv_heads * s.head_dim;
      const auto q = Random(qn, seed++), k = Random(kvn, seed++), v = Random(kvn, seed++);
      std::vector<float> ref(qn);
      ref::Attention(q.data(), k.data(), v.data(), s, ref.data(), bf16);
      const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                    kvw = int64_t(s.num_kv_heads) * s.head_dim;
      Tensor qd = Upload(be, q, {int64_t(s.batch) * s.q_len, qw});
      Tensor kd = Upload(be, k, {int64_t(s.batch) * s.kv_len, kvw});
      Tensor vd = Upload(be, v, {int64_t(s.batch) * s.kv_len, kvw});
      Tensor out = Poisoned(be, {int64_t(s.batch) * s.q_len, qw});
      const absl::Status st = be.Attention(qd, kd, vd, s, out);
      ASSERT_TRUE(st.ok()) << st;
      EXPECT_LE(RelError(Download(be, out), ref), bf16 ? kAttentionBf16Bound : kAttentionF32Bound);
    }
  }
}

// Sliding-window attention (Mistral) against the reference, for windows shorter than the
// sequence: prefill over several key tiles, cached decode, and a chunk after a cached prefix.
// RopeAttention (the engine's calibration forward) against Rope on copies then Attention: bit
// for bit on both compute dtypes (in bf16 the rotation happens while q and k are packed), and q
// and k left as they were.
TEST_F(CudaOpsTest, RopeAttentionEqualsRopeThenAttention) {
  const AttentionShape cases[] = {// batch, q_len, kv_len, heads, kv_heads, head_dim, q_offset
                                  {1, 1, 1, 1, 1, 2, 0},
                                  {2, 17, 17, 4, 2, 8, 0},
                                  {2, 130, 130, 2, 1, 128, 0},
                                  {1, 70, 70, 6, 3, 66, 0}};
  uint64_t seed = 320;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    for (const AttentionShape& s : cases) {
      SCOPED_TRACE(testing::Message() << Name(dtype) << " batch=" << s.batch << " q_len=" << s.q_len
                                      << " head_dim=" << s.head_dim);
      const RopeShape rope{s.q_len, 0, s.head_dim, 10000.0f};
      const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                    kvw = int64_t(s.num_kv_heads) * s.head_dim, rows = int64_t(s.batch) * s.q_len;
      const auto q = Random(rows * qw, seed++), k = Random(rows * kvw, seed++),
                 v = Random(rows * kvw, seed++);
      Tensor qd = Upload(be, q, {rows, qw}), kd = Upload(be, k, {rows, kvw});
      Tensor vd = Upload(be, v, {rows, kvw});
      Tensor fused = Poisoned(be, {rows, qw}), plain = Poisoned(be, {rows, qw});
      ASSERT_TRUE(be.RopeAttention(qd, kd, vd, rope, s, fused).ok());
      EXPECT_EQ(Download(be, qd), q);
      EXPECT_EQ(Download(be, kd), k);
      ASSERT_TRUE(be.Rope(qd, rope).ok());
      ASSERT_TRUE(be.Rope(kd, rope).ok());
      ASSERT_TRUE(be.Attention(qd, kd, vd, s, plain).ok());
      const auto a = Download(be, fused), b = Download(be, plain);
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
    }
  }
}

TEST_F(CudaOpsTest, SlidingWindowAttentionMatchesReference) {
  struct Case {
    AttentionShape s;
    int window;
  };
  const Case cases[] = {{{1, 200, 200, 4, 2, 64, 0}, 16},  {{2, 150, 150, 2, 1, 32, 0}, 1},
                        {{1, 1, 300, 4, 4, 64, 299}, 70},  {{1, 65, 230, 2, 2, 128, 165}, 100},
                        {{1, 300, 300, 2, 1, 96, 0}, 129}, {{1, 40, 40, 3, 1, 8, 0}, 64}};
  uint64_t seed = 900;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    for (Case c : cases) {
      AttentionShape s = c.s;
      s.sliding_window = c.window;
      SCOPED_TRACE(testing::Message()
                   << Name(dtype) << " q_len=" << s.q_len << " kv_len=" << s.kv_len
                   << " q_offset=" << s.q_offset << " window=" << s.sliding_window);
      const int64_t qn = int64_t(s.batch) * s.q_len * s.num_heads * s.head_dim;
      const int64_t kvn = int64_t(s.batch) * s.kv_len * s.num_kv_heads * s.head_dim;
      const auto q = Random(qn, seed++), k = Random(kvn, seed++), v = Random(kvn, seed++);
      std::vector<float> ref(qn), full(qn);
      ref::Attention(q.data(), k.data(), v.data(), s, ref.data(), bf16);
      AttentionShape no_window = s;
      no_window.sliding_window = 0;
      ref::Attention(q.data(), k.data(), v.data(), no_window, full.data(), bf16);
      const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                    kvw = int64_t(s.num_kv_heads) * s.head_dim;
      Tensor qd = Upload(be, q, {int64_t(s.batch) * s.q_len, qw});
      Tensor kd = Upload(be, k, {int64_t(s.batch) * s.kv_len, kvw});
      Tensor vd = Upload(be, v, {int64_t(s.batch) * s.kv_len, kvw});
      Tensor out = Poisoned(be, {int64_t(s.batch) * s.q_len, qw});
      const absl::Status st = be.Attention(qd, kd, vd, s, out);
      ASSERT_TRUE(st.ok()) << st;
      const std::vector<float> got = Download(be, out);
      EXPECT_LE(RelError(got, ref), bf16 ? kAttentionBf16Bound : kAttentionF32Bound);
      // The window changes the result when it is shorter than the visible prefix.
      if (s.sliding_window < s.q_offset + s.q_len) {
        EXPECT_GT(RelError(got, full), 1e-3);
      }
    }
  }
}

// Scaled RoPE (linear, llama3, yarn with its cos/sin factor) uses the reference's table.
TEST_F(CudaOpsTest, ScaledRopeMatchesReference) {
  Backend& be = *f32_;
  RopeScaling linear;
  linear.type = RopeScaling::Type::kLinear;
  linear.factor = 4;
  RopeScaling llama3;
  llama3.type = RopeScaling::Type::kLlama3;
  llama3.factor = 8;
  llama3.low_freq_factor = 1;
  llama3.high_freq_factor = 4;
  llama3.original_max_position_embeddings = 64;
  RopeScaling yarn;
  yarn.type = RopeScaling::Type::kYarn;
  yarn.factor = 4;
  yarn.original_max_position_embeddings = 64;
  yarn.attention_factor = 0.1 * std::log(4.0) + 1;
  uint64_t seed = 950;
  for (const RopeScaling& scaling : {linear, llama3, yarn}) {
    SCOPED_TRACE(RopeTypeName(scaling.type));
    const int seq_len = 200, heads = 3, head_dim = 64;
    RopeShape shape{seq_len, 10, head_dim, 500000.0, scaling};
    const int64_t rows = seq_len, width = int64_t(heads) * head_dim;
    std::vector<float> ref = Random(rows * width, seed++);
    Tensor xd = Upload(be, ref, {rows, width});
    ref::Rope(ref.data(), rows, width, shape);
    ASSERT_TRUE(be.Rope(xd, shape).ok());
    EXPECT_LE(RelError(Download(be, xd), ref), kRopeBound);
    // The table is rebuilt when only the scaling changes.
    RopeShape plain{seq_len, 10, head_dim, 500000.0};
    std::vector<float> ref2 = Random(rows * width, seed++);
    Tensor yd = Upload(be, ref2, {rows, width});
    ref::Rope(ref2.data(), rows, width, plain);
    ASSERT_TRUE(be.Rope(yd, plain).ok());
    EXPECT_LE(RelError(Download(be, yd), ref2), kRopeBound);
  }
}

TEST_F(CudaOpsTest, ElementwiseOpsMatchReference) {
  Backend& be = *f32_;
  uint64_t seed = 400;
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{100003}}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    const auto g = Random(n, seed++, 4.0f), u = Random(n, seed++);
    std::vector<float> ref(n);
    ref::SiluMul(g.data(), u.data(), ref.data(), n);
    Tensor gd = Upload(be, g, {n}), ud = Upload(be, u, {n}), out = Poisoned(be, {n});
    ASSERT_TRUE(be.SiluMul(gd, ud, out).ok());
    EXPECT_LE(RelError(Download(be, out), ref), kSiluMulBound);
    ASSERT_TRUE(be.SiluMul(gd, ud, gd).ok());  // out aliasing gate, as the engine calls it
    EXPECT_LE(RelError(Download(be, gd), ref), kSiluMulBound);

    std::vector<float> y = Random(n, seed++);
    Tensor yd = Upload(be, y, {n});
    ref::Add(u.data(), y.data(), n);
    ASSERT_TRUE(be.Add(ud, yd).ok());
    EXPECT_EQ(Download(be, yd), y);
  }
}

// RmsNorm and SiluMul into a BF16 output (the engine's operands written directly): bit for bit the
// backend's conversion of their fp32 outputs.
TEST_F(CudaOpsTest, Bf16OutputsEqualConvertedF32Outputs) {
  Backend& be = Get(ComputeDType::kBF16);
  uint64_t seed = 450;
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {33, 4097}};
  auto as_bf16 = [&](const Tensor& f32) {
    auto b = be.Alloc(DType::kBF16, f32.shape());
    EXPECT_TRUE(b.ok() && be.Convert(f32, *b).ok());
    return *b;
  };
  auto bits = [&](const Tensor& t) {
    auto host = be.ToHost(t);
    EXPECT_TRUE(host.ok());
    const auto* p = static_cast<const uint16_t*>(host->raw());
    return std::vector<uint16_t>(p, p + host->numel());
  };
  for (const auto& s : shapes) {
    SCOPED_TRACE(testing::Message() << s[0] << "x" << s[1]);
    const auto x = Random(s[0] * s[1], seed++, 3.0f), w = Random(s[1], seed++);
    Tensor xd = Upload(be, x, {s[0], s[1]}), wd = Upload(be, w, {s[1]});
    Tensor y = Poisoned(be, {s[0], s[1]});
    auto yb_or = be.Alloc(DType::kBF16, {s[0], s[1]});
    ASSERT_TRUE(yb_or.ok());
    Tensor yb = *yb_or;
    ASSERT_TRUE(be.RmsNorm(xd, wd, 1e-5f, y).ok());
    ASSERT_TRUE(be.RmsNorm(xd, wd, 1e-5f, yb).ok());
    EXPECT_EQ(bits(yb), bits(as_bf16(y)));
    const auto u = Random(s[0] * s[1], seed++);
    Tensor ud = Upload(be, u, {s[0], s[1]});
    ASSERT_TRUE(be.SiluMul(xd, ud, y).ok());
    ASSERT_TRUE(be.SiluMul(xd, ud, yb).ok());
    EXPECT_EQ(bits(yb), bits(as_bf16(y)));
  }
}

// The bytes of a host tensor.
std::vector<uint8_t> HostBytes(const Tensor& host) {
  const auto* p = static_cast<const uint8_t*>(host.raw());
  return std::vector<uint8_t>(p, p + host.nbytes());
}

// A random host matrix [rows, cols] of dtype d (F32, or BF16 by the CPU backend's conversion).
Tensor HostMatrix(Backend& cpu, DType d, int64_t rows, int64_t cols, uint64_t seed) {
  Tensor f = Tensor::FromVector(Random(rows * cols, seed, 4.0f), {rows, cols});
  if (d == DType::kF32) return f;
  Tensor b = Tensor::Zeros(DType::kBF16, {rows, cols});
  EXPECT_TRUE(cpu.Convert(f, b).ok());
  return b;
}

// ConcatColumns on the GPU equals the CPU backend's bit for bit in every dtype combination (the
// same conversions), at odd widths and one row; mismatched shapes are refused.
TEST_F(CudaOpsTest, ConcatColumnsEqualsCpu) {
  Backend& be = Get(ComputeDType::kBF16);
  auto cpu = CreateBackend(BackendOptions{});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  uint64_t seed = 470;
  // The last three have whole 16-byte pieces a row (ConcatBf16PiecesKernel where a and out are
  // bf16).
  for (const auto& [m, ca, cb] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1},
                                  {7, 33, 5},
                                  {300, 257, 64},
                                  {5, 8, 8},
                                  {300, 256, 64},
                                  {3, 16, 24}}) {
    for (DType da : {DType::kF32, DType::kBF16}) {
      for (DType db : {DType::kF32, DType::kBF16}) {
        for (DType dout : {DType::kF32, DType::kBF16}) {
          SCOPED_TRACE(testing::Message() << m << "x" << ca << "+" << cb << " " << DTypeName(da)
                                          << " " << DTypeName(db) << " -> " << DTypeName(dout));
          const Tensor a = HostMatrix(**cpu, da, m, ca, seed++);
          const Tensor b = HostMatrix(**cpu, db, m, cb, seed++);
          Tensor want = Tensor::Zeros(dout, {m, ca + cb});
          ASSERT_TRUE((*cpu)->ConcatColumns(a, b, want).ok());
          auto ad = be.ToDevice(a), bd = be.ToDevice(b);
          ASSERT_TRUE(ad.ok() && bd.ok());
          auto out = be.Alloc(dout, {m, ca + cb});
          ASSERT_TRUE(out.ok());
          ASSERT_TRUE(be.ConcatColumns(*ad, *bd, *out).ok());
          auto got = be.ToHost(*out);
          ASSERT_TRUE(got.ok());
          EXPECT_EQ(HostBytes(*got), HostBytes(want));
        }
      }
    }
  }
  auto a = be.Alloc(DType::kF32, {4, 3}), b = be.Alloc(DType::kF32, {5, 2}),
       out = be.Alloc(DType::kF32, {4, 5});
  ASSERT_TRUE(a.ok() && b.ok() && out.ok());
  const absl::Status bad = be.ConcatColumns(*a, *b, *out);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_NE(bad.message().find("ConcatColumns"), std::string::npos) << bad;
}

// WriteColumns on the GPU equals the CPU backend's bit for bit in every dtype combination, the
// other columns untouched, at one row, odd widths and more rows than a grid's y dimension.
TEST_F(CudaOpsTest, WriteColumnsEqualsCpu) {
  Backend& be = Get(ComputeDType::kBF16);
  auto cpu = CreateBackend(BackendOptions{});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  uint64_t seed = 475;
  for (const auto& [m, c, n, first] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 1, 0},
                                       {7, 5, 38, 33},
                                       {70000, 3, 20, 9},
                                       {300, 64, 320, 256}}) {
    for (DType ds : {DType::kF32, DType::kBF16}) {
      for (DType dout : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(testing::Message() << m << "x" << c << " at " << first << " of " << n << " "
                                        << DTypeName(ds) << " -> " << DTypeName(dout));
        const Tensor src = HostMatrix(**cpu, ds, m, c, seed++);
        const Tensor want_before = HostMatrix(**cpu, dout, m, n, seed++);
        Tensor want = Tensor::Zeros(dout, {m, n});
        ASSERT_TRUE((*cpu)->Copy(want_before, want).ok());
        ASSERT_TRUE((*cpu)->WriteColumns(src, first, want).ok());
        auto sd = be.ToDevice(src), out = be.ToDevice(want_before);
        ASSERT_TRUE(sd.ok() && out.ok());
        ASSERT_TRUE(be.WriteColumns(*sd, first, *out).ok());
        auto got = be.ToHost(*out);
        ASSERT_TRUE(got.ok());
        EXPECT_EQ(HostBytes(*got), HostBytes(want));
      }
    }
  }
  auto src = be.Alloc(DType::kF32, {4, 3}), out = be.Alloc(DType::kF32, {4, 5});
  ASSERT_TRUE(src.ok() && out.ok());
  const absl::Status bad = be.WriteColumns(*src, 3, *out);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_NE(bad.message().find("WriteColumns"), std::string::npos) << bad;
}

// The joined low-rank product of the model (Model::ApplyJoined): [x | t]·[W | L_A]ᵀ in one bf16
// GEMM equals x·Wᵀ plus t·L_Aᵀ added by a second one, within fp32 summation order.
TEST_F(CudaOpsTest, JoinedLowRankProductMatchesTwoProducts) {
  Backend& be = Get(ComputeDType::kBF16);
  const int64_t m = 300, k = 257, n = 190, r = 16;
  uint64_t seed = 480;
  Tensor x = Upload(be, Random(m * k, seed++), {m, k});
  Tensor w = Upload(be, Random(n * k, seed++), {n, k});
  Tensor la = Upload(be, Random(n * r, seed++, 0.1f), {n, r});
  Tensor lb = Upload(be, Random(r * k, seed++, 0.1f), {r, k});
  auto xb = be.Alloc(DType::kBF16, {m, k});
  ASSERT_TRUE(xb.ok() && be.Convert(x, *xb).ok());
  auto t = be.Alloc(DType::kF32, {m, r});
  ASSERT_TRUE(t.ok() && be.Linear(*xb, lb, nullptr, *t, false).ok());
  Tensor two = Poisoned(be, {m, n});
  ASSERT_TRUE(be.Linear(*xb, w, nullptr, two, false).ok());
  ASSERT_TRUE(be.Linear(*t, la, nullptr, two, true).ok());
  auto xt = be.Alloc(DType::kBF16, {m, k + r});
  auto wt = be.Alloc(DType::kBF16, {n, k + r});
  ASSERT_TRUE(xt.ok() && wt.ok());
  ASSERT_TRUE(be.ConcatColumns(*xb, *t, *xt).ok());
  ASSERT_TRUE(be.ConcatColumns(w, la, *wt).ok());
  Tensor joined = Poisoned(be, {m, n});
  ASSERT_TRUE(be.Linear(*xt, *wt, nullptr, joined, false).ok());
  EXPECT_LE(RelError(Download(be, joined), Download(be, two)), kLinearF32Bound);
}

TEST_F(CudaOpsTest, EmbeddingGathersRows) {
  Backend& be = *f32_;
  const int64_t vocab = 11, width = 5;
  const auto table = Random(vocab * width, 500);
  Tensor td = Upload(be, table, {vocab, width});
  for (const std::vector<int32_t>& ids :
       {std::vector<int32_t>{3}, std::vector<int32_t>{0, 10, 4, 4, 7, 1, 10, 0, 2}}) {
    const int64_t n = ids.size();
    std::vector<float> ref(n * width);
    ref::Embedding(table.data(), vocab, width, ids.data(), n, ref.data());
    Tensor out = Poisoned(be, {n, width});
    ASSERT_TRUE(be.Embedding(td, Ids(ids), out).ok());
    EXPECT_EQ(Download(be, out), ref);
  }
  Tensor out = Poisoned(be, {2, width});
  const absl::Status bad = be.Embedding(td, Ids({1, 11}), out);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_NE(bad.message().find("token id 11"), std::string::npos) << bad;
}

TEST_F(CudaOpsTest, NllMatchesReference) {
  Backend& be = *f32_;
  const int64_t shapes[][2] = {{1, 1}, {3, 2}, {17, 513}, {5, 4096}, {2, 50000}};
  uint64_t seed = 600;
  for (const auto& s : shapes) {
    SCOPED_TRACE(testing::Message() << s[0] << "x" << s[1]);
    const auto logits = Random(s[0] * s[1], seed++, 3.0f);
    std::mt19937_64 gen(seed++);
    std::vector<int32_t> targets(s[0]);
    for (int32_t& t : targets) t = static_cast<int32_t>(gen() % s[1]);
    std::vector<float> ref(s[0]);
    ref::Nll(logits.data(), s[0], s[1], targets.data(), ref.data());
    Tensor ld = Upload(be, logits, {s[0], s[1]}), out = Poisoned(be, {s[0]});
    ASSERT_TRUE(be.Nll(ld, Ids(targets), out).ok());
    EXPECT_LE(RelError(Download(be, out), ref), kNllBound);
  }
}

// The pairs (a, b), a > b, of a row-major k × k matrix where h[a][b] != h[b][a].
int Asymmetric(const std::vector<float>& h, int64_t k) {
  int count = 0;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < a; ++b) count += h[a * k + b] != h[b * k + a];
  }
  return count;
}

// AccumulateGram onto a symmetric h, as accumulation over chunks does, and Backend::Gram, which
// skips the zero fill of its fresh tensor: every element must be written, so each case first
// frees a tensor of Gram's size full of NaN, which the caching allocator hands back to Gram.
// k = 2048 takes the bf16 row panels (and the mirror of the upper triangle they leave).
TEST_F(CudaOpsTest, GramMatchesReferenceAndIsSymmetric) {
  const int64_t shapes[][2] = {{1, 1},   {0, 3},     {7, 1},    {1, 5},
                               {33, 17}, {100, 130}, {513, 64}, {300, 2048}};
  uint64_t seed = 700;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    const double bound = bf16 ? kGramBf16Bound : kGramF32Bound;
    for (const auto& s : shapes) {
      const int64_t n = s[0], k = s[1];
      SCOPED_TRACE(testing::Message() << Name(dtype) << " n=" << n << " k=" << k);
      const auto x = Random(n * k, seed++);
      Tensor xd = n > 0 ? Upload(be, x, {n, k}) : be.Alloc(DType::kF32, {0, k}).value();
      std::vector<float> h0 = Random(k * k, seed++);
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t b = 0; b < a; ++b) h0[a * k + b] = h0[b * k + a];
      }
      std::vector<float> ref = h0, fresh_ref(h0.size(), 0.0f);
      ref::AccumulateGram(x.data(), n, k, ref.data(), bf16);
      ref::AccumulateGram(x.data(), n, k, fresh_ref.data(), bf16);

      Tensor hd = Upload(be, h0, {k, k});
      ASSERT_TRUE(be.AccumulateGram(xd, hd).ok());
      const auto h = Download(be, hd);
      EXPECT_LE(RelError(h, ref), bound);
      EXPECT_EQ(Asymmetric(h, k), 0);

      {
        Tensor poison = Upload(be, std::vector<float>(h0.size(), std::nanf("")), {k, k});
        ASSERT_TRUE(be.Synchronize().ok());
      }
      absl::StatusOr<Tensor> fresh = be.Gram(xd);
      ASSERT_TRUE(fresh.ok()) << fresh.status();
      ASSERT_EQ(fresh->shape(), (Shape{k, k}));
      const auto g = Download(be, *fresh);
      EXPECT_EQ(std::count_if(g.begin(), g.end(), [](float v) { return !std::isfinite(v); }), 0);
      if (n > 0) {
        EXPECT_LE(RelError(g, fresh_ref), bound);
      } else {
        EXPECT_EQ(g, fresh_ref);
      }
      EXPECT_EQ(Asymmetric(g, k), 0);
    }
  }
}

// The canonical reduction's partials (DESIGN section 2): chunks' GramLower summed by AddLower and
// mirrored once equal, bit for bit, their full Grams summed by Add, the same tree of sums. The
// strict upper triangles of the partials are never read: each case first frees a NaN tensor of
// their size, which GramLower's fresh tensor may reuse. k = 2048 takes the bf16 row panels.
TEST_F(CudaOpsTest, LowerTrianglePartialsSumToTheFullGramsSum) {
  const int64_t shapes[][2] = {{1, 1}, {40, 17}, {300, 130}, {257, 2048}};
  uint64_t seed = 750;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    for (const auto& s : shapes) {
      const int64_t n = s[0], k = s[1];
      SCOPED_TRACE(testing::Message() << Name(dtype) << " n=" << n << " k=" << k);
      std::vector<Tensor> chunks;
      for (int c = 0; c < 3; ++c) chunks.push_back(Upload(be, Random(n * k, seed++), {n, k}));
      // ((g0 + g1) + g2), as the tree sums three chunks.
      std::vector<Tensor> full, lower;
      for (const Tensor& x : chunks) {
        {
          Tensor poison = Upload(be, std::vector<float>(k * k, std::nanf("")), {k, k});
          ASSERT_TRUE(be.Synchronize().ok());
        }
        absl::StatusOr<Tensor> l = be.GramLower(x);
        ASSERT_TRUE(l.ok()) << l.status();
        lower.push_back(*l);
        absl::StatusOr<Tensor> f = be.Gram(x);
        ASSERT_TRUE(f.ok()) << f.status();
        full.push_back(*f);
      }
      for (int c : {1, 2}) {
        ASSERT_TRUE(be.Add(full[c], full[0]).ok());
        ASSERT_TRUE(be.AddLower(lower[c], lower[0]).ok());
      }
      ASSERT_TRUE(be.MirrorLower(lower[0]).ok());
      const std::vector<float> want = Download(be, full[0]), got = Download(be, lower[0]);
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
      EXPECT_EQ(std::count_if(got.begin(), got.end(), [](float v) { return !std::isfinite(v); }),
                0);
    }
  }
}

TEST_F(CudaOpsTest, ResultsAreBitIdenticalRunToRun) {
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    SCOPED_TRACE(Name(dtype));
    Backend& be = Get(dtype);
    const AttentionShape s{2, 150, 150, 4, 2, 64, 0};
    const int64_t rows = 300, width = 256, kv_width = 128, vocab = 1000;
    Tensor x = Upload(be, Random(rows * width, 800), {rows, width});
    Tensor w = Upload(be, Random(vocab * width, 801), {vocab, width});
    Tensor k = Upload(be, Random(rows * kv_width, 802), {rows, kv_width});
    Tensor v = Upload(be, Random(rows * kv_width, 803), {rows, kv_width});
    std::mt19937_64 gen(804);
    std::vector<int32_t> targets(rows);
    for (int32_t& t : targets) t = static_cast<int32_t>(gen() % vocab);
    std::vector<float> runs[2][4];
    for (auto& run : runs) {
      Tensor y = Poisoned(be, {rows, vocab}), attn = Poisoned(be, {rows, width});
      Tensor nll = Poisoned(be, {rows}),
             h = Upload(be, std::vector<float>(width * width, 0.0f), {width, width});
      ASSERT_TRUE(be.Linear(x, w, nullptr, y, false).ok());
      ASSERT_TRUE(be.Attention(x, k, v, s, attn).ok());
      ASSERT_TRUE(be.Nll(y, Ids(targets), nll).ok());
      ASSERT_TRUE(be.AccumulateGram(x, h).ok());
      run[0] = Download(be, y);
      run[1] = Download(be, attn);
      run[2] = Download(be, nll);
      run[3] = Download(be, h);
    }
    for (int op = 0; op < 4; ++op) EXPECT_EQ(runs[0][op], runs[1][op]) << "output " << op;
  }
}

TEST_F(CudaOpsTest, MemoryOpsRoundTrip) {
  Backend& be = *f32_;
  auto zeros = be.Alloc(DType::kF32, {3, 5});
  ASSERT_TRUE(zeros.ok());
  EXPECT_EQ(zeros->device(), Device::kCuda);
  EXPECT_EQ(Download(be, *zeros), std::vector<float>(15, 0.0f));

  // Copy into a row range of a larger tensor, as the KV cache does.
  const auto src = Random(2 * 4, 900);
  Tensor sd = Upload(be, src, {2, 4});
  Tensor cache = Poisoned(be, {6, 4});
  Tensor rows = cache.Rows(3, 5);
  ASSERT_TRUE(be.Copy(sd, rows).ok());
  const auto all = Download(be, cache);
  EXPECT_EQ(std::vector<float>(all.begin() + 12, all.begin() + 20), src);
  EXPECT_TRUE(std::isnan(all[11]) && std::isnan(all[20]));
  Tensor wrong = Poisoned(be, {3, 4});
  EXPECT_EQ(be.Copy(sd, wrong).code(), absl::StatusCode::kInvalidArgument);

  auto host = be.ToHost(sd);
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(host->device(), Device::kHost);
  EXPECT_EQ(host->shape(), (Shape{2, 4}));

  // Asynchronous downloads on the copy stream, ordered after the work queued before them: the
  // result of a kernel launched just before (an Add into a fresh tensor), several in flight.
  const int64_t n = 1 << 22;
  const auto a = Random(n, 901), b = Random(n, 902);
  std::vector<float> sum = b;
  ref::Add(a.data(), sum.data(), n);
  Tensor ad = Upload(be, a, {n});
  std::vector<Tensor> hosts;
  std::vector<std::function<absl::Status()>> waits;
  for (int i = 0; i < 3; ++i) {
    Tensor bd = Upload(be, b, {n});
    ASSERT_TRUE(be.Add(ad, bd).ok());
    auto dst = be.AllocHost(DType::kF32, {n});
    ASSERT_TRUE(dst.ok());
    auto wait = be.CopyToHostAsync(bd, *dst);  // bd's last reference goes with the loop
    ASSERT_TRUE(wait.ok()) << wait.status();
    hosts.push_back(*dst);
    waits.push_back(*wait);
  }
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(waits[i]().ok());
    const float* h = hosts[i].data<float>();
    EXPECT_EQ(std::vector<float>(h, h + n), sum) << "download " << i;
  }
  Tensor host_src = Tensor::FromVector(a, {n});
  EXPECT_EQ(be.CopyToHostAsync(host_src, hosts[0]).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaOpsTest, ErrorsAreStatusesNotCrashes) {
  Backend& be = *f32_;
  // 4 TiB: more than any GPU has. The backend stays usable afterwards.
  auto huge = be.Alloc(DType::kF32, {int64_t{1} << 40});
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_NE(huge.status().message().find("out of memory"), std::string::npos) << huge.status();

  Tensor x = Upload(be, Random(4 * 3, 1000), {4, 3}), w = Upload(be, Random(2 * 5, 1001), {2, 5});
  Tensor y = Poisoned(be, {4, 2});
  EXPECT_EQ(be.Linear(x, w, nullptr, y, false).code(), absl::StatusCode::kInvalidArgument);
  const Tensor host_w = Tensor::FromVector(Random(2 * 3, 1002), {2, 3});
  EXPECT_EQ(be.Linear(x, host_w, nullptr, y, false).code(), absl::StatusCode::kInvalidArgument);

  const AttentionShape wide{1, 1, 1, 1, 1, 256, 0};
  Tensor q = Poisoned(be, {1, 256});
  Tensor out = Poisoned(be, {1, 256});
  EXPECT_EQ(be.Attention(q, q, q, wide, out).code(), absl::StatusCode::kUnimplemented);
  const AttentionShape past_end{1, 2, 1, 1, 1, 256, 0};
  EXPECT_EQ(be.Attention(q, q, q, past_end, out).code(), absl::StatusCode::kInvalidArgument);

  auto w_ok = be.ToDevice(host_w);
  ASSERT_TRUE(w_ok.ok());
  EXPECT_TRUE(be.Linear(x, *w_ok, nullptr, y, false).ok());
  EXPECT_TRUE(be.Synchronize().ok());
}

TEST_F(CudaOpsTest, DeviceKindNamesGpuAndLibrary) {
  const std::string kind = f32_->DeviceKind();
  EXPECT_EQ(kind.rfind("cuda/", 0), 0u) << kind;
  EXPECT_NE(kind.find("/sm_"), std::string::npos) << kind;
  EXPECT_NE(kind.find("/cublas-"), std::string::npos) << kind;
  std::printf("device kind: %s\n", kind.c_str());
}

// Median wall time of `fn` over `reps` runs after one warm-up, with the device synchronised.
template <typename Fn>
double MedianSeconds(Backend& be, int reps, Fn fn) {
  std::vector<double> t;
  for (int i = 0; i <= reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    EXPECT_TRUE(be.Synchronize().ok());
    if (i > 0)
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Llama-2-7B shapes (2048 tokens, 32 heads of 128) against the CPU backend, with timings printed
// for the record (no timing is asserted).
TEST_F(CudaOpsTest, SevenBShapesMatchCpuBackend) {
  BackendOptions cpu_options;
  auto cpu = CreateBackend(cpu_options);
  ASSERT_TRUE(cpu.ok());
  const int64_t tokens = 2048, hidden = 4096;
  const AttentionShape s{1, 2048, 2048, 32, 32, 128, 0};
  const auto x = Random(tokens * hidden, 1100), w = Random(hidden * hidden, 1101, 0.02f);
  const auto k = Random(tokens * hidden, 1102), v = Random(tokens * hidden, 1103);
  const Tensor xh = Tensor::FromVector(x, {tokens, hidden});
  const Tensor wh = Tensor::FromVector(w, {hidden, hidden});
  const Tensor kh = Tensor::FromVector(k, {tokens, hidden});
  const Tensor vh = Tensor::FromVector(v, {tokens, hidden});
  Tensor y_cpu = Tensor::Zeros(DType::kF32, {tokens, hidden});
  Tensor attn_cpu = Tensor::Zeros(DType::kF32, {tokens, hidden});
  Tensor h_cpu = Tensor::Zeros(DType::kF32, {hidden, hidden});
  ASSERT_TRUE((*cpu)->Linear(xh, wh, nullptr, y_cpu, false).ok());
  ASSERT_TRUE((*cpu)->Attention(xh, kh, vh, s, attn_cpu).ok());
  ASSERT_TRUE((*cpu)->AccumulateGram(xh, h_cpu).ok());
  auto as_vector = [](const Tensor& t) {
    return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
  };
  const auto y_ref = as_vector(y_cpu), attn_ref = as_vector(attn_cpu), h_ref = as_vector(h_cpu);

  const double linear_flop = 2.0 * tokens * hidden * hidden;
  const double attention_flop =
      4.0 * s.num_heads * s.head_dim * (double(tokens) * (tokens + 1) / 2);
  const double gram_flop = 2.0 * tokens * hidden * hidden;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    SCOPED_TRACE(Name(dtype));
    Backend& be = Get(dtype);
    Tensor xd = Upload(be, x, {tokens, hidden}), wd = Upload(be, w, {hidden, hidden});
    Tensor kd = Upload(be, k, {tokens, hidden}), vd = Upload(be, v, {tokens, hidden});
    Tensor yd = Poisoned(be, {tokens, hidden}), ad = Poisoned(be, {tokens, hidden});
    auto hd = be.Alloc(DType::kF32, {hidden, hidden});
    ASSERT_TRUE(hd.ok());
    ASSERT_TRUE(be.AccumulateGram(xd, *hd).ok());
    const auto h = Download(be, *hd);
    const double t_linear =
        MedianSeconds(be, 5, [&] { ASSERT_TRUE(be.Linear(xd, wd, nullptr, yd, false).ok()); });
    const double t_attention =
        MedianSeconds(be, 5, [&] { ASSERT_TRUE(be.Attention(xd, kd, vd, s, ad).ok()); });
    const double t_gram =
        MedianSeconds(be, 5, [&] { ASSERT_TRUE(be.AccumulateGram(xd, *hd).ok()); });
    std::printf(
        "%-4s 7B shapes: linear 2048x4096x4096 %.3f ms (%.1f TFLOP/s), attention L=2048 "
        "32x128 %.3f ms (%.1f TFLOP/s), gram 2048x4096 %.3f ms (%.1f TFLOP/s)\n",
        Name(dtype), t_linear * 1e3, linear_flop / t_linear * 1e-12, t_attention * 1e3,
        attention_flop / t_attention * 1e-12, t_gram * 1e3, gram_flop / t_gram * 1e-12);
    // bf16 against the fp32 CPU results: bounded by the rounding of the operands.
    const double bound = dtype == ComputeDType::kF32 ? kLargeF32Bound : kLargeBf16VsF32Bound;
    EXPECT_LE(RelError(Download(be, yd), y_ref), bound);
    EXPECT_LE(RelError(Download(be, ad), attn_ref), bound);
    EXPECT_LE(RelError(h, h_ref), bound);
  }
}

}  // namespace
}  // namespace qcal::kernels
