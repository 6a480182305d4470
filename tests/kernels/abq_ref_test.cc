// The ABQ integer reference (kernels/cpu/abq_ref.h) against plain arithmetic: the bit-plane sums
// equal an integer triple loop over the unpacked codes exactly for every supported (weight bits,
// activation bits, group) combination, the epilogue equals a float64 dequantized GEMM within
// its stated bound, the prologue reproduces ref::ActQuant bit for bit, GPTQ v1 tensors repack into
// planes that give back their codes, and unsupported combinations are refused.
#include "kernels/cpu/abq_ref.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/quant_ref.h"
#include "kernels/cpu/ref_ops.h"
#include "services/engine/export/gptq_pack.h"
#include "tests/kernels/abq_test_cases.h"
#include "tests/kernels/kernel_test_random.h"

namespace qcal::kernels {
namespace {

using abq_tests::AllCombos;
using abq_tests::Combo;
using abq_tests::Name;
using abq_tests::Shape3;
using kernel_tests::Random;
using ::testing::HasSubstr;

// One-element operands for the small cases below.
const std::vector<int32_t> kOneZero = {1};
const std::vector<float> kOneScale = {1.0f};

// Odd M, K off every word and tile width, and size 1.
constexpr Shape3 kShapes[] = {{1, 1, 1}, {3, 5, 31}, {5, 3, 129}, {1, 7, 300}, {7, 2, 257}};

// Random codes of one case; extreme = every code at the end of its range that maximizes |sums|.
struct Case {
  AbqSpec spec;
  int64_t m, n, k, n_groups;
  std::vector<int32_t> wcodes, zeros, acodes;
  std::vector<float> wscales, ascales;
};

Case MakeCase(const Combo& c, const Shape3& s, Random& rng, bool extreme) {
  Case x;
  x.spec = {c.wb, c.ab, c.group};
  x.m = s.m;
  x.n = s.n;
  x.k = s.k;
  x.n_groups = AbqNumGroups(x.spec, s.k);
  const int max_code = c.balanced ? 4 : (1 << c.wb) - 1;
  const int amax = (1 << (c.ab - 1)) - 1;
  for (int64_t i = 0; i < s.n * s.k; ++i) {
    x.wcodes.push_back(extreme ? max_code : rng.Below(max_code + 1));
  }
  for (int64_t i = 0; i < x.n_groups * s.n; ++i) {
    x.zeros.push_back(extreme ? (1 << c.wb) : 1 + rng.Below(1 << c.wb));  // GPTQ v1: [1, 2^b]
    x.wscales.push_back(std::ldexp(1.0f + rng.Uniform(0.5f), -3 - rng.Below(6)));
  }
  for (int64_t i = 0; i < s.m * s.k; ++i) {
    x.acodes.push_back(extreme ? -amax : rng.Below(2 * amax + 1) - amax);
  }
  for (int64_t t = 0; t < s.m; ++t) x.ascales.push_back(0.01f + std::fabs(rng.Uniform(1.0f)));
  return x;
}

// dot[t][o][G] by the definition: Σ over the group's columns of a·q, in int64.
std::vector<int64_t> PlainDots(const Case& x) {
  const int64_t g = AbqGroupSize(x.spec, x.k);
  std::vector<int64_t> dot(static_cast<size_t>(x.m * x.n * x.n_groups), 0);
  for (int64_t t = 0; t < x.m; ++t) {
    for (int64_t o = 0; o < x.n; ++o) {
      for (int64_t c = 0; c < x.k; ++c) {
        dot[(t * x.n + o) * x.n_groups + c / g] +=
            int64_t{x.acodes[t * x.k + c]} * x.wcodes[o * x.k + c];
      }
    }
  }
  return dot;
}

TEST(AbqRef, IntegerSumsEqualPlainTripleLoop) {
  Random rng(7);
  int cases = 0;
  for (const Combo& c : AllCombos()) {
    for (const Shape3& s : kShapes) {
      for (bool extreme : {false, true}) {
        const Case x = MakeCase(c, s, rng, extreme);
        SCOPED_TRACE(Name(c, s) + (extreme ? " extreme" : ""));
        absl::StatusOr<AbqWeights> w =
            PackAbqWeights(x.wcodes, x.zeros, x.wscales, x.n, x.k, x.spec);
        ASSERT_TRUE(w.ok()) << w.status();
        absl::StatusOr<AbqActivations> a =
            PackAbqActivationCodes(x.acodes, x.ascales, x.m, x.k, x.spec);
        ASSERT_TRUE(a.ok()) << a.status();
        EXPECT_EQ(UnpackAbqWeightCodes(*w), x.wcodes);
        EXPECT_EQ(UnpackAbqActivationCodes(*a), x.acodes);
        absl::StatusOr<std::vector<int32_t>> dot = AbqIntegerGemm(*a, *w);
        ASSERT_TRUE(dot.ok()) << dot.status();
        const std::vector<int64_t> want = PlainDots(x);
        ASSERT_EQ(dot->size(), want.size());
        for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ((*dot)[i], want[i]) << "at " << i;
        // Σa per group, by the definition.
        const int64_t g = AbqGroupSize(x.spec, x.k);
        std::vector<int32_t> sums(static_cast<size_t>(x.m * x.n_groups), 0);
        for (int64_t t = 0; t < x.m; ++t) {
          for (int64_t col = 0; col < x.k; ++col) {
            sums[t * x.n_groups + col / g] += x.acodes[t * x.k + col];
          }
        }
        EXPECT_EQ(a->sums, sums);
        ++cases;
      }
    }
  }
  EXPECT_EQ(cases, 30 * 5 * 2);
}

// The largest group ValidateAbqShape admits at W8A8 with every code at the worst end: the sums
// stay exact in int32.
TEST(AbqRef, LargestGroupIsExactAtW8A8) {
  const AbqSpec spec{8, 8, -1};
  const int64_t k = std::numeric_limits<int32_t>::max() / (127 * 511);
  ASSERT_TRUE(ValidateAbqShape(spec, 1, 1, k).ok());
  EXPECT_FALSE(ValidateAbqShape(spec, 1, 1, k + 1).ok());
  const std::vector<int32_t> wcodes(k, 255), acodes(k, -127);
  const std::vector<int32_t> zero = {256};
  absl::StatusOr<AbqWeights> w = PackAbqWeights(wcodes, zero, kOneScale, 1, k, spec);
  absl::StatusOr<AbqActivations> a = PackAbqActivationCodes(acodes, kOneScale, 1, k, spec);
  ASSERT_TRUE(w.ok() && a.ok());
  absl::StatusOr<std::vector<int32_t>> dot = AbqIntegerGemm(*a, *w);
  ASSERT_TRUE(dot.ok()) << dot.status();
  EXPECT_EQ((*dot)[0], -255 * 127 * k);
  absl::StatusOr<std::vector<float>> y = AbqEpilogue(*dot, *a, *w);
  ASSERT_TRUE(y.ok()) << y.status();
  // c = a·(q - z) = -127·(255 - 256)·k.
  EXPECT_EQ((*y)[0], static_cast<float>(127 * k));
}

// The epilogue against a float64 GEMM of the dequantized operands, within the named bound; and
// the bound is not vacuous: it is below 1e-5 of the result's magnitude scale.
TEST(AbqRef, EpilogueMatchesDequantizedGemmWithinBound) {
  Random rng(11);
  double worst = 0;
  for (const Combo& c : AllCombos()) {
    for (const Shape3& s : kShapes) {
      const Case x = MakeCase(c, s, rng, false);
      SCOPED_TRACE(Name(c, s));
      absl::StatusOr<AbqWeights> w = PackAbqWeights(x.wcodes, x.zeros, x.wscales, x.n, x.k, x.spec);
      absl::StatusOr<AbqActivations> a =
          PackAbqActivationCodes(x.acodes, x.ascales, x.m, x.k, x.spec);
      ASSERT_TRUE(w.ok() && a.ok());
      absl::StatusOr<std::vector<int32_t>> dot = AbqIntegerGemm(*a, *w);
      ASSERT_TRUE(dot.ok());
      absl::StatusOr<std::vector<float>> y = AbqEpilogue(*dot, *a, *w);
      ASSERT_TRUE(y.ok()) << y.status();
      const int64_t g = AbqGroupSize(x.spec, x.k);
      for (int64_t t = 0; t < x.m; ++t) {
        for (int64_t o = 0; o < x.n; ++o) {
          double ref = 0, scale = 0;
          for (int64_t col = 0; col < x.k; ++col) {
            const int64_t gr = col / g;
            const double xa = double{x.ascales[t]} * x.acodes[t * x.k + col];
            const double wq =
                double{x.wscales[gr * x.n + o]} * (x.wcodes[o * x.k + col] - x.zeros[gr * x.n + o]);
            ref += xa * wq;
            scale += std::fabs(xa * wq);
          }
          const double got = (*y)[t * x.n + o];
          const double bound = AbqEpilogueErrorBound(*dot, *a, *w, t, o);
          ASSERT_LE(std::fabs(got - ref), bound) << "t " << t << " o " << o;
          EXPECT_LE(bound, 1e-5 * scale + 1e-30);
          if (scale > 0) worst = std::max(worst, std::fabs(got - ref) / scale);
        }
      }
    }
  }
  EXPECT_LT(worst, 1e-6);
}

// The contract that makes the ABQ path and the dequantizing path agree: for weights s_w·(q − z)
// with fp16 scales (a GPTQ checkpoint's), AbqGemm of the quantized activations equals
// ref::ActQuantLinear of the dequantized weights bit for bit, with scales of one row spread over
// 2^12 (every supported combination and shape; inputs with an all-zero token).
TEST(AbqRef, EpilogueEqualsTheDequantizingPathBitForBit) {
  Random rng(29);
  int64_t outputs = 0;
  for (const Combo& c : AllCombos()) {
    for (const Shape3& s : kShapes) {
      Case x = MakeCase(c, s, rng, false);
      SCOPED_TRACE(Name(c, s));
      for (float& v : x.wscales) v = RoundToHalf(std::ldexp(v, -rng.Below(7)));
      absl::StatusOr<AbqWeights> w = PackAbqWeights(x.wcodes, x.zeros, x.wscales, x.n, x.k, x.spec);
      ASSERT_TRUE(w.ok()) << w.status();
      const int64_t g = AbqGroupSize(x.spec, x.k);
      std::vector<float> wd(static_cast<size_t>(x.n * x.k));
      for (int64_t o = 0; o < x.n; ++o) {
        for (int64_t col = 0; col < x.k; ++col) {
          const int64_t gr = col / g;
          wd[o * x.k + col] = x.wscales[gr * x.n + o] *
                              static_cast<float>(x.wcodes[o * x.k + col] - x.zeros[gr * x.n + o]);
        }
      }
      std::vector<float> in(static_cast<size_t>(x.m * x.k));
      for (float& v : in) v = rng.Uniform(3.0f);
      for (int64_t col = 0; col < x.k; ++col) in[col] = 0.0f;  // token 0: s_a = 0
      absl::StatusOr<AbqActivations> a = AbqQuantizeActivations(in, x.m, x.k, x.spec);
      ASSERT_TRUE(a.ok()) << a.status();
      absl::StatusOr<std::vector<float>> y = AbqGemm(*a, *w);
      ASSERT_TRUE(y.ok()) << y.status();
      std::vector<float> want(static_cast<size_t>(x.m * x.n));
      ref::ActQuantLinear(in.data(), x.m, x.k, c.ab, wd.data(), x.n, nullptr, want.data(), false);
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(std::bit_cast<uint32_t>((*y)[i]), std::bit_cast<uint32_t>(want[i]))
            << "output " << i << ": " << (*y)[i] << " against " << want[i];
      }
      outputs += static_cast<int64_t>(want.size());
    }
  }
  EXPECT_GT(outputs, 500);
}

// The prologue: codes and scales as ref::ActQuant computes them (s_a·a is its output bit for bit),
// including a zero row and a row whose maximum is negative.
TEST(AbqRef, PrologueReproducesActQuant) {
  Random rng(3);
  for (int ab : {4, 8}) {
    for (const Shape3& s : kShapes) {
      const int64_t m = s.m + 1, k = s.k;
      std::vector<float> x(static_cast<size_t>(m * k));
      for (float& v : x) v = rng.Uniform(3.0f);
      for (int64_t c = 0; c < k; ++c) x[c] = 0.0f;  // token 0: all zero
      if (k > 2) x[k + 1] = -50.0f;                 // token 1: negative maximum
      const AbqSpec spec{4, ab, 128};
      absl::StatusOr<AbqActivations> a = AbqQuantizeActivations(x, m, k, spec);
      ASSERT_TRUE(a.ok()) << a.status();
      std::vector<float> want(x.size());
      ref::ActQuant(x.data(), m, k, ab, want.data());
      const std::vector<int32_t> codes = UnpackAbqActivationCodes(*a);
      for (int64_t t = 0; t < m; ++t) {
        for (int64_t c = 0; c < k; ++c) {
          const float got = a->scales[t] * static_cast<float>(codes[t * k + c]);
          ASSERT_EQ(got, want[t * k + c]) << "ab " << ab << " t " << t << " c " << c;
        }
      }
      EXPECT_EQ(a->scales[0], 0.0f);
      if (k > 2) {
        EXPECT_EQ(codes[k + 1], -((1 << (ab - 1)) - 1));
      }
    }
  }
}

// GPTQ v1 tensors (written by the exporter's packer) repack into planes with the same codes, zero
// points and scales, at every stored width; a balanced checkpoint is a 3-bit one.
TEST(AbqRef, GptqV1CheckpointRepacksIntoPlanes) {
  Random rng(5);
  for (const Combo& c : AllCombos()) {
    if (c.ab != 8) continue;
    for (const Shape3& s : {Shape3{1, 1, 1}, Shape3{1, 33, 300}, Shape3{1, 70, 129}}) {
      const Case x = MakeCase(c, s, rng, false);
      SCOPED_TRACE(Name(c, s));
      const int b = c.wb;
      absl::StatusOr<std::vector<int32_t>> qweight = engine::PackQweight(x.wcodes, x.n, x.k, b);
      ASSERT_TRUE(qweight.ok()) << qweight.status();
      absl::StatusOr<std::vector<int32_t>> qzeros = engine::PackQzeros(x.zeros, x.n_groups, x.n, b);
      ASSERT_TRUE(qzeros.ok()) << qzeros.status();
      const int64_t g = AbqGroupSize(x.spec, x.k);
      std::vector<int32_t> g_idx(static_cast<size_t>(x.k));
      for (int64_t i = 0; i < x.k; ++i) g_idx[i] = static_cast<int32_t>(i / g);
      absl::StatusOr<AbqWeights> w =
          PackGptqV1ToAbq(*qweight, *qzeros, x.wscales, g_idx, x.n, x.k, x.spec);
      ASSERT_TRUE(w.ok()) << w.status();
      EXPECT_EQ(UnpackAbqWeightCodes(*w), x.wcodes);
      EXPECT_EQ(w->zeros, x.zeros);
      EXPECT_EQ(w->scales, x.wscales);
      absl::StatusOr<AbqWeights> direct =
          PackAbqWeights(x.wcodes, x.zeros, x.wscales, x.n, x.k, x.spec);
      ASSERT_TRUE(direct.ok());
      EXPECT_EQ(w->planes, direct->planes);
      if (x.k >= 2 && x.n_groups > 1) {
        std::swap(g_idx[0], g_idx[x.k - 1]);  // act-order
        absl::StatusOr<AbqWeights> bad =
            PackGptqV1ToAbq(*qweight, *qzeros, x.wscales, g_idx, x.n, x.k, x.spec);
        ASSERT_FALSE(bad.ok());
        EXPECT_THAT(std::string(bad.status().message()), HasSubstr("act-order"));
      }
    }
  }
}

// A linear quantized by the CPU quantizer (RTN) and written as GPTQ v1 tensors, repacked into
// planes and multiplied by prologue-quantized activations, equals the fake-quant path
// ActQuant(x) · Dequantized(W)ᵀ (evaluated in float64) within the epilogue's bound plus the
// rounding of ActQuant's fp32 products s_a·a: for every grid ABQ takes, the balanced one included.
TEST(AbqRef, QuantizedLinearMatchesTheFakeQuantPath) {
  Random rng(13);
  struct Grid {
    int bits, group;
    bool symmetric;
    GridKind grid;
  };
  const int64_t m = 5, n = 37, k = 300;
  for (const Grid& gr :
       {Grid{2, 32, false, GridKind::kBalanced}, Grid{2, 128, true, GridKind::kBalanced},
        Grid{2, -1, false, GridKind::kUniform}, Grid{3, 32, false, GridKind::kUniform},
        Grid{4, 128, false, GridKind::kUniform}, Grid{8, -1, true, GridKind::kUniform}}) {
    for (int ab : {4, 8}) {
      SCOPED_TRACE(absl::StrCat("bits ", gr.bits, " g", gr.group, " grid ",
                                static_cast<int>(gr.grid), " sym ", gr.symmetric, " A", ab));
      QuantSpec spec;
      spec.bits = gr.bits;
      spec.group_size = gr.group;
      spec.symmetric = gr.symmetric;
      spec.grid = gr.grid;
      std::vector<float> w(static_cast<size_t>(n * k)), x(static_cast<size_t>(m * k));
      for (float& v : w) v = rng.Uniform(0.1f);
      for (float& v : x) v = rng.Uniform(2.0f);
      absl::StatusOr<QuantizedLinear> q = ref::QuantizeRtn(w.data(), n, k, spec);
      ASSERT_TRUE(q.ok()) << q.status();
      EXPECT_EQ(*std::max_element(q->codes.begin(), q->codes.end()), MaxCode(spec));
      const int b = CodeBits(spec);
      absl::StatusOr<std::vector<int32_t>> qweight = engine::PackQweight(q->codes, n, k, b);
      absl::StatusOr<std::vector<int32_t>> qzeros = engine::PackQzeros(q->zeros, q->n_groups, n, b);
      ASSERT_TRUE(qweight.ok() && qzeros.ok());
      absl::StatusOr<AbqSpec> abq = AbqSpecFor(spec, ab);
      ASSERT_TRUE(abq.ok()) << abq.status();
      absl::StatusOr<AbqWeights> pw =
          PackGptqV1ToAbq(*qweight, *qzeros, q->scales, q->g_idx, n, k, *abq);
      ASSERT_TRUE(pw.ok()) << pw.status();
      absl::StatusOr<AbqActivations> pa = AbqQuantizeActivations(x, m, k, *abq);
      ASSERT_TRUE(pa.ok()) << pa.status();
      absl::StatusOr<std::vector<int32_t>> dot = AbqIntegerGemm(*pa, *pw);
      ASSERT_TRUE(dot.ok());
      absl::StatusOr<std::vector<float>> y = AbqEpilogue(*dot, *pa, *pw);
      ASSERT_TRUE(y.ok());

      std::vector<float> xq(x.size());
      ref::ActQuant(x.data(), m, k, ab, xq.data());
      const std::vector<float> wd = q->Dequantized();
      for (int64_t t = 0; t < m; ++t) {
        for (int64_t o = 0; o < n; ++o) {
          double ref = 0, abs_sum = 0;
          for (int64_t c = 0; c < k; ++c) {
            const double p = double{xq[t * k + c]} * wd[o * k + c];
            ref += p;
            abs_sum += std::fabs(p);
          }
          const double bound =
              AbqEpilogueErrorBound(*dot, *pa, *pw, t, o) + std::ldexp(1.0, -23) * abs_sum;
          ASSERT_LE(std::fabs((*y)[t * n + o] - ref), bound) << "t " << t << " o " << o;
        }
      }
    }
  }
}

TEST(AbqRef, RefusesUnsupportedCombinations) {
  auto message = [](const AbqSpec& spec) {
    const absl::Status st = ValidateAbqSpec(spec);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    return std::string(st.message());
  };
  EXPECT_THAT(message({4, 16, 128}), HasSubstr("activation bits 16"));
  EXPECT_THAT(message({4, 6, 128}), HasSubstr("activation bits must be 4 or 8, got 6"));
  EXPECT_THAT(message({5, 8, 128}), HasSubstr("weight bits must be 2, 3, 4 or 8"));
  EXPECT_THAT(message({5, 8, 128}), HasSubstr("got 5"));
  EXPECT_THAT(message({4, 8, 48}), HasSubstr("multiple of 32"));
  EXPECT_THAT(message({4, 8, 0}), HasSubstr("multiple of 32"));
  EXPECT_TRUE(ValidateAbqSpec({8, 4, -1}).ok());

  QuantSpec balanced;
  balanced.bits = 2;
  balanced.grid = GridKind::kBalanced;
  balanced.group_size = 128;
  absl::StatusOr<AbqSpec> b = AbqSpecFor(balanced, 8);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->weight_bits, 3);
  QuantSpec cube = balanced;
  cube.grid = GridKind::kCuberoot;
  EXPECT_THAT(std::string(AbqSpecFor(cube, 8).status().message()), HasSubstr("cuberoot"));
  QuantSpec five;
  five.bits = 5;
  EXPECT_THAT(std::string(AbqSpecFor(five, 8).status().message()), HasSubstr("got 5"));

