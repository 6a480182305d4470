// The work plan of the fused b1 GEMV (kernels/cuda/abq_gemv_fused.cu): how one token's ABQ layer
// is cut into clusters, blocks, warps, stage slots and prologue shares, and the shared-memory
// layout of a block. Plain C++ usable on both sides (QCAL_HOST_DEVICE), so that the CPU test
// (tests/kernels/abq_fused_plan_test.cc) replays the kernel's decomposition with these very
// functions against the integer reference (kernels/cpu/abq_ref.h) on machines without a GPU.
//
// Terms: a tile is 8 outputs (the b1 mma's row pairs); a step is 128 input columns (4 plane
// words, one m16n8k128); a unit is one (tile, step) of a block. A block owns `tiles` tiles and
// its 16 warps split the block's units into equal contiguous ranges; a warp copies its units'
// plane rows into its shared memory in one slot (all of them) or through two slots of
// `slot_steps` units. A cluster of 8 blocks shares the prologue: rank r takes an eighth of x's
// float4s for the maximum and an eighth of the plane words for the codes.
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/quant_grid.h"  // QCAL_HOST_DEVICE

namespace qcal::kernels::abq_fused {

inline constexpr int kWarps = 16;
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kCluster = 8;                // blocks a cluster (the portable maximum)
inline constexpr int kTileOuts = 8;               // outputs a tile
inline constexpr int kMaxTiles = 16;              // tiles a block at most
inline constexpr int kMaxSlots = 2;               // stage slots a warp at most
inline constexpr size_t kMaxShared = 224 * 1024;  // dynamic shared memory a block at most

// What the plan needs of a layer: n outputs, k inputs, words = k / 32 plane words a row (k a
// multiple of 128), k-groups of group_words words (words when there is one group), wb weight
// planes, ab activation planes, and whether s_w and z come as one word each (meta).
struct LayerShape {
  int64_t n = 0;
  int64_t k = 0;
  int words = 0;
  int group_words = 0;
  int n_groups = 0;
  int wb = 0;
  int ab = 0;
  bool meta = false;
};

// A launch's geometry and a block's shared-memory layout (byte offsets from the start of dynamic
// shared memory, each 16-byte aligned). bytes == 0: the shape does not fit.
struct Layout {
  int tiles = 0;        // tiles a block
  int slot_steps = 0;   // units a stage slot holds
  int slots = 0;        // 1 (a warp's units all resident) or 2 (a ring)
  int stride = 0;       // words a stage row: an odd multiple of 4, >= 4·slot_steps
  int pstride = 0;      // words an activation plane row: an odd multiple of 4, >= words
  int gpart = 0;        // Σa partial slots of a rank: the k-groups its words can touch
  int grid = 0;         // blocks, a multiple of kCluster
  int prod_stride = 0;  // doubles an output's row of epilogue products: the odd number > n_groups
  // Regions: the activation planes [ab][pstride]; the block's sums, s_w (or meta words) and z
  // (none with meta) [n_groups][nb]; Σa [n_groups]; a rank's partial Σa [gpart]; a flag per
  // output (an inexact product); the warps' stages, which the epilogue's products [nb][prod_stride]
  // reuse once the GEMV is done.
  size_t act_off = 0, dot_off = 0, scale_off = 0, zero_off = 0, sum_off = 0, gpart_off = 0,
         flag_off = 0, stage_off = 0, bytes = 0;
};

QCAL_HOST_DEVICE constexpr size_t Align16(size_t b) { return (b + 15) / 16 * 16; }

// The smallest odd multiple of 4 that is at least v (v a multiple of 4): a row stride whose 8
// rows start in 8 different 4-bank groups, so that a fragment read hits 32 banks.
QCAL_HOST_DEVICE constexpr int OddQuad(int v) { return (v / 4) % 2 == 1 ? v : v + 4; }

// Whether the plan takes the shape at all (m = 1 is the caller's condition): K a multiple of 128
// (whole steps: no padding columns, which x does not have), k-groups of whole steps (or one
// group), supported widths.
QCAL_HOST_DEVICE constexpr bool ShapeSupported(const LayerShape& s) {
  return s.n >= 1 && s.k == int64_t{32} * s.words && s.words >= 4 && s.words % 4 == 0 &&
         s.group_words >= 1 && s.n_groups == (s.words + s.group_words - 1) / s.group_words &&
         (s.n_groups == 1 || s.group_words % 4 == 0) &&
         (s.wb == 2 || s.wb == 3 || s.wb == 4 || s.wb == 8) && (s.ab == 4 || s.ab == 8);
}

// Plane rows of one tile in a stage slot: wb planes of 8 outputs, row j·8 + ol.
QCAL_HOST_DEVICE constexpr int SlotRows(const LayerShape& s) { return kTileOuts * s.wb; }

// Bytes of one stage slot of `units` units.
QCAL_HOST_DEVICE constexpr size_t SlotBytes(const LayerShape& s, int units) {
  return size_t{4} * SlotRows(s) * OddQuad(4 * units);
}

// Units of a block with `tiles` tiles, split over kWarps warps: the most a warp gets.
QCAL_HOST_DEVICE constexpr int UnitsPerWarp(int tiles, int steps) {
  return (tiles * steps + kWarps - 1) / kWarps;
}

// The layout for `tiles` tiles a block.
inline Layout LayoutFor(const LayerShape& s, int tiles) {
  Layout l;
  if (!ShapeSupported(s) || tiles < 1) return l;
  l.tiles = tiles;
  const int nb = kTileOuts * tiles, steps = s.words / 4;
  l.pstride = OddQuad(s.words);
  // A rank's words [r·wc, (r + 1)·wc) touch at most wc / group_words + 2 k-groups.
  const int wc = (s.words + kCluster - 1) / kCluster;
  l.gpart = s.n_groups < wc / s.group_words + 2 ? s.n_groups : wc / s.group_words + 2;
  const size_t per_out = size_t{4} * s.n_groups * nb;  // s_dot, s_w or z of the block
  size_t off = 0;
  l.act_off = off;
  off += Align16(size_t{4} * s.ab * l.pstride);
  l.dot_off = off;
  off += Align16(per_out);
  l.scale_off = off;
  off += Align16(per_out);
  l.zero_off = off;
  off += s.meta ? 0 : Align16(per_out);
  l.sum_off = off;
  off += Align16(size_t{4} * s.n_groups);
  l.gpart_off = off;
  off += Align16(size_t{4} * l.gpart);
  l.flag_off = off;
  off += Align16(size_t{4} * nb);
  l.stage_off = off;
  if (off >= kMaxShared) return Layout{};
  const size_t avail = (kMaxShared - off) / kWarps;
  const int units = UnitsPerWarp(tiles, steps);
  if (SlotBytes(s, units) <= avail) {
    l.slots = 1;
    l.slot_steps = units;
  } else {
    int u = units / 2;
    while (u >= 1 && 2 * SlotBytes(s, u) > avail) --u;
    if (u < 1) return Layout{};
    l.slots = 2;
    l.slot_steps = u;
  }
  l.stride = OddQuad(4 * l.slot_steps);
  l.prod_stride = s.n_groups % 2 == 0 ? s.n_groups + 1 : s.n_groups + 2;
  const size_t stages = size_t{kWarps} * l.slots * SlotBytes(s, l.slot_steps);
  const size_t products = size_t{8} * nb * l.prod_stride;
  l.bytes = off + (stages > products ? stages : products);
  if (l.bytes > kMaxShared) return Layout{};
  const int64_t blocks = (s.n + nb - 1) / nb;
  l.grid = static_cast<int>((blocks + kCluster - 1) / kCluster * kCluster);
  return l;
}

// The launch's layout for about `blocks` blocks at once (one a multiprocessor: the device's count
// rounded down to whole clusters, or what cudaOccupancyMaxActiveClusters allows): the fewest
// tiles a block that keep the grid within them, lowered until the layout fits. bytes == 0 when
// none does.
inline Layout ChooseLayout(const LayerShape& s, int blocks) {
  if (!ShapeSupported(s)) return Layout{};
  const int64_t target =
      blocks / kCluster * kCluster > kCluster ? blocks / kCluster * kCluster : kCluster;
  int64_t tiles = (s.n + kTileOuts * target - 1) / (kTileOuts * target);
  if (tiles < 1) tiles = 1;
  if (tiles > kMaxTiles) tiles = kMaxTiles;
  for (int t = static_cast<int>(tiles); t >= 1; --t) {
    const Layout l = LayoutFor(s, t);
    if (l.bytes > 0) return l;
  }
  return Layout{};
}

// Tiles of block `block` that hold outputs (0 past the last output).
QCAL_HOST_DEVICE constexpr int BlockTiles(const Layout& l, int64_t n, int64_t block) {
  const int64_t o0 = block * kTileOuts * l.tiles;
  if (o0 >= n) return 0;
  const int64_t t = (n - o0 + kTileOuts - 1) / kTileOuts;
  return t < l.tiles ? static_cast<int>(t) : l.tiles;
}

// A half-open range [begin, end).
struct Range {
  int64_t begin = 0, end = 0;
};

// The units of warp `warp` among a block's `units` units.
QCAL_HOST_DEVICE constexpr Range WarpUnits(int units, int warp) {
  const int per = (units + kWarps - 1) / kWarps;
  const int b = warp * per < units ? warp * per : units;
  return {b, b + per < units ? b + per : units};
}

// Cluster rank r's share of `count` items (x's float4s, or plane words): contiguous eighths.
QCAL_HOST_DEVICE constexpr Range RankShare(int64_t count, int rank) {
  const int64_t per = (count + kCluster - 1) / kCluster;
  const int64_t b = rank * per < count ? rank * per : count;
  return {b, b + per < count ? b + per : count};
}

// One run of a slot fill: units [u, u + len) all in tile `tile`, steps [step, step + len), stored
// at the slot's local units [li, li + len).
struct Segment {
  int tile = 0, step = 0, len = 0, li = 0;
};

// The run that starts at local unit li of a fill of units [ub, ub + cnt).
QCAL_HOST_DEVICE constexpr Segment FillSegment(int ub, int cnt, int li, int steps) {
  const int u = ub + li;
  Segment seg;
  seg.tile = u / steps;
  seg.step = u % steps;
  seg.len = cnt - li < steps - seg.step ? cnt - li : steps - seg.step;
  seg.li = li;
  return seg;
}

// The epilogue's sum without its sequential chain. AbqEpilogue adds an output's products
// p_G = c_G·s_w[G] (fp64) in group order. When every product is exact and all are multiples of
// u = 2^e (e the lowest set bit's exponent over the products) with Σ|p_G| <= 2^52·u, every
// partial sum in any order is a multiple of u below 2^53·u in magnitude, so every addition is
// exact and any order gives the chain's bits: the kernel's warp then adds its lanes' groups and
// a butterfly adds the lanes. Otherwise one lane runs the chain. (The bound has a factor 2 of
// margin, so that a rounded computation of Σ|p_G| cannot pass it wrongly.)

// The exponent of v's lowest set bit (v = m·2^e with m odd), for a normal nonzero v; INT32_MIN
// for zero, subnormals, infinities and NaN (which never pass OrderFree).
QCAL_HOST_DEVICE inline int LsbExponent(double v) {
  uint64_t bits = 0;
  static_assert(sizeof(bits) == sizeof(v), "a double is 64 bits");
  memcpy(&bits, &v, sizeof(bits));
  const int biased = static_cast<int>((bits >> 52) & 0x7ff);
  if (biased == 0 || biased == 0x7ff) return INT32_MIN;
  const uint64_t mantissa = (bits & ((uint64_t{1} << 52) - 1)) | (uint64_t{1} << 52);
#ifdef __CUDA_ARCH__
  const int tz = __ffsll(static_cast<long long>(mantissa)) - 1;
#else
  const int tz = __builtin_ctzll(mantissa);
#endif
  return biased - 1075 + tz;
}

// Whether products with these facts may be added in any order: `exact` (every product exact,
// none subnormal), `emin` the least LsbExponent over the nonzero products (INT32_MAX when all
// are zero) and `abs_sum` their absolute values' sum.
QCAL_HOST_DEVICE inline bool OrderFree(bool exact, int emin, double abs_sum) {
  if (!exact) return false;
  if (abs_sum == 0.0) return true;
  if (emin < -1000 || emin > 900) return false;
  return abs_sum <= ldexp(1.0, 52 + emin);
}

}  // namespace qcal::kernels::abq_fused
