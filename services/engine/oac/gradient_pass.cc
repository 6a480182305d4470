#include "services/engine/oac/gradient_pass.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/memory_usage.h"
#include "common/status.h"
#include "services/engine/oac/block_backward.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

absl::Status ValidateChunks(const GradientChunks& chunks, const GradientPassOptions& options) {
  if (options.kind == HessianKind::kLayer) {
    return absl::InvalidArgumentError(
        "RunGradientPass: hessian kind layer needs no gradient pass (kind must be "
        "output_adaptive or output_adaptive_token)");
  }
  if (options.boundary_every < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("RunGradientPass: boundary_every must be >= 0, got ", options.boundary_every));
  }
  const int n = static_cast<int>(chunks.ids.size());
  if (chunks.seq_len < 1 || static_cast<int>(chunks.chunk_batch.size()) != n ||
      chunks.first_chunk < 0 || chunks.total_chunks < 1 ||
      chunks.first_chunk + n > chunks.total_chunks) {
    return absl::InvalidArgumentError(
        absl::StrCat("RunGradientPass: chunks [", chunks.first_chunk, ", ", chunks.first_chunk + n,
                     ") of ", chunks.total_chunks, " with seq_len ", chunks.seq_len, " and ",
                     chunks.chunk_batch.size(), " batch sizes for ", n, " id lists"));
  }
  for (int c = 0; c < n; ++c) {
    if (chunks.chunk_batch[c] < 1 || static_cast<int64_t>(chunks.ids[c].size()) !=
                                         int64_t{chunks.chunk_batch[c]} * chunks.seq_len) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RunGradientPass: chunk ", chunks.first_chunk + c, " has ", chunks.ids[c].size(),
          " ids for ", chunks.chunk_batch[c], " samples of ", chunks.seq_len, " tokens"));
    }
  }
  return absl::OkStatus();
}

// Bytes the backward needs besides the carried activations: one chunk's block internals and
// per-sample products, the loss head's logits slice, and the statistics (a chunk's partials plus
// the live nodes of the canonical reduction).
int64_t WorkingBytes(const ModelConfig& c, const GradientChunks& chunks,
                     const GradientPassOptions& options) {
  int64_t max_rows = 0;
  for (int b : chunks.chunk_batch)
    max_rows = std::max<int64_t>(max_rows, int64_t{b} * chunks.seq_len);
  const int64_t d = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), inter = c.intermediate_size;
  const int64_t l = chunks.seq_len, wide = std::max(d, inter);
  int64_t elements = max_rows * (6 * d + 4 * q + 4 * kv + 7 * inter);
  // The BF16 operand copies of the tapped x and dy live at once (BlockBackward: at most the q/k/v
  // input and the three gradients), in floats.
  elements += max_rows * (d + q + 2 * kv) / 2;
  // The attention forward's packed q, k and v kept for its backward (Backend::AttentionSaved).
  elements += max_rows * (q + 2 * kv) / 2;
  // The chunk's P (every sample's, F32 and its operand copy), and the chunk's stacked Z or G
  // (AccumulateOacHessian).
  elements += 2 * (max_rows / l) * l * l + max_rows * wide + (max_rows / l) * wide * std::max(d, q);
  int64_t stats = 0;
  for (LinearKind k : kAllLinears) {
    const int64_t d_in = k == LinearKind::kO ? q : k == LinearKind::kDown ? inter : d;
    const int64_t d_out = k == LinearKind::kQ      ? q
                          : k == LinearKind::kK    ? kv
                          : k == LinearKind::kV    ? kv
                          : k == LinearKind::kGate ? inter
                          : k == LinearKind::kUp   ? inter
                                                   : d;
    stats += d_in * d_in + (options.fisher ? d_out * d_in : 0);
  }
  // A chunk's partials, and the accumulator's nodes (at most a cover's, plus one being summed).
  const int64_t live = std::min<int64_t>(static_cast<int64_t>(chunks.ids.size()),
                                         MaxCoverNodes(chunks.total_chunks) + 1) +
                       1;
  return (elements + stats * live) * int64_t{sizeof(float)} + (int64_t{256} << 20);
}

// The kept block inputs outside the segment in hand, per (block, chunk), in their tier and in
// `stored` (BoundaryDType: BF16 with bf16 compute). Device tensors (F32) go in and come out;
// Take frees what it returns.
class BoundaryStore {
 public:
  BoundaryStore(kernels::Backend& be, BoundaryTier tier, DType stored)
      : be_(be), tier_(tier), stored_(stored) {}
  ~BoundaryStore() {
    if (!dir_.empty()) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }

