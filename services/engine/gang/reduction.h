// The canonical reduction (DESIGN section 2, step 3.2): how per-chunk partial statistics are summed
// so that the result is bit-identical whatever the number of workers and however the chunks are
// split among them.
//
// The tree. Chunks 0..C−1 are the leaves of the perfect binary tree over P = C rounded up to a
// power of two (depth D = ⌈log2 C⌉, root at level D). TreeNode{level, index} covers the chunks
// [index·2^level, (index + 1)·2^level) ∩ [0, C); its value is left + right (left the lower
// chunks), or its left child unchanged when the right subtree holds no chunk. Summing a node only
// ever combines its two children, so every node's value is fixed by the chunks alone.
//
// A rank holding the contiguous chunks [begin, end) forms the maximal aligned subtrees inside
// that range (AlignedCover) with a TreeAccumulator, fed one chunk partial at a time in chunk order
// (a pairwise-summation stack: at most D + 1 partials being summed besides the finished nodes at
// the start of the range). The statistic's owner completes the
// tree from every rank's nodes (CompleteTree). A cover holds at most 2·D + 1 nodes.
//
// The values are pluggable: Combine<T> adds the right sibling into the left one (fp32 Gram
// matrices on a backend, ActivationStats::Merge, ...). It must be deterministic; it need not be
// commutative, since the left operand is always the lower chunks.
#pragma once

#include <algorithm>
#include <functional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace qcal::engine {

struct TreeNode {
  int level = 0;  // 0: one chunk
  int index = 0;  // position among the nodes of its level
  // The first chunk of the node's span [begin, begin + 2^level) (before clipping to [0, C)).
  int begin() const { return index << level; }
  // One past its last chunk within [0, total_chunks).
  int end(int total_chunks) const;
  bool operator==(const TreeNode&) const = default;
};

// D = ⌈log2 C⌉ (0 for C <= 1): the level of the root.
int TreeDepth(int total_chunks);
// The most nodes one rank's cover can hold, 2·D + 1.
int MaxCoverNodes(int total_chunks);
// The maximal aligned subtrees whose chunks (within [0, C)) lie inside [begin, end), in chunk
// order; empty for an empty range. 0 <= begin <= end <= total_chunks.
std::vector<TreeNode> AlignedCover(int begin, int end, int total_chunks);

// A node and its value.
template <typename T>
struct TreePartial {
  TreeNode node;
  T value;
};
template <typename T>
using TreePartials = std::vector<TreePartial<T>>;

// left = left + right (right: the higher chunks). An error fails the reduction.
template <typename T>
using Combine = std::function<absl::Status(T& left, const T& right)>;

namespace reduction_internal {

// Whether the top two of `nodes` are siblings (to be combined), or the top one is a left child
// whose sibling holds no chunk (to be promoted to its parent unchanged).
bool CanCombineTop(const std::vector<TreeNode>& nodes);
bool CanPromoteTop(const std::vector<TreeNode>& nodes, int total_chunks);
// InvalidArgument unless `nodes` (sorted by begin) are nodes of the tree tiling [0, total_chunks).
absl::Status CheckTiling(const std::vector<TreeNode>& nodes, int total_chunks);

// Nodes pushed in chunk order, siblings combined and lone left children promoted as soon as they
// can be: the state shared by TreeAccumulator and CompleteTree.
template <typename T>
class TreeStack {
 public:
  TreeStack(int total_chunks, Combine<T> combine)
      : total_(total_chunks), combine_(std::move(combine)) {}

