// A plain-C++ facade over SentencePiece. SentencePiece's headers declare `absl::string_view` as
// std::string_view, which collides with Debian's Abseil, so sentencepiece_shim.cc includes them and
// no Abseil header; everything else talks to SentencePiece through this file. Errors come back as
// a non-empty string.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace qcal::spm {

class Processor {
 public:
  Processor();
  ~Processor();
  // Returns "" on success, else the error message.
  std::string Load(const std::string& path);
  std::string Encode(const std::string& text, std::vector<int>* ids) const;
  std::string Decode(const std::vector<int>& ids, std::string* text) const;
  int PieceSize() const;
  int BosId() const;
  int EosId() const;
  // Id of `piece`, or -1 when it is not in the vocabulary.
  int PieceToId(const std::string& piece) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Runs the SentencePiece trainer with `args` (its command-line syntax) on the sentences given;
// writes the serialized model into *model. Returns "" on success, else the error message.
std::string Train(const std::string& args, const std::vector<std::string>& sentences,
                  std::string* model);

}  // namespace qcal::spm