  absl::Status Open(const std::string& scratch_dir) {
    if (tier_ != BoundaryTier::kScratch) return absl::OkStatus();
    std::string tmpl = (fs::path(scratch_dir) / "qcal-gradient-pass-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) {
      return absl::UnavailableError(absl::StrCat(scratch_dir,
                                                 ": cannot create a directory for "
                                                 "the gradient pass's boundaries: ",
                                                 std::strerror(errno)));
    }
    dir_ = tmpl;
    return absl::OkStatus();
  }

  absl::Status Put(int block, int chunk, const Tensor& t) {
    // A copy in the stored dtype on the device.
    QCAL_ASSIGN_OR_RETURN(Tensor stored, be_.Alloc(stored_, t.shape()));
    QCAL_RETURN_IF_ERROR(stored_ == DType::kF32 ? be_.Copy(t, stored) : be_.Convert(t, stored));
    Tensor kept;
    switch (tier_) {
      case BoundaryTier::kDevice:
        kept = std::move(stored);
        break;
      case BoundaryTier::kHost: {
        QCAL_ASSIGN_OR_RETURN(kept, be_.AllocHost(stored_, t.shape()));
        QCAL_RETURN_IF_ERROR(be_.Copy(stored, kept));
        break;
      }
      case BoundaryTier::kScratch: {
        QCAL_ASSIGN_OR_RETURN(Tensor host, be_.ToHost(stored));
        const std::string path = PathOf(block, chunk);
        std::FILE* f = std::fopen(path.c_str(), "wb");
        const bool ok =
            f != nullptr && std::fwrite(host.raw(), 1, host.nbytes(), f) == host.nbytes();
        const int err = errno;
        if (f != nullptr && std::fclose(f) != 0 && ok) {
          return absl::UnavailableError(
              absl::StrCat(path, ": close failed: ", std::strerror(errno)));
        }
        if (!ok) {
          return absl::UnavailableError(absl::StrCat(
              path, ": writing a gradient-pass boundary failed: ", std::strerror(err)));
        }
        shapes_[{block, chunk}] = t.shape();
        return absl::OkStatus();
      }
    }
    kept_[{block, chunk}] = std::move(kept);
    return absl::OkStatus();
  }

  absl::StatusOr<Tensor> Take(int block, int chunk) {
    const std::pair<int, int> key{block, chunk};
    Tensor stored;  // on the device, in stored_
    if (tier_ == BoundaryTier::kScratch) {
      const std::string path = PathOf(block, chunk);
      QCAL_ASSIGN_OR_RETURN(Tensor host, be_.AllocHost(stored_, shapes_.at(key)));
      std::FILE* f = std::fopen(path.c_str(), "rb");
      const bool ok = f != nullptr && std::fread(host.raw(), 1, host.nbytes(), f) == host.nbytes();
      const int err = errno;
      if (f != nullptr) std::fclose(f);
      std::remove(path.c_str());
      if (!ok) {
        return absl::DataLossError(absl::StrCat(
            path, ": reading a gradient-pass boundary back failed: ", std::strerror(err)));
      }
      if (be_.device() == Device::kHost) {
        stored = std::move(host);
      } else {
        QCAL_ASSIGN_OR_RETURN(stored, be_.Alloc(stored_, host.shape()));
        QCAL_RETURN_IF_ERROR(be_.Copy(host, stored));
      }
    } else {
      Tensor kept = std::move(kept_.at(key));
      kept_.erase(key);
      if (tier_ == BoundaryTier::kDevice) {
        stored = std::move(kept);
      } else {
        QCAL_ASSIGN_OR_RETURN(stored, be_.Alloc(stored_, kept.shape()));
        QCAL_RETURN_IF_ERROR(be_.Copy(kept, stored));
      }
    }
    if (stored_ == DType::kF32) return stored;
    QCAL_ASSIGN_OR_RETURN(Tensor t, be_.Alloc(DType::kF32, stored.shape()));
    QCAL_RETURN_IF_ERROR(be_.Convert(stored, t));
    return t;
  }

 private:
  std::string PathOf(int block, int chunk) const {
    return absl::StrCat(dir_, "/block", block, "-chunk", chunk,
                        stored_ == DType::kF32 ? ".f32" : ".bf16");
  }

