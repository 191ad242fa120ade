// llama2.c legacy checkpoints (run.c's layout) and its tokenizer.bin.
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/formats/byte_reader.h"
#include "core/formats/formats.h"
#include "core/formats/parsers.h"

namespace qforge::formats {
namespace {

absl::Status Bad(const std::string& what) { return absl::InvalidArgumentError(absl::StrCat("llama2.c: ", what)); }

// Walks the fp32 weight section in run.c order, handing out views of consecutive arrays.
class FloatCursor {
 public:
  FloatCursor(std::span<const uint8_t> bytes, std::shared_ptr<const void> owner, size_t offset)
      : bytes_(bytes), owner_(std::move(owner)), offset_(offset) {}

  // The next `count` arrays of shape `shape`, one per layer (or a single one when count == 1).
  // The caller has already verified the whole file size, so these never run past the end.
  std::vector<Tensor> Take(int count, const std::vector<int64_t>& shape, const std::string& label) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    std::vector<Tensor> out;
    out.reserve(count);
    for (int i = 0; i < count; ++i) {
      out.push_back(Tensor::View(label, shape, WeightFormat::F32(), owner_, bytes_.data() + offset_, n * 4));
      offset_ += n * 4;
    }
    return out;
  }
  void Skip(size_t floats) { offset_ += floats * 4; }
  size_t offset() const { return offset_; }

 private:
  std::span<const uint8_t> bytes_;
  std::shared_ptr<const void> owner_;
  size_t offset_;
};

}  // namespace

absl::StatusOr<Model> ParseLlama2c(std::span<const uint8_t> bytes, std::shared_ptr<const void> owner) {
  ByteReader r(bytes, "llama2.c");
  int32_t h[7] = {};
  static const char* kFields[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i) QF_RETURN_IF_ERROR(r.Read(&h[i], kFields[i]));
  for (int i = 0; i < 7; ++i) {
    if (i != 5 && h[i] <= 0) return Bad(absl::StrCat("header field ", kFields[i], " is ", h[i], ", must be positive"));
  }
  if (h[5] == 0 || h[5] == INT32_MIN) return Bad(absl::StrCat("header field vocab_size is ", h[5]));

  Model m;
  ModelConfig& c = m.config;
  c.arch = "llama";
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.vocab_size = h[5] < 0 ? -h[5] : h[5];
  c.tied_embeddings = h[5] > 0;  // llama2.c: a positive vocab_size means the classifier shares token_embd
  c.seq_len = h[6];
  c.norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  // Bounds every field, so the size arithmetic below is well inside uint64; still checked for overflow.
  if (absl::Status s = ValidateConfig(c); !s.ok()) return Bad(std::string(s.message()));

  const uint64_t dim = c.dim, hidden = c.hidden_dim, L = c.n_layers, vocab = c.vocab_size;
  const uint64_t kv_dim = c.kv_dim(), head_size = c.head_dim(), seq = c.seq_len;
  // Float counts of each section, in file order.
  const uint64_t parts[][2] = {
      {vocab, dim},              // token_embedding_table
      {L, dim},                  // rms_att_weight
      {L, dim * dim},            // wq
      {L, kv_dim * dim},         // wk
      {L, kv_dim * dim},         // wv
      {L, dim * dim},            // wo
      {L, dim},                  // rms_ffn_weight
      {L, hidden * dim},         // w1
      {L, dim * hidden},         // w2
      {L, hidden * dim},         // w3
      {1, dim},                  // rms_final_weight
      {seq, head_size},          // freq_cis_real + freq_cis_imag: 2 * seq * head_size/2
      {c.tied_embeddings ? 0u : vocab, dim},  // wcls
  };
  uint64_t floats = 0;
  for (const auto& p : parts) {
    uint64_t n;
    if (!MulOk(p[0], p[1], &n) || !AddOk(floats, n, &floats)) return Bad("header implies a size that overflows");
  }
  uint64_t expect;
  if (!MulOk(floats, 4, &expect) || !AddOk(expect, 28, &expect)) return Bad("header implies a size that overflows");
  if (expect != bytes.size()) {
    return Bad(absl::StrCat("file is ", bytes.size(), " bytes, its header (dim ", c.dim, ", hidden_dim ", c.hidden_dim,
                            ", n_layers ", c.n_layers, ", n_heads ", c.n_heads, ", n_kv_heads ", c.n_kv_heads,
                            ", vocab_size ", h[5], ", seq_len ", c.seq_len, ") implies ", expect, " bytes"));
  }

  const int64_t D = c.dim, H = c.hidden_dim, KV = c.kv_dim(), V = c.vocab_size;
  const int nl = c.n_layers;
  FloatCursor f(bytes, owner, 28);
  auto put_layers = [&](std::vector<Tensor> ts, std::string (*name)(int)) {
    for (int l = 0; l < nl; ++l) {
      ts[l].name = name(l);
      m.tensors.emplace(ts[l].name, std::move(ts[l]));
    }
  };
  auto put_one = [&](std::vector<Tensor> ts, const char* name) {
    ts[0].name = name;
    m.tensors.emplace(name, std::move(ts[0]));
  };
  put_one(f.Take(1, {V, D}, ""), names::kTokenEmbd);
  put_layers(f.Take(nl, {D}, ""), names::AttnNorm);
  put_layers(f.Take(nl, {D, D}, ""), names::AttnQ);
  put_layers(f.Take(nl, {KV, D}, ""), names::AttnK);
  put_layers(f.Take(nl, {KV, D}, ""), names::AttnV);
  put_layers(f.Take(nl, {D, D}, ""), names::AttnOutput);
  put_layers(f.Take(nl, {D}, ""), names::FfnNorm);
  put_layers(f.Take(nl, {H, D}, ""), names::FfnGate);  // w1
  put_layers(f.Take(nl, {D, H}, ""), names::FfnDown);  // w2
  put_layers(f.Take(nl, {H, D}, ""), names::FfnUp);    // w3
  put_one(f.Take(1, {D}, ""), names::kOutputNorm);
  f.Skip(static_cast<size_t>(c.seq_len) * static_cast<size_t>(c.head_dim()));  // freq_cis_real/imag: unused
  if (!c.tied_embeddings) put_one(f.Take(1, {V, D}, ""), names::kOutput);
  if (f.offset() != bytes.size()) return absl::InternalError("llama2.c: section walk disagrees with size check");
  m.metadata["source.format"] = "llama2.c";
  QF_RETURN_IF_ERROR(ValidateModel(m));
  return m;
}

