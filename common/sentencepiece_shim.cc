// Includes SentencePiece and no Abseil header (see sentencepiece_shim.h).
#include "common/sentencepiece_shim.h"

#include "sentencepiece_processor.h"
#include "sentencepiece_trainer.h"

namespace qcal::spm {

struct Processor::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Processor::Processor() : impl_(std::make_unique<Impl>()) {}
Processor::~Processor() = default;

std::string Processor::Load(const std::string& path) {
  auto st = impl_->sp.Load(path);
  return st.ok() ? std::string() : st.ToString();
}

std::string Processor::Encode(const std::string& text, std::vector<int>* ids) const {
  auto st = impl_->sp.Encode(text, ids);
  return st.ok() ? std::string() : st.ToString();
}

std::string Processor::Decode(const std::vector<int>& ids, std::string* text) const {
  auto st = impl_->sp.Decode(ids, text);
  return st.ok() ? std::string() : st.ToString();
}

int Processor::PieceSize() const { return impl_->sp.GetPieceSize(); }
int Processor::BosId() const { return impl_->sp.bos_id(); }
int Processor::EosId() const { return impl_->sp.eos_id(); }
int Processor::PieceToId(const std::string& piece) const {
  const int id = impl_->sp.PieceToId(piece);
  return impl_->sp.IdToPiece(id) == piece ? id : -1;
}

namespace {

class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& s) : s_(s) {}
  bool done() const override { return i_ >= s_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return s_[i_]; }
  sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

 private:
  const std::vector<std::string>& s_;
  size_t i_ = 0;
};

}  // namespace

std::string Train(const std::string& args, const std::vector<std::string>& sentences,
                  std::string* model) {
  VectorIterator it(sentences);
  auto st = sentencepiece::SentencePieceTrainer::Train(args, &it, model);
  return st.ok() ? std::string() : st.ToString();
}

}  // namespace qcal::spm
