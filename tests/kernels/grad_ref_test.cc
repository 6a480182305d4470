// Float64 oracles for the scalar references of the backward ops (kernels/cpu/ref_grad.h).
//
// Every backward reference with T = double is checked against central finite differences of its
// double forward: for a random cotangent dy, the gradient of the scalar ℓ(x) = <dy, f(x)> is
// (ℓ(x + h·e_i) − ℓ(x − h·e_i)) / 2h per input element. Sizes are odd (rows 3/5, widths 7/9/13,
// head_dim 6/10), attention has GQA (n_rep 2), q_offset > 0 and sliding windows, RoPE has llama3
// and YaRN scaling. The error is ‖g − g_fd‖ / ‖g_fd‖ against a named bound per op. Gemm is checked
// against a naive triple loop for all four transpose combinations and beta, and the float
// forwards against kernels/cpu/ref_ops.h, bit for bit (they are the same specification).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/ref_grad.h"
#include "kernels/cpu/ref_ops.h"

namespace qcal::kernels {
namespace {

// Central differences with step h have truncation error ~h²·|f'''|/6 and rounding error
// ~eps·|ℓ|/h; h = 1e-5 balances them near 1e-10 for the O(1) inputs used here. Bounds per op:
//
// Ops linear in the differentiated input (Rope, Embedding, and the Gemm-formed Linear gradients):
// the difference quotient is exact up to rounding, ~1e-11.
constexpr double kLinearOpBound = 1e-9;
// Smooth nonlinear ops (RmsNorm, SiluMul, Nll, Attention): truncation ~1e-10 relative on O(1)
// third derivatives (softmax, exp and the inverse square root have no large ones at these
// scales); 1e-7 leaves two to three orders of headroom while a wrong term (a missing factor,
// a dropped mask or GQA sum) gives errors of order 1e-1.
constexpr double kSmoothOpBound = 1e-7;
constexpr double kStep = 1e-5;

class Random {
 public:
  explicit Random(uint32_t seed) : gen_(seed) {}
  double Uniform(double scale = 1.0) {
    return std::uniform_real_distribution<double>(-scale, scale)(gen_);
  }
  std::vector<double> Doubles(int64_t n, double scale = 1.0) {
    std::vector<double> v(n);
    for (double& x : v) x = Uniform(scale);
    return v;
  }
  std::vector<float> Floats(int64_t n, double scale = 1.0) {
    std::vector<float> v(n);
    for (float& x : v) x = float(Uniform(scale));
    return v;
  }
  int Below(int n) { return std::uniform_int_distribution<int>(0, n - 1)(gen_); }

 private:
  std::mt19937 gen_;
};

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double acc = 0;
  for (size_t i = 0; i < a.size(); ++i) acc += a[i] * b[i];
  return acc;
}

// The central-difference gradient of loss() with respect to every element of x (perturbed in
// place and restored).
std::vector<double> FiniteDifference(std::vector<double>& x, const std::function<double()>& loss) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + kStep;
    const double plus = loss();
    x[i] = saved - kStep;
    const double minus = loss();
    x[i] = saved;
    g[i] = (plus - minus) / (2 * kStep);
  }
  return g;
}

