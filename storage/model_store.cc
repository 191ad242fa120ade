#include "storage/model_store.h"

#include <atomic>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/formats/formats.h"
#include "core/formats/json.h"
#include "core/formats/parsers.h"

namespace qforge::storage {
namespace {

using formats::Json;

constexpr char kVocabMagic[8] = {'Q', 'F', 'V', 'O', 'C', 'A', 'B', '1'};
constexpr char kMetadataMember[] = "qforge_metadata";

// --- vocabulary chunk: magic, u32 len + model, i32 bos, eos, unk, u64 n_tokens, n_scores, n_types, then
// n_tokens x (u32 len + bytes), n_scores x f32, n_types x i32; all little-endian.

void AppendLe(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

}  // namespace

std::string EncodeVocabChunk(const Vocab& v) {
  std::string out(kVocabMagic, sizeof(kVocabMagic));
  AppendLe(&out, v.model.size(), 4);
  out += v.model;
  AppendLe(&out, static_cast<uint32_t>(v.bos_id), 4);
  AppendLe(&out, static_cast<uint32_t>(v.eos_id), 4);
  AppendLe(&out, static_cast<uint32_t>(v.unk_id), 4);
  AppendLe(&out, v.tokens.size(), 8);
  AppendLe(&out, v.scores.size(), 8);
  AppendLe(&out, v.types.size(), 8);
  for (const std::string& t : v.tokens) {
    AppendLe(&out, t.size(), 4);
    out += t;
  }
  for (float s : v.scores) {
    uint32_t bits = 0;
    std::memcpy(&bits, &s, 4);
    AppendLe(&out, bits, 4);
  }
  for (TokenType t : v.types) AppendLe(&out, static_cast<uint32_t>(t), 4);
  return out;
}

namespace {

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> b) : b_(b) {}
  bool Le(int bytes, uint64_t* v) {
    if (b_.size() - pos_ < static_cast<size_t>(bytes)) return false;
    *v = 0;
    for (int i = 0; i < bytes; ++i) *v |= uint64_t{b_[pos_ + i]} << (8 * i);
    pos_ += bytes;
    return true;
  }
  bool Bytes(size_t n, std::string* s) {
    if (b_.size() - pos_ < n) return false;
    s->assign(reinterpret_cast<const char*>(b_.data() + pos_), n);
    pos_ += n;
    return true;
  }
  size_t left() const { return b_.size() - pos_; }

 private:
  std::span<const uint8_t> b_;
  size_t pos_ = 0;
};

absl::StatusOr<Vocab> DecodeVocab(std::span<const uint8_t> bytes, const std::string& where) {
  auto bad = [&](const char* what) { return absl::DataLossError(absl::StrCat("vocabulary of ", where, ": ", what)); };
  Reader r(bytes);
  std::string magic;
  if (!r.Bytes(sizeof(kVocabMagic), &magic) || std::memcmp(magic.data(), kVocabMagic, sizeof(kVocabMagic)) != 0) {
    return bad("bad magic");
  }
  Vocab v;
  uint64_t n = 0, bos = 0, eos = 0, unk = 0, n_tokens = 0, n_scores = 0, n_types = 0;
  if (!r.Le(4, &n) || !r.Bytes(n, &v.model) || !r.Le(4, &bos) || !r.Le(4, &eos) || !r.Le(4, &unk) ||
      !r.Le(8, &n_tokens) || !r.Le(8, &n_scores) || !r.Le(8, &n_types)) {
    return bad("truncated header");
  }
  // Every token needs at least 4 bytes, every score and type 4: bound the counts before reserving.
  if (n_tokens > r.left() / 4 || n_scores > r.left() / 4 || n_types > r.left() / 4) return bad("counts exceed size");
  v.bos_id = static_cast<int32_t>(bos);
  v.eos_id = static_cast<int32_t>(eos);
  v.unk_id = static_cast<int32_t>(unk);
  v.tokens.resize(n_tokens);
  for (std::string& t : v.tokens) {
    if (!r.Le(4, &n) || !r.Bytes(n, &t)) return bad("truncated token");
  }
  v.scores.resize(n_scores);
  for (float& s : v.scores) {
    uint64_t bits = 0;
    if (!r.Le(4, &bits)) return bad("truncated scores");
    const uint32_t b32 = static_cast<uint32_t>(bits);
    std::memcpy(&s, &b32, 4);
  }
  v.types.resize(n_types);
  for (TokenType& t : v.types) {
    uint64_t x = 0;
    if (!r.Le(4, &x)) return bad("truncated types");
    t = static_cast<TokenType>(static_cast<int32_t>(x));
  }
  if (r.left() != 0) return bad("trailing bytes");
  return v;
}

}  // namespace