  absl::Status Push(TreeNode node, T value) {
    nodes_.push_back(node);
    values_.push_back(std::move(value));
    for (;;) {
      if (CanCombineTop(nodes_)) {
        const size_t n = nodes_.size();
        absl::Status s = combine_(values_[n - 2], values_[n - 1]);
        if (!s.ok()) return s;
        nodes_.pop_back();
        values_.pop_back();
      } else if (!CanPromoteTop(nodes_, total_)) {
        return absl::OkStatus();
      }
      nodes_.back() = {nodes_.back().level + 1, nodes_.back().index / 2};
    }
  }
  const std::vector<TreeNode>& nodes() const { return nodes_; }
  // The nodes and values, bottom (lowest chunks) first; the stack is empty afterwards.
  TreePartials<T> Take() {
    TreePartials<T> out;
    for (size_t i = 0; i < nodes_.size(); ++i) out.push_back({nodes_[i], std::move(values_[i])});
    nodes_.clear();
    values_.clear();
    return out;
  }

 private:
  int total_;
  Combine<T> combine_;
  std::vector<TreeNode> nodes_;
  std::vector<T> values_;
};

}  // namespace reduction_internal

// The pairwise-summation stack of one rank over its chunk range. Not thread-safe.
template <typename T>
class TreeAccumulator {
 public:
  // Chunks [begin, end) of total_chunks (0 <= begin <= end <= total_chunks).
  TreeAccumulator(int begin, int end, int total_chunks, Combine<T> combine)
      : begin_(begin), next_(begin), end_(end), stack_(total_chunks, std::move(combine)) {}

  // The partial of the next chunk (begin, begin + 1, ... in turn). Errors: the combine's, or a
  // chunk past the range (OutOfRange).
  absl::Status Add(T partial) {
    if (next_ >= end_) {
      return absl::OutOfRangeError(
          absl::StrCat("chunk ", next_, " is past the accumulated range ending at ", end_));
    }
    return stack_.Push({0, next_++}, std::move(partial));
  }
  // Partials still being summed: at most TreeDepth + 1. The finished cover nodes at the start of
  // the range (right children whose sibling lies before it) are output, not counted.
  int live() const {
    int n = 0;
    for (const TreeNode& node : stack_.nodes()) {
      if (node.index % 2 == 0 || TreeNode{node.level, node.index - 1}.begin() >= begin_) ++n;
    }
    return n;
  }
  // The cover's nodes and values in chunk order (the AlignedCover of the range). FailedPrecondition
  // unless every chunk of the range was added. The accumulator is empty afterwards.
  absl::StatusOr<TreePartials<T>> Finish() {
    if (next_ != end_) {
      return absl::FailedPreconditionError(
          absl::StrCat("accumulation stopped at chunk ", next_, " of a range ending at ", end_));
    }
    return stack_.Take();
  }

 private:
  int begin_;
  int next_;
  int end_;
  reduction_internal::TreeStack<T> stack_;
};

// The root of the tree over total_chunks chunks from the union of every rank's cover nodes (any
// order): the same fixed tree, so the same bits as one rank holding every chunk. InvalidArgument
// when the nodes do not tile [0, total_chunks) (a gap, an overlap, a node outside the tree);
// total_chunks >= 1.
template <typename T>
absl::StatusOr<T> CompleteTree(TreePartials<T> partials, int total_chunks, Combine<T> combine) {
  std::stable_sort(partials.begin(), partials.end(),
                   [](const TreePartial<T>& a, const TreePartial<T>& b) {
                     return a.node.begin() < b.node.begin();
                   });
  std::vector<TreeNode> nodes;
  for (const TreePartial<T>& p : partials) nodes.push_back(p.node);
  absl::Status tiled = reduction_internal::CheckTiling(nodes, total_chunks);
  if (!tiled.ok()) return tiled;
  reduction_internal::TreeStack<T> stack(total_chunks, std::move(combine));
  for (TreePartial<T>& p : partials) {
    absl::Status s = stack.Push(p.node, std::move(p.value));
    if (!s.ok()) return s;
  }
  TreePartials<T> root = stack.Take();
  if (root.size() != 1) {
    return absl::InternalError(absl::StrCat("the canonical reduction over ", total_chunks,
                                            " chunks ended with ", root.size(), " nodes"));
  }
  return std::move(root[0].value);
}

}  // namespace qcal::engine
