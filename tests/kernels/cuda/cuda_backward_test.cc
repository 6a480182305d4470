// Parity tests of the CUDA backend's backward ops (the gradient pass, kernels/backend.h) against
// their scalar specifications in kernels/cpu/ref_grad.h (T = float), like with like: fp32 compute
// against the reference in fp32 operands, bf16 compute against the reference with bf16 operands.
// Random data, odd sizes and size 1; outputs are poisoned with NaN first so that an unwritten
// element fails. Error is ‖out − ref‖ / ‖ref‖ against a per-op bound (AttentionBackward in bf16
// runs tensor-core kernels that also round P and dS, hence its own bound); AttentionBackward and
// EmbeddingBackward are also checked byte-identical run to run, and one 7B-shaped
// AttentionBackward is timed (printed, not asserted). Every test skips without a CUDA device.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/ref_grad.h"
#include "kernels/cpu/ref_ops.h"
#include "kernels/cuda/cuda_backend.h"
#include "tests/kernels/cuda/cuda_kernel_test.h"

namespace qcal::kernels {
namespace {

// fp32 GEMMs (cuBLAS, true fp32) against a double-accumulating reference: summation error only.
constexpr double kGemmF32Bound = 1e-5;
// bf16 operands are rounded as the reference rounds them and multiply exactly; only the fp32
// accumulation differs (not rounding them would give ~3e-3).
constexpr double kGemmBf16Bound = 1e-4;
// Row sums and the per-element formula in double, as in the reference: a last-bit difference.
constexpr double kRmsNormBackwardBound = 1e-6;
// Same host-computed angles and no fused multiply-add: identical bits in practice.
constexpr double kRopeBackwardBound = 1e-6;
// fp32 compute (the exact CUDA-core kernels): scores, probabilities, dP − D and the three products
// in fp32 against the double reference (measured on an H200: at most 7e-7).
constexpr double kAttentionBackwardBound = 5e-6;
// bf16 compute (the tensor-core kernels) against the reference with bf16 operands: q, k, v and
// dout are rounded as the reference rounds them, but P and dS are also rounded to bf16 where they
// enter dv = Pᵀ·dout, dq = dS·k and dk = dSᵀ·q, which the reference keeps in double (measured on
// an H200: at most 1.9e-3 over the cases below).
constexpr double kAttentionBackwardBf16Bound = 1e-2;
// fp32 elementwise formula against the double one.
constexpr double kSiluMulBackwardBound = 1e-6;
// Probabilities in double as in the reference, one rounding to fp32.
constexpr double kNllBackwardBound = 1e-6;
// Squares summed in fp32 on the device (in double in the reference).
constexpr double kScaleRowsByNormBound = 1e-6;
// bf16 against fp32 at the 7B shape: the rounding of q, k, v and dout, and of P and dS (measured
// on an H200: 3.1e-3 for dq and dk, 2.2e-3 for dv).
constexpr double kAttentionBackwardBf16VsF32Bound = 2e-2;

using kernel_tests::Random;
using kernel_tests::RelError;

bool SameBytes(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

const char* Name(ComputeDType dtype) { return dtype == ComputeDType::kF32 ? "f32" : "bf16"; }

class CudaBackwardTest : public kernel_tests::CudaKernelTest {
 protected:
  // dq, dk, dv of AttentionBackward on `be` for host q, k, v, dout.
  struct AttentionGrads {
    std::vector<float> dq, dk, dv;
  };
  // With `saved`: AttentionForBackward (its output checked bit for bit against Attention's), then
  // AttentionBackwardSaved.
  AttentionGrads RunAttentionBackward(Backend& be, const std::vector<float>& q,
                                      const std::vector<float>& k, const std::vector<float>& v,
                                      const std::vector<float>& dout, const AttentionShape& s,
                                      bool saved = false) {
    const int64_t qw = int64_t(s.num_heads) * s.head_dim,
                  kvw = int64_t(s.num_kv_heads) * s.head_dim;
    const Shape q_shape{int64_t(s.batch) * s.q_len, qw}, kv_shape{int64_t(s.batch) * s.kv_len, kvw};
    Tensor qd = Upload(be, q, q_shape), kd = Upload(be, k, kv_shape), vd = Upload(be, v, kv_shape);
    Tensor dod = Upload(be, dout, q_shape);
    Tensor dq = Poisoned(be, q_shape), dk = Poisoned(be, kv_shape), dv = Poisoned(be, kv_shape);
    absl::Status st;
    if (saved) {
      AttentionSaved keep;
      Tensor out = Poisoned(be, q_shape), plain = Poisoned(be, q_shape);
      EXPECT_TRUE(be.AttentionForBackward(qd, kd, vd, s, out, keep).ok());
      EXPECT_TRUE(be.Attention(qd, kd, vd, s, plain).ok());
      EXPECT_TRUE(SameBytes(Download(be, out), Download(be, plain)));
      st = be.AttentionBackwardSaved(qd, kd, vd, out, dod, keep, s, dq, dk, dv);
    } else {
      st = be.AttentionBackward(qd, kd, vd, dod, s, dq, dk, dv);
    }
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return {};
    return {Download(be, dq), Download(be, dk), Download(be, dv)};
  }
};

TEST_F(CudaBackwardTest, SupportsBackwardOps) {
  EXPECT_TRUE(f32_->SupportsOp(Op::kBackward));
  EXPECT_TRUE(bf16_->SupportsOp(Op::kBackward));
}

TEST_F(CudaBackwardTest, GemmMatchesReference) {
  struct Case {
    int64_t m, n, k;
  };
  const Case cases[] = {{1, 1, 1}, {1, 7, 5},     {3, 1, 9},     {17, 33, 65},
                        {5, 3, 0}, {64, 128, 96}, {130, 67, 257}};
  uint64_t seed = 1;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    for (const Case& c : cases) {
      for (int flags = 0; flags < 4; ++flags) {
        const bool ta = flags & 1, tb = flags & 2;
        for (float beta : {0.0f, 0.5f}) {
          SCOPED_TRACE(testing::Message()
                       << Name(dtype) << " m=" << c.m << " n=" << c.n << " k=" << c.k
                       << " trans_a=" << ta << " trans_b=" << tb << " beta=" << beta);
          const auto a = Random(c.m * c.k, seed++), b = Random(c.k * c.n, seed++);
          const auto c0 = Random(c.m * c.n, seed++);
          std::vector<float> ref = c0;
          ref::Gemm(a.data(), ta, b.data(), tb, c.m, c.n, c.k, 0.75f, beta, ref.data(), bf16);
          Tensor ad = Upload(be, a, ta ? Shape{c.k, c.m} : Shape{c.m, c.k});
          Tensor bd = Upload(be, b, tb ? Shape{c.n, c.k} : Shape{c.k, c.n});
          // beta == 0 must ignore c, NaN included.
          Tensor cd = beta == 0.0f ? Poisoned(be, {c.m, c.n}) : Upload(be, c0, {c.m, c.n});
          const absl::Status st = be.Gemm(ad, ta, bd, tb, 0.75f, beta, cd);
          ASSERT_TRUE(st.ok()) << st;
          EXPECT_LE(RelError(Download(be, cd), ref), bf16 ? kGemmBf16Bound : kGemmF32Bound);
        }
      }
    }
  }
}

// GemmLower (row panels of the lower triangle from 2048 rows up, a single product below) and
// MirrorLower: the lower triangle of xᵀx and of yyᵀ against the reference, then the whole matrix
// after the mirror, exactly symmetric.
TEST_F(CudaBackwardTest, GemmLowerAndMirrorLowerMatchReference) {
  struct Case {
    int64_t m, k;
  };
  const Case cases[] = {{1, 1}, {5, 3}, {2048, 7}, {2100, 19}};
  uint64_t seed = 500;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    for (const Case& c : cases) {
      for (const bool gram_of_columns : {true, false}) {
        SCOPED_TRACE(testing::Message() << Name(dtype) << " m=" << c.m << " k=" << c.k
                                        << (gram_of_columns ? " xᵀx" : " yyᵀ"));
        const auto x = Random(c.m * c.k, seed++);
        // A symmetric c0 (beta 0.5).
        std::vector<float> c0 = Random(c.m * c.m, seed++);
        for (int64_t i = 0; i < c.m; ++i) {
          for (int64_t j = 0; j < i; ++j) c0[j * c.m + i] = c0[i * c.m + j];
        }
        std::vector<float> ref = c0;
        ref::Gemm(x.data(), gram_of_columns, x.data(), !gram_of_columns, c.m, c.m, c.k, 1.0f, 0.5f,
                  ref.data(), bf16);
        Tensor xd = Upload(be, x, gram_of_columns ? Shape{c.k, c.m} : Shape{c.m, c.k});
        Tensor cd = Upload(be, c0, {c.m, c.m});
        ASSERT_TRUE(be.GemmLower(xd, gram_of_columns, xd, !gram_of_columns, 1.0f, 0.5f, cd).ok());
        std::vector<float> got = Download(be, cd), got_lower, ref_lower;
        for (int64_t i = 0; i < c.m; ++i) {
          for (int64_t j = 0; j <= i; ++j) {
            got_lower.push_back(got[i * c.m + j]);
            ref_lower.push_back(ref[i * c.m + j]);
          }
        }
        EXPECT_LE(RelError(got_lower, ref_lower), bf16 ? kGemmBf16Bound : kGemmF32Bound);
        ASSERT_TRUE(be.MirrorLower(cd).ok());
        got = Download(be, cd);
        EXPECT_LE(RelError(got, ref), bf16 ? kGemmBf16Bound : kGemmF32Bound);
        for (int64_t i = 0; i < c.m; ++i) {
          for (int64_t j = 0; j < i; ++j) ASSERT_EQ(got[i * c.m + j], got[j * c.m + i]);
        }
      }
    }
  }
}

// GemmBatched (cuBLAS strided batched products; a lower triangle as two batched panels when the
// batch has 4 items or more, else GemmLower's panels): every item against the reference, with F32
// or BF16 operands and an F32 or BF16 c (cuBLAS rounds the fp32 result: within one bf16 rounding
// of the reference), including the gradient pass's shapes (samples of 2048: P = ΓΓᵀ and
// Z = P·X) and a lone 2100-wide lower product. Poisoned outputs; two runs give the same bytes.
TEST_F(CudaBackwardTest, GemmBatchedMatchesReference) {
  struct Case {
    int64_t batch, m, n, k;
    bool trans_a, trans_b, lower;
  };
  const Case cases[] = {
      {3, 5, 7, 13, false, false, false},     {1, 1, 1, 1, false, true, true},
      {4, 2048, 2048, 9, false, true, true},  {2, 2048, 33, 2048, false, false, false},
      {1, 2100, 2100, 19, true, false, true}, {5, 300, 300, 40, false, true, true}};
  uint64_t seed = 900;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    for (const Case& c : cases) {
      for (const DType operands : {DType::kF32, DType::kBF16}) {
        for (const DType out : {DType::kF32, DType::kBF16}) {
          SCOPED_TRACE(testing::Message()
                       << Name(dtype) << " " << c.batch << "x" << c.m << "x" << c.n << "x" << c.k
                       << " " << DTypeName(operands) << " into " << DTypeName(out)
                       << (c.lower ? " lower" : ""));
          const bool rounded = dtype == ComputeDType::kBF16 || operands == DType::kBF16;
          const Shape a_shape = c.trans_a ? Shape{c.batch, c.k, c.m} : Shape{c.batch, c.m, c.k};
          const Shape b_shape = c.trans_b ? Shape{c.batch, c.n, c.k} : Shape{c.batch, c.k, c.n};
          const auto a = Random(NumElements(a_shape), seed++);
          const auto b = Random(NumElements(b_shape), seed++);
          const auto c0 = Random(c.batch * c.m * c.n, seed++);
          auto operand = [&](const std::vector<float>& v, const Shape& shape) {
            Tensor t = Upload(be, v, shape);
            if (operands == DType::kF32) return t;
            auto o = be.Alloc(DType::kBF16, shape);
            EXPECT_TRUE(o.ok() && be.Convert(t, *o).ok());
            return *o;
          };
          const float beta = out == DType::kF32 ? 0.5f : 0.0f;
          Tensor ad = operand(a, a_shape), bd = operand(b, b_shape);
          auto run = [&]() -> std::vector<float> {
            Tensor cd = Upload(be, c0, {c.batch, c.m, c.n});
            Tensor target = cd;
            if (out == DType::kBF16) {
              // Poison: NaN rounds to a bf16 NaN, so an unwritten element fails.
              Tensor poison = Poisoned(be, {c.batch, c.m, c.n});
              target = *be.Alloc(DType::kBF16, poison.shape());
              EXPECT_TRUE(be.Convert(poison, target).ok());
            }
            const absl::Status st =
                be.GemmBatched(ad, c.trans_a, bd, c.trans_b, 0.75f, beta, target, c.lower);
            EXPECT_TRUE(st.ok()) << st;
            if (out == DType::kBF16) {
              EXPECT_TRUE(be.Convert(target, cd).ok());
            }
            return Download(be, cd);
          };
          const std::vector<float> got = run();
          std::vector<float> got_part, ref_part;
          for (int64_t i = 0; i < c.batch; ++i) {
            std::vector<float> ref(c0.begin() + i * c.m * c.n, c0.begin() + (i + 1) * c.m * c.n);
            ref::Gemm(a.data() + i * c.m * c.k, c.trans_a, b.data() + i * c.k * c.n, c.trans_b, c.m,
                      c.n, c.k, 0.75f, beta, ref.data(), rounded);
            for (int64_t r = 0; r < c.m; ++r) {
              for (int64_t col = 0; col < (c.lower ? r + 1 : c.n); ++col) {
                got_part.push_back(got[(i * c.m + r) * c.n + col]);
                ref_part.push_back(ref[r * c.n + col]);
              }
            }
          }
          EXPECT_LE(RelError(got_part, ref_part), out == DType::kBF16 ? 4e-3
                                                  : rounded           ? kGemmBf16Bound
                                                                      : kGemmF32Bound);
          EXPECT_TRUE(SameBytes(got, run()));
        }
      }
    }
  }
}