absl::StatusOr<std::string> ManifestConfigJson(const Model& model) {
  auto parsed = formats::ParseJson(formats::HfConfigJson(model.config));
  if (!parsed.ok()) return absl::InternalError(absl::StrCat("re-reading our own config.json: ", parsed.status().message()));
  Json meta = Json::MakeObject();
  for (const auto& [k, v] : model.metadata) meta.Set(k, Json::String(v));
  parsed->Set(kMetadataMember, meta);
  std::string text = parsed->Dump();
  // JSON replaces bytes that are not UTF-8; refuse rather than store metadata that would read back changed.
  auto back = formats::ParseJson(text);
  const Json* m = back.ok() ? back->Find(kMetadataMember) : nullptr;
  if (m == nullptr || !m->is_object() || m->object().size() != model.metadata.size()) {
    return absl::InvalidArgumentError("model metadata cannot be stored as JSON (duplicate or invalid keys)");
  }
  auto it = model.metadata.begin();
  for (const auto& [k, v] : m->object()) {
    if (k != it->first || !v.is_string() || v.string_value() != it->second) {
      return absl::InvalidArgumentError(
          absl::StrCat("model metadata '", it->first.substr(0, 80), "' is not valid UTF-8 and cannot be stored"));
    }
    ++it;
  }
  return text;
}

