// The ABQ CUDA kernels (kernels/cuda/cuda_abq.h) against the CPU integer reference
// (kernels/cpu/abq_ref.h) on random data, for every supported (weight bits 2, 3, 4, 8 and the
// balanced grid on 3 planes) × (activation bits 4, 8) × (group -1, 32, 128): the prologue's planes,
// scales and Σa are identical; both integer kernels (b1 AND + popcount and unpack-to-int8) give
// the reference's integer sums exactly and its outputs bit for bit, from x (the whole layer) and
// from the reference's packed activations (the b1 decode kernel at every m from 1 to 16, and the
// fused one-launch layer at m = 1, besides);
// the weight-only A16 kernel is within AbqWeightOnlyErrorBound of its float64 reference. Shapes
// cover size 1, odd m (1, 3, 7, 16 and the prefill sizes 37 and 256), k off every word and tile
// width, and odd n across several warps and blocks. The CUDA backend's AbqLinear (the device entry
// point on the backend's stream, bias and accumulation) equals the CPU backend's. Skips without a
// GPU.
#include "kernels/cuda/cuda_abq.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/abq_ref.h"
#include "kernels/cuda/cuda_backend.h"
#include "tests/kernels/abq_test_cases.h"
#include "tests/kernels/kernel_test_random.h"

namespace qcal::kernels {
namespace {

using abq_tests::AllCombos;
using abq_tests::Combo;
using abq_tests::Name;
using abq_tests::RandomWeights;
using abq_tests::RandomX;
using abq_tests::Shape3;
using kernel_tests::Random;
using ::testing::HasSubstr;

constexpr AbqKernel kIntegerKernels[] = {AbqKernel::kBinaryMma, AbqKernel::kInt8Mma};

// Size 1; k below one word, off a word, off the k128 and k256 tiles, several k-groups; n across
// blocks (b1 tiled: 16/wb outputs a block; int8 and A16: 16); m one decode tile, a full one, and
// prefill over 3 and 16 token tiles. The GEMM kernels' variants: b1 decode (m <= 16 at groups -1
// and 128) and tiled (m 37 and 256, and g32 at every m) with 1, 4 and all n8 tiles, k-groups cut
// into parts (fewer than 16 groups) or whole, one round of groups or several (k 6000 at g32 with
// m = 1: 188 groups; k 1000 at g32 with m = 16).
constexpr Shape3 kShapes[] = {{1, 1, 1},    {1, 37, 300},   {3, 5, 31},    {7, 133, 257},
                              {1, 9, 6000}, {16, 19, 1000}, {37, 21, 520}, {256, 33, 384}};

// Number of positions where a and b differ (bit patterns for floats), with the first few
// reported under `what`.
template <typename T>
int64_t CountMismatches(const std::vector<T>& got, const std::vector<T>& want,
                        const std::string& what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      if (++bad <= 3)
        ADD_FAILURE() << what << " [" << i << "]: got " << got[i] << ", want " << want[i];
    }
  }
  return bad;
}

class CudaAbqTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(CudaAbqTest, PrologueEqualsReferenceBitForBit) {
  Random rng(11);
  for (const Combo& c : AllCombos()) {
    for (const Shape3& s : kShapes) {
      const std::string name = Name(c, s);
      const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
      const std::vector<float> x = RandomX(s.m, s.k, rng);
      auto ref = AbqQuantizeActivations(x, s.m, s.k, w.spec);
      ASSERT_TRUE(ref.ok()) << name << ": " << ref.status();
      auto lin = CudaAbqLinear::Create(w, 0);
      ASSERT_TRUE(lin.ok()) << name << ": " << lin.status();
      auto got = (*lin)->QuantizeActivations(x, s.m);
      ASSERT_TRUE(got.ok()) << name << ": " << got.status();
      EXPECT_EQ(CountMismatches(got->planes, ref->planes, name + " planes"), 0);
      EXPECT_EQ(CountMismatches(got->scales, ref->scales, name + " s_a"), 0);
      EXPECT_EQ(CountMismatches(got->sums, ref->sums, name + " sums"), 0);
    }
  }
}

