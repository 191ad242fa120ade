#include "core/runtime/transformer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/kernels/kernels.h"
#include "core/kernels/lora_delta.h"
#include "core/kernels/qmoe.h"
#include "core/kernels/quip.h"
#include "core/runtime/ops.h"

namespace qforge {
namespace {

// How many units each thread's rows of a matmul are cut into (ThreadPool::ParallelFor): a thread done with its
// own takes the others' last units, so no thread waits at the end for one slowed by its neighbours.
constexpr int kMatMulUnitsPerChunk = 8;

// Norm weights are tiny and touched once per token, so they are decoded to fp32 once up front whatever
// their stored encoding.
absl::StatusOr<std::vector<float>> DecodeVector(const Model& m, const std::string& name, int n) {
  QF_ASSIGN_OR_RETURN(const Tensor* t, m.Get(name));
  if (t->numel() != n) return absl::InvalidArgumentError(absl::StrCat(name, ": expected ", n, " elements"));
  std::vector<float> out(static_cast<size_t>(n));
  QF_RETURN_IF_ERROR(kernels::DequantizeRows(*t, 0, t->rows(), out.data()));
  return out;
}

}  // namespace

Transformer::Transformer(std::shared_ptr<const Model> model, const RuntimeOptions& options)
    : model_(std::move(model)), options_(options), pool_(options.threads) {}

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Create(std::shared_ptr<const Model> model,
                                                                 const RuntimeOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("Transformer::Create: null model");
  QF_RETURN_IF_ERROR(ValidateModel(*model));
  std::unique_ptr<Transformer> t(new Transformer(std::move(model), options));
  QF_RETURN_IF_ERROR(t->Init());
  return t;
}

absl::Status Transformer::Init() {
  const ModelConfig& c = model_->config;
  if (c.dim % c.n_heads != 0 || c.head_dim() % 2 != 0 || c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError("Transformer: dim/n_heads must be even and n_heads % n_kv_heads == 0");
  }
  max_seq_len_ = options_.max_seq_len > 0 ? std::min(options_.max_seq_len, c.seq_len) : c.seq_len;
  if (options_.max_batch <= 0) options_.max_batch = 1;

  QF_ASSIGN_OR_RETURN(token_embd_, model_->Get(names::kTokenEmbd));
  if (c.tied_embeddings) {
    classifier_ = token_embd_;
  } else {
    QF_ASSIGN_OR_RETURN(classifier_, model_->Get(names::kOutput));
  }
  QF_ASSIGN_OR_RETURN(output_norm_, DecodeVector(*model_, names::kOutputNorm, c.dim));
  layers_.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    Layer& L = layers_[l];
    QF_ASSIGN_OR_RETURN(L.attn_norm, DecodeVector(*model_, names::AttnNorm(l), c.dim));
    QF_ASSIGN_OR_RETURN(L.ffn_norm, DecodeVector(*model_, names::FfnNorm(l), c.dim));
    QF_ASSIGN_OR_RETURN(L.wq, model_->Get(names::AttnQ(l)));
    QF_ASSIGN_OR_RETURN(L.wk, model_->Get(names::AttnK(l)));
    QF_ASSIGN_OR_RETURN(L.wv, model_->Get(names::AttnV(l)));
    QF_ASSIGN_OR_RETURN(L.wo, model_->Get(names::AttnOutput(l)));
    if (!c.is_moe()) {
      QF_ASSIGN_OR_RETURN(L.gate, model_->Get(names::FfnGate(l)));
      QF_ASSIGN_OR_RETURN(L.up, model_->Get(names::FfnUp(l)));
      QF_ASSIGN_OR_RETURN(L.down, model_->Get(names::FfnDown(l)));
      continue;
    }
    QF_ASSIGN_OR_RETURN(L.router, model_->Get(names::FfnGateInp(l)));
    for (int e = 0; e < c.n_experts; ++e) {
      QF_ASSIGN_OR_RETURN(const Tensor* g, model_->Get(names::FfnGateExpert(l, e)));
      QF_ASSIGN_OR_RETURN(const Tensor* u, model_->Get(names::FfnUpExpert(l, e)));
      QF_ASSIGN_OR_RETURN(const Tensor* d, model_->Get(names::FfnDownExpert(l, e)));
      L.expert_gate.push_back(g);
      L.expert_up.push_back(u);
      L.expert_down.push_back(d);
      // A qmoe expert's dictionary is built at load, not inside the first token's matmul.
      for (const Tensor* t : {g, u, d}) {
        if (t->format.type == WeightType::kQMoE) QF_RETURN_IF_ERROR(kernels::qmoe::Prepare(*t));
      }
    }
  }

