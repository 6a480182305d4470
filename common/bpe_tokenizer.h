// Byte-level BPE from a Hugging Face tokenizers `tokenizer.json` (the Llama 3, Qwen2/2.5/3 and
// Mistral-Nemo files), behind the Tokenizer interface. Only bpe_tokenizer.cc includes PCRE2.
//
// What is read, as HF tokenizers applies it:
//   - added_tokens: matched in the text first, leftmost-longest, with their lstrip, rstrip,
//     single_word and normalized flags; special and non-special alike.
//   - normalizer: null, NFC, NFD, NFKC, NFKD, or a Sequence of those (utf8proc).
//   - pre_tokenizer: Split (Regex with PCRE2 UTF|UCP, or String; every SplitDelimiterBehavior;
//     invert), ByteLevel (add_prefix_space, use_regex with the GPT-2 pattern), or a Sequence.
//   - model: BPE with merges as "a b" strings or ["a", "b"] pairs, ranked by position;
//     ignore_merges; unk_token.
//   - decoder: null, ByteLevel, or a Sequence of ByteLevel.
// post_processor is not read: Encode adds no special tokens.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/tokenizer.h"

namespace qcal {

// Parses `json_text`, the contents of the file `path` (named in errors with the key at fault).
// UNIMPLEMENTED when the file is not byte-level (no ByteLevel pre-tokenizer: a SentencePiece
// conversion, whose tokenizer.model the caller may use instead); INVALID_ARGUMENT for a malformed
// file or an unsupported type. BOS/EOS are left unset (-1, none).
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseByteLevelBpe(const std::string& json_text,
                                                             const std::string& path);

}  // namespace qcal