// `kernels` on random operands of combination c and shape s against the CPU reference: the
// integer sums exactly and y bit for bit, from x (the whole layer, with and without the sums
// output: the timed path) and from the reference's packed activations.
// The same on given weights.
void ExpectKernelsEqualReference(const AbqWeights& w, const std::string& name, const Shape3& s,
                                 std::initializer_list<AbqKernel> kernels, Random& rng,
                                 CudaAbqLinear::B1Kernel b1) {
  const std::vector<float> x = RandomX(s.m, s.k, rng);
  auto a = AbqQuantizeActivations(x, s.m, s.k, w.spec);
  ASSERT_TRUE(a.ok()) << name << ": " << a.status();
  auto dot_ref = AbqIntegerGemm(*a, w);
  ASSERT_TRUE(dot_ref.ok()) << name << ": " << dot_ref.status();
  auto y_ref = AbqEpilogue(*dot_ref, *a, w);
  ASSERT_TRUE(y_ref.ok()) << name << ": " << y_ref.status();
  auto lin = CudaAbqLinear::Create(w, 0);
  ASSERT_TRUE(lin.ok()) << name << ": " << lin.status();
  ASSERT_TRUE((*lin)->set_b1_kernel(b1).ok());
  for (AbqKernel kernel : kernels) {
    const std::string kname = absl::StrCat(name, " ", AbqKernelName(kernel));
    std::vector<int32_t> dot;
    auto y = (*lin)->Forward(x, s.m, kernel, &dot);
    ASSERT_TRUE(y.ok()) << kname << ": " << y.status();
    EXPECT_EQ(CountMismatches(dot, *dot_ref, kname + " forward sums"), 0);
    EXPECT_EQ(CountMismatches(*y, *y_ref, kname + " forward y"), 0);
    auto y_plain = (*lin)->Forward(x, s.m, kernel);
    ASSERT_TRUE(y_plain.ok()) << kname << ": " << y_plain.status();
    EXPECT_EQ(CountMismatches(*y_plain, *y_ref, kname + " forward y (no sums)"), 0);
    std::vector<int32_t> dot_gemm;
    auto y_gemm = (*lin)->Gemm(*a, kernel, &dot_gemm);
    ASSERT_TRUE(y_gemm.ok()) << kname << ": " << y_gemm.status();
    EXPECT_EQ(CountMismatches(dot_gemm, *dot_ref, kname + " gemm sums"), 0);
    EXPECT_EQ(CountMismatches(*y_gemm, *y_ref, kname + " gemm y"), 0);
  }
}

void ExpectKernelsEqualReference(const Combo& c, const Shape3& s,
                                 std::initializer_list<AbqKernel> kernels, Random& rng,
                                 CudaAbqLinear::B1Kernel b1 = CudaAbqLinear::B1Kernel::kDispatch) {
  const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
  ExpectKernelsEqualReference(w, Name(c, s), s, kernels, rng, b1);
}

// A one-token kernel (`b1`: kFused or kDp4a) for every combo and shape, with scales of a few
// binades (s_w and z read as 8 bytes) and the same rounded to fp16 (read as one word:
// AbqDeviceWeights::meta): it takes m = 1 and not 2, makes the one-word form exactly where the
// scales are fp16 values, and equals the reference.
void ExpectOneTokenKernelEqualsReference(const std::vector<Combo>& combos,
                                         std::span<const Shape3> shapes, CudaAbqLinear::B1Kernel b1,
                                         Random& rng) {
  const bool dp4a = b1 == CudaAbqLinear::B1Kernel::kDp4a;
  for (const Combo& c : combos) {
    for (const Shape3& s : shapes) {
      for (bool fp16 : {false, true}) {
        AbqWeights w = RandomWeights(c, s.n, s.k, rng);
        if (fp16) {
          for (float& v : w.scales) v = RoundToHalf(v);
        }
        const std::string name =
            absl::StrCat(Name(c, s), fp16 ? " fp16 scales" : "", dp4a ? " dp4a" : " fused");
        auto lin = CudaAbqLinear::Create(w, 0);
        ASSERT_TRUE(lin.ok()) << lin.status();
        EXPECT_FALSE((*lin)->HasCompactMeta()) << name;  // made when the kernel is chosen
        ASSERT_TRUE((*lin)->set_b1_kernel(b1).ok()) << name;
        auto applies = [&](int64_t m) {
          return dp4a ? (*lin)->Dp4aApplies(m) : (*lin)->FusedApplies(m);
        };
        ASSERT_TRUE(applies(1)) << name;
        EXPECT_FALSE(applies(2)) << name;
        EXPECT_EQ((*lin)->HasCompactMeta(), fp16) << name;
        ExpectKernelsEqualReference(w, name, s, {AbqKernel::kBinaryMma}, rng, b1);
      }
    }
  }
}