  // The rotation angles are computed in double so that long positions keep full fp32 accuracy.
  const int hd = c.head_dim();
  rope_.resize(static_cast<size_t>(max_seq_len_) * hd);
  for (int pos = 0; pos < max_seq_len_; ++pos) {
    for (int i = 0; i < hd; i += 2) {
      const double freq = std::pow(static_cast<double>(c.rope_theta), -static_cast<double>(i) / hd);
      const double angle = pos * freq;
      rope_[static_cast<size_t>(pos) * hd + i] = static_cast<float>(std::cos(angle));
      rope_[static_cast<size_t>(pos) * hd + i + 1] = static_cast<float>(std::sin(angle));
    }
  }

  const size_t b = static_cast<size_t>(options_.max_batch);
  x_.resize(b * c.dim);
  xb_.resize(b * c.dim);
  xb2_.resize(b * c.dim);
  q_.resize(b * c.dim);
  k_.resize(b * c.kv_dim());
  v_.resize(b * c.kv_dim());
  hb_.resize(b * c.hidden_dim);
  hb2_.resize(b * c.hidden_dim);
  if (c.is_moe()) {
    const size_t k = static_cast<size_t>(c.n_experts_used);
    router_probs_.resize(b * c.n_experts);
    route_weight_.resize(b * k);
    route_expert_.resize(b * k);
    expert_rows_.resize(b);
    expert_x_.resize(b * c.dim);
    expert_out_.resize(b * k * c.dim);
  }
  return absl::OkStatus();
}

absl::StatusOr<KvCache> Transformer::NewCache(int capacity) const {
  if (capacity <= 0) capacity = max_seq_len_;
  if (capacity > max_seq_len_) {
    return absl::InvalidArgumentError(
        absl::StrCat("NewCache: capacity ", capacity, " exceeds the context length ", max_seq_len_));
  }
  return KvCache::Create(model_->config, capacity);
}

absl::Status Transformer::MatMul(const Tensor& w, const float* x, int n, float* y, int64_t y_stride,
                                 bool same_input) {
  if (options_.linear_observer) options_.linear_observer(w.name, x, n, static_cast<int>(w.cols()));
  if (w.format.type == WeightType::kQuip) {
    // U mixes all output rows: rotate each token's x, run the kQInt product over all rows (split over the
    // pool), unrotate each token's y. Per-token transforms keep batched results equal to unbatched ones.
    std::shared_ptr<const kernels::QuipTransform>& q = quip_[&w];
    absl::Status s;
    if (q == nullptr) {
      auto made = kernels::QuipTransform::Create(w);
      if (made.ok()) q = *std::move(made);
      s = made.status();
    }
    if (s.ok()) s = kernels::QuipMatMul(*q, x, n, y, y_stride, &pool_);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat(w.name, ": ", s.message()));
    return absl::OkStatus();
  }
  const int64_t rows = w.rows();
  const int64_t cols = w.cols();
  QF_RETURN_IF_ERROR(kernels::PrepareInput(w, x, n, options_.activations, &input_, same_input));
  // Chunks of at least ~32K multiply-adds so that small matrices are not drowned in dispatch overhead, in
  // whole groups of eight rows (the integer kernels' unit).
  const int64_t work_per_row = std::max<int64_t>(1, cols * n);
  const int64_t min_chunk = std::max<int64_t>(8, (32 * 1024) / work_per_row + 7) / 8 * 8;
  // The kernels are batch-invariant (kernels.h): a token's outputs do not depend on the others in the call, so
  // a sequence computes the same bits alone, chunked any way, or batched with other sequences.
  std::atomic<bool> failed{false};
  std::mutex mu;
  absl::Status first_error;
  pool_.ParallelFor(rows, min_chunk, [&](int64_t begin, int64_t end) {
    const absl::Status s = kernels::MatMulRows(w, begin, end, input_, y, y_stride);
    if (!s.ok() && !failed.exchange(true)) {
      std::lock_guard<std::mutex> lock(mu);
      first_error = s;
    }
  }, /*align=*/16, kMatMulUnitsPerChunk);
  if (failed.load()) {
    std::lock_guard<std::mutex> lock(mu);
    return absl::Status(first_error.code(), absl::StrCat(w.name, ": ", first_error.message()));
  }
  return absl::OkStatus();
}

