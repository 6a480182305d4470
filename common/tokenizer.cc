#include "common/tokenizer.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/bpe_tokenizer.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/sentencepiece_shim.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(std::string path) : path_(std::move(path)) {}

  absl::Status Init() {
    std::string err = sp_.Load(path_);
    if (!err.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": unreadable tokenizer: ", err));
    }
    bos_id_ = sp_.BosId();
    if (sp_.EosId() >= 0) eos_ids_ = {sp_.EosId()};
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<int>> Encode(const std::string& text) const override {
    std::vector<int> ids;
    std::string err = sp_.Encode(text, &ids);
    if (!err.empty()) return absl::InternalError(absl::StrCat(path_, ": encode failed: ", err));
    return ids;
  }

  absl::StatusOr<std::string> Decode(const std::vector<int>& ids) const override {
    for (int id : ids) {
      if (id < 0 || id >= sp_.PieceSize()) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " is outside the vocabulary"));
      }
    }
    std::string out;
    std::string err = sp_.Decode(ids, &out);
    if (!err.empty()) return absl::InternalError(absl::StrCat(path_, ": decode failed: ", err));
    return out;
  }

  int vocab_size() const override { return sp_.PieceSize(); }
  int TokenId(const std::string& token) const override { return sp_.PieceToId(token); }
  std::vector<std::string> SpecialTokensIn(const std::string&) const override { return {}; }
  std::string kind() const override { return "tokenizer.model (SentencePiece)"; }

 private:
  std::string path_;
  spm::Processor sp_;
};

absl::Status KeyError(const fs::path& file, const std::string& key, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(file.string(), ": key \"", key, "\": ", what));
}

// The JSON object in `file`, or nullopt when the file does not exist.
absl::StatusOr<std::optional<Json>> ReadJsonIfPresent(const fs::path& file) {
  if (!fs::exists(file)) return std::nullopt;
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(file.string()));
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file.string(), ": malformed JSON"));
  }
  return j;
}

// The id of a tokenizer_config.json token entry: a string, or an object with "content".
// -1 for null.
absl::StatusOr<int> ConfigTokenId(const Tokenizer& tok, const Json& v, const fs::path& file,
                                  const std::string& key) {
  if (v.is_null()) return -1;
  std::string content;
  if (v.is_string()) {
    content = v.get<std::string>();
  } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    content = v["content"].get<std::string>();
  } else {
    return KeyError(file, key, "must be a token string, {\"content\": ...} or null");
  }
  const int id = tok.TokenId(content);
  if (id < 0)
    return KeyError(file, key, absl::StrCat("token \"", content, "\" is not in the vocabulary"));
  return id;
}

// Token ids under `key` of a config file: an integer or a list of integers; nullopt when absent.
absl::StatusOr<std::optional<std::vector<int>>> IdList(const Tokenizer& tok, const Json& j,
                                                       const fs::path& file,
                                                       const std::string& key) {
  if (!j.contains(key)) return std::nullopt;
  const Json& v = j[key];
  std::vector<int> ids;
  if (v.is_null()) return ids;
  auto add = [&](const Json& x) -> absl::Status {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() >= tok.vocab_size()) {
      return KeyError(file, key,
                      absl::StrCat(x.dump(), " is not a token id below ", tok.vocab_size()));
    }
    ids.push_back(x.get<int>());
    return absl::OkStatus();
  };
  if (v.is_array()) {
    for (const Json& x : v) QCAL_RETURN_IF_ERROR(add(x));
  } else {
    QCAL_RETURN_IF_ERROR(add(v));
  }
  return ids;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  fs::path dir, json_file, model_file;
  if (fs::is_directory(path)) {
    dir = path;
    if (fs::exists(dir / "tokenizer.json")) json_file = dir / "tokenizer.json";
    if (fs::exists(dir / "tokenizer.model")) model_file = dir / "tokenizer.model";
  } else if (fs::exists(path) && fs::path(path).extension() == ".json") {
    json_file = path;
    dir = fs::path(path).parent_path();
  } else if (fs::exists(path) && fs::path(path).extension() == ".model") {
    model_file = path;
    dir = fs::path(path).parent_path();
  } else {
    return absl::NotFoundError(absl::StrCat(path, ": no such model directory or tokenizer file"));
  }
  if (dir.empty()) dir = ".";

  std::unique_ptr<Tokenizer> tok;
  if (!json_file.empty()) {
    QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(json_file.string()));
    absl::StatusOr<std::unique_ptr<Tokenizer>> bpe = ParseByteLevelBpe(text, json_file.string());
    if (bpe.ok()) {
      tok = *std::move(bpe);
    } else if (bpe.status().code() == absl::StatusCode::kUnimplemented && !model_file.empty()) {
      spdlog::info("{}: a SentencePiece conversion; using {}", json_file.string(),
                   model_file.string());
    } else if (bpe.status().code() == absl::StatusCode::kUnimplemented) {
      return absl::InvalidArgumentError(bpe.status().message());
    } else {
      return bpe.status();
    }
  }
  if (tok == nullptr) {
    if (model_file.empty()) {
      return absl::NotFoundError(
          absl::StrCat(dir.string(), ": no tokenizer.json or tokenizer.model"));
    }
    auto sp = std::make_unique<SentencePieceTokenizer>(model_file.string());
    QCAL_RETURN_IF_ERROR(sp->Init());
    tok = std::move(sp);
  }

  // BOS and EOS (see the header).
  const fs::path tc_file = dir / "tokenizer_config.json";
  const fs::path gc_file = dir / "generation_config.json";
  const fs::path cfg_file = dir / "config.json";
  QCAL_ASSIGN_OR_RETURN(std::optional<Json> tc, ReadJsonIfPresent(tc_file));
  QCAL_ASSIGN_OR_RETURN(std::optional<Json> gc, ReadJsonIfPresent(gc_file));
  QCAL_ASSIGN_OR_RETURN(std::optional<Json> cfg, ReadJsonIfPresent(cfg_file));
  if (tc) {
    tok->bos_id_ = -1;
    if (tc->contains("bos_token")) {
      QCAL_ASSIGN_OR_RETURN(tok->bos_id_,
                            ConfigTokenId(*tok, (*tc)["bos_token"], tc_file, "bos_token"));
    }
    if (tc->contains("add_bos_token") && (*tc)["add_bos_token"].is_boolean() &&
        !(*tc)["add_bos_token"].get<bool>()) {
      tok->bos_id_ = -1;
    }
  } else if (cfg && cfg->contains("bos_token_id")) {
    QCAL_ASSIGN_OR_RETURN(std::optional<std::vector<int>> bos,
                          IdList(*tok, *cfg, cfg_file, "bos_token_id"));
    tok->bos_id_ = bos->empty() ? -1 : (*bos)[0];
  }
  std::optional<std::vector<int>> eos;
  if (gc) {
    QCAL_ASSIGN_OR_RETURN(eos, IdList(*tok, *gc, gc_file, "eos_token_id"));
  }
  if (!eos && tc && tc->contains("eos_token")) {
    QCAL_ASSIGN_OR_RETURN(int id, ConfigTokenId(*tok, (*tc)["eos_token"], tc_file, "eos_token"));
    eos = id < 0 ? std::vector<int>{} : std::vector<int>{id};
  }
  if (!eos && cfg) {
    QCAL_ASSIGN_OR_RETURN(eos, IdList(*tok, *cfg, cfg_file, "eos_token_id"));
  }
  if (eos) tok->eos_ids_ = *eos;
  return tok;
}

}  // namespace qcal
