#include "services/server/model_registry.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/formats/formats.h"
#include "core/tokenizer/vocab_tokenizer.h"

namespace qforge::server {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Fills the byte counts and the dominant encoding.
void Measure(LoadedModel& m) {
  std::map<std::string, uint64_t> by_encoding;
  for (const auto& [name, t] : m.model->tensors) {
    m.weight_bytes += t.nbytes;
    m.fp16_bytes += static_cast<uint64_t>(t.numel()) * 2;
    by_encoding[FormatName(t.format)] += t.nbytes;
  }
  uint64_t best = 0;
  for (const auto& [encoding, bytes] : by_encoding) {
    if (bytes > best) {
      best = bytes;
      m.encoding = encoding;
    }
  }
}

// The chat template and the texts of its bos_token / eos_token.
void AttachChatTemplate(LoadedModel& m) {
  const auto it = m.model->metadata.find(formats::kChatTemplateKey);
  m.default_chat_template = it == m.model->metadata.end();
  auto parsed = chat::ChatTemplate::Parse(m.default_chat_template ? chat::kDefaultChatTemplate : it->second);
  if (parsed.ok()) {
    m.chat_template = std::make_shared<const chat::ChatTemplate>(*std::move(parsed));
  } else {
    m.chat_template_error = parsed.status();
  }
  if (const auto* vocab = dynamic_cast<const VocabTokenizer*>(m.tokenizer.get()); vocab != nullptr) {
    const std::vector<std::string>& pieces = vocab->vocab().tokens;
    auto piece = [&](int id) { return id >= 0 && static_cast<size_t>(id) < pieces.size() ? pieces[id] : ""; };
    m.bos_text = piece(vocab->bos_id());
    m.eos_text = piece(vocab->eos_id());
  }
}

}  // namespace

std::string LoadedModel::ref() const {
  return version == kFileVersion ? absl::StrCat(name, "@file") : storage::FormatModelRef(name, version);
}

ModelRegistry::ModelRegistry(RegistryOptions options, StoreFetcher fetch, AdapterFetcher fetch_adapter)
    : options_(std::move(options)), fetch_(std::move(fetch)), fetch_adapter_(std::move(fetch_adapter)) {}

absl::StatusOr<std::pair<storage::ModelRef, bool>> ModelRegistry::Parse(const std::string& name,
                                                                        const std::string& version) const {
  // "name@3", "name@latest" and "name@file" in the name field are accepted too (what curl or a dashboard sends).
  std::string n = name, v = version;
  if (const size_t at = n.find('@'); at != std::string::npos) {
    if (!v.empty()) return absl::InvalidArgumentError("model: give the version in name@version or in version, not both");
    v = n.substr(at + 1);
    n.resize(at);
  }
  if (v == "file") {
    if (absl::Status s = storage::ValidateModelName(n); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("model: ", s.message()));
    }
    return std::make_pair(storage::ModelRef{n, kFileVersion}, true);
  }
  auto ref = storage::ParseModelRef(v.empty() ? n : absl::StrCat(n, "@", v));
  if (!ref.ok()) return absl::InvalidArgumentError(absl::StrCat("model: ", ref.status().message()));
  return std::make_pair(*ref, false);
}

absl::StatusOr<std::shared_ptr<LoadedModel>> ModelRegistry::Install(std::shared_ptr<LoadedModel> m) {
  Measure(*m);
  m->last_used_ms = NowMs();
  m->loaded_at = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> l(mu_);
  if (options_.memory_budget_bytes > 0) {
    if (m->weight_bytes > options_.memory_budget_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(m->ref(), " needs ", m->weight_bytes,
                                                       " bytes, over the memory budget of ",
                                                       options_.memory_budget_bytes));
    }
    // Least recently used first, until the new model fits.
    uint64_t resident = 0;
    for (const auto& [n, versions] : models_) {
      for (const auto& [v, lm] : versions) resident += lm->weight_bytes;
    }
    while (resident + m->weight_bytes > options_.memory_budget_bytes) {
      std::map<uint64_t, std::shared_ptr<LoadedModel>>* oldest_map = nullptr;
      uint64_t oldest_version = 0;
      int64_t oldest_ms = INT64_MAX;
      for (auto& [n, versions] : models_) {
        for (auto& [v, lm] : versions) {
          if (lm->last_used_ms < oldest_ms) {
            oldest_ms = lm->last_used_ms;
            oldest_map = &versions;
            oldest_version = v;
          }
        }
      }
      if (oldest_map == nullptr) break;
      resident -= (*oldest_map)[oldest_version]->weight_bytes;
      oldest_map->erase(oldest_version);
    }
  }
  auto& slot = models_[m->name][m->version];
  slot = std::move(m);
  return slot;
}