  kernels::Backend& be_;
  BoundaryTier tier_;
  DType stored_;
  std::string dir_;  // scratch tier: the pass's own directory, removed at the end
  std::map<std::pair<int, int>, Tensor> kept_;
  std::map<std::pair<int, int>, Shape> shapes_;
};

// The order the pass acquires blocks in, so that each acquisition prefetches the next one (a
// streaming model reads it while the current block computes) and a block is released unless it is
// acquired again at once.
class BlockWalk {
 public:
  BlockWalk(Model& model, std::vector<int> order) : model_(model), order_(std::move(order)) {}
  absl::Status Acquire(int b) {
    QCAL_CHECK(pos_ < order_.size() && order_[pos_] == b);
    ++pos_;
    // The next other block: the last block of the forward is also the first of the backward, so
    // its successor's read starts before the loss head rather than after it.
    size_t next = pos_;
    while (next < order_.size() && order_[next] == b) ++next;
    return model_.AcquireBlock(b, next < order_.size() ? order_[next] : -1);
  }
  void Done(int b) {
    if (pos_ >= order_.size() || order_[pos_] != b) model_.ReleaseBlock(b);
  }

 private:
  Model& model_;
  std::vector<int> order_;
  size_t pos_ = 0;
};

// Forward 0 .. B−1; then per segment [s·k, min((s + 1)·k, B)) from the last: its blocks but the
// last forward (recomputing the segment's inputs; the last segment's were kept by the forward
// sweep), then its blocks backward.
std::vector<int> AcquisitionOrder(int blocks, int k) {
  std::vector<int> order;
  for (int b = 0; b < blocks; ++b) order.push_back(b);
  const int last_begin = (blocks - 1) / k * k;
  for (int begin = last_begin; begin >= 0; begin -= k) {
    const int end = std::min(begin + k, blocks);
    if (begin != last_begin) {
      for (int b = begin; b + 1 < end; ++b) order.push_back(b);
    }
    for (int b = end - 1; b >= begin; --b) order.push_back(b);
  }
  return order;
}

}  // namespace

DType BoundaryDType(const kernels::Backend& be) {
  return be.compute_dtype() == kernels::ComputeDType::kBF16 ? DType::kBF16 : DType::kF32;
}

const char* BoundaryTierName(BoundaryTier tier) {
  switch (tier) {
    case BoundaryTier::kDevice:
      return "device";
    case BoundaryTier::kHost:
      return "host";
    case BoundaryTier::kScratch:
      return "scratch";
  }
  return "?";
}