absl::Status Transformer::Forward(std::span<const int> tokens, int start_pos, float* logits_out, bool all_logits) {
  const int vocab = model_->config.vocab_size;
  if (tokens.empty()) return absl::InvalidArgumentError("Forward: no tokens");
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("Forward: token id ", tokens[i], " at index ", i, " outside [0, ", vocab, ")"));
    }
  }
  if (start_pos < 0 || start_pos > cached_positions()) {
    return absl::FailedPreconditionError(absl::StrCat("Forward: start_pos ", start_pos, " but only ",
                                                      cached_positions(), " positions are cached"));
  }
  if (static_cast<int64_t>(start_pos) + static_cast<int64_t>(tokens.size()) > max_seq_len_) {
    return absl::OutOfRangeError(absl::StrCat("Forward: positions up to ", start_pos + tokens.size(),
                                              " exceed the context length ", max_seq_len_));
  }
  if (own_cache_ == nullptr) {
    QF_ASSIGN_OR_RETURN(KvCache cache, NewCache(max_seq_len_));
    own_cache_ = std::make_unique<KvCache>(std::move(cache));
  }
  const int n = static_cast<int>(tokens.size());
  forward_tokens_.resize(n);
  for (int i = 0; i < n; ++i) {
    const bool want = logits_out != nullptr && (all_logits || i == n - 1);
    forward_tokens_[i] = BatchToken{own_cache_.get(), tokens[i], start_pos + i, want};
  }
  return ForwardBatch(forward_tokens_, logits_out);
}

absl::Status Transformer::ValidateBatch(std::span<const BatchToken> tokens, const float* logits_out) const {
  const ModelConfig& c = model_->config;
  if (tokens.empty()) return absl::InvalidArgumentError("ForwardBatch: no tokens");
  // Next expected position of each cache seen so far.
  absl::flat_hash_map<const KvCache*, int> next_pos;
  const lora::LoraAdapter* checked_adapter = nullptr;  // consecutive tokens mostly share one: check it once
  for (size_t i = 0; i < tokens.size(); ++i) {
    const BatchToken& b = tokens[i];
    if (b.cache == nullptr) return absl::InvalidArgumentError(absl::StrCat("ForwardBatch: token ", i, ": null cache"));
    if (b.cache->n_layers() != c.n_layers || b.cache->kv_dim() != c.kv_dim()) {
      return absl::InvalidArgumentError(absl::StrCat("ForwardBatch: token ", i, ": cache of ", b.cache->n_layers(),
                                                     " layers x kv_dim ", b.cache->kv_dim(), ", model has ",
                                                     c.n_layers, " x ", c.kv_dim()));
    }
    if (b.cache->capacity() > max_seq_len_) {
      return absl::InvalidArgumentError(absl::StrCat("ForwardBatch: token ", i, ": cache capacity ",
                                                     b.cache->capacity(), " exceeds the context length ",
                                                     max_seq_len_));
    }
    if (b.token < 0 || b.token >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("ForwardBatch: token id ", b.token, " at index ", i, " outside [0, ", c.vocab_size, ")"));
    }
    if (b.want_logits && logits_out == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("ForwardBatch: token ", i, " wants logits but logits_out is null"));
    }
    if (b.pos < 0) return absl::InvalidArgumentError(absl::StrCat("ForwardBatch: token ", i, ": position ", b.pos));
    if (b.adapter != nullptr && b.adapter != checked_adapter) {
      if (absl::Status s = lora::CheckAdapterFits(*b.adapter, c); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat("ForwardBatch: token ", i, ": ", s.message()));
      }
      checked_adapter = b.adapter;
    }
    auto [it, first] = next_pos.try_emplace(b.cache, b.pos + 1);
    if (first) {
      if (b.pos > b.cache->positions()) {
        return absl::FailedPreconditionError(absl::StrCat("ForwardBatch: token ", i, " at position ", b.pos,
                                                          " but only ", b.cache->positions(),
                                                          " positions of its cache are filled"));
      }
    } else {
      if (b.pos != it->second) {
        return absl::InvalidArgumentError(absl::StrCat("ForwardBatch: token ", i, " at position ", b.pos,
                                                       ", the previous token of its sequence was at ",
                                                       it->second - 1));
      }
      it->second = b.pos + 1;
    }
    if (b.pos >= b.cache->capacity()) {
      return absl::OutOfRangeError(absl::StrCat("ForwardBatch: token ", i, " at position ", b.pos,
                                                " past its cache's capacity ", b.cache->capacity()));
    }
  }
  return absl::OkStatus();
}

