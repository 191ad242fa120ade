#include "core/lora/lora.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/formats/byte_reader.h"
#include "core/formats/json.h"
#include "core/formats/parsers.h"
#include "core/kernels/kernels.h"
#include "core/model/ggml_types.h"

namespace qforge::lora {
namespace {

using formats::ByteReader;
using formats::Json;

constexpr LoraTarget kAllTargets[kNumTargets] = {LoraTarget::kAttnQ,    LoraTarget::kAttnK,  LoraTarget::kAttnV,
                                                 LoraTarget::kAttnOutput, LoraTarget::kFfnGate, LoraTarget::kFfnUp,
                                                 LoraTarget::kFfnDown};
// Bounds against hostile files: no real adapter comes near them.
constexpr int kMaxRank = 4096;
constexpr uint64_t kMaxGgufTensors = 1u << 16;
constexpr uint64_t kMaxGgufKeys = 1u << 16;
constexpr uint64_t kMaxGgufString = 1u << 24;

// The base weight a target updates: {out, in}.
std::pair<int64_t, int64_t> TargetShape(const AdapterShape& s, LoraTarget t) {
  switch (t) {
    case LoraTarget::kAttnQ:
    case LoraTarget::kAttnOutput: return {s.dim, s.dim};
    case LoraTarget::kAttnK:
    case LoraTarget::kAttnV: return {s.kv_dim, s.dim};
    case LoraTarget::kFfnGate:
    case LoraTarget::kFfnUp: return {s.hidden_dim, s.dim};
    case LoraTarget::kFfnDown: return {s.dim, s.hidden_dim};
  }
  return {0, 0};
}

std::string CanonicalName(int layer, LoraTarget t) { return absl::StrCat("blk.", layer, ".", GgufStem(t), ".weight"); }

bool IsFfn(LoraTarget t) {
  return t == LoraTarget::kFfnGate || t == LoraTarget::kFfnUp || t == LoraTarget::kFfnDown;
}

// Reads `n` elements of a float dtype into fp32 (memcpy per element: file data need not be aligned).
absl::StatusOr<std::vector<float>> ToFloats(const std::string& what, const std::string& dtype, const uint8_t* data,
                                            size_t nbytes, int64_t n) {
  const size_t elem = dtype == "F32" ? 4 : (dtype == "F16" || dtype == "BF16") ? 2 : 0;
  if (elem == 0) return absl::UnimplementedError(absl::StrCat(what, ": dtype ", dtype, " (only F32, F16, BF16)"));
  if (nbytes != static_cast<size_t>(n) * elem) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", nbytes, " bytes for ", n, " ", dtype, " elements"));
  }
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (elem == 4) {
      std::memcpy(&out[i], data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      out[i] = dtype == "F16" ? HalfToFloat(h) : Bf16ToFloat(h);
    }
    if (!std::isfinite(out[i])) return absl::InvalidArgumentError(absl::StrCat(what, ": non-finite value at ", i));
  }
  return out;
}

// One half of a pair as found in a file, before pairing.
struct Half {
  std::vector<int64_t> shape;  // row-major [rows, cols]
  std::vector<float> values;
};
struct PairKey {
  int layer;
  LoraTarget target;
  bool operator<(const PairKey& o) const {
    return layer != o.layer ? layer < o.layer : static_cast<int>(target) < static_cast<int>(o.target);
  }
};

// Pairs A and B halves, checks shapes against the base, and builds the adapter. `scale_of(rank)` gives the
// file's scale rule; `describe(key, is_a)` names a tensor in errors.
absl::StatusOr<LoraAdapter> Assemble(std::map<PairKey, Half>& as, std::map<PairKey, Half>& bs,
                                     const ModelConfig& base, const std::function<float(int)>& scale_of,
                                     const std::function<std::string(const PairKey&, bool)>& describe) {
  LoraAdapter adapter;
  adapter.shape = ShapeOf(base);
  for (const auto& [key, half] : bs) {
    if (!as.contains(key)) return absl::InvalidArgumentError(absl::StrCat(describe(key, false), ": no matching A"));
  }
  for (auto& [key, a] : as) {
    auto bit = bs.find(key);
    if (bit == bs.end()) return absl::InvalidArgumentError(absl::StrCat(describe(key, true), ": no matching B"));
    Half& b = bit->second;
    if (key.layer >= base.n_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat(describe(key, true), ": layer ", key.layer, " but the base model has ", base.n_layers));
    }
    const auto [out, in] = TargetShape(adapter.shape, key.target);
    if (a.shape.size() != 2 || a.shape[1] != in || a.shape[0] < 1 || a.shape[0] > std::min<int64_t>(kMaxRank, in)) {
      return absl::InvalidArgumentError(absl::StrCat(describe(key, true), ": shape [", absl::StrJoin(a.shape, ", "),
                                                     "], expected [r, ", in, "] with 1 <= r <= ",
                                                     std::min<int64_t>(kMaxRank, in)));
    }
    const int64_t rank = a.shape[0];
    if (b.shape.size() != 2 || b.shape[0] != out || b.shape[1] != rank) {
      return absl::InvalidArgumentError(absl::StrCat(describe(key, false), ": shape [", absl::StrJoin(b.shape, ", "),
                                                     "], expected [", out, ", ", rank, "] (out, rank of A)"));
    }
    LoraMatrix m;
    m.layer = key.layer;
    m.target = key.target;
    m.rank = static_cast<int>(rank);
    m.in = in;
    m.out = out;
    m.scale = scale_of(m.rank);
    m.a = std::move(a.values);
    m.b = std::move(b.values);
    adapter.matrices.push_back(std::move(m));
  }
  if (adapter.matrices.empty()) return absl::InvalidArgumentError("adapter holds no LoRA tensors");
  QF_RETURN_IF_ERROR(adapter.Index());
  QF_RETURN_IF_ERROR(CheckAdapterFits(adapter, base));
  return adapter;
}

