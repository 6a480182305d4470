// Perplexity (DESIGN section 4) and greedy generation on a loaded Model.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/text_data.h"
#include "services/engine/model.h"

namespace qcal::engine {

struct PerplexityResult {
  double perplexity = 0;
  double nll = 0;      // mean negative log-likelihood per predicted token (nats)
  int64_t tokens = 0;  // predicted tokens
  int64_t windows = 0;
  double seconds = 0;
};

// Progress callback: windows done, windows total.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

// Runs every window through the model; the sum of NLL is taken in window order, in double.
absl::StatusOr<PerplexityResult> EvaluatePerplexity(Model& model, const TokenWindows& windows,
                                                    const ProgressFn& progress = nullptr);

// fp32 logits [ids.size(), vocab] on the host of one sequence `ids` (no BOS added), run block by
// block (streaming models acquire and release each block), exactly the ops EvaluatePerplexity runs
// on a batch of one window.
absl::StatusOr<Tensor> SequenceLogits(Model& model, const std::vector<int>& ids);

struct GenerateOptions {
  int max_new_tokens = 64;  // Default: 64.
  // The tokenizer's BOS (DESIGN section 4: tokenizer_config.json decides), prepended to the
  // prompt; -1: the model has none (the prompt must then not be empty). Default: config.json's
  // bos_token_id (kFromConfig).
  static constexpr int kFromConfig = -2;
  int bos_id = kFromConfig;
  // Generation stops at any of these (generation_config.json's list); empty: config.json's
  // eos_token_id. Default: empty.
  std::vector<int> eos_ids;
};

// Greedy decoding from BOS + prompt_ids with a KV cache; stops at BOS or an EOS (not included) or
// after max_new_tokens. Ties in the argmax go to the lowest token id. Returns the generated ids.
// InvalidArgument for an empty start (no BOS and no prompt).
absl::StatusOr<std::vector<int>> GenerateGreedy(Model& model, const std::vector<int>& prompt_ids,
                                                const GenerateOptions& options);

}  // namespace qcal::engine
