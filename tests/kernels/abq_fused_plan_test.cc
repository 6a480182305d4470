// The fused b1 GEMV's work plan (kernels/abq_fused_plan.h), replayed on the CPU: for every block,
// warp, stage slot and cluster rank the plan gives, the same cuts as kernels/cuda/abq_gemv_fused.cu
// (the prologue's eighths of x and of the plane words, each warp's units, the slot fills' runs,
// the k-group flushes, the epilogue's chain) over the reference's packed operands, checked
// against the integer reference (kernels/cpu/abq_ref.h): the planes, s_a and Σa bit for bit, the
// integer sums exactly and y bit for bit, with every unit computed once and every shared-memory
// region inside its block's bytes. This checks the decomposition without a GPU; the CUDA test
// (cuda/cuda_abq_test, FusedKernelEqualsReference) checks the kernel itself.
#include "kernels/abq_fused_plan.h"

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu/abq_ref.h"
#include "kernels/quant_grid.h"
#include "tests/kernels/abq_test_cases.h"
#include "tests/kernels/kernel_test_random.h"

namespace qcal::kernels {
namespace {

using abq_fused::kCluster;
using abq_fused::kTileOuts;
using abq_fused::kWarps;
using abq_fused::LayerShape;
using abq_fused::Layout;
using abq_tests::Combo;
using abq_tests::Name;
using abq_tests::RandomWeights;
using abq_tests::RandomX;
using abq_tests::Shape3;
using kernel_tests::Random;

LayerShape ShapeOf(const AbqWeights& w) {
  LayerShape s;
  s.n = w.n;
  s.k = w.k;
  s.words = static_cast<int>(w.words);
  s.n_groups = static_cast<int>(w.n_groups);
  s.group_words = w.n_groups == 1 ? s.words : static_cast<int>(AbqGroupSize(w.spec, w.k) / 32);
  s.wb = w.spec.weight_bits;
  s.ab = w.spec.act_bits;
  return s;
}

// The layout's regions are ordered, 16-byte aligned, disjoint and inside `bytes`, and the grid
// covers the outputs with no whole cluster to spare.
void ExpectLayoutSound(const LayerShape& s, const Layout& l, const std::string& name) {
  const size_t nb = static_cast<size_t>(kTileOuts) * l.tiles;
  const size_t per_out = 4 * nb * s.n_groups;
  const size_t offs[] = {l.act_off, l.dot_off,   l.scale_off, l.zero_off,
                         l.sum_off, l.gpart_off, l.flag_off,  l.stage_off};
  const size_t sizes[] = {4ull * s.ab * l.pstride, per_out,        per_out, s.meta ? 0 : per_out,
                          4ull * s.n_groups,       4ull * l.gpart, 4 * nb};
  for (int i = 0; i < 7; ++i) {
    EXPECT_EQ(offs[i] % 16, 0u) << name;
    EXPECT_LE(offs[i] + sizes[i], offs[i + 1]) << name << " region " << i;
  }
  const int steps = s.words / 4;
  EXPECT_EQ(l.pstride % 8, 4) << name;
  EXPECT_GE(l.pstride, s.words) << name;
  EXPECT_EQ(l.stride % 8, 4) << name;
  EXPECT_GE(l.stride, 4 * l.slot_steps) << name;
  EXPECT_TRUE(l.slots == 1 || l.slots == 2) << name;
  if (l.slots == 1) {
    EXPECT_GE(l.slot_steps, abq_fused::UnitsPerWarp(l.tiles, steps)) << name;
  }
  const size_t stages = size_t{kWarps} * l.slots * abq_fused::SlotBytes(s, l.slot_steps);
  EXPECT_LE(l.stage_off + stages, l.bytes) << name;
  EXPECT_EQ(l.prod_stride % 2, 1) << name;
  EXPECT_GT(l.prod_stride, s.n_groups) << name;
  EXPECT_LE(l.stage_off + 8 * nb * l.prod_stride, l.bytes) << name << " (the epilogue's products)";
  EXPECT_LE(l.bytes, abq_fused::kMaxShared) << name;
  EXPECT_EQ(l.grid % kCluster, 0) << name;
  EXPECT_GE(static_cast<int64_t>(l.grid) * static_cast<int64_t>(nb), s.n) << name;
  EXPECT_LT(static_cast<int64_t>(l.grid - kCluster) * static_cast<int64_t>(nb), s.n) << name;
}

// The kernel's epilogue sum of one output's products, replayed: lane l adds products l, l + 32,
// ... in order, a butterfly (xor 16, 8, 4, 2, 1) adds the lanes, and lane 0's value is used where
// OrderFree allows; otherwise the chain. `order_free` tells which.
double WarpSum(const std::vector<double>& prods, const std::vector<bool>& exact_products,
               bool* order_free) {
  double part[32] = {}, abs_sum[32] = {};
  int emin[32];
  bool exact = true;
  for (int lane = 0; lane < 32; ++lane) {
    emin[lane] = INT_MAX;
    for (size_t g = lane; g < prods.size(); g += 32) {
      exact = exact && exact_products[g];
      if (prods[g] != 0.0) {
        const int e = abq_fused::LsbExponent(prods[g]);
        if (e == INT32_MIN) exact = false;
        emin[lane] = std::min(emin[lane], e);
      }
      part[lane] += prods[g];
      abs_sum[lane] += std::fabs(prods[g]);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    double np[32], na[32];
    int ne[32];
    for (int lane = 0; lane < 32; ++lane) {
      np[lane] = part[lane] + part[lane ^ off];
      na[lane] = abs_sum[lane] + abs_sum[lane ^ off];
      ne[lane] = std::min(emin[lane], emin[lane ^ off]);
    }
    for (int lane = 0; lane < 32; ++lane) {
      part[lane] = np[lane];
      abs_sum[lane] = na[lane];
      emin[lane] = ne[lane];
    }
  }
  *order_free = abq_fused::OrderFree(exact, emin[0], abs_sum[0]);
  double chain = 0.0;
  for (double p : prods) chain += p;
  if (*order_free) {
    // Every lane holds the exact sum, which is the chain's.
    for (int lane = 0; lane < 32; ++lane) {
      EXPECT_EQ(std::bit_cast<uint64_t>(part[lane]), std::bit_cast<uint64_t>(chain))
          << "lane " << lane << ": " << part[lane] << " against the chain's " << chain;
    }
    return part[0];
  }
  return chain;
}

// One token through the plan on `sms` multiprocessors, against the reference.
void ReplayEqualsReference(const Combo& c, int64_t n, int64_t k, int sms, Random& rng,
                           bool fp16_scales = false) {
  const std::string name =
      absl::StrCat(Name(c, Shape3{1, n, k}), " sms ", sms, fp16_scales ? " fp16 scales" : "");
  AbqWeights w = RandomWeights(c, n, k, rng);
  if (fp16_scales) {
    for (float& v : w.scales) v = RoundToHalf(v);
  }
  const std::vector<float> x = RandomX(1, k, rng);
  LayerShape s = ShapeOf(w);
  s.meta = fp16_scales;  // CudaAbqLinear makes the meta words exactly then
  const Layout l = abq_fused::ChooseLayout(s, sms);
  ASSERT_GT(l.bytes, 0u) << name;
  ExpectLayoutSound(s, l, name);
  auto a = AbqQuantizeActivations(x, 1, k, w.spec);
  ASSERT_TRUE(a.ok()) << name << ": " << a.status();
  auto dot_ref = AbqIntegerGemm(*a, w);
  ASSERT_TRUE(dot_ref.ok()) << name << ": " << dot_ref.status();
  auto y_ref = AbqEpilogue(*dot_ref, *a, w);
  ASSERT_TRUE(y_ref.ok()) << name << ": " << y_ref.status();
  const int words = s.words, steps = words / 4, n_groups = s.n_groups, wb = s.wb, ab = s.ab;
  const int group_steps = n_groups == 1 ? steps : s.group_words / 4;
  const int nb = kTileOuts * l.tiles;

  // The prologue, as one cluster computes it (every cluster computes the same).
  const float qmax = static_cast<float>((1 << (ab - 1)) - 1);
  float part_max[kCluster];
  for (int r = 0; r < kCluster; ++r) {
    const abq_fused::Range cols = abq_fused::RankShare(k / 4, r);
    float m = 0.0f;
    for (int64_t i = 4 * cols.begin; i < 4 * cols.end; ++i) m = std::fmax(m, std::fabs(x[i]));
    part_max[r] = m;
  }
  float amax = 0.0f;
  for (float m : part_max) amax = std::fmax(amax, m);
  const float s_a = amax / qmax;
  ASSERT_EQ(std::bit_cast<uint32_t>(s_a), std::bit_cast<uint32_t>(a->scales[0])) << name;
  std::vector<uint32_t> planes(static_cast<size_t>(ab) * words, 0xdeadbeefu);
  std::vector<int32_t> sums(n_groups, 0);
  std::vector<int> word_owner(words, -1);
  for (int r = 0; r < kCluster; ++r) {
    const abq_fused::Range share = abq_fused::RankShare(words, r);
    std::vector<int32_t> gpart(l.gpart, 0);
    const int g_first = static_cast<int>(share.begin) / s.group_words;
    for (int64_t wd = share.begin; wd < share.end; ++wd) {
      EXPECT_EQ(word_owner[wd], -1) << name << " word " << wd << " in two shares";
      word_owner[wd] = r;
      uint32_t bits[8] = {};
      int32_t word_sum = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const float v =
            s_a != 0.0f ? std::fmin(std::fmax(RoundHalfEven(x[wd * 32 + lane] / s_a), -qmax), qmax)
                        : 0.0f;
        const int32_t code = static_cast<int32_t>(v);
        word_sum += code;
        for (int i = 0; i < ab; ++i) bits[i] |= ((static_cast<uint32_t>(code) >> i) & 1u) << lane;
      }
      for (int i = 0; i < ab; ++i) planes[static_cast<size_t>(i) * words + wd] = bits[i];
      const int slot = static_cast<int>(wd) / s.group_words - g_first;
      ASSERT_GE(slot, 0) << name;
      ASSERT_LT(slot, l.gpart) << name << " rank " << r << ": more groups than Σa slots";
      gpart[slot] += word_sum;
    }
    if (share.begin < share.end) {
      const int groups = static_cast<int>(share.end - 1) / s.group_words - g_first + 1;
      for (int gi = 0; gi < groups; ++gi) sums[g_first + gi] += gpart[gi];
    }
  }
  for (int wd = 0; wd < words; ++wd) EXPECT_GE(word_owner[wd], 0) << name << " word " << wd;
  ASSERT_EQ(planes, a->planes) << name;
  ASSERT_EQ(sums, a->sums) << name;

  // The GEMV, block by block and warp by warp, then the epilogue.
  std::vector<int32_t> dot(static_cast<size_t>(n) * n_groups, 0);
  std::vector<float> y(n, 0.0f);
  std::vector<int> computed(static_cast<size_t>(n) * steps, 0);
  int64_t order_free_outputs = 0, chained_outputs = 0;
  auto weight_word = [&](int64_t o, int j, int wd) {
    return w.planes[(static_cast<size_t>(o) * wb + j) * words + wd];
  };
  // The dot of output o over step `step` from the planes' AND + popcount, as the mma's counts
  // times their plane weights (modulo 2^32).
  auto step_dot = [&](int64_t o, int step) {
    uint32_t v = 0;
    for (int i = 0; i < ab; ++i) {
      const uint32_t wt = i == ab - 1 ? 0u - (1u << i) : 1u << i;
      for (int j = 0; j < wb; ++j) {
        uint32_t cnt = 0;
        for (int t = 0; t < 4; ++t) {
          cnt += std::popcount(planes[static_cast<size_t>(i) * words + 4 * step + t] &
                               weight_word(o, j, 4 * step + t));
        }
        v += (cnt * wt) << j;
      }
    }
    return v;
  };
  for (int64_t block = 0; block < l.grid; ++block) {
    const int tiles = abq_fused::BlockTiles(l, n, block);
    const int64_t o0 = block * nb;
    std::vector<uint32_t> s_dot(static_cast<size_t>(n_groups) * nb, 0);
    std::vector<int> written(static_cast<size_t>(n_groups) * nb, 0);
    int64_t units_seen = 0;
    for (int warp = 0; warp < kWarps; ++warp) {
      const abq_fused::Range units = abq_fused::WarpUnits(tiles * steps, warp);
      const int u0 = static_cast<int>(units.begin), u1 = static_cast<int>(units.end);
      units_seen += u1 - u0;
      std::vector<uint32_t> acc(kTileOuts, 0);
      for (int ub = u0; ub < u1; ub += l.slot_steps) {
        const int cnt = std::min(l.slot_steps, u1 - ub);
        // The fill's runs: consecutive local units, each within one tile and its K.
        int covered = 0;
        for (int li = 0; li < cnt;) {
          const abq_fused::Segment seg = abq_fused::FillSegment(ub, cnt, li, steps);
          EXPECT_EQ(seg.li, covered) << name;
          EXPECT_GE(seg.len, 1) << name;
          EXPECT_LE(seg.step + seg.len, steps) << name;
          EXPECT_LT(seg.tile, tiles) << name;
          EXPECT_EQ(seg.tile * steps + seg.step, ub + li) << name;
          covered += seg.len;
          li += seg.len;
        }
        EXPECT_EQ(covered, cnt) << name;
        int tile = ub / steps, step = ub % steps;
        int gpos = step % group_steps, grp = step / group_steps;
        for (int li = 0; li < cnt; ++li) {
          for (int ol = 0; ol < kTileOuts; ++ol) {
            const int out = tile * kTileOuts + ol;
            if (o0 + out >= n) continue;
            ++computed[static_cast<size_t>(o0 + out) * steps + step];
            const uint32_t v = step_dot(o0 + out, step);
            if (group_steps == 1) {
              ++written[static_cast<size_t>(step) * nb + out];
              s_dot[static_cast<size_t>(step) * nb + out] = v;
            } else {
              acc[ol] += v;
            }
          }
          if (group_steps != 1) {
            const bool group_end = ++gpos == group_steps || step + 1 == steps;
            if (group_end || ub + li + 1 == u1) {
              for (int ol = 0; ol < kTileOuts; ++ol) {
                s_dot[static_cast<size_t>(grp) * nb + tile * kTileOuts + ol] += acc[ol];
                acc[ol] = 0;
              }
            }
            if (group_end) {
              gpos = 0;
              ++grp;
            }
          }
          if (++step == steps) {
            step = 0;
            ++tile;
            grp = 0;
          }
        }
      }
    }
    EXPECT_EQ(units_seen, static_cast<int64_t>(tiles) * steps) << name << " block " << block;
    if (group_steps == 1) {
      for (int gr = 0; gr < n_groups; ++gr) {
        for (int ol = 0; ol < std::min<int64_t>(nb, n - o0); ++ol) {
          EXPECT_EQ(written[static_cast<size_t>(gr) * nb + ol], 1) << name;
        }
      }
    }
    // The epilogue: the products, and their sum as a warp forms it.
    for (int ol = 0; ol < std::min<int64_t>(nb, n - o0); ++ol) {
      const int64_t o = o0 + ol;
      std::vector<double> prods(n_groups);
      std::vector<bool> exact(n_groups);
      for (int gr = 0; gr < n_groups; ++gr) {
        const uint32_t d = s_dot[static_cast<size_t>(gr) * nb + ol];
        dot[static_cast<size_t>(o) * n_groups + gr] = static_cast<int32_t>(d);
        const double cg = static_cast<double>(static_cast<int32_t>(
            d - static_cast<uint32_t>(w.zeros[static_cast<size_t>(gr) * n + o]) *
                    static_cast<uint32_t>(sums[gr])));
        const double scale = static_cast<double>(w.scales[static_cast<size_t>(gr) * n + o]);
        prods[gr] = cg * scale;
        exact[gr] = std::fma(cg, scale, -prods[gr]) == 0.0;
      }
      bool order_free = false;
      y[o] = static_cast<float>(static_cast<double>(s_a) * WarpSum(prods, exact, &order_free));
      ++(order_free ? order_free_outputs : chained_outputs);
    }
  }
  for (size_t i = 0; i < computed.size(); ++i) {
    ASSERT_EQ(computed[i], 1) << name << " output " << i / steps << " step " << i % steps;
  }
  EXPECT_EQ(dot, *dot_ref) << name;
  // With fp16 scales (11 significant bits) every product is exact and the butterfly serves.
  if (fp16_scales) {
    EXPECT_EQ(chained_outputs, 0) << name;
  }
  EXPECT_EQ(order_free_outputs + chained_outputs, n) << name;
  for (int64_t o = 0; o < n; ++o) {
    ASSERT_EQ(std::bit_cast<uint32_t>(y[o]), std::bit_cast<uint32_t>((*y_ref)[o]))
        << name << " y[" << o << "]";
  }
}

// Every combination the kernel takes (weight bits 2, 3, 4, 8 and balanced; activation bits 4
// and 8; per channel, g128 and g256) on small and odd shapes, and on the H200's 132
// multiprocessors as on smaller devices.
TEST(AbqFusedPlanTest, ReplayEqualsReference) {
  Random rng(31);
  std::vector<Combo> combos;
  for (int ab : {4, 8}) {
    for (int group : {-1, 128, 256}) {
      for (int wb : {2, 3, 4, 8}) combos.push_back({wb, false, ab, group});
      combos.push_back({3, true, ab, group});
    }
  }
  for (const Combo& c : combos) {
    const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 128}, {37, 7040}, {301, 1024}};
    for (const auto& [n, k] : shapes) {
      for (int sms : {132, 20}) ReplayEqualsReference(c, n, k, sms, rng);
      ReplayEqualsReference(c, n, k, 132, rng, /*fp16_scales=*/true);
    }
  }
}