TEST_F(CudaAbqTest, IntegerKernelsEqualReferenceBitForBit) {
  Random rng(12);
  for (const Combo& c : AllCombos()) {
    for (const Shape3& s : kShapes) {
      ExpectKernelsEqualReference(c, s, {AbqKernel::kBinaryMma, AbqKernel::kInt8Mma}, rng);
    }
  }
}

// The b1 GEMV kernel (kBinaryMma for m <= kAbqGemvTokens) and the b1 decode kernel (kBinaryMma
// for m <= kAbqDecodeTokens, and forced at m <= kAbqGemvTokens) at every m they distinguish: 1..16
// tokens are 1..16 n8 tiles of activation columns at A8 and 1..8 at A4 (the GEMV kernel's 1-, 2-
// and 4-tile variants, the decode kernel's 1-, 4- and 16-tile (A4: 8-tile) ones). Every bit/group
// combination plus group 256, so that the k-steps are k128 (g128: the GEMV kernel's one-step
// groups), k256 (per channel, g256) and whole groups of either. k 7040 (220 words) takes the
// 16-byte and bulk copies, k 7000 and 300 (rows not 16-byte aligned) the 4-byte ones; the GEMV
// kernel's 4 warps split K into ranges that cut k-groups, and at W8 a warp's range spans several
// stages; the decode kernel's ring of stages wraps (7 chunks of 32 words); the last chunk and
// step are partial, size 1, and n runs across the blocks' 8, 16 and 32 outputs. g32 runs the
// tiled kernel at these m, and is checked the same.
TEST_F(CudaAbqTest, DecodeKernelEqualsReferenceAtEveryM) {
  Random rng(16);
  std::vector<Combo> combos = AllCombos();
  for (int ab : {4, 8}) {
    for (int wb : {2, 3, 4, 8}) combos.push_back({wb, false, ab, 256});
    combos.push_back({3, true, ab, 256});
  }
  for (int64_t m = 1; m <= kAbqDecodeTokens; ++m) {
    std::vector<Shape3> shapes = {{m, 1, 1}, {m, 37, 300}, {m, 37, 7040}};
    if (m == 1 || m == 5 || m == 16) shapes.push_back({m, 37, 7000});
    for (const Combo& c : combos) {
      for (const Shape3& s : shapes) {
        ExpectKernelsEqualReference(c, s, {AbqKernel::kBinaryMma}, rng);
        if (m <= kAbqGemvTokens) {
          ExpectKernelsEqualReference(c, s, {AbqKernel::kBinaryMma}, rng,
                                      CudaAbqLinear::B1Kernel::kDecode);
        }
      }
    }
  }
}

