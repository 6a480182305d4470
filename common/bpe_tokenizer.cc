#include "common/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <queue>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "common/unicode_text.h"
#include "nlohmann/json.hpp"

namespace qcal {
namespace {

using Json = nlohmann::json;

// Token ids (vocabulary and added tokens) are below this: 64 times the largest vocabularies in use
// (256k). The id table is dense (an entry per id up to the largest), so a file naming one id near
// 2^30 would otherwise allocate 32 GiB.
constexpr int64_t kMaxTokenIds = int64_t{1} << 24;

// The pattern ByteLevel's use_regex applies (GPT-2's).
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Words longer than this are not cached (long whitespace or digit runs).
constexpr size_t kMaxCachedWord = 256;
constexpr size_t kMaxCacheEntries = 1 << 17;

struct Pcre2CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct Pcre2MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};

// Unicode White_Space (Rust's char::is_whitespace, used by lstrip/rstrip).
bool IsWhiteSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::shared_ptr<pcre2_code> regex;  // Split, or ByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
};

struct AddedToken {
  std::string content;  // normalized when `normalized` is set
  int id = 0;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool normalized = false;
};

// A piece of the input: text still to tokenize, or an added token already matched.
struct Segment {
  std::string text;
  int added_id = -1;
};

class JsonReader {
 public:
  explicit JsonReader(std::string path) : path_(std::move(path)) {}
  absl::Status Error(const std::string& key, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": key \"", key, "\": ", what));
  }
  absl::StatusOr<bool> Bool(const Json& obj, const std::string& name, const std::string& key,
                            bool def) const {
    if (!obj.contains(name) || obj[name].is_null()) return def;
    if (!obj[name].is_boolean()) return Error(key + "." + name, "must be true or false");
    return obj[name].get<bool>();
  }
  absl::StatusOr<std::string> Type(const Json& obj, const std::string& key) const {
    if (!obj.is_object()) return Error(key, "must be an object");
    if (!obj.contains("type") || !obj["type"].is_string()) {
      return Error(key + ".type", "missing or not a string");
    }
    return obj["type"].get<std::string>();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

absl::StatusOr<std::shared_ptr<pcre2_code>> CompileRegex(const std::string& pattern, bool literal,
                                                         const JsonReader& r,
                                                         const std::string& key) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  uint32_t options = PCRE2_UTF | PCRE2_UCP;
  if (literal) options |= PCRE2_LITERAL;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options, &err, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    return r.Error(key, absl::StrCat("regex does not compile at offset ", offset, ": ",
                                     reinterpret_cast<const char*>(msg)));
  }
  // JIT is an optimization; the interpreter gives the same matches where JIT is unavailable.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return std::shared_ptr<pcre2_code>(code, Pcre2CodeDeleter());
}

