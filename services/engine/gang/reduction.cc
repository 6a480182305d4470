#include "services/engine/gang/reduction.h"

#include <algorithm>

namespace qcal::engine {

int TreeNode::end(int total_chunks) const {
  return static_cast<int>(std::min<int64_t>(int64_t{index + 1} << level, total_chunks));
}

int TreeDepth(int total_chunks) {
  int depth = 0;
  while ((int64_t{1} << depth) < total_chunks) ++depth;
  return depth;
}

int MaxCoverNodes(int total_chunks) { return 2 * TreeDepth(total_chunks) + 1; }

std::vector<TreeNode> AlignedCover(int begin, int end, int total_chunks) {
  const int depth = TreeDepth(total_chunks);
  std::vector<TreeNode> cover;
  int pos = begin;
  while (pos < end) {
    // The highest level at which pos starts a node whose chunks end inside the range: alignment
    // and the end bound both only get harder as the level grows.
    int level = 0;
    while (level < depth && pos % (1 << (level + 1)) == 0 &&
           TreeNode{level + 1, pos >> (level + 1)}.end(total_chunks) <= end) {
      ++level;
    }
    const TreeNode node{level, pos >> level};
    cover.push_back(node);
    pos = node.end(total_chunks);
  }
  return cover;
}

namespace reduction_internal {

bool CanCombineTop(const std::vector<TreeNode>& nodes) {
  if (nodes.size() < 2) return false;
  const TreeNode& left = nodes[nodes.size() - 2];
  const TreeNode& right = nodes.back();
  return left.level == right.level && left.index % 2 == 0 && right.index == left.index + 1;
}

bool CanPromoteTop(const std::vector<TreeNode>& nodes, int total_chunks) {
  if (nodes.empty()) return false;
  const TreeNode& top = nodes.back();
  return top.level < TreeDepth(total_chunks) && top.index % 2 == 0 &&
         TreeNode{top.level, top.index + 1}.begin() >= total_chunks;
}

absl::Status CheckTiling(const std::vector<TreeNode>& nodes, int total_chunks) {
  if (total_chunks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("a reduction over ", total_chunks, " chunks"));
  }
  const int depth = TreeDepth(total_chunks);
  int next = 0;
  for (const TreeNode& n : nodes) {
    if (n.level < 0 || n.level > depth || n.index < 0 || n.begin() >= total_chunks) {
      return absl::InvalidArgumentError(absl::StrCat("node (level ", n.level, ", index ", n.index,
                                                     ") is not in the tree over ", total_chunks,
                                                     " chunks"));
    }
    if (n.begin() != next) {
      return absl::InvalidArgumentError(
          absl::StrCat("partials ", n.begin() < next ? "overlap" : "leave a gap", " at chunk ",
                       std::min(next, n.begin()), " of ", total_chunks));
    }
    next = n.end(total_chunks);
  }
  if (next != total_chunks) {
    return absl::InvalidArgumentError(
        absl::StrCat("partials cover ", next, " of ", total_chunks, " chunks"));
  }
  return absl::OkStatus();
}

}  // namespace reduction_internal
}  // namespace qcal::engine