// The fused one-launch layer (B1Kernel::kFused: prologue and GEMV in one cluster launch) at m = 1,
// every combination it takes (groups -1, 128 and 256: one-step groups, per channel, and two-step
// groups whose sums a warp's range may cut), with fp32 and fp16 scales, against the reference:
// sums exactly, y bit for bit.
// Shapes: one k128 step and a single output (seven of the cluster's eight blocks hold no output
// and only quantize), n off the 8-output tiles and off multiples of 4 (4-byte copies of the
// scales), n across many blocks of several tiles, and K = 28,672 where a warp's units do not fit
// its shared memory (W8 on one tile; W4 on three tiles, whose slots cross from tile to tile), so
// that its two stage slots are refilled. Group 32 (k-groups shorter than a k128 step) is not
// taken, and K off the 128-column steps neither: there the kernel must say so.
TEST_F(CudaAbqTest, FusedKernelEqualsReference) {
  Random rng(18);
  std::vector<Combo> combos;
  for (const Combo& c : AllCombos()) {
    if (c.group != 32) combos.push_back(c);
  }
  for (int ab : {4, 8}) {
    for (int wb : {2, 3, 4, 8}) combos.push_back({wb, false, ab, 256});
  }
  const Shape3 shapes[] = {{1, 1, 128}, {1, 37, 7040}, {1, 301, 1024}, {1, 1000, 4096}};
  ExpectOneTokenKernelEqualsReference(combos, shapes, CudaAbqLinear::B1Kernel::kFused, rng);
  for (const auto& [c, s] : {std::pair{Combo{8, false, 8, 128}, Shape3{1, 64, 28672}},
                             std::pair{Combo{4, false, 8, 128}, Shape3{1, 3001, 28672}},
                             std::pair{Combo{3, true, 4, -1}, Shape3{1, 20, 28672}}}) {
    const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
    auto lin = CudaAbqLinear::Create(w, 0);
    ASSERT_TRUE(lin.ok()) << lin.status();
    ASSERT_TRUE((*lin)->FusedApplies(1)) << Name(c, s);
    ExpectKernelsEqualReference(c, s, {AbqKernel::kBinaryMma}, rng,
                                CudaAbqLinear::B1Kernel::kFused);
  }
  for (const auto& [c, s] : {std::pair{Combo{4, false, 8, 32}, Shape3{1, 37, 1024}},
                             std::pair{Combo{4, false, 8, -1}, Shape3{1, 37, 1000}}}) {
    const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
    auto lin = CudaAbqLinear::Create(w, 0);
    ASSERT_TRUE(lin.ok()) << lin.status();
    EXPECT_FALSE((*lin)->FusedApplies(1)) << Name(c, s);
  }
  // The timings: one launch, so the parts are refused.
  const AbqWeights w = RandomWeights({2, false, 8, 128}, 64, 1024, rng);
  auto lin = CudaAbqLinear::Create(w, 0);
  ASSERT_TRUE(lin.ok()) << lin.status();
  ASSERT_TRUE((*lin)->set_b1_kernel(CudaAbqLinear::B1Kernel::kFused).ok());
  for (AbqTiming timing : {AbqTiming::kAlone, AbqTiming::kSequence}) {
    auto t = (*lin)->TimeForward(1, AbqKernel::kBinaryMma, 2, CudaAbqLinear::Part::kWhole, timing);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_GT(*t, 0.0);
    EXPECT_THAT(
        (*lin)
            ->TimeForward(1, AbqKernel::kBinaryMma, 2, CudaAbqLinear::Part::kPrologue, timing)
            .status()
            .message(),
        HasSubstr("one launch"));
  }
}