// [start, end) of every match of `re` in `s` (valid UTF-8), scanning as HF's find_iter does (an
// empty match advances by one character).
absl::StatusOr<std::vector<std::pair<size_t, size_t>>> FindAll(pcre2_code* re, std::string_view s) {
  std::vector<std::pair<size_t, size_t>> out;
  std::unique_ptr<pcre2_match_data, Pcre2MatchDataDeleter> md(
      pcre2_match_data_create_from_pattern(re, nullptr));
  size_t pos = 0;
  while (pos <= s.size()) {
    const auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    int rc = pcre2_match(re, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md.get(), nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      // The interpreter keeps its backtracking state on the heap.
      rc = pcre2_match(re, subject, s.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md.get(),
                       nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof(msg));
      return absl::ResourceExhaustedError(
          absl::StrCat("pre-tokenizer regex failed at byte ", pos, " of a ", s.size(),
                       "-byte piece: ", reinterpret_cast<const char*>(msg)));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    const size_t start = ov[0], end = ov[1];
    if (end > start) {
      out.emplace_back(start, end);
      pos = end;
    } else {
      if (start >= s.size()) break;
      size_t next = start;
      NextCodePoint(s, &next);
      pos = next;
    }
  }
  return out;
}

// HF's NormalizedString::split with a SplitDelimiterBehavior. Empty pieces are dropped.
absl::StatusOr<std::vector<std::string>> SplitPiece(const std::string& s,
                                                    const PreTokenizerStep& step) {
  struct Part {
    size_t start, end;
    bool match;
  };
  std::vector<Part> parts;
  size_t prev = 0;
  QCAL_ASSIGN_OR_RETURN(auto matches, FindAll(step.regex.get(), s));
  for (const auto& [start, end] : matches) {
    if (start > prev) parts.push_back({prev, start, step.invert});
    parts.push_back({start, end, !step.invert});
    prev = end;
  }
  if (prev < s.size()) parts.push_back({prev, s.size(), step.invert});

  std::vector<std::pair<size_t, size_t>> pieces;
  switch (step.behavior) {
    case SplitBehavior::kRemoved:
      for (const Part& p : parts) {
        if (!p.match) pieces.emplace_back(p.start, p.end);
      }
      break;
    case SplitBehavior::kIsolated:
      for (const Part& p : parts) pieces.emplace_back(p.start, p.end);
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Part& p : parts) {
        if (p.match && !pieces.empty() && !previous_match) {
          pieces.back().second = p.end;
        } else {
          pieces.emplace_back(p.start, p.end);
        }
        previous_match = p.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (const Part& p : parts) {
        if (!p.match && !pieces.empty() && previous_match) {
          pieces.back().second = p.end;
        } else {
          pieces.emplace_back(p.start, p.end);
        }
        previous_match = p.match;
      }
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const Part& p : parts) {
        if (p.match && previous_match && !pieces.empty()) {
          pieces.back().second = p.end;
        } else {
          pieces.emplace_back(p.start, p.end);
        }
        previous_match = p.match;
      }
      break;
    }
  }
  std::vector<std::string> out;
  out.reserve(pieces.size());
  for (const auto& [a, b] : pieces) {
    if (b > a) out.push_back(s.substr(a, b - a));
  }
  return out;
}

class ByteLevelBpeTokenizer final : public Tokenizer {
 public:
  absl::Status Parse(const Json& j, const JsonReader& r);

  absl::StatusOr<std::vector<int>> Encode(const std::string& text) const override;
  absl::StatusOr<std::string> Decode(const std::vector<int>& ids) const override;
  int vocab_size() const override { return static_cast<int>(id_to_token_.size()); }
  int TokenId(const std::string& token) const override {
    for (const AddedToken& t : added_) {
      if (t.content == token) return t.id;
    }
    auto it = vocab_.find(token);
    return it == vocab_.end() ? -1 : it->second;
  }
  std::vector<std::string> SpecialTokensIn(const std::string& text) const override;
  std::string kind() const override { return "tokenizer.json (byte-level BPE)"; }

 private:
  absl::Status ParseNormalizer(const Json& n, const JsonReader& r, const std::string& key);
  absl::Status ParsePreTokenizer(const Json& p, const JsonReader& r, const std::string& key);
  absl::Status ParseDecoder(const Json& d, const JsonReader& r, const std::string& key);
  absl::Status ParseModel(const Json& m, const JsonReader& r);
  absl::Status ParseAddedTokens(const Json& a, const JsonReader& r);

  // Splits `segments` further on the added tokens with normalized == `normalized`.
  std::vector<Segment> SplitOnAddedTokens(std::vector<Segment> segments, bool normalized) const;
  absl::StatusOr<std::string> Normalize(const std::string& s) const;
  absl::StatusOr<std::vector<std::string>> PreTokenize(const std::string& s) const;
  // BPE of one byte-mapped word, appended to *ids.
  absl::Status EncodeWord(const std::string& word, std::vector<int>* ids) const;

  std::vector<UnicodeForm> normalizers_;
  std::vector<PreTokenizerStep> pre_tokenizer_;
  bool byte_level_decoder_ = false;

