// Tests of the tokenizer factory and the byte-level BPE reader (common/tokenizer.h,
// common/bpe_tokenizer.h) on small tokenizer.json files written by the tests, and of the UTF-8
// helpers (common/unicode_text.h). The real Llama 3 and Qwen3 files are compared with an
// independent implementation in tokenizer_node_test.cc.
#include "common/tokenizer.h"

#include <filesystem>
#include <string>
#include <vector>

#include "common/files.h"
#include "common/sentencepiece_shim.h"
#include "common/text_data.h"
#include "common/unicode_text.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

constexpr char kLlama3Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// GPT-2's stand-in character for byte b, written out independently of the library.
std::string ByteChar(int b) {
  const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
  int c = b;
  if (!printable) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174))) ++n;
    }
    c = 256 + n;
  }
  std::string s;
  AppendUtf8(static_cast<char32_t>(c), &s);
  return s;
}

// A byte-level BPE tokenizer.json: ids 0..255 are the bytes (id b is byte b), then `merged`
// tokens from 256 on in order (written with ' ' for the space byte's stand-in "Ġ"), merges in
// rank order as "a b" strings.
class Fixture {
 public:
  Fixture() {
    j_["version"] = "1.0";
    j_["normalizer"] = nullptr;
    j_["pre_tokenizer"] = {{"type", "Sequence"},
                           {"pretokenizers",
                            {{{"type", "Split"},
                              {"pattern", {{"Regex", kLlama3Regex}}},
                              {"behavior", "Isolated"},
                              {"invert", false}},
                             {{"type", "ByteLevel"},
                              {"add_prefix_space", false},
                              {"trim_offsets", true},
                              {"use_regex", false}}}}};
    j_["post_processor"] = nullptr;
    j_["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
    Json vocab = Json::object();
    for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
    j_["model"] = {{"type", "BPE"},     {"dropout", nullptr},     {"unk_token", nullptr},
                   {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
                   {"vocab", vocab},    {"merges", Json::array()}};
    j_["added_tokens"] = Json::array();
  }
  static std::string Mapped(const std::string& s) {
    std::string out;
    for (unsigned char c : s) out += ByteChar(c);
    return out;
  }
  // Adds the merge a+b (plain text, mapped here) and returns the merged token's id.
  int Merge(const std::string& a, const std::string& b, bool pair_form = false) {
    const std::string ma = Mapped(a), mb = Mapped(b);
    if (!j_["model"]["vocab"].contains(ma + mb)) {
      j_["model"]["vocab"][ma + mb] = next_id_++;
    }
    if (pair_form) {
      j_["model"]["merges"].push_back(Json::array({ma, mb}));
    } else {
      j_["model"]["merges"].push_back(ma + " " + mb);
    }
    return j_["model"]["vocab"][ma + mb].get<int>();
  }
  // A vocabulary entry no merge reaches.
  int Token(const std::string& text) {
    j_["model"]["vocab"][Mapped(text)] = next_id_;
    return next_id_++;
  }
  int Added(const std::string& content, bool special, Json flags = Json::object()) {
    Json t = {{"id", 1000 + static_cast<int>(j_["added_tokens"].size())},
              {"content", content},
              {"single_word", false},
              {"lstrip", false},
              {"rstrip", false},
              {"normalized", !special},
              {"special", special}};
    for (auto& [k, v] : flags.items()) t[k] = v;
    j_["added_tokens"].push_back(t);
    return t["id"].get<int>();
  }
  Json& json() { return j_; }

 private:
  Json j_;
  int next_id_ = 256;
};

std::vector<int> Bytes(const std::string& s) {
  std::vector<int> ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

class TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("tokenizer_test");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& name, const std::string& contents) {
    ASSERT_TRUE(WriteStringToFile((fs::path(dir_) / name).string(), contents).ok());
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const Json& tokenizer_json) {
    Write("tokenizer.json", tokenizer_json.dump());
    return Tokenizer::Load(dir_);
  }
  std::unique_ptr<Tokenizer> MustLoad(const Json& tokenizer_json) {
    auto tok = Load(tokenizer_json);
    EXPECT_TRUE(tok.ok()) << tok.status();
    return tok.ok() ? *std::move(tok) : nullptr;
  }
  std::vector<int> Encode(const Tokenizer& tok, const std::string& text) {
    auto ids = tok.Encode(text);
    EXPECT_TRUE(ids.ok()) << ids.status();
    auto back = tok.Decode(ids.ok() ? *ids : std::vector<int>{});
    EXPECT_TRUE(back.ok()) << back.status();
    if (back.ok()) {
      EXPECT_EQ(*back, text);
    }
    return ids.ok() ? *ids : std::vector<int>{};
  }
  // The error message of loading `j`, or "" when it loads.
  std::string LoadError(const Json& j) {
    auto tok = Load(j);
    return tok.ok() ? "" : std::string(tok.status().message());
  }
  std::string dir_;
};

TEST_F(TokenizerTest, MergesApplyByRankInBothForms) {
  Fixture f;
  const int he = f.Merge("h", "e");
  const int ll = f.Merge("l", "l", /*pair_form=*/true);
  const int hell = f.Merge("he", "ll");
  const int hello = f.Merge("hell", "o", /*pair_form=*/true);
  const int sp_w = f.Merge(" ", "w");
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->kind(), "tokenizer.json (byte-level BPE)");
  EXPECT_THAT(Encode(*tok, "hello"), ElementsAre(hello));
  EXPECT_THAT(Encode(*tok, "hell"), ElementsAre(hell));
  EXPECT_THAT(Encode(*tok, "hel"), ElementsAre(he, 'l'));
  EXPECT_THAT(Encode(*tok, "hello world"), ElementsAre(hello, sp_w, 'o', 'r', 'l', 'd'));
  EXPECT_EQ(he, 256);
  EXPECT_EQ(ll, 257);
  EXPECT_EQ(tok->vocab_size(), 261);
}

