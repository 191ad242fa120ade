// HF safetensors: single files, sharded models (model.safetensors.index.json) and directories, plus
// config.json. File layout: u64 LE header length N, N bytes of JSON header, then the data section; each
// tensor's data_offsets are [begin, end) relative to the data section.
#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/formats/byte_reader.h"
#include "core/formats/formats.h"
#include "core/formats/json.h"
#include "core/formats/parsers.h"
#include "core/formats/sentencepiece_model.h"

namespace qforge::formats {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kMaxHeaderBytes = 100u << 20;
constexpr size_t kMaxDims = 8;
// Metadata keys recording a qforge encoding; suffixed with the tensor's name in the file.
constexpr char kFormatKey[] = "qforge.format.";
constexpr char kShapeKey[] = "qforge.shape.";
constexpr char kModelMetaKey[] = "qforge.meta.";

absl::Status Bad(const std::string& what) { return absl::InvalidArgumentError(absl::StrCat("safetensors: ", what)); }

// Element size of a supported dtype, 0 for a known but unsupported one, -1 for an unknown one.
int DtypeSize(const std::string& d) {
  if (d == "F32") return 4;
  if (d == "F16" || d == "BF16") return 2;
  if (d == "U8") return 1;
  static const char* kKnown[] = {"F64", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "BOOL", "F8_E4M3", "F8_E5M2"};
  for (const char* k : kKnown) {
    if (d == k) return 0;
  }
  return -1;
}

absl::StatusOr<uint64_t> NonNegativeInt(const Json& j, const std::string& what) {
  if (!j.is_int() || j.int_value() < 0) return Bad(absl::StrCat(what, " must be a non-negative integer"));
  return static_cast<uint64_t>(j.int_value());
}

}  // namespace

