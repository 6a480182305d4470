// The CPU backend against its scalar `_ref` twins (kernels/cpu/ref_ops.h), the specification.
//
// Every op runs on random data with odd sizes and size 1, under both compute dtypes: with kBF16
// the GEMM-based ops are compared with the reference rounding its operands the same way. Error is
// ‖out − ref‖ / ‖ref‖ against a named per-op bound. A few known answers pin conventions the
// reference itself could get wrong (RoPE half-split pairs, GQA head grouping), and bad shapes,
// dtypes and token ids must come back as InvalidArgument.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/abq_ref.h"
#include "kernels/cpu/quant_ref.h"
#include "kernels/cpu/ref_ops.h"
#include "tests/kernels/kernel_test_random.h"

namespace qcal::kernels {
namespace {

using ::testing::HasSubstr;

// Per-op bounds on ‖out − ref‖ / ‖ref‖.
//
// GEMM-based ops (Linear, AccumulateGram): OpenBLAS accumulates in fp32 in a blocked order, the
// reference in double. For random data the rounding error grows like sqrt(k)·2^-24, about 1e-6
// for the k ≤ 257 used here; 1e-5 leaves headroom for the blocking order. Under kBF16 both sides
// round the operands to bf16 identically and bf16×bf16 products are exact in fp32, so the same
// bound holds, while skipping the rounding would cost ~1e-3 (checked below).
constexpr double kLinearBound = 1e-5;
constexpr double kGramBound = 1e-5;
// Attention: two fp32 GEMMs plus an fp32 softmax against a double reference; errors compound
// over the scores, the normalisation and the weighted sum of values, each ~1e-6 here.
constexpr double kAttentionBound = 1e-5;
// Row-wise fp32 formulas evaluated the same way as the reference (RmsNorm, Rope with the same
// angle table, SiluMul's float exp, Nll's double log-sum-exp): only a few ulps may differ.
constexpr double kElementwiseBound = 1e-6;
// Pure data movement and a single fp32 addition per element (Add, Embedding, Copy), and ActQuant,
// whose contract is bit-identity with its reference (the same fp32 operations per row): exact.
constexpr double kExactBound = 0.0;

using kernel_tests::Random;

std::vector<float> Values(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

// ‖out − ref‖ / ‖ref‖ in double; the absolute norm when ref is zero.
double RelError(const float* out, const float* ref, int64_t n) {
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
    norm += double(ref[i]) * ref[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

double RelError(const Tensor& out, const std::vector<float>& ref) {
  EXPECT_EQ(out.numel(), static_cast<int64_t>(ref.size()));
  return RelError(out.data<float>(), ref.data(), out.numel());
}

Tensor I32(const std::vector<int32_t>& values) {
  Tensor t = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(values.size())});
  std::memcpy(t.raw(), values.data(), values.size() * sizeof(int32_t));
  return t;
}

std::unique_ptr<Backend> MakeCpuBackend(ComputeDType dtype) {
  BackendOptions options;
  options.device = "cpu";
  options.threads = 2;
  options.compute_dtype = dtype;
  auto backend = CreateBackend(options);
  QCAL_CHECK(backend.ok());
  return std::move(backend).value();
}

class CpuOpsTest : public ::testing::TestWithParam<ComputeDType> {
 protected:
  void SetUp() override { backend_ = MakeCpuBackend(GetParam()); }
  bool bf16() const { return GetParam() == ComputeDType::kBF16; }

  std::unique_ptr<Backend> backend_;
  Random rng_{20240611};
};

TEST_P(CpuOpsTest, BackendDescribesItself) {
  EXPECT_EQ(backend_->name(), "cpu");
  EXPECT_EQ(backend_->device(), Device::kHost);
  EXPECT_EQ(backend_->compute_dtype(), GetParam());
  EXPECT_EQ(backend_->threads(), 2);
  EXPECT_THAT(backend_->DeviceKind(), HasSubstr("openblas"));
  for (Op op : {Op::kLinear, Op::kRmsNorm, Op::kRope, Op::kAttention, Op::kSiluMul, Op::kAdd,
                Op::kEmbedding, Op::kNll, Op::kGram, Op::kActQuant, Op::kBackward, Op::kTrain,
                Op::kAbqLinear}) {
    EXPECT_TRUE(backend_->SupportsOp(op));
  }
}

// SupportsOp and SupportsSolverOp answer what the backend does: each supported op runs on tiny
// inputs, and the unsupported solver op (error reconstruction) returns Unimplemented.
TEST_P(CpuOpsTest, SupportsOpIsTruthful) {
  Backend& be = *backend_;
  const Tensor x = rng_.Floats({2, 4});
  const Tensor w = rng_.Floats({3, 4});
  auto runs = [&](Op op) -> absl::Status {
    Tensor y2x3 = Tensor::Zeros(DType::kF32, {2, 3});
    Tensor y2x4 = Tensor::Zeros(DType::kF32, {2, 4});
    switch (op) {
      case Op::kLinear:
        return be.Linear(x, w, nullptr, y2x3, false);
      case Op::kRmsNorm:
        return be.RmsNorm(x, rng_.Floats({4}), 1e-5f, y2x4);
      case Op::kRope: {
        Tensor r = x.Clone();
        return be.Rope(r, RopeShape{2, 0, 4, 10000.0});
      }
      case Op::kAttention:
        return be.Attention(x, x, x, AttentionShape{1, 2, 2, 1, 1, 4, 0}, y2x4);
      case Op::kSiluMul:
        return be.SiluMul(x, x, y2x4);
      case Op::kAdd:
        return be.Add(x, y2x4);
      case Op::kEmbedding: {
        Tensor ids = Tensor::Zeros(DType::kI32, {2});
        return be.Embedding(x, ids, y2x4);
      }
      case Op::kNll: {
        Tensor targets = Tensor::Zeros(DType::kI32, {2});
        Tensor nll = Tensor::Zeros(DType::kF32, {2});
        return be.Nll(x, targets, nll);
      }
      case Op::kGram: {
        Tensor h = Tensor::Zeros(DType::kF32, {4, 4});
        return be.AccumulateGram(x, h);
      }
      case Op::kActQuant:
        return be.ActQuant(x, 8, y2x4);
      case Op::kBackward: {
        Tensor c = Tensor::Zeros(DType::kF32, {4, 4});
        return be.Gemm(x, true, x, false, 1.0f, 0.0f, c);
      }
      case Op::kTrain: {
        Tensor p = x.Clone(), m = Tensor::Zeros(DType::kF32, {2, 4});
        Tensor v = Tensor::Zeros(DType::kF32, {2, 4});
        return be.AdamWStep(p, x, m, v, 1, AdamWOptions{});
      }
      case Op::kAbqLinear: {
        auto packed = PackAbqWeights(std::vector<int32_t>(12, 1), std::vector<int32_t>(3, 1),
                                     std::vector<float>(3, 1.0f), 3, 4, AbqSpec{2, 8, -1});
        if (!packed.ok()) return packed.status();
        auto prepared = be.PrepareAbqLinear(*packed);
        if (!prepared.ok()) return prepared.status();
        return be.AbqLinear(**prepared, AbqKernel::kBinaryMma, x, nullptr, y2x3, false);
      }
    }
    return absl::InternalError("unknown op");
  };
  for (Op op : {Op::kLinear, Op::kRmsNorm, Op::kRope, Op::kAttention, Op::kSiluMul, Op::kAdd,
                Op::kEmbedding, Op::kNll, Op::kGram, Op::kActQuant, Op::kBackward, Op::kTrain,
                Op::kAbqLinear}) {
    SCOPED_TRACE(static_cast<int>(op));
    EXPECT_EQ(be.SupportsOp(op), runs(op).ok());
  }
  // The solver ops run, except error reconstruction (the engine's host path on a CPU backend).
  const Tensor h = Tensor::FromVector({4, 1, 0, 0, 1, 4, 1, 0, 0, 1, 4, 1, 0, 0, 1, 4}, {4, 4});
  auto solver_runs = [&](SolverOp op) -> absl::Status {
    Tensor wm = w.Clone();
    switch (op) {
      case SolverOp::kGptq: {
        auto f = be.GptqFactorize(h, GptqSolveOptions{});
        if (!f.ok()) return f.status();
        return be.GptqSolve(w, *f, QuantSpec{}, 128, false).status();
      }
      case SolverOp::kQuantizeRtn:
        return be.QuantizeRtn(w, QuantSpec{}).status();
      case SolverOp::kOutputError:
        return be.OutputError(w, w, h).status();
      case SolverOp::kErrorReconstruction: {
        const absl::Status s = be.CholeskyWhitening(h, 0.01).status();
        return absl::IsUnimplemented(s) ? s : absl::InternalError("not Unimplemented");
      }
      case SolverOp::kSmoothing: {
        QCAL_RETURN_IF_ERROR(be.ChannelAbsStats(x, 0).status());
        QCAL_RETURN_IF_ERROR(be.ScaleColumns(wm, Tensor::FromVector({1, 2, 3, 4}, {4})));
        return be.DivideRows(wm, Tensor::FromVector({1, 2, 3}, {3}));
      }
    }
    return absl::InternalError("unknown solver op");
  };
  for (SolverOp op : {SolverOp::kGptq, SolverOp::kQuantizeRtn, SolverOp::kOutputError,
                      SolverOp::kErrorReconstruction, SolverOp::kSmoothing}) {
    SCOPED_TRACE(static_cast<int>(op));
    const absl::Status runs = solver_runs(op);
    EXPECT_EQ(be.SupportsSolverOp(op), runs.ok()) << runs;
  }
  EXPECT_FALSE(be.SupportsSolverOp(SolverOp::kErrorReconstruction));
}

TEST_P(CpuOpsTest, Linear) {
  struct Case {
    int64_t m, n, k;
  };
  for (const Case c : {Case{1, 1, 1}, Case{7, 13, 5}, Case{33, 17, 65}, Case{3, 129, 31},
                       Case{1, 64, 257}, Case{4, 3, 0}}) {
    const Tensor x = rng_.Floats({c.m, c.k});
    const Tensor w = rng_.Floats({c.n, c.k}, 0.5f);
    const Tensor bias = rng_.Floats({c.n});
    const Tensor y0 = rng_.Floats({c.m, c.n});
    for (const bool with_bias : {false, true}) {
      for (const bool accumulate : {false, true}) {
        Tensor y = y0.Clone();
        ASSERT_TRUE(backend_->Linear(x, w, with_bias ? &bias : nullptr, y, accumulate).ok());
        std::vector<float> ref = Values(y0);
        ref::Linear(x.data<float>(), w.data<float>(), with_bias ? bias.data<float>() : nullptr,
                    ref.data(), c.m, c.n, c.k, accumulate, bf16());
        EXPECT_LE(RelError(y, ref), kLinearBound)
            << "m=" << c.m << " n=" << c.n << " k=" << c.k << " bias=" << with_bias
            << " accumulate=" << accumulate;
      }
    }
  }
}

TEST_P(CpuOpsTest, RmsNorm) {
  struct Case {
    int64_t rows, width;
  };
  for (const Case c : {Case{1, 1}, Case{5, 7}, Case{3, 64}, Case{17, 129}}) {
    const Tensor x = rng_.Floats({c.rows, c.width}, 3.0f);
    const Tensor weight = rng_.Floats({c.width});
    Tensor y = Tensor::Zeros(DType::kF32, {c.rows, c.width});
    ASSERT_TRUE(backend_->RmsNorm(x, weight, 1e-5f, y).ok());
    std::vector<float> ref(x.numel());
    ref::RmsNorm(x.data<float>(), weight.data<float>(), 1e-5f, ref.data(), c.rows, c.width);
    EXPECT_LE(RelError(y, ref), kElementwiseBound) << c.rows << "x" << c.width;
    // y may alias x.
    Tensor inplace = x.Clone();
    ASSERT_TRUE(backend_->RmsNorm(inplace, weight, 1e-5f, inplace).ok());
    EXPECT_LE(RelError(inplace, ref), kElementwiseBound) << c.rows << "x" << c.width;
    // BF16 outputs are the CUDA backend's; here a clear error, nothing written.
    Tensor bf16_out = Tensor::Zeros(DType::kBF16, x.shape());
    EXPECT_EQ(backend_->RmsNorm(x, weight, 1e-5f, bf16_out).code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(backend_->SiluMul(x, x, bf16_out).code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_P(CpuOpsTest, Rope) {
  struct Case {
    int batch, seq_len, offset, head_dim, heads;
    double theta;
  };
  for (const Case c : {Case{1, 1, 0, 2, 1, 10000.0}, Case{2, 7, 0, 8, 3, 10000.0},
                       Case{3, 5, 11, 64, 2, 500000.0}, Case{1, 1, 200, 6, 5, 10000.0}}) {
    const int64_t rows = int64_t(c.batch) * c.seq_len, width = int64_t(c.heads) * c.head_dim;
    const Tensor x0 = rng_.Floats({rows, width});
    const RopeShape shape{c.seq_len, c.offset, c.head_dim, c.theta};
    Tensor x = x0.Clone();
    ASSERT_TRUE(backend_->Rope(x, shape).ok());
    std::vector<float> ref = Values(x0);
    ref::Rope(ref.data(), rows, width, shape);
    EXPECT_LE(RelError(x, ref), kElementwiseBound)
        << "batch=" << c.batch << " seq=" << c.seq_len << " offset=" << c.offset;
  }
}

// Hugging Face's half-split convention rotates the pairs (i, i + head_dim/2), frequency i.
TEST_P(CpuOpsTest, RopeRotatesHalfSplitPairs) {
  const int pos = 3;
  Tensor x = Tensor::FromVector({1, 0, 0, 0, 0, 1, 0, 0}, {1, 8});  // two heads of 4
  ASSERT_TRUE(backend_->Rope(x, RopeShape{1, pos, 4, 10000.0}).ok());
  const float c0 = std::cos(3.0f), s0 = std::sin(3.0f);
  const double f1 = std::pow(10000.0, -0.5);  // frequency index 1: theta^(-2/4)
  const float c1 = float(std::cos(pos * f1)), s1 = float(std::sin(pos * f1));
  const std::vector<float> want = {c0, 0, s0, 0, 0, c1, 0, s1};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(x.data<float>()[i], want[i], 1e-6f) << i;
  // Position 0 is the identity.
  const Tensor y0 = rng_.Floats({2, 8});
  Tensor y = y0.Clone();
  ASSERT_TRUE(backend_->Rope(y, RopeShape{1, 0, 8, 10000.0}).ok());
  EXPECT_EQ(Values(y), Values(y0));
}

TEST_P(CpuOpsTest, Attention) {
  std::vector<AttentionShape> cases = {
      // batch, q_len, kv_len, heads, kv_heads, head_dim, q_offset
      {1, 1, 1, 1, 1, 1, 0},    // size 1
      {1, 13, 13, 6, 2, 8, 0},  // GQA prefill
      {3, 7, 7, 4, 4, 5, 0},    // batch > 1, odd head_dim
      {1, 1, 9, 8, 2, 16, 8},   // cached decode: q_len 1 at the end of the cache
      {2, 4, 11, 6, 2, 7, 7},   // a chunk after a cached prefix, batch 2
      {2, 2, 9, 3, 1, 4, 3},    // cache capacity beyond the visible prefix
      {1, 1, 5, 4, 2, 8, 0},    // q_len 1 at position 0 of a longer buffer
  };
  for (const AttentionShape& s : cases) {
    const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                  kvw = int64_t(s.num_kv_heads) * s.head_dim;
    const Tensor q = rng_.Floats({int64_t(s.batch) * s.q_len, qw}, 2.0f);
    const Tensor k = rng_.Floats({int64_t(s.batch) * s.kv_len, kvw}, 2.0f);
    const Tensor v = rng_.Floats({int64_t(s.batch) * s.kv_len, kvw});
    Tensor out = rng_.Floats(q.shape());  // stale contents must be overwritten
    ASSERT_TRUE(backend_->Attention(q, k, v, s, out).ok());
    std::vector<float> ref(q.numel());
    ref::Attention(q.data<float>(), k.data<float>(), v.data<float>(), s, ref.data(), bf16());
    EXPECT_LE(RelError(out, ref), kAttentionBound)
        << "batch=" << s.batch << " q_len=" << s.q_len << " kv_len=" << s.kv_len
        << " heads=" << s.num_heads << "/" << s.num_kv_heads << " offset=" << s.q_offset;
  }
}

// ref::Attention's bf16 path (an online softmax over 64-key tiles, the unnormalised
// probabilities rounded to bf16) against its fp32 path (the exact softmax in double) on operands
// that are bf16 values already, so that only the probabilities' rounding differs: within the
// bf16 rounding of P (2^-9 a value; 1e-3 measured, bound 4e-3), and not equal to it (the rounding
// happens). Keys grow along the sequence, so the running maximum moves in most of the 5 tiles of
// 300 keys and l and o are rescaled; a sliding window starts rows inside a tile.
TEST(CpuAttentionRefTest, Bf16PathIsTheSoftmaxUpToRoundingP) {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (const AttentionShape& s :
       {AttentionShape{1, 300, 300, 2, 1, 16, 0}, AttentionShape{2, 130, 130, 4, 2, 8, 0, 70}}) {
    const int64_t qn = int64_t(s.batch) * s.q_len * s.num_heads * s.head_dim;
    const int64_t kw = int64_t(s.num_kv_heads) * s.head_dim;
    std::vector<float> q(qn), k(int64_t(s.batch) * s.kv_len * kw), v(k.size());
    for (float& x : q) x = RoundToBf16(normal(gen));
    for (size_t i = 0; i < k.size(); ++i) {
      const double pos = double(i / kw % s.kv_len) / s.kv_len;  // the key's position, 0 to 1
      k[i] = RoundToBf16(float((0.5 + 2 * pos) * normal(gen)));
      v[i] = RoundToBf16(normal(gen));
    }
    std::vector<float> exact(qn), bf16(qn);
    ref::Attention(q.data(), k.data(), v.data(), s, exact.data(), false);
    ref::Attention(q.data(), k.data(), v.data(), s, bf16.data(), true);
    const double err = RelError(bf16.data(), exact.data(), qn);
    EXPECT_LE(err, 4e-3) << "kv_len " << s.kv_len;
    EXPECT_GT(err, 0.0) << "kv_len " << s.kv_len;
  }
}

// RopeAttention's default: Rope of copies of q and k, then Attention; q and k unchanged.
TEST_P(CpuOpsTest, RopeAttentionIsRopeThenAttention) {
  const AttentionShape s{2, 9, 9, 4, 2, 8, 0};
  const RopeShape rope{9, 0, 8, 10000.0};
  const Tensor q = rng_.Floats({18, 32}, 2.0f), k = rng_.Floats({18, 16}, 2.0f);
  const Tensor v = rng_.Floats({18, 16});
  const Tensor q0 = q.Clone(), k0 = k.Clone();
  Tensor fused = rng_.Floats(q.shape()), plain = rng_.Floats(q.shape());
  ASSERT_TRUE(backend_->RopeAttention(q, k, v, rope, s, fused).ok());
  EXPECT_EQ(std::memcmp(q.raw(), q0.raw(), q.nbytes()), 0);
  EXPECT_EQ(std::memcmp(k.raw(), k0.raw(), k.nbytes()), 0);
  Tensor qr = q.Clone(), kr = k.Clone();
  ASSERT_TRUE(backend_->Rope(qr, rope).ok());
  ASSERT_TRUE(backend_->Rope(kr, rope).ok());
  ASSERT_TRUE(backend_->Attention(qr, kr, v, s, plain).ok());
  EXPECT_EQ(std::memcmp(fused.raw(), plain.raw(), fused.nbytes()), 0);
}

// Sliding windows (Mistral): the optimized op against the reference, and the reference against a
// direct definition: a query at position p sees keys p - W + 1 .. p only.
TEST_P(CpuOpsTest, SlidingWindowAttention) {
  struct Case {
    AttentionShape s;
    int window;
  };
  const Case cases[] = {{{1, 40, 40, 4, 2, 8, 0}, 5},
                        {{2, 13, 13, 2, 1, 4, 0}, 1},
                        {{1, 1, 30, 2, 2, 8, 29}, 7},
                        {{1, 6, 30, 2, 1, 8, 24}, 10},
                        {{1, 12, 12, 2, 2, 8, 0}, 100}};
  for (const Case& c : cases) {
    AttentionShape s = c.s;
    s.sliding_window = c.window;
    const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                  kvw = int64_t(s.num_kv_heads) * s.head_dim;
    const Tensor q = rng_.Floats({int64_t(s.batch) * s.q_len, qw}, 2.0f);
    const Tensor k = rng_.Floats({int64_t(s.batch) * s.kv_len, kvw}, 2.0f);
    const Tensor v = rng_.Floats({int64_t(s.batch) * s.kv_len, kvw});
    Tensor out = rng_.Floats(q.shape());
    ASSERT_TRUE(backend_->Attention(q, k, v, s, out).ok());
    std::vector<float> ref(q.numel());
    ref::Attention(q.data<float>(), k.data<float>(), v.data<float>(), s, ref.data(), bf16());
    EXPECT_LE(RelError(out, ref), kAttentionBound) << "window=" << s.sliding_window;
  }
  // Window 1: every query returns its own value row.
  const AttentionShape one{1, 5, 5, 1, 1, 2, 0, 1};
  const Tensor q = rng_.Floats({5, 2}), k = rng_.Floats({5, 2}), v = rng_.Floats({5, 2});
  Tensor out = Tensor::Zeros(DType::kF32, {5, 2});
  ASSERT_TRUE(backend_->Attention(q, k, v, one, out).ok());
  const double tol = bf16() ? 4e-3 : 1e-6;  // bf16 operands round v
  for (int i = 0; i < 10; ++i) EXPECT_NEAR(out.data<float>()[i], v.data<float>()[i], tol) << i;
  // Window 2 at position 3 of a cache: keys 2 and 3 only (key 0 and 1 changed: same result).
  const AttentionShape two{1, 1, 4, 1, 1, 2, 3, 2};
  const Tensor k4 = rng_.Floats({4, 2}), v4 = rng_.Floats({4, 2}), q1 = rng_.Floats({1, 2});
  Tensor a = Tensor::Zeros(DType::kF32, {1, 2}), b = Tensor::Zeros(DType::kF32, {1, 2});
  ASSERT_TRUE(backend_->Attention(q1, k4, v4, two, a).ok());
  Tensor k4b = k4.Clone(), v4b = v4.Clone();
  for (int i = 0; i < 4; ++i) k4b.data<float>()[i] = v4b.data<float>()[i] = 7.0f;
  ASSERT_TRUE(backend_->Attention(q1, k4b, v4b, two, b).ok());
  EXPECT_EQ(Values(a), Values(b));
}

// The scaled inverse frequencies against transformers' formulas written out here.
TEST(RopeScalingTest, InverseFrequencies) {
  const int dim = 64;
  const double theta = 500000.0;
  auto base = [&](int i) { return std::pow(theta, -2.0 * i / dim); };
  RopeShape shape{1, 0, dim, theta};
  shape.scaling.type = RopeScaling::Type::kLinear;
  shape.scaling.factor = 4;
  for (int i = 0; i < dim / 2; ++i) EXPECT_DOUBLE_EQ(ref::RopeInvFreq(i, shape), base(i) / 4) << i;

  // Llama 3.1 (factor 8, low 1, high 4, original 8192): high frequencies kept, low ones / 8, the
  // band between interpolated.
  shape.scaling = RopeScaling{};
  shape.scaling.type = RopeScaling::Type::kLlama3;
  shape.scaling.factor = 8;
  shape.scaling.low_freq_factor = 1;
  shape.scaling.high_freq_factor = 4;
  shape.scaling.original_max_position_embeddings = 8192;
  int kept = 0, divided = 0, smoothed = 0;
  for (int i = 0; i < dim / 2; ++i) {
    const double f = base(i), wavelen = 2 * M_PI / f, got = ref::RopeInvFreq(i, shape);
    if (wavelen < 8192 / 4.0) {
      EXPECT_DOUBLE_EQ(got, f) << i;
      ++kept;
    } else if (wavelen > 8192 / 1.0) {
      EXPECT_DOUBLE_EQ(got, f / 8) << i;
      ++divided;
    } else {
      const double smooth = (8192 / wavelen - 1) / (4 - 1);
      EXPECT_DOUBLE_EQ(got, (1 - smooth) * f / 8 + smooth * f) << i;
      ++smoothed;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(smoothed, 0);

  // YaRN (factor 4, original 64, beta 32/1): low = floor(dim ln(64 / (32·2π)) / (2 ln θ)) clamped
  // at 0, high = ceil(dim ln(64 / 2π) / (2 ln θ)); the ramp mixes f / 4 and f.
  shape.scaling = RopeScaling{};
  shape.scaling.type = RopeScaling::Type::kYarn;
  shape.scaling.factor = 4;
  shape.scaling.original_max_position_embeddings = 64;
  shape.scaling.attention_factor = 0.1 * std::log(4.0) + 1;
  auto cd = [&](double rot) {
    return dim * std::log(64 / (rot * 2 * M_PI)) / (2 * std::log(theta));
  };
  const double low = std::max(std::floor(cd(32)), 0.0),
               high = std::min(std::ceil(cd(1)), dim - 1.0);
  ASSERT_LT(low, high);
  for (int i = 0; i < dim / 2; ++i) {
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double extrapolation = 1 - ramp;
    const double want = base(i) / 4 * (1 - extrapolation) + base(i) * extrapolation;
    EXPECT_NEAR(ref::RopeInvFreq(i, shape), want, 1e-15 * base(0)) << i;
  }
  // cos/sin carry the attention factor.
  float c, s;
  ref::RopeAngle(0, 0, shape, &c, &s);
  EXPECT_FLOAT_EQ(c, float(0.1 * std::log(4.0) + 1));
  EXPECT_EQ(s, 0.0f);
}

// Golden inverse frequencies from transformers 5.17.0 (ROPE_INIT_FUNCTIONS[type](config, "cpu"),
// float32) for head_dim 32: llama3 (theta 5e5, factor 8, low 1, high 4, original 64), yarn (theta
// 1e6, factor 4, original 64, max_position_embeddings 256) and yarn as Qwen documents it (original
// 32768 = max_position_embeddings: transformers 5 keeps the explicit factor 4, attention factor
// 0.1·ln 4 + 1 = 1.138629436111989 for both yarn configs).
TEST(RopeScalingTest, MatchesTransformers) {
  const std::vector<double> llama3 = {1.0,
                                      0.44036662578582764,
                                      0.07940301299095154,
                                      0.010674637742340565,
                                      0.004700753837823868,
                                      0.0020700551103800535,
                                      0.0009115831344388425,
                                      0.00040143076330423355,
                                      0.00017677668074611574,
                                      7.784655463183299e-05,
                                      3.428102354519069e-05,
                                      1.5096217794052791e-05,
                                      6.647869668086059e-06,
                                      2.927499735960737e-06,
                                      1.289173155782919e-06,
                                      5.677088097399974e-07};
  const std::vector<double> yarn64 = {1.0,
                                      0.3162723779678345,
                                      0.08891396969556808,
                                      0.018747353926301003,
                                      0.007905694656074047,
                                      0.0033338037319481373,
                                      0.0014058533124625683,
                                      0.0005928434547968209,
                                      0.0002500000118743628,
                                      0.00010542412201175466,
                                      4.4456985051510856e-05,
                                      1.8747356079984456e-05,
                                      7.905693564680405e-06,
                                      3.3338035336782923e-06,
                                      1.405853367941745e-06,
                                      5.928434347879374e-07};
  const std::vector<double> yarn_qwen = {1.0,
                                         0.4216965138912201,
                                         0.17782793939113617,
                                         0.07498941570520401,
                                         0.03162277862429619,
                                         0.01333521492779255,
                                         0.00477990135550499,
                                         0.001659961650148034,
                                         0.0005499999970197678,
                                         0.00016867858357727528,
                                         4.4456985051510856e-05,
                                         1.8747356079984456e-05,
                                         7.905693564680405e-06,
                                         3.3338035336782923e-06,
                                         1.405853367941745e-06,
                                         5.928434347879374e-07};
  RopeScaling l3;
  l3.type = RopeScaling::Type::kLlama3;
  l3.factor = 8;
  l3.low_freq_factor = 1;
  l3.high_freq_factor = 4;
  l3.original_max_position_embeddings = 64;
  RopeScaling y64;
  y64.type = RopeScaling::Type::kYarn;
  y64.factor = 4;
  y64.original_max_position_embeddings = 64;
  RopeScaling yq = y64;
  yq.original_max_position_embeddings = 32768;
  const struct {
    RopeScaling scaling;
    double theta;
    const std::vector<double>* want;
  } cases[] = {{l3, 500000.0, &llama3}, {y64, 1e6, &yarn64}, {yq, 1e6, &yarn_qwen}};
  for (const auto& c : cases) {
    const RopeShape shape{1, 0, 32, c.theta, c.scaling};
    for (int i = 0; i < 16; ++i) {
      // float32 in transformers: a few ulps of fp32.
      EXPECT_NEAR(ref::RopeInvFreq(i, shape), (*c.want)[i], 4e-7 * (*c.want)[i])
          << RopeTypeName(c.scaling.type) << " original "
          << c.scaling.original_max_position_embeddings << " i=" << i;
    }
  }
}

TEST_P(CpuOpsTest, ScaledRope) {
  RopeShape shape{9, 100, 16, 10000.0};
  shape.scaling.type = RopeScaling::Type::kYarn;
  shape.scaling.factor = 8;
  shape.scaling.original_max_position_embeddings = 32;
  shape.scaling.attention_factor = 1.2;
  const Tensor x0 = rng_.Floats({18, 32});
  Tensor x = x0.Clone();
  ASSERT_TRUE(backend_->Rope(x, shape).ok());
  std::vector<float> ref = Values(x0);
  ref::Rope(ref.data(), 18, 32, shape);
  EXPECT_LE(RelError(x, ref), kElementwiseBound);
}

// A query at position 0 sees only key 0, so each head returns value row 0 of its KV head h / n_rep.
TEST_P(CpuOpsTest, AttentionGroupsQueryHeadsByKvHead) {
  const AttentionShape s{1, 1, 3, 4, 2, 2, 0};
  const Tensor q = rng_.Floats({1, 8});
  const Tensor k = rng_.Floats({3, 4});
  const Tensor v = Tensor::FromVector({1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9}, {3, 4});
  Tensor out = Tensor::Zeros(DType::kF32, {1, 8});
  ASSERT_TRUE(backend_->Attention(q, k, v, s, out).ok());
  EXPECT_EQ(Values(out), (std::vector<float>{1, 2, 1, 2, 3, 4, 3, 4}));
}

TEST_P(CpuOpsTest, SiluMul) {
  for (const Shape& shape : {Shape{1}, Shape{7}, Shape{3, 1367}, Shape{10001}}) {
    const Tensor gate = rng_.Floats(shape, 6.0f);
    const Tensor up = rng_.Floats(shape);
    Tensor out = Tensor::Zeros(DType::kF32, shape);
    ASSERT_TRUE(backend_->SiluMul(gate, up, out).ok());
    std::vector<float> ref(gate.numel());
    ref::SiluMul(gate.data<float>(), up.data<float>(), ref.data(), gate.numel());
    EXPECT_LE(RelError(out, ref), kElementwiseBound) << ShapeString(shape);
  }
}

TEST_P(CpuOpsTest, Add) {
  for (const Shape& shape : {Shape{1}, Shape{13}, Shape{9, 111}}) {
    const Tensor x = rng_.Floats(shape);
    const Tensor y0 = rng_.Floats(shape);
    Tensor y = y0.Clone();
    ASSERT_TRUE(backend_->Add(x, y).ok());
    std::vector<float> ref = Values(y0);
    ref::Add(x.data<float>(), ref.data(), x.numel());
    EXPECT_LE(RelError(y, ref), kExactBound) << ShapeString(shape);
  }
}

// ConcatColumns: row r of out is row r of a then row r of b, each value as Convert makes it
// (bf16 round to nearest even, exact widening); mismatched shapes are refused.
TEST_P(CpuOpsTest, ConcatColumns) {
  const int64_t m = 5, ca = 7, cb = 3;
  const Tensor a = rng_.Floats({m, ca}, 3.0f), bf = rng_.Floats({m, cb}, 3.0f);
  Tensor b = Tensor::Zeros(DType::kBF16, {m, cb});
  ASSERT_TRUE(backend_->Convert(bf, b).ok());
  for (DType dout : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dout));
    Tensor out = Tensor::Zeros(dout, {m, ca + cb});
    ASSERT_TRUE(backend_->ConcatColumns(a, b, out).ok());
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < ca + cb; ++c) {
        const float v =
            c < ca ? a.data<float>()[r * ca + c] : Bf16ToFloat(b.data<uint16_t>()[r * cb + c - ca]);
        const int64_t i = r * (ca + cb) + c;
        if (dout == DType::kF32) {
          ASSERT_EQ(out.data<float>()[i], v) << r << ", " << c;
        } else {
          ASSERT_EQ(out.data<uint16_t>()[i], FloatToBf16(v)) << r << ", " << c;
        }
      }
    }
  }
  Tensor wrong = Tensor::Zeros(DType::kF32, {m, ca + cb + 1});
  const absl::Status bad = backend_->ConcatColumns(a, b, wrong);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_NE(bad.message().find("ConcatColumns"), std::string::npos) << bad;
}

// WriteColumns: columns first .. first + c of out are src's, converted as Convert does; the others
// keep their values; columns reaching past out are refused.
TEST_P(CpuOpsTest, WriteColumns) {
  const int64_t m = 4, c = 3, n = 9, first = 5;
  const Tensor src = rng_.Floats({m, c}, 3.0f);
  for (DType dout : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dout));
    const Tensor before = rng_.Floats({m, n}, 3.0f);
    Tensor out = Tensor::Zeros(dout, {m, n}), kept = Tensor::Zeros(dout, {m, n});
    for (Tensor* t : {&out, &kept}) {
      ASSERT_TRUE(
          (dout == DType::kF32 ? backend_->Copy(before, *t) : backend_->Convert(before, *t)).ok());
    }
    ASSERT_TRUE(backend_->WriteColumns(src, first, out).ok());
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = r * n + j;
        const bool written = j >= first && j < first + c;
        const float v = src.data<float>()[r * c + (written ? j - first : 0)];
        if (dout == DType::kF32) {
          ASSERT_EQ(out.data<float>()[i], written ? v : kept.data<float>()[i]) << r << ", " << j;
        } else {
          ASSERT_EQ(out.data<uint16_t>()[i], written ? FloatToBf16(v) : kept.data<uint16_t>()[i])
              << r << ", " << j;
        }
      }
    }
  }
  Tensor narrow = Tensor::Zeros(DType::kF32, {m, first + c - 1});
  const absl::Status bad = backend_->WriteColumns(src, first, narrow);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_NE(bad.message().find("WriteColumns"), std::string::npos) << bad;
  EXPECT_EQ(backend_->WriteColumns(src, -1, narrow).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(CpuOpsTest, Embedding) {
  struct Case {
    int vocab;
    int64_t width, n;
  };
  for (const Case c : {Case{1, 1, 1}, Case{37, 19, 23}, Case{512, 64, 300}}) {
    const Tensor table = rng_.Floats({c.vocab, c.width});
    Tensor ids = rng_.Ids(c.n, c.vocab);
    ids.data<int32_t>()[0] = c.vocab - 1;  // the last row is reachable
    Tensor out = Tensor::Zeros(DType::kF32, {c.n, c.width});
    ASSERT_TRUE(backend_->Embedding(table, ids, out).ok());
    std::vector<float> ref(out.numel());
    ref::Embedding(table.data<float>(), c.vocab, c.width, ids.data<int32_t>(), c.n, ref.data());
    EXPECT_LE(RelError(out, ref), kExactBound) << c.vocab << "x" << c.width;
    EXPECT_EQ(std::memcmp(out.data<float>(), table.data<float>() + (c.vocab - 1) * c.width,
                          c.width * sizeof(float)),
              0);
  }
}

TEST_P(CpuOpsTest, Nll) {
  struct Case {
    int64_t rows;
    int vocab;
  };
  for (const Case c : {Case{1, 1}, Case{1, 2}, Case{9, 513}, Case{64, 4096}}) {
    const Tensor logits = rng_.Floats({c.rows, c.vocab}, 8.0f);
    const Tensor targets = rng_.Ids(c.rows, c.vocab);
    Tensor nll = Tensor::Zeros(DType::kF32, {c.rows});
    ASSERT_TRUE(backend_->Nll(logits, targets, nll).ok());
    std::vector<float> ref(c.rows);
    ref::Nll(logits.data<float>(), c.rows, c.vocab, targets.data<int32_t>(), ref.data());
    EXPECT_LE(RelError(nll, ref), kElementwiseBound) << c.rows << "x" << c.vocab;
  }
}

// Equal logits give log(vocab) whatever their size: the log-sum-exp must subtract the maximum.
TEST_P(CpuOpsTest, NllIsStableForLargeLogits) {
  const int vocab = 1000;
  Tensor logits = Tensor::Zeros(DType::kF32, {2, vocab});
  for (int i = 0; i < 2 * vocab; ++i) logits.data<float>()[i] = i < vocab ? 1e4f : -1e4f;
  Tensor nll = Tensor::Zeros(DType::kF32, {2});
  ASSERT_TRUE(backend_->Nll(logits, I32({0, vocab - 1}), nll).ok());
  EXPECT_NEAR(nll.data<float>()[0], std::log(1000.0), 1e-5);
  EXPECT_NEAR(nll.data<float>()[1], std::log(1000.0), 1e-5);
}

TEST_P(CpuOpsTest, AccumulateGram) {
  struct Case {
    int64_t n, k;
  };
  for (const Case c : {Case{1, 1}, Case{9, 7}, Case{65, 33}, Case{3, 130}, Case{0, 5}}) {
    const Tensor x = rng_.Floats({c.n, c.k});
    // Start from a symmetric matrix, as accumulated Hessians are.
    Tensor h0 = rng_.Floats({c.k, c.k});
    for (int64_t a = 0; a < c.k; ++a) {
      for (int64_t b = 0; b < a; ++b) h0.data<float>()[a * c.k + b] = h0.data<float>()[b * c.k + a];
    }
    Tensor h = h0.Clone();
    ASSERT_TRUE(backend_->AccumulateGram(x, h).ok());
    std::vector<float> ref = Values(h0);
    ref::AccumulateGram(x.data<float>(), c.n, c.k, ref.data(), bf16());
    EXPECT_LE(RelError(h, ref), kGramBound) << c.n << "x" << c.k;
    for (int64_t a = 0; a < c.k; ++a) {
      for (int64_t b = 0; b < a; ++b) {
        ASSERT_EQ(h.data<float>()[a * c.k + b], h.data<float>()[b * c.k + a]) << a << "," << b;
      }
    }
  }
}

TEST_P(CpuOpsTest, ActQuant) {
  struct Case {
    int64_t rows, width;
  };
  for (const Case c : {Case{1, 1}, Case{5, 7}, Case{3, 129}, Case{64, 384}}) {
    Tensor x = rng_.Floats({c.rows, c.width}, 4.0f);
    if (c.rows > 1) std::fill(x.data<float>(), x.data<float>() + c.width, 0.0f);  // s = 0 row
    for (int bits = 2; bits <= 8; ++bits) {
      Tensor out = rng_.Floats(x.shape());
      ASSERT_TRUE(backend_->ActQuant(x, bits, out).ok());
      std::vector<float> ref(x.numel());
      ref::ActQuant(x.data<float>(), c.rows, c.width, bits, ref.data());
      EXPECT_LE(RelError(out, ref), kExactBound) << c.rows << "x" << c.width << " bits=" << bits;
      // out may alias x.
      Tensor inplace = x.Clone();
      ASSERT_TRUE(backend_->ActQuant(inplace, bits, inplace).ok());
      EXPECT_LE(RelError(inplace, ref), kExactBound)
          << c.rows << "x" << c.width << " bits=" << bits;
    }
  }
}

// ActQuantLinear in f32: ref::ActQuantLinear's bits when the fp64 sums are exact (weights that
// are fp16 scales times small integers), with and without bias and accumulation; near the plain
// product of ActQuant(x) and w otherwise (one fp32 rounding of each x̂ and of the result). In bf16:
// ActQuant, then Linear, bit for bit.
TEST_P(CpuOpsTest, ActQuantLinear) {
  for (auto [m, n, k] : {std::array<int64_t, 3>{1, 1, 1}, {5, 7, 129}, {33, 64, 384}}) {
    for (int bits : {4, 8}) {
      SCOPED_TRACE(::testing::Message() << m << "x" << n << "x" << k << " bits " << bits);
      Tensor x = rng_.Floats({m, k}, 4.0f);
      if (m > 1) std::fill(x.data<float>(), x.data<float>() + k, 0.0f);  // s = 0 row
      Tensor w = Tensor::Zeros(DType::kF32, {n, k});
      for (int64_t i = 0; i < n * k; ++i) {
        const float scale = RoundToHalf(std::ldexp(1.0f + rng_.Uniform(0.5f), -4 - (i / k) % 5));
        w.data<float>()[i] = scale * static_cast<float>(static_cast<int>(i * 7 % 16) - 8);
      }
      const Tensor bias = rng_.Floats({n});
      const Tensor start = rng_.Floats({m, n});
      for (bool with_bias : {false, true}) {
        for (bool accumulate : {false, true}) {
          Tensor y = start.Clone();
          ASSERT_TRUE(
              backend_->ActQuantLinear(x, bits, w, with_bias ? &bias : nullptr, y, accumulate)
                  .ok());
          Tensor want = start.Clone();
          if (bf16()) {
            Tensor xq = Tensor::Zeros(DType::kF32, {m, k});
            ASSERT_TRUE(backend_->ActQuant(x, bits, xq).ok());
            ASSERT_TRUE(
                backend_->Linear(xq, w, with_bias ? &bias : nullptr, want, accumulate).ok());
          } else {
            ref::ActQuantLinear(x.data<float>(), m, k, bits, w.data<float>(), n,
                                with_bias ? bias.data<float>() : nullptr, want.data<float>(),
                                accumulate);
          }
          EXPECT_EQ(Values(y), Values(want))
              << "bias " << with_bias << " accumulate " << accumulate;
        }
      }
      if (bf16()) continue;
      // Arbitrary fp32 weights: within one fp32 rounding of x̂ and of y of the double product.
      const Tensor wf = rng_.Floats({n, k});
      Tensor y = Tensor::Zeros(DType::kF32, {m, n});
      ASSERT_TRUE(backend_->ActQuantLinear(x, bits, wf, nullptr, y, false).ok());
      Tensor xq = Tensor::Zeros(DType::kF32, {m, k});
      ASSERT_TRUE(backend_->ActQuant(x, bits, xq).ok());
      for (int64_t t = 0; t < m; ++t) {
        for (int64_t o = 0; o < n; ++o) {
          double want = 0, magnitude = 0;
          for (int64_t c = 0; c < k; ++c) {
            const double p = double{xq.data<float>()[t * k + c]} * wf.data<float>()[o * k + c];
            want += p;
            magnitude += std::fabs(p);
          }
          EXPECT_LE(std::fabs(y.data<float>()[t * n + o] - want),
                    std::ldexp(1.0, -22) * magnitude + 1e-30)
              << t << "," << o;
        }
      }
    }
  }
}

// With max|x| = qmax the scale is exactly 1, so codes are x rounded half to even.
TEST_P(CpuOpsTest, ActQuantRoundsHalfToEven) {
  const Tensor x =
      Tensor::FromVector({3, 2.5f, -1.5f, 0.5f, -0.5f, 1.25f, 0, 0, 0, 0, 0, 0}, {2, 6});
  Tensor out = Tensor::Zeros(DType::kF32, {2, 6});
  ASSERT_TRUE(backend_->ActQuant(x, 3, out).ok());  // qmax 3
  EXPECT_EQ(Values(out), (std::vector<float>{3, 2, -2, 0, 0, 1, 0, 0, 0, 0, 0, 0}));
  const Tensor y = Tensor::FromVector({7, -6.5f, 5.5f, 0.5f}, {1, 4});
  Tensor y_out = Tensor::Zeros(DType::kF32, {1, 4});
  ASSERT_TRUE(backend_->ActQuant(y, 4, y_out).ok());  // qmax 7
  EXPECT_EQ(Values(y_out), (std::vector<float>{7, -6, 6, 0}));
}

TEST_P(CpuOpsTest, CopyAllocAndTransfers) {
  const Tensor src = rng_.Floats({5, 7});
  Tensor dst = Tensor::Zeros(DType::kF32, {35});  // same element count, other shape
  ASSERT_TRUE(backend_->Copy(src, dst).ok());
  EXPECT_LE(RelError(dst, Values(src)), kExactBound);
  Tensor ids_dst = Tensor::Zeros(DType::kI32, {3});
  ASSERT_TRUE(backend_->Copy(I32({4, -5, 6}), ids_dst).ok());
  EXPECT_EQ(ids_dst.data<int32_t>()[1], -5);

  auto zeros = backend_->Alloc(DType::kF32, {3, 1});
  ASSERT_TRUE(zeros.ok());
  EXPECT_EQ(zeros->shape(), (Shape{3, 1}));
  EXPECT_EQ(Values(*zeros), (std::vector<float>{0, 0, 0}));
  auto device = backend_->ToDevice(src);
  ASSERT_TRUE(device.ok());
  device->data<float>()[0] += 1.0f;  // a deep copy: the source is untouched
  EXPECT_NE(device->data<float>()[0], src.data<float>()[0]);
  auto host = backend_->ToHost(*device);
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(Values(*host), Values(*device));
  EXPECT_TRUE(backend_->Synchronize().ok());
}

// Same inputs, same thread count: bit-identical results, run after run.
TEST_P(CpuOpsTest, RepeatedCallsAreBitIdentical) {
  const Tensor x = rng_.Floats({37, 96});
  const Tensor w = rng_.Floats({53, 96});
  const AttentionShape s{2, 19, 19, 6, 2, 16, 0};
  const Tensor q = rng_.Floats({38, 96});
  const Tensor kv = rng_.Floats({38, 32});
  std::vector<float> first_linear, first_attention, first_gram;
  for (int run = 0; run < 3; ++run) {
    Tensor y = Tensor::Zeros(DType::kF32, {37, 53});
    Tensor out = Tensor::Zeros(DType::kF32, {38, 96});
    Tensor h = Tensor::Zeros(DType::kF32, {96, 96});
    ASSERT_TRUE(backend_->Linear(x, w, nullptr, y, false).ok());
    ASSERT_TRUE(backend_->Attention(q, kv, kv, s, out).ok());
    ASSERT_TRUE(backend_->AccumulateGram(x, h).ok());
    if (run == 0) {
      first_linear = Values(y);
      first_attention = Values(out);
      first_gram = Values(h);
    } else {
      EXPECT_EQ(Values(y), first_linear);
      EXPECT_EQ(Values(out), first_attention);
      EXPECT_EQ(Values(h), first_gram);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(ComputeDTypes, CpuOpsTest,
                         ::testing::Values(ComputeDType::kF32, ComputeDType::kBF16),
                         [](const ::testing::TestParamInfo<ComputeDType>& info) {
                           return info.param == ComputeDType::kBF16 ? "BF16" : "F32";
                         });

// The bf16 backend really rounds its GEMM operands: it stays within the bound of the rounding
// reference and far outside it of the fp32 one, so the parity tests above can tell them apart.
TEST(CpuBf16Test, GemmOperandsAreRoundedToBf16) {
  auto backend = MakeCpuBackend(ComputeDType::kBF16);
  Random rng(7);
  const int64_t m = 9, n = 21, k = 77;
  const Tensor x = rng.Floats({m, k});
  const Tensor w = rng.Floats({n, k});
  Tensor y = Tensor::Zeros(DType::kF32, {m, n});
  ASSERT_TRUE(backend->Linear(x, w, nullptr, y, false).ok());
  std::vector<float> fp32_ref(m * n);
  ref::Linear(x.data<float>(), w.data<float>(), nullptr, fp32_ref.data(), m, n, k, false, false);
  EXPECT_GT(RelError(y, fp32_ref), 10 * kLinearBound);

  Tensor h = Tensor::Zeros(DType::kF32, {k, k});
  ASSERT_TRUE(backend->AccumulateGram(x, h).ok());
  std::vector<float> gram_ref(k * k);
  ref::AccumulateGram(x.data<float>(), m, k, gram_ref.data(), false);
  EXPECT_GT(RelError(h, gram_ref), 10 * kGramBound);

  const AttentionShape s{1, 6, 6, 2, 1, 32, 0};
  const Tensor q = rng.Floats({6, 64}, 2.0f);
  const Tensor kv = rng.Floats({6, 32}, 2.0f);
  Tensor out = Tensor::Zeros(DType::kF32, {6, 64});
  ASSERT_TRUE(backend->Attention(q, kv, kv, s, out).ok());
  std::vector<float> attn_ref(out.numel());
  ref::Attention(q.data<float>(), kv.data<float>(), kv.data<float>(), s, attn_ref.data(), false);
  EXPECT_GT(RelError(out, attn_ref), 10 * kAttentionBound);
}

class CpuOpsErrorTest : public ::testing::Test {
 protected:
  void SetUp() override { backend_ = MakeCpuBackend(ComputeDType::kF32); }

  // `status` is InvalidArgument and its message mentions `what`.
  static void ExpectInvalid(const absl::Status& status, const std::string& what) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(what));
  }
  static Tensor F32(const Shape& shape) { return Tensor::Zeros(DType::kF32, shape); }

  std::unique_ptr<Backend> backend_;
};

TEST_F(CpuOpsErrorTest, LinearShapesAndDTypes) {
  Tensor y = F32({3, 5});
  ExpectInvalid(backend_->Linear(F32({3, 4}), F32({5, 6}), nullptr, y, false), "do not match");
  ExpectInvalid(backend_->Linear(F32({12}), F32({5, 4}), nullptr, y, false), "do not match");
  Tensor bad_y = F32({5, 3});
  ExpectInvalid(backend_->Linear(F32({3, 4}), F32({5, 4}), nullptr, bad_y, false), "y has shape");
  const Tensor bad_bias = F32({4});
  ExpectInvalid(backend_->Linear(F32({3, 4}), F32({5, 4}), &bad_bias, y, false), "bias");
  ExpectInvalid(
      backend_->Linear(Tensor::Zeros(DType::kI32, {3, 4}), F32({5, 4}), nullptr, y, false),
      "x must be a host F32 tensor");
  ExpectInvalid(
      backend_->Linear(F32({3, 4}), Tensor::Zeros(DType::kF16, {5, 4}), nullptr, y, false),
      "w must be a host F32 tensor");
  ExpectInvalid(backend_->Linear(Tensor(), F32({5, 4}), nullptr, y, false), "x must be");
}

TEST_F(CpuOpsErrorTest, RmsNormRopeAndAttentionShapes) {
  Tensor y = F32({2, 8});
  ExpectInvalid(backend_->RmsNorm(F32({2, 8}), F32({7}), 1e-5f, y), "weight has shape");
  Tensor bad_y = F32({2, 7});
  ExpectInvalid(backend_->RmsNorm(F32({2, 8}), F32({8}), 1e-5f, bad_y), "y has shape");

  Tensor x = F32({4, 12});
  ExpectInvalid(backend_->Rope(x, RopeShape{4, 0, 5, 10000.0}), "Rope");  // odd head_dim
  ExpectInvalid(backend_->Rope(x, RopeShape{4, 0, 8, 10000.0}), "Rope");  // 12 % 8 != 0
  ExpectInvalid(backend_->Rope(x, RopeShape{0, 0, 4, 10000.0}), "Rope");  // no sequence

  const AttentionShape ok{1, 2, 4, 4, 2, 4, 2};
  Tensor out = F32({2, 16});
  ASSERT_TRUE(backend_->Attention(F32({2, 16}), F32({4, 8}), F32({4, 8}), ok, out).ok());
  AttentionShape past = ok;
  past.q_offset = 3;  // 3 + 2 > kv_len
  ExpectInvalid(backend_->Attention(F32({2, 16}), F32({4, 8}), F32({4, 8}), past, out),
                "Attention");
  AttentionShape groups = ok;
  groups.num_kv_heads = 3;  // does not divide 4 heads
  ExpectInvalid(backend_->Attention(F32({2, 16}), F32({4, 12}), F32({4, 12}), groups, out),
                "Attention");
  AttentionShape no_kv = ok;
  no_kv.num_kv_heads = 0;
  ExpectInvalid(backend_->Attention(F32({2, 16}), F32({4, 8}), F32({4, 8}), no_kv, out),
                "Attention");
  ExpectInvalid(backend_->Attention(F32({2, 16}), F32({3, 8}), F32({4, 8}), ok, out),
                "k has shape");
  ExpectInvalid(backend_->Attention(F32({2, 16}), F32({4, 8}), F32({4, 16}), ok, out),
                "v has shape");
  Tensor bad_out = F32({2, 8});
  ExpectInvalid(backend_->Attention(F32({2, 16}), F32({4, 8}), F32({4, 8}), ok, bad_out),
                "out has shape");
}

TEST_F(CpuOpsErrorTest, ElementwiseShapes) {
  Tensor out = F32({3, 4});
  ExpectInvalid(backend_->SiluMul(F32({3, 4}), F32({4, 3}), out), "up has shape");
  Tensor bad_out = F32({12});
  ExpectInvalid(backend_->SiluMul(F32({3, 4}), F32({3, 4}), bad_out), "out has shape");
  Tensor y = F32({3, 5});
  ExpectInvalid(backend_->Add(F32({3, 4}), y), "y has shape");
  Tensor h = F32({4, 5});
  ExpectInvalid(backend_->AccumulateGram(F32({3, 4}), h), "h has shape");
  Tensor dst = F32({11});
  ExpectInvalid(backend_->Copy(F32({3, 4}), dst), "Copy");
  Tensor ids = Tensor::Zeros(DType::kI32, {12});
  ExpectInvalid(backend_->Copy(F32({3, 4}), ids), "Copy");
}

TEST_F(CpuOpsErrorTest, ActQuantBitsAndShapes) {
  Tensor out = F32({2, 3});
  ExpectInvalid(backend_->ActQuant(F32({2, 3}), 1, out), "bits must be 2..8, got 1");
  ExpectInvalid(backend_->ActQuant(F32({2, 3}), 9, out), "bits must be 2..8, got 9");
  Tensor bad_out = F32({3, 2});
  ExpectInvalid(backend_->ActQuant(F32({2, 3}), 8, bad_out), "out has shape");
  Tensor half_out = Tensor::Zeros(DType::kF16, {2, 3});
  ExpectInvalid(backend_->ActQuant(F32({2, 3}), 8, half_out), "out must be a host F32 tensor");
}

TEST_F(CpuOpsErrorTest, ActQuantLinearBitsAndShapes) {
  Tensor y = F32({2, 3});
  const Tensor x = F32({2, 4}), w = F32({3, 4});
  ExpectInvalid(backend_->ActQuantLinear(x, 1, w, nullptr, y, false), "bits must be 2..8, got 1");
  ExpectInvalid(backend_->ActQuantLinear(x, 8, F32({3, 5}), nullptr, y, false), "do not match");
  Tensor bad_y = F32({3, 2});
  ExpectInvalid(backend_->ActQuantLinear(x, 8, w, nullptr, bad_y, false), "expected F32 [2, 3]");
  const Tensor bad_bias = F32({2});
  ExpectInvalid(backend_->ActQuantLinear(x, 8, w, &bad_bias, y, false), "expected F32 [3]");
  const Tensor half_x = Tensor::Zeros(DType::kF16, {2, 4});
  ExpectInvalid(backend_->ActQuantLinear(half_x, 8, w, nullptr, y, false),
                "x must be a host F32 tensor");
}

TEST_F(CpuOpsErrorTest, EmbeddingRejectsOutOfRangeIds) {
  const Tensor table = F32({10, 4});
  Tensor out = F32({3, 4});
  ASSERT_TRUE(backend_->Embedding(table, I32({0, 9, 5}), out).ok());
  ExpectInvalid(backend_->Embedding(table, I32({0, 10, 5}), out), "token id 10");
  ExpectInvalid(backend_->Embedding(table, I32({-1, 1, 2}), out), "token id -1");
  ExpectInvalid(backend_->Embedding(table, F32({3}), out), "ids must be I32");
  Tensor bad_out = F32({3, 5});
  ExpectInvalid(backend_->Embedding(table, I32({0, 1, 2}), bad_out), "out has shape");
}

TEST_F(CpuOpsErrorTest, NllRejectsOutOfRangeTargets) {
  const Tensor logits = F32({2, 6});
  Tensor nll = F32({2});
  ASSERT_TRUE(backend_->Nll(logits, I32({0, 5}), nll).ok());
  ExpectInvalid(backend_->Nll(logits, I32({0, 6}), nll), "target outside the vocabulary");
  ExpectInvalid(backend_->Nll(logits, I32({-1, 0}), nll), "target outside the vocabulary");
  ExpectInvalid(backend_->Nll(logits, I32({0}), nll), "one id per row");
  ExpectInvalid(backend_->Nll(logits, F32({2}), nll), "targets must be I32");
  Tensor bad_nll = F32({3});
  ExpectInvalid(backend_->Nll(logits, I32({0, 1}), bad_nll), "nll has shape");
}

TEST(BackendFactoryTest, DeviceNamesAndOptions) {
  BackendOptions bad_device;
  bad_device.device = "tpu";
  auto b = CreateBackend(bad_device);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("tpu"));
  BackendOptions bad_threads;
  bad_threads.threads = -1;
  EXPECT_FALSE(bad_threads.Validate().ok());
  BackendOptions bad_index;
  bad_index.device = "cuda:x";
  EXPECT_FALSE(CreateBackend(bad_index).ok());
  if (!CudaAvailable()) {
    BackendOptions cuda;
    cuda.device = "cuda";
    EXPECT_FALSE(CreateBackend(cuda).ok());
  }
}

// The solver ops run their references (quant_ref.h, ref_ops.h): the contract is bit-identity, so
// every comparison below is exact.
class CpuSolverOpsTest : public ::testing::Test {
 protected:
  // A Gram matrix XᵀX of `tokens` random rows over n channels, with channel `dead` (if >= 0) zero
  // in every row (H_jj = 0).
  Tensor Gram(int64_t n, int64_t tokens, int64_t dead) {
    Tensor x = rng_.Floats({tokens, n});
    if (dead >= 0) {
      for (int64_t t = 0; t < tokens; ++t) x.data<float>()[t * n + dead] = 0.0f;
    }
    Tensor h = Tensor::Zeros(DType::kF32, {n, n});
    ref::AccumulateGram(x.data<float>(), tokens, n, h.data<float>(), false);
    return h;
  }

  std::unique_ptr<Backend> be_ = MakeCpuBackend(ComputeDType::kF32);
  Random rng_{31337};
};

template <typename T>
std::vector<T> Elements(const Tensor& t) {
  return std::vector<T>(t.data<T>(), t.data<T>() + t.numel());
}

// The backend's tensors hold exactly the reference's result (codes as U8).
void ExpectSameQuantized(const QuantizedTensors& got, const QuantizedLinear& want) {
  EXPECT_EQ(got.d_out, want.d_out);
  EXPECT_EQ(got.d_in, want.d_in);
  EXPECT_EQ(got.group_size, want.group_size);
  EXPECT_EQ(got.n_groups, want.n_groups);
  EXPECT_EQ(got.codes.dtype(), DType::kU8);
  EXPECT_EQ(Elements<uint8_t>(got.codes), want.codes);
  EXPECT_EQ(got.scales.shape(), (Shape{want.n_groups, want.d_out}));
  EXPECT_EQ(Elements<float>(got.scales), want.scales);
  EXPECT_EQ(Elements<int32_t>(got.zeros), want.zeros);
  EXPECT_EQ(Elements<float>(got.dequantized), want.Dequantized());
  EXPECT_EQ(got.g_idx, want.g_idx);
  EXPECT_EQ(got.perm, want.perm);
}

TEST_F(CpuSolverOpsTest, QuantizeRtnIsTheReference) {
  struct Case {
    int64_t d_out, d_in;
    QuantSpec spec;
  };
  for (const Case& c : {Case{1, 1, {4, 128, false, GridKind::kUniform}},
                        Case{3, 7, {3, 2, false, GridKind::kUniform}},
                        Case{13, 33, {4, -1, true, GridKind::kUniform}},
                        Case{5, 130, {4, 128, false, GridKind::kUniform}},
                        Case{9, 17, {2, 5, false, GridKind::kCuberoot}},
                        Case{1, 64, {8, 16, true, GridKind::kCuberoot}},
                        Case{11, 70, {2, 32, false, GridKind::kBalanced}},
                        Case{4, 33, {2, -1, true, GridKind::kBalanced}}}) {
    SCOPED_TRACE(testing::Message() << c.d_out << "x" << c.d_in << " g" << c.spec.group_size);
    const Tensor w = rng_.Floats({c.d_out, c.d_in});
    auto got = be_->QuantizeRtn(w, c.spec);
    ASSERT_TRUE(got.ok()) << got.status();
    auto want = ref::QuantizeRtn(w.data<float>(), c.d_out, c.d_in, c.spec);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectSameQuantized(*got, *want);
  }
}

TEST_F(CpuSolverOpsTest, GptqIsTheReference) {
  struct Case {
    int64_t d_out, n, dead;
    QuantSpec spec;
    int block_size;
    bool act_order;
    std::vector<int32_t> outliers;
  };
  const std::vector<Case> cases = {
      {1, 1, -1, {4, 128, false, GridKind::kUniform}, 128, false, {}},
      {3, 5, 2, {4, -1, false, GridKind::kUniform}, 2, false, {}},
      {7, 33, -1, {3, 8, true, GridKind::kUniform}, 16, true, {}},
      {17, 65, 40, {4, -1, false, GridKind::kUniform}, 128, true, {3, 3, 17}},
      {5, 40, -1, {4, 32, false, GridKind::kCuberoot}, 12, false, {39}},
      {9, 70, 3, {2, 32, false, GridKind::kBalanced}, 16, true, {}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << c.d_out << "x" << c.n << " g" << c.spec.group_size << " bs"
                                    << c.block_size << " act_order " << c.act_order);
    const Tensor h = Gram(c.n, 2 * c.n + 3, c.dead);
    const Tensor w = rng_.Floats({c.d_out, c.n});
    GptqSolveOptions options;
    options.block_size = c.block_size;
    options.act_order = c.act_order;
    options.outlier_columns = c.outliers;
    auto factor = be_->GptqFactorize(h, options);
    ASSERT_TRUE(factor.ok()) << factor.status();
    std::vector<float> u(static_cast<size_t>(c.n * c.n));
    GptqFactor want_factor;
    ASSERT_TRUE(ref::GptqFactorize(h.data<float>(), c.n, options, u.data(), &want_factor).ok());
    EXPECT_EQ(Elements<float>(factor->u), u);
    EXPECT_EQ(factor->perm, want_factor.perm);
    EXPECT_EQ(factor->removed, want_factor.removed);
    EXPECT_EQ(factor->dead_columns, c.dead >= 0 ? 1 : 0);
    EXPECT_EQ(factor->outlier_columns, want_factor.outlier_columns);
    EXPECT_EQ(factor->damp_used, want_factor.damp_used);
    auto got = be_->GptqSolve(w, *factor, c.spec, c.block_size, false);
    ASSERT_TRUE(got.ok()) << got.status();
    auto want =
        ref::GptqSolve(w.data<float>(), c.d_out, want_factor, u.data(), c.spec, c.block_size);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectSameQuantized(*got, *want);
    // Removed columns quantize to exactly 0.
    for (int32_t j : c.outliers) EXPECT_EQ(want->Dequantized()[j], 0.0f);

    // Recording W̃ changes nothing else, equals the reference's bit for bit, and rounds to the
    // codes on the solve's own group parameters (retraining's frozen base).
    auto recorded = be_->GptqSolve(w, *factor, c.spec, c.block_size, /*record_pre_round=*/true);
    ASSERT_TRUE(recorded.ok()) << recorded.status();
    ExpectSameQuantized(*recorded, *want);
    EXPECT_FALSE(got->pre_round.defined());
    ASSERT_EQ(recorded->pre_round.shape(), (Shape{c.d_out, c.n}));
    std::vector<float> want_pre;
    ASSERT_TRUE(ref::GptqSolve(w.data<float>(), c.d_out, want_factor, u.data(), c.spec,
                               c.block_size, &want_pre)
                    .ok());
    EXPECT_EQ(Elements<float>(recorded->pre_round), want_pre);
    const float* pre = recorded->pre_round.data<float>();
    const uint8_t* codes = recorded->codes.data<uint8_t>();
    int mismatches = 0;
    for (int64_t o = 0; o < c.d_out; ++o) {
      for (int64_t j = 0; j < c.n; ++j) {
        const int32_t grp = want->g_idx[j];
        const GroupParams gp{want->scales[grp * c.d_out + o], want->zeros[grp * c.d_out + o]};
        if (QuantizeCode(pre[o * c.n + j], gp, c.spec) != codes[o * c.n + j]) ++mismatches;
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST_F(CpuSolverOpsTest, OutputErrorIsTheReference) {
  for (const auto& [d_out, d_in] : {std::pair<int64_t, int64_t>{1, 1}, {5, 3}, {70, 33}}) {
    const Tensor w = rng_.Floats({d_out, d_in});
    const Tensor w_hat = rng_.Floats({d_out, d_in});
    const Tensor gram = Gram(d_in, d_in + 2, -1);
    auto got = be_->OutputError(w, w_hat, gram);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, ref::OutputError(w.data<float>(), w_hat.data<float>(), gram.data<float>(),
                                     d_out, d_in));
    EXPECT_GT(*got, 0.0);
    // Without w_hat: the norm ||W Xᵀ||, the same bits as against an explicit zero matrix.
    const std::vector<float> zeros(static_cast<size_t>(d_out * d_in), 0.0f);
    auto norm = be_->OutputError(w, Tensor(), gram);
    ASSERT_TRUE(norm.ok()) << norm.status();
    EXPECT_EQ(*norm,
              ref::OutputError(w.data<float>(), zeros.data(), gram.data<float>(), d_out, d_in));
    auto none = be_->OutputError(w, w, gram);
    ASSERT_TRUE(none.ok());
    EXPECT_EQ(*none, 0.0);
  }
}

TEST_F(CpuSolverOpsTest, SmoothingOpsAreTheReference) {
  for (const auto& [rows, width, seq_len] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 0},
                                             {1, 1, 1},
                                             {6, 5, 3},
                                             {12, 33, 4},
                                             {7, 3, 0}}) {
    SCOPED_TRACE(testing::Message() << rows << "x" << width << " seq_len " << seq_len);
    const Tensor x = rng_.Floats({rows, width}, 3.0f);
    auto stats = be_->ChannelAbsStats(x, seq_len);
    ASSERT_TRUE(stats.ok()) << stats.status();
    // Column maxima and sums, BOS rows (r % seq_len == 0) skipped, sums in row order.
    std::vector<float> max_abs(static_cast<size_t>(width), 0.0f);
    std::vector<double> sum_abs(static_cast<size_t>(width), 0.0);
    int64_t tokens = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (seq_len > 0 && r % seq_len == 0) continue;
      ++tokens;
      for (int64_t j = 0; j < width; ++j) {
        const float v = std::fabs(x.data<float>()[r * width + j]);
        max_abs[j] = std::max(max_abs[j], v);
        sum_abs[j] += v;
      }
    }
    EXPECT_EQ(stats->max_abs, max_abs);
    EXPECT_EQ(stats->sum_abs, sum_abs);
    EXPECT_EQ(stats->tokens, tokens);
    EXPECT_EQ(stats->skipped, rows - tokens);
    EXPECT_EQ(stats->first_bad_column, -1);

    const Tensor m_cols = rng_.Floats({width}, 2.0f);
    const Tensor m_rows = rng_.Floats({rows}, 2.0f);
    Tensor scaled = x.Clone();
    ASSERT_TRUE(be_->ScaleColumns(scaled, m_cols).ok());
    Tensor divided = x.Clone();
    ASSERT_TRUE(be_->DivideRows(divided, m_rows).ok());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < width; ++j) {
        const float v = x.data<float>()[r * width + j];
        ASSERT_EQ(scaled.data<float>()[r * width + j], v * m_cols.data<float>()[j]);
        ASSERT_EQ(divided.data<float>()[r * width + j], v / m_rows.data<float>()[r]);
      }
    }
  }
  // A vector divides as rows of one (a bias).
  Tensor bias = Tensor::FromVector({6, 3, -1}, {3});
  ASSERT_TRUE(be_->DivideRows(bias, Tensor::FromVector({2, 3, 4}, {3})).ok());
  EXPECT_EQ(Values(bias), (std::vector<float>{3, 1, -0.25f}));
  // A non-finite value is found in any row, BOS included; the lowest such column is named.
  Tensor bad = rng_.Floats({4, 6});
  bad.data<float>()[0 * 6 + 4] = NAN;
  bad.data<float>()[3 * 6 + 2] = INFINITY;
  auto found = be_->ChannelAbsStats(bad, 2);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->first_bad_column, 2);
}

