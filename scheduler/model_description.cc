#include "scheduler/model_description.h"

#include <charconv>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/formats/formats.h"

namespace qforge::scheduler {
namespace {

// Parses a non-negative decimal integer at the start of s; returns the digits consumed (0 if none).
size_t ParseIndex(std::string_view s, int32_t* out) {
  const auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  if (r.ec != std::errc()) return 0;
  return static_cast<size_t>(r.ptr - s.data());
}

}  // namespace

void ParseTensorName(std::string_view name, int32_t* layer, int32_t* expert) {
  *layer = -1;
  *expert = -1;
  if (name.substr(0, 4) != "blk.") return;
  std::string_view rest = name.substr(4);
  int32_t l = 0;
  const size_t n = ParseIndex(rest, &l);
  if (n == 0 || n >= rest.size() || rest[n] != '.') return;
  *layer = l;
  rest = rest.substr(n + 1);  // "ffn_up.7.weight"
  const size_t dot = rest.find('.');
  if (dot == std::string_view::npos) return;
  rest = rest.substr(dot + 1);  // "7.weight" or "weight"
  int32_t e = 0;
  const size_t m = ParseIndex(rest, &e);
  if (m > 0 && m < rest.size() && rest[m] == '.') *expert = e;
}

void ModelDescription::AddTensor(std::string_view name, int64_t rows, int64_t cols, int ndim, WeightFormat format,
                                 uint64_t source_bytes, uint64_t source_offset) {
  TensorDesc t;
  t.name_begin = static_cast<uint32_t>(name_arena.size());
  t.name_size = static_cast<uint32_t>(name.size());
  name_arena.append(name);
  t.rows = rows;
  t.cols = cols;
  t.ndim = static_cast<uint8_t>(ndim);
  t.format = format;
  t.source_bytes = source_bytes;
  t.source_offset = source_offset;
  ParseTensorName(name, &t.layer, &t.expert);
  tensors.push_back(t);
}

int64_t ModelDescription::ParameterCount() const {
  int64_t n = 0;
  for (const TensorDesc& t : tensors) n += t.rows * t.cols;
  return n;
}

uint64_t ModelDescription::SourceBytes() const {
  uint64_t n = 0;
  for (const TensorDesc& t : tensors) n += t.source_bytes;
  return n;
}

size_t ModelDescription::MemoryBytes() const {
  return sizeof(*this) + tensors.capacity() * sizeof(TensorDesc) + name_arena.capacity() + source_uri.capacity();
}

absl::StatusOr<ModelDescription> DescribeModel(const std::string& path) {
  QF_ASSIGN_OR_RETURN(const formats::FileFormat ff, formats::DetectFormat(path));
  QF_ASSIGN_OR_RETURN(const Model m, formats::LoadModel(path));
  ModelDescription d;
  d.source_uri = path;
  d.file_format = formats::FileFormatName(ff);
  d.has_vocab = m.vocab.has_value();
  d.config = m.config;
  d.tensors.reserve(m.tensors.size());
  for (const auto& [name, t] : m.tensors) {
    if (t.shape.empty() || t.shape.size() > 2) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " has ", t.shape.size(),
                                                     " dimensions; the planner handles vectors and matrices"));
    }
    if (t.rows() >= (int64_t{1} << 31)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " has too many rows"));
    }
    d.AddTensor(name, t.rows(), t.cols(), static_cast<int>(t.shape.size()), t.format, t.nbytes);
  }
  return d;
}

absl::StatusOr<ModelDescription> DescribeSyntheticMoE(const MoEShape& s) {
  if (s.n_layers <= 0 || s.dim <= 0 || s.n_heads <= 0 || s.dim % s.n_heads != 0 || s.expert_hidden_dim <= 0 ||
      s.n_experts <= 0 || s.vocab_size <= 0) {
    return absl::InvalidArgumentError("MoEShape: every size must be positive and dim divisible by n_heads");
  }
  ModelDescription d;
  d.file_format = "described";
  d.config.arch = "moe";
  d.config.dim = s.dim;
  d.config.hidden_dim = s.expert_hidden_dim;
  d.config.n_layers = s.n_layers;
  d.config.n_heads = d.config.n_kv_heads = s.n_heads;
  d.config.vocab_size = s.vocab_size;
  d.config.seq_len = 2048;
  d.n_experts = s.n_experts;
  d.expert_hidden_dim = s.expert_hidden_dim;
  const size_t per_layer = 7 + 3 * static_cast<size_t>(s.n_experts);
  d.tensors.reserve(3 + per_layer * s.n_layers);
  d.name_arena.reserve((3 + per_layer * s.n_layers) * 26);
  auto add = [&](const std::string& name, int64_t rows, int64_t cols, int ndim) -> absl::Status {
    const WeightFormat f = ndim == 1 ? WeightFormat::F32() : s.source_format;
    QF_ASSIGN_OR_RETURN(const size_t bytes, EncodedBytes(f, rows, cols));
    d.AddTensor(name, rows, cols, ndim, f, bytes);
    return absl::OkStatus();
  };
  QF_RETURN_IF_ERROR(add(names::kTokenEmbd, s.vocab_size, s.dim, 2));
  for (int l = 0; l < s.n_layers; ++l) {
    QF_RETURN_IF_ERROR(add(names::AttnNorm(l), 1, s.dim, 1));
    for (auto fn : {names::AttnQ, names::AttnK, names::AttnV, names::AttnOutput}) {
      QF_RETURN_IF_ERROR(add(fn(l), s.dim, s.dim, 2));
    }
    QF_RETURN_IF_ERROR(add(names::FfnNorm(l), 1, s.dim, 1));
    QF_RETURN_IF_ERROR(add(absl::StrCat("blk.", l, ".ffn_gate_inp.weight"), s.n_experts, s.dim, 2));
    for (int e = 0; e < s.n_experts; ++e) {
      QF_RETURN_IF_ERROR(add(absl::StrCat("blk.", l, ".ffn_gate.", e, ".weight"), s.expert_hidden_dim, s.dim, 2));
      QF_RETURN_IF_ERROR(add(absl::StrCat("blk.", l, ".ffn_up.", e, ".weight"), s.expert_hidden_dim, s.dim, 2));
      QF_RETURN_IF_ERROR(add(absl::StrCat("blk.", l, ".ffn_down.", e, ".weight"), s.dim, s.expert_hidden_dim, 2));
    }
  }
  QF_RETURN_IF_ERROR(add(names::kOutputNorm, 1, s.dim, 1));
  QF_RETURN_IF_ERROR(add(names::kOutput, s.vocab_size, s.dim, 2));
  return d;
}

}  // namespace qforge::scheduler