// The one-token dp4a layer (abq_dp4a.cu; CudaAbqLinear::B1Kernel::kDp4a) against the reference,
// sums exact and y bit for bit, with the scales read as 8 bytes (a few binades: some products
// inexact, so lane 0 runs the chain) and as one fp16 word (meta rows). Every bit width and the
// balanced grid, per channel, g64 (two groups a 128-column unit), g128 (one) and g256 (two lanes
// a group); K of half a unit (64), 55 units (7040: a second unit block of 23 lanes, an odd group
// end at g256), 1024 and 4096; n of 1, off the 16-warp blocks, and 1000 rows. Then rows of
// several unit blocks (K = 11,008: 86 units, the last block 22 lanes; W8 at 28,672: 7 blocks,
// more steps than a warp's ring holds), a wide per-channel row (W3 A4), warps that take several
// rows (11,008 × 4096 W2 g128 and 9000 × 1024 W4 per channel), and the activation kernel's paths
// past its held registers. K off 64 and g32 are refused (Dp4aApplies false), and the dispatch's
// kernels run them, with the same bits.
TEST_F(CudaAbqTest, Dp4aKernelEqualsReference) {
  Random rng(19);
  std::vector<Combo> combos;
  for (int ab : {4, 8}) {
    for (int group : {-1, 64, 128, 256}) {
      for (int wb : {2, 3, 4, 8}) combos.push_back({wb, false, ab, group});
      combos.push_back({3, true, ab, group});
    }
  }
  const Shape3 shapes[] = {{1, 1, 64}, {1, 37, 7040}, {1, 301, 1024}, {1, 1000, 4096}};
  ExpectOneTokenKernelEqualsReference(combos, shapes, CudaAbqLinear::B1Kernel::kDp4a, rng);
  for (const auto& [c, s] : {std::pair{Combo{4, false, 8, 128}, Shape3{1, 3001, 11008}},
                             std::pair{Combo{2, false, 8, 128}, Shape3{1, 4096, 11008}},
                             std::pair{Combo{8, false, 8, 128}, Shape3{1, 64, 28672}},
                             std::pair{Combo{3, true, 4, -1}, Shape3{1, 20, 28672}},
                             std::pair{Combo{2, false, 8, 128}, Shape3{1, 11008, 4096}},
                             std::pair{Combo{4, false, 4, -1}, Shape3{1, 9000, 1024}},
                             // The activation kernel's paths past its held registers: x of more
                             // than 8 float4s a thread (K > 32768: the maximum's second loop),
                             // and a block's slice of more than 8192 code words (its coding
                             // loads again).
                             std::pair{Combo{4, false, 8, 256}, Shape3{1, 5, 40960}},
                             std::pair{Combo{2, false, 8, 2048}, Shape3{1, 8, 135168}}}) {
    AbqWeights w = RandomWeights(c, s.n, s.k, rng);
    for (float& v : w.scales) v = RoundToHalf(v);
    auto lin = CudaAbqLinear::Create(w, 0);
    ASSERT_TRUE(lin.ok()) << lin.status();
    ASSERT_TRUE((*lin)->set_b1_kernel(CudaAbqLinear::B1Kernel::kDp4a).ok());
    ASSERT_TRUE((*lin)->Dp4aApplies(1)) << Name(c, s);
    ExpectKernelsEqualReference(w, Name(c, s) + " dp4a", s, {AbqKernel::kBinaryMma}, rng,
                                CudaAbqLinear::B1Kernel::kDp4a);
  }
  for (const auto& [c, s] : {std::pair{Combo{4, false, 8, 32}, Shape3{1, 37, 1024}},
                             std::pair{Combo{4, false, 8, -1}, Shape3{1, 37, 1000}}}) {
    const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
    auto lin = CudaAbqLinear::Create(w, 0);
    ASSERT_TRUE(lin.ok()) << lin.status();
    ASSERT_TRUE((*lin)->set_b1_kernel(CudaAbqLinear::B1Kernel::kDp4a).ok());
    EXPECT_FALSE((*lin)->Dp4aApplies(1)) << Name(c, s);
    ExpectKernelsEqualReference(w, Name(c, s) + " dp4a refused", s, {AbqKernel::kBinaryMma}, rng,
                                CudaAbqLinear::B1Kernel::kDp4a);
  }
}