absl::StatusOr<SafetensorsFile> ParseSafetensorsFile(std::span<const uint8_t> bytes) {
  ByteReader r(bytes, "safetensors");
  uint64_t n = 0;
  QF_RETURN_IF_ERROR(r.Read(&n, "header length"));
  if (n > kMaxHeaderBytes) return Bad(absl::StrCat("header length ", n, " exceeds the limit of ", kMaxHeaderBytes));
  if (n > r.remaining()) {
    return Bad(absl::StrCat("header length ", n, " is past the end of the file (", bytes.size(), " bytes)"));
  }
  std::string text;
  QF_RETURN_IF_ERROR(r.ReadString(n, &text, "header"));
  JsonLimits limits;
  limits.max_bytes = kMaxHeaderBytes;
  auto parsed = ParseJson(text, limits);
  if (!parsed.ok()) return Bad(absl::StrCat("header: ", parsed.status().message()));
  const Json& header = *parsed;
  if (!header.is_object()) return Bad("header is not a JSON object");
  const size_t data_start = r.pos();
  const uint64_t data_size = r.remaining();

  SafetensorsFile out;
  for (const auto& [name, entry] : header.object()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return Bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.object()) {
        if (!v.is_string()) return Bad(absl::StrCat("__metadata__ value of '", k, "' is not a string"));
        out.metadata[k] = v.string_value();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor '", name, "'");
    if (!entry.is_object()) return Bad(absl::StrCat(where, " entry is not an object"));
    const Json* dtype = entry.Find("dtype");
    const Json* shape = entry.Find("shape");
    const Json* offsets = entry.Find("data_offsets");
    if (dtype == nullptr || !dtype->is_string()) return Bad(absl::StrCat(where, " has no string dtype"));
    if (shape == nullptr || !shape->is_array()) return Bad(absl::StrCat(where, " has no shape array"));
    if (offsets == nullptr || !offsets->is_array() || offsets->array().size() != 2) {
      return Bad(absl::StrCat(where, " has no data_offsets [begin, end]"));
    }
    SafetensorsEntry e;
    e.name = name;
    e.dtype = dtype->string_value();
    const int esize = DtypeSize(e.dtype);
    if (esize < 0) return Bad(absl::StrCat(where, " has unknown dtype '", e.dtype, "'"));
    if (esize == 0) {
      return absl::UnimplementedError(absl::StrCat("safetensors: ", where, " has dtype '", e.dtype,
                                                   "', which is not supported (F32, F16, BF16, U8)"));
    }
    if (shape->array().size() > kMaxDims) return Bad(absl::StrCat(where, " has more than ", kMaxDims, " dimensions"));
    uint64_t numel = 1;
    for (const Json& d : shape->array()) {
      QF_ASSIGN_OR_RETURN(uint64_t dim, NonNegativeInt(d, absl::StrCat(where, " shape entry")));
      if (dim > static_cast<uint64_t>(INT64_MAX) || !MulOk(numel, dim, &numel)) {
        return Bad(absl::StrCat(where, " shape overflows"));
      }
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    QF_ASSIGN_OR_RETURN(uint64_t begin, NonNegativeInt(offsets->array()[0], absl::StrCat(where, " data_offsets")));
    QF_ASSIGN_OR_RETURN(uint64_t end, NonNegativeInt(offsets->array()[1], absl::StrCat(where, " data_offsets")));
    if (begin > end) return Bad(absl::StrCat(where, " data_offsets [", begin, ", ", end, "] are reversed"));
    if (end > data_size) {
      return Bad(absl::StrCat(where, " data_offsets [", begin, ", ", end, "] are past the end of the data section (",
                              data_size, " bytes)"));
    }
    uint64_t need;
    if (!MulOk(numel, static_cast<uint64_t>(esize), &need) || need != end - begin) {
      return Bad(absl::StrCat(where, " has ", end - begin, " bytes, its shape [", absl::StrJoin(e.shape, ", "),
                              "] in ", e.dtype, " needs ", numel, " x ", esize));
    }
    e.data = bytes.data() + data_start + begin;
    e.nbytes = static_cast<size_t>(end - begin);
    out.tensors.push_back(std::move(e));
  }
  std::sort(out.tensors.begin(), out.tensors.end(), [&](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return a.data != b.data ? a.data < b.data : a.nbytes < b.nbytes;
  });
  for (size_t i = 1; i < out.tensors.size(); ++i) {
    const SafetensorsEntry& prev = out.tensors[i - 1];
    const SafetensorsEntry& cur = out.tensors[i];
    // Empty tensors occupy no bytes and cannot overlap anything.
    if (prev.nbytes > 0 && cur.nbytes > 0 && cur.data < prev.data + prev.nbytes) {
      return Bad(absl::StrCat("tensors '", prev.name, "' and '", cur.name, "' overlap in the data section"));
    }
  }
  return out;
}

// --- config.json ----------------------------------------------------------------------------------------

absl::StatusOr<ModelConfig> ParseHfConfig(const std::string& json_text) {
  JsonLimits limits;
  limits.max_bytes = 16u << 20;
  auto parsed = ParseJson(json_text, limits);
  if (!parsed.ok()) return absl::InvalidArgumentError(absl::StrCat("config.json: ", parsed.status().message()));
  const Json& j = *parsed;
  auto bad = [](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat("config.json: ", what)); };
  if (!j.is_object()) return bad("not a JSON object");

  // Llama, and Mixtral (Llama with a sparse Mixture-of-Experts FFN).
  const Json* model_type = j.Find("model_type");
  const Json* archs = j.Find("architectures");
  if (model_type == nullptr && archs == nullptr) return bad("has neither model_type nor architectures");
  bool mixtral = false;
  if (model_type != nullptr) {
    const bool known = model_type->is_string() &&
                       (model_type->string_value() == "llama" || model_type->string_value() == "mixtral");
    if (!known) return bad(absl::StrCat("model_type ", model_type->Dump(), " is not supported (llama, mixtral)"));
    mixtral = model_type->string_value() == "mixtral";
  }
  if (archs != nullptr) {
    bool known = false;
    for (const Json& a : archs->array()) {
      if (!a.is_string()) continue;
      known |= a.string_value() == "LlamaForCausalLM" || a.string_value() == "MixtralForCausalLM";
      mixtral |= a.string_value() == "MixtralForCausalLM";
    }
    if (!known) {
      return bad(absl::StrCat("architectures ", archs->Dump(), " include neither LlamaForCausalLM nor MixtralForCausalLM"));
    }
  }

  auto get_int = [&](const char* key, int* out, bool required) -> absl::Status {
    const Json* v = j.Find(key);
    if (v == nullptr || v->is_null()) {
      return required ? bad(absl::StrCat("missing required field '", key, "'")) : absl::OkStatus();
    }
    if (!v->is_number()) return bad(absl::StrCat("field '", key, "' is not a number"));
    const double d = v->number_value();
    // Some exporters write integers as 4096.0.
    if (!(d >= 0 && d <= INT32_MAX) || d != static_cast<double>(static_cast<int64_t>(d))) {
      return bad(absl::StrCat("field '", key, "' = ", v->Dump(), " is not a non-negative 32-bit integer"));
    }
    *out = static_cast<int>(d);
    return absl::OkStatus();
  };
  auto get_float = [&](const char* key, float* out) -> absl::Status {
    const Json* v = j.Find(key);
    if (v == nullptr || v->is_null()) return absl::OkStatus();
    if (!v->is_number()) return bad(absl::StrCat("field '", key, "' is not a number"));
    *out = static_cast<float>(v->number_value());
    return absl::OkStatus();
  };

  ModelConfig c;
  c.arch = "llama";
  QF_RETURN_IF_ERROR(get_int("hidden_size", &c.dim, true));
  QF_RETURN_IF_ERROR(get_int("intermediate_size", &c.hidden_dim, true));
  QF_RETURN_IF_ERROR(get_int("num_hidden_layers", &c.n_layers, true));
  QF_RETURN_IF_ERROR(get_int("num_attention_heads", &c.n_heads, true));
  c.n_kv_heads = c.n_heads;
  QF_RETURN_IF_ERROR(get_int("num_key_value_heads", &c.n_kv_heads, false));
  QF_RETURN_IF_ERROR(get_int("vocab_size", &c.vocab_size, true));
  QF_RETURN_IF_ERROR(get_int("max_position_embeddings", &c.seq_len, true));
  c.norm_eps = 1e-6f;  // LlamaConfig's default
  QF_RETURN_IF_ERROR(get_float("rms_norm_eps", &c.norm_eps));
  c.rope_theta = 10000.0f;
  QF_RETURN_IF_ERROR(get_float("rope_theta", &c.rope_theta));
  c.tied_embeddings = false;  // LlamaConfig's default
  if (const Json* t = j.Find("tie_word_embeddings"); t != nullptr && !t->is_null()) {
    if (!t->is_bool()) return bad("field 'tie_word_embeddings' is not a boolean");
    c.tied_embeddings = t->bool_value();
  }
  if (mixtral) {
    QF_RETURN_IF_ERROR(get_int("num_local_experts", &c.n_experts, true));
    QF_RETURN_IF_ERROR(get_int("num_experts_per_tok", &c.n_experts_used, true));
    if (c.n_experts == 0) return bad("num_local_experts is 0");
  }
  if (const Json* rs = j.Find("rope_scaling"); rs != nullptr && !rs->is_null()) {
    return absl::UnimplementedError(absl::StrCat("config.json: rope_scaling ", rs->Dump(), " is not supported"));
  }
  if (const Json* hd = j.Find("head_dim"); hd != nullptr && !hd->is_null()) {
    if (c.n_heads > 0 && (!hd->is_int() || hd->int_value() != c.dim / c.n_heads)) {
      return absl::UnimplementedError(
          absl::StrCat("config.json: head_dim ", hd->Dump(), " differs from hidden_size / num_attention_heads"));
    }
  }
  if (absl::Status s = ValidateConfig(c); !s.ok()) return bad(std::string(s.message()));
  return c;
}

