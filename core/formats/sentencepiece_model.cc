#include "core/formats/sentencepiece_model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"

namespace qforge::formats {
namespace {

// Limits for hostile input. Real models: Llama 2 has 32000 pieces in 500 KB, the largest SentencePiece
// vocabularies in use have ~256k pieces in under 10 MB.
constexpr size_t kMaxModelBytes = size_t{256} << 20;
constexpr size_t kMaxPieces = size_t{1} << 20;
// libsentencepiece refuses pieces of this many bytes or more ("piece is too long").
constexpr size_t kMaxPieceBytes = 8000;
// Unknown groups can nest; bound the recursion that skips them (protobuf's own limit is 100).
constexpr int kMaxGroupDepth = 32;

enum WireType : int { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kStartGroup = 3, kEndGroup = 4, kFixed32 = 5 };

// sentencepiece_model.proto field numbers (proto2).
namespace field {
// ModelProto
constexpr int kPieces = 1, kTrainerSpec = 2, kNormalizerSpec = 3, kDenormalizerSpec = 5;
// ModelProto.SentencePiece
constexpr int kPiece = 1, kScore = 2, kType = 3;
// TrainerSpec
constexpr int kModelType = 3, kTreatWhitespaceAsSuffix = 24, kByteFallback = 35, kUnkId = 40, kBosId = 41,
              kEosId = 42, kUnkSurface = 44, kUnkPiece = 45, kBosPiece = 46, kEosPiece = 47;
// NormalizerSpec
constexpr int kName = 1, kPrecompiledCharsmap = 2, kAddDummyPrefix = 3, kRemoveExtraWhitespaces = 4,
              kEscapeWhitespaces = 5;
}  // namespace field

// TrainerSpec.ModelType and ModelProto.SentencePiece.Type values.
constexpr int kBpe = 2;
constexpr int kTypeNormal = 1, kTypeUnknown = 2, kTypeControl = 3, kTypeUserDefined = 4, kTypeUnused = 5,
              kTypeByte = 6;

const char* ModelTypeName(int t) {
  switch (t) {
    case 1: return "UNIGRAM";
    case 2: return "BPE";
    case 3: return "WORD";
    case 4: return "CHAR";
    default: return "unknown";
  }
}

const char* PieceTypeName(int t) {
  switch (t) {
    case kTypeNormal: return "NORMAL";
    case kTypeUnknown: return "UNKNOWN";
    case kTypeControl: return "CONTROL";
    case kTypeUserDefined: return "USER_DEFINED";
    case kTypeUnused: return "UNUSED";
    case kTypeByte: return "BYTE";
    default: return "unknown";
  }
}

// A piece as it may appear in an error message: escaped (it is arbitrary bytes) and cut short.
std::string Quote(std::string_view piece) {
  // Debian's Abseil has its own absl::string_view, not an alias of std::string_view.
  std::string s = absl::CHexEscape(absl::string_view(piece.data(), std::min<size_t>(piece.size(), 40)));
  return absl::StrCat("\"", s, piece.size() > 40 ? "\"..." : "\"");
}

absl::Status Invalid(size_t offset, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat("SentencePiece model: ", problem, " at byte offset ", offset));
}

// A cursor over one protobuf message. `base` is the message's offset in the file, so that errors from
// nested messages still name a file offset.
class WireReader {
 public:
  WireReader(std::string_view data, size_t base) : data_(data), base_(base) {}

  bool done() const { return pos_ >= data_.size(); }
  size_t offset() const { return base_ + pos_; }

  absl::Status Varint(uint64_t* value, const char* what) {
    const size_t start = offset();
    uint64_t v = 0;
    // A 64-bit value takes at most 10 bytes, the last holding only bit 63.
    for (int i = 0; i < 10; ++i) {
      if (done()) return Invalid(start, absl::StrCat("truncated varint (", what, ")"));
      const uint8_t byte = static_cast<uint8_t>(data_[pos_++]);
      if (i == 9 && (byte & 0x80) != 0) return Invalid(start, absl::StrCat("varint longer than 10 bytes (", what, ")"));
      if (i == 9 && byte > 1) return Invalid(start, absl::StrCat("varint overflows 64 bits (", what, ")"));
      v |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
      if ((byte & 0x80) == 0) break;
    }
    *value = v;
    return absl::OkStatus();
  }