// Shapes whose warps' units do not fit their shared memory (two slots refilled, runs crossing
// from one tile to the next), many blocks of several tiles, and the 7B down projection's shape.
TEST(AbqFusedPlanTest, RingsAndLargeShapes) {
  Random rng(32);
  ReplayEqualsReference({8, false, 8, 128}, 64, 28672, 132, rng);
  ReplayEqualsReference({4, false, 8, 128}, 3001, 28672, 132, rng);
  ReplayEqualsReference({3, true, 4, -1}, 20, 28672, 132, rng);
  ReplayEqualsReference({2, false, 8, 128}, 4096, 11008, 132, rng, /*fp16_scales=*/true);
  // The ring is what these take (so the refills above are exercised).
  for (const auto& [c, n] : {std::pair{Combo{8, false, 8, 128}, int64_t{64}},
                             std::pair{Combo{4, false, 8, 128}, int64_t{3001}}}) {
    const AbqWeights w = RandomWeights(c, n, 28672, rng);
    EXPECT_EQ(abq_fused::ChooseLayout(ShapeOf(w), 132).slots, 2) << Name(c, {1, n, 28672});
  }
}

// The epilogue's order-free sum against the chain on products built to stress it: fp16 scales of
// spread binades with extreme c_G (the butterfly must serve and equal the chain), fp32 scales
// (inexact products: the chain), magnitudes 2^60 apart (exact products, but the sum would round:
// the chain), cancellation to zero, all zeros, and one group.
TEST(AbqFusedPlanTest, OrderFreeSumEqualsTheChain) {
  Random rng(33);
  // want_free: 1 the butterfly must serve, 0 the chain must, -1 either.
  auto run = [&](const std::vector<double>& c, const std::vector<double>& s, int want_free,
                 const std::string& what) {
    std::vector<double> prods(c.size());
    std::vector<bool> exact(c.size());
    for (size_t i = 0; i < c.size(); ++i) {
      prods[i] = c[i] * s[i];
      exact[i] = std::fma(c[i], s[i], -prods[i]) == 0.0;
    }
    bool order_free = false;
    const double got = WarpSum(prods, exact, &order_free);
    double chain = 0.0;
    for (double p : prods) chain += p;
    EXPECT_EQ(std::bit_cast<uint64_t>(got), std::bit_cast<uint64_t>(chain)) << what;
    if (want_free >= 0) {
      EXPECT_EQ(order_free, want_free == 1) << what;
    }
  };
  for (int trial = 0; trial < 200; ++trial) {
    const int groups = 1 + rng.Below(230);
    // A layer's sums: |c_G| below 2^22 (g128 W8A8 reaches 2^22), scales over 6 binades; and the
    // extremes: |c_G| up to 2^31, scales over 12 binades, where the chain may be needed.
    std::vector<double> c(groups), s16(groups), s32(groups), c_wide(groups), s_wide(groups);
    for (int g = 0; g < groups; ++g) {
      c[g] = static_cast<double>(rng.Below(1 << 23) - (1 << 22));
      c_wide[g] = static_cast<double>(static_cast<int32_t>(rng.Below(1 << 30)) - (1 << 29)) * 2;
      const float v = std::ldexp(1.0f + rng.Uniform(0.5f), -3 - rng.Below(6));
      s16[g] = RoundToHalf(v);
      s32[g] = v;
      s_wide[g] = RoundToHalf(std::ldexp(1.0f + rng.Uniform(0.5f), -3 - rng.Below(12)));
    }
    run(c, s16, 1, absl::StrCat("fp16 scales, ", groups, " groups"));
    run(c_wide, s_wide, -1, absl::StrCat("wide fp16 scales, ", groups, " groups"));
    // Random fp32 mantissas make most products of 31-bit integers inexact.
    bool any_inexact = false;
    for (int g = 0; g < groups; ++g) {
      const double p = c[g] * s32[g];
      any_inexact = any_inexact || std::fma(c[g], s32[g], -p) != 0.0;
    }
    if (any_inexact) run(c, s32, 0, absl::StrCat("fp32 scales, ", groups, " groups"));
  }
  run({1, 1, 3}, {1.0, std::ldexp(1.0, -60), std::ldexp(1.0, -60)}, 0, "2^60 apart");
  run({5, -5, 7, -7}, {0.25, 0.25, 0.5, 0.5}, 1, "cancelling");
  run({0, 0, 0}, {0.25, 0.5, 1.0}, 1, "zeros");
  run({123456}, {0.125}, 1, "one group");
}

