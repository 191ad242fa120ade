// GGUF v2/v3 (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, the key/value
// pairs, the tensor infos, padding to general.alignment, then the tensor data. v2 and v3 share this
// layout (v3 only added big-endian files, which we do not read).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/half.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/formats/byte_reader.h"
#include "core/formats/formats.h"
#include "core/formats/parsers.h"
#include "core/model/ggml_types.h"

namespace qforge::formats {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as little-endian u32
constexpr uint32_t kDefaultAlignment = 32;
constexpr uint32_t kMaxAlignment = 1u << 16;
constexpr uint64_t kMaxKeyBytes = 1u << 16;
constexpr uint64_t kMaxNameBytes = 1u << 12;
constexpr uint32_t kMaxDims = 4;

// gguf_type: the value types of the key/value section.
enum GgufType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

const char* GgufTypeName(uint32_t t) {
  static const char* kNames[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                                 "string", "array", "u64", "i64", "f64"};
  return t <= kF64 ? kNames[t] : "unknown";
}

// Bytes of one fixed-size value; 0 for string/array.
size_t ScalarSize(uint32_t t) {
  switch (t) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: return 8;
    default: return 0;
  }
}

// Names of ggml types qforge knows of but does not read, for clearer errors. The types it reads are the rows
// of core/model/ggml_types.h (ids as ggml.h's enum ggml_type).
const char* OtherGgmlTypeName(uint32_t t) {
  switch (t) {
    case 9: return "q8_1";
    case 15: return "q8_k";
    case 24: return "i8";
    case 25: return "i16";
    case 26: return "i32";
    case 27: return "i64";
    case 28: return "f64";
    case 40: return "nvfp4";
    case 41: return "q1_0";
    case 42: return "q2_0";
    default: return nullptr;
  }
}

absl::StatusOr<WeightFormat> FormatOfGgml(uint32_t t, const std::string& tensor) {
  if (const GgmlTypeTraits* g = FindGgmlTypeById(t)) return WeightFormat::Of(g->type);
  if (const char* name = OtherGgmlTypeName(t)) {
    return absl::UnimplementedError(absl::StrCat("gguf: tensor '", tensor, "' has ggml type ", t, " (", name,
                                                 "), which is not supported"));
  }
  return absl::InvalidArgumentError(absl::StrCat("gguf: tensor '", tensor, "' has unknown ggml type ", t));
}

absl::StatusOr<uint32_t> GgmlOfFormat(const WeightFormat& f, const std::string& tensor) {
  if (const GgmlTypeTraits* g = FindGgmlType(f.type)) return g->ggml_id;
  return absl::InvalidArgumentError(absl::StrCat("gguf: tensor '", tensor, "' is ", FormatName(f),
                                                 ", which GGUF has no type for (write safetensors instead)"));
}

// One metadata value. Scalars are decoded; numeric arrays are kept as a view of the file bytes.
struct Value {
  uint32_t type = 0;
  uint64_t u = 0;   // unsigned scalars and bool
  int64_t i = 0;    // signed scalars
  double f = 0;     // f32/f64
  std::string s;
  uint32_t elem_type = 0;               // arrays
  uint64_t count = 0;                   // arrays
  const uint8_t* raw = nullptr;         // numeric array elements
  std::vector<std::string> strings;     // string array elements
};

class GgufParser {
 public:
  GgufParser(std::span<const uint8_t> bytes) : r_(bytes, "gguf") {}

  absl::Status ReadGgufString(std::string* out, uint64_t max, const char* what) {
    uint64_t len = 0;
    QF_RETURN_IF_ERROR(r_.Read(&len, what));
    if (len > max) return Bad(absl::StrCat(what, " length ", len, " exceeds the limit of ", max));
    return r_.ReadString(len, out, what);
  }