  // Codes outside their range and mismatched operands.
  const AbqSpec spec{2, 4, -1};
  EXPECT_FALSE(PackAbqWeights(std::vector<int32_t>{4}, kOneZero, kOneScale, 1, 1, spec).ok());
  EXPECT_FALSE(PackAbqActivationCodes(std::vector<int32_t>{-8}, kOneScale, 1, 1, spec).ok());
  absl::StatusOr<AbqWeights> w =
      PackAbqWeights(std::vector<int32_t>{1, 2}, kOneZero, kOneScale, 1, 2, spec);
  absl::StatusOr<AbqActivations> a =
      PackAbqActivationCodes(std::vector<int32_t>{1}, kOneScale, 1, 1, spec);
  ASSERT_TRUE(w.ok() && a.ok());
  EXPECT_FALSE(AbqIntegerGemm(*a, *w).ok());
}

// ValidateAbqWeights accepts what PackAbqWeights builds and names what breaks its invariants;
// ParseAbqKernel and AbqKernelName are inverses.
TEST(AbqRef, WeightInvariantsAndKernelNames) {
  Random rng(19);
  const AbqWeights good = abq_tests::RandomWeights({4, false, 8, 32}, 3, 70, rng);
  EXPECT_TRUE(ValidateAbqWeights(good).ok());
  AbqWeights w = good;
  w.zeros[1] = 17;
  EXPECT_THAT(std::string(ValidateAbqWeights(w).message()), HasSubstr("zero point 17"));
  w = good;
  w.scales[2] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(std::string(ValidateAbqWeights(w).message()), HasSubstr("not finite"));
  w = good;
  w.planes.back() |= 1u << 31;  // column 95 of a 70-column row
  EXPECT_THAT(std::string(ValidateAbqWeights(w).message()), HasSubstr("padding must be 0"));
  w = good;
  w.planes.pop_back();
  EXPECT_THAT(std::string(ValidateAbqWeights(w).message()), HasSubstr("planes has"));
  w = good;
  w.n_groups = 2;
  EXPECT_THAT(std::string(ValidateAbqWeights(w).message()), HasSubstr("n_groups 2"));
  for (AbqKernel k : {AbqKernel::kBinaryMma, AbqKernel::kInt8Mma, AbqKernel::kWeightOnly}) {
    absl::StatusOr<AbqKernel> parsed = ParseAbqKernel(AbqKernelName(k));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, k);
  }
  EXPECT_THAT(std::string(ParseAbqKernel("xor").status().message()), HasSubstr("\"xor\""));
}