absl::Status Transformer::ForwardBatch(std::span<const BatchToken> tokens, float* logits_out) {
  QF_RETURN_IF_ERROR(ValidateBatch(tokens, logits_out));
  // What follows each sequence's first position is being overwritten.
  for (auto it = tokens.rbegin(); it != tokens.rend(); ++it) it->cache->positions_ = it->pos;
  const int vocab = model_->config.vocab_size;
  const int n = static_cast<int>(tokens.size());
  size_t logits_done = 0;
  for (int done = 0; done < n;) {
    const int chunk = std::min(options_.max_batch, n - done);
    const std::span<const BatchToken> part = tokens.subspan(done, chunk);
    QF_RETURN_IF_ERROR(ForwardChunk(part, logits_out == nullptr ? nullptr : logits_out + logits_done * vocab));
    for (const BatchToken& b : part) {
      b.cache->positions_ = b.pos + 1;
      if (b.want_logits) ++logits_done;
    }
    done += chunk;
  }
  return absl::OkStatus();
}

absl::Status Transformer::ForwardChunk(std::span<const BatchToken> tokens, float* logits_out) {
  const ModelConfig& c = model_->config;
  const int n = static_cast<int>(tokens.size());
  const int dim = c.dim;
  for (int t = 0; t < n; ++t) {
    QF_RETURN_IF_ERROR(kernels::DequantizeRows(*token_embd_, tokens[t].token, tokens[t].token + 1, &x_[t * dim]));
  }
  for (int l = 0; l < c.n_layers; ++l) QF_RETURN_IF_ERROR(BlockChunk(tokens, l));

  // The classifier runs once, over the wanted tokens gathered into consecutive rows.
  int wanted = 0;
  for (int t = 0; t < n; ++t) {
    if (!tokens[t].want_logits) continue;
    runtime_ops::RmsNorm(&x_[t * dim], output_norm_.data(), dim, c.norm_eps, &xb_[static_cast<size_t>(wanted) * dim]);
    ++wanted;
  }
  if (wanted == 0) return absl::OkStatus();
  return MatMul(*classifier_, xb_.data(), wanted, logits_out, c.vocab_size);
}

