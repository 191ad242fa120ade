#include "core/runtime/transformer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/kernels/kernels.h"
#include "core/runtime/ops.h"

namespace qforge {
namespace {

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
    QF_ASSIGN_OR_RETURN(L.gate, model_->Get(names::FfnGate(l)));
    QF_ASSIGN_OR_RETURN(L.up, model_->Get(names::FfnUp(l)));
    QF_ASSIGN_OR_RETURN(L.down, model_->Get(names::FfnDown(l)));
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

  const size_t cache = static_cast<size_t>(c.n_layers) * max_seq_len_ * c.kv_dim();
  key_cache_.assign(cache, 0.0f);
  value_cache_.assign(cache, 0.0f);
  const size_t b = static_cast<size_t>(options_.max_batch);
  x_.resize(b * c.dim);
  xb_.resize(b * c.dim);
  xb2_.resize(b * c.dim);
  q_.resize(b * c.dim);
  hb_.resize(b * c.hidden_dim);
  hb2_.resize(b * c.hidden_dim);
  return absl::OkStatus();
}

absl::Status Transformer::MatMul(const Tensor& w, const float* x, int n, float* y, int64_t y_stride) {
  if (options_.linear_observer) options_.linear_observer(w.name, x, n, static_cast<int>(w.cols()));
  const int64_t rows = w.rows();
  // Chunks of at least ~32K multiply-adds so that small matrices are not drowned in dispatch overhead.
  const int64_t work_per_row = std::max<int64_t>(1, w.cols() * n);
  const int64_t min_chunk = std::max<int64_t>(1, (32 * 1024) / work_per_row);
  std::atomic<bool> failed{false};
  std::mutex mu;
  absl::Status first_error;
  pool_.ParallelFor(rows, min_chunk, [&](int64_t begin, int64_t end) {
    absl::Status s = kernels::MatMulRows(w, begin, end, x, n, y, y_stride);
    if (!s.ok() && !failed.exchange(true)) {
      std::lock_guard<std::mutex> lock(mu);
      first_error = s;
    }
  });
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
  if (start_pos < 0 || start_pos > cached_) {
    return absl::FailedPreconditionError(absl::StrCat("Forward: start_pos ", start_pos, " but only ", cached_,
                                                      " positions are cached"));
  }
  if (static_cast<int64_t>(start_pos) + static_cast<int64_t>(tokens.size()) > max_seq_len_) {
    return absl::OutOfRangeError(absl::StrCat("Forward: positions up to ", start_pos + tokens.size(),
                                              " exceed the context length ", max_seq_len_));
  }
  cached_ = start_pos;
  const int n = static_cast<int>(tokens.size());
  for (int done = 0; done < n;) {
    const int chunk = std::min(options_.max_batch, n - done);
    const bool last_chunk = done + chunk == n;
    float* chunk_logits = nullptr;
    if (logits_out != nullptr) {
      if (all_logits) chunk_logits = logits_out + static_cast<size_t>(done) * vocab;
      else if (last_chunk) chunk_logits = logits_out;
    }
    QF_RETURN_IF_ERROR(ForwardChunk(tokens.subspan(done, chunk), start_pos + done, chunk_logits, all_logits));
    done += chunk;
    cached_ = start_pos + done;
  }
  return absl::OkStatus();
}

absl::Status Transformer::ForwardChunk(std::span<const int> tokens, int pos0, float* logits_out, bool all_logits) {
  const ModelConfig& c = model_->config;
  const int n = static_cast<int>(tokens.size());
  const int dim = c.dim, kv_dim = c.kv_dim(), hd = c.head_dim(), hidden = c.hidden_dim;
  const int kv_group = c.n_heads / c.n_kv_heads;
  const int64_t layer_stride = static_cast<int64_t>(max_seq_len_) * kv_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  for (int t = 0; t < n; ++t) {
    QF_RETURN_IF_ERROR(kernels::DequantizeRows(*token_embd_, tokens[t], tokens[t] + 1, &x_[t * dim]));
  }

  for (int l = 0; l < c.n_layers; ++l) {
    const Layer& L = layers_[l];
    float* kc = key_cache_.data() + l * layer_stride;
    float* vc = value_cache_.data() + l * layer_stride;

    for (int t = 0; t < n; ++t) runtime_ops::RmsNorm(&x_[t * dim], L.attn_norm.data(), dim, c.norm_eps, &xb_[t * dim]);
    QF_RETURN_IF_ERROR(MatMul(*L.wq, xb_.data(), n, q_.data(), dim));
    // Keys and values land directly in their cache rows.
    QF_RETURN_IF_ERROR(MatMul(*L.wk, xb_.data(), n, kc + static_cast<int64_t>(pos0) * kv_dim, kv_dim));
    QF_RETURN_IF_ERROR(MatMul(*L.wv, xb_.data(), n, vc + static_cast<int64_t>(pos0) * kv_dim, kv_dim));
    for (int t = 0; t < n; ++t) {
      const float* cs = &rope_[static_cast<size_t>(pos0 + t) * hd];
      runtime_ops::ApplyRope(&q_[t * dim], c.n_heads, hd, cs);
      runtime_ops::ApplyRope(kc + static_cast<int64_t>(pos0 + t) * kv_dim, c.n_kv_heads, hd, cs);
    }

    // One task per (token, head); token t sees cache positions [0, pos0 + t].
    pool_.ParallelFor(static_cast<int64_t>(n) * c.n_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(static_cast<size_t>(pos0 + n));
      for (int64_t i = begin; i < end; ++i) {
        const int t = static_cast<int>(i / c.n_heads);
        const int h = static_cast<int>(i % c.n_heads);
        const int kvh = h / kv_group;
        runtime_ops::AttendHead(&q_[t * dim + h * hd], kc + kvh * hd, vc + kvh * hd, kv_dim, pos0 + t + 1, hd,
                                scale, scores.data(), &xb_[t * dim + h * hd]);
      }
    });
    QF_RETURN_IF_ERROR(MatMul(*L.wo, xb_.data(), n, xb2_.data(), dim));
    runtime_ops::AddInPlace(x_.data(), xb2_.data(), n * dim);

    for (int t = 0; t < n; ++t) runtime_ops::RmsNorm(&x_[t * dim], L.ffn_norm.data(), dim, c.norm_eps, &xb_[t * dim]);
    QF_RETURN_IF_ERROR(MatMul(*L.gate, xb_.data(), n, hb_.data(), hidden));
    QF_RETURN_IF_ERROR(MatMul(*L.up, xb_.data(), n, hb2_.data(), hidden));
    runtime_ops::SwiGlu(hb_.data(), hb2_.data(), n * hidden);
    QF_RETURN_IF_ERROR(MatMul(*L.down, hb_.data(), n, xb2_.data(), dim));
    runtime_ops::AddInPlace(x_.data(), xb2_.data(), n * dim);
  }

  if (logits_out == nullptr) return absl::OkStatus();
  const int first = all_logits ? 0 : n - 1;
  for (int t = first; t < n; ++t) runtime_ops::RmsNorm(&x_[t * dim], output_norm_.data(), dim, c.norm_eps, &xb_[t * dim]);
  return MatMul(*classifier_, &xb_[static_cast<size_t>(first) * dim], n - first, logits_out, c.vocab_size);
}

}  // namespace qforge