double RelError(const std::vector<double>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Expects err <= bound and prints the measured error, so that the bounds can be judged.
void ExpectWithin(const char* what, double err, double bound) {
  EXPECT_LE(err, bound) << what;
  std::printf("  %-28s rel. error %.3g (bound %.0e)\n", what, err, bound);
}

RopeShape ScaledRope(RopeScaling::Type type, int seq_len, int offset, int head_dim) {
  RopeShape shape{seq_len, offset, head_dim, 10000.0};
  shape.scaling.type = type;
  shape.scaling.original_max_position_embeddings = 16;
  if (type == RopeScaling::Type::kLlama3) {
    shape.scaling.factor = 8;
    shape.scaling.low_freq_factor = 1;
    shape.scaling.high_freq_factor = 4;
  } else if (type == RopeScaling::Type::kYarn) {
    shape.scaling.factor = 4;
    shape.scaling.attention_factor = 1.1386;  // 0.1·ln(4) + 1
  }
  return shape;
}

TEST(GradRefTest, GemmMatchesTripleLoopForEveryTransposeAndBeta) {
  Random rng(1);
  const int64_t m = 5, n = 7, k = 9;
  const std::vector<double> a = rng.Doubles(m * k), b = rng.Doubles(k * n), c0 = rng.Doubles(m * n);
  for (bool trans_a : {false, true}) {
    for (bool trans_b : {false, true}) {
      for (double beta : {0.0, 0.5}) {
        SCOPED_TRACE(testing::Message()
                     << "trans_a " << trans_a << " trans_b " << trans_b << " beta " << beta);
        // a holds op(a) [m,k] either directly or transposed ([k,m]); likewise b.
        auto op_a = [&](int64_t i, int64_t p) { return trans_a ? a[p * m + i] : a[i * k + p]; };
        auto op_b = [&](int64_t p, int64_t j) { return trans_b ? b[j * k + p] : b[p * n + j]; };
        std::vector<double> want(m * n);
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            double acc = 0;
            for (int64_t p = 0; p < k; ++p) acc += op_a(i, p) * op_b(p, j);
            want[i * n + j] = -1.5 * acc + beta * c0[i * n + j];
          }
        }
        std::vector<double> c = c0;
        // beta == 0 must ignore c, NaN included.
        if (beta == 0.0) c.assign(m * n, std::numeric_limits<double>::quiet_NaN());
        ref::Gemm(a.data(), trans_a, b.data(), trans_b, m, n, k, -1.5, beta, c.data(), false);
        EXPECT_LE(RelError(c, want), 1e-15);
      }
    }
  }
}

TEST(GradRefTest, GemmBf16RoundsOperandsOnly) {
  Random rng(2);
  const int64_t m = 3, n = 5, k = 13;
  const std::vector<float> a = rng.Floats(m * k), b = rng.Floats(k * n);
  std::vector<float> ar(a), br(b);
  for (float& v : ar) v = RoundToBf16(v);
  for (float& v : br) v = RoundToBf16(v);
  std::vector<float> got(m * n), want(m * n), unrounded(m * n);
  ref::Gemm(a.data(), false, b.data(), false, m, n, k, 1.0f, 0.0f, got.data(), true);
  ref::Gemm(ar.data(), false, br.data(), false, m, n, k, 1.0f, 0.0f, want.data(), false);
  ref::Gemm(a.data(), false, b.data(), false, m, n, k, 1.0f, 0.0f, unrounded.data(), false);
  EXPECT_EQ(got, want);
  EXPECT_NE(got, unrounded);
}

// y = x·wᵀ: dx = dy·w and dw = dyᵀ·x, formed with Gemm, against finite differences of LinearT.
TEST(GradRefTest, GemmFormsLinearGradients) {
  Random rng(3);
  const int64_t m = 5, n = 7, k = 9;
  std::vector<double> x = rng.Doubles(m * k), w = rng.Doubles(n * k);
  const std::vector<double> dy = rng.Doubles(m * n);
  std::vector<double> y(m * n);
  auto loss = [&] {
    ref::LinearT(x.data(), w.data(), y.data(), m, n, k);
    return Dot(dy, y);
  };
  std::vector<double> dx(m * k), dw(n * k);
  ref::Gemm(dy.data(), false, w.data(), false, m, k, n, 1.0, 0.0, dx.data(), false);
  ref::Gemm(dy.data(), true, x.data(), false, n, k, m, 1.0, 0.0, dw.data(), false);
  ExpectWithin("Linear dx (Gemm)", RelError(dx, FiniteDifference(x, loss)), kLinearOpBound);
  ExpectWithin("Linear dw (Gemm)", RelError(dw, FiniteDifference(w, loss)), kLinearOpBound);
}

TEST(GradRefTest, RmsNormBackwardMatchesFiniteDifferences) {
  Random rng(4);
  for (const int64_t width : {1, 7, 13}) {
    SCOPED_TRACE(width);
    const int64_t rows = 5;
    // A width of 1 makes y = x·w/sqrt(x² + eps) nearly flat, with a gradient of order eps that
    // the difference quotient cannot resolve: give it a larger eps.
    const double eps = width == 1 ? 0.25 : 1e-5;
    std::vector<double> x = rng.Doubles(rows * width, 2.0);
    const std::vector<double> weight = rng.Doubles(width), dy = rng.Doubles(rows * width);
    std::vector<double> y(rows * width);
    auto loss = [&] {
      ref::RmsNormT(x.data(), weight.data(), eps, y.data(), rows, width);
      return Dot(dy, y);
    };
    std::vector<double> dx(rows * width);
    ref::RmsNormBackward(x.data(), weight.data(), eps, dy.data(), dx.data(), rows, width);
    ExpectWithin("RmsNormBackward", RelError(dx, FiniteDifference(x, loss)), kSmoothOpBound);
    // dx may alias dy.
    std::vector<double> in_place = dy;
    ref::RmsNormBackward(x.data(), weight.data(), eps, in_place.data(), in_place.data(), rows,
                         width);
    EXPECT_EQ(in_place, dx);
  }
}