namespace {

absl::StatusOr<uint64_t> PutAndCommit(ArtifactStore& store, const Model& model, const std::string& name,
                                      const PutModelOptions& options, const std::string& holder) {
  qforge::v1::Manifest manifest;
  QF_ASSIGN_OR_RETURN(*manifest.mutable_config_json(), ManifestConfigJson(model));
  *manifest.mutable_recipe() = options.recipe;
  manifest.set_source_uri(options.source_uri);
  for (const auto& [tensor_name, t] : model.tensors) {
    qforge::v1::ManifestTensor* mt = manifest.add_tensors();
    mt->set_name(tensor_name);
    mt->set_format(FormatName(t.format));
    for (int64_t d : t.shape) mt->add_shape(d);
    mt->set_nbytes(t.nbytes);
    QF_ASSIGN_OR_RETURN(std::vector<std::string> ids, store.PutBlob(t.bytes(), holder));
    for (std::string& id : ids) mt->add_chunk_ids(std::move(id));
  }
  if (model.vocab) {
    const std::string vocab = EncodeVocabChunk(*model.vocab);
    if (vocab.size() > kMaxChunkBytes) {
      return absl::InvalidArgumentError(absl::StrCat("vocabulary of ", name, " encodes to ", vocab.size(),
                                                     " bytes, over the chunk limit ", kMaxChunkBytes));
    }
    QF_ASSIGN_OR_RETURN(*manifest.mutable_vocab_chunk_id(),
                        store.PutChunk(std::span(reinterpret_cast<const uint8_t*>(vocab.data()), vocab.size()),
                                       holder));
  }
  StateBatch also = options.also != nullptr ? *options.also : StateBatch();
  also.ReleasePins(holder);
  return store.CommitVersion(name, std::move(manifest), &also);
}

// A holder name no other PutModel call (in this or another process) uses.
std::string UniqueHolder(const std::string& name, const char* what = "put-model") {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t process_salt = std::random_device()() ^ (uint64_t{std::random_device()()} << 32);
  return absl::StrCat(what, "/", name, "/", absl::Hex(process_salt), "/", counter.fetch_add(1));
}

// The bytes of a manifest tensor: its chunks, which must add up to exactly `nbytes` (nothing beyond it is ever
// appended). Errors name `where` and the tensor.
absl::StatusOr<std::vector<uint8_t>> GatherChunks(const qforge::v1::ManifestTensor& mt, const ChunkFetcher& get_chunk,
                                                  const std::string& where) {
  std::vector<uint8_t> bytes;
  bytes.reserve(mt.nbytes());
  for (const std::string& id : mt.chunk_ids()) {
    auto chunk = get_chunk(id);
    if (!chunk.ok()) {
      return absl::Status(chunk.status().code(),
                          absl::StrCat(where, " tensor '", mt.name(), "': ", chunk.status().message()));
    }
    if (chunk->size() > mt.nbytes() - bytes.size()) {
      return absl::DataLossError(absl::StrCat(where, " tensor '", mt.name(), "': chunks exceed ", mt.nbytes(), " bytes"));
    }
    bytes.insert(bytes.end(), chunk->begin(), chunk->end());
  }
  if (bytes.size() != mt.nbytes()) {
    return absl::DataLossError(absl::StrCat(where, " tensor '", mt.name(), "': chunks hold ", bytes.size(),
                                            " bytes, the manifest says ", mt.nbytes()));
  }
  return bytes;
}

std::string RefText(const qforge::v1::ModelRef& ref) { return absl::StrCat(ref.name(), "@", ref.version()); }

constexpr char kAdapterTensor[] = "adapter";
// The manifest tensor format of an adapter's weights file, by lora::AdapterFiles::format.
const char* AdapterTensorFormat(const std::string& format) {
  return format == "gguf" ? "gguf-lora" : format == "peft" ? "peft-safetensors" : nullptr;
}

}  // namespace

absl::StatusOr<uint64_t> PutModel(ArtifactStore& store, const Model& model, const std::string& name,
                                  const PutModelOptions& options) {
  QF_RETURN_IF_ERROR(ValidateModelName(name));
  if (absl::Status s = ValidateModel(model); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot store ", name, ": ", s.message()));
  }
  // The chunks are pinned while they are uploaded so that no concurrent delete or garbage collection can
  // remove one before the commit references it; the commit releases the pins in the same atomic write.
  const std::string holder = UniqueHolder(name);
  auto result = PutAndCommit(store, model, name, options, holder);
  if (!result.ok()) {
    StateBatch release;
    release.ReleasePins(holder);
    store.Write(release).IgnoreError();  // best effort; CollectGarbage recovers what a failure here leaves
  }
  return result;
}

absl::StatusOr<Tensor> TensorFromManifest(const qforge::v1::ManifestTensor& mt, const ChunkFetcher& get_chunk,
                                          const std::string& where) {
  auto format = ParseFormatName(mt.format());
  if (!format.ok()) {
    return absl::DataLossError(absl::StrCat(where, " tensor '", mt.name(), "': ", format.status().message()));
  }
  std::vector<int64_t> shape(mt.shape().begin(), mt.shape().end());
  // Check shape, format and byte count agree before allocating anything of that size. ValidateTensor also
  // wants a data pointer; none exists yet, so the probe points at a placeholder it never reads.
  static const uint8_t kPlaceholder = 0;
  const Tensor probe = Tensor::View(mt.name(), shape, *format, nullptr, &kPlaceholder, mt.nbytes());
  if (absl::Status s = ValidateTensor(probe); !s.ok()) {
    return absl::DataLossError(absl::StrCat(where, " tensor '", mt.name(), "': ", s.message()));
  }
  QF_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, GatherChunks(mt, get_chunk, where));
  return Tensor::FromBytes(mt.name(), std::move(shape), *format, std::move(bytes));
}