// The largest sums: W8A8 per channel over 16,384 columns with every code at the end of its range
// (|dot| = 16384·127·255 = 530,595,840 and z·Σa beyond it), against the plain int64 product.
TEST_F(CudaAbqTest, ExtremeCodesAreExact) {
  const int64_t n = 3, k = 16384, m = 2;
  const AbqSpec spec{8, 8, -1};
  std::vector<int32_t> codes(n * k, 255), zeros(n, 256);
  std::vector<float> scales(n, 1.0f);
  auto w = PackAbqWeights(codes, zeros, scales, n, k, spec);
  ASSERT_TRUE(w.ok()) << w.status();
  std::vector<float> x(m * k, -1.0f);  // codes -127
  std::fill(x.begin() + k, x.end(), 1.0f);
  auto a = AbqQuantizeActivations(x, m, k, spec);
  ASSERT_TRUE(a.ok()) << a.status();
  auto y_ref = AbqGemm(*a, *w);
  ASSERT_TRUE(y_ref.ok()) << y_ref.status();
  auto lin = CudaAbqLinear::Create(*w, 0);
  ASSERT_TRUE(lin.ok()) << lin.status();
  for (AbqKernel kernel : kIntegerKernels) {
    std::vector<int32_t> dot;
    auto y = (*lin)->Forward(x, m, kernel, &dot);
    ASSERT_TRUE(y.ok()) << y.status();
    ASSERT_EQ(dot.size(), static_cast<size_t>(m * n));
    for (int64_t o = 0; o < n; ++o) {
      EXPECT_EQ(dot[o], -int64_t{127} * 255 * k) << AbqKernelName(kernel);
      EXPECT_EQ(dot[n + o], int64_t{127} * 255 * k) << AbqKernelName(kernel);
    }
    // y = s_a·(dot − z·Σa) = ±s_a·127·k, the reference's bits.
    EXPECT_EQ(CountMismatches(*y, *y_ref, AbqKernelName(kernel)), 0);
    EXPECT_NEAR((*y)[0], static_cast<double>(k), 1e-6 * k);
  }
}

TEST_F(CudaAbqTest, WeightOnlyWithinItsBound) {
  Random rng(13);
  for (int ab : {4, 8}) {  // activation bits play no part; both specs must be accepted
    for (const Combo& c :
         {Combo{4, false, ab, 128}, Combo{3, true, ab, 128}, Combo{2, false, ab, -1},
          Combo{8, false, ab, 32}, Combo{4, false, ab, -1}}) {
      for (const Shape3& s : kShapes) {
        const std::string name = Name(c, s) + " a16";
        const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
        const std::vector<float> x = RandomX(s.m, s.k, rng);
        auto ref = AbqWeightOnlyReference(x, s.m, w);
        ASSERT_TRUE(ref.ok()) << name << ": " << ref.status();
        auto lin = CudaAbqLinear::Create(w, 0);
        ASSERT_TRUE(lin.ok()) << name << ": " << lin.status();
        auto y = (*lin)->Forward(x, s.m, AbqKernel::kWeightOnly);
        ASSERT_TRUE(y.ok()) << name << ": " << y.status();
        ASSERT_EQ(y->size(), ref->size()) << name;
        int64_t bad = 0;
        for (int64_t t = 0; t < s.m; ++t) {
          for (int64_t o = 0; o < s.n; ++o) {
            const double got = (*y)[t * s.n + o], want = (*ref)[t * s.n + o];
            const double bound = AbqWeightOnlyErrorBound(x, w, t, o);
            if (!(std::fabs(got - want) <= bound) && ++bad <= 3) {
              ADD_FAILURE() << name << " [" << t << "][" << o << "]: got " << got << ", want "
                            << want << ", bound " << bound;
            }
          }
        }
        EXPECT_EQ(bad, 0) << name;
      }
    }
  }
}

TEST_F(CudaAbqTest, RefusesBadInput) {
  Random rng(14);
  const AbqWeights w = RandomWeights({4, false, 8, 128}, 5, 300, rng);
  auto lin = CudaAbqLinear::Create(w, 0);
  ASSERT_TRUE(lin.ok()) << lin.status();
  const std::vector<float> x = RandomX(2, 300, rng);
  std::vector<int32_t> dot;
  EXPECT_THAT((*lin)->Forward(x, 2, AbqKernel::kWeightOnly, &dot).status().message(),
              HasSubstr("no integer sums"));
  EXPECT_THAT((*lin)->Forward(x, 3, AbqKernel::kBinaryMma).status().message(),
              HasSubstr("x has 600 elements, expected 900"));
  EXPECT_THAT((*lin)->Forward({}, 0, AbqKernel::kInt8Mma).status().message(),
              HasSubstr("must be >= 1"));
  auto a = AbqQuantizeActivations(x, 2, 300, AbqSpec{4, 4, 128});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT((*lin)->Gemm(*a, AbqKernel::kBinaryMma).status().message(),
              HasSubstr("do not match"));
  AbqWeights bad = w;
  bad.spec.weight_bits = 5;
  EXPECT_THAT(CudaAbqLinear::Create(bad, 0).status().message(), HasSubstr("weight bits"));
  bad = w;
  bad.planes.pop_back();
  EXPECT_THAT(CudaAbqLinear::Create(bad, 0).status().message(), HasSubstr("planes has"));
}

