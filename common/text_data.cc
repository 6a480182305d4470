#include "common/text_data.h"

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace qcal {

absl::StatusOr<std::string> LoadCorpusText(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string raw, ReadFileToString(path));
  std::string text;
  const bool jsonl = path.size() >= 6 && path.substr(path.size() - 6) == ".jsonl";
  if (jsonl) {
    size_t pos = 0;
    int line_no = 0;
    bool first = true;
    while (pos < raw.size()) {
      size_t nl = raw.find('\n', pos);
      if (nl == std::string::npos) nl = raw.size();
      std::string line = raw.substr(pos, nl - pos);
      pos = nl + 1;
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json rec;
      try {
        rec = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", line_no, ": malformed JSON line: ", e.what()));
      }
      if (!rec.is_object() || !rec.contains("text") || !rec["text"].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", line_no, ": record has no string field \"text\""));
      }
      if (!first) text += "\n\n";
      text += rec["text"].get<std::string>();
      first = false;
    }
  } else {
    text = std::move(raw);
  }
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": text is empty"));
  }
  return text;
}

absl::StatusOr<TokenWindows> MakeEvalWindows(const std::vector<int>& tokens, int seq_len,
                                             int max_windows, int bos_id,
                                             const std::string& source) {
  if (seq_len < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence length must be at least 2, got ", seq_len));
  }
  int64_t n = static_cast<int64_t>(tokens.size()) / seq_len;
  if (n == 0) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": text is too short: ", tokens.size(),
                                                   " tokens, fewer than one window of ", seq_len));
  }
  if (max_windows >= 0 && max_windows < n) n = max_windows;
  TokenWindows w;
  w.seq_len = seq_len;
  for (int64_t i = 0; i < n; ++i) {
    const int* start = tokens.data() + i * seq_len;
    std::vector<int> in;
    in.reserve(seq_len);
    in.push_back(bos_id);
    in.insert(in.end(), start, start + seq_len - 1);
    w.inputs.push_back(std::move(in));
    w.targets.emplace_back(start, start + seq_len);
  }
  return w;
}

absl::StatusOr<std::vector<std::vector<int>>> SampleCalibration(const std::vector<int>& tokens,
                                                                int num_samples, int seq_len,
                                                                uint64_t seed, int bos_id,
                                                                const std::string& source) {
  if (num_samples < 1)
    return absl::InvalidArgumentError("number of calibration samples must be >= 1");
  if (seq_len < 2) return absl::InvalidArgumentError("calibration sequence length must be >= 2");
  const int64_t t = static_cast<int64_t>(tokens.size());
  if (t < seq_len - 1) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": calibration text is too short: ", t,
                                                   " tokens, one sample needs ", seq_len - 1));
  }
  SplitMix64 rng(seed);
  const uint64_t range = static_cast<uint64_t>(t - seq_len + 2);
  std::vector<std::vector<int>> samples;
  samples.reserve(num_samples);
  for (int i = 0; i < num_samples; ++i) {
    const uint64_t p = rng.Next() % range;
    std::vector<int> s;
    s.reserve(seq_len);
    s.push_back(bos_id);
    s.insert(s.end(), tokens.begin() + p, tokens.begin() + p + seq_len - 1);
    samples.push_back(std::move(s));
  }
  return samples;
}

}  // namespace qcal