  absl::flat_hash_map<std::string, int> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> is_added_;
  // (left id << 32 | right id) -> (rank, merged id).
  absl::flat_hash_map<uint64_t, std::pair<int, int>> merges_;
  bool ignore_merges_ = false;
  int unk_id_ = -1;
  std::vector<AddedToken> added_;
  bool has_normalized_added_ = false;

  std::string byte_to_char_[256];  // UTF-8 of each byte's printable stand-in
  absl::flat_hash_map<char32_t, uint8_t> char_to_byte_;

  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

absl::Status ByteLevelBpeTokenizer::ParseNormalizer(const Json& n, const JsonReader& r,
                                                    const std::string& key) {
  if (n.is_null()) return absl::OkStatus();
  QCAL_ASSIGN_OR_RETURN(std::string type, r.Type(n, key));
  if (type == "Sequence") {
    if (!n.contains("normalizers") || !n["normalizers"].is_array()) {
      return r.Error(key + ".normalizers", "missing or not an array");
    }
    for (size_t i = 0; i < n["normalizers"].size(); ++i) {
      QCAL_RETURN_IF_ERROR(
          ParseNormalizer(n["normalizers"][i], r, absl::StrCat(key, ".normalizers[", i, "]")));
    }
    return absl::OkStatus();
  }
  if (type == "NFC") {
    normalizers_.push_back(UnicodeForm::kNfc);
  } else if (type == "NFD") {
    normalizers_.push_back(UnicodeForm::kNfd);
  } else if (type == "NFKC") {
    normalizers_.push_back(UnicodeForm::kNfkc);
  } else if (type == "NFKD") {
    normalizers_.push_back(UnicodeForm::kNfkd);
  } else {
    return r.Error(key + ".type", absl::StrCat("unsupported normalizer type \"", type,
                                               "\" (supported: NFC, NFD, NFKC, NFKD, Sequence)"));
  }
  return absl::OkStatus();
}

absl::Status ByteLevelBpeTokenizer::ParsePreTokenizer(const Json& p, const JsonReader& r,
                                                      const std::string& key) {
  QCAL_ASSIGN_OR_RETURN(std::string type, r.Type(p, key));
  if (type == "Sequence") {
    if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array()) {
      return r.Error(key + ".pretokenizers", "missing or not an array");
    }
    for (size_t i = 0; i < p["pretokenizers"].size(); ++i) {
      QCAL_RETURN_IF_ERROR(ParsePreTokenizer(p["pretokenizers"][i], r,
                                             absl::StrCat(key, ".pretokenizers[", i, "]")));
    }
    return absl::OkStatus();
  }
  PreTokenizerStep step;
  if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    QCAL_ASSIGN_OR_RETURN(step.add_prefix_space, r.Bool(p, "add_prefix_space", key, true));
    QCAL_ASSIGN_OR_RETURN(bool use_regex, r.Bool(p, "use_regex", key, true));
    if (use_regex) {
      QCAL_ASSIGN_OR_RETURN(step.regex, CompileRegex(kGpt2Pattern, false, r, key));
    }
  } else if (type == "Split") {
    const std::string pkey = key + ".pattern";
    if (!p.contains("pattern") || !p["pattern"].is_object()) {
      return r.Error(pkey, "missing or not an object");
    }
    const Json& pat = p["pattern"];
    if (pat.contains("Regex") && pat["Regex"].is_string()) {
      QCAL_ASSIGN_OR_RETURN(step.regex,
                            CompileRegex(pat["Regex"].get<std::string>(), false, r, pkey));
    } else if (pat.contains("String") && pat["String"].is_string()) {
      QCAL_ASSIGN_OR_RETURN(step.regex,
                            CompileRegex(pat["String"].get<std::string>(), true, r, pkey));
    } else {
      return r.Error(pkey, "needs a string \"Regex\" or \"String\"");
    }
    const std::string b =
        p.contains("behavior") && p["behavior"].is_string() ? p["behavior"].get<std::string>() : "";
    if (b == "Removed") {
      step.behavior = SplitBehavior::kRemoved;
    } else if (b == "Isolated") {
      step.behavior = SplitBehavior::kIsolated;
    } else if (b == "MergedWithPrevious") {
      step.behavior = SplitBehavior::kMergedWithPrevious;
    } else if (b == "MergedWithNext") {
      step.behavior = SplitBehavior::kMergedWithNext;
    } else if (b == "Contiguous") {
      step.behavior = SplitBehavior::kContiguous;
    } else {
      return r.Error(key + ".behavior", absl::StrCat("unknown split behavior \"", b, "\""));
    }
    QCAL_ASSIGN_OR_RETURN(step.invert, r.Bool(p, "invert", key, false));
  } else {
    return r.Error(key + ".type", absl::StrCat("unsupported pre-tokenizer type \"", type,
                                               "\" (supported: ByteLevel, Split, Sequence)"));
  }
  pre_tokenizer_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status ByteLevelBpeTokenizer::ParseDecoder(const Json& d, const JsonReader& r,
                                                 const std::string& key) {
  if (d.is_null()) return absl::OkStatus();
  QCAL_ASSIGN_OR_RETURN(std::string type, r.Type(d, key));
  if (type == "Sequence") {
    if (!d.contains("decoders") || !d["decoders"].is_array()) {
      return r.Error(key + ".decoders", "missing or not an array");
    }
    for (size_t i = 0; i < d["decoders"].size(); ++i) {
      QCAL_RETURN_IF_ERROR(
          ParseDecoder(d["decoders"][i], r, absl::StrCat(key, ".decoders[", i, "]")));
    }
    return absl::OkStatus();
  }
  if (type != "ByteLevel") {
    return r.Error(key + ".type", absl::StrCat("unsupported decoder type \"", type,
                                               "\" (supported: ByteLevel, Sequence)"));
  }
  byte_level_decoder_ = true;
  return absl::OkStatus();
}