namespace {
// Floats are written in their shortest decimal form that reads back (through double) to the same float.
Json FloatJson(float f) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof(buf), f);
  double d = 0;
  std::from_chars(buf, r.ptr, d);
  return Json::Double(d);
}
}  // namespace

std::string HfConfigJson(const ModelConfig& c) {
  Json j = Json::MakeObject();
  j.Set("architectures", Json::MakeArray({Json::String(c.is_moe() ? "MixtralForCausalLM" : "LlamaForCausalLM")}));
  j.Set("model_type", Json::String(c.is_moe() ? "mixtral" : "llama"));
  if (c.is_moe()) {
    j.Set("num_local_experts", Json::Int(c.n_experts));
    j.Set("num_experts_per_tok", Json::Int(c.n_experts_used));
  }
  j.Set("hidden_size", Json::Int(c.dim));
  j.Set("intermediate_size", Json::Int(c.hidden_dim));
  j.Set("num_hidden_layers", Json::Int(c.n_layers));
  j.Set("num_attention_heads", Json::Int(c.n_heads));
  j.Set("num_key_value_heads", Json::Int(c.n_kv_heads));
  j.Set("vocab_size", Json::Int(c.vocab_size));
  j.Set("max_position_embeddings", Json::Int(c.seq_len));
  j.Set("rms_norm_eps", FloatJson(c.norm_eps));
  j.Set("rope_theta", FloatJson(c.rope_theta));
  j.Set("tie_word_embeddings", Json::Bool(c.tied_embeddings));
  j.Set("hidden_act", Json::String("silu"));
  j.Set("bos_token_id", Json::Int(1));
  j.Set("eos_token_id", Json::Int(2));
  return j.Dump() + "\n";
}

