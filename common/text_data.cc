#include "common/text_data.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/unicode_text.h"
#include "nlohmann/json.hpp"

namespace qcal {

absl::StatusOr<std::vector<std::string>> LoadCorpusRecords(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  QCAL_ASSIGN_OR_RETURN(std::string raw, NormalizeTextFile(bytes, path));
  std::vector<std::string> records;
  const bool jsonl = path.size() >= 6 && path.substr(path.size() - 6) == ".jsonl";
  if (jsonl) {
    size_t pos = 0;
    int line_no = 0;
    while (pos < raw.size()) {
      size_t nl = raw.find('\n', pos);
      if (nl == std::string::npos) nl = raw.size();
      std::string line = raw.substr(pos, nl - pos);
      pos = nl + 1;
      ++line_no;
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
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
      records.push_back(rec["text"].get<std::string>());
      if (std::optional<size_t> bad = FindInvalidUtf8(records.back())) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ":", line_no, ": \"text\" is not valid UTF-8 at its byte offset ", *bad));
      }
    }
  } else {
    records.push_back(std::move(raw));
  }
  bool empty = true;
  for (const std::string& r : records) {
    empty = empty && r.find_first_not_of(" \t\r\n") == std::string::npos;
  }
  if (empty) return absl::InvalidArgumentError(absl::StrCat(path, ": text is empty"));
  return records;
}

absl::StatusOr<std::string> LoadCorpusText(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::vector<std::string> records, LoadCorpusRecords(path));
  return absl::StrJoin(records, "\n\n");
}

absl::StatusOr<std::vector<int>> TokenizeCorpus(const Tokenizer& tokenizer, const std::string& text,
                                                const std::string& source) {
  const std::vector<std::string> special = tokenizer.SpecialTokensIn(text);
  if (!special.empty()) {
    spdlog::warn(
        "{}: the text contains special-token strings ({}); they are encoded as those "
        "special tokens",
        source, absl::StrJoin(special, ", "));
  }
  absl::StatusOr<std::vector<int>> ids = tokenizer.Encode(text);
  if (!ids.ok()) {
    return absl::Status(ids.status().code(), absl::StrCat(source, ": ", ids.status().message()));
  }
  return ids;
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
  if (bos_id < 0) {
    w.seq_len = seq_len - 1;
    for (int64_t i = 0; i < n; ++i) {
      const int* start = tokens.data() + i * seq_len;
      w.inputs.emplace_back(start, start + seq_len - 1);
      w.targets.emplace_back(start + 1, start + seq_len);
    }
    return w;
  }
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
  if (bos_id < 0) {
    if (t < seq_len) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": calibration text is too short: ", t,
                                                     " tokens, one sample needs ", seq_len));
    }
    SplitMix64 rng(seed);
    const uint64_t range = static_cast<uint64_t>(t - seq_len + 1);
    std::vector<std::vector<int>> samples;
    samples.reserve(num_samples);
    for (int i = 0; i < num_samples; ++i) {
      const uint64_t p = rng.Next() % range;
      samples.emplace_back(tokens.begin() + p, tokens.begin() + p + seq_len);
    }
    return samples;
  }
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