// Moves B's rows between HF's rotate-half q/k order and qforge's interleaved one (the same permutation the
// safetensors reader applies to q_proj / k_proj weights).
absl::Status PermuteB(LoraMatrix& m, const ModelConfig& base, bool from_hf) {
  if (m.target != LoraTarget::kAttnQ && m.target != LoraTarget::kAttnK) return absl::OkStatus();
  const int heads = m.target == LoraTarget::kAttnQ ? base.n_heads : base.n_kv_heads;
  const Tensor t = Tensor::FromFloats(CanonicalName(m.layer, m.target), {m.out, m.rank}, m.b);
  QF_ASSIGN_OR_RETURN(Tensor p, from_hf ? formats::PermuteQkFromHf(t, heads) : formats::PermuteQkToHf(t, heads));
  std::memcpy(m.b.data(), p.data, m.b.size() * sizeof(float));
  return absl::OkStatus();
}

// "N." at the front of s (a layer number without leading zeros) into *layer, consumed; names the tensor otherwise.
absl::Status ConsumeLayerNumber(absl::string_view* s, const std::string& name, int* layer) {
  const size_t dot = s->find('.');
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(s->substr(0, dot), layer) || *layer < 0 ||
      (dot > 1 && (*s)[0] == '0')) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": bad layer number"));
  }
  s->remove_prefix(dot + 1);
  return absl::OkStatus();
}

// --- PEFT names --------------------------------------------------------------------------------------------------

// "base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight" -> (N, q_proj, A).
absl::Status ParsePeftName(const std::string& name, PairKey* key, bool* is_a) {
  absl::string_view s = name;
  if (!absl::ConsumePrefix(&s, "base_model.model.")) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": expected the PEFT prefix base_model.model."));
  }
  if (absl::StrContains(s, "lora_embedding_") || absl::StartsWith(s, "lm_head") ||
      absl::StartsWith(s, "model.embed_tokens")) {
    return absl::UnimplementedError(absl::StrCat("tensor ", name, ": embedding / lm_head adapters"));
  }
  if (absl::EndsWith(s, ".lora_A.weight")) {
    *is_a = true;
    s.remove_suffix(absl::string_view(".lora_A.weight").size());
  } else if (absl::EndsWith(s, ".lora_B.weight")) {
    *is_a = false;
    s.remove_suffix(absl::string_view(".lora_B.weight").size());
  } else if (absl::StrContains(s, "lora_magnitude_vector")) {
    return absl::UnimplementedError(absl::StrCat("tensor ", name, ": DoRA"));
  } else {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": not a lora_A / lora_B weight"));
  }
  if (!absl::ConsumePrefix(&s, "model.layers.")) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": expected model.layers.N."));
  }
  int layer = -1;
  QF_RETURN_IF_ERROR(ConsumeLayerNumber(&s, name, &layer));
  for (LoraTarget t : kAllTargets) {
    const std::string want = absl::StrCat(IsFfn(t) ? "mlp." : "self_attn.", PeftModuleName(t));
    if (s == want) {
      *key = PairKey{layer, t};
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": module ", s, " is not one of self_attn.",
                                                 "{q,k,v,o}_proj, mlp.{gate,up,down}_proj"));
}

std::string PeftName(const PairKey& k, bool is_a) {
  return absl::StrCat("base_model.model.model.layers.", k.layer, IsFfn(k.target) ? ".mlp." : ".self_attn.",
                      PeftModuleName(k.target), is_a ? ".lora_A.weight" : ".lora_B.weight");
}

std::string GgufName(const PairKey& k, bool is_a) {
  return absl::StrCat(CanonicalName(k.layer, k.target), is_a ? ".lora_a" : ".lora_b");
}

// --- GGUF --------------------------------------------------------------------------------------------------------

enum GgufType : uint32_t {
  kU8 = 0, kI8, kU16, kI16, kU32, kI32, kF32, kBool, kString, kArray, kU64, kI64, kF64, kNumGgufTypes
};
size_t ScalarSize(uint32_t t) {
  switch (t) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: return 8;
    default: return 0;
  }
}

struct GgufValue {
  uint32_t type = 0;
  std::string str;   // kString
  double number = 0;  // numeric scalars and bool
};