// --- names ----------------------------------------------------------------------------------------------

namespace {

struct LayerName {
  const char* hf;  // after "model.layers.N."
  std::string (*canonical)(int);
};
const LayerName kLayerNames[] = {
    {"input_layernorm.weight", names::AttnNorm},    {"self_attn.q_proj.weight", names::AttnQ},
    {"self_attn.k_proj.weight", names::AttnK},      {"self_attn.v_proj.weight", names::AttnV},
    {"self_attn.o_proj.weight", names::AttnOutput}, {"post_attention_layernorm.weight", names::FfnNorm},
    {"mlp.gate_proj.weight", names::FfnGate},       {"mlp.up_proj.weight", names::FfnUp},
    {"mlp.down_proj.weight", names::FfnDown},
};

enum class QkKind { kNone, kQ, kK };

struct Canonical {
  std::string name;  // empty: ignore this tensor
  QkKind qk = QkKind::kNone;
};

// Mixtral's expert matrices: w1 is the gate, w3 the up and w2 the down projection.
struct ExpertName {
  const char* hf;  // after "model.layers.N.block_sparse_moe.experts.E."
  std::string (*canonical)(int, int);
};
const ExpertName kExpertNames[] = {{"w1.weight", names::FfnGateExpert},
                                   {"w3.weight", names::FfnUpExpert},
                                   {"w2.weight", names::FfnDownExpert}};
constexpr absl::string_view kMoeGate = "block_sparse_moe.gate.weight";
constexpr absl::string_view kMoeExperts = "block_sparse_moe.experts.";

// "N.rest" -> N and "rest".
bool SplitIndex(absl::string_view s, int* index, absl::string_view* rest) {
  const size_t dot = s.find('.');
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(s.substr(0, dot), index) || *index < 0) return false;
  *rest = s.substr(dot + 1);
  return true;
}

absl::StatusOr<Canonical> HfToCanonical(const std::string& hf, const ModelConfig& config) {
  const int n_layers = config.n_layers;
  if (hf == "model.embed_tokens.weight") return Canonical{names::kTokenEmbd};
  if (hf == "model.norm.weight") return Canonical{names::kOutputNorm};
  if (hf == "lm_head.weight") return Canonical{names::kOutput};
  constexpr absl::string_view kPrefix = "model.layers.";
  if (absl::StartsWith(hf, kPrefix)) {
    const absl::string_view rest = absl::string_view(hf).substr(kPrefix.size());
    const size_t dot = rest.find('.');
    int layer = -1;
    if (dot != absl::string_view::npos && absl::SimpleAtoi(rest.substr(0, dot), &layer) && layer >= 0) {
      const absl::string_view leaf = rest.substr(dot + 1);
      if (layer >= n_layers) {
        return Bad(absl::StrCat("tensor '", hf, "' is for layer ", layer, " but the config has ", n_layers));
      }
      // Older exports store the RoPE frequencies; they are recomputed from rope_theta.
      if (leaf == "self_attn.rotary_emb.inv_freq") return Canonical{""};
      for (const LayerName& ln : kLayerNames) {
        if (leaf == ln.hf) {
          const QkKind qk = ln.canonical == names::AttnQ ? QkKind::kQ
                            : ln.canonical == names::AttnK ? QkKind::kK
                                                           : QkKind::kNone;
          return Canonical{ln.canonical(layer), qk};
        }
      }
      if (config.is_moe() && leaf == kMoeGate) return Canonical{names::FfnGateInp(layer)};
      int expert = -1;
      absl::string_view expert_leaf;
      if (config.is_moe() && absl::StartsWith(leaf, kMoeExperts) &&
          SplitIndex(leaf.substr(kMoeExperts.size()), &expert, &expert_leaf)) {
        if (expert >= config.n_experts) {
          return Bad(absl::StrCat("tensor '", hf, "' is for expert ", expert, " but the config has ",
                                  config.n_experts));
        }
        for (const ExpertName& en : kExpertNames) {
          if (expert_leaf == en.hf) return Canonical{en.canonical(layer, expert)};
        }
      }
    }
  }
  return Bad(absl::StrCat("unexpected tensor '", hf, "' for a ", config.is_moe() ? "Mixtral" : "Llama", " model"));
}

