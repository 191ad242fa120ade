// Model file formats: HF safetensors (+config.json), GGUF v3, llama2.c checkpoints.
// Every reader treats its file as hostile: lengths, offsets, counts and shapes are checked before use;
// a bad file yields an absl::Status naming the problem, never a crash or a huge allocation.
// Readers memory-map and return tensors that view the mapping (no copies), or, given Residency::kHugePages,
// view one copy of each file on huge pages (the runtime's choice: MappedFile says why).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/mapped_file.h"
#include "core/model/model.h"

namespace qforge::formats {

enum class FileFormat { kUnknown, kSafetensors, kGguf, kLlama2c };

// Model::metadata key of the model's chat template (Jinja text): GGUF's `tokenizer.chat_template`, or, beside
// safetensors, tokenizer_config.json's `chat_template` (or chat_template.jinja). Both writers write it back.
inline constexpr char kChatTemplateKey[] = "tokenizer.chat_template";
const char* FileFormatName(FileFormat f);

// Guesses the format from the first bytes and the name: GGUF magic, a safetensors header length + '{',
// a directory or *.safetensors / *.safetensors.index.json, otherwise a *.bin llama2.c checkpoint.
absl::StatusOr<FileFormat> DetectFormat(const std::string& path);

// Loads any supported model file (or a directory holding config.json + *.safetensors).
absl::StatusOr<Model> LoadModel(const std::string& path,
                                MappedFile::Residency residency = MappedFile::Residency::kMapped);

// Rewrites the model's float tensors (f32, f16, bf16) in `to`, as llama.cpp's converter --outtype does: to f32,
// every one of them (exact from f16 / bf16); to f16 or bf16, every matrix (round to nearest even), while vectors
// (norms) become f32. Quantized tensors are kept as they are. Why f32 matters for checking numerics: llama.cpp
// rounds a matmul's activations to the weight's type when that is f16 or bf16, so a bf16 file does not run the
// fp32 arithmetic qforge runs on it. INVALID_ARGUMENT when `to` is not one of the three.
absl::Status CastFloatTensors(Model& m, WeightType to);

// --- llama2.c -----------------------------------------------------------------------------------------
// Legacy llama2.c checkpoint: int32 header {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
// seq_len} (vocab_size < 0 means an unshared classifier follows), then fp32 weights in run.c's order.
absl::StatusOr<Model> ReadLlama2c(const std::string& path,
                                  MappedFile::Residency residency = MappedFile::Residency::kMapped);
// llama2.c's tokenizer.bin: int32 max_token_length, then per token: f32 score, int32 len, bytes.
absl::StatusOr<Vocab> ReadLlama2cTokenizer(const std::string& path, int vocab_size);

// --- GGUF -----------------------------------------------------------------------------------------------
// Reads GGUF v2/v3 with llama architecture metadata, the tokenizer.ggml.* vocabulary when present, and
// tensors of type F32, F16, BF16, Q8_0, Q4_0, Q4_K.
absl::StatusOr<Model> ReadGguf(const std::string& path,
                               MappedFile::Residency residency = MappedFile::Residency::kMapped);
// Writes GGUF v3 that llama.cpp loads: general.architecture=llama, llama.* hyper-parameters,
// tokenizer.ggml.* (when m.vocab is set), 32-byte alignment. Fails for encodings GGUF has no type for.
absl::Status WriteGguf(const Model& m, const std::string& path);

// An importance matrix as llama.cpp's llama-imatrix writes it (GGUF, general.type "imatrix"): for each weight
// tensor (by its GGUF name, blk.0.attn_q.weight), the mean square of each input column over the calibration
// tokens, per expert where the weight is a stacked expert tensor. llama-quantize --imatrix weighs each weight's
// rounding error by it; so does `qforge quantize --imatrix`.
struct ImportanceMatrix {
  struct Entry {
    int64_t cols = 0;
    int64_t experts = 1;
    std::vector<float> sum_squares;  // [experts, cols]: in_sum2, each column's sum of x² over the tokens
    std::vector<float> tokens;       // [experts]: the counts
    // sum_squares / tokens, 0 for an expert that saw no token.
    float MeanSquare(int64_t expert, int64_t col) const {
      const float n = tokens[static_cast<size_t>(expert)];
      return n > 0 ? sum_squares[static_cast<size_t>(expert * cols + col)] / n : 0.0f;
    }
    // llama-quantize's fit weights for one expert's (or the matrix's) columns: MeanSquare, or all 1 for an expert
    // that saw no token (uniform weights, not the unweighted encoder).
    std::vector<float> Importance(int64_t expert) const;
  };
  std::map<std::string, Entry> entries;
  std::vector<std::string> datasets;  // imatrix.datasets: the calibration files
  int chunk_count = 0, chunk_size = 0;
};
// INVALID_ARGUMENT naming the key or tensor for anything else, a count or sum that is negative or not finite.
absl::StatusOr<ImportanceMatrix> ReadImatrixGguf(const std::string& path);
// The same file, as llama-imatrix writes it (llama-quantize --imatrix reads it); INVALID_ARGUMENT for an entry whose
// sizes do not fit.
absl::Status WriteImatrixGguf(const ImportanceMatrix& m, const std::string& path);
// llama.cpp's stacked expert tensors of layer l (blk.l.ffn_gate_exps.weight, _up_, _down_), each with the function
// that names one expert's matrix in qforge (names::FfnGateExpert ...: blk.l.ffn_gate.E.weight). GGUF models and
// importance matrices stack a layer's experts under these names; qforge keeps one matrix per expert.
std::vector<std::pair<std::string, std::string (*)(int, int)>> StackedExpertNames(int layer);

// --- safetensors ----------------------------------------------------------------------------------------
// Reads a single .safetensors file, a sharded model via model.safetensors.index.json, or a directory.
// config.json (beside the file) supplies the ModelConfig. HF Llama names are mapped to canonical names,
// and q/k projections are permuted from HF's rotate-half order back to interleaved-pair order.
// Tensors written by WriteSafetensors in qforge encodings are read back in those encodings.
absl::StatusOr<Model> ReadSafetensors(const std::string& path,
                                      MappedFile::Residency residency = MappedFile::Residency::kMapped);
// Writes `path` (a .safetensors file) and config.json beside it, with HF Llama names and HF q/k order.
// Quantized tensors are stored as U8 byte tensors; __metadata__ records each one's encoding and shape.
absl::Status WriteSafetensors(const Model& m, const std::string& path);

}  // namespace qforge::formats