absl::Status ReadGgufString(ByteReader& r, std::string* out, const char* what) {
  uint64_t n = 0;
  QF_RETURN_IF_ERROR(r.Read(&n, what));
  if (n > kMaxGgufString) return absl::InvalidArgumentError(absl::StrCat("gguf lora: ", what, " of ", n, " bytes"));
  return r.ReadString(n, out, what);
}

absl::Status ReadScalar(ByteReader& r, uint32_t type, double* out, const std::string& key) {
  uint8_t b[8] = {};
  const size_t n = ScalarSize(type);
  std::span<const uint8_t> s;
  QF_RETURN_IF_ERROR(r.ReadSpan(n, &s, "metadata value"));
  std::memcpy(b, s.data(), n);
  switch (type) {
    case kU8: *out = b[0]; break;
    case kI8: *out = static_cast<int8_t>(b[0]); break;
    case kBool:
      if (b[0] > 1) return absl::InvalidArgumentError(absl::StrCat("gguf lora: key ", key, ": bool ", int{b[0]}));
      *out = b[0];
      break;
    case kU16: { uint16_t v; std::memcpy(&v, b, 2); *out = v; break; }
    case kI16: { int16_t v; std::memcpy(&v, b, 2); *out = v; break; }
    case kU32: { uint32_t v; std::memcpy(&v, b, 4); *out = v; break; }
    case kI32: { int32_t v; std::memcpy(&v, b, 4); *out = v; break; }
    case kF32: { float v; std::memcpy(&v, b, 4); *out = v; break; }
    case kU64: { uint64_t v; std::memcpy(&v, b, 8); *out = static_cast<double>(v); break; }
    case kI64: { int64_t v; std::memcpy(&v, b, 8); *out = static_cast<double>(v); break; }
    case kF64: { double v; std::memcpy(&v, b, 8); *out = v; break; }
    default: return absl::InvalidArgumentError(absl::StrCat("gguf lora: key ", key, ": value type ", type));
  }
  return absl::OkStatus();
}

absl::Status ReadGgufValue(ByteReader& r, const std::string& key, GgufValue* v) {
  QF_RETURN_IF_ERROR(r.Read(&v->type, "metadata type"));
  if (v->type == kString) return ReadGgufString(r, &v->str, "metadata string");
  if (v->type != kArray) return ReadScalar(r, v->type, &v->number, key);
  // Arrays are skipped: no adapter key this reader uses is one. Arrays of arrays are refused (none exist).
  uint32_t elem = 0;
  uint64_t count = 0;
  QF_RETURN_IF_ERROR(r.Read(&elem, "array element type"));
  QF_RETURN_IF_ERROR(r.Read(&count, "array length"));
  if (elem == kString) {
    if (count > r.remaining() / 8) return r.Truncated(count * 8, "string array");
    std::string s;
    for (uint64_t i = 0; i < count; ++i) QF_RETURN_IF_ERROR(ReadGgufString(r, &s, "array string"));
    return absl::OkStatus();
  }
  const size_t size = ScalarSize(elem);
  if (size == 0) return absl::InvalidArgumentError(absl::StrCat("gguf lora: key ", key, ": array of type ", elem));
  if (count > r.remaining() / size) return r.Truncated(count * size, "array");
  return r.Skip(count * size, "array");
}

// "blk.N.attn_q.weight.lora_a" -> (N, attn_q, A).
absl::Status ParseGgufName(const std::string& name, PairKey* key, bool* is_a) {
  absl::string_view s = name;
  if (absl::ConsumeSuffix(&s, ".weight.lora_a")) {
    *is_a = true;
  } else if (absl::ConsumeSuffix(&s, ".weight.lora_b")) {
    *is_a = false;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": not a .weight.lora_a / .weight.lora_b tensor"));
  }
  if (s == "token_embd" || s == "output") {
    return absl::UnimplementedError(absl::StrCat("tensor ", name, ": embedding / output adapters"));
  }
  if (!absl::ConsumePrefix(&s, "blk.")) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": expected blk.N."));
  }
  int layer = -1;
  QF_RETURN_IF_ERROR(ConsumeLayerNumber(&s, name, &layer));
  for (LoraTarget t : kAllTargets) {
    if (s == GgufStem(t)) {
      *key = PairKey{layer, t};
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": ", s, " is not a linear qforge adapts"));
}

void PutU32(std::vector<uint8_t>& o, uint32_t v) { o.insert(o.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 4); }
void PutU64(std::vector<uint8_t>& o, uint64_t v) { o.insert(o.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 8); }
void PutString(std::vector<uint8_t>& o, const std::string& s) {
  PutU64(o, s.size());
  o.insert(o.end(), s.begin(), s.end());
}
void PutFloats(std::vector<uint8_t>& o, const std::vector<float>& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(v.data());
  o.insert(o.end(), p, p + v.size() * sizeof(float));
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return s;
}

}  // namespace

const char* PeftModuleName(LoraTarget t) {
  static constexpr const char* kNames[kNumTargets] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"};
  return kNames[static_cast<int>(t)];
}

const char* GgufStem(LoraTarget t) {
  static constexpr const char* kNames[kNumTargets] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                                      "ffn_gate", "ffn_up", "ffn_down"};
  return kNames[static_cast<int>(t)];
}

