// The CPU backend's backward ops against their scalar references (kernels/cpu/ref_grad.h, T =
// float), under both compute dtypes: with kBF16 Gemm and AttentionBackward are compared with the
// reference rounding the same operands. Odd sizes, size 1, and sizes large enough that ParallelFor
// splits the work; error is ‖out − ref‖ / ‖ref‖ against a named per-op bound. Bad shapes, ids and
// targets come back as InvalidArgument naming the op, and repeated calls give the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/ref_grad.h"
#include "kernels/cpu/ref_ops.h"
#include "tests/kernels/kernel_test_random.h"

namespace qcal::kernels {
namespace {

using ::testing::HasSubstr;

// Per-op bounds on ‖out − ref‖ / ‖ref‖.
//
// Gemm: OpenBLAS accumulates in fp32 in a blocked order, the reference in double: ~sqrt(k)·2^-24,
// about 1e-6 for k ≤ 257; under kBF16 both sides round the operands identically and bf16
// products are exact in fp32, so the same bound holds (skipping the rounding costs ~1e-3).
constexpr double kGemmBound = 1e-5;
// AttentionBackward: four fp32 GEMMs and an fp32 softmax against the double reference, and
// dS = P ⊙ (dP − Σ P dP) cancels where one key dominates; measured ≤ 4e-7 here, the bound of
// the other GEMM-based ops leaves room for BLAS kernels with other blockings.
constexpr double kAttentionBackwardBound = 1e-5;
// RopeBackward: the same fp32 angle table and the same two products and a sum per element as the
// reference; only contraction or evaluation order could differ, by an ulp.
constexpr double kRopeBound = 1e-6;
// The row-wise and elementwise ops run the reference itself on ranges of rows or elements
// (RmsNormBackward, SiluMulBackward, NllBackward, ScaleRowsByNorm, AccumulateSquares), and
// EmbeddingBackward sums each element in row order as the reference does: bit for bit.
constexpr double kExactBound = 0.0;

using kernel_tests::Random;

Tensor I32(const std::vector<int32_t>& values) {
  Tensor t = Tensor::Zeros(DType::kI32, {int64_t(values.size())});
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

Tensor Filled(const Shape& shape, float value) {
  Tensor t = Tensor::Zeros(DType::kF32, shape);
  std::fill(t.data<float>(), t.data<float>() + t.numel(), value);
  return t;
}

std::vector<float> Values(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

double RelError(const Tensor& out, const std::vector<float>& ref) {
  EXPECT_EQ(out.numel(), int64_t(ref.size()));
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < out.numel(); ++i) {
    const double d = double(out.data<float>()[i]) - ref[i];
    diff += d * d;
    norm += double(ref[i]) * ref[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Expects err <= bound and prints the measured error, so that the bounds can be judged.
void ExpectWithin(const std::string& what, double err, double bound) {
  EXPECT_LE(err, bound) << what;
  std::printf("  %-40s rel. error %.3g (bound %.0e)\n", what.c_str(), err, bound);
}

class CpuBackwardTest : public ::testing::TestWithParam<ComputeDType> {
 protected:
  void SetUp() override {
    BackendOptions options;
    options.threads = 2;
    options.compute_dtype = GetParam();
    auto backend = CreateBackend(options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = std::move(backend).value();
  }
  bool bf16() const { return GetParam() == ComputeDType::kBF16; }

  std::unique_ptr<Backend> backend_;
  Random rng_{20261203};
};

TEST_P(CpuBackwardTest, GemmMatchesReference) {
  struct Size {
    int64_t m, n, k;
  };
  for (const Size sz : {Size{5, 7, 13}, Size{1, 1, 1}, Size{33, 9, 257}}) {
    for (const bool trans_a : {false, true}) {
      for (const bool trans_b : {false, true}) {
        for (const float beta : {0.0f, 0.5f}) {
          const std::string what = testing::PrintToString(sz.m) + "x" +
                                   testing::PrintToString(sz.n) + "x" +
                                   testing::PrintToString(sz.k) + (trans_a ? " aT" : "") +
                                   (trans_b ? " bT" : "") + (beta != 0 ? " beta" : "");
          SCOPED_TRACE(what);
          const Tensor a = rng_.Floats(trans_a ? Shape{sz.k, sz.m} : Shape{sz.m, sz.k});
          const Tensor b = rng_.Floats(trans_b ? Shape{sz.n, sz.k} : Shape{sz.k, sz.n});
          // beta == 0 must ignore c, NaN included.
          Tensor c = beta == 0.0f ? Filled({sz.m, sz.n}, std::numeric_limits<float>::quiet_NaN())
                                  : rng_.Floats({sz.m, sz.n});
          std::vector<float> want = Values(c);
          ref::Gemm(a.data<float>(), trans_a, b.data<float>(), trans_b, sz.m, sz.n, sz.k, -0.75f,
                    beta, want.data(), bf16());
          std::vector<float> unrounded = Values(c);
          ref::Gemm(a.data<float>(), trans_a, b.data<float>(), trans_b, sz.m, sz.n, sz.k, -0.75f,
                    beta, unrounded.data(), false);
          ASSERT_TRUE(backend_->Gemm(a, trans_a, b, trans_b, -0.75f, beta, c).ok());
          const double err = RelError(c, want);
          EXPECT_LE(err, kGemmBound);
          if (sz.k == 257 && !trans_a && !trans_b) ExpectWithin("Gemm " + what, err, kGemmBound);
          // The rounding is really applied: without it the error would be ~1e-3.
          if (bf16() && sz.k > 1) {
            EXPECT_GT(RelError(c, unrounded), 1e-4);
          }
        }
      }
    }
  }
}

// GemmBatched: each item against the reference, with F32 or BF16 operands (BF16: the operands
// already rounded, so the same reference under either compute dtype once rounded) and an F32 or
// BF16 c (the F32 result rounded to nearest even: exactly the rounded reference item when the
// items are computed as Gemm computes them). Lower: the lower triangles only.
TEST_P(CpuBackwardTest, GemmBatchedMatchesReferencePerItem) {
  struct Size {
    int64_t batch, m, n, k;
  };
  for (const Size sz : {Size{3, 5, 7, 13}, Size{1, 1, 1, 1}, Size{4, 9, 9, 33}}) {
    for (const bool trans_b : {false, true}) {
      for (const DType operands : {DType::kF32, DType::kBF16}) {
        for (const DType out : {DType::kF32, DType::kBF16}) {
          const bool lower = sz.m == sz.n && trans_b;
          SCOPED_TRACE(testing::Message() << sz.batch << "x" << sz.m << "x" << sz.n << "x" << sz.k
                                          << (trans_b ? " bT" : "") << " " << DTypeName(operands)
                                          << " into " << DTypeName(out) << (lower ? " lower" : ""));
          Tensor a = rng_.Floats({sz.batch, sz.m, sz.k});
          Tensor b =
              rng_.Floats(trans_b ? Shape{sz.batch, sz.n, sz.k} : Shape{sz.batch, sz.k, sz.n});
          // The rounded values both sides use when the operands are BF16.
          const bool rounded = bf16() || operands == DType::kBF16;
          auto as_operand = [&](const Tensor& t) {
            if (operands == DType::kF32) return t;
            Tensor o = Tensor::Zeros(DType::kBF16, t.shape());
            EXPECT_TRUE(backend_->Convert(t, o).ok());
            return o;
          };
          const float beta = out == DType::kF32 ? 0.5f : 0.0f;
          Tensor c0 = rng_.Floats({sz.batch, sz.m, sz.n});
          Tensor c = out == DType::kF32 ? c0.Clone() : Tensor::Zeros(DType::kBF16, c0.shape());
          ASSERT_TRUE(backend_
                          ->GemmBatched(as_operand(a), false, as_operand(b), trans_b, -0.75f, beta,
                                        c, lower)
                          .ok());
          for (int64_t i = 0; i < sz.batch; ++i) {
            std::vector<float> want(c0.data<float>() + i * sz.m * sz.n,
                                    c0.data<float>() + (i + 1) * sz.m * sz.n);
            ref::Gemm(a.data<float>() + i * sz.m * sz.k, false, b.data<float>() + i * sz.n * sz.k,
                      trans_b, sz.m, sz.n, sz.k, -0.75f, beta, want.data(), rounded);
            Tensor got = Tensor::Zeros(DType::kF32, {sz.m, sz.n});
            const Tensor item = c.Reshape({sz.batch * sz.m, sz.n}).Rows(i * sz.m, (i + 1) * sz.m);
            ASSERT_TRUE(
                (out == DType::kF32 ? backend_->Copy(item, got) : backend_->Convert(item, got))
                    .ok());
            std::vector<float> got_v = Values(got);
            if (out == DType::kBF16) {
              for (float& v : want) v = RoundToBf16(v);
            }
            if (lower) {
              for (int64_t r = 0; r < sz.m; ++r) {
                for (int64_t col = r + 1; col < sz.n; ++col)
                  got_v[r * sz.n + col] = want[r * sz.n + col];
              }
            }
            Tensor g = Tensor::Zeros(DType::kF32, {sz.m, sz.n});
            std::copy(got_v.begin(), got_v.end(), g.data<float>());
            // A BF16 c may land one bf16 ulp away where the fp32 sum sits next to a rounding tie.
            EXPECT_LE(RelError(g, want), out == DType::kBF16 ? 4e-3 : kGemmBound);
          }
        }
      }
    }
  }
  // Mismatched batches and a BF16 c with beta are refused, naming the op.
  Tensor a = rng_.Floats({2, 3, 4}), b = rng_.Floats({3, 4, 5}), c = rng_.Floats({2, 3, 5});
  EXPECT_THAT(backend_->GemmBatched(a, false, b, false, 1.0f, 0.0f, c, false).message(),
              HasSubstr("GemmBatched"));
  Tensor cb = Tensor::Zeros(DType::kBF16, {2, 3, 5});
  b = rng_.Floats({2, 4, 5});
  EXPECT_EQ(backend_->GemmBatched(a, false, b, false, 1.0f, 1.0f, cb, false).code(),
            absl::StatusCode::kInvalidArgument);
}

// MirrorLower on a batch of squares mirrors each one.
TEST_P(CpuBackwardTest, MirrorLowerMirrorsEverySquareOfABatch) {
  Tensor c = rng_.Floats({3, 4, 4});
  const std::vector<float> before = Values(c);
  ASSERT_TRUE(backend_->MirrorLower(c).ok());
  for (int s = 0; s < 3; ++s) {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int lo = s * 16 + std::max(i, j) * 4 + std::min(i, j);
        EXPECT_EQ(c.data<float>()[s * 16 + i * 4 + j], before[lo]);
      }
    }
  }
  Tensor bad = rng_.Floats({3, 4, 5});
  EXPECT_EQ(backend_->MirrorLower(bad).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(CpuBackwardTest, GemmEmptyInnerDimensionScalesC) {
  const Tensor a = Tensor::Zeros(DType::kF32, {3, 0}), b = Tensor::Zeros(DType::kF32, {0, 2});
  Tensor c = Filled({3, 2}, 4.0f);
  ASSERT_TRUE(backend_->Gemm(a, false, b, false, 1.0f, 0.5f, c).ok());
  EXPECT_EQ(Values(c), std::vector<float>(6, 2.0f));
  c = Filled({3, 2}, std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE(backend_->Gemm(a, false, b, false, 1.0f, 0.0f, c).ok());
  EXPECT_EQ(Values(c), std::vector<float>(6, 0.0f));
}

TEST_P(CpuBackwardTest, RmsNormBackwardMatchesReference) {
  struct Size {
    int64_t rows, width;
  };
  for (const Size sz : {Size{5, 13}, Size{1, 1}, Size{257, 129}}) {
    SCOPED_TRACE(testing::Message() << sz.rows << "x" << sz.width);
    const Tensor x = rng_.Floats({sz.rows, sz.width}, 3.0f), weight = rng_.Floats({sz.width});
    const Tensor dy = rng_.Floats({sz.rows, sz.width});
    std::vector<float> want(x.numel());
    ref::RmsNormBackward(x.data<float>(), weight.data<float>(), double(1e-5f), dy.data<float>(),
                         want.data(), sz.rows, sz.width);
    Tensor dx = Tensor::Zeros(DType::kF32, x.shape());
    ASSERT_TRUE(backend_->RmsNormBackward(x, weight, 1e-5f, dy, dx).ok());
    ExpectWithin("RmsNormBackward", RelError(dx, want), kExactBound);
    // dx may alias dy.
    Tensor in_place = dy.Clone();
    ASSERT_TRUE(backend_->RmsNormBackward(x, weight, 1e-5f, in_place, in_place).ok());
    EXPECT_EQ(Values(in_place), want);
  }
}

TEST_P(CpuBackwardTest, RopeBackwardMatchesReference) {
  RopeShape yarn{7, 30, 10, 10000.0};
  yarn.scaling.type = RopeScaling::Type::kYarn;
  yarn.scaling.factor = 4;
  yarn.scaling.original_max_position_embeddings = 16;
  yarn.scaling.attention_factor = 1.1386;
  RopeShape llama3{7, 30, 6, 500000.0};
  llama3.scaling.type = RopeScaling::Type::kLlama3;
  llama3.scaling.factor = 8;
  llama3.scaling.original_max_position_embeddings = 16;
  for (const RopeShape& shape : {yarn, llama3, RopeShape{1, 0, 2, 10000.0}}) {
    SCOPED_TRACE(RopeTypeName(shape.scaling.type));
    for (const int64_t rows : {int64_t(shape.seq_len), int64_t(shape.seq_len) * 401}) {
      const Tensor g0 = rng_.Floats({rows, 3 * shape.head_dim});
      std::vector<float> want = Values(g0);
      ref::RopeBackward(want.data(), rows, g0.dim(1), shape);
      Tensor g = g0.Clone();
      ASSERT_TRUE(backend_->RopeBackward(g, shape).ok());
      ExpectWithin(std::string("RopeBackward ") + RopeTypeName(shape.scaling.type),
                   RelError(g, want), kRopeBound);
    }
  }
  // Without YaRN's factor the rotation is orthogonal: RopeBackward undoes Rope.
  const Tensor x = rng_.Floats({14, 12});
  Tensor y = x.Clone();
  ASSERT_TRUE(backend_->Rope(y, llama3).ok());
  ASSERT_TRUE(backend_->RopeBackward(y, llama3).ok());
  EXPECT_LE(RelError(y, Values(x)), 1e-6);
}

struct AttentionCase {
  AttentionShape shape;
  const char* what;
};

TEST_P(CpuBackwardTest, AttentionBackwardMatchesReference) {
  // batch, q_len, kv_len, heads, kv heads, head_dim, q_offset, window.
  const AttentionCase cases[] = {
      {AttentionShape(2, 5, 5, 4, 2, 6, 0), "causal GQA n_rep 2"},
      {AttentionShape(1, 3, 9, 4, 2, 10, 6), "q_offset 6"},
      {AttentionShape(2, 7, 9, 6, 3, 6, 2, 4), "q_offset 2, window 4"},
      {AttentionShape(1, 1, 1, 1, 1, 2, 0), "size 1"},
      {AttentionShape(1, 131, 131, 2, 1, 64, 0), "131 tokens, head_dim 64"},  // split rows
  };
  for (const AttentionCase& c : cases) {
    SCOPED_TRACE(c.what);
    const AttentionShape& s = c.shape;
    const int64_t q_rows = int64_t(s.batch) * s.q_len, kv_rows = int64_t(s.batch) * s.kv_len;
    const Tensor q = rng_.Floats({q_rows, int64_t(s.num_heads) * s.head_dim}, 2.0f);
    const Tensor k = rng_.Floats({kv_rows, int64_t(s.num_kv_heads) * s.head_dim}, 2.0f);
    const Tensor v = rng_.Floats(k.shape()), dout = rng_.Floats(q.shape());
    std::vector<float> dq_ref(q.numel()), dk_ref(k.numel()), dv_ref(v.numel());
    ref::AttentionBackward(q.data<float>(), k.data<float>(), v.data<float>(), dout.data<float>(), s,
                           dq_ref.data(), dk_ref.data(), dv_ref.data(), bf16());
    // Outputs start as NaN: every element must be overwritten.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    Tensor dq = Filled(q.shape(), nan), dk = Filled(k.shape(), nan), dv = Filled(v.shape(), nan);
    ASSERT_TRUE(backend_->AttentionBackward(q, k, v, dout, s, dq, dk, dv).ok());
    const std::string what = std::string("AttentionBackward ") + c.what;
    ExpectWithin(what + " dq", RelError(dq, dq_ref), kAttentionBackwardBound);
    ExpectWithin(what + " dk", RelError(dk, dk_ref), kAttentionBackwardBound);
    ExpectWithin(what + " dv", RelError(dv, dv_ref), kAttentionBackwardBound);
    // The same bits again (deterministic for a given thread count).
    Tensor dq2 = Filled(q.shape(), nan), dk2 = Filled(k.shape(), nan), dv2 = Filled(v.shape(), nan);
    ASSERT_TRUE(backend_->AttentionBackward(q, k, v, dout, s, dq2, dk2, dv2).ok());
    EXPECT_EQ(std::memcmp(dq.raw(), dq2.raw(), dq.nbytes()), 0);
    EXPECT_EQ(std::memcmp(dk.raw(), dk2.raw(), dk.nbytes()), 0);
    EXPECT_EQ(std::memcmp(dv.raw(), dv2.raw(), dv.nbytes()), 0);
  }
  // No queries: dk and dv are zero.
  const AttentionShape none(1, 0, 3, 2, 1, 4, 0);
  const Tensor q = Tensor::Zeros(DType::kF32, {0, 8});
  const Tensor kv = rng_.Floats({3, 4});
  Tensor dq = Tensor::Zeros(DType::kF32, {0, 8});
  Tensor dk = Filled({3, 4}, 1.0f), dv = Filled({3, 4}, 1.0f);
  ASSERT_TRUE(backend_->AttentionBackward(q, kv, kv, q, none, dq, dk, dv).ok());
  EXPECT_EQ(Values(dk), std::vector<float>(12, 0.0f));
  EXPECT_EQ(Values(dv), std::vector<float>(12, 0.0f));
}

TEST_P(CpuBackwardTest, SiluMulBackwardMatchesReference) {
  for (const int64_t n : {int64_t(1), int64_t(13), int64_t(40001)}) {
    const Tensor gate = rng_.Floats({n}, 6.0f), up = rng_.Floats({n}, 2.0f),
                 dout = rng_.Floats({n});
    std::vector<float> dgate_ref(n), dup_ref(n);
    ref::SiluMulBackward(gate.data<float>(), up.data<float>(), dout.data<float>(), dgate_ref.data(),
                         dup_ref.data(), n);
    Tensor dgate = Tensor::Zeros(DType::kF32, {n}), dup = Tensor::Zeros(DType::kF32, {n});
    ASSERT_TRUE(backend_->SiluMulBackward(gate, up, dout, dgate, dup).ok());
    ExpectWithin("SiluMulBackward dgate", RelError(dgate, dgate_ref), kExactBound);
    ExpectWithin("SiluMulBackward dup", RelError(dup, dup_ref), kExactBound);
  }
}

TEST_P(CpuBackwardTest, EmbeddingBackwardMatchesReference) {
  for (const int64_t width : {int64_t(1), int64_t(7), int64_t(1031)}) {
    const int vocab = 11;
    const int64_t rows = 97;
    std::vector<int32_t> ids(rows);
    for (int32_t& id : ids) id = rng_.Below(vocab);
    const Tensor dout = rng_.Floats({rows, width});
    // The table gradient accumulates onto what is there.
    const Tensor start = rng_.Floats({vocab, width});
    std::vector<float> want = Values(start);
    ref::EmbeddingBackward(ids.data(), rows, dout.data<float>(), width, want.data());
    Tensor dtable = start.Clone();
    ASSERT_TRUE(backend_->EmbeddingBackward(I32(ids), dout, dtable).ok());
    ExpectWithin("EmbeddingBackward", RelError(dtable, want), kExactBound);
  }
}

TEST_P(CpuBackwardTest, NllBackwardMatchesReference) {
  for (const int64_t vocab : {int64_t(1), int64_t(9), int64_t(1001)}) {
    const int64_t rows = 131;
    std::vector<int32_t> targets(rows);
    for (int32_t& t : targets) t = rng_.Below(int(vocab) + 1) - 1;  // −1 included
    const Tensor logits = rng_.Floats({rows, vocab}, 8.0f);
    std::vector<float> want(logits.numel());
    ref::NllBackward(logits.data<float>(), rows, vocab, targets.data(), 0.25f, want.data());
    Tensor dlogits = Tensor::Zeros(DType::kF32, logits.shape());
    ASSERT_TRUE(backend_->NllBackward(logits, I32(targets), 0.25f, dlogits).ok());
    ExpectWithin("NllBackward", RelError(dlogits, want), kExactBound);
    for (int64_t r = 0; r < rows; ++r) {
      if (targets[r] != -1) continue;
      for (int64_t c = 0; c < vocab; ++c) {
        EXPECT_EQ(dlogits.data<float>()[r * vocab + c], 0.0f);
      }
    }
    // dlogits may alias logits.
    Tensor in_place = logits.Clone();
    ASSERT_TRUE(backend_->NllBackward(in_place, I32(targets), 0.25f, in_place).ok());
    EXPECT_EQ(Values(in_place), want);
  }
}

TEST_P(CpuBackwardTest, ScaleRowsByNormAndAccumulateSquares) {
  for (const int64_t rows : {int64_t(1), int64_t(5), int64_t(1025)}) {
    const Tensor g = rng_.Floats({rows, 7}), x0 = rng_.Floats({rows, 129});
    std::vector<float> want = Values(x0);
    ref::ScaleRowsByNorm(g.data<float>(), rows, 7, want.data(), 129);
    Tensor x = x0.Clone();
    ASSERT_TRUE(backend_->ScaleRowsByNorm(g, x).ok());
    ExpectWithin("ScaleRowsByNorm", RelError(x, want), kExactBound);

    const Tensor f0 = rng_.Floats({rows, 129});
    std::vector<float> f_want = Values(f0);
    ref::AccumulateSquares(x0.data<float>(), x0.numel(), f_want.data());
    Tensor f = f0.Clone();
    ASSERT_TRUE(backend_->AccumulateSquares(x0, f).ok());
    ExpectWithin("AccumulateSquares", RelError(f, f_want), kExactBound);
  }
  // ‖g_t‖² = 4 scales each row by exactly 2 (DESIGN section 3's known answer for H_tok).
  Tensor g = Tensor::Zeros(DType::kF32, {2, 4});
  const float g_values[] = {1.0f, -1.0f, 1.0f, -1.0f, 0.0f, 0.0f, -2.0f, 0.0f};
  std::copy(std::begin(g_values), std::end(g_values), g.data<float>());
  const Tensor x0 = rng_.Floats({2, 3});
  Tensor x = x0.Clone();
  ASSERT_TRUE(backend_->ScaleRowsByNorm(g, x).ok());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(x.data<float>()[i], 2.0f * x0.data<float>()[i]);
}

TEST_P(CpuBackwardTest, BadShapesAreInvalidArgument) {
  const Tensor m23 = rng_.Floats({2, 3}), m33 = rng_.Floats({3, 3}), v3 = rng_.Floats({3});
  auto expect_invalid = [](const absl::Status& status, const char* op) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << op << ": " << status;
    EXPECT_THAT(status.message(), HasSubstr(op));
  };
  Tensor c22 = Tensor::Zeros(DType::kF32, {2, 2});
  expect_invalid(backend_->Gemm(m23, false, m23, false, 1.0f, 0.0f, c22), "Gemm");
  Tensor c33 = rng_.Floats({3, 3});
  expect_invalid(backend_->Gemm(m23, false, m23, true, 1.0f, 0.0f, c33), "Gemm");
  expect_invalid(backend_->Gemm(v3, false, m33, false, 1.0f, 0.0f, c22), "Gemm");
  const Tensor i32 = I32({0, 1});
  expect_invalid(backend_->Gemm(i32, false, m33, false, 1.0f, 0.0f, c22), "Gemm");

  Tensor dx = Tensor::Zeros(DType::kF32, {2, 3});
  expect_invalid(backend_->RmsNormBackward(m23, rng_.Floats({2}), 1e-5f, m23, dx),
                 "RmsNormBackward");
  expect_invalid(backend_->RmsNormBackward(m23, v3, 1e-5f, m33, dx), "RmsNormBackward");

  Tensor g = rng_.Floats({2, 6});
  expect_invalid(backend_->RopeBackward(g, RopeShape{2, 0, 4, 10000.0}), "RopeBackward");
  expect_invalid(backend_->RopeBackward(g, RopeShape{2, 0, 3, 10000.0}), "RopeBackward");
  expect_invalid(backend_->RopeBackward(g, RopeShape{0, 0, 6, 10000.0}), "RopeBackward");

  const AttentionShape s(1, 2, 2, 2, 1, 3, 0);
  const Tensor q = rng_.Floats({2, 6}), kv = rng_.Floats({2, 3});
  Tensor dq = Tensor::Zeros(DType::kF32, {2, 6}), dk = Tensor::Zeros(DType::kF32, {2, 3}),
         dv = Tensor::Zeros(DType::kF32, {2, 3});
  ASSERT_TRUE(backend_->AttentionBackward(q, kv, kv, q, s, dq, dk, dv).ok());
  expect_invalid(backend_->AttentionBackward(q, kv, kv, kv, s, dq, dk, dv), "AttentionBackward");
  expect_invalid(backend_->AttentionBackward(q, kv, kv, q, s, dq, dq, dv), "AttentionBackward");
  expect_invalid(
      backend_->AttentionBackward(q, kv, kv, q, AttentionShape(1, 2, 2, 3, 2, 2, 0), dq, dk, dv),
      "AttentionBackward");
  expect_invalid(
      backend_->AttentionBackward(q, kv, kv, q, AttentionShape(1, 2, 2, 2, 1, 3, 1), dq, dk, dv),
      "AttentionBackward");
  expect_invalid(backend_->AttentionBackward(q, kv, kv, q, AttentionShape(1, 2, 2, 2, 1, 3, 0, -1),
                                             dq, dk, dv),
                 "AttentionBackward");

  Tensor out3 = Tensor::Zeros(DType::kF32, {3}), out2 = Tensor::Zeros(DType::kF32, {2});
  expect_invalid(backend_->SiluMulBackward(v3, v3, v3, out3, out2), "SiluMulBackward");

  Tensor dtable = Tensor::Zeros(DType::kF32, {4, 3});
  expect_invalid(backend_->EmbeddingBackward(I32({0, 4}), m23, dtable), "EmbeddingBackward");
  expect_invalid(backend_->EmbeddingBackward(I32({0, -1}), m23, dtable), "EmbeddingBackward");
  expect_invalid(backend_->EmbeddingBackward(I32({0}), m23, dtable), "EmbeddingBackward");
  Tensor dtable_narrow = Tensor::Zeros(DType::kF32, {4, 2});
  expect_invalid(backend_->EmbeddingBackward(I32({0, 1}), m23, dtable_narrow), "EmbeddingBackward");

  Tensor dlogits = Tensor::Zeros(DType::kF32, {2, 3});
  expect_invalid(backend_->NllBackward(m23, I32({0, 3}), 1.0f, dlogits), "NllBackward");
  expect_invalid(backend_->NllBackward(m23, I32({-2, 0}), 1.0f, dlogits), "NllBackward");
  expect_invalid(backend_->NllBackward(m23, I32({0}), 1.0f, dlogits), "NllBackward");
  expect_invalid(backend_->NllBackward(m23, I32({0, 1}), 1.0f, out3), "NllBackward");

  Tensor x33 = rng_.Floats({3, 3});
  expect_invalid(backend_->ScaleRowsByNorm(m23, x33), "ScaleRowsByNorm");
  Tensor f = Tensor::Zeros(DType::kF32, {5});
  expect_invalid(backend_->AccumulateSquares(m23, f), "AccumulateSquares");
}

INSTANTIATE_TEST_SUITE_P(ComputeDTypes, CpuBackwardTest,
                         ::testing::Values(ComputeDType::kF32, ComputeDType::kBF16),
                         [](const ::testing::TestParamInfo<ComputeDType>& info) {
                           return info.param == ComputeDType::kBF16 ? "bf16" : "f32";
                         });

}  // namespace
}  // namespace qcal::kernels