  // The next field's number and wire type.
  absl::Status Tag(int* field_number, int* wire_type) {
    const size_t start = offset();
    uint64_t key = 0;
    QF_RETURN_IF_ERROR(Varint(&key, "field tag"));
    // Field numbers are 1 .. 2^29-1, so a key fits in 32 bits.
    if (key > 0xffffffffu || (key >> 3) == 0) {
      return Invalid(start, absl::StrCat("invalid field number ", key >> 3));
    }
    *field_number = static_cast<int>(key >> 3);
    *wire_type = static_cast<int>(key & 7);
    return absl::OkStatus();
  }

  // A length-delimited payload, viewed in place; *payload_offset is its file offset.
  absl::Status Bytes(std::string_view* out, size_t* payload_offset, const char* what) {
    const size_t start = offset();
    uint64_t len = 0;
    QF_RETURN_IF_ERROR(Varint(&len, what));
    if (len > data_.size() - pos_) {
      return Invalid(start, absl::StrCat(what, " length ", len, " runs past the end of its message (",
                                         data_.size() - pos_, " bytes left)"));
    }
    *payload_offset = offset();
    *out = data_.substr(pos_, static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return absl::OkStatus();
  }

  absl::Status Fixed32(uint32_t* out, const char* what) {
    if (data_.size() - pos_ < 4) return Invalid(offset(), absl::StrCat("truncated fixed32 (", what, ")"));
    // Little-endian on the wire, whatever the host.
    uint32_t v = 0;
    for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(data_[pos_ + i]);
    *out = v;
    pos_ += 4;
    return absl::OkStatus();
  }

  // Skips the value of a field this reader does not interpret (whose tag was just read).
  absl::Status Skip(int field_number, int wire_type, int depth = 0) {
    switch (wire_type) {
      case kVarint: {
        uint64_t v = 0;
        return Varint(&v, "unknown field");
      }
      case kFixed64:
        return Advance(8, "fixed64");
      case kFixed32:
        return Advance(4, "fixed32");
      case kLengthDelimited: {
        std::string_view s;
        size_t at = 0;
        return Bytes(&s, &at, "unknown field");
      }
      case kStartGroup: {
        if (depth >= kMaxGroupDepth) return Invalid(offset(), "groups nested too deeply");
        while (true) {
          if (done()) return Invalid(offset(), absl::StrCat("group ", field_number, " has no end"));
          int f = 0, w = 0;
          QF_RETURN_IF_ERROR(Tag(&f, &w));
          if (w == kEndGroup) {
            if (f != field_number) {
              return Invalid(offset(), absl::StrCat("group ", field_number, " closed by end-group ", f));
            }
            return absl::OkStatus();
          }
          QF_RETURN_IF_ERROR(Skip(f, w, depth + 1));
        }
      }
      case kEndGroup:
        return Invalid(offset(), absl::StrCat("end-group ", field_number, " without a start"));
      default:
        return Invalid(offset(), absl::StrCat("invalid wire type ", wire_type, " for field ", field_number));
    }
  }

 private:
  absl::Status Advance(size_t n, const char* what) {
    if (data_.size() - pos_ < n) return Invalid(offset(), absl::StrCat("truncated ", what, " (unknown field)"));
    pos_ += n;
    return absl::OkStatus();
  }

  std::string_view data_;
  size_t base_;
  size_t pos_ = 0;
};

// Walks a message's fields, handing each to fn(field, wire, reader) -> StatusOr<bool> (true when it consumed
// the value). A field with an unexpected wire type is skipped as unknown, which is what protobuf does.
template <typename Fn>
absl::Status ForEachField(std::string_view data, size_t base, Fn fn) {
  WireReader r(data, base);
  while (!r.done()) {
    int f = 0, w = 0;
    QF_RETURN_IF_ERROR(r.Tag(&f, &w));
    QF_ASSIGN_OR_RETURN(bool consumed, fn(f, w, r));
    if (!consumed) QF_RETURN_IF_ERROR(r.Skip(f, w));
  }
  return absl::OkStatus();
}

absl::Status ReadBool(WireReader& r, bool* out, const char* what) {
  uint64_t v = 0;
  QF_RETURN_IF_ERROR(r.Varint(&v, what));
  *out = v != 0;
  return absl::OkStatus();
}

// int32 and enum fields are varints; negative values are sign-extended to 64 bits on the wire and
// truncated back to 32, as protobuf does.
absl::Status ReadInt32(WireReader& r, int32_t* out, const char* what) {
  uint64_t v = 0;
  QF_RETURN_IF_ERROR(r.Varint(&v, what));
  *out = static_cast<int32_t>(static_cast<uint32_t>(v));
  return absl::OkStatus();
}

absl::Status ReadString(WireReader& r, std::string* out, const char* what) {
  std::string_view s;
  size_t at = 0;
  QF_RETURN_IF_ERROR(r.Bytes(&s, &at, what));
  out->assign(s);
  return absl::OkStatus();
}

struct Piece {
  std::string text;
  float score = 0.0f;
  int32_t type = kTypeNormal;
  size_t offset = 0;  // where its message starts, for errors
};

// Fields are proto2 optionals: absent means the default written here, and a later occurrence overwrites.
struct TrainerSpec {
  int32_t model_type = 1;  // UNIGRAM
  bool treat_whitespace_as_suffix = false;
  bool byte_fallback = false;
  int32_t unk_id = 0, bos_id = 1, eos_id = 2;
  std::string unk_piece, bos_piece, eos_piece;  // empty means "<unk>", "<s>", "</s>" (libsentencepiece's rule)
  std::optional<std::string> unk_surface;       // when set (even to ""), Decode's text for unk
};

struct NormalizerSpec {
  bool present = false;
  std::string name;
  size_t charsmap_bytes = 0;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

absl::Status ParsePiece(std::string_view data, size_t base, Piece* p) {
  p->offset = base;
  return ForEachField(data, base, [&](int f, int w, WireReader& r) -> absl::StatusOr<bool> {
    if (f == field::kPiece && w == kLengthDelimited) {
      QF_RETURN_IF_ERROR(ReadString(r, &p->text, "piece"));
    } else if (f == field::kScore && w == kFixed32) {
      uint32_t bits = 0;
      QF_RETURN_IF_ERROR(r.Fixed32(&bits, "score"));
      std::memcpy(&p->score, &bits, sizeof(float));
    } else if (f == field::kType && w == kVarint) {
      QF_RETURN_IF_ERROR(ReadInt32(r, &p->type, "type"));
    } else {
      return false;
    }
    return true;
  });
}

absl::Status ParseTrainerSpec(std::string_view data, size_t base, TrainerSpec* t) {
  return ForEachField(data, base, [&](int f, int w, WireReader& r) -> absl::StatusOr<bool> {
    if (w == kVarint) {
      switch (f) {
        case field::kModelType: QF_RETURN_IF_ERROR(ReadInt32(r, &t->model_type, "model_type")); return true;
        case field::kTreatWhitespaceAsSuffix:
          QF_RETURN_IF_ERROR(ReadBool(r, &t->treat_whitespace_as_suffix, "treat_whitespace_as_suffix"));
          return true;
        case field::kByteFallback: QF_RETURN_IF_ERROR(ReadBool(r, &t->byte_fallback, "byte_fallback")); return true;
        case field::kUnkId: QF_RETURN_IF_ERROR(ReadInt32(r, &t->unk_id, "unk_id")); return true;
        case field::kBosId: QF_RETURN_IF_ERROR(ReadInt32(r, &t->bos_id, "bos_id")); return true;
        case field::kEosId: QF_RETURN_IF_ERROR(ReadInt32(r, &t->eos_id, "eos_id")); return true;
        default: return false;
      }
    }
    if (w == kLengthDelimited) {
      switch (f) {
        case field::kUnkPiece: QF_RETURN_IF_ERROR(ReadString(r, &t->unk_piece, "unk_piece")); return true;
        case field::kBosPiece: QF_RETURN_IF_ERROR(ReadString(r, &t->bos_piece, "bos_piece")); return true;
        case field::kEosPiece: QF_RETURN_IF_ERROR(ReadString(r, &t->eos_piece, "eos_piece")); return true;
        case field::kUnkSurface:
          QF_RETURN_IF_ERROR(ReadString(r, &t->unk_surface.emplace(), "unk_surface"));
          return true;
        default: return false;
      }
    }
    return false;
  });
}

absl::Status ParseNormalizerSpec(std::string_view data, size_t base, NormalizerSpec* n) {
  n->present = true;
  return ForEachField(data, base, [&](int f, int w, WireReader& r) -> absl::StatusOr<bool> {
    if (w == kLengthDelimited && f == field::kName) {
      QF_RETURN_IF_ERROR(ReadString(r, &n->name, "normalizer name"));
    } else if (w == kLengthDelimited && f == field::kPrecompiledCharsmap) {
      std::string_view map;
      size_t at = 0;
      QF_RETURN_IF_ERROR(r.Bytes(&map, &at, "precompiled_charsmap"));
      n->charsmap_bytes = map.size();
    } else if (w == kVarint && f == field::kAddDummyPrefix) {
      QF_RETURN_IF_ERROR(ReadBool(r, &n->add_dummy_prefix, "add_dummy_prefix"));
    } else if (w == kVarint && f == field::kRemoveExtraWhitespaces) {
      QF_RETURN_IF_ERROR(ReadBool(r, &n->remove_extra_whitespaces, "remove_extra_whitespaces"));
    } else if (w == kVarint && f == field::kEscapeWhitespaces) {
      QF_RETURN_IF_ERROR(ReadBool(r, &n->escape_whitespaces, "escape_whitespaces"));
    } else {
      return false;
    }
    return true;
  });
}

absl::Status Unimplemented(absl::string_view what) {
  return absl::UnimplementedError(absl::StrCat("SentencePiece model: ", what));
}

// Rejects what VocabTokenizer (BPE by piece score over space-escaped text, nothing else) would not
// tokenize exactly as libsentencepiece does.
absl::Status CheckReproducible(const TrainerSpec& t, const NormalizerSpec& norm, const NormalizerSpec& denorm,
                               const std::vector<Piece>& pieces) {
  if (t.model_type != kBpe) {
    return Unimplemented(absl::StrCat("model_type is ", ModelTypeName(t.model_type), " (", t.model_type,
                                      "); only BPE models can be tokenized without libsentencepiece"));
  }
  if (norm.charsmap_bytes > 0) {
    return Unimplemented(absl::StrCat("normalizer \"", absl::CHexEscape(norm.name), "\" has a ", norm.charsmap_bytes,
                                      "-byte precompiled_charsmap; only models without character normalisation "
                                      "(such as Llama 2's \"identity\") are supported"));
  }
  if (!norm.escape_whitespaces) {
    return Unimplemented("escape_whitespaces is false; the tokenizer always escapes spaces to U+2581");
  }
  if (denorm.charsmap_bytes > 0) {
    return Unimplemented(absl::StrCat("denormalizer has a ", denorm.charsmap_bytes,
                                      "-byte precompiled_charsmap; decoding applies no character map"));
  }
  if (t.treat_whitespace_as_suffix) {
    return Unimplemented("treat_whitespace_as_suffix is true; the tokenizer puts the dummy space before words");
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (pieces[i].type == kTypeUserDefined) {
      return Unimplemented(absl::StrCat("piece ", i, " ", Quote(pieces[i].text),
                                        " is USER_DEFINED; libsentencepiece matches those before BPE, which "
                                        "this tokenizer does not"));
    }
    if (pieces[i].type == kTypeUnused) {
      return Unimplemented(absl::StrCat("piece ", i, " ", Quote(pieces[i].text),
                                        " is UNUSED; libsentencepiece merges through unused pieces and splits "
                                        "them again, which this tokenizer does not"));
    }
  }
  return absl::OkStatus();
}

// The special piece `id` named by TrainerSpec must exist, have `type`, and be spelled `name`: libsentencepiece
// finds BOS/EOS/UNK by name and type, the trainer places them at these ids, so a file where the two disagree
// is not one it wrote.
absl::Status CheckSpecial(const std::vector<Piece>& pieces, const char* what, int32_t id, int type,
                          const std::string& name_field, const char* default_name) {
  const std::string name = name_field.empty() ? default_name : name_field;
  if (id < 0) {
    return Unimplemented(absl::StrCat("trainer_spec.", what, " is ", id, " (disabled); the tokenizer needs a ",
                                      name, " piece"));
  }
  if (static_cast<size_t>(id) >= pieces.size()) {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece model: trainer_spec.", what, " ", id,
                                                   " is outside the ", pieces.size(), " pieces"));
  }
  const Piece& p = pieces[id];
  if (p.type != type || p.text != name) {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece model: trainer_spec.", what, " ", id, " is ",
                                                   PieceTypeName(p.type), " piece ", Quote(p.text), ", not the ",
                                                   PieceTypeName(type), " piece ", Quote(name)));
  }
  return absl::OkStatus();
}