AdapterShape ShapeOf(const ModelConfig& c) { return {c.n_layers, c.dim, c.kv_dim(), c.hidden_dim}; }

const LoraMatrix* LoraAdapter::Find(int layer, LoraTarget t) const {
  const size_t i = static_cast<size_t>(layer) * kNumTargets + static_cast<int>(t);
  if (layer < 0 || i >= index_.size() || index_[i] < 0) return nullptr;
  return &matrices[index_[i]];
}

int LoraAdapter::max_rank() const {
  int r = 0;
  for (const LoraMatrix& m : matrices) r = std::max(r, m.rank);
  return r;
}

size_t LoraAdapter::bytes() const {
  size_t n = 0;
  for (const LoraMatrix& m : matrices) n += (m.a.size() + m.b.size() + m.b_t.size()) * sizeof(float);
  return n;
}

absl::Status LoraAdapter::Index() {
  std::sort(matrices.begin(), matrices.end(), [](const LoraMatrix& x, const LoraMatrix& y) {
    return PairKey{x.layer, x.target} < PairKey{y.layer, y.target};
  });
  index_.assign(static_cast<size_t>(std::max(shape.n_layers, 0)) * kNumTargets, -1);
  for (size_t i = 0; i < matrices.size(); ++i) {
    LoraMatrix& m = matrices[i];
    const std::string name = CanonicalName(m.layer, m.target);
    if (m.layer < 0 || m.layer >= shape.n_layers) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": layer outside the model's ", shape.n_layers));
    }
    const auto [out, in] = TargetShape(shape, m.target);
    if (m.in != in || m.out != out || m.rank < 1 || m.a.size() != static_cast<size_t>(m.rank * in) ||
        m.b.size() != static_cast<size_t>(out * m.rank)) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": A/B sizes do not match [", out, ", ", in, "]"));
    }
    int& slot = index_[static_cast<size_t>(m.layer) * kNumTargets + static_cast<int>(m.target)];
    if (slot >= 0) return absl::InvalidArgumentError(absl::StrCat(name, ": adapted twice"));
    slot = static_cast<int>(i);
    m.b_t.resize(m.b.size());
    for (int64_t o = 0; o < m.out; ++o) {
      for (int j = 0; j < m.rank; ++j) m.b_t[static_cast<size_t>(j) * m.out + o] = m.b[o * m.rank + j];
    }
  }
  return absl::OkStatus();
}