TEST_F(CudaBackwardTest, RmsNormBackwardMatchesReference) {
  struct Case {
    int64_t rows, width;
  };
  const Case cases[] = {{1, 1}, {5, 7}, {33, 257}, {4, 4096}};
  uint64_t seed = 100;
  Backend& be = *f32_;
  for (const Case& c : cases) {
    for (bool in_place : {false, true}) {
      SCOPED_TRACE(testing::Message()
                   << "rows=" << c.rows << " width=" << c.width << " in_place=" << in_place);
      const auto x = Random(c.rows * c.width, seed++), w = Random(c.width, seed++);
      const auto dy = Random(c.rows * c.width, seed++);
      std::vector<float> ref(x.size());
      ref::RmsNormBackward(x.data(), w.data(), 1e-5, dy.data(), ref.data(), c.rows, c.width);
      Tensor xd = Upload(be, x, {c.rows, c.width}), wd = Upload(be, w, {c.width});
      Tensor dyd = Upload(be, dy, {c.rows, c.width});
      Tensor dx = in_place ? dyd : Poisoned(be, {c.rows, c.width});
      const absl::Status st = be.RmsNormBackward(xd, wd, 1e-5f, dyd, dx);
      ASSERT_TRUE(st.ok()) << st;
      EXPECT_LE(RelError(Download(be, dx), ref), kRmsNormBackwardBound);
    }
  }
}