// Structural checks libsentencepiece also makes (its InitializePieces), so that what loads here would load
// there; plus finite scores, which the merge order needs.
absl::Status CheckPieces(const TrainerSpec& t, const std::vector<Piece>& pieces) {
  if (pieces.empty()) return absl::InvalidArgumentError("SentencePiece model: no pieces");
  // Mergeable pieces and special (unknown/control/byte) pieces are looked up in separate tables there, so a
  // string may appear once in each.
  std::unordered_map<std::string_view, size_t> normal, special;
  bool byte_found[256] = {};
  int unknown_count = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& p = pieces[i];
    auto bad = [&](absl::string_view problem) {
      return Invalid(p.offset, absl::StrCat("piece ", i, " ", Quote(p.text), " ", problem));
    };
    if (p.type < kTypeNormal || p.type > kTypeByte) return bad(absl::StrCat("has unknown type ", p.type));
    if (p.text.empty()) return bad("is empty");
    if (p.text.size() >= kMaxPieceBytes) return bad(absl::StrCat("is ", p.text.size(), " bytes long"));
    if (p.text.find('\0') != std::string::npos) return bad("contains a NUL byte");
    if (std::isnan(p.score)) return bad("has a NaN score");
    auto& table = p.type == kTypeNormal ? normal : special;
    if (auto [it, inserted] = table.emplace(p.text, i); !inserted) {
      return bad(absl::StrCat("duplicates piece ", it->second));
    }
    if (p.type == kTypeUnknown) ++unknown_count;
    if (p.type == kTypeByte) {
      if (!t.byte_fallback) return bad("is BYTE but trainer_spec.byte_fallback is false");
      // libsentencepiece knows exactly the 256 spellings "<0x%02X>" (upper-case hex).
      const int b = ParseBytePiece(p.text);
      constexpr char kHex[] = "0123456789ABCDEF";
      if (b < 0 || p.text != std::string{'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'}) {
        return bad("is BYTE but not spelled <0xNN>");
      }
      byte_found[b] = true;
    }
  }
  if (unknown_count != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SentencePiece model: ", unknown_count, " UNKNOWN pieces (there must be exactly one)"));
  }
  if (t.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      if (!byte_found[b]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "SentencePiece model: byte_fallback is true but there is no byte piece for 0x", absl::Hex(b, absl::kZeroPad2)));
      }
    }
  }
  QF_RETURN_IF_ERROR(CheckSpecial(pieces, "unk_id", t.unk_id, kTypeUnknown, t.unk_piece, "<unk>"));
  QF_RETURN_IF_ERROR(CheckSpecial(pieces, "bos_id", t.bos_id, kTypeControl, t.bos_piece, "<s>"));
  QF_RETURN_IF_ERROR(CheckSpecial(pieces, "eos_id", t.eos_id, kTypeControl, t.eos_piece, "</s>"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Vocab> ParseSentencePieceModel(std::string_view serialized) {
  // An empty message is valid protobuf, but not a model: say so plainly rather than "no pieces".
  if (serialized.empty()) return absl::InvalidArgumentError("SentencePiece model: empty file");
  if (serialized.size() > kMaxModelBytes) {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece model: ", serialized.size(),
                                                   " bytes is more than the ", kMaxModelBytes, " allowed"));
  }
  std::vector<Piece> pieces;
  TrainerSpec trainer;
  NormalizerSpec normalizer, denormalizer;
  QF_RETURN_IF_ERROR(ForEachField(serialized, 0, [&](int f, int w, WireReader& r) -> absl::StatusOr<bool> {
    if (w != kLengthDelimited) return false;
    const size_t tag_end = r.offset();
    std::string_view msg;
    size_t at = 0;
    switch (f) {
      case field::kPieces:
        // Vectors grow with pieces actually present (each takes bytes of the file), never with a claimed count.
        if (pieces.size() >= kMaxPieces) {
          return Invalid(tag_end, absl::StrCat("more than ", kMaxPieces, " pieces"));
        }
        QF_RETURN_IF_ERROR(r.Bytes(&msg, &at, "piece message"));
        pieces.emplace_back();
        QF_RETURN_IF_ERROR(ParsePiece(msg, at, &pieces.back()));
        return true;
      // A message field that occurs more than once is merged into one, as protobuf parsing does.
      case field::kTrainerSpec:
        QF_RETURN_IF_ERROR(r.Bytes(&msg, &at, "trainer_spec"));
        QF_RETURN_IF_ERROR(ParseTrainerSpec(msg, at, &trainer));
        return true;
      case field::kNormalizerSpec:
        QF_RETURN_IF_ERROR(r.Bytes(&msg, &at, "normalizer_spec"));
        QF_RETURN_IF_ERROR(ParseNormalizerSpec(msg, at, &normalizer));
        return true;
      case field::kDenormalizerSpec:
        QF_RETURN_IF_ERROR(r.Bytes(&msg, &at, "denormalizer_spec"));
        QF_RETURN_IF_ERROR(ParseNormalizerSpec(msg, at, &denormalizer));
        return true;
      default:
        return false;
    }
  }));
  QF_RETURN_IF_ERROR(CheckReproducible(trainer, normalizer, denormalizer, pieces));
  QF_RETURN_IF_ERROR(CheckPieces(trainer, pieces));

  Vocab out;
  out.model = "llama";
  out.tokens.reserve(pieces.size());
  out.scores.reserve(pieces.size());
  out.types.reserve(pieces.size());
  for (Piece& p : pieces) {
    out.tokens.push_back(std::move(p.text));
    out.scores.push_back(p.score);
    out.types.push_back(static_cast<TokenType>(p.type));  // same numbering, checked in CheckPieces
  }
  out.unk_id = trainer.unk_id;
  out.bos_id = trainer.bos_id;
  out.eos_id = trainer.eos_id;
  out.normalizer.add_dummy_prefix = normalizer.add_dummy_prefix;
  out.normalizer.remove_extra_whitespaces = normalizer.remove_extra_whitespaces;
  if (trainer.unk_surface.has_value()) out.normalizer.unk_surface = *trainer.unk_surface;
  return out;
}

