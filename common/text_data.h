// Token streams for evaluation and calibration (DESIGN section 4).
//
// Evaluation: the whole text is tokenized (no BOS) and cut into consecutive, non-overlapping
// windows of L tokens, dropping an incomplete tail. Each window's model input is BOS followed by
// its first L-1 tokens, and the model predicts all L tokens.
//
// Calibration: SplitMix64 seeded with `seed`; sample i draws p = next() mod (|T| - L + 2) and is
// BOS followed by T[p .. p+L-2]. Samples are grouped in chunks of kCalibChunk in order.
//
// A model without a BOS (bos_id < 0; Qwen): an evaluation window's input is its first L-1 tokens
// and its targets its last L-1 (TokenWindows::seq_len = L-1); a calibration sample is
// T[p .. p+L-1] with p = next() mod (|T| - L + 1).
//
// Text files are read as Python's open(path, encoding="utf-8-sig") reads them: a leading BOM is
// dropped, CRLF and lone CR become LF, invalid UTF-8 is an error naming the byte offset.
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
  // L, or L-1 for a model without a BOS.
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

// Reads a text file (BOM dropped, line ends made LF); for a `.jsonl` file, the `text` field of
// every record joined with "\n\n". Errors for a missing or empty file, invalid UTF-8 (naming the
// byte offset), and a malformed jsonl line (naming its line number).
absl::StatusOr<std::string> LoadCorpusText(const std::string& path);
// The same file as records: the whole text of a text file, or each `text` field of a .jsonl file
// (a JSON string may hold any character, "\r" included; it must be valid UTF-8).
absl::StatusOr<std::vector<std::string>> LoadCorpusRecords(const std::string& path);

// Token ids of a calibration or evaluation text (no BOS or EOS). Logs a warning naming `source`
// when the text contains a special token's string (it is encoded as that special token, as
// Python tools do).
absl::StatusOr<std::vector<int>> TokenizeCorpus(const Tokenizer& tokenizer, const std::string& text,
                                                const std::string& source);

// Evaluation windows. `max_windows` < 0 keeps all. `bos_id` < 0: a model without a BOS. Error when
// the text has fewer than seq_len tokens. `source` names the text in error messages.
absl::StatusOr<TokenWindows> MakeEvalWindows(const std::vector<int>& tokens, int seq_len,
                                             int max_windows, int bos_id,
                                             const std::string& source);

// Calibration samples (inputs only; each has seq_len tokens, beginning with BOS unless
// `bos_id` < 0).
absl::StatusOr<std::vector<std::vector<int>>> SampleCalibration(const std::vector<int>& tokens,
                                                                int num_samples, int seq_len,
                                                                uint64_t seed, int bos_id,
                                                                const std::string& source);

}  // namespace qcal