TEST_F(TokenizerTest, LowerRankWinsAndTiesGoLeft) {
  Fixture f;
  const int bc = f.Merge("b", "c");  // rank 0
  const int ab = f.Merge("a", "b");  // rank 1
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Encode(*tok, "abc"), ElementsAre('a', bc));
  EXPECT_THAT(Encode(*tok, "ab"), ElementsAre(ab));
  Fixture g;
  const int aa = g.Merge("a", "a");
  auto tok2 = MustLoad(g.json());
  ASSERT_NE(tok2, nullptr);
  EXPECT_THAT(Encode(*tok2, "aaa"), ElementsAre(aa, 'a'));
}

TEST_F(TokenizerTest, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  Fixture f;
  const int word = f.Token("xyz");  // in the vocabulary, but no merge builds it
  f.json()["model"]["ignore_merges"] = true;
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Encode(*tok, "xyz"), ElementsAre(word));
  f.json()["model"]["ignore_merges"] = false;
  tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Encode(*tok, "xyz"), ElementsAre('x', 'y', 'z'));
}

TEST_F(TokenizerTest, SplitRegexBoundsMerges) {
  Fixture f;
  const int m34 = f.Merge("3", "4");  // rank 0, but "12345" splits as "123" | "45"
  const int m45 = f.Merge("4", "5");
  const int sp2 = f.Merge(" ", " ");
  const int sp_b = f.Merge(" ", "b");
  const int apos_s = f.Merge("'", "s");
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Encode(*tok, "12345"), ElementsAre('1', '2', '3', m45));
  EXPECT_THAT(Encode(*tok, "2345"), ElementsAre('2', m34, '5'));
  // \s+(?!\S): of three spaces before "b", two stand alone and one starts " b".
  EXPECT_THAT(Encode(*tok, "a   b"), ElementsAre('a', sp2, sp_b));
  // (?i:'s) is a piece of its own, in either case.
  EXPECT_THAT(Encode(*tok, "it's"), ElementsAre('i', 't', apos_s));
  EXPECT_THAT(Encode(*tok, "IT'S"), ElementsAre('I', 'T', '\'', 'S'));
}