absl::Status ByteLevelBpeTokenizer::ParseModel(const Json& m, const JsonReader& r) {
  if (!m.is_object()) return r.Error("model", "missing or not an object");
  // Files written by old versions of tokenizers leave out BPE's "type".
  const std::string type = m.contains("type") && m["type"].is_string()
                               ? m["type"].get<std::string>()
                               : (m.contains("merges") ? "BPE" : "");
  if (type != "BPE") {
    return r.Error("model.type",
                   absl::StrCat("unsupported model type \"", type, "\" (supported: BPE)"));
  }
  if (m.contains("dropout") && !m["dropout"].is_null() &&
      !(m["dropout"].is_number() && m["dropout"].get<double>() == 0.0)) {
    return r.Error("model.dropout", "BPE dropout is not supported");
  }
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (m.contains(k) && !m[k].is_null() &&
        !(m[k].is_string() && m[k].get<std::string>().empty())) {
      return r.Error(absl::StrCat("model.", k), "is not supported by byte-level BPE");
    }
  }
  QCAL_ASSIGN_OR_RETURN(bool byte_fallback, r.Bool(m, "byte_fallback", "model", false));
  if (byte_fallback) return r.Error("model.byte_fallback", "is not supported by byte-level BPE");
  QCAL_ASSIGN_OR_RETURN(ignore_merges_, r.Bool(m, "ignore_merges", "model", false));

  if (!m.contains("vocab") || !m["vocab"].is_object()) {
    return r.Error("model.vocab", "missing or not an object");
  }
  int max_id = -1;
  vocab_.reserve(m["vocab"].size());
  for (const auto& [token, id] : m["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= kMaxTokenIds) {
      return r.Error(absl::StrCat("model.vocab[\"", token, "\"]"),
                     absl::StrCat("must be an integer id in [0, ", kMaxTokenIds, ")"));
    }
    vocab_[token] = id.get<int>();
    max_id = std::max(max_id, id.get<int>());
  }
  id_to_token_.assign(max_id + 1, "");
  is_added_.assign(max_id + 1, false);
  for (const auto& [token, id] : vocab_) id_to_token_[id] = token;

  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = vocab_.find(m["unk_token"].get<std::string>());
    if (it == vocab_.end()) return r.Error("model.unk_token", "is not in model.vocab");
    unk_id_ = it->second;
  }

  if (!m.contains("merges") || !m["merges"].is_array()) {
    return r.Error("model.merges", "missing or not an array");
  }
  const Json& merges = m["merges"];
  merges_.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string key = absl::StrCat("model.merges[", i, "]");
    std::string a, b;
    if (merges[i].is_string()) {
      const std::string s = merges[i].get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return r.Error(key, absl::StrCat("\"", s, "\" is not two tokens separated by a space"));
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (merges[i].is_array() && merges[i].size() == 2 && merges[i][0].is_string() &&
               merges[i][1].is_string()) {
      a = merges[i][0].get<std::string>();
      b = merges[i][1].get<std::string>();
    } else {
      return r.Error(key, "must be a string \"a b\" or a pair [\"a\", \"b\"]");
    }
    auto ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(a + b);
    for (const auto& [it, tok] : {std::pair{ia, a}, std::pair{ib, b}, std::pair{im, a + b}}) {
      if (it == vocab_.end()) {
        return r.Error(key, absl::StrCat("token \"", tok, "\" is not in model.vocab"));
      }
    }
    const uint64_t pair =
        (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
    // A repeated pair takes its last rank, as HF's map built from the list does.
    merges_.insert_or_assign(pair, std::pair<int, int>(static_cast<int>(i), im->second));
  }
  return absl::OkStatus();
}