// qcal bench --abq's timings, both harnesses: each gives a positive time for the layer, its parts,
// cuBLAS and the empty launch, and the layer still computes the reference afterwards (the sequence
// timing's graph capture leaves the instance's stream usable).
TEST_F(CudaAbqTest, BenchTimingsRunInBothHarnesses) {
  Random rng(17);
  const Combo c{2, false, 8, 128};
  const Shape3 s{1, 64, 1024};
  const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
  auto lin = CudaAbqLinear::Create(w, 0);
  ASSERT_TRUE(lin.ok()) << lin.status();
  for (AbqTiming timing : {AbqTiming::kAlone, AbqTiming::kSequence}) {
    const std::string name = timing == AbqTiming::kAlone ? "alone" : "sequence";
    for (auto part : {CudaAbqLinear::Part::kWhole, CudaAbqLinear::Part::kPrologue,
                      CudaAbqLinear::Part::kGemm}) {
      auto t = (*lin)->TimeForward(s.m, AbqKernel::kBinaryMma, 2, part, timing);
      ASSERT_TRUE(t.ok()) << name << ": " << t.status();
      EXPECT_GT(*t, 0.0) << name;
      EXPECT_LT(*t, 1.0) << name;
    }
    auto a16 =
        (*lin)->TimeForward(s.m, AbqKernel::kWeightOnly, 2, CudaAbqLinear::Part::kWhole, timing);
    ASSERT_TRUE(a16.ok()) << name << ": " << a16.status();
    EXPECT_THAT(
        (*lin)
            ->TimeForward(s.m, AbqKernel::kWeightOnly, 2, CudaAbqLinear::Part::kGemm, timing)
            .status()
            .message(),
        HasSubstr("no prologue"));
    for (bool int8 : {false, true}) {
      auto t = TimeCublasGemm(int8, s.m, s.n, s.k, 0, 2, timing);
      ASSERT_TRUE(t.ok()) << name << ": " << t.status();
      EXPECT_GT(*t, 0.0) << name;
    }
    auto null = TimeNullLaunch(0, 2, timing);
    ASSERT_TRUE(null.ok()) << name << ": " << null.status();
    EXPECT_GT(*null, 0.0) << name;
  }
  EXPECT_THAT(TimeCublasGemm(false, 0, s.n, s.k, 0, 2, AbqTiming::kSequence).status().message(),
              HasSubstr("bad shape"));
  ExpectKernelsEqualReference(c, s, {AbqKernel::kBinaryMma}, rng);
  const std::vector<float> x = RandomX(s.m, s.k, rng);
  auto a = AbqQuantizeActivations(x, s.m, s.k, w.spec);
  ASSERT_TRUE(a.ok()) << a.status();
  auto dot_ref = AbqIntegerGemm(*a, w);
  ASSERT_TRUE(dot_ref.ok());
  auto y_ref = AbqEpilogue(*dot_ref, *a, w);
  ASSERT_TRUE(y_ref.ok());
  auto y = (*lin)->Forward(x, s.m, AbqKernel::kBinaryMma);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(CountMismatches(*y, *y_ref, "after the timings"), 0);
}

