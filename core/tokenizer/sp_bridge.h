// A thin wrapper around sentencepiece::SentencePieceProcessor with no Abseil types in sight.
// Debian's sentencepiece_processor.h declares `namespace absl { using std::string_view; }`, which
// collides with Debian Abseil's own absl::string_view; so the header is included only by sp_bridge.cc,
// a translation unit that includes no Abseil header, and everything else talks to this class.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace qforge::tokenizer_internal {

struct SpError {
  int code = 0;  // sentencepiece::util::StatusCode, numerically equal to absl::StatusCode
  std::string message;
};

class SpProcessor {
 public:
  SpProcessor();
  ~SpProcessor();

  // Each returns false and fills *error on failure.
  bool Load(const std::string& path, SpError* error);
  bool Encode(const std::string& text, std::vector<int>* ids, SpError* error) const;
  bool Decode(const std::vector<int>& ids, std::string* text, SpError* error) const;

  int PieceSize() const;
  std::string IdToPiece(int id) const;
  float Score(int id) const;
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  bool IsByte(int id) const;
  bool IsUnused(int id) const;
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;
  // The model's serialized ModelProto (protobuf wire format).
  std::string SerializedModel() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qforge::tokenizer_internal