absl::Status CheckAdapterFits(const LoraAdapter& adapter, const ModelConfig& base) {
  const AdapterShape want = ShapeOf(base);
  if (!(adapter.shape == want)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter built for layers/dim/kv_dim/hidden ", adapter.shape.n_layers, "/", adapter.shape.dim, "/",
        adapter.shape.kv_dim, "/", adapter.shape.hidden_dim, ", the model has ", want.n_layers, "/", want.dim, "/",
        want.kv_dim, "/", want.hidden_dim));
  }
  if (base.is_moe()) {
    for (const LoraMatrix& m : adapter.matrices) {
      if (IsFfn(m.target)) {
        return absl::UnimplementedError(
            absl::StrCat(CanonicalName(m.layer, m.target), ": LoRA on a Mixture-of-Experts FFN"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<LoraAdapter> ParsePeftAdapter(std::span<const uint8_t> safetensors, const std::string& config_json,
                                             const ModelConfig& base) {
  QF_RETURN_IF_ERROR(ValidateConfig(base));
  auto parsed = formats::ParseJson(config_json);
  if (!parsed.ok()) return absl::InvalidArgumentError(absl::StrCat("adapter_config.json: ", parsed.status().message()));
  const Json& cfg = *parsed;
  if (!cfg.is_object()) return absl::InvalidArgumentError("adapter_config.json: not an object");
  auto field = [&](const char* name) { return cfg.Find(name); };
  auto bad = [](const char* name, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("adapter_config.json: ", name, ": ", why));
  };
  if (const Json* p = field("peft_type"); p && !(p->is_string() && p->string_value() == "LORA")) {
    return absl::UnimplementedError("adapter_config.json: peft_type: only LORA");
  }
  const Json* r = field("r");
  if (r == nullptr || !r->is_int() || r->int_value() < 1 || r->int_value() > kMaxRank) {
    return bad("r", absl::StrCat("must be an integer in [1, ", kMaxRank, "]"));
  }
  const Json* alpha_j = field("lora_alpha");
  if (alpha_j == nullptr || !alpha_j->is_number() || !std::isfinite(alpha_j->number_value())) {
    return bad("lora_alpha", "must be a number");
  }
  const int rank = static_cast<int>(r->int_value());
  const double alpha = alpha_j->number_value();
  for (const char* flag : {"use_dora", "fan_in_fan_out"}) {
    if (const Json* f = field(flag); f && f->bool_value()) {
      return absl::UnimplementedError(absl::StrCat("adapter_config.json: ", flag, ": true"));
    }
  }
  if (const Json* b = field("bias"); b && !(b->is_string() && b->string_value() == "none")) {
    return absl::UnimplementedError("adapter_config.json: bias: only \"none\"");
  }
  for (const char* pattern : {"rank_pattern", "alpha_pattern"}) {
    if (const Json* p = field(pattern); p && !p->is_null() && !(p->is_object() && p->object().empty())) {
      return absl::UnimplementedError(absl::StrCat("adapter_config.json: ", pattern, ": per-module ranks or alphas"));
    }
  }
  if (const Json* m = field("modules_to_save"); m && !m->is_null() && !(m->is_array() && m->array().empty())) {
    return absl::UnimplementedError("adapter_config.json: modules_to_save: fully trained modules");
  }
  bool rslora = false;
  if (const Json* f = field("use_rslora"); f) rslora = f->bool_value();
  // target_modules: a list is checked against the file's tensors; a string is a regex (or "all-linear") that
  // PEFT matched when it saved the file, so the tensors themselves say what is adapted.
  std::set<std::string> targets;
  bool check_targets = false;
  const Json* tm = field("target_modules");
  if (tm == nullptr || !(tm->is_array() || tm->is_string())) return bad("target_modules", "must be a list or a string");
  if (tm->is_array()) {
    check_targets = true;
    for (const Json& m : tm->array()) {
      if (!m.is_string()) return bad("target_modules", "entries must be strings");
      targets.insert(m.string_value());
    }
  }

  QF_ASSIGN_OR_RETURN(formats::SafetensorsFile file, formats::ParseSafetensorsFile(safetensors));
  std::map<PairKey, Half> as, bs;
  for (const formats::SafetensorsEntry& e : file.tensors) {
    PairKey key{};
    bool is_a = false;
    QF_RETURN_IF_ERROR(ParsePeftName(e.name, &key, &is_a));
    if (check_targets && !targets.contains(PeftModuleName(key.target))) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", e.name, ": ", PeftModuleName(key.target), " is not in target_modules"));
    }
    if (e.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", e.name, ": ", e.shape.size(), "-D, expected 2-D"));
    }
    int64_t n = 0;
    if (__builtin_mul_overflow(e.shape[0], e.shape[1], &n)) return absl::InvalidArgumentError(e.name);
    QF_ASSIGN_OR_RETURN(std::vector<float> v, ToFloats(absl::StrCat("tensor ", e.name), e.dtype, e.data, e.nbytes, n));
    (is_a ? as : bs)[key] = Half{e.shape, std::move(v)};
    if (is_a && e.shape[0] != rank) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", e.name, ": rank ", e.shape[0],
                                                     " but adapter_config.json r is ", rank));
    }
  }
  const float scale = static_cast<float>(rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank);
  QF_ASSIGN_OR_RETURN(LoraAdapter adapter, Assemble(as, bs, base, [&](int) { return scale; }, PeftName));
  adapter.format = "peft";
  adapter.alpha = static_cast<float>(alpha);
  for (LoraMatrix& m : adapter.matrices) QF_RETURN_IF_ERROR(PermuteB(m, base, /*from_hf=*/true));
  QF_RETURN_IF_ERROR(adapter.Index());  // B moved: its transpose follows
  return adapter;
}

