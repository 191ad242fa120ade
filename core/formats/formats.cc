// Format detection and the LoadModel dispatcher.
#include "core/formats/formats.h"

#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"

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

absl::StatusOr<Model> LoadModel(const std::string& path) {
  QF_ASSIGN_OR_RETURN(FileFormat f, DetectFormat(path));
  absl::StatusOr<Model> m;
  switch (f) {
    case FileFormat::kSafetensors: m = ReadSafetensors(path); break;
    case FileFormat::kGguf: m = ReadGguf(path); break;
    case FileFormat::kLlama2c: m = ReadLlama2c(path); break;
    case FileFormat::kUnknown: return absl::InvalidArgumentError(absl::StrCat("unknown format: ", path));
  }
  if (!m.ok()) return m.status();
  if (absl::Status s = ValidateModel(*m); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, " (", FileFormatName(f), "): ", s.message()));
  }
  return m;
}

}  // namespace qforge::formats