TEST_F(TokenizerTest, ByteLevelWithGpt2RegexAndPrefixSpace) {
  Fixture f;
  const int sp_a = f.Merge(" ", "a");
  f.json()["pre_tokenizer"] = {
      {"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("a a");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(sp_a, sp_a));
}

TEST_F(TokenizerTest, AddedTokensAreMatchedInText) {
  Fixture f;
  const int eot = f.Added("<|eot|>", /*special=*/true);
  const int eot_long = f.Added("<|eot|>x", /*special=*/true);
  const int think = f.Added("<think>", /*special=*/false);
  const int lstrip = f.Added("<L>", true, {{"lstrip", true}});
  const int rstrip = f.Added("<R>", true, {{"rstrip", true}});
  const int word = f.Added("cat", false, {{"single_word", true}});
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Encode(*tok, "a<|eot|>b"), ElementsAre('a', eot, 'b'));
  EXPECT_THAT(Encode(*tok, "<|eot|>x"), ElementsAre(eot_long));  // leftmost-longest
  EXPECT_THAT(Encode(*tok, "<think>\n"), ElementsAre(think, '\n'));
  auto l = tok->Encode("a  <L>b");
  ASSERT_TRUE(l.ok());
  EXPECT_THAT(*l, ElementsAre('a', lstrip, 'b'));
  auto r = tok->Encode("a<R> \n b");
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(*r, ElementsAre('a', rstrip, 'b'));
  EXPECT_THAT(Encode(*tok, "cat"), ElementsAre(word));
  EXPECT_THAT(Encode(*tok, "concat"), ElementsAre('c', 'o', 'n', 'c', 'a', 't'));
  EXPECT_THAT(Encode(*tok, "cat_"), ElementsAre('c', 'a', 't', '_'));  // '_' is a word char
  EXPECT_THAT(Encode(*tok, "(cat)"), ElementsAre('(', word, ')'));
  EXPECT_THAT(tok->SpecialTokensIn("x<think><|eot|>y<L>"), ElementsAre("<|eot|>", "<L>"));
  EXPECT_TRUE(tok->SpecialTokensIn("plain <think> text").empty());
  EXPECT_EQ(tok->TokenId("<think>"), think);
  EXPECT_EQ(tok->vocab_size(), 1006);
  auto text = tok->Decode({'a', eot, think, 'b'});
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "a<|eot|><think>b");
}

TEST_F(TokenizerTest, NfcNormalizer) {
  Fixture f;
  const int e_acute = f.Merge("\xC3", "\xA9");  // é, U+00E9
  f.json()["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}}}};
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("e\xCC\x81");  // e + U+0301 COMBINING ACUTE ACCENT
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(e_acute));
  f.json()["normalizer"] = nullptr;
  tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Encode(*tok, "e\xCC\x81"), ElementsAre('e', 0xCC, 0x81));
}

TEST_F(TokenizerTest, DecodeReplacesBrokenUtf8AndRejectsUnknownIds) {
  Fixture f;
  auto tok = MustLoad(f.json());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Encode(*tok, "\xF0\x9F\xA4\x97 \xE4\xBD\xA0"),
              ElementsAreArray(Bytes("\xF0\x9F\xA4\x97 \xE4\xBD\xA0")));
  auto half = tok->Decode({0xF0, 0x9F, 'a'});
  ASSERT_TRUE(half.ok());
  EXPECT_EQ(*half,
            "\xEF\xBF\xBD"
            "a");
  EXPECT_FALSE(tok->Decode({5000}).ok());
  EXPECT_FALSE(tok->Decode({-1}).ok());
  auto bad = tok->Encode("ok\xFFno");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("byte offset 2"));
}