absl::StatusOr<Model> ModelFromManifest(const qforge::v1::Manifest& manifest, const ChunkFetcher& get_chunk) {
  const std::string where = RefText(manifest.model());
  if (manifest.has_adapter_of()) {
    return absl::FailedPreconditionError(absl::StrCat(where, " is a LoRA adapter of ", RefText(manifest.adapter_of()),
                                                      ", not a model: serve ", RefText(manifest.adapter_of()),
                                                      " and load the adapter onto it (POST /v1/adapters)"));
  }
  Model m;
  auto config = formats::ParseHfConfig(manifest.config_json());
  if (!config.ok()) return absl::DataLossError(absl::StrCat("config of ", where, ": ", config.status().message()));
  m.config = *config;
  auto json = formats::ParseJson(manifest.config_json());
  if (json.ok()) {
    if (const Json* meta = json->Find(kMetadataMember); meta != nullptr && meta->is_object()) {
      for (const auto& [k, v] : meta->object()) m.metadata[k] = v.string_value();
    }
  }
  for (const auto& mt : manifest.tensors()) {
    QF_ASSIGN_OR_RETURN(Tensor t, TensorFromManifest(mt, get_chunk, where));
    m.tensors.emplace(mt.name(), std::move(t));
  }
  if (!manifest.vocab_chunk_id().empty()) {
    QF_ASSIGN_OR_RETURN(std::vector<uint8_t> vocab, get_chunk(manifest.vocab_chunk_id()));
    QF_ASSIGN_OR_RETURN(m.vocab, DecodeVocab(vocab, where));
  }
  if (absl::Status s = ValidateModel(m); !s.ok()) {
    return absl::DataLossError(absl::StrCat(where, " does not form a valid model: ", s.message()));
  }
  return m;
}

absl::StatusOr<Model> LoadModel(ArtifactStore& store, const ModelRef& ref) {
  QF_ASSIGN_OR_RETURN(qforge::v1::Manifest manifest, store.GetManifest(ref));
  return ModelFromManifest(manifest, [&store](const std::string& id) { return store.GetChunk(id); });
}

absl::StatusOr<Model> LoadModel(ArtifactStore& store, const std::string& ref_text) {
  QF_ASSIGN_OR_RETURN(ModelRef ref, ParseModelRef(ref_text));
  return LoadModel(store, ref);
}

absl::Status ExportModel(ArtifactStore& store, const ModelRef& ref, const std::string& path, ExportFormat format) {
  QF_ASSIGN_OR_RETURN(Model m, LoadModel(store, ref));
  switch (format) {
    case ExportFormat::kGguf:
      return formats::WriteGguf(m, path);
    case ExportFormat::kSafetensors:
      return formats::WriteSafetensors(m, path);
  }
  return absl::InvalidArgumentError("unknown export format");
}

// --- LoRA adapters -------------------------------------------------------------------------------------------

absl::StatusOr<ModelConfig> ConfigFromManifest(const qforge::v1::Manifest& manifest) {
  auto config = formats::ParseHfConfig(manifest.config_json());
  if (!config.ok()) {
    return absl::DataLossError(absl::StrCat("config of ", RefText(manifest.model()), ": ", config.status().message()));
  }
  return *config;
}

