// Token streams for evaluation and calibration (DESIGN section 4).
//
// Evaluation: the whole text is tokenized (no BOS) and cut into consecutive, non-overlapping
// windows of L tokens, dropping an incomplete tail. Each window's model input is BOS followed by
// its first L-1 tokens, and the model predicts all L tokens.
//
// Calibration: SplitMix64 seeded with `seed`; sample i draws p = next() mod (|T| - L + 2) and is
// BOS followed by T[p .. p+L-2]. Samples are grouped in chunks of kCalibChunk in order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer.h"

namespace qcal {

// Samples per chunk: all per-sample computation runs on chunks of this size (DESIGN section 2).
inline constexpr int kCalibChunk = 8;

struct TokenWindows {
  int seq_len = 0;
  // inputs[w] and targets[w] have seq_len tokens each.
  std::vector<std::vector<int>> inputs;
  std::vector<std::vector<int>> targets;
};

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

 private:
  uint64_t state_;
};

// Reads a text file; for a `.jsonl` file, the `text` field of every record joined with "\n\n".
// Errors for a missing or empty file, and for a malformed jsonl line (naming its line number).
absl::StatusOr<std::string> LoadCorpusText(const std::string& path);

// Evaluation windows. `max_windows` < 0 keeps all. Error when the text has fewer than seq_len
// tokens. `source` names the text in error messages.
absl::StatusOr<TokenWindows> MakeEvalWindows(const std::vector<int>& tokens, int seq_len,
                                             int max_windows, int bos_id,
                                             const std::string& source);

// Calibration samples (inputs only; each has seq_len tokens beginning with BOS).
absl::StatusOr<std::vector<std::vector<int>>> SampleCalibration(const std::vector<int>& tokens,
                                                                int num_samples, int seq_len,
                                                                uint64_t seed, int bos_id,
                                                                const std::string& source);

}  // namespace qcal
