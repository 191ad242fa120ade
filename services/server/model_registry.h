// The models a qforge-server holds: loaded by `name@version` from the artifact store (over ArtifactService) or
// from a GGUF / safetensors / llama2.c file, each with its tokenizer and its batching engine, within a memory
// budget. A load that would exceed the budget unloads the least recently used models first; a model that is
// unloaded while requests still use it stays alive (shared ownership) until they finish.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/lora/lora.h"
#include "core/model/model.h"
#include "core/tokenizer/tokenizer.h"
#include "serving/chat_template/chat_template.h"
#include "serving/engine.h"
#include "storage/model_ref.h"

namespace qforge::server {

// A loaded model's version number: positive for store versions, kFileVersion for a model read from a file.
inline constexpr uint64_t kFileVersion = 0;

// A LoRA adapter loaded beside a model (POST /v1/adapters): requests on that model name it in `adapter`.
struct LoadedAdapter {
  std::string name;
  std::string path;      // as the request gave it (under RegistryOptions::adapter_root); "" for a stored adapter
  std::string artifact;  // the stored adapter version it was read from ("pirate@2"); "" for a file
  std::shared_ptr<const lora::LoraAdapter> adapter;
};

struct LoadedModel {
  std::string name;
  uint64_t version = kFileVersion;
  std::string source;  // "store" or the file path
  std::shared_ptr<const Model> model;
  std::shared_ptr<const Tokenizer> tokenizer;  // null when neither the model nor the load named one
  std::unique_ptr<serving::Engine> engine;
  int context = 0;            // KV positions per sequence: prompt + generated tokens
  uint64_t weight_bytes = 0;  // every tensor's bytes as held in memory
  uint64_t fp16_bytes = 0;    // the same model with every tensor in fp16: the baseline for "bytes saved"
  std::string encoding;       // the encoding of most of the weights (by bytes), e.g. "q4_k"
  // /v1/chat/completions: the model's chat template (its metadata's tokenizer.chat_template) or, when it has
  // none, chat::kDefaultChatTemplate; null with the parse error in chat_template_error when it does not parse
  // (the model then serves completions only).
  std::shared_ptr<const chat::ChatTemplate> chat_template;
  absl::Status chat_template_error;
  bool default_chat_template = false;
  std::string bos_text, eos_text;  // the tokenizer's BOS / EOS pieces: the template's bos_token / eos_token
  std::atomic<int64_t> last_used_ms{0};
  std::chrono::steady_clock::time_point loaded_at;  // when it was installed (the cost metrics' time base)
  // Its adapters by name. They go with the model when it is unloaded; a request holds its adapter's shared_ptr,
  // so unloading an adapter never cuts a stream that uses it.
  mutable std::mutex adapters_mu;
  std::map<std::string, LoadedAdapter> adapters;  // guarded by adapters_mu

  std::string ref() const;  // "name@3", or "name@file"
};

struct RegistryOptions {
  uint64_t memory_budget_bytes = 0;  // weights of all loaded models together; 0 = no limit
  serving::EngineOptions engine;     // for every model's engine (its on_step is replaced by the one below)
  // LoadAdapter reads files only under this directory (relative paths are taken from it); "" refuses every
  // adapter load, so an HTTP client cannot make the server open arbitrary files.
  std::string adapter_root;
  // Each engine step of each model: the model's ref, sequences and tokens in the batch, the step's seconds.
  std::function<void(const std::string& model_ref, int sequences, int tokens, double seconds)> on_step;
};

// Fetches a stored version (resolving `latest`); the registry calls it without holding its lock.
using StoreFetcher = std::function<absl::StatusOr<std::pair<uint64_t, Model>>(const storage::ModelRef& ref)>;

// A stored LoRA adapter version (storage/model_store.h): its concrete version, the base version it adapts, and its
// files as stored.
struct StoredAdapterFiles {
  uint64_t version = 0;
  storage::ModelRef base;
  lora::AdapterFiles files;
};
using AdapterFetcher = std::function<absl::StatusOr<StoredAdapterFiles>(const storage::ModelRef& ref)>;

class ModelRegistry {
 public:
  // `fetch` (and `fetch_adapter`) may be null: then only files can be loaded.
  ModelRegistry(RegistryOptions options, StoreFetcher fetch, AdapterFetcher fetch_adapter = nullptr);