  absl::Status ReadScalar(uint32_t type, Value* v) {
    switch (type) {
      case kU8: { uint8_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "u8 value")); v->u = x; v->i = x; return absl::OkStatus(); }
      case kI8: { int8_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "i8 value")); v->i = x; return absl::OkStatus(); }
      case kU16: { uint16_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "u16 value")); v->u = x; v->i = x; return absl::OkStatus(); }
      case kI16: { int16_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "i16 value")); v->i = x; return absl::OkStatus(); }
      case kU32: { uint32_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "u32 value")); v->u = x; v->i = x; return absl::OkStatus(); }
      case kI32: { int32_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "i32 value")); v->i = x; return absl::OkStatus(); }
      case kU64: { uint64_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "u64 value")); v->u = x; return absl::OkStatus(); }
      case kI64: { int64_t x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "i64 value")); v->i = x; return absl::OkStatus(); }
      case kF32: { float x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "f32 value")); v->f = x; return absl::OkStatus(); }
      case kF64: { double x = 0; QF_RETURN_IF_ERROR(r_.Read(&x, "f64 value")); v->f = x; return absl::OkStatus(); }
      case kBool: {
        uint8_t x = 0;
        QF_RETURN_IF_ERROR(r_.Read(&x, "bool value"));
        if (x > 1) return Bad(absl::StrCat("bool value ", int{x}, " is neither 0 nor 1"));
        v->u = x;
        return absl::OkStatus();
      }
    }
    return absl::InternalError("gguf: ReadScalar on a non-scalar type");
  }

  absl::Status ReadValue(uint32_t type, const std::string& key, Value* v) {
    v->type = type;
    if (type == kString) return ReadGgufString(&v->s, r_.remaining(), "string value");
    if (type == kArray) {
      QF_RETURN_IF_ERROR(r_.Read(&v->elem_type, "array type"));
      QF_RETURN_IF_ERROR(r_.Read(&v->count, "array length"));
      if (v->elem_type == kArray) return Bad(absl::StrCat("key '", key, "' holds nested arrays, which are not supported"));
      if (v->elem_type == kString) {
        // Each string takes at least its 8-byte length: bounds the count before reserving.
        if (v->count > r_.remaining() / 8) {
          return Bad(absl::StrCat("key '", key, "' array length ", v->count, " exceeds the remaining ", r_.remaining(),
                                  " bytes"));
        }
        v->strings.reserve(static_cast<size_t>(v->count));
        for (uint64_t k = 0; k < v->count; ++k) {
          std::string s;
          QF_RETURN_IF_ERROR(ReadGgufString(&s, r_.remaining(), "array string"));
          v->strings.push_back(std::move(s));
        }
        return absl::OkStatus();
      }
      const size_t es = ScalarSize(v->elem_type);
      if (es == 0) return Bad(absl::StrCat("key '", key, "' has unknown array element type ", v->elem_type));
      uint64_t bytes = 0;
      if (!MulOk(v->count, es, &bytes) || bytes > r_.remaining()) {
        return Bad(absl::StrCat("key '", key, "' array of ", v->count, " x ", GgufTypeName(v->elem_type),
                                " exceeds the remaining ", r_.remaining(), " bytes"));
      }
      v->raw = r_.cursor();
      if (v->elem_type == kBool) {
        for (uint64_t k = 0; k < v->count; ++k) {
          if (v->raw[k] > 1) return Bad(absl::StrCat("key '", key, "' has a bool array element that is not 0 or 1"));
        }
      }
      return r_.Skip(bytes, "array data");
    }
    if (ScalarSize(type) == 0) return Bad(absl::StrCat("key '", key, "' has unknown value type ", type));
    return ReadScalar(type, v);
  }

  absl::StatusOr<Model> Parse(std::shared_ptr<const void> owner) {
    QF_ASSIGN_OR_RETURN(Model m, ParseTensors(std::move(owner)));
    QF_RETURN_IF_ERROR(FillConfig(&m));
    QF_RETURN_IF_ERROR(SplitExperts(&m));
    QF_RETURN_IF_ERROR(FillVocab(&m));
    if (const Value* v = Find("general.name"); v != nullptr && v->type == kString) m.metadata["general.name"] = v->s;
    if (const Value* v = Find("general.file_type"); v != nullptr && v->type == kU32) {
      m.metadata["general.file_type"] = absl::StrCat(v->u);
    }
    if (const Value* v = Find(kChatTemplateKey); v != nullptr && v->type == kString) m.metadata[kChatTemplateKey] = v->s;
    m.metadata["source.format"] = "gguf";
    QF_RETURN_IF_ERROR(ValidateModel(m));
    return m;
  }

  // llama-imatrix's output: general.type "imatrix", and per weight W the f32 tensors W.in_sum2 [experts, cols]
  // (the sums of each input column's squares) and W.counts [experts, 1] (the tokens each sum is over).
  absl::StatusOr<ImportanceMatrix> ParseImatrix() {
    QF_ASSIGN_OR_RETURN(const Model m, ParseTensors(nullptr));
    const Value* type = Find("general.type");
    if (type == nullptr || type->type != kString || type->s != "imatrix") {
      return Bad("general.type is not \"imatrix\": not an importance matrix (llama-imatrix writes one)");
    }
    ImportanceMatrix out;
    if (const Value* d = Find("imatrix.datasets"); d != nullptr && d->type == kArray) out.datasets = d->strings;
    QF_RETURN_IF_ERROR(GetInt("imatrix.chunk_count", &out.chunk_count, false));
    QF_RETURN_IF_ERROR(GetInt("imatrix.chunk_size", &out.chunk_size, false));
    const std::string kSums = ".in_sum2", kCounts = ".counts";
    for (const auto& [name, t] : m.tensors) {
      if (!name.ends_with(kSums)) {
        if (name.ends_with(kCounts) && m.Find(name.substr(0, name.size() - kCounts.size()) + kSums)) {
          continue;
        }
        return Bad(absl::StrCat("tensor '", name, "' is neither a W.in_sum2 nor a W.counts"));
      }
      const std::string weight = name.substr(0, name.size() - kSums.size());
      const Tensor* counts = m.Find(weight + kCounts);
      if (counts == nullptr) return Bad(absl::StrCat("tensor '", name, "' has no '", weight, kCounts, "'"));
      if (t.format.type != WeightType::kF32 || counts->format.type != WeightType::kF32) {
        return Bad(absl::StrCat("'", weight, "': in_sum2 and counts must be f32"));
      }
      const int64_t experts = t.shape.size() == 1 ? 1 : t.rows(), cols = t.cols();
      if (t.shape.size() > 2 || counts->numel() != experts || cols == 0 || experts == 0) {
        return Bad(absl::StrCat("'", weight, "': in_sum2 [", absl::StrJoin(t.shape, ", "), "] and counts [",
                                absl::StrJoin(counts->shape, ", "), "] do not match (want [experts, cols], [experts, 1])"));
      }
      ImportanceMatrix::Entry e;
      e.cols = cols;
      e.experts = experts;
      e.tokens.resize(static_cast<size_t>(experts));
      e.sum_squares.resize(static_cast<size_t>(experts * cols));
      std::memcpy(e.tokens.data(), counts->data, sizeof(float) * e.tokens.size());
      std::memcpy(e.sum_squares.data(), t.data, sizeof(float) * e.sum_squares.size());
      for (const float n : e.tokens) {
        if (!(n >= 0) || !std::isfinite(n)) return Bad(absl::StrCat("'", weight, "': count ", n, " is not a count"));
      }
      for (size_t k = 0; k < e.sum_squares.size(); ++k) {
        const float v = e.sum_squares[k];
        if (!(v >= 0) || !std::isfinite(v)) {
          return Bad(absl::StrCat("'", weight, "': sum of squares ", v, " at column ", k % cols, " is not >= 0"));
        }
      }
      out.entries.emplace(weight, std::move(e));
    }
    return out;
  }

 private:
  // The header, key/value pairs and tensor infos, checked, and every tensor as a view of the bytes; no
  // configuration is read.
  absl::StatusOr<Model> ParseTensors(std::shared_ptr<const void> owner) {
    uint32_t magic = 0, version = 0;
    uint64_t n_tensors = 0, n_kv = 0;
    QF_RETURN_IF_ERROR(r_.Read(&magic, "magic"));
    if (magic != kMagic) return Bad(absl::StrCat("bad magic 0x", absl::Hex(magic, absl::kZeroPad8), ", not \"GGUF\""));
    QF_RETURN_IF_ERROR(r_.Read(&version, "version"));
    if (version != 2 && version != 3) return Bad(absl::StrCat("unsupported version ", version, " (2 and 3 are read)"));
    QF_RETURN_IF_ERROR(r_.Read(&n_tensors, "tensor_count"));
    QF_RETURN_IF_ERROR(r_.Read(&n_kv, "kv_count"));
    // Smallest possible encodings: a KV is an 8-byte key length + 4-byte type + 1-byte value; a tensor
    // info is 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
    if (n_kv > r_.remaining() / 13) {
      return Bad(absl::StrCat("kv_count ", n_kv, " cannot fit in the remaining ", r_.remaining(), " bytes"));
    }
    if (n_tensors > r_.remaining() / 32) {
      return Bad(absl::StrCat("tensor_count ", n_tensors, " cannot fit in the remaining ", r_.remaining(), " bytes"));
    }
    for (uint64_t k = 0; k < n_kv; ++k) {
      std::string key;
      QF_RETURN_IF_ERROR(ReadGgufString(&key, kMaxKeyBytes, "key"));
      uint32_t type = 0;
      QF_RETURN_IF_ERROR(r_.Read(&type, "value type"));
      Value v;
      QF_RETURN_IF_ERROR(ReadValue(type, key, &v));
      if (!kv_.emplace(key, std::move(v)).second) return Bad(absl::StrCat("duplicate key '", key, "'"));
    }

    uint64_t alignment = kDefaultAlignment;
    if (const Value* a = Find("general.alignment")) {
      if (a->type != kU32) return Bad("general.alignment is not a u32");
      alignment = a->u;
      if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > kMaxAlignment) {
        return Bad(absl::StrCat("general.alignment ", alignment, " is not a power of two up to ", kMaxAlignment));
      }
    }

    struct Info {
      std::string name;
      std::vector<int64_t> shape;  // outermost first (reversed ne)
      WeightFormat format;
      uint64_t offset;
      size_t nbytes;
    };
    std::vector<Info> infos;
    infos.reserve(static_cast<size_t>(n_tensors));
    std::set<std::string> seen;
    for (uint64_t k = 0; k < n_tensors; ++k) {
      Info info;
      QF_RETURN_IF_ERROR(ReadGgufString(&info.name, kMaxNameBytes, "tensor name"));
      if (!seen.insert(info.name).second) return Bad(absl::StrCat("duplicate tensor name '", info.name, "'"));
      uint32_t n_dims = 0;
      QF_RETURN_IF_ERROR(r_.Read(&n_dims, "n_dims"));
      if (n_dims == 0 || n_dims > kMaxDims) {
        return Bad(absl::StrCat("tensor '", info.name, "' has ", n_dims, " dimensions (1 to ", kMaxDims, " allowed)"));
      }
      uint64_t ne[kMaxDims] = {};
      uint64_t numel = 1;
      for (uint32_t d = 0; d < n_dims; ++d) {
        QF_RETURN_IF_ERROR(r_.Read(&ne[d], "tensor dimension"));
        if (ne[d] > static_cast<uint64_t>(INT64_MAX) || !MulOk(numel, ne[d], &numel) || numel > (uint64_t{1} << 48)) {
          return Bad(absl::StrCat("tensor '", info.name, "' shape overflows"));
        }
      }
      for (uint32_t d = n_dims; d-- > 0;) info.shape.push_back(static_cast<int64_t>(ne[d]));
      uint32_t type = 0;
      QF_RETURN_IF_ERROR(r_.Read(&type, "tensor type"));
      QF_ASSIGN_OR_RETURN(info.format, FormatOfGgml(type, info.name));
      QF_RETURN_IF_ERROR(r_.Read(&info.offset, "tensor offset"));
      if (info.offset % alignment != 0) {
        return Bad(absl::StrCat("tensor '", info.name, "' offset ", info.offset, " is not a multiple of the alignment ",
                                alignment));
      }
      const int64_t cols = info.shape.back();
      const int64_t rows = cols == 0 ? 0 : static_cast<int64_t>(numel) / cols;
      auto need = EncodedBytes(info.format, rows, cols);
      if (!need.ok()) return Bad(absl::StrCat("tensor '", info.name, "': ", need.status().message()));
      info.nbytes = *need;
      infos.push_back(std::move(info));
    }
    const uint64_t data_start = (r_.pos() + alignment - 1) / alignment * alignment;
    if (data_start > r_.size() && !infos.empty()) {
      return Bad(absl::StrCat("data section at ", data_start, " is past the end of the file (", r_.size(), " bytes)"));
    }

    Model m;
    for (const Info& info : infos) {
      uint64_t begin = 0, end = 0;
      if (!AddOk(data_start, info.offset, &begin) || !AddOk(begin, info.nbytes, &end) || end > r_.size()) {
        return Bad(absl::StrCat("tensor '", info.name, "' offset ", info.offset, " + ", info.nbytes,
                                " bytes is past the end of the file (", r_.size(), " bytes)"));
      }
      const uint8_t* data = r_.bytes().data() + begin;
      m.tensors.emplace(info.name, Tensor::View(info.name, info.shape, info.format, owner, data, info.nbytes));
    }
    QF_RETURN_IF_ERROR(CheckNoOverlap(m));
    return m;
  }

  absl::Status Bad(const std::string& what) const { return absl::InvalidArgumentError(absl::StrCat("gguf: ", what)); }

  const Value* Find(const std::string& key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
  }

  static bool IsInteger(uint32_t t) {
    return t == kU8 || t == kI8 || t == kU16 || t == kI16 || t == kU32 || t == kI32 || t == kU64 || t == kI64;
  }

  // An integer key's value as int (any integer type), bounded to [0, INT32_MAX].
  absl::Status GetInt(const std::string& key, int* out, bool required) const {
    const Value* v = Find(key);
    if (v == nullptr) return required ? Bad(absl::StrCat("missing required key '", key, "'")) : absl::OkStatus();
    if (!IsInteger(v->type)) return Bad(absl::StrCat("key '", key, "' is a ", GgufTypeName(v->type), ", not an integer"));
    const bool is_unsigned = v->type == kU8 || v->type == kU16 || v->type == kU32 || v->type == kU64;
    const bool neg = !is_unsigned && v->i < 0;
    const uint64_t mag = is_unsigned ? v->u : static_cast<uint64_t>(v->i);
    if (neg || mag > static_cast<uint64_t>(INT32_MAX)) return Bad(absl::StrCat("key '", key, "' is out of range"));
    *out = static_cast<int>(mag);
    return absl::OkStatus();
  }

  absl::Status GetFloat(const std::string& key, float* out) const {
    const Value* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (v->type != kF32 && v->type != kF64) return Bad(absl::StrCat("key '", key, "' is not a float"));
    *out = static_cast<float>(v->f);
    return absl::OkStatus();
  }

  absl::Status CheckNoOverlap(const Model& m) const {
    std::vector<const Tensor*> ts;
    for (const auto& [n, t] : m.tensors) {
      if (t.nbytes > 0) ts.push_back(&t);
    }
    std::sort(ts.begin(), ts.end(), [](const Tensor* a, const Tensor* b) { return a->data < b->data; });
    for (size_t k = 1; k < ts.size(); ++k) {
      if (ts[k]->data < ts[k - 1]->data + ts[k - 1]->nbytes) {
        return Bad(absl::StrCat("tensors '", ts[k - 1]->name, "' and '", ts[k]->name, "' overlap"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status FillConfig(Model* m) const {
    const Value* arch = Find("general.architecture");
    if (arch == nullptr) return Bad("missing required key 'general.architecture'");
    if (arch->type != kString || arch->s != "llama") {
      return Bad(absl::StrCat("general.architecture '", arch->s, "' is not supported (llama only)"));
    }
    ModelConfig& c = m->config;
    c.arch = "llama";
    QF_RETURN_IF_ERROR(GetInt("llama.embedding_length", &c.dim, true));
    QF_RETURN_IF_ERROR(GetInt("llama.feed_forward_length", &c.hidden_dim, true));
    QF_RETURN_IF_ERROR(GetInt("llama.block_count", &c.n_layers, true));
    QF_RETURN_IF_ERROR(GetInt("llama.attention.head_count", &c.n_heads, true));
    c.n_kv_heads = c.n_heads;
    QF_RETURN_IF_ERROR(GetInt("llama.attention.head_count_kv", &c.n_kv_heads, false));
    QF_RETURN_IF_ERROR(GetInt("llama.context_length", &c.seq_len, true));
    QF_RETURN_IF_ERROR(GetInt("llama.expert_count", &c.n_experts, false));
    QF_RETURN_IF_ERROR(GetInt("llama.expert_used_count", &c.n_experts_used, false));
    c.norm_eps = 1e-5f;
    QF_RETURN_IF_ERROR(GetFloat("llama.attention.layer_norm_rms_epsilon", &c.norm_eps));
    c.rope_theta = 10000.0f;
    QF_RETURN_IF_ERROR(GetFloat("llama.rope.freq_base", &c.rope_theta));
    c.vocab_size = 0;
    QF_RETURN_IF_ERROR(GetInt("llama.vocab_size", &c.vocab_size, false));
    if (c.vocab_size == 0) {
      if (const Value* toks = Find("tokenizer.ggml.tokens"); toks != nullptr && toks->type == kArray) {
        c.vocab_size = static_cast<int>(std::min<uint64_t>(toks->count, INT32_MAX));
      } else if (const Tensor* emb = m->Find(names::kTokenEmbd); emb != nullptr && emb->shape.size() == 2) {
        c.vocab_size = static_cast<int>(std::min<int64_t>(emb->shape[0], INT32_MAX));
      }
    }
    if (c.n_heads > 0) {
      int rope_dims = c.dim / c.n_heads;
      QF_RETURN_IF_ERROR(GetInt("llama.rope.dimension_count", &rope_dims, false));
      if (rope_dims != c.dim / c.n_heads) {
        return absl::UnimplementedError(absl::StrCat("gguf: llama.rope.dimension_count ", rope_dims,
                                                     " differs from the head size ", c.dim / c.n_heads));
      }
    }
    c.tied_embeddings = m->Find(names::kOutput) == nullptr;
    if (absl::Status s = ValidateConfig(c); !s.ok()) return Bad(std::string(s.message()));
    return absl::OkStatus();
  }

  // llama.cpp stacks each layer's experts into one 3-D tensor [n_experts, rows, cols]; qforge keeps one matrix
  // per expert. Every ggml type is a sequence of row blocks, so expert e is the contiguous e-th slice: a view.
  absl::Status SplitExperts(Model* m) const {
    const ModelConfig& c = m->config;
    if (!c.is_moe()) return absl::OkStatus();
    for (int l = 0; l < c.n_layers; ++l) {
      for (const auto& [stacked, expert_name] : StackedExpertNames(l)) {
        auto it = m->tensors.find(stacked);
        if (it == m->tensors.end()) return Bad(absl::StrCat("MoE model has no tensor '", stacked, "'"));
        const Tensor t = std::move(it->second);
        m->tensors.erase(it);
        if (t.shape.size() != 3 || t.shape[0] != c.n_experts) {
          return Bad(absl::StrCat("tensor '", stacked, "' has shape [", absl::StrJoin(t.shape, ", "), "], expected [",
                                  c.n_experts, ", rows, cols]"));
        }
        const size_t slice = t.nbytes / static_cast<size_t>(c.n_experts);
        for (int e = 0; e < c.n_experts; ++e) {
          const std::string name = expert_name(l, e);
          m->tensors.emplace(name, Tensor::View(name, {t.shape[1], t.shape[2]}, t.format, t.owner,
                                                t.data + slice * static_cast<size_t>(e), slice));
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status FillVocab(Model* m) const {
    const Value* tokens = Find("tokenizer.ggml.tokens");
    if (tokens == nullptr) return absl::OkStatus();
    if (tokens->type != kArray || tokens->elem_type != kString) return Bad("tokenizer.ggml.tokens is not a string array");
    Vocab v;
    if (const Value* model = Find("tokenizer.ggml.model")) {
      if (model->type != kString) return Bad("tokenizer.ggml.model is not a string");
      v.model = model->s;
    }
    v.tokens = tokens->strings;
    const size_t n = v.tokens.size();
    v.scores.assign(n, 0.0f);
    v.types.assign(n, TokenType::kNormal);
    if (const Value* s = Find("tokenizer.ggml.scores")) {
      if (s->type != kArray || s->elem_type != kF32 || s->count != n) {
        return Bad(absl::StrCat("tokenizer.ggml.scores is not an f32 array of ", n, " entries"));
      }
      std::memcpy(v.scores.data(), s->raw, n * 4);
    }
    if (const Value* t = Find("tokenizer.ggml.token_type")) {
      if (t->type != kArray || t->elem_type != kI32 || t->count != n) {
        return Bad(absl::StrCat("tokenizer.ggml.token_type is not an i32 array of ", n, " entries"));
      }
      for (size_t k = 0; k < n; ++k) {
        int32_t x = 0;
        std::memcpy(&x, t->raw + 4 * k, 4);
        if (x < static_cast<int32_t>(TokenType::kNormal) || x > static_cast<int32_t>(TokenType::kByte)) {
          return Bad(absl::StrCat("token ", k, " has unknown token type ", x));
        }
        v.types[k] = static_cast<TokenType>(x);
      }
    }
    auto id = [&](const char* key, int* out) -> absl::Status {
      QF_RETURN_IF_ERROR(GetInt(key, out, false));
      if (static_cast<size_t>(*out) >= n) return Bad(absl::StrCat(key, " ", *out, " is not a token id (", n, " tokens)"));
      return absl::OkStatus();
    };
    QF_RETURN_IF_ERROR(id("tokenizer.ggml.bos_token_id", &v.bos_id));
    QF_RETURN_IF_ERROR(id("tokenizer.ggml.eos_token_id", &v.eos_id));
    QF_RETURN_IF_ERROR(id("tokenizer.ggml.unknown_token_id", &v.unk_id));
    // llama.cpp's names for the SentencePiece normaliser flags; absent means the Llama defaults.
    auto flag = [&](const char* key, bool* out) -> absl::Status {
      const Value* f = Find(key);
      if (f == nullptr) return absl::OkStatus();
      if (f->type != kBool) return Bad(absl::StrCat(key, " is not a bool"));
      *out = f->u != 0;
      return absl::OkStatus();
    };
    QF_RETURN_IF_ERROR(flag("tokenizer.ggml.add_space_prefix", &v.normalizer.add_dummy_prefix));
    QF_RETURN_IF_ERROR(flag("tokenizer.ggml.remove_extra_whitespaces", &v.normalizer.remove_extra_whitespaces));
    m->vocab = std::move(v);
    return absl::OkStatus();
  }

  ByteReader r_;
  std::map<std::string, Value> kv_;
};

// --- writer ---------------------------------------------------------------------------------------------

class Writer {
 public:
  std::vector<uint8_t>& out() { return out_; }
  template <typename T>
  void Put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out_.insert(out_.end(), p, p + sizeof(T));
  }
  void PutString(const std::string& s) {
    Put<uint64_t>(s.size());
    out_.insert(out_.end(), s.begin(), s.end());
  }
  void KeyString(const std::string& k, const std::string& v) { Key(k, kString); PutString(v); }
  void KeyU32(const std::string& k, uint32_t v) { Key(k, kU32); Put(v); }
  void KeyBool(const std::string& k, bool v) { Key(k, kBool); Put(static_cast<uint8_t>(v ? 1 : 0)); }
  void KeyF32(const std::string& k, float v) { Key(k, kF32); Put(v); }
  void Key(const std::string& k, uint32_t type) {
    PutString(k);
    Put<uint32_t>(type);
    ++kv_count_;
  }
  void Pad(size_t alignment) { out_.resize((out_.size() + alignment - 1) / alignment * alignment, 0); }
  uint64_t kv_count() const { return kv_count_; }

 private:
  std::vector<uint8_t> out_;
  uint64_t kv_count_ = 0;
};

// A GGUF v3 file's start: magic, version, the counts, then the key/value pairs of kv; the tensor infos follow.
Writer GgufHeader(uint64_t n_tensors, Writer& kv) {
  Writer w;
  w.Put<uint32_t>(kMagic);
  w.Put<uint32_t>(3);
  w.Put<uint64_t>(n_tensors);
  w.Put<uint64_t>(kv.kv_count());
  w.out().insert(w.out().end(), kv.out().begin(), kv.out().end());
  return w;
}

// general.file_type (llama_ftype) describing the dominant encoding of the weight matrices.
uint32_t FileType(const Model& m) {
  std::map<WeightType, size_t> count;
  for (const std::string& n : LinearWeightNames(m.config)) {
    if (const Tensor* t = m.Find(n)) ++count[t->format.type];
  }
  WeightType dominant = WeightType::kF32;
  size_t best = 0;
  for (const auto& [type, c] : count) {
    if (c > best) best = c, dominant = type;
  }
  const GgmlTypeTraits* g = FindGgmlType(dominant);
  return g != nullptr ? g->llama_ftype : 0;  // ALL_F32 when the weights are mostly qforge-only encodings
}

}  // namespace

absl::StatusOr<Model> ParseGguf(std::span<const uint8_t> bytes, std::shared_ptr<const void> owner) {
  return GgufParser(bytes).Parse(std::move(owner));
}

std::vector<std::pair<std::string, std::string (*)(int, int)>> StackedExpertNames(int l) {
  return {{absl::StrCat("blk.", l, ".ffn_gate_exps.weight"), names::FfnGateExpert},
          {absl::StrCat("blk.", l, ".ffn_up_exps.weight"), names::FfnUpExpert},
          {absl::StrCat("blk.", l, ".ffn_down_exps.weight"), names::FfnDownExpert}};
}

std::vector<float> ImportanceMatrix::Entry::Importance(int64_t expert) const {
  if (tokens[static_cast<size_t>(expert)] <= 0) return std::vector<float>(static_cast<size_t>(cols), 1.0f);
  std::vector<float> w(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) w[static_cast<size_t>(c)] = MeanSquare(expert, c);
  return w;
}

absl::StatusOr<ImportanceMatrix> ParseImatrixGguf(std::span<const uint8_t> bytes) {
  return GgufParser(bytes).ParseImatrix();
}

absl::StatusOr<ImportanceMatrix> ReadImatrixGguf(const std::string& path) {
  QF_ASSIGN_OR_RETURN(std::shared_ptr<const MappedFile> file, MappedFile::Open(path));
  auto m = ParseImatrixGguf(file->bytes());
  if (!m.ok()) return absl::Status(m.status().code(), absl::StrCat(path, ": ", m.status().message()));
  return m;
}

absl::StatusOr<Model> ReadGguf(const std::string& path, MappedFile::Residency residency) {
  QF_ASSIGN_OR_RETURN(std::shared_ptr<const MappedFile> file, MappedFile::Open(path, residency));
  auto m = ParseGguf(file->bytes(), file);
  if (!m.ok()) return absl::Status(m.status().code(), absl::StrCat(path, ": ", m.status().message()));
  m->metadata["source.path"] = path;
  return m;
}

// A GGUF file as the byte ranges it is made of, in order: the header (metadata and tensor infos), then each
// tensor's bytes (from the model's own memory) and its padding. WriteGguf streams them to the file; SerializeGguf
// joins them.
struct GgufParts {
  std::vector<uint8_t> header;
  std::vector<Tensor> stacked;  // the experts' stacked copies and the f32 norms, kept alive for `parts`
  std::vector<std::span<const uint8_t>> parts;
};

absl::StatusOr<GgufParts> MakeGgufParts(const Model& m) {
  QF_RETURN_IF_ERROR(ValidateModel(m));
  GgufParts g;
  const ModelConfig& c = m.config;
  // Experts are written stacked, as llama.cpp loads them: one [n_experts, rows, cols] tensor per kind and layer.
  std::vector<Tensor>& stacked = g.stacked;
  std::set<std::string> in_stacks;
  for (int l = 0; c.is_moe() && l < c.n_layers; ++l) {
    for (const auto& [name, expert_name] : StackedExpertNames(l)) {
      const Tensor& first = m.tensors.at(expert_name(l, 0));
      std::vector<uint8_t> bytes;
      bytes.reserve(first.nbytes * static_cast<size_t>(c.n_experts));
      for (int e = 0; e < c.n_experts; ++e) {
        const Tensor& t = m.tensors.at(expert_name(l, e));
        if (!(t.format == first.format)) {
          return absl::InvalidArgumentError(absl::StrCat("gguf: ", t.name, " is ", FormatName(t.format), " but ",
                                                         first.name, " is ", FormatName(first.format),
                                                         ": the experts of a layer are stored as one tensor"));
        }
        bytes.insert(bytes.end(), t.data, t.data + t.nbytes);
        in_stacks.insert(t.name);
      }
      stacked.push_back(Tensor::FromBytes(name, {c.n_experts, first.shape[0], first.shape[1]}, first.format,
                                          std::move(bytes)));
    }
  }
  // llama.cpp keeps every 1-D tensor (the norms) in f32 and multiplies activations by them only in f32, so norms
  // stored in f16 or bf16 (a bf16 checkpoint's) are written widened, exactly.
  for (const auto& [name, t] : m.tensors) {
    if (t.shape.size() != 1 || (t.format.type != WeightType::kF16 && t.format.type != WeightType::kBF16)) continue;
    stacked.push_back(CastFloatTensor(t, WeightType::kF32));
    in_stacks.insert(name);
  }
  std::vector<std::pair<const Tensor*, uint32_t>> tensors;
  for (const auto& [name, t] : m.tensors) {
    if (in_stacks.count(name) != 0) continue;
    QF_ASSIGN_OR_RETURN(uint32_t type, GgmlOfFormat(t.format, name));
    tensors.emplace_back(&t, type);
  }
  for (const Tensor& t : stacked) {
    QF_ASSIGN_OR_RETURN(uint32_t type, GgmlOfFormat(t.format, t.name));
    tensors.emplace_back(&t, type);
  }
  Writer kv;
  kv.KeyString("general.architecture", "llama");
  auto name_it = m.metadata.find("general.name");
  kv.KeyString("general.name", name_it != m.metadata.end() ? name_it->second : "qforge");
  kv.KeyU32("general.file_type", FileType(m));
  kv.KeyU32("general.alignment", kDefaultAlignment);
  kv.KeyU32("llama.context_length", c.seq_len);
  kv.KeyU32("llama.embedding_length", c.dim);
  kv.KeyU32("llama.block_count", c.n_layers);
  kv.KeyU32("llama.feed_forward_length", c.hidden_dim);
  kv.KeyU32("llama.rope.dimension_count", c.head_dim());
  kv.KeyU32("llama.attention.head_count", c.n_heads);
  kv.KeyU32("llama.attention.head_count_kv", c.n_kv_heads);
  kv.KeyF32("llama.attention.layer_norm_rms_epsilon", c.norm_eps);
  kv.KeyF32("llama.rope.freq_base", c.rope_theta);
  kv.KeyU32("llama.vocab_size", c.vocab_size);
  if (c.is_moe()) {
    kv.KeyU32("llama.expert_count", c.n_experts);
    kv.KeyU32("llama.expert_used_count", c.n_experts_used);
  }
  if (m.vocab.has_value()) {
    const Vocab& v = *m.vocab;
    kv.KeyString("tokenizer.ggml.model", v.model);
    kv.Key("tokenizer.ggml.tokens", kArray);
    kv.Put<uint32_t>(kString);
    kv.Put<uint64_t>(v.tokens.size());
    for (const std::string& t : v.tokens) kv.PutString(t);
    kv.Key("tokenizer.ggml.scores", kArray);
    kv.Put<uint32_t>(kF32);
    kv.Put<uint64_t>(v.scores.size());
    for (float s : v.scores) kv.Put(s);
    kv.Key("tokenizer.ggml.token_type", kArray);
    kv.Put<uint32_t>(kI32);
    kv.Put<uint64_t>(v.types.size());
    for (TokenType t : v.types) kv.Put(static_cast<int32_t>(t));
    kv.KeyU32("tokenizer.ggml.bos_token_id", v.bos_id);
    kv.KeyU32("tokenizer.ggml.eos_token_id", v.eos_id);
    kv.KeyU32("tokenizer.ggml.unknown_token_id", v.unk_id);
    kv.KeyBool("tokenizer.ggml.add_space_prefix", v.normalizer.add_dummy_prefix);
    kv.KeyBool("tokenizer.ggml.remove_extra_whitespaces", v.normalizer.remove_extra_whitespaces);
  }
  if (auto t = m.metadata.find(kChatTemplateKey); t != m.metadata.end()) kv.KeyString(kChatTemplateKey, t->second);

  Writer w = GgufHeader(tensors.size(), kv);
  uint64_t offset = 0;
  for (const auto& [t, type] : tensors) {
    w.PutString(t->name);
    w.Put<uint32_t>(static_cast<uint32_t>(t->shape.size()));
    for (size_t d = t->shape.size(); d-- > 0;) w.Put<uint64_t>(static_cast<uint64_t>(t->shape[d]));
    w.Put<uint32_t>(type);
    w.Put<uint64_t>(offset);
    offset = (offset + t->nbytes + kDefaultAlignment - 1) / kDefaultAlignment * kDefaultAlignment;
  }
  w.Pad(kDefaultAlignment);
  g.header = std::move(w.out());
  static constexpr uint8_t kZeros[kDefaultAlignment] = {};
  g.parts.push_back(g.header);
  for (const auto& [t, type] : tensors) {
    g.parts.emplace_back(t->data, t->nbytes);
    const size_t pad = (kDefaultAlignment - t->nbytes % kDefaultAlignment) % kDefaultAlignment;
    if (pad > 0) g.parts.emplace_back(kZeros, pad);
  }
  return g;
}

absl::StatusOr<std::vector<uint8_t>> SerializeGguf(const Model& m) {
  QF_ASSIGN_OR_RETURN(GgufParts g, MakeGgufParts(m));
  std::vector<uint8_t> out;
  size_t total = 0;
  for (const auto& part : g.parts) total += part.size();
  out.reserve(total);
  for (const auto& part : g.parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

absl::Status WriteGguf(const Model& m, const std::string& path) {
  QF_ASSIGN_OR_RETURN(GgufParts g, MakeGgufParts(m));
  return WriteFileAtomically(path, g.parts);
}

absl::StatusOr<std::vector<uint8_t>> SerializeImatrixGguf(const ImportanceMatrix& m) {
  Writer kv;
  kv.KeyString("general.type", "imatrix");
  kv.Key("imatrix.datasets", kArray);
  kv.Put<uint32_t>(kString);
  kv.Put<uint64_t>(m.datasets.size());
  for (const std::string& d : m.datasets) kv.PutString(d);
  kv.KeyU32("imatrix.chunk_count", static_cast<uint32_t>(m.chunk_count));
  kv.KeyU32("imatrix.chunk_size", static_cast<uint32_t>(m.chunk_size));
  // llama-imatrix's layout: per weight, in sorted name order, W.in_sum2 (ne = [cols, experts]) and W.counts
  // (ne = [1, experts]), f32.
  struct Out {
    std::string name;
    uint64_t ne0, ne1;
    std::span<const float> values;  // the entry's own, written as they are
  };
  std::vector<Out> tensors;
  for (const auto& [name, e] : m.entries) {
    if (e.cols <= 0 || e.experts <= 0 || e.sum_squares.size() != static_cast<size_t>(e.cols * e.experts) ||
        e.tokens.size() != static_cast<size_t>(e.experts)) {
      return absl::InvalidArgumentError(absl::StrCat("imatrix entry '", name, "': ", e.sum_squares.size(),
                                                     " values and ", e.tokens.size(), " counts do not fit ",
                                                     e.experts, " experts x ", e.cols, " columns"));
    }
    tensors.push_back({name + ".in_sum2", static_cast<uint64_t>(e.cols), static_cast<uint64_t>(e.experts),
                       e.sum_squares});
    tensors.push_back({name + ".counts", 1, static_cast<uint64_t>(e.experts), e.tokens});
  }
  Writer w = GgufHeader(tensors.size(), kv);
  uint64_t offset = 0;
  for (const Out& t : tensors) {
    w.PutString(t.name);
    // ggml's count of dimensions: trailing dimensions of 1 are not written.
    w.Put<uint32_t>(t.ne1 > 1 ? 2 : 1);
    w.Put<uint64_t>(t.ne0);
    if (t.ne1 > 1) w.Put<uint64_t>(t.ne1);
    w.Put<uint32_t>(0);  // GGML_TYPE_F32
    w.Put<uint64_t>(offset);
    offset = (offset + 4 * t.values.size() + kDefaultAlignment - 1) / kDefaultAlignment * kDefaultAlignment;
  }
  for (const Out& t : tensors) {
    w.Pad(kDefaultAlignment);
    const auto* p = reinterpret_cast<const uint8_t*>(t.values.data());
    w.out().insert(w.out().end(), p, p + 4 * t.values.size());
  }
  w.Pad(kDefaultAlignment);  // as gguf_write_to_file ends the last tensor
  return std::move(w.out());
}

absl::Status WriteImatrixGguf(const ImportanceMatrix& m, const std::string& path) {
  QF_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, SerializeImatrixGguf(m));
  return WriteFileAtomically(path, {std::span<const uint8_t>(bytes)});
}

}  // namespace qforge::formats