TEST(GradRefTest, RopeBackwardMatchesFiniteDifferences) {
  Random rng(5);
  for (const auto type :
       {RopeScaling::Type::kDefault, RopeScaling::Type::kLlama3, RopeScaling::Type::kYarn}) {
    for (const int head_dim : {6, 10}) {
      SCOPED_TRACE(testing::Message() << RopeTypeName(type) << " head_dim " << head_dim);
      // Two sequences of 3 tokens at positions 41.., so that the scaled frequencies matter.
      const RopeShape shape = ScaledRope(type, 3, 41, head_dim);
      const int64_t rows = 6, width = 3 * head_dim;
      std::vector<double> x = rng.Doubles(rows * width);
      const std::vector<double> dy = rng.Doubles(rows * width);
      std::vector<double> y;
      auto loss = [&] {
        y = x;
        ref::RopeT(y.data(), rows, width, shape);
        return Dot(dy, y);
      };
      std::vector<double> g = dy;
      ref::RopeBackward(g.data(), rows, width, shape);
      ExpectWithin("RopeBackward", RelError(g, FiniteDifference(x, loss)), kLinearOpBound);
    }
  }
}

struct AttentionCase {
  AttentionShape shape;
  const char* what;
};

TEST(GradRefTest, AttentionBackwardMatchesFiniteDifferences) {
  Random rng(6);
  // batch, q_len, kv_len, heads, kv_heads, head_dim, q_offset, window.
  const AttentionCase cases[] = {
      {AttentionShape(2, 5, 5, 4, 2, 6, 0), "causal, GQA n_rep 2"},
      {AttentionShape(1, 3, 7, 4, 2, 10, 4), "q_offset 4"},
      {AttentionShape(2, 5, 7, 2, 1, 6, 2, 3), "q_offset 2, window 3"},
      {AttentionShape(1, 1, 1, 1, 1, 6, 0), "one token"},
  };
  for (const AttentionCase& c : cases) {
    SCOPED_TRACE(c.what);
    const AttentionShape& s = c.shape;
    const int64_t q_size = int64_t(s.batch) * s.q_len * s.num_heads * s.head_dim;
    const int64_t kv_size = int64_t(s.batch) * s.kv_len * s.num_kv_heads * s.head_dim;
    std::vector<double> q = rng.Doubles(q_size, 1.5), k = rng.Doubles(kv_size, 1.5),
                        v = rng.Doubles(kv_size);
    const std::vector<double> dout = rng.Doubles(q_size);
    std::vector<double> out(q_size);
    auto loss = [&] {
      ref::AttentionT(q.data(), k.data(), v.data(), s, out.data());
      return Dot(dout, out);
    };
    std::vector<double> dq(q_size), dk(kv_size), dv(kv_size);
    ref::AttentionBackward(q.data(), k.data(), v.data(), dout.data(), s, dq.data(), dk.data(),
                           dv.data(), false);
    ExpectWithin("AttentionBackward dq", RelError(dq, FiniteDifference(q, loss)), kSmoothOpBound);
    ExpectWithin("AttentionBackward dk", RelError(dk, FiniteDifference(k, loss)), kSmoothOpBound);
    ExpectWithin("AttentionBackward dv", RelError(dv, FiniteDifference(v, loss)), kSmoothOpBound);
  }
}

// bf16_operands rounds q, k, v and dout and nothing else: the same as rounding them beforehand.
TEST(GradRefTest, AttentionBackwardBf16RoundsOperands) {
  Random rng(7);
  const AttentionShape s(1, 3, 5, 4, 2, 6, 2, 2);
  const int64_t q_size = 3 * 4 * 6, kv_size = 5 * 2 * 6;
  std::vector<float> q = rng.Floats(q_size), k = rng.Floats(kv_size), v = rng.Floats(kv_size),
                     dout = rng.Floats(q_size);
  std::vector<float> dq(q_size), dk(kv_size), dv(kv_size);
  ref::AttentionBackward(q.data(), k.data(), v.data(), dout.data(), s, dq.data(), dk.data(),
                         dv.data(), true);
  for (auto* t : {&q, &k, &v, &dout}) {
    for (float& x : *t) x = RoundToBf16(x);
  }
  std::vector<float> dq2(q_size), dk2(kv_size), dv2(kv_size);
  ref::AttentionBackward(q.data(), k.data(), v.data(), dout.data(), s, dq2.data(), dk2.data(),
                         dv2.data(), false);
  EXPECT_EQ(dq, dq2);
  EXPECT_EQ(dk, dk2);
  EXPECT_EQ(dv, dv2);
}