absl::StatusOr<LoraAdapter> ParseGgufAdapter(std::span<const uint8_t> gguf, const ModelConfig& base) {
  QF_RETURN_IF_ERROR(ValidateConfig(base));
  ByteReader r(gguf, "gguf lora");
  uint32_t magic = 0, version = 0;
  QF_RETURN_IF_ERROR(r.Read(&magic, "magic"));
  if (magic != 0x46554747u) return absl::InvalidArgumentError("gguf lora: not a GGUF file (bad magic)");
  QF_RETURN_IF_ERROR(r.Read(&version, "version"));
  if (version != 2 && version != 3) return absl::UnimplementedError(absl::StrCat("gguf lora: version ", version));
  uint64_t n_tensors = 0, n_kv = 0;
  QF_RETURN_IF_ERROR(r.Read(&n_tensors, "tensor count"));
  QF_RETURN_IF_ERROR(r.Read(&n_kv, "metadata count"));
  if (n_tensors > kMaxGgufTensors || n_kv > kMaxGgufKeys) {
    return absl::InvalidArgumentError(absl::StrCat("gguf lora: ", n_tensors, " tensors, ", n_kv, " keys"));
  }
  std::map<std::string, GgufValue> kv;
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    QF_RETURN_IF_ERROR(ReadGgufString(r, &key, "metadata key"));
    GgufValue v;
    QF_RETURN_IF_ERROR(ReadGgufValue(r, key, &v));
    if (!kv.emplace(key, std::move(v)).second) {
      return absl::InvalidArgumentError(absl::StrCat("gguf lora: key ", key, " appears twice"));
    }
  }
  auto string_key = [&](const std::string& key) -> const std::string* {
    auto it = kv.find(key);
    return it != kv.end() && it->second.type == kString ? &it->second.str : nullptr;
  };
  const std::string* type = string_key("general.type");
  if (type == nullptr || *type != "adapter") {
    return absl::InvalidArgumentError("gguf lora: general.type: must be the string \"adapter\"");
  }
  const std::string* adapter_type = string_key("adapter.type");
  if (adapter_type == nullptr || *adapter_type != "lora") {
    return absl::InvalidArgumentError("gguf lora: adapter.type: must be the string \"lora\"");
  }
  if (auto it = kv.find("general.architecture"); it != kv.end() && (it->second.type != kString || it->second.str != "llama")) {
    return absl::InvalidArgumentError("gguf lora: general.architecture: must be \"llama\"");
  }
  double alpha = 0;
  if (auto it = kv.find("adapter.lora.alpha"); it != kv.end()) {
    if (it->second.type == kString || it->second.type == kArray || it->second.type == kBool ||
        !std::isfinite(it->second.number)) {
      return absl::InvalidArgumentError("gguf lora: adapter.lora.alpha: must be a finite number");
    }
    alpha = it->second.number;
  }
  uint64_t alignment = 32;
  if (auto it = kv.find("general.alignment"); it != kv.end()) {
    const double a = it->second.type == kU32 ? it->second.number : -1;
    if (a < 1 || a > 65536 || (static_cast<uint64_t>(a) & (static_cast<uint64_t>(a) - 1)) != 0) {
      return absl::InvalidArgumentError("gguf lora: general.alignment: must be a u32 power of two <= 65536");
    }
    alignment = static_cast<uint64_t>(a);
  }

  struct Info {
    std::string name;
    std::vector<int64_t> ne;
    uint32_t type;
    uint64_t offset;
  };
  std::vector<Info> infos;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    Info t;
    QF_RETURN_IF_ERROR(ReadGgufString(r, &t.name, "tensor name"));
    uint32_t n_dims = 0;
    QF_RETURN_IF_ERROR(r.Read(&n_dims, "tensor dims"));
    if (n_dims < 1 || n_dims > 4) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": ", n_dims, " dimensions"));
    }
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne = 0;
      QF_RETURN_IF_ERROR(r.Read(&ne, "tensor dim"));
      if (ne < 1 || ne > (1u << 30)) return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": dim ", ne));
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    QF_RETURN_IF_ERROR(r.Read(&t.type, "tensor type"));
    QF_RETURN_IF_ERROR(r.Read(&t.offset, "tensor offset"));
    infos.push_back(std::move(t));
  }
  uint64_t data_start = 0;
  if (!formats::AddOk(r.pos(), alignment - 1, &data_start)) return absl::InvalidArgumentError("gguf lora: offsets");
  data_start = data_start / alignment * alignment;
  if (data_start > gguf.size()) return absl::InvalidArgumentError("gguf lora: data section past the end of the file");

  std::map<PairKey, Half> as, bs;
  std::set<std::string> seen;
  for (const Info& t : infos) {
    if (!seen.insert(t.name).second) return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": twice"));
    PairKey key{};
    bool is_a = false;
    QF_RETURN_IF_ERROR(ParseGgufName(t.name, &key, &is_a));
    // Trailing ggml dims of 1 are allowed; a LoRA half is a matrix.
    std::vector<int64_t> ne = t.ne;
    while (ne.size() > 2 && ne.back() == 1) ne.pop_back();
    if (ne.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": ", ne.size(), "-D, expected 2-D"));
    }
    // Any ggml type the kernels decode (llama.cpp's converter writes f32, f16, bf16 or q8_0): the bytes become a
    // [ne1, ne0] tensor of that type, decoded to fp32 by the same code that decodes model weights.
    const GgmlTypeTraits* g = FindGgmlTypeById(t.type);
    if (g == nullptr) {
      return absl::UnimplementedError(absl::StrCat("tensor ", t.name, ": ggml type ", t.type,
                                                   " is not one qforge decodes"));
    }
    if (ne[0] % g->block != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": rows of ", ne[0], " elements are not whole ",
                                                     g->name, " blocks of ", g->block));
    }
    const uint64_t n = static_cast<uint64_t>(ne[0]) * static_cast<uint64_t>(ne[1]);  // each <= 2^30
    uint64_t nbytes = 0, begin = 0, end = 0;
    if (!formats::MulOk(n / g->block, g->block_bytes, &nbytes) || !formats::AddOk(data_start, t.offset, &begin) ||
        !formats::AddOk(begin, nbytes, &end) || end > gguf.size() || t.offset % alignment != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": data at offset ", t.offset, " (",
                                                     nbytes, " bytes) outside the file or misaligned"));
    }
    const Tensor stored = Tensor::FromBytes(t.name, {ne[1], ne[0]}, WeightFormat::Of(g->type),
                                            std::vector<uint8_t>(gguf.data() + begin, gguf.data() + end));
    std::vector<float> v(static_cast<size_t>(n));
    if (absl::Status st = kernels::DequantizeRows(stored, 0, ne[1], v.data()); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": ", st.message()));
    }
    for (size_t i = 0; i < v.size(); ++i) {
      if (!std::isfinite(v[i])) {
        return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": non-finite value at ", i));
      }
    }
    // ggml ne[0] is the contiguous axis: ne = [cols, rows] of the row-major matrix.
    (is_a ? as : bs)[key] = Half{{ne[1], ne[0]}, std::move(v)};
  }
  const float a = static_cast<float>(alpha);
  QF_ASSIGN_OR_RETURN(LoraAdapter adapter, Assemble(as, bs, base, [&](int rank) { return a != 0 ? a / rank : 1.0f; },
                                                    GgufName));
  adapter.format = "gguf";
  adapter.alpha = a;
  return adapter;
}

