#include "core/model/model.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/status_macros.h"

namespace qforge {

namespace names {
std::string AttnNorm(int l) { return absl::StrCat("blk.", l, ".attn_norm.weight"); }
std::string AttnQ(int l) { return absl::StrCat("blk.", l, ".attn_q.weight"); }
std::string AttnK(int l) { return absl::StrCat("blk.", l, ".attn_k.weight"); }
std::string AttnV(int l) { return absl::StrCat("blk.", l, ".attn_v.weight"); }
std::string AttnOutput(int l) { return absl::StrCat("blk.", l, ".attn_output.weight"); }
std::string FfnNorm(int l) { return absl::StrCat("blk.", l, ".ffn_norm.weight"); }
std::string FfnGate(int l) { return absl::StrCat("blk.", l, ".ffn_gate.weight"); }
std::string FfnUp(int l) { return absl::StrCat("blk.", l, ".ffn_up.weight"); }
std::string FfnDown(int l) { return absl::StrCat("blk.", l, ".ffn_down.weight"); }
std::string FfnGateInp(int l) { return absl::StrCat("blk.", l, ".ffn_gate_inp.weight"); }
std::string FfnGateExpert(int l, int e) { return absl::StrCat("blk.", l, ".ffn_gate.", e, ".weight"); }
std::string FfnUpExpert(int l, int e) { return absl::StrCat("blk.", l, ".ffn_up.", e, ".weight"); }
std::string FfnDownExpert(int l, int e) { return absl::StrCat("blk.", l, ".ffn_down.", e, ".weight"); }
}  // namespace names

absl::Status ValidateConfig(const ModelConfig& c) {
  auto bad = [](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat("model config: ", what)); };
  constexpr int kMaxDim = 1 << 20;
  if (c.arch != "llama") return bad(absl::StrCat("architecture '", c.arch, "' is not supported (llama only)"));
  if (c.dim <= 0 || c.dim > kMaxDim) return bad(absl::StrCat("dim ", c.dim, " out of range"));
  if (c.hidden_dim <= 0 || c.hidden_dim > kMaxDim) return bad(absl::StrCat("hidden_dim ", c.hidden_dim, " out of range"));
  if (c.n_layers <= 0 || c.n_layers > 4096) return bad(absl::StrCat("n_layers ", c.n_layers, " out of range"));
  if (c.n_heads <= 0 || c.dim % c.n_heads != 0) return bad(absl::StrCat("n_heads ", c.n_heads, " does not divide dim ", c.dim));
  if (c.head_dim() % 2 != 0) return bad(absl::StrCat("head_dim ", c.head_dim(), " must be even for RoPE"));
  if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0)
    return bad(absl::StrCat("n_kv_heads ", c.n_kv_heads, " does not divide n_heads ", c.n_heads));
  if (c.vocab_size <= 0 || c.vocab_size > (1 << 24)) return bad(absl::StrCat("vocab_size ", c.vocab_size, " out of range"));
  if (c.seq_len <= 0 || c.seq_len > (1 << 24)) return bad(absl::StrCat("seq_len ", c.seq_len, " out of range"));
  if (!(c.rope_theta > 0.0f)) return bad("rope_theta must be positive");
  if (!(c.norm_eps > 0.0f) || c.norm_eps > 1.0f) return bad("norm_eps must be in (0, 1]");
  if (c.n_experts < 0 || c.n_experts > 4096) return bad(absl::StrCat("n_experts ", c.n_experts, " out of range"));
  if (c.is_moe() && (c.n_experts_used < 1 || c.n_experts_used > c.n_experts)) {
    return bad(absl::StrCat("n_experts_used ", c.n_experts_used, " must be in [1, n_experts = ", c.n_experts, "]"));
  }
  if (!c.is_moe() && c.n_experts_used != 0) return bad("n_experts_used is set but n_experts is 0");
  return absl::OkStatus();
}

const Tensor* Model::Find(const std::string& name) const {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : &it->second;
}

absl::StatusOr<const Tensor*> Model::Get(const std::string& name) const {
  const Tensor* t = Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("model has no tensor '", name, "'"));
  return t;
}

