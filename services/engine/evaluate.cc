#include "services/engine/evaluate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {

namespace {

// The hidden states of one batch of windows between blocks: on the device, or parked in pinned
// host memory when the device is short of memory.
struct Batch {
  int64_t first_window = 0;
  SeqShape shape;
  Tensor hidden;
};

}  // namespace

absl::StatusOr<PerplexityResult> EvaluatePerplexity(Model& model, const TokenWindows& windows,
                                                    const ProgressFn& progress) {
  const auto start = std::chrono::steady_clock::now();
  kernels::Backend& be = model.backend();
  const int64_t n = static_cast<int64_t>(windows.inputs.size());
  const int seq_len = windows.seq_len;
  if (n == 0) return absl::InvalidArgumentError("no evaluation windows");
  // Batch windows so that the logits of a batch stay under ~256 MiB. The batches are the same
  // whatever the residency, so each window sees the same ops on the same values.
  const int64_t per_window = int64_t(seq_len) * model.config().vocab_size * 4;
  const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(16, (256ll << 20) / per_window));
  // Device memory to leave free for a batch's forward besides the resident blocks: its logits and
  // attention/MLP temporaries, plus two blocks (the one running and the one being uploaded).
  const ModelConfig& c = model.config();
  const int64_t rows = batch * seq_len;
  const int64_t reserve = 2 * model.BlockBytes() + rows * c.vocab_size * 4 +
                          rows * (4 * c.hidden_size + 3 * c.intermediate_size + 2 * c.q_dim()) * 4 +
                          (256ll << 20);

  // Layer-major: every batch through block b, then block b + 1 (DESIGN section 2, "Memory").
  std::vector<Batch> batches;
  for (int64_t w0 = 0; w0 < n; w0 += batch) {
    const int64_t bsz = std::min(batch, n - w0);
    std::vector<int> ids;
    for (int64_t w = w0; w < w0 + bsz; ++w) {
      ids.insert(ids.end(), windows.inputs[w].begin(), windows.inputs[w].end());
    }
    Batch bt;
    bt.first_window = w0;
    bt.shape = SeqShape{static_cast<int>(bsz), seq_len, 0};
    QCAL_ASSIGN_OR_RETURN(bt.hidden, model.Embed(ids));
    if (be.device() != Device::kHost && be.AvailableMemory() >= 0 &&
        be.AvailableMemory() < reserve) {
      QCAL_ASSIGN_OR_RETURN(Tensor parked, be.AllocHost(DType::kF32, bt.hidden.shape()));
      QCAL_RETURN_IF_ERROR(be.Copy(bt.hidden, parked));
      bt.hidden = std::move(parked);
    }
    batches.push_back(std::move(bt));
  }
  // A parked batch runs on a device copy that is written back.
  auto on_device = [&](Batch& bt, const std::function<absl::Status(Tensor&)>& fn) -> absl::Status {
    if (bt.hidden.device() == be.device()) return fn(bt.hidden);
    QCAL_ASSIGN_OR_RETURN(Tensor d, be.ToDevice(bt.hidden));
    QCAL_RETURN_IF_ERROR(fn(d));
    return be.Copy(d, bt.hidden);
  };
  const int64_t steps = int64_t(model.num_blocks()) * static_cast<int64_t>(batches.size());
  int64_t done = 0;
  for (int b = 0; b < model.num_blocks(); ++b) {
    QCAL_RETURN_IF_ERROR(model.AcquireBlock(b));
    for (Batch& bt : batches) {
      QCAL_RETURN_IF_ERROR(
          on_device(bt, [&](Tensor& h) { return model.BlockForward(b, h, bt.shape); }));
      if (progress) progress(n * ++done / (steps + 1), n);
    }
    model.ReleaseBlock(b);
  }

  double nll_sum = 0;
  for (Batch& bt : batches) {
    const int64_t w0 = bt.first_window, bsz = bt.shape.batch;
    std::vector<int> targets;
    for (int64_t w = w0; w < w0 + bsz; ++w) {
      targets.insert(targets.end(), windows.targets[w].begin(), windows.targets[w].end());
    }
    Tensor nll_host;
    QCAL_RETURN_IF_ERROR(on_device(bt, [&](Tensor& h) -> absl::Status {
      QCAL_ASSIGN_OR_RETURN(Tensor logits, model.Logits(h));
      Tensor target_tensor = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(targets.size())});
      std::memcpy(target_tensor.raw(), targets.data(), targets.size() * sizeof(int));
      QCAL_ASSIGN_OR_RETURN(Tensor nll,
                            be.Alloc(DType::kF32, {static_cast<int64_t>(targets.size())}));
      QCAL_RETURN_IF_ERROR(be.Nll(logits, target_tensor, nll));
      QCAL_ASSIGN_OR_RETURN(nll_host, be.ToHost(nll));
      return absl::OkStatus();
    }));
    bt.hidden = Tensor();
    const float* p = nll_host.data<float>();
    for (size_t i = 0; i < targets.size(); ++i) {
      if (!std::isfinite(p[i])) {
        return absl::DataLossError(absl::StrCat("non-finite loss in window ", w0 + i / seq_len,
                                                " (NaN or Inf weights or activations)"));
      }
      nll_sum += p[i];
    }
  }
  if (progress) progress(n, n);
  PerplexityResult r;
  r.windows = n;
  r.tokens = n * seq_len;
  r.nll = nll_sum / static_cast<double>(r.tokens);
  r.perplexity = std::exp(r.nll);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