TEST(GradRefTest, SiluMulBackwardMatchesFiniteDifferences) {
  Random rng(8);
  const int64_t n = 13;
  std::vector<double> gate = rng.Doubles(n, 4.0), up = rng.Doubles(n, 2.0);
  const std::vector<double> dout = rng.Doubles(n);
  std::vector<double> out(n);
  auto loss = [&] {
    ref::SiluMulT(gate.data(), up.data(), out.data(), n);
    return Dot(dout, out);
  };
  std::vector<double> dgate(n), dup(n);
  ref::SiluMulBackward(gate.data(), up.data(), dout.data(), dgate.data(), dup.data(), n);
  ExpectWithin("SiluMulBackward dgate", RelError(dgate, FiniteDifference(gate, loss)),
               kSmoothOpBound);
  ExpectWithin("SiluMulBackward dup", RelError(dup, FiniteDifference(up, loss)), kLinearOpBound);
}

TEST(GradRefTest, EmbeddingBackwardMatchesFiniteDifferences) {
  Random rng(9);
  const int64_t vocab = 5, width = 7;
  const std::vector<int32_t> ids = {3, 0, 3, 4, 3, 1, 0, 4, 2};  // repeats sum
  const int64_t n = int64_t(ids.size());
  std::vector<double> table = rng.Doubles(vocab * width);
  const std::vector<double> dout = rng.Doubles(n * width);
  std::vector<double> out(n * width);
  auto loss = [&] {
    ref::EmbeddingT(table.data(), vocab, width, ids.data(), n, out.data());
    return Dot(dout, out);
  };
  // EmbeddingBackward accumulates: start from a known table gradient.
  const std::vector<double> start = rng.Doubles(vocab * width);
  std::vector<double> dtable = start;
  ref::EmbeddingBackward(ids.data(), n, dout.data(), width, dtable.data());
  for (size_t i = 0; i < dtable.size(); ++i) dtable[i] -= start[i];
  ExpectWithin("EmbeddingBackward", RelError(dtable, FiniteDifference(table, loss)),
               kLinearOpBound);
}

TEST(GradRefTest, NllBackwardMatchesFiniteDifferences) {
  Random rng(10);
  const int64_t rows = 5, vocab = 9;
  const std::vector<int32_t> targets = {2, -1, 8, 0, -1};
  const double scale = 0.37;
  std::vector<double> logits = rng.Doubles(rows * vocab, 3.0);
  std::vector<double> nll(rows);
  auto loss = [&] {
    ref::NllT(logits.data(), rows, vocab, targets.data(), nll.data());
    double sum = 0;
    for (double v : nll) sum += v;
    return scale * sum;
  };
  std::vector<double> dlogits(rows * vocab);
  ref::NllBackward(logits.data(), rows, vocab, targets.data(), scale, dlogits.data());
  ExpectWithin("NllBackward", RelError(dlogits, FiniteDifference(logits, loss)), kSmoothOpBound);
  // Rows without a target are zero, and each predicting row sums to zero (softmax − onehot).
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) {
      sum += dlogits[r * vocab + c];
      if (targets[r] < 0) {
        EXPECT_EQ(dlogits[r * vocab + c], 0.0);
      }
    }
    EXPECT_NEAR(sum, 0.0, 1e-15);
  }
  // dlogits may alias logits.
  std::vector<double> in_place = logits;
  ref::NllBackward(in_place.data(), rows, vocab, targets.data(), scale, in_place.data());
  EXPECT_EQ(in_place, dlogits);
}