TEST_F(CudaBackwardTest, RopeBackwardMatchesReferenceAndInvertsRope) {
  RopeScaling yarn;
  yarn.type = RopeScaling::Type::kYarn;
  yarn.factor = 4;
  yarn.original_max_position_embeddings = 64;
  yarn.attention_factor = 0.1 * std::log(4.0) + 1;
  struct Case {
    int64_t rows;
    RopeShape shape;
    int heads;
  };
  const Case cases[] = {{1, {1, 0, 2, 10000.0}, 1},
                        {34, {17, 3, 8, 10000.0}, 3},
                        {200, {100, 10, 64, 500000.0, yarn}, 2},
                        {130, {130, 0, 128, 10000.0}, 4}};
  uint64_t seed = 200;
  Backend& be = *f32_;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << "rows=" << c.rows << " head_dim=" << c.shape.head_dim
                                    << " yarn=" << (c.shape.scaling.type == yarn.type));
    const int64_t width = int64_t(c.heads) * c.shape.head_dim;
    const auto g = Random(c.rows * width, seed++);
    std::vector<float> ref = g;
    ref::RopeBackward(ref.data(), c.rows, width, c.shape);
    Tensor gd = Upload(be, g, {c.rows, width});
    const absl::Status st = be.RopeBackward(gd, c.shape);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_LE(RelError(Download(be, gd), ref), kRopeBackwardBound);
    // Rᵀ·R is the identity without YaRN's factor (with it, factor²·identity).
    if (c.shape.scaling.type != yarn.type) {
      ASSERT_TRUE(be.Rope(gd, c.shape).ok());
      EXPECT_LE(RelError(Download(be, gd), g), 1e-6);
    }
  }
}