absl::Status ByteLevelBpeTokenizer::ParseAddedTokens(const Json& a, const JsonReader& r) {
  if (a.is_null()) return absl::OkStatus();
  if (!a.is_array()) return r.Error("added_tokens", "must be an array");
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string key = absl::StrCat("added_tokens[", i, "]");
    const Json& t = a[i];
    if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
        t["id"].get<int64_t>() < 0 || t["id"].get<int64_t>() >= kMaxTokenIds ||
        !t.contains("content") || !t["content"].is_string() ||
        t["content"].get<std::string>().empty()) {
      return r.Error(key, absl::StrCat("needs an integer \"id\" in [0, ", kMaxTokenIds,
                                       ") and a non-empty string \"content\""));
    }
    AddedToken tok;
    tok.id = t["id"].get<int>();
    tok.content = t["content"].get<std::string>();
    if (FindInvalidUtf8(tok.content)) return r.Error(key + ".content", "is not valid UTF-8");
    QCAL_ASSIGN_OR_RETURN(tok.special, r.Bool(t, "special", key, false));
    QCAL_ASSIGN_OR_RETURN(tok.lstrip, r.Bool(t, "lstrip", key, false));
    QCAL_ASSIGN_OR_RETURN(tok.rstrip, r.Bool(t, "rstrip", key, false));
    QCAL_ASSIGN_OR_RETURN(tok.single_word, r.Bool(t, "single_word", key, false));
    // HF's default: special tokens are not normalized, others are.
    QCAL_ASSIGN_OR_RETURN(tok.normalized, r.Bool(t, "normalized", key, !tok.special));
    if (tok.normalized) {
      QCAL_ASSIGN_OR_RETURN(tok.content, Normalize(tok.content));
      has_normalized_added_ = true;
    }
    if (tok.id >= static_cast<int>(id_to_token_.size())) {
      id_to_token_.resize(tok.id + 1);
      is_added_.resize(tok.id + 1, false);
    }
    id_to_token_[tok.id] = tok.content;
    is_added_[tok.id] = true;
    added_.push_back(std::move(tok));
  }
  return absl::OkStatus();
}