TEST_F(CpuSolverOpsTest, BadInputsAreInvalidArgument) {
  const Tensor w = rng_.Floats({4, 6});
  const Tensor h = Gram(6, 10, -1);
  auto expect_invalid = [](const absl::Status& s, const std::string& text) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(text));
  };
  expect_invalid(be_->GptqFactorize(rng_.Floats({4, 6}), {}).status(), "not square");
  Tensor nan_h = h.Clone();
  nan_h.data<float>()[1 * 6 + 3] = NAN;
  expect_invalid(be_->GptqFactorize(nan_h, {}).status(), "hessian[1, 3] is nan (not finite)");
  GptqSolveOptions out_of_range;
  out_of_range.outlier_columns = {6};
  expect_invalid(be_->GptqFactorize(h, out_of_range).status(), "outlier column 6");
  GptqSolveOptions negative_damp;
  negative_damp.damp = -1;
  expect_invalid(be_->GptqFactorize(h, negative_damp).status(), "gptq.damp");
  auto factor = be_->GptqFactorize(h, {});
  ASSERT_TRUE(factor.ok());
  expect_invalid(be_->GptqSolve(rng_.Floats({4, 5}), *factor, {}, 128, false).status(), "factor");
  expect_invalid(be_->GptqSolve(w, *factor, {}, 0, false).status(), "gptq.block_size");
  expect_invalid(be_->GptqSolve(w, *factor, QuantSpec{9, 128}, 128, false).status(),
                 "weights.bits");
  Tensor nan_w = w.Clone();
  nan_w.data<float>()[2 * 6 + 5] = INFINITY;
  expect_invalid(be_->GptqSolve(nan_w, *factor, {}, 128, false).status(), "weight[2, 5] is inf");
  expect_invalid(be_->QuantizeRtn(nan_w, {}).status(), "weight[2, 5] is inf (not finite)");
  expect_invalid(be_->QuantizeRtn(rng_.Floats({6}), {}).status(), "rank 2");
  expect_invalid(be_->OutputError(w, rng_.Floats({4, 5}), h).status(), "w_hat has shape");
  expect_invalid(be_->OutputError(w, Tensor(), rng_.Floats({5, 5})).status(), "gram has shape");
  expect_invalid(be_->ChannelAbsStats(w, 3).status(), "whole samples");
  Tensor wm = w.Clone();
  expect_invalid(be_->ScaleColumns(wm, rng_.Floats({4})), "m has shape");
  expect_invalid(be_->DivideRows(wm, rng_.Floats({6})), "m has shape");
  // An indefinite Hessian without damping cannot be factored: FailedPrecondition.
  GptqSolveOptions no_damp;
  no_damp.damp = 0;
  auto singular = be_->GptqFactorize(Tensor::FromVector({1, 2, 2, 1}, {2, 2}), no_damp);
  EXPECT_EQ(singular.status().code(), absl::StatusCode::kFailedPrecondition);
}