absl::StatusOr<std::string> CanonicalToHf(const std::string& name, const ModelConfig& config) {
  if (name == names::kTokenEmbd) return std::string("model.embed_tokens.weight");
  if (name == names::kOutputNorm) return std::string("model.norm.weight");
  if (name == names::kOutput) return std::string("lm_head.weight");
  constexpr absl::string_view kPrefix = "blk.";
  if (absl::StartsWith(name, kPrefix)) {
    const absl::string_view rest = absl::string_view(name).substr(kPrefix.size());
    const size_t dot = rest.find('.');
    int layer = -1;
    if (dot != absl::string_view::npos && absl::SimpleAtoi(rest.substr(0, dot), &layer) && layer >= 0) {
      for (const LayerName& ln : kLayerNames) {
        if (ln.canonical(layer) == name) return absl::StrCat("model.layers.", layer, ".", ln.hf);
      }
      if (name == names::FfnGateInp(layer)) return absl::StrCat("model.layers.", layer, ".", kMoeGate);
      for (int e = 0; e < config.n_experts; ++e) {
        for (const ExpertName& en : kExpertNames) {
          if (en.canonical(layer, e) == name) {
            return absl::StrCat("model.layers.", layer, ".", kMoeExperts, e, ".", en.hf);
          }
        }
      }
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("safetensors: no HF name for tensor '", name, "'"));
}

WeightFormat DtypeFormat(const std::string& dtype) {
  if (dtype == "F16") return WeightFormat::F16();
  if (dtype == "BF16") return WeightFormat::BF16();
  return WeightFormat::F32();
}

absl::StatusOr<std::vector<int64_t>> ParseShape(const std::string& s, const std::string& tensor) {
  std::vector<int64_t> shape;
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    int64_t d = 0;
    if (!absl::SimpleAtoi(part, &d) || d < 0) {
      return Bad(absl::StrCat("tensor '", tensor, "' has a malformed ", kShapeKey, " value '", s, "'"));
    }
    shape.push_back(d);
  }
  if (shape.empty() || shape.size() > 4) return Bad(absl::StrCat("tensor '", tensor, "' shape '", s, "' has bad rank"));
  return shape;
}

}  // namespace

absl::StatusOr<Model> ModelFromSafetensors(const ModelConfig& config, const std::vector<SafetensorsFile>& files,
                                           const std::vector<std::shared_ptr<const void>>& owners) {
  Model m;
  m.config = config;
  for (size_t fi = 0; fi < files.size(); ++fi) {
    const SafetensorsFile& f = files[fi];
    const std::shared_ptr<const void> owner = fi < owners.size() ? owners[fi] : nullptr;
    for (const auto& [k, v] : f.metadata) {
      if (absl::StartsWith(k, kModelMetaKey)) m.metadata[k.substr(sizeof(kModelMetaKey) - 1)] = v;
      if (absl::StartsWith(k, kFormatKey) || absl::StartsWith(k, kShapeKey)) {
        const std::string tensor = k.substr(k.find('.', 7) + 1);
        const bool present = std::any_of(f.tensors.begin(), f.tensors.end(),
                                         [&](const SafetensorsEntry& e) { return e.name == tensor; });
        if (!present) return Bad(absl::StrCat("metadata '", k, "' names a tensor the file does not have"));
      }
    }
    for (const SafetensorsEntry& e : f.tensors) {
      QF_ASSIGN_OR_RETURN(Canonical can, HfToCanonical(e.name, config));
      if (can.name.empty()) continue;
      if (can.name == names::kOutput && config.tied_embeddings) continue;  // a tied copy of the embedding
      if (m.tensors.count(can.name) != 0) return Bad(absl::StrCat("tensor '", e.name, "' appears twice"));

      WeightFormat format = DtypeFormat(e.dtype);
      std::vector<int64_t> shape = e.shape;
      auto fmt_it = f.metadata.find(kFormatKey + e.name);
      auto shape_it = f.metadata.find(kShapeKey + e.name);
      if (e.dtype == "U8") {
        if (fmt_it == f.metadata.end() || shape_it == f.metadata.end()) {
          return Bad(absl::StrCat("U8 tensor '", e.name, "' has no ", kFormatKey, "/", kShapeKey,
                                  " metadata saying how it is encoded"));
        }
        auto parsed = ParseFormatName(fmt_it->second);
        if (!parsed.ok()) return Bad(absl::StrCat("tensor '", e.name, "': ", parsed.status().message()));
        format = *parsed;
        QF_ASSIGN_OR_RETURN(shape, ParseShape(shape_it->second, e.name));
      } else if (fmt_it != f.metadata.end() && fmt_it->second != FormatName(format)) {
        return Bad(absl::StrCat("tensor '", e.name, "' is ", e.dtype, " but its metadata says ", fmt_it->second));
      }
      Tensor t;
      const size_t align = format.type == WeightType::kF32 ? 4 : format.is_float() ? 2 : 1;
      if (reinterpret_cast<uintptr_t>(e.data) % align != 0) {
        // The spec does not promise aligned data; readers of this Tensor may load floats in place.
        t = Tensor::FromBytes(can.name, shape, format, std::vector<uint8_t>(e.data, e.data + e.nbytes));
      } else {
        t = Tensor::View(can.name, shape, format, owner, e.data, e.nbytes);
      }
      if (absl::Status s = ValidateTensor(t); !s.ok()) return Bad(std::string(s.message()));
      if (can.qk != QkKind::kNone) {
        const int64_t out_rows = can.qk == QkKind::kQ ? config.dim : config.kv_dim();
        if (t.shape != std::vector<int64_t>{out_rows, config.dim}) {
          return Bad(absl::StrCat("tensor '", e.name, "' has shape [", absl::StrJoin(t.shape, ", "), "], expected [",
                                  out_rows, ", ", config.dim, "]"));
        }
        auto p = PermuteQkFromHf(t, can.qk == QkKind::kQ ? config.n_heads : config.n_kv_heads);
        if (!p.ok()) return Bad(std::string(p.status().message()));
        t = *std::move(p);
      }
      m.tensors.emplace(can.name, std::move(t));
    }
  }
  m.metadata["source.format"] = "safetensors";
  QF_RETURN_IF_ERROR(ValidateModel(m));
  return m;
}