// The CUDA backend's AbqLinear (ForwardDevice on the backend's stream and pool, then the bias and
// the accumulation in fp32) gives the CPU backend's results bit for bit through the integer
// kernels, whatever the operands' offsets in the pool; a16 stays within its bound.
TEST_F(CudaAbqTest, BackendAbqLinearEqualsCpuBackend) {
  BackendOptions cuda_options, cpu_options;
  cuda_options.device = "cuda";
  cpu_options.threads = 2;
  auto gpu = CreateBackend(cuda_options);
  auto cpu = CreateBackend(cpu_options);
  ASSERT_TRUE(gpu.ok() && cpu.ok());
  Random rng(15);
  // The kernels themselves are covered above; a few combinations exercise the wiring.
  for (const Combo& c : {Combo{4, false, 8, 128}, Combo{3, true, 8, 32}, Combo{8, false, 4, -1},
                         Combo{2, false, 8, -1}, Combo{3, false, 4, 128}}) {
    for (const Shape3& s : {Shape3{1, 37, 300}, Shape3{7, 133, 257}, Shape3{37, 21, 520}}) {
      const std::string name = Name(c, s);
      const AbqWeights w = RandomWeights(c, s.n, s.k, rng);
      auto on_gpu = (*gpu)->PrepareAbqLinear(w);
      auto on_cpu = (*cpu)->PrepareAbqLinear(w);
      ASSERT_TRUE(on_gpu.ok() && on_cpu.ok()) << name;
      const std::vector<float> xv = RandomX(s.m, s.k, rng);
      Tensor x = Tensor::Zeros(DType::kF32, {s.m, s.k});
      std::copy(xv.begin(), xv.end(), x.data<float>());
      const Tensor bias = rng.Floats({s.n}), y0 = rng.Floats({s.m, s.n});
      auto dx = (*gpu)->ToDevice(x);
      auto dbias = (*gpu)->ToDevice(bias);
      ASSERT_TRUE(dx.ok() && dbias.ok());
      for (AbqKernel kernel : kIntegerKernels) {
        const std::string what = absl::StrCat(name, " ", AbqKernelName(kernel));
        for (bool accumulate : {false, true}) {
          Tensor want = y0.Clone();
          ASSERT_TRUE((*cpu)->AbqLinear(**on_cpu, kernel, x, &bias, want, accumulate).ok());
          auto dy = (*gpu)->ToDevice(y0);
          ASSERT_TRUE(dy.ok());
          const absl::Status st =
              (*gpu)->AbqLinear(**on_gpu, kernel, *dx, &*dbias, *dy, accumulate);
          ASSERT_TRUE(st.ok()) << what << ": " << st;
          auto got = (*gpu)->ToHost(*dy);
          ASSERT_TRUE(got.ok());
          const std::vector<float> g(got->data<float>(), got->data<float>() + got->numel());
          const std::vector<float> e(want.data<float>(), want.data<float>() + want.numel());
          EXPECT_EQ(CountMismatches(g, e, what + (accumulate ? " accumulate" : "")), 0);
        }
      }
      auto dy = (*gpu)->Alloc(DType::kF32, {s.m, s.n});
      ASSERT_TRUE(dy.ok());
      ASSERT_TRUE(
          (*gpu)->AbqLinear(**on_gpu, AbqKernel::kWeightOnly, *dx, nullptr, *dy, false).ok());
      auto got = (*gpu)->ToHost(*dy);
      auto ref = AbqWeightOnlyReference(xv, s.m, w);
      ASSERT_TRUE(got.ok() && ref.ok());
      for (int64_t t = 0; t < s.m; ++t) {
        for (int64_t o = 0; o < s.n; ++o) {
          ASSERT_LE(std::fabs(got->data<float>()[t * s.n + o] - (*ref)[t * s.n + o]),
                    AbqWeightOnlyErrorBound(xv, w, t, o))
              << name << " a16 [" << t << "][" << o << "]";
        }
      }
      // Weights prepared by one backend are refused by the other.
      EXPECT_THAT(
          std::string((*gpu)
                          ->AbqLinear(**on_cpu, AbqKernel::kBinaryMma, *dx, nullptr, *dy, false)
                          .message()),
          HasSubstr("another backend"));
    }
  }
}

}  // namespace
}  // namespace qcal::kernels