// What the plan refuses: K off the 128-column steps (x has no padding columns to read), k-groups
// shorter than a step, unsupported widths.
TEST(AbqFusedPlanTest, RefusesShapesItCannotCut) {
  // n, k, words, group_words, n_groups, wb, ab, meta
  LayerShape s{37, 960, 30, 30, 1, 4, 8, false};  // K = 960: not whole steps
  EXPECT_FALSE(abq_fused::ShapeSupported(s));
  EXPECT_EQ(abq_fused::ChooseLayout(s, 132).bytes, 0u);
  s = {37, 1000, 32, 32, 1, 4, 8, false};  // K = 1000: 32 words, but 24 of their columns absent
  EXPECT_FALSE(abq_fused::ShapeSupported(s));
  EXPECT_EQ(abq_fused::ChooseLayout(s, 132).bytes, 0u);
  s = {37, 1024, 32, 1, 32, 4, 8, false};  // group 32: a group is one word
  EXPECT_FALSE(abq_fused::ShapeSupported(s));
  s = {37, 1024, 32, 4, 8, 5, 8, false};  // 5 weight planes
  EXPECT_FALSE(abq_fused::ShapeSupported(s));
  s = {37, 1024, 32, 4, 8, 4, 8, false};
  EXPECT_TRUE(abq_fused::ShapeSupported(s));
  EXPECT_GT(abq_fused::ChooseLayout(s, 132).bytes, 0u);
}