absl::StatusOr<Tensor> SequenceLogits(Model& model, const std::vector<int>& ids) {
  if (ids.empty()) return absl::InvalidArgumentError("SequenceLogits: no tokens");
  QCAL_ASSIGN_OR_RETURN(Tensor hidden, model.Embed(ids));
  const SeqShape shape{1, static_cast<int>(ids.size()), 0};
  for (int b = 0; b < model.num_blocks(); ++b) {
    QCAL_RETURN_IF_ERROR(model.AcquireBlock(b));
    QCAL_RETURN_IF_ERROR(model.BlockForward(b, hidden, shape));
    model.ReleaseBlock(b);
  }
  QCAL_ASSIGN_OR_RETURN(Tensor logits, model.Logits(hidden));
  return model.backend().ToHost(logits);
}

absl::StatusOr<std::vector<int>> GenerateGreedy(Model& model, const std::vector<int>& prompt_ids,
                                                const GenerateOptions& options) {
  if (options.max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  kernels::Backend& be = model.backend();
  const ModelConfig& c = model.config();
  const int bos = options.bos_id == GenerateOptions::kFromConfig ? c.bos_token_id : options.bos_id;
  std::vector<int> ids;
  if (bos >= 0) ids.push_back(bos);
  ids.insert(ids.end(), prompt_ids.begin(), prompt_ids.end());
  if (ids.empty()) return absl::InvalidArgumentError("generation needs a BOS token or a prompt");
  const std::vector<int> eos =
      options.eos_ids.empty() ? std::vector<int>{c.eos_token_id} : options.eos_ids;
  const int capacity = static_cast<int>(ids.size()) + options.max_new_tokens;
  QCAL_ASSIGN_OR_RETURN(KvCache cache, model.NewCache(capacity));
  std::vector<int> generated;
  std::vector<int> step = ids;
  int offset = 0;
  while (static_cast<int>(generated.size()) < options.max_new_tokens) {
    QCAL_ASSIGN_OR_RETURN(Tensor hidden, model.Embed(step));
    const SeqShape shape{1, static_cast<int>(step.size()), offset};
    for (int b = 0; b < model.num_blocks(); ++b) {
      QCAL_RETURN_IF_ERROR(model.AcquireBlock(b));
      QCAL_RETURN_IF_ERROR(model.BlockForward(b, hidden, shape, &cache));
      model.ReleaseBlock(b);
    }
    Tensor last = hidden.Rows(hidden.dim(0) - 1, hidden.dim(0));
    QCAL_ASSIGN_OR_RETURN(Tensor logits, model.Logits(last));
    QCAL_ASSIGN_OR_RETURN(Tensor host, be.ToHost(logits));
    const float* l = host.data<float>();
    int best = 0;
    for (int i = 1; i < c.vocab_size; ++i) {
      if (l[i] > l[best]) best = i;
    }
    if (!std::isfinite(l[best])) return absl::DataLossError("non-finite logits during generation");
    offset += static_cast<int>(step.size());
    if ((bos >= 0 && best == bos) || std::find(eos.begin(), eos.end(), best) != eos.end()) break;
    generated.push_back(best);
    step = {best};
  }
  return generated;
}

}  // namespace qcal::engine
