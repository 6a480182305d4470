// UTF-8 helpers shared by the text readers and the byte-level BPE tokenizer. utf8proc stays behind
// this interface (unicode_text.cc is the one file that includes it).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace qcal {

// The byte offset of the first byte that does not begin or continue a well-formed UTF-8 sequence
// (overlong forms, surrogates and code points above U+10FFFF are ill-formed), or nullopt when all
// of `s` is valid UTF-8.
std::optional<size_t> FindInvalidUtf8(std::string_view s);

// `s` with every ill-formed subsequence replaced by U+FFFD, as Rust's String::from_utf8_lossy
// does (one U+FFFD per maximal invalid prefix).
std::string Utf8Lossy(std::string_view s);

// A text file's contents as Python's open(path, encoding="utf-8-sig") reads them in text mode
// (DESIGN section 4): a leading UTF-8 BOM is dropped, CRLF and lone CR become LF. Invalid UTF-8 is
// INVALID_ARGUMENT naming `source` and the byte offset in the file.
absl::StatusOr<std::string> NormalizeTextFile(std::string_view raw, const std::string& source);

// Unicode normalization forms (utf8proc). The input must be valid UTF-8.
enum class UnicodeForm { kNfc, kNfd, kNfkc, kNfkd };
absl::StatusOr<std::string> NormalizeUnicode(std::string_view s, UnicodeForm form);

// Whether code point `c` is a word character as Rust's regex `\w` has it (letters, marks,
// decimal and letter numbers, connector punctuation such as '_', ZWNJ and ZWJ), for the
// single_word matching of added tokens.
bool IsWordCodePoint(char32_t c);

// Decodes the code point starting at s[*pos] (valid UTF-8 assumed) and advances *pos past it.
char32_t NextCodePoint(std::string_view s, size_t* pos);
// Appends the UTF-8 encoding of `c`.
void AppendUtf8(char32_t c, std::string* out);

}  // namespace qcal