absl::StatusOr<Model> ReadLlama2c(const std::string& path, MappedFile::Residency residency) {
  QF_ASSIGN_OR_RETURN(std::shared_ptr<const MappedFile> file, MappedFile::Open(path, residency));
  auto m = ParseLlama2c(file->bytes(), file);
  if (!m.ok()) return absl::Status(m.status().code(), absl::StrCat(path, ": ", m.status().message()));
  m->metadata["source.path"] = path;
  // A checkpoint does not hold its vocabulary; run.c reads tokenizer.bin (or the -z file, tok512.bin for
  // stories260K) from beside it, and so does this reader.
  const int v = m->config.vocab_size;
  AttachSiblingTokenizer(path, {absl::StrCat("tok", v, ".bin"), "tokenizer.bin", absl::StrCat("tok", v, ".model"),
                                "tokenizer.model"},
                         &*m);
  return m;
}


absl::StatusOr<Vocab> ParseLlama2cTokenizer(std::span<const uint8_t> bytes, int vocab_size) {
  ByteReader r(bytes, "llama2.c tokenizer");
  if (vocab_size <= 0 || vocab_size > (1 << 24)) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer: vocab_size ", vocab_size, " out of range"));
  }
  int32_t max_token_length = 0;
  QF_RETURN_IF_ERROR(r.Read(&max_token_length, "max_token_length"));
  if (max_token_length <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("llama2.c tokenizer: max_token_length is ", max_token_length, ", must be positive"));
  }
  // Every token takes at least 8 bytes (score + length), which bounds the reservation below.
  if (static_cast<uint64_t>(vocab_size) * 8 > r.remaining()) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer: file of ", bytes.size(),
                                                   " bytes is too small for ", vocab_size, " tokens"));
  }
  Vocab v;
  v.model = "llama";
  v.tokens.reserve(vocab_size);
  v.scores.reserve(vocab_size);
  v.types.reserve(vocab_size);
  for (int i = 0; i < vocab_size; ++i) {
    float score = 0;
    int32_t len = 0;
    QF_RETURN_IF_ERROR(r.Read(&score, "token score"));
    QF_RETURN_IF_ERROR(r.Read(&len, "token length"));
    if (len < 0) {
      return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer: token ", i, " has negative length ", len));
    }
    std::string text;
    QF_RETURN_IF_ERROR(r.ReadString(static_cast<uint64_t>(len), &text, "token bytes"));
    // llama2.c's export writes BOS/EOS as "\n<s>\n" and "\n</s>\n" (so run.c can print them); the
    // canonical SentencePiece spelling is what GGUF and the tokenizer expect.
    if ((i == 1 || i == 2) && (text == "\n<s>\n" || text == "\n</s>\n")) text = text.substr(1, text.size() - 2);
    TokenType type = TokenType::kNormal;
    if (i == 0 || text == "<unk>") {
      type = TokenType::kUnknown;
    } else if (i == 1 || i == 2 || text == "<s>" || text == "</s>") {
      type = TokenType::kControl;
    } else if (ParseBytePiece(text) >= 0) {
      type = TokenType::kByte;
    }
    // llama2.c's exporter wrote pieces with plain spaces where SentencePiece has "▁"; the SentencePiece
    // spelling is what GGUF and the tokenizer expect.
    if (type == TokenType::kNormal) text = absl::StrReplaceAll(text, {{" ", kSentencePieceSpace}});
    v.tokens.push_back(std::move(text));
    v.scores.push_back(score);
    v.types.push_back(type);
  }
  if (r.remaining() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer: ", r.remaining(), " bytes left after ",
                                                   vocab_size, " tokens (wrong vocab_size?)"));
  }
  v.unk_id = 0;
  v.bos_id = 1;
  v.eos_id = 2;
  return v;
}

absl::StatusOr<Vocab> ReadLlama2cTokenizer(const std::string& path, int vocab_size) {
  QF_ASSIGN_OR_RETURN(std::shared_ptr<const MappedFile> file, MappedFile::Open(path));
  auto v = ParseLlama2cTokenizer(file->bytes(), vocab_size);
  if (!v.ok()) return absl::Status(v.status().code(), absl::StrCat(path, ": ", v.status().message()));
  return v;
}

}  // namespace qforge::formats