TEST_F(CudaBackwardTest, AttentionBackwardMatchesReference) {
  struct Case {
    AttentionShape s;
    int window;
  };
  const Case cases[] = {// batch, q_len, kv_len, heads, kv_heads, head_dim, q_offset; sliding window
                        {{1, 1, 1, 1, 1, 1, 0}, 0},
                        {{1, 1, 1, 1, 1, 8, 0}, 0},
                        {{2, 17, 17, 4, 2, 8, 0}, 0},
                        {{1, 70, 70, 6, 2, 64, 0}, 0},
                        {{1, 1, 37, 4, 4, 64, 36}, 0},
                        {{1, 5, 133, 3, 1, 96, 128}, 0},
                        {{2, 130, 130, 2, 1, 128, 0}, 0},
                        {{1, 65, 200, 2, 2, 33, 135}, 0},
                        {{3, 64, 64, 8, 8, 7, 0}, 0},
                        {{1, 129, 129, 1, 1, 128, 0}, 0},
                        {{1, 200, 200, 4, 2, 64, 0}, 16},
                        {{2, 150, 150, 2, 1, 32, 0}, 1},
                        {{1, 65, 230, 2, 2, 128, 165}, 100},
                        {{1, 300, 300, 2, 1, 96, 0}, 129},
                        // Whole 64 x 64 tiles (unmasked and diagonal) across query groups.
                        {{2, 256, 256, 4, 1, 128, 0}, 0},
                        {{1, 192, 448, 4, 2, 64, 256}, 150},
                        // No queries: dk and dv are zeros.
                        {{1, 0, 70, 4, 2, 64, 70}, 0}};
  uint64_t seed = 300;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    Backend& be = Get(dtype);
    const bool bf16 = dtype == ComputeDType::kBF16;
    for (const Case& c : cases) {
      AttentionShape s = c.s;
      s.sliding_window = c.window;
      SCOPED_TRACE(testing::Message()
                   << Name(dtype) << " batch=" << s.batch << " q_len=" << s.q_len
                   << " kv_len=" << s.kv_len << " heads=" << s.num_heads << "/" << s.num_kv_heads
                   << " head_dim=" << s.head_dim << " q_offset=" << s.q_offset
                   << " window=" << s.sliding_window);
      const int64_t qn = int64_t(s.batch) * s.q_len * s.num_heads * s.head_dim;
      const int64_t kvn = int64_t(s.batch) * s.kv_len * s.num_kv_heads * s.head_dim;
      const auto q = Random(qn, seed++), k = Random(kvn, seed++), v = Random(kvn, seed++);
      const auto dout = Random(qn, seed++);
      std::vector<float> dq(qn), dk(kvn), dv(kvn);
      ref::AttentionBackward(q.data(), k.data(), v.data(), dout.data(), s, dq.data(), dk.data(),
                             dv.data(), bf16);
      const AttentionGrads got = RunAttentionBackward(be, q, k, v, dout, s);
      const double eq = RelError(got.dq, dq), ek = RelError(got.dk, dk), ev = RelError(got.dv, dv);
      std::printf(
          "%-4s attention backward %dx%dx%d heads %d/%d d=%d offset %d window %d: "
          "dq %.2e dk %.2e dv %.2e\n",
          Name(dtype), s.batch, s.q_len, s.kv_len, s.num_heads, s.num_kv_heads, s.head_dim,
          s.q_offset, s.sliding_window, eq, ek, ev);
      const double bound = bf16 ? kAttentionBackwardBf16Bound : kAttentionBackwardBound;
      EXPECT_LE(eq, bound);
      EXPECT_LE(ek, bound);
      EXPECT_LE(ev, bound);
      // From the forward's saved operands and statistics (D from its output): the same bound.
      const AttentionGrads saved = RunAttentionBackward(be, q, k, v, dout, s, /*saved=*/true);
      const double sq = RelError(saved.dq, dq), sk = RelError(saved.dk, dk),
                   sv = RelError(saved.dv, dv);
      std::printf("%-4s   from the saved forward: dq %.2e dk %.2e dv %.2e\n", Name(dtype), sq, sk,
                  sv);
      EXPECT_LE(sq, bound);
      EXPECT_LE(sk, bound);
      EXPECT_LE(sv, bound);
    }
  }
}