absl::Status Transformer::BlockChunk(std::span<const BatchToken> tokens, int l) {
  const ModelConfig& c = model_->config;
  const int n = static_cast<int>(tokens.size());
  const int dim = c.dim, kv_dim = c.kv_dim(), hd = c.head_dim();
  const int kv_group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int max_pos = 0;
  for (const BatchToken& b : tokens) max_pos = std::max(max_pos, b.pos);
  {
    const Layer& L = layers_[l];

    for (int t = 0; t < n; ++t) runtime_ops::RmsNorm(&x_[t * dim], L.attn_norm.data(), dim, c.norm_eps, &xb_[t * dim]);
    QF_RETURN_IF_ERROR(MatMul(*L.wq, xb_.data(), n, q_.data(), dim));
    QF_RETURN_IF_ERROR(MatMul(*L.wk, xb_.data(), n, k_.data(), kv_dim, /*same_input=*/true));
    QF_RETURN_IF_ERROR(MatMul(*L.wv, xb_.data(), n, v_.data(), kv_dim, /*same_input=*/true));
    // Adapter updates land before RoPE: they are part of the projection (q/k B rows are in this runtime's order).
    QF_RETURN_IF_ERROR(AddAdapterDeltas(tokens, l,
                                        {{lora::LoraTarget::kAttnQ, q_.data(), dim},
                                         {lora::LoraTarget::kAttnK, k_.data(), kv_dim},
                                         {lora::LoraTarget::kAttnV, v_.data(), kv_dim}},
                                        xb_.data(), dim));
    // Rotate, then file each token's key and value under its own sequence and position. All of them land
    // before any attention runs, so a token sees the earlier tokens of its sequence in the same chunk.
    for (int t = 0; t < n; ++t) {
      const BatchToken& b = tokens[t];
      const float* cs = &rope_[static_cast<size_t>(b.pos) * hd];
      runtime_ops::ApplyRope(&q_[t * dim], c.n_heads, hd, cs);
      runtime_ops::ApplyRope(&k_[t * kv_dim], c.n_kv_heads, hd, cs);
      std::copy_n(&k_[t * kv_dim], kv_dim, b.cache->keys(l, b.pos));
      std::copy_n(&v_[t * kv_dim], kv_dim, b.cache->values(l, b.pos));
    }

    // One task per (key/value head, token): the token's query heads that share that key/value head attend
    // together, each key and value loaded once for all of them. Tasks run key/value head by key/value head, so one
    // head's slice of the caches stays in cache across the tokens. A token sees positions [0, pos] of its cache.
    // At least ~32K multiply-adds per chunk, as for the matmuls: a small model's heads are not worth a thread each.
    const int64_t group_work = std::max<int64_t>(1, 2 * static_cast<int64_t>(hd) * kv_group * (max_pos + 1));
    pool_.ParallelFor(static_cast<int64_t>(c.n_kv_heads) * n, std::max<int64_t>(1, (32 * 1024) / group_work),
                      [&](int64_t begin, int64_t end) {
      std::vector<float> scores(static_cast<size_t>(kv_group) * (max_pos + 1));
      for (int64_t i = begin; i < end; ++i) {
        const int kvh = static_cast<int>(i / n);
        const int t = static_cast<int>(i % n);
        const int h0 = kvh * kv_group;
        KvCache& cache = *tokens[t].cache;
        runtime_ops::AttendGroup(&q_[t * dim + h0 * hd], kv_group, cache.keys(l, 0) + kvh * hd,
                                 cache.values(l, 0) + kvh * hd, kv_dim, tokens[t].pos + 1, hd, scale, scores.data(),
                                 &xb_[t * dim + h0 * hd]);
      }
    });
    QF_RETURN_IF_ERROR(MatMul(*L.wo, xb_.data(), n, xb2_.data(), dim));
    QF_RETURN_IF_ERROR(AddAdapterDeltas(tokens, l, {{lora::LoraTarget::kAttnOutput, xb2_.data(), dim}}, xb_.data(), dim));
    runtime_ops::AddInPlace(x_.data(), xb2_.data(), n * dim);

    for (int t = 0; t < n; ++t) runtime_ops::RmsNorm(&x_[t * dim], L.ffn_norm.data(), dim, c.norm_eps, &xb_[t * dim]);
    QF_RETURN_IF_ERROR(c.is_moe() ? MoeFfn(L, n) : DenseFfn(tokens, l, L, n));
    runtime_ops::AddInPlace(x_.data(), xb2_.data(), n * dim);
  }
  return absl::OkStatus();
}

absl::Status Transformer::ForwardBlock(int layer, float* x, int n) {
  const ModelConfig& c = model_->config;
  if (layer < 0 || layer >= c.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("ForwardBlock: block ", layer, " outside [0, ", c.n_layers, ")"));
  }
  if (n < 1 || n > max_seq_len_) {
    return absl::OutOfRangeError(absl::StrCat("ForwardBlock: ", n, " positions, the context holds 1..", max_seq_len_));
  }
  if (own_cache_ == nullptr) {
    QF_ASSIGN_OR_RETURN(KvCache cache, NewCache(max_seq_len_));
    own_cache_ = std::make_unique<KvCache>(std::move(cache));
  }
  own_cache_->Reset();
  const size_t dim = static_cast<size_t>(c.dim);
  // The chunks Forward cuts a window of n tokens into (ForwardBatch), so each block sees the same batches.
  for (int done = 0; done < n;) {
    const int chunk = std::min(options_.max_batch, n - done);
    forward_tokens_.resize(chunk);
    for (int i = 0; i < chunk; ++i) forward_tokens_[i] = BatchToken{own_cache_.get(), 0, done + i, false};
    std::copy_n(x + done * dim, chunk * dim, x_.data());
    QF_RETURN_IF_ERROR(BlockChunk(forward_tokens_, layer));
    std::copy_n(x_.data(), chunk * dim, x + done * dim);
    done += chunk;
  }
  own_cache_->Reset();
  return absl::OkStatus();
}

