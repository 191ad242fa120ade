// Format detection and the LoadModel dispatcher.
#include "core/formats/formats.h"

#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/formats/parsers.h"
#include "core/formats/sentencepiece_model.h"

namespace qforge::formats {

const char* FileFormatName(FileFormat f) {
  switch (f) {
    case FileFormat::kSafetensors: return "safetensors";
    case FileFormat::kGguf: return "gguf";
    case FileFormat::kLlama2c: return "llama2.c";
    case FileFormat::kUnknown: break;
  }
  return "unknown";
}

absl::StatusOr<FileFormat> DetectFormat(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) return FileFormat::kSafetensors;
  if (absl::EndsWith(path, ".safetensors") || absl::EndsWith(path, ".safetensors.index.json")) {
    return FileFormat::kSafetensors;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  uint8_t head[9] = {};
  in.read(reinterpret_cast<char*>(head), sizeof(head));
  const size_t got = static_cast<size_t>(in.gcount());
  if (got >= 4 && std::memcmp(head, "GGUF", 4) == 0) return FileFormat::kGguf;
  const uintmax_t size = fs::file_size(path, ec);
  if (got == 9 && !ec) {
    uint64_t n = 0;
    std::memcpy(&n, head, 8);
    if (n >= 2 && n <= size - 8 && head[8] == '{') return FileFormat::kSafetensors;
  }
  if (absl::EndsWith(path, ".bin")) return FileFormat::kLlama2c;
  return absl::InvalidArgumentError(
      absl::StrCat("cannot tell the format of ", path, " (not GGUF, not safetensors, not a *.bin llama2.c checkpoint)"));
}

void AttachSiblingTokenizer(const std::string& model_path, const std::vector<std::string>& names, Model* m) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path dir = fs::is_directory(model_path, ec) ? fs::path(model_path) : fs::path(model_path).parent_path();
  std::vector<std::string> skipped;
  for (const std::string& name : names) {
    const std::string candidate = (dir / name).string();
    if (!fs::is_regular_file(candidate, ec)) continue;
    absl::StatusOr<Vocab> v = absl::EndsWith(name, ".model")
                                  ? ReadSentencePieceModel(candidate)
                                  : ReadLlama2cTokenizer(candidate, m->config.vocab_size);
    if (v.ok() && static_cast<int>(v->tokens.size()) != m->config.vocab_size) {
      v = absl::InvalidArgumentError(absl::StrCat(candidate, ": ", v->tokens.size(), " tokens, the model has ",
                                                  m->config.vocab_size));
    }
    if (!v.ok()) {
      skipped.push_back(std::string(v.status().message()));
      continue;
    }
    m->vocab = *std::move(v);
    m->metadata["tokenizer.path"] = candidate;
    break;
  }
  if (!skipped.empty()) m->metadata["tokenizer.skipped"] = absl::StrJoin(skipped, "; ");
}

Tensor CastFloatTensor(const Tensor& t, WeightType to) {
  const WeightType from = t.format.type;
  const auto n = static_cast<size_t>(t.numel());
  std::vector<uint8_t> bytes(n * (to == WeightType::kF32 ? 4 : 2));
  for (size_t i = 0; i < n; ++i) {
    float v;
    uint16_t h;
    if (from == WeightType::kF32) {
      std::memcpy(&v, t.data + 4 * i, 4);
    } else {
      std::memcpy(&h, t.data + 2 * i, 2);
      v = from == WeightType::kF16 ? HalfToFloat(h) : Bf16ToFloat(h);
    }
    if (to == WeightType::kF32) {
      std::memcpy(bytes.data() + 4 * i, &v, 4);
    } else {
      h = to == WeightType::kF16 ? FloatToHalf(v) : FloatToBf16(v);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  return Tensor::FromBytes(t.name, t.shape, WeightFormat::Of(to), std::move(bytes));
}

absl::Status CastFloatTensors(Model& m, WeightType to) {
  auto is_float = [](WeightType t) {
    return t == WeightType::kF32 || t == WeightType::kF16 || t == WeightType::kBF16;
  };
  if (!is_float(to)) return absl::InvalidArgumentError("float tensors can be cast to f32, f16 or bf16 only");
  for (auto& [name, t] : m.tensors) {
    if (!is_float(t.format.type)) continue;
    const WeightType want = t.shape.size() < 2 ? WeightType::kF32 : to;
    if (t.format.type != want) t = CastFloatTensor(t, want);
  }
  return absl::OkStatus();
}

absl::StatusOr<Model> LoadModel(const std::string& path, MappedFile::Residency residency) {
  QF_ASSIGN_OR_RETURN(FileFormat f, DetectFormat(path));
  absl::StatusOr<Model> m;
  switch (f) {
    case FileFormat::kSafetensors: m = ReadSafetensors(path, residency); break;
    case FileFormat::kGguf: m = ReadGguf(path, residency); break;
    case FileFormat::kLlama2c: m = ReadLlama2c(path, residency); break;
    case FileFormat::kUnknown: return absl::InvalidArgumentError(absl::StrCat("unknown format: ", path));
  }
  if (!m.ok()) return m.status();
  if (absl::Status s = ValidateModel(*m); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, " (", FileFormatName(f), "): ", s.message()));
  }
  return m;
}

}  // namespace qforge::formats