TEST_F(CudaBackwardTest, AttentionBackwardIsBitIdenticalRunToRun) {
  const AttentionShape s{2, 300, 300, 8, 2, 128, 0};
  const int64_t qn = int64_t(s.batch) * s.q_len * s.num_heads * s.head_dim;
  const int64_t kvn = int64_t(s.batch) * s.kv_len * s.num_kv_heads * s.head_dim;
  const auto q = Random(qn, 400), k = Random(kvn, 401), v = Random(kvn, 402);
  const auto dout = Random(qn, 403);
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    SCOPED_TRACE(Name(dtype));
    Backend& be = Get(dtype);
    const AttentionGrads first = RunAttentionBackward(be, q, k, v, dout, s);
    const AttentionGrads second = RunAttentionBackward(be, q, k, v, dout, s);
    ASSERT_FALSE(first.dq.empty());
    EXPECT_TRUE(SameBytes(first.dq, second.dq));
    EXPECT_TRUE(SameBytes(first.dk, second.dk));
    EXPECT_TRUE(SameBytes(first.dv, second.dv));
  }
}

TEST_F(CudaBackwardTest, SiluMulBackwardMatchesReference) {
  Backend& be = *f32_;
  uint64_t seed = 500;
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{100003}}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    const auto gate = Random(n, seed++, 3.0f), up = Random(n, seed++), dout = Random(n, seed++);
    std::vector<float> dgate(n), dup(n);
    ref::SiluMulBackward(gate.data(), up.data(), dout.data(), dgate.data(), dup.data(), n);
    Tensor gd = Upload(be, gate, {n}), ud = Upload(be, up, {n}), dd = Upload(be, dout, {n});
    Tensor dg = Poisoned(be, {n}), du = Poisoned(be, {n});
    const absl::Status st = be.SiluMulBackward(gd, ud, dd, dg, du);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_LE(RelError(Download(be, dg), dgate), kSiluMulBackwardBound);
    EXPECT_LE(RelError(Download(be, du), dup), kSiluMulBackwardBound);
  }
}