absl::Status ByteLevelBpeTokenizer::Parse(const Json& j, const JsonReader& r) {
  // GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves, the others map to
  // U+0100 onward in byte order.
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    const char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
    AppendUtf8(c, &byte_to_char_[b]);
    char_to_byte_[c] = static_cast<uint8_t>(b);
  }
  QCAL_RETURN_IF_ERROR(ParseNormalizer(j.value("normalizer", Json()), r, "normalizer"));
  QCAL_RETURN_IF_ERROR(ParsePreTokenizer(j["pre_tokenizer"], r, "pre_tokenizer"));
  QCAL_RETURN_IF_ERROR(ParseDecoder(j.value("decoder", Json()), r, "decoder"));
  QCAL_RETURN_IF_ERROR(ParseModel(j.value("model", Json()), r));
  QCAL_RETURN_IF_ERROR(ParseAddedTokens(j.value("added_tokens", Json()), r));
  return absl::OkStatus();
}

absl::StatusOr<std::string> ByteLevelBpeTokenizer::Normalize(const std::string& s) const {
  std::string out = s;
  for (UnicodeForm f : normalizers_) {
    QCAL_ASSIGN_OR_RETURN(out, NormalizeUnicode(out, f));
  }
  return out;
}

std::vector<Segment> ByteLevelBpeTokenizer::SplitOnAddedTokens(std::vector<Segment> segments,
                                                               bool normalized) const {
  std::vector<const AddedToken*> tokens;
  for (const AddedToken& t : added_) {
    if (t.normalized == normalized) tokens.push_back(&t);
  }
  if (tokens.empty()) return segments;
  // Leftmost-longest, as HF's Aho-Corasick matcher: candidates by first byte, longest first.
  std::vector<std::vector<const AddedToken*>> by_first(256);
  for (const AddedToken* t : tokens)
    by_first[static_cast<unsigned char>(t->content[0])].push_back(t);
  for (auto& v : by_first) {
    std::stable_sort(v.begin(), v.end(), [](const AddedToken* a, const AddedToken* b) {
      return a->content.size() > b->content.size();
    });
  }
  std::vector<Segment> out;
  for (Segment& seg : segments) {
    if (seg.added_id >= 0) {
      out.push_back(std::move(seg));
      continue;
    }
    const std::string& s = seg.text;
    size_t emitted = 0;  // s[emitted..] is not yet in `out`
    size_t i = 0;
    while (i < s.size()) {
      const AddedToken* hit = nullptr;
      for (const AddedToken* t : by_first[static_cast<unsigned char>(s[i])]) {
        if (s.compare(i, t->content.size(), t->content) == 0) {
          hit = t;
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      size_t start = i, stop = i + hit->content.size();
      if (hit->single_word) {
        bool word_before = false, word_after = false;
        if (start > 0) {
          size_t p = start - 1;
          while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
          size_t q = p;
          word_before = IsWordCodePoint(NextCodePoint(s, &q));
        }
        if (stop < s.size()) {
          size_t q = stop;
          word_after = IsWordCodePoint(NextCodePoint(s, &q));
        }
        if (word_before || word_after) {
          i = stop;
          continue;
        }
      }
      if (hit->lstrip) {
        while (start > emitted) {
          size_t p = start - 1;
          while (p > emitted && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
          size_t q = p;
          if (!IsWhiteSpace(NextCodePoint(s, &q))) break;
          start = p;
        }
      }
      if (hit->rstrip) {
        while (stop < s.size()) {
          size_t q = stop;
          if (!IsWhiteSpace(NextCodePoint(s, &q))) break;
          stop = q;
        }
      }
      if (start > emitted) out.push_back({s.substr(emitted, start - emitted), -1});
      out.push_back({"", hit->id});
      emitted = stop;
      i = stop;
    }
    if (emitted < s.size()) out.push_back({s.substr(emitted), -1});
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> ByteLevelBpeTokenizer::PreTokenize(
    const std::string& s) const {
  std::vector<std::string> pieces = {s};
  for (const PreTokenizerStep& step : pre_tokenizer_) {
    std::vector<std::string> next;
    for (std::string& p : pieces) {
      if (step.kind == PreTokenizerStep::Kind::kByteLevel) {
        if (step.add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
        if (!step.regex) {
          next.push_back(std::move(p));
          continue;
        }
      }
      QCAL_ASSIGN_OR_RETURN(std::vector<std::string> split, SplitPiece(p, step));
      for (std::string& q : split) next.push_back(std::move(q));
    }
    pieces = std::move(next);
  }
  return pieces;
}

absl::Status ByteLevelBpeTokenizer::EncodeWord(const std::string& raw,
                                               std::vector<int>* ids) const {
  std::string word;
  word.reserve(raw.size() * 2);
  for (char c : raw) word += byte_to_char_[static_cast<unsigned char>(c)];
  if (ignore_merges_) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return absl::OkStatus();
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWord;
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  // Symbols of the word as a linked list; a heap of candidate merges ordered by (rank, position),
  // as HF's BPE::merge_word.
  struct Symbol {
    int id;
    int prev, next;
  };
  std::vector<Symbol> sym;
  for (size_t pos = 0; pos < word.size();) {
    const size_t start = pos;
    NextCodePoint(word, &pos);
    auto it = vocab_.find(absl::string_view(word).substr(start, pos - start));
    int id = it != vocab_.end() ? it->second : unk_id_;
    if (id < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("byte-level BPE: character \"", word.substr(start, pos - start),
                       "\" is not in the vocabulary and the model has no unk_token"));
    }
    const int n = static_cast<int>(sym.size());
    sym.push_back({id, n - 1, -1});
    if (n > 0) sym[n - 1].next = n;
  }
  struct Cand {
    int rank, pos, left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int pos) {
    const int nx = sym[pos].next;
    if (nx < 0) return;
    const uint64_t key =
        (static_cast<uint64_t>(sym[pos].id) << 32) | static_cast<uint32_t>(sym[nx].id);
    auto it = merges_.find(key);
    if (it != merges_.end()) heap.push({it->second.first, pos, sym[pos].id, sym[nx].id});
  };
  for (int p = 0; p + 1 < static_cast<int>(sym.size()); ++p) push(p);
  std::vector<bool> dead(sym.size(), false);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    if (dead[c.pos] || sym[c.pos].id != c.left) continue;
    const int nx = sym[c.pos].next;
    if (nx < 0 || sym[nx].id != c.right) continue;
    const uint64_t key = (static_cast<uint64_t>(c.left) << 32) | static_cast<uint32_t>(c.right);
    sym[c.pos].id = merges_.find(key)->second.second;
    sym[c.pos].next = sym[nx].next;
    if (sym[nx].next >= 0) sym[sym[nx].next].prev = c.pos;
    dead[nx] = true;
    if (sym[c.pos].prev >= 0) push(sym[c.pos].prev);
    push(c.pos);
  }
  std::vector<int> out;
  for (int p = sym.empty() ? -1 : 0; p >= 0; p = sym[p].next) out.push_back(sym[p].id);
  ids->insert(ids->end(), out.begin(), out.end());
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();
    cache_.emplace(word, std::move(out));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int>> ByteLevelBpeTokenizer::Encode(const std::string& text) const {
  if (std::optional<size_t> bad = FindInvalidUtf8(text)) {
    return absl::InvalidArgumentError(
        absl::StrCat("text to tokenize is not valid UTF-8 at byte offset ", *bad));
  }
  std::vector<Segment> segments = SplitOnAddedTokens({{text, -1}}, /*normalized=*/false);
  for (Segment& s : segments) {
    if (s.added_id < 0) {
      QCAL_ASSIGN_OR_RETURN(s.text, Normalize(s.text));
    }
  }
  if (has_normalized_added_) segments = SplitOnAddedTokens(std::move(segments), true);
  std::vector<int> ids;
  ids.reserve(text.size() / 3);
  for (const Segment& s : segments) {
    if (s.added_id >= 0) {
      ids.push_back(s.added_id);
      continue;
    }
    QCAL_ASSIGN_OR_RETURN(std::vector<std::string> words, PreTokenize(s.text));
    for (const std::string& word : words) QCAL_RETURN_IF_ERROR(EncodeWord(word, &ids));
  }
  return ids;
}

absl::StatusOr<std::string> ByteLevelBpeTokenizer::Decode(const std::vector<int>& ids) const {
  std::string bytes;
  for (int id : ids) {
    if (id < 0 || id >= vocab_size() || (id_to_token_[id].empty() && !is_added_[id])) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the vocabulary"));
    }
    const std::string& tok = id_to_token_[id];
    if (!byte_level_decoder_) {
      bytes += tok;
      continue;
    }
    // HF's ByteLevel decoder: a token whose characters all stand for bytes becomes those bytes;
    // any other token (an added token such as "<think>\n") is kept as written.
    std::string mapped;
    bool all = true;
    for (size_t p = 0; p < tok.size() && all;) {
      auto it = char_to_byte_.find(NextCodePoint(tok, &p));
      if (it == char_to_byte_.end()) {
        all = false;
      } else {
        mapped.push_back(static_cast<char>(it->second));
      }
    }
    bytes += all ? mapped : tok;
  }
  return Utf8Lossy(bytes);
}

std::vector<std::string> ByteLevelBpeTokenizer::SpecialTokensIn(const std::string& text) const {
  std::vector<std::pair<size_t, std::string>> found;
  for (const AddedToken& t : added_) {
    if (!t.special) continue;
    const size_t p = text.find(t.content);
    if (p != std::string::npos) found.emplace_back(p, t.content);
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [p, s] : found) out.push_back(std::move(s));
  return out;
}

// Whether the pre-tokenizer at `key` (or a Sequence inside it) has a ByteLevel step; an error
// naming the key where a step's "type" is not a string.
absl::StatusOr<bool> HasByteLevel(const Json& p, const std::string& key, const JsonReader& r) {
  if (!p.is_object()) return false;
  if (const auto type = p.find("type"); type != p.end()) {
    if (!type->is_string()) return r.Error(key + ".type", "must be a string");
    if (type->get<std::string>() == "ByteLevel") return true;
  }
  if (p.contains("pretokenizers") && p["pretokenizers"].is_array()) {
    for (size_t i = 0; i < p["pretokenizers"].size(); ++i) {
      QCAL_ASSIGN_OR_RETURN(
          const bool found,
          HasByteLevel(p["pretokenizers"][i], absl::StrCat(key, ".pretokenizers[", i, "]"), r));
      if (found) return true;
    }
  }
  return false;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseByteLevelBpe(const std::string& json_text,
                                                             const std::string& path) {
  Json j;
  try {
    j = Json::parse(json_text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON: ", e.what()));
  }
  JsonReader r(path);
  if (!j.is_object()) return r.Error("", "the file must hold a JSON object");
  bool byte_level = false;
  if (j.contains("pre_tokenizer")) {
    QCAL_ASSIGN_OR_RETURN(byte_level, HasByteLevel(j["pre_tokenizer"], "pre_tokenizer", r));
  }
  if (!byte_level) {
    return absl::UnimplementedError(
        absl::StrCat(path,
                     ": key \"pre_tokenizer\": not a byte-level BPE tokenizer (no ByteLevel "
                     "pre-tokenizer); only byte-level BPE tokenizer.json files are read"));
  }
  auto tok = std::make_unique<ByteLevelBpeTokenizer>();
  try {
    QCAL_RETURN_IF_ERROR(tok->Parse(j, r));
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unexpected JSON value: ", e.what()));
  }
  return tok;
}

}  // namespace qcal