absl::StatusOr<AdapterFiles> ReadAdapterFiles(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  AdapterFiles files;
  files.where = path;
  std::string weights, config;
  if (fs::is_directory(path, ec)) {
    const fs::path dir(path);
    QF_ASSIGN_OR_RETURN(weights, ReadWholeFile((dir / "adapter_model.safetensors").string()));
    QF_ASSIGN_OR_RETURN(config, ReadWholeFile((dir / "adapter_config.json").string()));
    files.format = "peft";
  } else {
    QF_ASSIGN_OR_RETURN(weights, ReadWholeFile(path));
    if (weights.size() >= 4 && std::memcmp(weights.data(), "GGUF", 4) == 0) {
      files.format = "gguf";
    } else if (absl::EndsWith(path, ".safetensors")) {
      QF_ASSIGN_OR_RETURN(config, ReadWholeFile((fs::path(path).parent_path() / "adapter_config.json").string()));
      files.format = "peft";
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": not a GGUF LoRA, a PEFT directory or an adapter_model.safetensors"));
    }
  }
  files.weights.assign(weights.begin(), weights.end());
  files.config_json = std::move(config);
  return files;
}

absl::StatusOr<LoraAdapter> ParseAdapterFiles(const AdapterFiles& files, const ModelConfig& base) {
  absl::StatusOr<LoraAdapter> a;
  if (files.format == "gguf") {
    a = ParseGgufAdapter(files.weights, base);
  } else if (files.format == "peft") {
    a = ParsePeftAdapter(files.weights, files.config_json, base);
  } else {
    a = absl::InvalidArgumentError(absl::StrCat("adapter format '", files.format, "': must be gguf or peft"));
  }
  if (!a.ok() && !files.where.empty()) {
    return absl::Status(a.status().code(), absl::StrCat(files.where, ": ", a.status().message()));
  }
  return a;
}

absl::StatusOr<LoraAdapter> LoadAdapter(const std::string& path, const ModelConfig& base) {
  QF_ASSIGN_OR_RETURN(const AdapterFiles files, ReadAdapterFiles(path));
  return ParseAdapterFiles(files, base);
}

absl::StatusOr<LoraAdapter> MakeRandomAdapter(const ModelConfig& base, const std::vector<LoraTarget>& targets,
                                              int rank, float alpha, uint64_t seed, float amplitude) {
  QF_RETURN_IF_ERROR(ValidateConfig(base));
  if (rank < 1 || rank > kMaxRank) return absl::InvalidArgumentError(absl::StrCat("rank ", rank));
  uint64_t state = seed;
  auto next = [&]() {  // splitmix64 -> uniform [-amplitude, amplitude]
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>((static_cast<double>(z >> 11) * 0x1.0p-53 * 2.0 - 1.0) * amplitude);
  };
  LoraAdapter adapter;
  adapter.format = "generated";
  adapter.alpha = alpha;
  adapter.shape = ShapeOf(base);
  for (int l = 0; l < base.n_layers; ++l) {
    for (LoraTarget t : targets) {
      LoraMatrix m;
      m.layer = l;
      m.target = t;
      m.rank = rank;
      std::tie(m.out, m.in) = TargetShape(adapter.shape, t);
      m.scale = alpha / rank;
      m.a.resize(static_cast<size_t>(rank * m.in));
      m.b.resize(static_cast<size_t>(m.out * rank));
      for (float& v : m.a) v = next();
      for (float& v : m.b) v = next();
      adapter.matrices.push_back(std::move(m));
    }
  }
  QF_RETURN_IF_ERROR(adapter.Index());
  QF_RETURN_IF_ERROR(CheckAdapterFits(adapter, base));
  return adapter;
}