absl::StatusOr<GradientPassPlan> PlanGradientPass(Model& model, const GradientChunks& chunks,
                                                  const GradientPassOptions& options) {
  QCAL_RETURN_IF_ERROR(ValidateChunks(chunks, options));
  kernels::Backend& be = model.backend();
  const int blocks = model.num_blocks();
  int64_t rows = 0;
  for (int b : chunks.chunk_batch) rows += int64_t{b} * chunks.seq_len;
  const int64_t act = rows * model.config().hidden_size * int64_t{sizeof(float)};
  const int64_t kept_act = rows * model.config().hidden_size * DTypeSize(BoundaryDType(be));
  const int64_t working = WorkingBytes(model.config(), chunks, options);
  const bool host_backend = be.device() == Device::kHost;
  const int64_t host_avail = AvailableHostMemoryBytes();
  int64_t device_avail = be.AvailableMemory();
  if (device_avail < 0 && host_backend) device_avail = host_avail;
  if (device_avail < 0) device_avail = INT64_MAX;
  const int64_t host_limit = host_avail < 0 ? INT64_MAX : host_avail;
  int64_t disk = -1;
  if (!options.scratch_dir.empty()) {
    std::error_code ec;
    const fs::space_info space = fs::space(options.scratch_dir, ec);
    if (!ec) disk = static_cast<int64_t>(space.available);
  }
  auto plan_for = [&](int k, BoundaryTier tier) {
    GradientPassPlan p;
    p.boundary_every = k;
    p.tier = tier;
    p.activation_bytes = act;
    p.boundary_dtype = BoundaryDType(be);
    p.kept_bytes = int64_t{(blocks + k - 1) / k - 1} * kept_act;
    // The most that kept boundaries (on the device) and the sink's statistics hold together: while
    // block b runs backward, the boundaries of the segments below b's and the statistics of
    // blocks b..B−1.
    int64_t kept_peak = 0;
    for (int b = 0; b < blocks; ++b) {
      const int64_t below = tier == BoundaryTier::kDevice ? int64_t{b / k} * kept_act : 0;
      kept_peak =
          std::max(kept_peak, below + int64_t{blocks - b} * options.sink_device_bytes_per_block);
    }
    if (tier == BoundaryTier::kDevice) kept_peak = std::max(kept_peak, p.kept_bytes);
    p.device_bytes = int64_t{k + 1} * act + working + kept_peak;
    return p;
  };
  auto fits = [&](const GradientPassPlan& p) {
    if (p.device_bytes > device_avail) return false;
    switch (p.tier) {
      case BoundaryTier::kDevice:
        return true;
      case BoundaryTier::kHost:
        return !host_backend && p.kept_bytes <= host_limit;
      case BoundaryTier::kScratch:
        return disk >= 0 && p.kept_bytes <= disk;
    }
    return false;
  };
  const int k_min = options.boundary_every > 0 ? std::min(options.boundary_every, blocks) : 1;
  const int k_max = options.boundary_every > 0 ? k_min : blocks;
  for (BoundaryTier tier : {BoundaryTier::kDevice, BoundaryTier::kHost, BoundaryTier::kScratch}) {
    for (int k = k_min; k <= k_max; ++k) {
      const GradientPassPlan p = plan_for(k, tier);
      if (fits(p)) return p;
    }
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "recipe key \"hessian\" is ", RecipeName(options.kind),
      ", whose gradient pass cannot be placed: the activations of this rank's chunks (", act,
      " bytes a block, ", blocks, " blocks",
      options.boundary_every > 0 ? absl::StrCat(", boundary_every ", k_min) : "",
      ") fit neither device memory (", device_avail, " bytes available, ", working,
      " needed for work) nor host memory (", host_limit, ") nor the scratch disk (",
      options.scratch_dir.empty() ? std::string("none given")
                                  : absl::StrCat(disk, " bytes at ", options.scratch_dir),
      ")"));
}