absl::StatusOr<std::vector<uint8_t>> SerializeSafetensors(const Model& m) {
  QF_RETURN_IF_ERROR(ValidateModel(m));
  struct Item {
    std::string hf;
    Tensor t;
    std::string dtype;
    size_t align;
  };
  std::vector<Item> items;
  for (const auto& [name, t0] : m.tensors) {
    QF_ASSIGN_OR_RETURN(std::string hf, CanonicalToHf(name, m.config));
    Tensor t = t0;
    if (name.ends_with(".attn_q.weight") || name.ends_with(".attn_k.weight")) {
      const int n_head = name.ends_with(".attn_q.weight") ? m.config.n_heads : m.config.n_kv_heads;
      QF_ASSIGN_OR_RETURN(t, PermuteQkToHf(t0, n_head));
    }
    std::string dtype;
    size_t align = 1;
    switch (t.format.type) {
      case WeightType::kF32: dtype = "F32", align = 4; break;
      case WeightType::kF16: dtype = "F16", align = 2; break;
      case WeightType::kBF16: dtype = "BF16", align = 2; break;
      default: dtype = "U8"; break;
    }
    items.push_back({std::move(hf), std::move(t), std::move(dtype), align});
  }
  // The data section has no gaps (strict readers reject them), so tensors go in decreasing alignment:
  // every F32 tensor then starts 4-aligned and every F16/BF16 one 2-aligned.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.align > b.align; });

  Json header = Json::MakeObject();
  Json meta = Json::MakeObject();
  meta.Set("format", Json::String("pt"));
  for (const auto& [k, v] : m.metadata) meta.Set(kModelMetaKey + k, Json::String(v));
  for (const Item& it : items) {
    if (it.dtype == "U8") {
      meta.Set(kFormatKey + it.hf, Json::String(FormatName(it.t.format)));
      meta.Set(kShapeKey + it.hf, Json::String(absl::StrJoin(it.t.shape, ",")));
    }
  }
  header.Set("__metadata__", std::move(meta));
  uint64_t offset = 0;
  for (const Item& it : items) {
    Json e = Json::MakeObject();
    e.Set("dtype", Json::String(it.dtype));
    Json shape = Json::MakeArray();
    if (it.dtype == "U8") {
      shape.mutable_array().push_back(Json::Int(static_cast<int64_t>(it.t.nbytes)));
    } else {
      for (int64_t d : it.t.shape) shape.mutable_array().push_back(Json::Int(d));
    }
    e.Set("shape", std::move(shape));
    e.Set("data_offsets", Json::MakeArray({Json::Int(static_cast<int64_t>(offset)),
                                           Json::Int(static_cast<int64_t>(offset + it.t.nbytes))}));
    header.Set(it.hf, std::move(e));
    offset += it.t.nbytes;
  }
  std::string text = header.Dump();
  // Pad with spaces (valid JSON whitespace) so the data section starts 8-aligned.
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  std::vector<uint8_t> out;
  out.reserve(8 + text.size() + offset);
  const uint64_t n = text.size();
  out.insert(out.end(), reinterpret_cast<const uint8_t*>(&n), reinterpret_cast<const uint8_t*>(&n) + 8);
  out.insert(out.end(), text.begin(), text.end());
  for (const Item& it : items) out.insert(out.end(), it.t.data, it.t.data + it.t.nbytes);
  return out;
}