absl::Status Transformer::Embed(std::span<const int> tokens, float* x) const {
  const int vocab = model_->config.vocab_size, dim = model_->config.dim;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("Embed: token id ", tokens[i], " at index ", i, " outside [0, ", vocab, ")"));
    }
    QF_RETURN_IF_ERROR(kernels::DequantizeRows(*token_embd_, tokens[i], tokens[i] + 1, x + i * dim));
  }
  return absl::OkStatus();
}

void Transformer::FinalNorm(const float* x, int n, float* out) const {
  const int dim = model_->config.dim;
  for (int t = 0; t < n; ++t) {
    runtime_ops::RmsNorm(x + static_cast<size_t>(t) * dim, output_norm_.data(), dim, model_->config.norm_eps,
                         out + static_cast<size_t>(t) * dim);
  }
}

absl::Status Transformer::AddAdapterDeltas(std::span<const BatchToken> tokens, int layer,
                                           std::initializer_list<AdapterOutput> outputs, const float* x, int64_t in) {
  // The tokens that adapt these linears, grouped by matrix (token order within a group), cut into pieces of at
  // most kPiece tokens: each piece reads its adapter's A and B once for all its tokens. The linears given together
  // share their input and go through one ParallelFor (one wake-up of the pool, not one per linear).
  constexpr int kPiece = 16;
  adapter_rows_.clear();
  for (size_t o = 0; o < outputs.size(); ++o) {
    const AdapterOutput& out = outputs.begin()[o];
    for (size_t t = 0; t < tokens.size(); ++t) {
      if (tokens[t].adapter == nullptr) continue;
      if (const lora::LoraMatrix* m = tokens[t].adapter->Find(layer, out.target)) {
        adapter_rows_.push_back({m, static_cast<int>(t), static_cast<int>(o)});
      }
    }
  }
  if (adapter_rows_.empty()) return absl::OkStatus();
  std::stable_sort(adapter_rows_.begin(), adapter_rows_.end(),
                   [](const AdapterRow& p, const AdapterRow& q) { return std::less<>()(p.matrix, q.matrix); });
  adapter_pieces_.clear();
  for (size_t i = 0; i < adapter_rows_.size();) {
    size_t j = i + 1;
    while (j < adapter_rows_.size() && j - i < kPiece && adapter_rows_[j].matrix == adapter_rows_[i].matrix) ++j;
    adapter_pieces_.push_back({i, j});
    i = j;
  }
  // A token's update does not depend on which piece it is in or what else is there (lora_delta.h), so the
  // grouping keeps batch invariance.
  pool_.ParallelFor(static_cast<int64_t>(adapter_pieces_.size()), 1, [&](int64_t begin, int64_t end) {
    const float* x_rows[kPiece];
    float* y_rows[kPiece];
    std::vector<float> u;
    for (int64_t p = begin; p < end; ++p) {
      const auto [first, last] = adapter_pieces_[p];
      const lora::LoraMatrix& m = *adapter_rows_[first].matrix;
      const AdapterOutput& out = outputs.begin()[adapter_rows_[first].output];
      const int n = static_cast<int>(last - first);
      for (int i = 0; i < n; ++i) {
        const int64_t t = adapter_rows_[first + i].token;
        x_rows[i] = x + t * in;
        y_rows[i] = out.y + t * out.y_stride;
      }
      u.resize(static_cast<size_t>(n) * m.rank);
      kernels::AddLoraDelta(m.a.data(), m.b_t.data(), m.rank, in, m.out, m.scale, x_rows, y_rows, n, u.data());
    }
  });
  return absl::OkStatus();
}