absl::StatusOr<GradientPassStats> RunGradientPass(
    Model& model, const GradientChunks& chunks, const GradientPassOptions& options,
    const OacSink& sink, const std::function<void(const std::string&)>& log) {
  const auto t_start = std::chrono::steady_clock::now();
  if (model.config().moe()) {
    return absl::InvalidArgumentError(
        absl::StrCat("gradient pass: mixture-of-experts models (", model.config().model_type,
                     ") have no output-adaptive statistics (recipe keys \"hessian\" and "
                     "\"retrain\"; docs/MOE.md)"));
  }
  QCAL_RETURN_IF_ERROR(ValidateChunks(chunks, options));
  kernels::Backend& be = model.backend();
  if (!be.SupportsOp(kernels::Op::kBackward)) {
    return absl::UnimplementedError(
        absl::StrCat("gradient pass: the ", be.name(), " backend has no backward ops"));
  }
  const int blocks = model.num_blocks();
  const int n = static_cast<int>(chunks.ids.size());
  const int seq_len = chunks.seq_len;
  std::vector<SeqShape> shapes(n);
  for (int c = 0; c < n; ++c) shapes[c] = SeqShape{chunks.chunk_batch[c], seq_len, 0};
  if (n == 0) {
    // A rank without chunks (more ranks than chunks) contributes empty covers.
    for (int b = blocks - 1; b >= 0; --b) QCAL_RETURN_IF_ERROR(sink(b, BlockOacPartials()));
    GradientPassStats stats;
    stats.seconds = SecondsSince(t_start);
    return stats;
  }
  QCAL_ASSIGN_OR_RETURN(const GradientPassPlan plan, PlanGradientPass(model, chunks, options));
  const int k = plan.boundary_every;
  GradientPassStats stats;
  stats.boundary_every = k;
  if (log) {
    log(absl::StrFormat(
        "gradient pass: %d chunks (%d..%d of %d), %d blocks, boundaries every %d block(s) in %s "
        "memory as %s (%.2f GB of activations a block, %.2f GB planned on the device)",
        n, chunks.first_chunk, chunks.first_chunk + n - 1, chunks.total_chunks, blocks, k,
        BoundaryTierName(plan.tier), DTypeName(plan.boundary_dtype), plan.activation_bytes / 1e9,
        plan.device_bytes / 1e9));
  }
  BoundaryStore store(be, plan.tier, plan.boundary_dtype);
  QCAL_RETURN_IF_ERROR(store.Open(options.scratch_dir));
  BlockWalk walk(model, AcquisitionOrder(blocks, k));
  const int last_begin = (blocks - 1) / k * k;
  // The inputs of the segment in hand, [block − begin][chunk], on the device.
  std::vector<std::vector<Tensor>> segment(k, std::vector<Tensor>(n));
  // With BF16 boundaries, every block input is rounded to bf16 before the block runs, in the sweep
  // and in every recomputation alike, so a block recomputed from a kept boundary sees exactly the
  // input that the sweep gave it: the statistics do not depend on k, the tier or the ranks.
  auto round_input = [&](Tensor& t) -> absl::Status {
    if (plan.boundary_dtype == DType::kF32) return absl::OkStatus();
    QCAL_ASSIGN_OR_RETURN(Tensor rounded, be.Alloc(plan.boundary_dtype, t.shape()));
    QCAL_RETURN_IF_ERROR(be.Convert(t, rounded));
    return be.Convert(rounded, t);
  };
  auto copy_on_device = [&](const Tensor& t) -> absl::StatusOr<Tensor> {
    QCAL_ASSIGN_OR_RETURN(Tensor out, be.Alloc(DType::kF32, t.shape()));
    QCAL_RETURN_IF_ERROR(be.Copy(t, out));
    return out;
  };

  // ---- Forward sweep, keeping the boundaries (and the last segment's inputs).
  auto t0 = std::chrono::steady_clock::now();
  std::vector<Tensor> carried(n);  // the hidden state, then ∂ℓ/∂hidden, per chunk
  for (int c = 0; c < n; ++c) {
    QCAL_ASSIGN_OR_RETURN(carried[c], model.Embed(chunks.ids[c]));
  }
  for (int b = 0; b < blocks; ++b) {
    QCAL_RETURN_IF_ERROR(walk.Acquire(b));
    for (int c = 0; c < n; ++c) {
      QCAL_RETURN_IF_ERROR(round_input(carried[c]));
      if (b >= last_begin) {
        QCAL_ASSIGN_OR_RETURN(segment[b - last_begin][c], copy_on_device(carried[c]));
      } else if (b % k == 0) {
        QCAL_RETURN_IF_ERROR(store.Put(b, c, carried[c]));
      }
      QCAL_RETURN_IF_ERROR(model.BlockForward(b, carried[c], shapes[c]));
    }
    walk.Done(b);
  }
  QCAL_RETURN_IF_ERROR(be.Synchronize());
  stats.forward_seconds += SecondsSince(t0);

  // ---- The loss head: position t of a sample predicts its token t + 1.
  t0 = std::chrono::steady_clock::now();
  for (int c = 0; c < n; ++c) {
    std::vector<int32_t> targets(chunks.ids[c].size(), -1);
    for (int s = 0; s < chunks.chunk_batch[c]; ++s) {
      for (int t = 0; t + 1 < seq_len; ++t) {
        targets[int64_t{s} * seq_len + t] = chunks.ids[c][int64_t{s} * seq_len + t + 1];
      }
      stats.tokens += seq_len - 1;
    }
    QCAL_ASSIGN_OR_RETURN(HeadGradient head, LossBackward(model, carried[c], targets));
    stats.loss += head.loss;
    carried[c] = std::move(head.d_hidden);
  }
  QCAL_RETURN_IF_ERROR(be.Synchronize());
  stats.head_seconds = SecondsSince(t0);
  stats.backward_seconds += stats.head_seconds;

  // ---- Backward, block by block from the last. The tap sums one chunk's statistics into zeroed
  // partials: sample by sample for H_oac and the Fisher (a sample's Γ couples its tokens), the
  // chunk at once for H_tok (a sum over tokens, like the layer Gram).
  std::array<LinearOac, kNumLinears> partial;
  double tap_seconds = 0;
  const GradTap tap = [&](LinearKind kind, const Tensor& x, const Tensor& dy, const Tensor& x_op,
                          const Tensor& dy_op) -> absl::Status {
    // Timed between synchronizations: the block's own queued work is not the statistics'.
    QCAL_RETURN_IF_ERROR(be.Synchronize());
    const auto t_tap = std::chrono::steady_clock::now();
    LinearOac& p = partial[static_cast<int>(kind)];
    const int64_t d_in = x.dim(1), d_out = dy.dim(1);
    QCAL_ASSIGN_OR_RETURN(p.hessian, be.Alloc(DType::kF32, {d_in, d_in}));
    QCAL_RETURN_IF_ERROR(
        AccumulateOacHessian(be, options.kind, x, dy, seq_len, p.hessian, &x_op, &dy_op));
    if (options.fisher) {
      QCAL_ASSIGN_OR_RETURN(p.fisher, be.Alloc(DType::kF32, {d_out, d_in}));
      QCAL_RETURN_IF_ERROR(AccumulateFisher(be, x, dy, seq_len, p.fisher));
    }
    QCAL_RETURN_IF_ERROR(be.Synchronize());
    tap_seconds += SecondsSince(t_tap);
    return absl::OkStatus();
  };
  const Combine<LinearOac> combine = LinearOacCombine(be);
  const int first = chunks.first_chunk, end_chunk = chunks.first_chunk + n;
  for (int begin = last_begin; begin >= 0; begin -= k) {
    const int end = std::min(begin + k, blocks);
    if (begin != last_begin) {
      t0 = std::chrono::steady_clock::now();
      for (int c = 0; c < n; ++c) {
        QCAL_ASSIGN_OR_RETURN(segment[0][c], store.Take(begin, c));
      }
      for (int b = begin; b + 1 < end; ++b) {
        QCAL_RETURN_IF_ERROR(walk.Acquire(b));
        for (int c = 0; c < n; ++c) {
          QCAL_ASSIGN_OR_RETURN(segment[b + 1 - begin][c], copy_on_device(segment[b - begin][c]));
          QCAL_RETURN_IF_ERROR(model.BlockForward(b, segment[b + 1 - begin][c], shapes[c]));
          QCAL_RETURN_IF_ERROR(round_input(segment[b + 1 - begin][c]));
        }
        walk.Done(b);
      }
      QCAL_RETURN_IF_ERROR(be.Synchronize());
      stats.forward_seconds += SecondsSince(t0);
    }
    for (int b = end - 1; b >= begin; --b) {
      const auto t_block = std::chrono::steady_clock::now();
      const double tap_before = tap_seconds;
      QCAL_RETURN_IF_ERROR(walk.Acquire(b));
      std::vector<TreeAccumulator<LinearOac>> acc;
      for (int l = 0; l < kNumLinears; ++l)
        acc.emplace_back(first, end_chunk, chunks.total_chunks, combine);
      for (int c = 0; c < n; ++c) {
        QCAL_ASSIGN_OR_RETURN(Tensor d_input, BlockBackward(model, b, segment[b - begin][c],
                                                            shapes[c], carried[c], tap));
        segment[b - begin][c] = Tensor();
        carried[c] = std::move(d_input);
        for (int l = 0; l < kNumLinears; ++l) {
          QCAL_RETURN_IF_ERROR(acc[l].Add(std::move(partial[l])));
          partial[l] = LinearOac();
        }
      }
      BlockOacPartials partials;
      for (int l = 0; l < kNumLinears; ++l) {
        QCAL_ASSIGN_OR_RETURN(partials[l], acc[l].Finish());
      }
      QCAL_RETURN_IF_ERROR(be.Synchronize());
      const double block_seconds = SecondsSince(t_block);
      stats.hessian_seconds += tap_seconds - tap_before;
      stats.backward_seconds += block_seconds - (tap_seconds - tap_before);
      const auto t_sink = std::chrono::steady_clock::now();
      QCAL_RETURN_IF_ERROR(sink(b, std::move(partials)));
      QCAL_RETURN_IF_ERROR(be.Synchronize());
      stats.sink_seconds += SecondsSince(t_sink);
      walk.Done(b);
      if (log) {
        log(absl::StrFormat("gradient pass: block %d backward in %.2f s (statistics %.2f s)", b,
                            block_seconds, tap_seconds - tap_before));
      }
    }
  }
  stats.peak_device_bytes = be.PeakMemoryInUse();
  stats.seconds = SecondsSince(t_start);
  if (log) {
    log(absl::StrFormat(
        "gradient pass: done in %.1f s (forward %.1f s, backward %.1f s of which the loss "
        "head %.1f s, statistics %.1f s, handing them over %.1f s), loss %.4f over %d predictions",
        stats.seconds, stats.forward_seconds, stats.backward_seconds, stats.head_seconds,
        stats.hessian_seconds, stats.sink_seconds,
        stats.tokens > 0 ? stats.loss / stats.tokens : 0.0, stats.tokens));
  }
  return stats;
}

}  // namespace qcal::engine