absl::StatusOr<PeftFiles> SerializePeftAdapter(const LoraAdapter& adapter, const ModelConfig& base) {
  QF_RETURN_IF_ERROR(CheckAdapterFits(adapter, base));
  if (adapter.matrices.empty()) return absl::InvalidArgumentError("adapter holds no LoRA tensors");
  const int rank = adapter.matrices.front().rank;
  std::set<std::string> modules;
  std::vector<std::pair<std::string, const std::vector<float>*>> tensors;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<LoraMatrix> hf = adapter.matrices;  // B of q/k goes back to HF's order
  for (LoraMatrix& m : hf) {
    if (m.rank != rank) return absl::UnimplementedError("PEFT writer: matrices of different ranks");
    QF_RETURN_IF_ERROR(PermuteB(m, base, /*from_hf=*/false));
    modules.insert(PeftModuleName(m.target));
  }
  Json header = Json::MakeObject();
  Json meta = Json::MakeObject();
  meta.Set("format", Json::String("pt"));
  header.Set("__metadata__", meta);
  uint64_t offset = 0;
  for (const LoraMatrix& m : hf) {
    const PairKey key{m.layer, m.target};
    for (bool is_a : {true, false}) {
      const std::vector<float>& v = is_a ? m.a : m.b;
      Json entry = Json::MakeObject();
      entry.Set("dtype", Json::String("F32"));
      Json shape = Json::MakeArray();
      shape.mutable_array().push_back(Json::Int(is_a ? m.rank : m.out));
      shape.mutable_array().push_back(Json::Int(is_a ? m.in : m.rank));
      entry.Set("shape", shape);
      Json offsets = Json::MakeArray();
      offsets.mutable_array().push_back(Json::Int(static_cast<int64_t>(offset)));
      offset += v.size() * sizeof(float);
      offsets.mutable_array().push_back(Json::Int(static_cast<int64_t>(offset)));
      entry.Set("data_offsets", offsets);
      header.Set(PeftName(key, is_a), entry);
    }
  }
  std::string text = header.Dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  PeftFiles files;
  PutU64(files.safetensors, text.size());
  files.safetensors.insert(files.safetensors.end(), text.begin(), text.end());
  for (const LoraMatrix& m : hf) {
    PutFloats(files.safetensors, m.a);
    PutFloats(files.safetensors, m.b);
  }
  Json config = Json::MakeObject();
  config.Set("peft_type", Json::String("LORA"));
  config.Set("r", Json::Int(rank));
  config.Set("lora_alpha", Json::Double(adapter.alpha));
  Json list = Json::MakeArray();
  for (const std::string& m : modules) list.mutable_array().push_back(Json::String(m));
  config.Set("target_modules", list);
  config.Set("bias", Json::String("none"));
  config.Set("lora_dropout", Json::Double(0.0));
  files.config_json = config.Dump();
  return files;
}

absl::StatusOr<std::vector<uint8_t>> SerializeGgufAdapter(const LoraAdapter& adapter) {
  std::vector<uint8_t> o;
  PutU32(o, 0x46554747u);
  PutU32(o, 3);
  PutU64(o, 2 * adapter.matrices.size());
  PutU64(o, 4);
  PutString(o, "general.architecture");
  PutU32(o, kString);
  PutString(o, "llama");
  PutString(o, "general.type");
  PutU32(o, kString);
  PutString(o, "adapter");
  PutString(o, "adapter.type");
  PutU32(o, kString);
  PutString(o, "lora");
  PutString(o, "adapter.lora.alpha");
  PutU32(o, kF32);
  const float alpha = adapter.alpha;
  o.insert(o.end(), reinterpret_cast<const uint8_t*>(&alpha), reinterpret_cast<const uint8_t*>(&alpha) + 4);
  constexpr uint64_t kAlign = 32;
  uint64_t offset = 0;
  for (const LoraMatrix& m : adapter.matrices) {
    for (bool is_a : {true, false}) {
      PutString(o, GgufName(PairKey{m.layer, m.target}, is_a));
      PutU32(o, 2);
      PutU64(o, static_cast<uint64_t>(is_a ? m.in : m.rank));   // ne[0]: the contiguous axis
      PutU64(o, static_cast<uint64_t>(is_a ? m.rank : m.out));  // ne[1]
      PutU32(o, 0);  // F32
      PutU64(o, offset);
      offset += ((is_a ? m.a : m.b).size() * sizeof(float) + kAlign - 1) / kAlign * kAlign;
    }
  }
  o.resize((o.size() + kAlign - 1) / kAlign * kAlign, 0);
  for (const LoraMatrix& m : adapter.matrices) {
    for (const std::vector<float>* v : {&m.a, &m.b}) {
      PutFloats(o, *v);
      o.resize((o.size() + kAlign - 1) / kAlign * kAlign, 0);
    }
  }
  return o;
}

absl::StatusOr<Model> MergeAdapter(const Model& base, const LoraAdapter& adapter) {
  QF_RETURN_IF_ERROR(CheckAdapterFits(adapter, base.config));
  Model merged = base;
  for (const LoraMatrix& m : adapter.matrices) {
    const std::string name = CanonicalName(m.layer, m.target);
    QF_ASSIGN_OR_RETURN(const Tensor* w, base.Get(name));
    if (w->rows() != m.out || w->cols() != m.in) return absl::InvalidArgumentError(absl::StrCat(name, ": shape"));
    std::vector<float> values(static_cast<size_t>(m.out * m.in));
    QF_RETURN_IF_ERROR(kernels::DequantizeRows(*w, 0, m.out, values.data()));
    for (int64_t o = 0; o < m.out; ++o) {
      for (int64_t i = 0; i < m.in; ++i) {
        double d = 0;
        for (int j = 0; j < m.rank; ++j) d += static_cast<double>(m.b[o * m.rank + j]) * m.a[j * m.in + i];
        float& v = values[o * m.in + i];
        v = static_cast<float>(static_cast<double>(v) + static_cast<double>(m.scale) * d);
      }
    }
    merged.tensors[name] = Tensor::FromFloats(name, {m.out, m.in}, values);
  }
  merged.metadata["lora.merged"] = adapter.format;
  return merged;
}

}  // namespace qforge::lora