absl::Status Transformer::DenseFfn(std::span<const BatchToken> tokens, int layer, const Layer& L, int n) {
  const int dim = model_->config.dim, hidden = model_->config.hidden_dim;
  QF_RETURN_IF_ERROR(MatMul(*L.gate, xb_.data(), n, hb_.data(), hidden));
  QF_RETURN_IF_ERROR(MatMul(*L.up, xb_.data(), n, hb2_.data(), hidden, /*same_input=*/true));
  QF_RETURN_IF_ERROR(AddAdapterDeltas(
      tokens, layer, {{lora::LoraTarget::kFfnGate, hb_.data(), hidden}, {lora::LoraTarget::kFfnUp, hb2_.data(), hidden}},
      xb_.data(), dim));
  runtime_ops::SwiGlu(hb_.data(), hb2_.data(), n * hidden);
  QF_RETURN_IF_ERROR(MatMul(*L.down, hb_.data(), n, xb2_.data(), dim));
  return AddAdapterDeltas(tokens, layer, {{lora::LoraTarget::kFfnDown, xb2_.data(), dim}}, hb_.data(), hidden);
}

absl::Status Transformer::MoeFfn(const Layer& L, int n) {
  const ModelConfig& c = model_->config;
  const int dim = c.dim, hidden = c.hidden_dim, n_exp = c.n_experts, k = c.n_experts_used;
  QF_RETURN_IF_ERROR(MatMul(*L.router, xb_.data(), n, router_probs_.data(), n_exp));
  for (int t = 0; t < n; ++t) {
    runtime_ops::RouteTopK(&router_probs_[static_cast<size_t>(t) * n_exp], n_exp, k, &route_expert_[t * k],
                           &route_weight_[t * k]);
  }
  // Expert by expert, the rows routed to it go through its SwiGLU together; each (token, slot) output lands in
  // its own row of expert_out_, so a token's sum below is the same whatever else is in the batch.
  for (int e = 0; e < n_exp; ++e) {
    int rows = 0;
    for (int i = 0; i < n * k; ++i) {
      if (route_expert_[i] != e) continue;
      std::copy_n(&xb_[static_cast<size_t>(i / k) * dim], dim, &expert_x_[static_cast<size_t>(rows) * dim]);
      expert_rows_[rows++] = i;
    }
    if (rows == 0) continue;
    QF_RETURN_IF_ERROR(MatMul(*L.expert_gate[e], expert_x_.data(), rows, hb_.data(), hidden));
    QF_RETURN_IF_ERROR(MatMul(*L.expert_up[e], expert_x_.data(), rows, hb2_.data(), hidden, /*same_input=*/true));
    runtime_ops::SwiGlu(hb_.data(), hb2_.data(), rows * hidden);
    // The down projection writes straight into the slots' rows: row r of the product goes to expert_rows_[r].
    QF_RETURN_IF_ERROR(MatMul(*L.expert_down[e], hb_.data(), rows, xb2_.data(), dim));
    for (int r = 0; r < rows; ++r) {
      std::copy_n(&xb2_[static_cast<size_t>(r) * dim], dim, &expert_out_[static_cast<size_t>(expert_rows_[r]) * dim]);
    }
  }
  for (int t = 0; t < n; ++t) {
    float* y = &xb2_[static_cast<size_t>(t) * dim];
    std::fill_n(y, dim, 0.0f);
    for (int s = 0; s < k; ++s) {
      const float w = route_weight_[t * k + s];
      const float* o = &expert_out_[(static_cast<size_t>(t) * k + s) * dim];
      for (int j = 0; j < dim; ++j) y[j] += w * o[j];
    }
  }
  return absl::OkStatus();
}

KvCache::KvCache(int n_layers, int kv_dim, int capacity)
    : n_layers_(n_layers),
      kv_dim_(kv_dim),
      capacity_(capacity),
      keys_(new float[static_cast<size_t>(n_layers) * capacity * kv_dim]),
      values_(new float[static_cast<size_t>(n_layers) * capacity * kv_dim]) {}

absl::StatusOr<KvCache> KvCache::Create(const ModelConfig& config, int capacity) {
  QF_RETURN_IF_ERROR(ValidateConfig(config));
  if (capacity < 1 || capacity > config.seq_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvCache: capacity ", capacity, " outside [1, ", config.seq_len, "] (the model's seq_len)"));
  }
  return KvCache(config.n_layers, config.kv_dim(), capacity);
}

}  // namespace qforge