// Rows are summed into the table in row order, as the reference sums them: identical bits, and
// identical bits run to run.
TEST_F(CudaBackwardTest, EmbeddingBackwardMatchesReferenceExactly) {
  struct Case {
    int64_t vocab, n, width;
  };
  const Case cases[] = {{1, 1, 1}, {5, 9, 7}, {300, 1000, 65}, {32000, 4096, 300}};
  Backend& be = *f32_;
  uint64_t seed = 600;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << "vocab=" << c.vocab << " n=" << c.n << " width=" << c.width);
    std::mt19937_64 gen(seed++);
    // Few distinct tokens, so that rows collide: a skewed draw over the vocabulary.
    std::vector<int32_t> ids(c.n);
    for (int32_t& id : ids) {
      id = static_cast<int32_t>(gen() % 4 == 0 ? gen() % c.vocab
                                               : gen() % std::min<int64_t>(c.vocab, 3));
    }
    const auto dout = Random(c.n * c.width, seed++), table = Random(c.vocab * c.width, seed++);
    std::vector<float> ref = table;
    ref::EmbeddingBackward(ids.data(), c.n, dout.data(), c.width, ref.data());
    const Tensor id_tensor = Ids(ids);
    Tensor dd = Upload(be, dout, {c.n, c.width});
    std::vector<float> first;
    for (int run = 0; run < 2; ++run) {
      Tensor td = Upload(be, table, {c.vocab, c.width});
      const absl::Status st = be.EmbeddingBackward(id_tensor, dd, td);
      ASSERT_TRUE(st.ok()) << st;
      const std::vector<float> got = Download(be, td);
      EXPECT_TRUE(SameBytes(got, ref)) << "error " << RelError(got, ref);
      if (run == 0) {
        first = got;
      } else {
        EXPECT_TRUE(SameBytes(got, first));
      }
    }
  }
  // An id outside the table is the caller's error, named.
  Tensor td = Upload(be, std::vector<float>(6, 0.0f), {3, 2});
  Tensor dd = Upload(be, std::vector<float>(4, 1.0f), {2, 2});
  const absl::Status st = be.EmbeddingBackward(Ids({1, 3}), dd, td);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("token id 3"), std::string::npos) << st;
}

TEST_F(CudaBackwardTest, NllBackwardMatchesReference) {
  struct Case {
    int64_t rows, vocab;
  };
  const Case cases[] = {{1, 1}, {5, 7}, {33, 1001}, {4, 32000}};
  Backend& be = *f32_;
  uint64_t seed = 700;
  for (const Case& c : cases) {
    for (bool in_place : {false, true}) {
      SCOPED_TRACE(testing::Message()
                   << "rows=" << c.rows << " vocab=" << c.vocab << " in_place=" << in_place);
      const auto logits = Random(c.rows * c.vocab, seed++, 4.0f);
      std::mt19937_64 gen(seed++);
      std::vector<int32_t> targets(c.rows);
      for (int64_t r = 0; r < c.rows; ++r) {
        // Every third row predicts nothing.
        targets[r] = r % 3 == 2 ? -1 : static_cast<int32_t>(gen() % c.vocab);
      }
      std::vector<float> ref(logits.size());
      ref::NllBackward(logits.data(), c.rows, c.vocab, targets.data(), 0.25f, ref.data());
      Tensor ld = Upload(be, logits, {c.rows, c.vocab});
      Tensor out = in_place ? ld : Poisoned(be, {c.rows, c.vocab});
      const absl::Status st = be.NllBackward(ld, Ids(targets), 0.25f, out);
      ASSERT_TRUE(st.ok()) << st;
      EXPECT_LE(RelError(Download(be, out), ref), kNllBackwardBound);
    }
  }
  Tensor ld = Upload(be, std::vector<float>(6, 0.0f), {2, 3});
  const absl::Status st = be.NllBackward(ld, Ids({0, 3}), 1.0f, ld);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("target 3"), std::string::npos) << st;
}