absl::StatusOr<StoredAdapter> PutAdapter(ArtifactStore& store, const std::string& name, const ModelRef& base,
                                         const lora::AdapterFiles& files, const std::string& source_uri) {
  QF_RETURN_IF_ERROR(ValidateModelName(name));
  if (name == base.name) return absl::InvalidArgumentError("name: must differ from the base model's name");
  const char* tensor_format = AdapterTensorFormat(files.format);
  if (tensor_format == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("adapter format '", files.format, "': must be gguf or peft"));
  }
  QF_ASSIGN_OR_RETURN(const qforge::v1::Manifest base_manifest, store.GetManifest(base));
  if (base_manifest.has_adapter_of()) {
    return absl::FailedPreconditionError(
        absl::StrCat("base: ", RefText(base_manifest.model()), " is itself a LoRA adapter"));
  }
  // One name holds one kind of artifact, so that name@latest is always an adapter (or always a model).
  if (auto latest = store.GetManifest(ModelRef{name, std::nullopt}); latest.ok() && !latest->has_adapter_of()) {
    return absl::FailedPreconditionError(absl::StrCat("name: ", name, " holds models, not adapters"));
  } else if (!latest.ok() && !absl::IsNotFound(latest.status())) {
    return latest.status();
  }
  QF_ASSIGN_OR_RETURN(const ModelConfig config, ConfigFromManifest(base_manifest));
  StoredAdapter stored;
  stored.base = base_manifest.model();
  {
    lora::AdapterFiles named = files;
    named.where = source_uri;
    auto parsed = lora::ParseAdapterFiles(named, config);
    if (!parsed.ok()) {
      return absl::Status(parsed.status().code(), absl::StrCat("not an adapter of ", RefText(stored.base), ": ",
                                                               parsed.status().message()));
    }
    stored.adapter = *std::move(parsed);
  }
  const std::string holder = UniqueHolder(name, "put-adapter");
  auto commit = [&]() -> absl::StatusOr<uint64_t> {
    qforge::v1::Manifest manifest;
    *manifest.mutable_adapter_of() = stored.base;
    manifest.set_config_json(files.config_json);
    manifest.set_source_uri(source_uri);
    qforge::v1::ManifestTensor* t = manifest.add_tensors();
    t->set_name(kAdapterTensor);
    t->set_format(tensor_format);
    t->add_shape(static_cast<int64_t>(files.weights.size()));
    t->set_nbytes(files.weights.size());
    QF_ASSIGN_OR_RETURN(std::vector<std::string> ids, store.PutBlob(files.weights, holder));
    for (std::string& id : ids) t->add_chunk_ids(std::move(id));
    StateBatch release;
    release.ReleasePins(holder);
    return store.CommitVersion(name, std::move(manifest), &release);
  };
  auto version = commit();
  if (!version.ok()) {
    StateBatch release;
    release.ReleasePins(holder);
    store.Write(release).IgnoreError();  // best effort; CollectGarbage recovers what a failure here leaves
    return version.status();
  }
  stored.version = *version;
  return stored;
}

absl::StatusOr<lora::AdapterFiles> AdapterFilesFromManifest(const qforge::v1::Manifest& manifest,
                                                            const ChunkFetcher& get_chunk) {
  const std::string where = RefText(manifest.model());
  if (!manifest.has_adapter_of()) return absl::FailedPreconditionError(absl::StrCat(where, " is not a LoRA adapter"));
  if (manifest.tensors_size() != 1 || manifest.tensors(0).name() != kAdapterTensor) {
    return absl::DataLossError(absl::StrCat(where, ": an adapter's manifest holds one tensor, '", kAdapterTensor, "'"));
  }
  const qforge::v1::ManifestTensor& mt = manifest.tensors(0);
  lora::AdapterFiles files;
  for (const char* format : {"gguf", "peft"}) {
    if (mt.format() == AdapterTensorFormat(format)) files.format = format;
  }
  if (files.format.empty()) {
    return absl::DataLossError(absl::StrCat(where, ": adapter tensor format '", mt.format(), "'"));
  }
  QF_ASSIGN_OR_RETURN(files.weights, GatherChunks(mt, get_chunk, where));
  files.config_json = manifest.config_json();
  files.where = where;
  return files;
}

}  // namespace qforge::storage
