#include "core/tokenizer/sentencepiece_tokenizer.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "core/tokenizer/piece_text.h"
#include "core/tokenizer/sp_bridge.h"

namespace qforge {
namespace {

absl::Status FromSp(bool ok, const tokenizer_internal::SpError& e, const std::string& what) {
  if (ok) return absl::OkStatus();
  const absl::StatusCode code = e.code == 0 ? absl::StatusCode::kInternal : static_cast<absl::StatusCode>(e.code);
  return absl::Status(code, absl::StrCat(what, ": ", e.message));
}

// Reads a protobuf varint at data[*pos]; false on truncation.
bool ReadVarint(const std::string& data, size_t* pos, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *pos < data.size(); shift += 7) {
    const uint8_t byte = static_cast<uint8_t>(data[(*pos)++]);
    *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// Calls fn(field, wire_type, varint value, length-delimited bytes) for each top-level field of a protobuf
// message. Only varint, 64-bit, length-delimited and 32-bit wire types occur in SentencePiece models.
template <typename Fn>
bool ForEachField(const std::string& msg, Fn fn) {
  size_t pos = 0;
  while (pos < msg.size()) {
    uint64_t key;
    if (!ReadVarint(msg, &pos, &key)) return false;
    const int field = static_cast<int>(key >> 3), wire = static_cast<int>(key & 7);
    uint64_t v = 0;
    std::string bytes;
    if (wire == 0) {
      if (!ReadVarint(msg, &pos, &v)) return false;
    } else if (wire == 1 || wire == 5) {
      pos += wire == 1 ? 8 : 4;
    } else if (wire == 2) {
      if (!ReadVarint(msg, &pos, &v) || v > msg.size() - pos) return false;
      bytes = msg.substr(pos, v);
      pos += v;
    } else {
      return false;
    }
    if (pos > msg.size()) return false;
    fn(field, wire, v, bytes);
  }
  return true;
}

// ModelProto.normalizer_spec is field 3; in NormalizerSpec, add_dummy_prefix is field 3 and
// remove_extra_whitespaces field 4, both proto2 bools defaulting to true when absent.
VocabNormalizer ParseNormalizerOptions(const std::string& model_proto) {
  VocabNormalizer o{.add_dummy_prefix = true, .remove_extra_whitespaces = true};
  ForEachField(model_proto, [&](int field, int wire, uint64_t, const std::string& bytes) {
    if (field != 3 || wire != 2) return;
    ForEachField(bytes, [&](int f, int w, uint64_t v, const std::string&) {
      if (w != 0) return;
      if (f == 3) o.add_dummy_prefix = v != 0;
      if (f == 4) o.remove_extra_whitespaces = v != 0;
    });
  });
  return o;
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer() : sp_(std::make_unique<tokenizer_internal::SpProcessor>()) {}
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(const std::string& model_path) {
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  tokenizer_internal::SpError e;
  const bool ok = t->sp_->Load(model_path, &e);
  absl::Status s = FromSp(ok, e, absl::StrCat("loading SentencePiece model ", model_path));
  if (!s.ok()) return s;
  if (t->sp_->PieceSize() <= 0) return absl::InvalidArgumentError(absl::StrCat(model_path, ": empty vocabulary"));
  t->normalizer_ = ParseNormalizerOptions(t->sp_->SerializedModel());
  return t;
}

absl::StatusOr<std::vector<int>> SentencePieceTokenizer::Encode(const std::string& text, bool add_bos) const {
  std::vector<int> ids;
  tokenizer_internal::SpError e;
  const bool ok = sp_->Encode(text, &ids, &e);
  absl::Status s = FromSp(ok, e, "SentencePiece encode");
  if (!s.ok()) return s;
  if (add_bos && bos_id() >= 0) ids.insert(ids.begin(), bos_id());
  return ids;
}

absl::StatusOr<std::string> SentencePieceTokenizer::Decode(std::span<const int> ids) const {
  for (int id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat("decode: token id ", id, " outside [0, ", vocab_size(), ")"));
    }
  }
  std::string text;
  tokenizer_internal::SpError e;
  const bool ok = sp_->Decode(std::vector<int>(ids.begin(), ids.end()), &text, &e);
  absl::Status s = FromSp(ok, e, "SentencePiece decode");
  if (!s.ok()) return s;
  return text;
}

absl::StatusOr<std::string> SentencePieceTokenizer::DecodePiece(int prev, int id) const {
  if (id < 0 || id >= vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("decode: token id ", id, " outside [0, ", vocab_size(), ")"));
  }
  TokenType type = TokenType::kNormal;
  if (sp_->IsControl(id)) type = TokenType::kControl;
  else if (sp_->IsUnknown(id)) type = TokenType::kUnknown;
  else if (sp_->IsByte(id)) type = TokenType::kByte;
  return tokenizer_internal::PieceSurface(sp_->IdToPiece(id), type, prev < 0 || prev == bos_id());
}

int SentencePieceTokenizer::vocab_size() const { return sp_->PieceSize(); }
int SentencePieceTokenizer::bos_id() const { return sp_->bos_id(); }
int SentencePieceTokenizer::eos_id() const { return sp_->eos_id(); }

std::string SentencePieceTokenizer::IdToPiece(int id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return sp_->IdToPiece(id);
}

Vocab SentencePieceTokenizer::ExportVocab() const {
  Vocab v;
  v.model = "llama";
  const int n = vocab_size();
  v.tokens.reserve(n);
  v.scores.reserve(n);
  v.types.reserve(n);
  for (int id = 0; id < n; ++id) {
    v.tokens.push_back(sp_->IdToPiece(id));
    v.scores.push_back(sp_->Score(id));
    TokenType type = TokenType::kNormal;
    if (sp_->IsControl(id)) type = TokenType::kControl;
    else if (sp_->IsUnknown(id)) type = TokenType::kUnknown;
    else if (sp_->IsByte(id)) type = TokenType::kByte;
    else if (sp_->IsUnused(id)) type = TokenType::kUnused;
    v.types.push_back(type);
  }
  v.bos_id = sp_->bos_id();
  v.eos_id = sp_->eos_id();
  v.unk_id = sp_->unk_id();
  v.normalizer = normalizer_;
  return v;
}

}  // namespace qforge
