// No Abseil header may be included here (see sp_bridge.h).
#include "core/tokenizer/sp_bridge.h"

#include <sentencepiece_processor.h>

namespace qforge::tokenizer_internal {

struct SpProcessor::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

namespace {
bool Check(const sentencepiece::util::Status& s, SpError* error) {
  if (s.ok()) return true;
  if (error != nullptr) {
    error->code = static_cast<int>(s.code());
    error->message = s.message();
  }
  return false;
}
}  // namespace

SpProcessor::SpProcessor() : impl_(std::make_unique<Impl>()) {}
SpProcessor::~SpProcessor() = default;

bool SpProcessor::Load(const std::string& path, SpError* error) { return Check(impl_->sp.Load(path), error); }
bool SpProcessor::Encode(const std::string& text, std::vector<int>* ids, SpError* error) const {
  return Check(impl_->sp.Encode(text, ids), error);
}
bool SpProcessor::Decode(const std::vector<int>& ids, std::string* text, SpError* error) const {
  return Check(impl_->sp.Decode(ids, text), error);
}
int SpProcessor::PieceSize() const { return impl_->sp.GetPieceSize(); }
std::string SpProcessor::IdToPiece(int id) const { return impl_->sp.IdToPiece(id); }
float SpProcessor::Score(int id) const { return impl_->sp.GetScore(id); }
bool SpProcessor::IsControl(int id) const { return impl_->sp.IsControl(id); }
bool SpProcessor::IsUnknown(int id) const { return impl_->sp.IsUnknown(id); }
bool SpProcessor::IsByte(int id) const { return impl_->sp.IsByte(id); }
bool SpProcessor::IsUnused(int id) const { return impl_->sp.IsUnused(id); }
int SpProcessor::bos_id() const { return impl_->sp.bos_id(); }
int SpProcessor::eos_id() const { return impl_->sp.eos_id(); }
int SpProcessor::unk_id() const { return impl_->sp.unk_id(); }
std::string SpProcessor::SerializedModel() const { return impl_->sp.serialized_model_proto(); }

}  // namespace qforge::tokenizer_internal