TEST_F(TokenizerTest, BosAndEosFollowTheConfigFiles) {
  Fixture f;
  const int bos = f.Added("<|begin|>", true);
  const int end = f.Added("<|end|>", true);
  const int eot = f.Added("<|eot|>", true);
  Write("tokenizer.json", f.json().dump());
  // No side files: a BPE tokenizer has no BOS or EOS of its own.
  auto tok = Tokenizer::Load(dir_);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), -1);
  EXPECT_EQ((*tok)->eos_id(), -1);
  // config.json only.
  Write("config.json", R"({"bos_token_id": 1000, "eos_token_id": [1001, 1002]})");
  tok = Tokenizer::Load(dir_);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), bos);
  EXPECT_THAT((*tok)->eos_ids(), ElementsAre(end, eot));
  // tokenizer_config.json decides BOS, over config.json.
  Write("tokenizer_config.json", R"({"bos_token": null, "eos_token": "<|eot|>"})");
  tok = Tokenizer::Load(dir_);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), -1);
  EXPECT_THAT((*tok)->eos_ids(), ElementsAre(eot));
  Write("tokenizer_config.json",
        R"({"bos_token": {"content": "<|begin|>"}, "eos_token": "<|end|>"})");
  tok = Tokenizer::Load(dir_);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), bos);
  EXPECT_EQ((*tok)->eos_id(), end);
  Write("tokenizer_config.json", R"({"bos_token": "<|begin|>", "add_bos_token": false})");
  tok = Tokenizer::Load(dir_);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), -1);
  // generation_config.json's list comes first for EOS.
  Write("generation_config.json", R"({"eos_token_id": [1002, 1001]})");
  tok = Tokenizer::Load(dir_);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT((*tok)->eos_ids(), ElementsAre(eot, end));
  // Errors name the file and key.
  Write("tokenizer_config.json", R"({"bos_token": "<nope>"})");
  tok = Tokenizer::Load(dir_);
  ASSERT_FALSE(tok.ok());
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr("tokenizer_config.json: key \"bos_token\""));
  Write("tokenizer_config.json", "{}");
  Write("generation_config.json", R"({"eos_token_id": 99999})");
  tok = Tokenizer::Load(dir_);
  ASSERT_FALSE(tok.ok());
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr("generation_config.json: key \"eos_token_id\""));
}

// A small SentencePiece model, trained here.
std::string TrainSentencePiece() {
  std::vector<std::string> lines;
  for (int i = 0; i < 200; ++i) {
    lines.push_back("the quick brown fox jumps over the lazy dog " + std::to_string(i));
  }
  std::string model;
  const std::string err = spm::Train(
      "--model_type=bpe --vocab_size=60 --character_coverage=1.0 --unk_id=0 --bos_id=1 "
      "--eos_id=2 --pad_id=-1 --num_threads=1 --minloglevel=2",
      lines, &model);
  EXPECT_EQ(err, "");
  return model;
}