namespace {
absl::Status ExpectShape(const Model& m, const std::string& name, std::vector<int64_t> shape) {
  QF_ASSIGN_OR_RETURN(const Tensor* t, m.Get(name));
  if (t->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has shape [", absl::StrJoin(t->shape, ", "),
                                                   "], expected [", absl::StrJoin(shape, ", "), "]"));
  }
  return ValidateTensor(*t);
}
}  // namespace

int ParseBytePiece(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
  int value = 0;
  for (int i = 3; i < 5; ++i) {
    const char ch = piece[i];
    int d;
    if (ch >= '0' && ch <= '9') d = ch - '0';
    else if (ch >= 'A' && ch <= 'F') d = ch - 'A' + 10;
    else if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
    else return -1;
    value = value * 16 + d;
  }
  return value;
}

absl::Status ValidateModel(const Model& m) {
  QF_RETURN_IF_ERROR(ValidateConfig(m.config));
  const ModelConfig& c = m.config;
  QF_RETURN_IF_ERROR(ExpectShape(m, names::kTokenEmbd, {c.vocab_size, c.dim}));
  QF_RETURN_IF_ERROR(ExpectShape(m, names::kOutputNorm, {c.dim}));
  if (c.tied_embeddings) {
    if (m.Find(names::kOutput) != nullptr) return absl::InvalidArgumentError("tied model must not have output.weight");
  } else {
    QF_RETURN_IF_ERROR(ExpectShape(m, names::kOutput, {c.vocab_size, c.dim}));
  }
  for (int l = 0; l < c.n_layers; ++l) {
    QF_RETURN_IF_ERROR(ExpectShape(m, names::AttnNorm(l), {c.dim}));
    QF_RETURN_IF_ERROR(ExpectShape(m, names::AttnQ(l), {c.dim, c.dim}));
    QF_RETURN_IF_ERROR(ExpectShape(m, names::AttnK(l), {c.kv_dim(), c.dim}));
    QF_RETURN_IF_ERROR(ExpectShape(m, names::AttnV(l), {c.kv_dim(), c.dim}));
    QF_RETURN_IF_ERROR(ExpectShape(m, names::AttnOutput(l), {c.dim, c.dim}));
    QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnNorm(l), {c.dim}));
    if (!c.is_moe()) {
      QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnGate(l), {c.hidden_dim, c.dim}));
      QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnUp(l), {c.hidden_dim, c.dim}));
      QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnDown(l), {c.dim, c.hidden_dim}));
      continue;
    }
    QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnGateInp(l), {c.n_experts, c.dim}));
    for (int e = 0; e < c.n_experts; ++e) {
      QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnGateExpert(l, e), {c.hidden_dim, c.dim}));
      QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnUpExpert(l, e), {c.hidden_dim, c.dim}));
      QF_RETURN_IF_ERROR(ExpectShape(m, names::FfnDownExpert(l, e), {c.dim, c.hidden_dim}));
    }
  }
  for (const auto& [name, t] : m.tensors) {
    QF_RETURN_IF_ERROR(ValidateTensor(t));
    // Norm vectors are read as plain floats by the runtime.
    if (t.shape.size() == 1 && !t.format.is_float()) {
      return absl::InvalidArgumentError(absl::StrCat("1-D tensor '", name, "' must be f32/f16/bf16"));
    }
  }
  if (m.vocab.has_value()) {
    const Vocab& v = *m.vocab;
    if (v.tokens.size() != static_cast<size_t>(c.vocab_size) || v.scores.size() != v.tokens.size() ||
        v.types.size() != v.tokens.size()) {
      return absl::InvalidArgumentError(absl::StrCat("vocabulary has ", v.tokens.size(), " tokens, model has ",
                                                     c.vocab_size));
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> LinearWeightNames(const ModelConfig& c) {
  std::vector<std::string> out;
  for (int l = 0; l < c.n_layers; ++l) {
    for (auto fn : {names::AttnQ, names::AttnK, names::AttnV, names::AttnOutput}) out.push_back(fn(l));
    if (!c.is_moe()) {
      for (auto fn : {names::FfnGate, names::FfnUp, names::FfnDown}) out.push_back(fn(l));
      continue;
    }
    for (int e = 0; e < c.n_experts; ++e) {
      for (auto fn : {names::FfnGateExpert, names::FfnUpExpert, names::FfnDownExpert}) out.push_back(fn(l, e));
    }
  }
  return out;
}

}  // namespace qforge