// --- files ----------------------------------------------------------------------------------------------

namespace {

absl::Status WithPath(const absl::Status& s, const std::string& path) {
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

struct Loaded {
  MappedFile::Residency residency = MappedFile::Residency::kMapped;
  std::vector<SafetensorsFile> files;
  std::vector<std::shared_ptr<const void>> owners;
};

absl::Status LoadOne(const std::string& path, Loaded* out) {
  QF_ASSIGN_OR_RETURN(std::shared_ptr<const MappedFile> file, MappedFile::Open(path, out->residency));
  auto parsed = ParseSafetensorsFile(file->bytes());
  if (!parsed.ok()) return WithPath(parsed.status(), path);
  out->files.push_back(*std::move(parsed));
  out->owners.push_back(file);
  return absl::OkStatus();
}

absl::Status LoadSharded(const std::string& index_path, Loaded* out) {
  QF_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path));
  JsonLimits limits;
  limits.max_bytes = 64u << 20;
  auto parsed = ParseJson(text, limits);
  if (!parsed.ok()) return WithPath(Bad(absl::StrCat("index: ", parsed.status().message())), index_path);
  const Json* map = parsed->Find("weight_map");
  if (map == nullptr || !map->is_object()) return WithPath(Bad("index has no weight_map object"), index_path);
  const fs::path dir = fs::path(index_path).parent_path();
  std::map<std::string, std::set<std::string>> by_file;  // shard -> tensors
  for (const auto& [tensor, file] : map->object()) {
    if (!file.is_string()) return WithPath(Bad(absl::StrCat("weight_map entry '", tensor, "' is not a string")), index_path);
    const std::string& f = file.string_value();
    // The index is untrusted: shard names must stay inside the model directory.
    if (f.empty() || f.find('/') != std::string::npos || f.find('\\') != std::string::npos || f == "." || f == "..") {
      return WithPath(Bad(absl::StrCat("weight_map shard name '", f, "' is not a plain file name")), index_path);
    }
    by_file[f].insert(tensor);
  }
  if (by_file.empty()) return WithPath(Bad("index weight_map is empty"), index_path);
  for (const auto& [f, tensors] : by_file) {
    const std::string shard = (dir / f).string();
    QF_RETURN_IF_ERROR(LoadOne(shard, out));
    std::set<std::string> have;
    for (const SafetensorsEntry& e : out->files.back().tensors) have.insert(e.name);
    if (have != tensors) {
      for (const std::string& t : tensors) {
        if (have.count(t) == 0) return Bad(absl::StrCat("index says '", t, "' is in ", f, ", which lacks it"));
      }
      for (const std::string& t : have) {
        if (tensors.count(t) == 0) return Bad(absl::StrCat(f, " has tensor '", t, "' that the index does not list"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// Hugging Face keeps the chat template in tokenizer_config.json: "chat_template" is the Jinja text, or a list of
// {"name", "template"} whose "default" entry is the one apply_chat_template uses; newer exports put it in
// chat_template.jinja instead. A file that is there but unusable is noted in metadata, not fatal: the model
// still serves completions.
void AttachChatTemplate(const fs::path& dir, Model* m) {
  std::error_code ec;
  const fs::path config_path = dir / "tokenizer_config.json";
  if (fs::is_regular_file(config_path, ec)) {
    auto text = ReadFileToString(config_path.string());
    auto json = text.ok() ? ParseJson(*text) : absl::StatusOr<Json>(text.status());
    if (!json.ok()) {
      m->metadata["tokenizer.chat_template.skipped"] = absl::StrCat(config_path.string(), ": ", json.status().message());
    } else if (const Json* t = json->Find("chat_template"); t != nullptr) {
      if (t->is_string()) {
        m->metadata[kChatTemplateKey] = t->string_value();
        return;
      }
      if (t->is_array()) {
        for (const Json& entry : t->array()) {
          const Json* name = entry.Find("name");
          const Json* body = entry.Find("template");
          if (name != nullptr && name->is_string() && name->string_value() == "default" && body != nullptr &&
              body->is_string()) {
            m->metadata[kChatTemplateKey] = body->string_value();
            return;
          }
        }
      }
      m->metadata["tokenizer.chat_template.skipped"] =
          absl::StrCat(config_path.string(), ": chat_template is neither a string nor a list with a \"default\" entry");
    }
  }
  const fs::path jinja_path = dir / "chat_template.jinja";
  if (fs::is_regular_file(jinja_path, ec)) {
    if (auto text = ReadFileToString(jinja_path.string()); text.ok()) m->metadata[kChatTemplateKey] = *text;
  }
}

}  // namespace

absl::StatusOr<Model> ReadSafetensors(const std::string& path, MappedFile::Residency residency) {
  std::error_code ec;
  Loaded loaded;
  loaded.residency = residency;
  fs::path dir;
  if (fs::is_directory(path, ec)) {
    dir = path;
    if (fs::exists(dir / "model.safetensors.index.json", ec)) {
      QF_RETURN_IF_ERROR(LoadSharded((dir / "model.safetensors.index.json").string(), &loaded));
    } else {
      std::vector<std::string> shards;
      for (const auto& de : fs::directory_iterator(dir, ec)) {
        if (de.path().extension() == ".safetensors") shards.push_back(de.path().string());
      }
      if (ec) return absl::InternalError(absl::StrCat("cannot list ", path, ": ", ec.message()));
      if (shards.empty()) return absl::NotFoundError(absl::StrCat(path, ": no *.safetensors files"));
      std::sort(shards.begin(), shards.end());
      for (const std::string& s : shards) QF_RETURN_IF_ERROR(LoadOne(s, &loaded));
    }
  } else {
    dir = fs::path(path).parent_path();
    if (absl::EndsWith(path, ".index.json")) {
      QF_RETURN_IF_ERROR(LoadSharded(path, &loaded));
    } else {
      QF_RETURN_IF_ERROR(LoadOne(path, &loaded));
    }
  }
  const std::string config_path = (dir / "config.json").string();
  auto text = ReadFileToString(config_path);
  if (!text.ok()) return absl::NotFoundError(absl::StrCat("safetensors: no config.json beside ", path));
  auto config = ParseHfConfig(*text);
  if (!config.ok()) return WithPath(config.status(), config_path);
  auto m = ModelFromSafetensors(*config, loaded.files, loaded.owners);
  if (!m.ok()) return WithPath(m.status(), path);
  m->metadata["source.path"] = path;
  // Hugging Face keeps a SentencePiece vocabulary beside the weights as tokenizer.model.
  AttachSiblingTokenizer(path, {"tokenizer.model"}, &*m);
  AttachChatTemplate(dir, &*m);
  return m;
}

namespace {

// tokenizer_config.json for a SentencePiece vocabulary, so Hugging Face's LlamaTokenizer finds the special
// tokens (the normaliser flags live in tokenizer.model itself).
std::string HfTokenizerConfigJson(const Vocab& v, const std::map<std::string, std::string>& metadata) {
  auto piece = [&](int id) {
    return id >= 0 && static_cast<size_t>(id) < v.tokens.size() ? Json::String(v.tokens[id]) : Json::Null();
  };
  Json j = Json::MakeObject();
  j.Set("tokenizer_class", Json::String("LlamaTokenizer"));
  j.Set("bos_token", piece(v.bos_id));
  j.Set("eos_token", piece(v.eos_id));
  j.Set("unk_token", piece(v.unk_id));
  j.Set("add_bos_token", Json::Bool(true));
  j.Set("add_eos_token", Json::Bool(false));
  if (auto t = metadata.find(kChatTemplateKey); t != metadata.end()) j.Set("chat_template", Json::String(t->second));
  return j.Dump() + "\n";
}

absl::Status WriteText(const fs::path& path, const std::string& text) {
  return WriteFileAtomically(path.string(), std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

}  // namespace

absl::Status WriteSafetensors(const Model& m, const std::string& path) {
  QF_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, SerializeSafetensors(m));
  QF_RETURN_IF_ERROR(WriteFileAtomically(path, bytes));
  const fs::path dir = fs::path(path).parent_path();
  QF_RETURN_IF_ERROR(WriteText(dir / "config.json", HfConfigJson(m.config)));
  if (!m.vocab.has_value() || m.vocab->model != "llama") return absl::OkStatus();
  QF_RETURN_IF_ERROR(WriteSentencePieceModel(*m.vocab, (dir / "tokenizer.model").string()));
  return WriteText(dir / "tokenizer_config.json", HfTokenizerConfigJson(*m.vocab, m.metadata));
}

}  // namespace qforge::formats