TEST_F(TokenizerTest, TokenizerJsonIsPreferredUnlessItIsASentencePieceConversion) {
  Write("tokenizer.model", TrainSentencePiece());
  auto sp = Tokenizer::Load(dir_);
  ASSERT_TRUE(sp.ok()) << sp.status();
  EXPECT_EQ((*sp)->kind(), "tokenizer.model (SentencePiece)");
  EXPECT_EQ((*sp)->bos_id(), 1);
  EXPECT_EQ((*sp)->eos_id(), 2);
  Fixture f;
  Write("tokenizer.json", f.json().dump());
  auto both = Tokenizer::Load(dir_);
  ASSERT_TRUE(both.ok()) << both.status();
  EXPECT_EQ((*both)->kind(), "tokenizer.json (byte-level BPE)");
  // Llama 2's tokenizer.json (Metaspace, byte_fallback): tokenizer.model is used.
  f.json()["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}};
  Write("tokenizer.json", f.json().dump());
  auto conv = Tokenizer::Load(dir_);
  ASSERT_TRUE(conv.ok()) << conv.status();
  EXPECT_EQ((*conv)->kind(), "tokenizer.model (SentencePiece)");
  fs::remove(fs::path(dir_) / "tokenizer.model");
  auto alone = Tokenizer::Load(dir_);
  ASSERT_FALSE(alone.ok());
  EXPECT_THAT(std::string(alone.status().message()),
              HasSubstr("tokenizer.json: key \"pre_tokenizer\": not a byte-level BPE"));
}

TEST_F(TokenizerTest, BadFilesNameTheFileAndKey) {
  Write("tokenizer.json", "{\"model\": {");
  auto tok = Tokenizer::Load(dir_);
  ASSERT_FALSE(tok.ok());
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("tokenizer.json: malformed JSON"));

  const std::string file = (fs::path(dir_) / "tokenizer.json").string();
  Fixture f;
  f.json()["model"]["type"] = "WordPiece";
  EXPECT_THAT(LoadError(f.json()),
              HasSubstr(file + ": key \"model.type\": unsupported model type \"WordPiece\""));

  Fixture g;
  g.json()["pre_tokenizer"]["pretokenizers"][0]["type"] = "Punctuation";
  EXPECT_THAT(LoadError(g.json()), HasSubstr("key \"pre_tokenizer.pretokenizers[0].type\": "
                                             "unsupported pre-tokenizer type \"Punctuation\""));

  Fixture h;
  h.json()["normalizer"] = {{"type", "Lowercase"}};
  EXPECT_THAT(LoadError(h.json()),
              HasSubstr("key \"normalizer.type\": unsupported normalizer type \"Lowercase\""));

  Fixture d;
  d.json()["decoder"] = {{"type", "WordPiece"}};
  EXPECT_THAT(LoadError(d.json()),
              HasSubstr("key \"decoder.type\": unsupported decoder type \"WordPiece\""));

  Fixture m;
  m.Merge("a", "b");
  m.json()["model"]["merges"].push_back("a zz");
  EXPECT_THAT(LoadError(m.json()),
              HasSubstr("key \"model.merges[1]\": token \"zz\" is not in model.vocab"));
  m.json()["model"]["merges"][1] = "a b c";
  EXPECT_THAT(LoadError(m.json()), HasSubstr("key \"model.merges[1]\""));
  m.json()["model"]["merges"][1] = 7;
  EXPECT_THAT(LoadError(m.json()), HasSubstr("key \"model.merges[1]\""));

  Fixture r;
  r.json()["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_THAT(LoadError(r.json()),
              HasSubstr("key \"pre_tokenizer.pretokenizers[0].pattern\": regex does not compile"));

  Fixture v;
  v.json()["model"]["vocab"]["x"] = "one";
  EXPECT_THAT(LoadError(v.json()), HasSubstr("key \"model.vocab[\"x\"]\""));

  Fixture a;
  a.json()["added_tokens"] = Json::array({{{"content", "<x>"}}});
  EXPECT_THAT(LoadError(a.json()), HasSubstr("key \"added_tokens[0]\""));
}

// ---- Text files (DESIGN section 4) ----

TEST_F(TokenizerTest, TextFilesAreReadAsPythonReadsThem) {
  Write("crlf.txt", "\xEF\xBB\xBFone\r\ntwo\rthree\n\r\n");
  auto text = LoadCorpusText((fs::path(dir_) / "crlf.txt").string());
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "one\ntwo\nthree\n\n");

  Write("bad.txt", "caf\xC3\xA9 ok\n\xC3(");
  auto bad = LoadCorpusText((fs::path(dir_) / "bad.txt").string());
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("bad.txt: invalid UTF-8 at byte offset 9"));

  // A BOM, then CRLF in jsonl: records keep their escaped "\r".
  Write("c.jsonl", "\xEF\xBB\xBF{\"text\": \"a\\r\\nb\"}\r\n{\"text\": \"c\"}\r\n");
  auto records = LoadCorpusRecords((fs::path(dir_) / "c.jsonl").string());
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_THAT(*records, ElementsAre("a\r\nb", "c"));
}

