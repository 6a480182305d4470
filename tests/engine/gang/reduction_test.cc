// The canonical reduction (DESIGN section 2, step 3.2) against its definition: for every C in
// 1..33 and every contiguous split of the chunks into W = 1..5 ranges (empty ranges included),
// the root completed from the ranks' covers is bit-identical to the fixed tree's value, each rank
// forms exactly AlignedCover with at most ⌈log2 C⌉ + 1 live partials and sends at most
// 2⌈log2 C⌉ + 1 of them. Then the same with fp32 tensors added on a backend, with input
// statistics whose partial Gram matrices hold only their lower triangles, and the refusals of
// CompleteTree.
#include "services/engine/gang/reduction.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/gang/exchange.h"

namespace qcal::engine {
namespace {

using Values = std::vector<float>;

absl::Status AddValues(Values& left, const Values& right) {
  for (size_t i = 0; i < left.size(); ++i) left[i] += right[i];
  return absl::OkStatus();
}

// Chunk values spread over many binades, so that a different summation order changes the bits.
std::vector<Values> RandomChunks(int c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
  std::uniform_int_distribution<int> expo(-12, 12);
  std::vector<Values> chunks(static_cast<size_t>(c), Values(3));
  for (Values& v : chunks) {
    for (float& x : v) x = std::ldexp(mant(rng), expo(rng));
  }
  return chunks;
}

// The definition: node = left + right, or its left child when the right subtree holds no chunk.
Values Reference(const std::vector<Values>& chunks, int level, int index) {
  if (level == 0) return chunks[static_cast<size_t>(index)];
  Values left = Reference(chunks, level - 1, 2 * index);
  if (TreeNode{level - 1, 2 * index + 1}.begin() >= static_cast<int>(chunks.size())) return left;
  const Values right = Reference(chunks, level - 1, 2 * index + 1);
  EXPECT_TRUE(AddValues(left, right).ok());
  return left;
}

bool SameBits(const Values& a, const Values& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every split of [0, c) into w contiguous ranges: boundaries 0 = b0 <= b1 <= ... <= bw = c.
void ForEachSplit(int c, int w, const std::function<void(const std::vector<int>&)>& fn) {
  std::vector<int> bounds(static_cast<size_t>(w + 1), 0);
  bounds[static_cast<size_t>(w)] = c;
  std::function<void(int)> rec = [&](int i) {
    if (i == w) {
      fn(bounds);
      return;
    }
    for (int b = bounds[static_cast<size_t>(i - 1)]; b <= c; ++b) {
      bounds[static_cast<size_t>(i)] = b;
      rec(i + 1);
    }
  };
  rec(1);
}

TEST(ReductionTest, DepthAndCover) {
  EXPECT_EQ(TreeDepth(1), 0);
  EXPECT_EQ(TreeDepth(2), 1);
  EXPECT_EQ(TreeDepth(5), 3);
  EXPECT_EQ(TreeDepth(8), 3);
  EXPECT_EQ(TreeDepth(33), 6);
  EXPECT_EQ(MaxCoverNodes(16), 9);
  // C = 5: [1, 5) is chunk 1, chunks 2-3 and chunk 4 (a node whose right subtree is empty).
  const std::vector<TreeNode> cover = AlignedCover(1, 5, 5);
  ASSERT_EQ(cover.size(), 3u);
  EXPECT_EQ(cover[0], (TreeNode{0, 1}));
  EXPECT_EQ(cover[1], (TreeNode{1, 1}));
  EXPECT_EQ(cover[2], (TreeNode{2, 1}));
  EXPECT_EQ(AlignedCover(0, 5, 5), (std::vector<TreeNode>{{3, 0}}));
  EXPECT_TRUE(AlignedCover(3, 3, 5).empty());
}

TEST(ReductionTest, EverySplitGivesTheTreeBits) {
  for (int c = 1; c <= 33; ++c) {
    SCOPED_TRACE(c);
    const std::vector<Values> chunks = RandomChunks(c, static_cast<uint32_t>(c));
    const int depth = TreeDepth(c);
    const Values expected = Reference(chunks, depth, 0);
    // Each range's cover, accumulated once (a rank's partials depend only on its range).
    std::map<std::pair<int, int>, TreePartials<Values>> covers;
    for (int begin = 0; begin <= c; ++begin) {
      for (int end = begin; end <= c; ++end) {
        TreeAccumulator<Values> acc(begin, end, c, AddValues);
        int most_live = 0;
        for (int k = begin; k < end; ++k) {
          ASSERT_TRUE(acc.Add(chunks[static_cast<size_t>(k)]).ok());
          most_live = std::max(most_live, acc.live());
        }
        EXPECT_LE(most_live, depth + 1) << "[" << begin << ", " << end << ")";
        auto partials = acc.Finish();
        ASSERT_TRUE(partials.ok()) << partials.status();
        std::vector<TreeNode> nodes;
        for (const auto& p : *partials) {
          nodes.push_back(p.node);
          // Every partial is the tree's own node value.
          EXPECT_TRUE(SameBits(p.value, Reference(chunks, p.node.level, p.node.index)));
        }
        EXPECT_EQ(nodes, AlignedCover(begin, end, c)) << "[" << begin << ", " << end << ")";
        EXPECT_LE(static_cast<int>(nodes.size()), MaxCoverNodes(c));
        covers[{begin, end}] = *std::move(partials);
      }
    }
    const auto& whole = covers.at({0, c});
    ASSERT_EQ(whole.size(), 1u);
    EXPECT_TRUE(SameBits(whole[0].value, expected));
    for (int w = 1; w <= 5; ++w) {
      int splits = 0;
      ForEachSplit(c, w, [&](const std::vector<int>& bounds) {
        TreePartials<Values> all;
        // Ranks' messages arrive in any order: take them last rank first.
        for (int r = w - 1; r >= 0; --r) {
          const auto& mine =
              covers.at({bounds[static_cast<size_t>(r)], bounds[static_cast<size_t>(r + 1)]});
          all.insert(all.end(), mine.begin(), mine.end());
        }
        auto root = CompleteTree<Values>(std::move(all), c, AddValues);
        ASSERT_TRUE(root.ok()) << root.status();
        if (!SameBits(*root, expected)) ADD_FAILURE() << "C " << c << " W " << w;
        ++splits;
      });
      EXPECT_GT(splits, 0);
    }
  }
}

absl::StatusOr<std::unique_ptr<kernels::Backend>> OneThreadCpuBackend() {
  kernels::BackendOptions bo;
  bo.threads = 1;
  return kernels::CreateBackend(bo);
}

TEST(ReductionTest, BackendTensorsAddToTheSameBitsForEverySplit) {
  auto be = OneThreadCpuBackend();
  ASSERT_TRUE(be.ok()) << be.status();
  kernels::Backend& backend = **be;
  Combine<Tensor> add = [&](Tensor& left, const Tensor& right) { return backend.Add(right, left); };
  for (int c : {1, 2, 5, 7, 13}) {
    SCOPED_TRACE(c);
    const std::vector<Values> chunks = RandomChunks(c, 100u + static_cast<uint32_t>(c));
    const Values expected = Reference(chunks, TreeDepth(c), 0);
    for (int w = 1; w <= 4; ++w) {
      ForEachSplit(c, w, [&](const std::vector<int>& bounds) {
        TreePartials<Tensor> all;
        for (int r = 0; r < w; ++r) {
          const int begin = bounds[static_cast<size_t>(r)];
          const int end = bounds[static_cast<size_t>(r + 1)];
          TreeAccumulator<Tensor> acc(begin, end, c, add);
          for (int k = begin; k < end; ++k) {
            auto t = backend.ToDevice(Tensor::FromVector(chunks[static_cast<size_t>(k)], {3}));
            ASSERT_TRUE(t.ok());
            ASSERT_TRUE(acc.Add(*t).ok());
          }
          auto mine = acc.Finish();
          ASSERT_TRUE(mine.ok());
          EXPECT_LE(static_cast<int>(mine->size()), MaxCoverNodes(c));
          all.insert(all.end(), mine->begin(), mine->end());
        }
        auto root = CompleteTree<Tensor>(std::move(all), c, add);
        ASSERT_TRUE(root.ok()) << root.status();
        auto host = backend.ToHost(*root);
        ASSERT_TRUE(host.ok());
        const Values got(host->data<float>(), host->data<float>() + 3);
        if (!SameBits(got, expected)) ADD_FAILURE() << "C " << c << " W " << w;
      });
    }
  }
}

// Input statistics as the engine forms them on the GPU: each chunk's Gram matrix holds only its
// lower triangle (Backend::GramLower; here the strict upper triangle is NaN), the ranks sum
// lower triangles (InputStatisticsCombine), every rank but the owner sends its cover through the
// exchange's bytes, and CompleteInputStatistics mirrors the root. For every split, the result is
// the tree of full symmetric Gram matrices summed by Add, bit for bit, with no NaN left.
TEST(ReductionTest, LowerTriangleStatisticsCompleteToTheFullSumForEverySplit) {
  auto be = OneThreadCpuBackend();
  ASSERT_TRUE(be.ok()) << be.status();
  kernels::Backend& backend = **be;
  const int64_t k = 6;
  for (int c : {1, 5, 7}) {
    SCOPED_TRACE(c);
    std::vector<Values> full, lower;
    for (int i = 0; i < c; ++i) {
      const std::vector<Values> x = RandomChunks(4 * static_cast<int>(k), 300u + i);
      std::vector<float> flat;
      for (const Values& row : x) flat.insert(flat.end(), row.begin(), row.begin() + 3);
      auto g = backend.Gram(Tensor::FromVector(flat, {2 * k, k}));
      ASSERT_TRUE(g.ok()) << g.status();
      full.emplace_back(g->data<float>(), g->data<float>() + k * k);
      Values l = full.back();
      for (int64_t r = 0; r < k; ++r) {
        for (int64_t col = r + 1; col < k; ++col) l[r * k + col] = std::nanf("");
      }
      lower.push_back(std::move(l));
    }
    const Values expected = Reference(full, TreeDepth(c), 0);
    for (int w = 1; w <= 3; ++w) {
      ForEachSplit(c, w, [&](const std::vector<int>& bounds) {
        InputPartials all;
        for (int r = 0; r < w; ++r) {
          const int begin = bounds[static_cast<size_t>(r)];
          const int end = bounds[static_cast<size_t>(r + 1)];
          TreeAccumulator<InputStatistics> acc(begin, end, c, InputStatisticsCombine(backend));
          for (int i = begin; i < end; ++i) {
            InputStatistics s;
            s.input = LinearInput::kO;
            s.gram = Tensor::FromVector(lower[static_cast<size_t>(i)], {k, k});
            ASSERT_TRUE(acc.Add(std::move(s)).ok());
          }
          auto mine = acc.Finish();
          ASSERT_TRUE(mine.ok()) << mine.status();
          if (r > 0) {
            auto bytes = SerializeInputPartials(backend, LinearInput::kO, k, *mine);
            ASSERT_TRUE(bytes.ok()) << bytes.status();
            mine = ParseInputPartials(backend, LinearInput::kO, k, *bytes);
            ASSERT_TRUE(mine.ok()) << mine.status();
          }
          all.insert(all.end(), mine->begin(), mine->end());
        }
        auto root = CompleteInputStatistics(backend, std::move(all), c);
        ASSERT_TRUE(root.ok()) << root.status();
        const Values got(root->gram.data<float>(), root->gram.data<float>() + k * k);
        if (!SameBits(got, expected)) ADD_FAILURE() << "C " << c << " W " << w;
      });
    }
  }
}

TEST(ReductionTest, CompleteTreeRefusesNodesThatDoNotTile) {
  auto complete = [](std::vector<TreeNode> nodes, int c) {
    TreePartials<Values> partials;
    for (TreeNode n : nodes) partials.push_back({n, Values{1.0f}});
    return CompleteTree<Values>(std::move(partials), c, AddValues).status();
  };
  EXPECT_TRUE(complete({{1, 0}, {0, 2}}, 3).ok());
  // A gap (chunk 1 missing), an overlap, a node outside the tree, nothing at all.
  EXPECT_EQ(complete({{0, 0}, {0, 2}}, 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(complete({{1, 0}, {0, 1}, {0, 2}}, 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(complete({{1, 0}, {0, 2}, {0, 3}}, 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(complete({{3, 0}}, 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(complete({}, 3).code(), absl::StatusCode::kInvalidArgument);
  // An accumulator fed past its range, or finished early.
  TreeAccumulator<Values> acc(0, 1, 3, AddValues);
  ASSERT_TRUE(acc.Add(Values{1.0f}).ok());
  EXPECT_EQ(acc.Add(Values{1.0f}).code(), absl::StatusCode::kOutOfRange);
  TreeAccumulator<Values> early(0, 2, 3, AddValues);
  ASSERT_TRUE(early.Add(Values{1.0f}).ok());
  EXPECT_EQ(early.Finish().status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace qcal::engine