// The CPU backend's AbqLinear is the reference: b1 and int8 give AbqGemm of
// AbqQuantizeActivations bit for bit, a16 gives AbqWeightOnlyReference rounded to fp32, the bias
// is added to the layer's output and that sum stored or (accumulate) added, in fp32.
TEST(AbqRef, CpuBackendRunsTheReference) {
  BackendOptions options;
  options.threads = 2;
  auto backend = CreateBackend(options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  Backend& be = **backend;
  ASSERT_TRUE(be.SupportsOp(Op::kAbqLinear));
  Random rng(20);
  const Shape3 shapes[] = {{1, 1, 1}, {3, 5, 31}, {7, 33, 257}, {40, 9, 300}};
  for (const Combo& c : AllCombos()) {
    for (const Shape3& s : shapes) {
      const std::string name = Name(c, s);
      const AbqWeights w = abq_tests::RandomWeights(c, s.n, s.k, rng);
      absl::StatusOr<std::shared_ptr<const PreparedAbqLinear>> prepared = be.PrepareAbqLinear(w);
      ASSERT_TRUE(prepared.ok()) << name << ": " << prepared.status();
      EXPECT_EQ((*prepared)->n(), s.n);
      EXPECT_EQ((*prepared)->k(), s.k);
      const std::vector<float> xv = abq_tests::RandomX(s.m, s.k, rng);
      Tensor x = Tensor::Zeros(DType::kF32, {s.m, s.k});
      std::copy(xv.begin(), xv.end(), x.data<float>());
      const Tensor bias = rng.Floats({s.n});
      const Tensor y0 = rng.Floats({s.m, s.n});
      auto a = AbqQuantizeActivations(xv, s.m, s.k, w.spec);
      ASSERT_TRUE(a.ok()) << a.status();
      auto integer = AbqGemm(*a, w);
      auto a16 = AbqWeightOnlyReference(xv, s.m, w);
      ASSERT_TRUE(integer.ok() && a16.ok());
      for (AbqKernel kernel :
           {AbqKernel::kBinaryMma, AbqKernel::kInt8Mma, AbqKernel::kWeightOnly}) {
        SCOPED_TRACE(absl::StrCat(name, " ", AbqKernelName(kernel)));
        std::vector<float> want(static_cast<size_t>(s.m * s.n));
        for (size_t i = 0; i < want.size(); ++i) {
          want[i] =
              kernel == AbqKernel::kWeightOnly ? static_cast<float>((*a16)[i]) : (*integer)[i];
        }
        Tensor y = Tensor::Zeros(DType::kF32, {s.m, s.n});
        ASSERT_TRUE(be.AbqLinear(**prepared, kernel, x, nullptr, y, false).ok());
        Tensor acc = y0.Clone();
        ASSERT_TRUE(be.AbqLinear(**prepared, kernel, x, &bias, acc, true).ok());
        for (int64_t i = 0; i < s.m * s.n; ++i) {
          ASSERT_EQ(y.data<float>()[i], want[i]) << "at " << i;
          const float sum = want[i] + bias.data<float>()[i % s.n];
          ASSERT_EQ(acc.data<float>()[i], y0.data<float>()[i] + sum) << "at " << i;
        }
      }
    }
  }
  // Operands that do not fit, and weights the invariants reject.
  const AbqWeights w = abq_tests::RandomWeights({2, false, 4, -1}, 4, 40, rng);
  auto prepared = be.PrepareAbqLinear(w);
  ASSERT_TRUE(prepared.ok()) << prepared.status();
  Tensor x = rng.Floats({2, 40}), y = Tensor::Zeros(DType::kF32, {2, 4});
  Tensor wide = rng.Floats({2, 41}), bias = rng.Floats({5});
  EXPECT_THAT(
      std::string(
          be.AbqLinear(**prepared, AbqKernel::kBinaryMma, wide, nullptr, y, false).message()),
      HasSubstr("do not fit a [4, 40] linear"));
  EXPECT_THAT(
      std::string(be.AbqLinear(**prepared, AbqKernel::kBinaryMma, x, &bias, y, false).message()),
      HasSubstr("bias"));
  Tensor none = Tensor::Zeros(DType::kF32, {0, 40}), out = Tensor::Zeros(DType::kF32, {0, 4});
  EXPECT_TRUE(be.AbqLinear(**prepared, AbqKernel::kBinaryMma, none, nullptr, out, false).ok());
  AbqWeights bad = w;
  bad.zeros[0] = 9;
  EXPECT_THAT(std::string(be.PrepareAbqLinear(bad).status().message()), HasSubstr("zero point"));
}

}  // namespace
}  // namespace qcal::kernels