TEST_F(CudaBackwardTest, ScaleRowsByNormMatchesReference) {
  struct Case {
    int64_t rows, width_g, width_x;
  };
  const Case cases[] = {{1, 1, 1}, {5, 7, 9}, {33, 4096, 300}, {3, 11008, 4096}};
  Backend& be = *f32_;
  uint64_t seed = 800;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message()
                 << "rows=" << c.rows << " width_g=" << c.width_g << " width_x=" << c.width_x);
    const auto g = Random(c.rows * c.width_g, seed++), x = Random(c.rows * c.width_x, seed++);
    std::vector<float> ref = x;
    ref::ScaleRowsByNorm(g.data(), c.rows, c.width_g, ref.data(), c.width_x);
    Tensor gd = Upload(be, g, {c.rows, c.width_g}), xd = Upload(be, x, {c.rows, c.width_x});
    const absl::Status st = be.ScaleRowsByNorm(gd, xd);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_LE(RelError(Download(be, xd), ref), kScaleRowsByNormBound);
  }
  // ‖g_t‖² = 4 scales every row by exactly 2 (DESIGN section 3's known answer).
  const int64_t rows = 3, width = 4;
  const std::vector<float> g = {1, 1, 1, 1, 2, 0, 0, 0, 1, -1, 1, -1};
  const auto x = Random(rows * 5, 810);
  Tensor gd = Upload(be, g, {rows, width}), xd = Upload(be, x, {rows, 5});
  ASSERT_TRUE(be.ScaleRowsByNorm(gd, xd).ok());
  const std::vector<float> got = Download(be, xd);
  ASSERT_EQ(got.size(), x.size());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(got[i], 2.0f * x[i]) << i;
}

// ScaleRowsByNormInto: the same bits as ScaleRowsByNorm in place (F32 out), and those bits rounded
// to bf16 (BF16 out: what a bf16 GEMM operand of them is); x is left as it was.
TEST_F(CudaBackwardTest, ScaleRowsByNormIntoEqualsInPlaceScaling) {
  Backend& be = *f32_;
  uint64_t seed = 820;
  for (const int64_t width_x : {int64_t{1}, int64_t{300}, int64_t{4096}}) {
    SCOPED_TRACE(testing::Message() << "width_x=" << width_x);
    const int64_t rows = 33, width_g = 11008;
    const auto g = Random(rows * width_g, seed++), x = Random(rows * width_x, seed++);
    Tensor gd = Upload(be, g, {rows, width_g}), xd = Upload(be, x, {rows, width_x});
    Tensor in_place = Upload(be, x, {rows, width_x});
    ASSERT_TRUE(be.ScaleRowsByNorm(gd, in_place).ok());
    const std::vector<float> want = Download(be, in_place);
    Tensor out = Poisoned(be, {rows, width_x});
    ASSERT_TRUE(be.ScaleRowsByNormInto(gd, xd, out).ok());
    EXPECT_TRUE(SameBytes(Download(be, out), want));
    EXPECT_TRUE(SameBytes(Download(be, xd), x));
    auto bf = be.Alloc(DType::kBF16, {rows, width_x});
    ASSERT_TRUE(bf.ok());
    ASSERT_TRUE(be.ScaleRowsByNormInto(gd, xd, *bf).ok());
    Tensor widened = Poisoned(be, {rows, width_x});
    ASSERT_TRUE(be.Convert(*bf, widened).ok());
    std::vector<float> rounded = want;
    for (float& v : rounded) v = RoundToBf16(v);
    EXPECT_TRUE(SameBytes(Download(be, widened), rounded));
  }
}

TEST_F(CudaBackwardTest, AccumulateSquaresMatchesReferenceExactly) {
  Backend& be = *f32_;
  uint64_t seed = 900;
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{100003}}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    const auto g = Random(n, seed++), f = Random(n, seed++);
    std::vector<float> ref = f;
    ref::AccumulateSquares(g.data(), n, ref.data());
    Tensor gd = Upload(be, g, {n}), fd = Upload(be, f, {n});
    ASSERT_TRUE(be.AccumulateSquares(gd, fd).ok());
    EXPECT_TRUE(SameBytes(Download(be, fd), ref));
  }
}

