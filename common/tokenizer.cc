#include "common/tokenizer.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/sentencepiece_shim.h"
#include "common/status.h"

namespace qcal {
namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(std::string path) : path_(std::move(path)) {}

  absl::Status Init() {
    std::string err = sp_.Load(path_);
    if (!err.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": unreadable tokenizer: ", err));
    }
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
  int bos_id() const override { return sp_.BosId(); }
  int eos_id() const override { return sp_.EosId(); }

 private:
  std::string path_;
  spm::Processor sp_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::string file = path;
  if (std::filesystem::is_directory(path)) {
    file = (std::filesystem::path(path) / "tokenizer.model").string();
  } else if (!std::filesystem::exists(path) ||
             std::filesystem::path(path).extension() != ".model") {
    return absl::NotFoundError(absl::StrCat(path, ": no such model directory or tokenizer file"));
  }
  if (!std::filesystem::exists(file)) {
    return absl::NotFoundError(absl::StrCat(file, ": tokenizer file not found"));
  }
  auto tok = std::make_unique<SentencePieceTokenizer>(file);
  QCAL_RETURN_IF_ERROR(tok->Init());
  return tok;
}

}  // namespace qcal