TEST(GradRefTest, ScaleRowsByNormAndAccumulateSquares) {
  Random rng(11);
  const int64_t rows = 3, width_g = 7, width_x = 5;
  const std::vector<double> g = rng.Doubles(rows * width_g), x0 = rng.Doubles(rows * width_x);
  std::vector<double> x = x0;
  ref::ScaleRowsByNorm(g.data(), rows, width_g, x.data(), width_x);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < width_g; ++c) ss += g[r * width_g + c] * g[r * width_g + c];
    for (int64_t c = 0; c < width_x; ++c) {
      EXPECT_NEAR(x[r * width_x + c], x0[r * width_x + c] * std::sqrt(ss), 1e-15);
    }
  }
  // ‖g_t‖² = 4 scales by exactly 2 (DESIGN section 3's known answer for H_tok).
  const std::vector<float> g4 = {1.0f, -1.0f, 1.0f, 1.0f, 0.0f, 2.0f, 0.0f, 0.0f};
  const std::vector<float> xf0 = rng.Floats(2 * 3);
  std::vector<float> xf = xf0;
  ref::ScaleRowsByNorm(g4.data(), 2, 4, xf.data(), 3);
  for (size_t i = 0; i < xf.size(); ++i) EXPECT_EQ(xf[i], 2.0f * xf0[i]);

  std::vector<float> f = {1.0f, 2.0f, 0.5f};
  const std::vector<float> gs = {3.0f, -0.5f, 0.0f};
  ref::AccumulateSquares(gs.data(), 3, f.data());
  EXPECT_EQ(f, (std::vector<float>{10.0f, 2.25f, 0.5f}));
}

// The float forwards are ref_ops.h's forwards: the same bits.
TEST(GradRefTest, FloatForwardsAreTheRefOps) {
  Random rng(12);
  const int64_t rows = 6, width = 20;
  const std::vector<float> x = rng.Floats(rows * width, 2.0), w = rng.Floats(9 * width),
                           weight = rng.Floats(width);
  std::vector<float> got(rows * 9), want(rows * 9);
  ref::LinearT(x.data(), w.data(), got.data(), rows, 9, width);
  ref::Linear(x.data(), w.data(), nullptr, want.data(), rows, 9, width, false, false);
  EXPECT_EQ(got, want);

  got.assign(rows * width, 0.0f);
  want.assign(rows * width, 0.0f);
  ref::RmsNormT(x.data(), weight.data(), double(1e-6f), got.data(), rows, width);
  ref::RmsNorm(x.data(), weight.data(), 1e-6f, want.data(), rows, width);
  EXPECT_EQ(got, want);

  for (const auto type : {RopeScaling::Type::kLlama3, RopeScaling::Type::kYarn}) {
    const RopeShape shape = ScaledRope(type, 3, 17, 10);
    got = x;
    want = x;
    ref::RopeT(got.data(), rows, width, shape);
    ref::Rope(want.data(), rows, width, shape);
    EXPECT_EQ(got, want) << RopeTypeName(type);
  }

  got.assign(rows * width, 0.0f);
  want.assign(rows * width, 0.0f);
  ref::SiluMulT(x.data(), x.data() + width, got.data(), (rows - 1) * width);
  ref::SiluMul(x.data(), x.data() + width, want.data(), (rows - 1) * width);
  EXPECT_EQ(got, want);

  // Two sequences of 3 queries over 5 keys (q_offset 2), 2 heads sharing 1 KV head of dim 10.
  const AttentionShape s(2, 3, 5, 2, 1, 10, 2, 4);
  const std::vector<float> q = rng.Floats(6 * 20), k = rng.Floats(10 * 10), v = rng.Floats(10 * 10);
  got.assign(6 * 20, 0.0f);
  want.assign(6 * 20, 0.0f);
  ref::AttentionT(q.data(), k.data(), v.data(), s, got.data());
  ref::Attention(q.data(), k.data(), v.data(), s, want.data(), false);
  EXPECT_EQ(got, want);

  const std::vector<int32_t> targets = {3, 19, 0, 7, 7, 12};
  got.assign(rows, 0.0f);
  want.assign(rows, 0.0f);
  ref::NllT(x.data(), rows, width, targets.data(), got.data());
  ref::Nll(x.data(), rows, width, targets.data(), want.data());
  EXPECT_EQ(got, want);
  // A target of −1 predicts nothing.
  const int32_t none = -1;
  float nll = 1.0f;
  ref::NllT(x.data(), 1, width, &none, &nll);
  EXPECT_EQ(nll, 0.0f);

  const std::vector<int32_t> ids = {4, 0, 4};
  got.assign(3 * width, 0.0f);
  want.assign(3 * width, 0.0f);
  ref::EmbeddingT(x.data(), rows, width, ids.data(), 3, got.data());
  ref::Embedding(x.data(), rows, width, ids.data(), 3, want.data());
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace qcal::kernels