TEST_F(CudaBackwardTest, ErrorsAreStatuses) {
  Backend& be = *f32_;
  Tensor a = Upload(be, std::vector<float>(6, 1.0f), {2, 3});
  Tensor c = Upload(be, std::vector<float>(4, 0.0f), {2, 2});
  absl::Status st = be.Gemm(a, false, a, false, 1.0f, 0.0f, c);  // 2x3 · 2x3
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(be.Gemm(a, false, a, true, 1.0f, 0.0f, c).ok());  // 2x3 · 3x2
  const AttentionShape wide{1, 2, 2, 1, 1, 256, 0};
  Tensor q = Upload(be, std::vector<float>(512, 0.0f), {2, 256});
  Tensor dq = Upload(be, std::vector<float>(512, 0.0f), {2, 256});
  Tensor dk = dq, dv = dq;
  st = be.AttentionBackward(q, q, q, q, wide, dq, dk, dv);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
  const AttentionShape bad{1, 3, 2, 1, 1, 4, 0};  // q_len > kv_len
  st = be.AttentionBackward(q, q, q, q, bad, dq, dk, dv);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("AttentionBackward"), std::string::npos) << st;
}

// Median wall time of `fn` over `reps` runs after one warm-up, with the device synchronised.
template <typename Fn>
double MedianSeconds(Backend& be, int reps, Fn fn) {
  std::vector<double> t;
  for (int i = 0; i <= reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    EXPECT_TRUE(be.Synchronize().ok());
    if (i > 0) {
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// One Llama-2-7B attention call of a gradient-pass chunk (8 samples of 2048 tokens, 32 heads of
// 128): the backward timed against the forward (printed, not asserted), and bf16 against fp32.
TEST_F(CudaBackwardTest, SevenBAttentionBackwardTiming) {
  const AttentionShape s{8, 2048, 2048, 32, 32, 128, 0};
  const int64_t rows = int64_t(s.batch) * s.q_len, width = int64_t(s.num_heads) * s.head_dim;
  const double forward_flop =
      4.0 * s.batch * s.num_heads * s.head_dim * (double(s.q_len) * (s.q_len + 1) / 2);
  AttentionGrads f32_grads;
  for (ComputeDType dtype : {ComputeDType::kF32, ComputeDType::kBF16}) {
    SCOPED_TRACE(Name(dtype));
    Backend& be = Get(dtype);
    std::vector<Tensor> t;
    for (int i = 0; i < 8; ++i) {
      auto x = be.Alloc(DType::kF32, {rows, width});
      ASSERT_TRUE(x.ok()) << x.status();
      ASSERT_TRUE(be.FillUniform(*x, 1200 + i, -1.0f, 1.0f).ok());
      t.push_back(*x);
    }
    Tensor &q = t[0], &k = t[1], &v = t[2], &dout = t[3], &out = t[4], &dq = t[5], &dk = t[6],
           &dv = t[7];
    const double t_forward =
        MedianSeconds(be, 3, [&] { ASSERT_TRUE(be.Attention(q, k, v, s, out).ok()); });
    const double t_backward = MedianSeconds(
        be, 3, [&] { ASSERT_TRUE(be.AttentionBackward(q, k, v, dout, s, dq, dk, dv).ok()); });
    // The gradient pass's pair: the forward keeping its operands and statistics, the backward
    // reusing them.
    AttentionSaved saved;
    const double t_forward_saved = MedianSeconds(
        be, 3, [&] { ASSERT_TRUE(be.AttentionForBackward(q, k, v, s, out, saved).ok()); });
    const double t_backward_saved = MedianSeconds(be, 3, [&] {
      ASSERT_TRUE(be.AttentionBackwardSaved(q, k, v, out, dout, saved, s, dq, dk, dv).ok());
    });
    std::printf(
        "%-4s attention 7B chunk with saved statistics: forward %.1f ms, backward %.1f ms\n",
        Name(dtype), t_forward_saved * 1e3, t_backward_saved * 1e3);
    std::printf(
        "%-4s attention backward 7B chunk (8x2048, 32x128): %.1f ms (forward %.1f ms, %.2fx; "
        "%.1f forward-TFLOP/s)\n",
        Name(dtype), t_backward * 1e3, t_forward * 1e3, t_backward / t_forward,
        forward_flop / t_backward * 1e-12);
    AttentionGrads got{Download(be, dq), Download(be, dk), Download(be, dv)};
    if (dtype == ComputeDType::kF32) {
      f32_grads = std::move(got);
    } else {
      const double eq = RelError(got.dq, f32_grads.dq), ek = RelError(got.dk, f32_grads.dk),
                   ev = RelError(got.dv, f32_grads.dv);
      std::printf("bf16 attention backward 7B chunk against f32: dq %.2e dk %.2e dv %.2e\n", eq, ek,
                  ev);
      EXPECT_LE(eq, kAttentionBackwardBf16VsF32Bound);
      EXPECT_LE(ek, kAttentionBackwardBf16VsF32Bound);
      EXPECT_LE(ev, kAttentionBackwardBf16VsF32Bound);
    }
  }
}

}  // namespace
}  // namespace qcal::kernels