absl::StatusOr<Vocab> ReadSentencePieceModel(const std::string& path) {
  QF_ASSIGN_OR_RETURN(std::shared_ptr<const MappedFile> file, MappedFile::Open(path));
  absl::StatusOr<Vocab> m = ParseSentencePieceModel(
      std::string_view(reinterpret_cast<const char*>(file->data()), file->size()));
  if (!m.ok()) return absl::Status(m.status().code(), absl::StrCat(path, ": ", m.status().message()));
  return m;
}

namespace {

// Protobuf wire-format encoding of the few field kinds a ModelProto needs.
void PutVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}
void PutTag(int field_number, int wire_type, std::string* out) {
  PutVarint((static_cast<uint64_t>(field_number) << 3) | static_cast<uint64_t>(wire_type), out);
}
void PutBytes(int field_number, std::string_view bytes, std::string* out) {
  PutTag(field_number, kLengthDelimited, out);
  PutVarint(bytes.size(), out);
  out->append(bytes);
}
// int32 fields: negative values are sign-extended to ten bytes, as protobuf writes them.
void PutInt32(int field_number, int32_t v, std::string* out) {
  PutTag(field_number, kVarint, out);
  PutVarint(static_cast<uint64_t>(static_cast<int64_t>(v)), out);
}
void PutFloat(int field_number, float v, std::string* out) {
  PutTag(field_number, kFixed32, out);
  uint32_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
}

}  // namespace