// With s_w and z as one word (meta) the zero points take no shared memory, which leaves the
// stages more room: on LLaMA-70B's down projection at W4A8 g128, at the same tiles a block, a
// warp's slots grow, and the launch's choice can keep more tiles a block (fewer blocks).
TEST(AbqFusedPlanTest, MetaWordsFreeSharedMemory) {
  LayerShape s{8192, 28672, 896, 4, 224, 4, 8, false};
  const Layout plain = abq_fused::LayoutFor(s, 4), plain_choice = abq_fused::ChooseLayout(s, 128);
  s.meta = true;
  const Layout meta = abq_fused::LayoutFor(s, 4), meta_choice = abq_fused::ChooseLayout(s, 128);
  ASSERT_GT(plain.bytes, 0u);
  ASSERT_GT(meta.bytes, 0u);
  EXPECT_EQ(meta.stage_off + 4ull * 224 * 8 * 4, plain.stage_off);
  EXPECT_GT(meta.slot_steps, plain.slot_steps);
  ExpectLayoutSound(s, meta, "70B down W4A8 g128, meta");
  ASSERT_GT(plain_choice.bytes, 0u);
  ASSERT_GT(meta_choice.bytes, 0u);
  EXPECT_GE(meta_choice.tiles, plain_choice.tiles);
}

}  // namespace
}  // namespace qcal::kernels