absl::StatusOr<std::shared_ptr<LoadedModel>> ModelRegistry::Load(const std::string& name, const std::string& version,
                                                                  const std::string& path,
                                                                  const std::string& tokenizer_path) {
  auto m = std::make_shared<LoadedModel>();
  std::lock_guard<std::mutex> loading(load_mu_);
  if (!path.empty()) {
    if (!version.empty() && version != "file") {
      return absl::InvalidArgumentError("model.version: a model loaded from a file has no store version");
    }
    QF_RETURN_IF_ERROR(storage::ValidateModelName(name));
    // A copy on huge pages: a server decodes from these weights all day (MappedFile::Residency says why).
    QF_ASSIGN_OR_RETURN(Model model, formats::LoadModel(path, MappedFile::Residency::kHugePages));
    m->model = std::make_shared<const Model>(std::move(model));
    m->name = name;
    m->version = kFileVersion;
    m->source = path;
  } else {
    QF_ASSIGN_OR_RETURN(auto parsed, Parse(name, version));
    if (parsed.second) return absl::InvalidArgumentError("path: a model of version 'file' needs its path");
    if (parsed.first.version) {
      std::lock_guard<std::mutex> l(mu_);
      auto it = models_.find(parsed.first.name);
      if (it != models_.end()) {
        if (auto v = it->second.find(*parsed.first.version); v != it->second.end()) return v->second;
      }
    }
    if (!fetch_) {
      return absl::NotFoundError(absl::StrCat("model ", parsed.first.name,
                                              " is not loaded, and this server reads no artifact store (--scheduler)"));
    }
    QF_ASSIGN_OR_RETURN(auto fetched, fetch_(parsed.first));
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = models_.find(parsed.first.name);
      if (it != models_.end()) {
        if (auto v = it->second.find(fetched.first); v != it->second.end()) return v->second;
      }
    }
    m->model = std::make_shared<const Model>(std::move(fetched.second));
    m->name = parsed.first.name;
    m->version = fetched.first;
    m->source = "store";
  }
  if (m->model->vocab) {
    QF_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> t, TokenizerFromVocab(*m->model->vocab));
    m->tokenizer = std::move(t);
  }
  if (!tokenizer_path.empty()) {
    QF_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> t, LoadTokenizer(tokenizer_path, m->model->config.vocab_size));
    if (t->vocab_size() != m->model->config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer_path: ", tokenizer_path, " has ", t->vocab_size(),
                                                     " tokens, the model has ", m->model->config.vocab_size));
    }
    m->tokenizer = std::move(t);
  }
  AttachChatTemplate(*m);
  serving::EngineOptions engine_options = options_.engine;
  engine_options.on_step = nullptr;
  if (options_.on_step) {
    engine_options.on_step = [on_step = options_.on_step, ref = m->ref()](int sequences, int tokens, double seconds) {
      on_step(ref, sequences, tokens, seconds);
    };
  }
  QF_ASSIGN_OR_RETURN(m->engine, serving::Engine::Create(m->model, m->tokenizer, engine_options));
  m->context = engine_options.context > 0 ? std::min(engine_options.context, m->model->config.seq_len)
                                          : m->model->config.seq_len;
  return Install(std::move(m));
}