// MemoryInUse counts the bytes of the live tensors the backend allocated; the peak stays until
// ResetPeakMemory.
TEST(CpuMemoryTest, CountsLiveTensors) {
  auto be = MakeCpuBackend(ComputeDType::kF32);
  const int64_t base = be->MemoryInUse();
  EXPECT_GE(base, 0);
  EXPECT_GE(be->PeakMemoryInUse(), base);
  constexpr int64_t kBytes = 1000 * 257 * 4;
  int64_t held = 0;
  {
    auto a = be->Alloc(DType::kF32, {1000, 257});
    ASSERT_TRUE(a.ok());
    EXPECT_GE(be->MemoryInUse(), base + kBytes);
    auto copy = be->ToDevice(*a);
    auto host = be->AllocHost(DType::kU8, {kBytes});
    ASSERT_TRUE(copy.ok() && host.ok());
    held = be->MemoryInUse();
    EXPECT_GE(held, base + 3 * kBytes);
    Tensor alias = *copy;  // a view holds the same storage: counted once
    copy = Tensor();
    EXPECT_EQ(be->MemoryInUse(), held);
  }
  EXPECT_EQ(be->MemoryInUse(), base);
  EXPECT_GE(be->PeakMemoryInUse(), held);
  be->ResetPeakMemory();
  EXPECT_EQ(be->PeakMemoryInUse(), base);
  // Solver results count too, and a host tensor made elsewhere does not.
  const Tensor outside = Tensor::Zeros(DType::kF32, {64, 64});
  EXPECT_EQ(be->MemoryInUse(), base);
  {
    auto q = be->QuantizeRtn(outside, QuantSpec{});
    ASSERT_TRUE(q.ok());
    EXPECT_GE(be->MemoryInUse(), base + 64 * 64 * (1 + 4));
  }
  EXPECT_EQ(be->MemoryInUse(), base);
  EXPECT_GE(be->PeakMemoryInUse(), base + 64 * 64 * (1 + 4));
}

// Tensors allocated and freed from many threads at once leave the count where it started, and the
// peak covers what was live together.
TEST(CpuMemoryTest, CountsAcrossThreads) {
  auto be = MakeCpuBackend(ComputeDType::kF32);
  const int64_t base = be->MemoryInUse();
  constexpr int kThreads = 8;
  constexpr int64_t kBytes = 4096;
  std::vector<std::thread> threads;
  std::vector<Tensor> kept(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      for (int round = 0; round < 200; ++round) {
        auto t = be->Alloc(DType::kU8, {kBytes});
        QCAL_CHECK(t.ok());
      }
      auto t = be->Alloc(DType::kU8, {kBytes});
      QCAL_CHECK(t.ok());
      kept[i] = *t;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(be->MemoryInUse(), base + kThreads * kBytes);
  EXPECT_GE(be->PeakMemoryInUse(), base + kThreads * kBytes);
  kept.clear();
  EXPECT_EQ(be->MemoryInUse(), base);
}

}  // namespace
}  // namespace qcal::kernels
