// The tokenizer of a checkpoint: byte-level BPE from Hugging Face `tokenizer.json` (Llama 3,
// Qwen2/2.5/3, Mistral-Nemo) or SentencePiece `tokenizer.model` (Llama 1/2, Mistral 7B). The
// PCRE2, utf8proc and SentencePiece headers stay behind this interface.
//
// Which file (DESIGN section 4): `tokenizer.json` when the directory has one, as transformers' fast
// tokenizers do, unless it is a SentencePiece conversion (no ByteLevel pre-tokenizer, e.g. the
// Metaspace / byte_fallback files that Llama 2 ships beside its tokenizer.model); then
// `tokenizer.model`.
//
// BOS and EOS (DESIGN section 4):
//   - BOS is `bos_token` of tokenizer_config.json (a string or {"content": ...}) when that file
//     exists; null or absent there, or `add_bos_token: false`, means the model has no BOS
//     (bos_id() == -1; Qwen). Without tokenizer_config.json: config.json's `bos_token_id`, else
//     the tokenizer's own (SentencePiece's bos id; none for BPE).
//   - EOS ids are generation_config.json's `eos_token_id` (an integer or a list), else
//     tokenizer_config.json's `eos_token`, else config.json's `eos_token_id` (integer or list),
//     else the tokenizer's own.
// Encode never adds BOS or EOS.
//
// Thread safety: all methods are const and may be called concurrently.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qcal {

class Tokenizer {
 public:
  // Loads the tokenizer of model directory `path` (see above), or the file `path` itself when it
  // is a `tokenizer.json` or `*.model` file (then the BOS/EOS files beside it are read too).
  // Errors name the file and key at fault: malformed JSON, an unknown model, pre-tokenizer,
  // normalizer or decoder type, a merge naming an unknown token.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  virtual ~Tokenizer() = default;

  // Token ids of `text` (UTF-8; INVALID_ARGUMENT naming the byte offset otherwise), without BOS
  // or EOS. Added tokens (special or not) written in the text are matched as HF tokenizers does.
  virtual absl::StatusOr<std::vector<int>> Encode(const std::string& text) const = 0;
  // Text of `ids`; special tokens are written as their strings. Ill-formed UTF-8 that a partial
  // byte sequence leaves is replaced by U+FFFD.
  virtual absl::StatusOr<std::string> Decode(const std::vector<int>& ids) const = 0;
  // Number of ids (the largest id + 1, added tokens included).
  virtual int vocab_size() const = 0;
  // Id of a token string (a vocabulary entry or an added token), or -1.
  virtual int TokenId(const std::string& token) const = 0;
  // The special tokens' strings that occur in `text`, each once, in order of first occurrence
  // (empty for SentencePiece, which does not match control tokens in text).
  virtual std::vector<std::string> SpecialTokensIn(const std::string& text) const = 0;
  // "tokenizer.json (byte-level BPE)" or "tokenizer.model (SentencePiece)".
  virtual std::string kind() const = 0;

  // -1 when the model has no BOS.
  int bos_id() const { return bos_id_; }
  // The first EOS id, or -1 when there is none.
  int eos_id() const { return eos_ids_.empty() ? -1 : eos_ids_[0]; }
  const std::vector<int>& eos_ids() const { return eos_ids_; }

 protected:
  int bos_id_ = -1;
  std::vector<int> eos_ids_;
};

}  // namespace qcal