absl::StatusOr<std::shared_ptr<LoadedModel>> ModelRegistry::Get(const std::string& name, const std::string& version) {
  QF_ASSIGN_OR_RETURN(auto parsed, Parse(name, version));
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = models_.find(parsed.first.name);
    if (it != models_.end() && !it->second.empty()) {
      std::shared_ptr<LoadedModel> found;
      if (!parsed.first.version) {
        found = it->second.rbegin()->second;  // latest loaded
      } else if (auto v = it->second.find(*parsed.first.version); v != it->second.end()) {
        found = v->second;
      }
      if (found) {
        found->last_used_ms = NowMs();
        return found;
      }
    }
  }
  if (parsed.second) return absl::NotFoundError(absl::StrCat("model ", parsed.first.name, "@file is not loaded"));
  return Load(parsed.first.name, parsed.first.version ? absl::StrCat(*parsed.first.version) : "latest", "", "");
}

absl::Status ModelRegistry::Unload(const std::string& name, const std::string& version) {
  QF_ASSIGN_OR_RETURN(auto parsed, Parse(name, version));
  std::lock_guard<std::mutex> l(mu_);
  auto it = models_.find(parsed.first.name);
  if (it == models_.end() || it->second.empty()) {
    return absl::NotFoundError(absl::StrCat("model ", parsed.first.name, " is not loaded"));
  }
  if (!parsed.first.version) {
    it->second.erase(std::prev(it->second.end()));
  } else if (it->second.erase(*parsed.first.version) == 0) {
    return absl::NotFoundError(absl::StrCat("model ", name, "@", version, " is not loaded"));
  }
  if (it->second.empty()) models_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<LoadedModel>> ModelRegistry::ModelForNewAdapter(const std::string& model_ref,
                                                                               const std::string& adapter_name) {
  if (adapter_name.empty() || adapter_name.size() > 64 ||
      !std::all_of(adapter_name.begin(), adapter_name.end(), [](char ch) {
        return absl::ascii_isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '_' || ch == '-';
      })) {
    return absl::InvalidArgumentError("name: 1 to 64 characters of [A-Za-z0-9._-]");
  }
  QF_ASSIGN_OR_RETURN(std::shared_ptr<LoadedModel> m, Get(model_ref, ""));
  std::lock_guard<std::mutex> l(m->adapters_mu);
  if (m->adapters.contains(adapter_name)) {
    return absl::AlreadyExistsError(absl::StrCat("adapter ", adapter_name, " is already loaded for ", m->ref()));
  }
  return m;
}

absl::StatusOr<LoadedAdapter> ModelRegistry::Attach(LoadedModel& m, LoadedAdapter a) {
  std::lock_guard<std::mutex> l(m.adapters_mu);
  // Checked again: another load of the same name may have finished while this one parsed.
  if (!m.adapters.emplace(a.name, a).second) {
    return absl::AlreadyExistsError(absl::StrCat("adapter ", a.name, " is already loaded for ", m.ref()));
  }
  return a;
}

absl::StatusOr<LoadedAdapter> ModelRegistry::LoadAdapter(const std::string& model_ref, const std::string& adapter_name,
                                                        const std::string& path) {
  namespace fs = std::filesystem;
  if (options_.adapter_root.empty()) {
    return absl::FailedPreconditionError("adapters: this server was started without --adapter-root");
  }
  if (path.empty()) return absl::InvalidArgumentError("path: required");
  // The resolved path (symlinks followed) must stay under the resolved root.
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(options_.adapter_root, ec);
  if (ec) return absl::FailedPreconditionError(absl::StrCat("--adapter-root ", options_.adapter_root, ": ", ec.message()));
  const fs::path full = fs::weakly_canonical(fs::path(path).is_absolute() ? fs::path(path) : root / path, ec);
  const auto [root_end, full_it] = std::mismatch(root.begin(), root.end(), full.begin(), full.end());
  if (ec || root_end != root.end()) {
    return absl::PermissionDeniedError(absl::StrCat("path: ", path, " is outside the adapter root"));
  }
  QF_ASSIGN_OR_RETURN(std::shared_ptr<LoadedModel> m, ModelForNewAdapter(model_ref, adapter_name));
  auto parsed = lora::LoadAdapter(full.string(), m->model->config);
  if (!parsed.ok()) {
    // Name the request's path, not the resolved one: the client need not learn the server's layout.
    std::string message(parsed.status().message());
    if (absl::StartsWith(message, full.string())) message = path + message.substr(full.string().size());
    return absl::Status(parsed.status().code(), absl::StrCat("path: ", message));
  }
  return Attach(*m, LoadedAdapter{adapter_name, path, "", std::make_shared<const lora::LoraAdapter>(*std::move(parsed))});
}

absl::StatusOr<LoadedAdapter> ModelRegistry::LoadStoredAdapter(const std::string& model_ref,
                                                              const std::string& adapter_name,
                                                              const std::string& artifact) {
  auto ref = storage::ParseModelRef(artifact);
  if (!ref.ok()) return absl::InvalidArgumentError(absl::StrCat("artifact: ", ref.status().message()));
  if (fetch_adapter_ == nullptr) {
    return absl::FailedPreconditionError("artifact: this server has no artifact store (start it with --scheduler)");
  }
  QF_ASSIGN_OR_RETURN(std::shared_ptr<LoadedModel> m, ModelForNewAdapter(model_ref, adapter_name));
  auto stored = fetch_adapter_(*ref);
  if (!stored.ok()) return absl::Status(stored.status().code(), absl::StrCat("artifact: ", stored.status().message()));
  const std::string stored_ref = absl::StrCat(ref->name, "@", stored->version);
  const std::string base_ref = storage::FormatModelRef(stored->base);
  // An adapter is trained against one set of weights: another version of the base (or a file) is another model.
  if (m->version == kFileVersion || stored->base.name != m->name || stored->base.version != m->version) {
    return absl::FailedPreconditionError(
        absl::StrCat("artifact: ", stored_ref, " is an adapter of ", base_ref, ", not of ", m->ref()));
  }
  auto parsed = lora::ParseAdapterFiles(stored->files, m->model->config);
  if (!parsed.ok()) return absl::Status(parsed.status().code(), absl::StrCat("artifact: ", parsed.status().message()));
  return Attach(*m, LoadedAdapter{adapter_name, "", stored_ref,
                                  std::make_shared<const lora::LoraAdapter>(*std::move(parsed))});
}

absl::Status ModelRegistry::UnloadAdapter(const std::string& model_ref, const std::string& adapter_name) {
  std::vector<std::shared_ptr<LoadedModel>> candidates;
  if (!model_ref.empty()) {
    QF_ASSIGN_OR_RETURN(std::shared_ptr<LoadedModel> m, Get(model_ref, ""));
    candidates.push_back(std::move(m));
  } else {
    candidates = List();
  }
  std::vector<LoadedModel*> holders;
  for (const auto& m : candidates) {
    std::lock_guard<std::mutex> l(m->adapters_mu);
    if (m->adapters.contains(adapter_name)) holders.push_back(m.get());
  }
  if (holders.empty()) return absl::NotFoundError(absl::StrCat("adapter ", adapter_name, " is not loaded"));
  if (holders.size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat("model: required, ", holders.size(), " models have an adapter ",
                                                   adapter_name));
  }
  std::lock_guard<std::mutex> l(holders[0]->adapters_mu);
  holders[0]->adapters.erase(adapter_name);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const lora::LoraAdapter>> ModelRegistry::FindAdapter(const LoadedModel& m,
                                                                                   const std::string& adapter_name) {
  std::lock_guard<std::mutex> l(m.adapters_mu);
  auto it = m.adapters.find(adapter_name);
  if (it == m.adapters.end()) {
    return absl::NotFoundError(absl::StrCat("adapter: ", adapter_name, " is not loaded for ", m.ref()));
  }
  return it->second.adapter;
}

std::vector<std::shared_ptr<LoadedModel>> ModelRegistry::List() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::shared_ptr<LoadedModel>> out;
  for (const auto& [n, versions] : models_) {
    for (const auto& [v, m] : versions) out.push_back(m);
  }
  return out;
}

uint64_t ModelRegistry::ResidentBytes() const {
  uint64_t n = 0;
  for (const auto& m : List()) n += m->weight_bytes;
  return n;
}

}  // namespace qforge::server