  // Loads `name` from `path` (as version "file") when a path is given, else `name@version` from the store;
  // returns the loaded model (the one already loaded, if it is). `tokenizer_path` (optional) gives a tokenizer
  // to models whose files carry no vocabulary (llama2.c checkpoints).
  absl::StatusOr<std::shared_ptr<LoadedModel>> Load(const std::string& name, const std::string& version,
                                                    const std::string& path, const std::string& tokenizer_path);
  // A loaded model for `name@version`; `latest` (or "") is the highest loaded version, and a model that is not
  // loaded is loaded from the store on first use. INVALID_ARGUMENT for a malformed name or version.
  absl::StatusOr<std::shared_ptr<LoadedModel>> Get(const std::string& name, const std::string& version);
  absl::Status Unload(const std::string& name, const std::string& version);
  std::vector<std::shared_ptr<LoadedModel>> List() const;

  // Reads a LoRA adapter (lora::LoadAdapter: a .gguf file or a PEFT directory) under adapter_root and attaches it
  // to the model `model_ref` (name@version, as Get resolves it) as `adapter_name` ([A-Za-z0-9._-], 1..64 bytes).
  // ALREADY_EXISTS when the model has an adapter of that name; FAILED_PRECONDITION without an adapter_root;
  // PERMISSION_DENIED for a path outside it; the parser's errors otherwise.
  absl::StatusOr<LoadedAdapter> LoadAdapter(const std::string& model_ref, const std::string& adapter_name,
                                            const std::string& path);
  // The same from the artifact store: `artifact` (name@version, or latest) must be a LoRA adapter version whose
  // base is exactly the model's store version. FAILED_PRECONDITION naming `artifact` when it adapts another version
  // (or the model was read from a file), when it is a model, or when the server has no store; NOT_FOUND when absent.
  absl::StatusOr<LoadedAdapter> LoadStoredAdapter(const std::string& model_ref, const std::string& adapter_name,
                                                  const std::string& artifact);
  // Detaches `adapter_name` from `model_ref`, or, when model_ref is "", from the one loaded model that has it
  // (INVALID_ARGUMENT when several have). NOT_FOUND when none has.
  absl::Status UnloadAdapter(const std::string& model_ref, const std::string& adapter_name);
  // The adapter `adapter_name` of `m`; NOT_FOUND naming both when it has none of that name.
  static absl::StatusOr<std::shared_ptr<const lora::LoraAdapter>> FindAdapter(const LoadedModel& m,
                                                                              const std::string& adapter_name);
  uint64_t ResidentBytes() const;

 private:
  // The version a (name, version text) pair names among the loaded ones; 0 with OK when none is loaded.
  absl::StatusOr<std::pair<storage::ModelRef, bool>> Parse(const std::string& name, const std::string& version) const;
  absl::StatusOr<std::shared_ptr<LoadedModel>> Install(std::shared_ptr<LoadedModel> m);
  // `m` after checking that it has no adapter named `adapter_name` (ALREADY_EXISTS); the name is checked too.
  absl::StatusOr<std::shared_ptr<LoadedModel>> ModelForNewAdapter(const std::string& model_ref,
                                                                  const std::string& adapter_name);
  static absl::StatusOr<LoadedAdapter> Attach(LoadedModel& m, LoadedAdapter a);

  RegistryOptions options_;
  StoreFetcher fetch_;
  AdapterFetcher fetch_adapter_;
  mutable std::mutex mu_;
  std::map<std::string, std::map<uint64_t, std::shared_ptr<LoadedModel>>> models_;  // name -> version -> model
  std::mutex load_mu_;  // one load at a time: loads are memory-heavy and the budget check must see them in order
};

}  // namespace qforge::server
