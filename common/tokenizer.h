// SentencePiece tokenizer of a checkpoint (`tokenizer.model`). The SentencePiece headers stay
// behind this interface.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qcal {

class Tokenizer {
 public:
  // Loads `<model_dir>/tokenizer.model` (or a path to the .model file itself).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  virtual ~Tokenizer() = default;

  // Token ids of `text`, without BOS or EOS.
  virtual absl::StatusOr<std::vector<int>> Encode(const std::string& text) const = 0;
  virtual absl::StatusOr<std::string> Decode(const std::vector<int>& ids) const = 0;
  virtual int vocab_size() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
};

}  // namespace qcal
