// Fuzzes the byte-level BPE tokenizer.json reader (common/bpe_tokenizer.h): the model, merges,
// added tokens, normalizers, pre-tokenizers (PCRE2 regexes from the file) and decoder; then
// encodes a text with it and decodes the ids back.
//
// Input: tokenizer.json, optionally followed by kFileSeparator and a text to encode (at most 1 KiB
// of it is used; a fixed sentence when absent).
#include <cstdint>
#include <string>
#include <vector>

#include "common/bpe_tokenizer.h"
#include "common/status.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> files = qcal::fuzz::SplitFiles(data, size, 2);
  auto tok = qcal::ParseByteLevelBpe(files[0], "tokenizer.json");
  if (!tok.ok()) return 0;
  std::string text =
      files[1].empty() ? "the quick brown fox <s> jumps\nover 12 lazy dogs." : files[1];
  if (text.size() > 1024) text.resize(1024);
  const int vocab = (*tok)->vocab_size();
  QCAL_CHECK(vocab >= 0);
  absl::StatusOr<std::vector<int>> ids = (*tok)->Encode(text);
  if (ids.ok()) {
    for (int id : *ids) QCAL_CHECK(id >= 0 && id < vocab);
    (void)(*tok)->Decode(*ids);
  }
  (void)(*tok)->SpecialTokensIn(text);
  (void)(*tok)->TokenId("the");
  // Ids outside the vocabulary are an error, not a read past the table.
  QCAL_CHECK(!(*tok)->Decode({vocab}).ok());
  QCAL_CHECK(!(*tok)->Decode({-1}).ok());
  return 0;
}