absl::StatusOr<std::string> SerializeSentencePieceModel(const Vocab& vocab) {
  if (vocab.model != "llama") {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece model: tokenizer model '", vocab.model,
                                                   "' is not SentencePiece BPE ('llama')"));
  }
  const size_t n = vocab.tokens.size();
  if (n == 0 || vocab.scores.size() != n || vocab.types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece model: ", n, " tokens, ", vocab.scores.size(),
                                                   " scores and ", vocab.types.size(), " types"));
  }
  std::string out;
  bool has_bytes = false;
  for (size_t i = 0; i < n; ++i) {
    std::string piece;
    PutBytes(field::kPiece, vocab.tokens[i], &piece);
    PutFloat(field::kScore, vocab.scores[i], &piece);
    // NORMAL is the proto default and is left out, as libsentencepiece's trainer writes it.
    const int type = static_cast<int>(vocab.types[i]);
    if (type != kTypeNormal) PutInt32(field::kType, type, &piece);
    has_bytes |= vocab.types[i] == TokenType::kByte;
    PutBytes(field::kPieces, piece, &out);
  }
  std::string trainer;
  PutInt32(field::kModelType, kBpe, &trainer);
  if (has_bytes) {
    PutTag(field::kByteFallback, kVarint, &trainer);
    PutVarint(1, &trainer);
  }
  PutInt32(field::kUnkId, vocab.unk_id, &trainer);
  PutInt32(field::kBosId, vocab.bos_id, &trainer);
  PutInt32(field::kEosId, vocab.eos_id, &trainer);
  // The special pieces keep their own spelling (libsentencepiece finds them by name).
  auto special = [&](int id, int field_number) {
    if (id >= 0 && static_cast<size_t>(id) < n) PutBytes(field_number, vocab.tokens[id], &trainer);
  };
  special(vocab.unk_id, field::kUnkPiece);
  special(vocab.bos_id, field::kBosPiece);
  special(vocab.eos_id, field::kEosPiece);
  if (vocab.normalizer.unk_surface != VocabNormalizer{}.unk_surface) {
    PutBytes(field::kUnkSurface, vocab.normalizer.unk_surface, &trainer);
  }
  PutBytes(field::kTrainerSpec, trainer, &out);
  std::string norm;
  PutBytes(field::kName, "identity", &norm);
  PutTag(field::kAddDummyPrefix, kVarint, &norm);
  PutVarint(vocab.normalizer.add_dummy_prefix ? 1 : 0, &norm);
  PutTag(field::kRemoveExtraWhitespaces, kVarint, &norm);
  PutVarint(vocab.normalizer.remove_extra_whitespaces ? 1 : 0, &norm);
  PutTag(field::kEscapeWhitespaces, kVarint, &norm);
  PutVarint(1, &norm);
  PutBytes(field::kNormalizerSpec, norm, &out);
  return out;
}

absl::Status WriteSentencePieceModel(const Vocab& vocab, const std::string& path) {
  QF_ASSIGN_OR_RETURN(std::string bytes, SerializeSentencePieceModel(vocab));
  return WriteFileAtomically(path, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()),
                                                             bytes.size()));
}

}  // namespace qforge::formats