TEST_F(TokenizerTest, CrlfCopyOfTheEvalTextTokenizesIdentically) {
  QCAL_REQUIRE_SHARED();
  auto raw = ReadFileToString(testing::SharedDir() + "/data/tinystories-eval.txt");
  ASSERT_TRUE(raw.ok()) << raw.status();
  ASSERT_EQ(raw->find('\r'), std::string::npos);
  std::string crlf = "\xEF\xBB\xBF";
  for (char c : *raw) {
    if (c == '\n') crlf += '\r';
    crlf += c;
  }
  Write("lf.txt", *raw);
  Write("crlf.txt", crlf);
  Fixture f;
  f.Merge("t", "h");
  f.Merge("th", "e");
  f.Merge(" ", "the");
  Write("tokenizer.json", f.json().dump());
  auto bpe = Tokenizer::Load(dir_);
  ASSERT_TRUE(bpe.ok()) << bpe.status();
  auto sp = Tokenizer::Load(testing::SharedDir() + "/models/stories260k");
  ASSERT_TRUE(sp.ok()) << sp.status();
  for (const Tokenizer* tok : {bpe->get(), sp->get()}) {
    auto lf_text = LoadCorpusText((fs::path(dir_) / "lf.txt").string());
    auto crlf_text = LoadCorpusText((fs::path(dir_) / "crlf.txt").string());
    ASSERT_TRUE(lf_text.ok() && crlf_text.ok());
    auto a = TokenizeCorpus(*tok, *lf_text, "lf");
    auto b = TokenizeCorpus(*tok, *crlf_text, "crlf");
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_GT(a->size(), 1000u);
    EXPECT_EQ(*a, *b) << tok->kind();
  }
}

TEST(UnicodeTextTest, InvalidUtf8OffsetsAndLossyDecoding) {
  EXPECT_EQ(FindInvalidUtf8("plain"), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8("\xE4\xBD\xA0\xF0\x9F\xA4\x97"), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8("ab\x80"), 2u);
  EXPECT_EQ(FindInvalidUtf8("a\xC0\xAF"), 1u);          // overlong
  EXPECT_EQ(FindInvalidUtf8("a\xED\xA0\x80"), 1u);      // surrogate
  EXPECT_EQ(FindInvalidUtf8("a\xF4\x90\x80\x80"), 1u);  // above U+10FFFF
  EXPECT_EQ(FindInvalidUtf8("\xE4\xBD"), 0u);           // truncated
  EXPECT_EQ(Utf8Lossy("a\xF0\x9F\xA4z"), "a\xEF\xBF\xBDz");
  EXPECT_EQ(Utf8Lossy("\xFF\xFE"), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

// ---- Models without a BOS (DESIGN section 4) ----

TEST(NoBosTest, EvalWindowsPredictTheLastLMinusOneTokens) {
  std::vector<int> t;
  for (int i = 0; i < 10; ++i) t.push_back(100 + i);
  auto w = MakeEvalWindows(t, 4, -1, /*bos_id=*/-1, "eval");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->seq_len, 3);
  ASSERT_EQ(w->inputs.size(), 2u);
  EXPECT_THAT(w->inputs[1], ElementsAre(104, 105, 106));
  EXPECT_THAT(w->targets[1], ElementsAre(105, 106, 107));
}

TEST(NoBosTest, CalibrationSamplesAreLTokensOfTheText) {
  std::vector<int> t;
  for (int i = 0; i < 10; ++i) t.push_back(100 + i);
  auto s = SampleCalibration(t, 5, 4, 0, /*bos_id=*/-1, "calib");
  ASSERT_TRUE(s.ok()) << s.status();
  SplitMix64 rng(0);
  for (const auto& sample : *s) {
    const int p = static_cast<int>(rng.Next() % 7);  // |T| - L + 1
    EXPECT_THAT(sample, ElementsAre(100 + p, 101 + p, 102 + p, 103 + p));
  }
  EXPECT_FALSE(
      SampleCalibration(std::vector<int>(t.begin(), t.begin() + 3), 1, 4, 0, -1, "c").ok());
}

}  // namespace
}  // namespace qcal
