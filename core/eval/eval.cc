#include "core/eval/eval.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/eval/metrics.h"
#include "core/runtime/sampler.h"

namespace qforge::eval {
namespace {

// Tokens per Forward call inside a window: bounds the logits buffer to kChunk * vocab floats.
constexpr int kChunk = 64;

using Streams = std::vector<std::span<const int>>;

// Feeds window w (all but its last token, which is only a target) through `model` from an empty cache,
// kChunk tokens at a time, and calls fn(first position, count, logits [count, vocab]) after each chunk.
absl::Status ForEachChunk(Transformer& model, std::span<const int> w, std::vector<float>& buf,
                          const std::function<absl::Status(int begin, int len, const float* logits)>& fn) {
  const int vocab = model.vocab_size();
  const int n_pred = static_cast<int>(w.size()) - 1;
  buf.resize(static_cast<size_t>(kChunk) * vocab);
  model.Reset();
  for (int begin = 0; begin < n_pred; begin += kChunk) {
    const int len = std::min(kChunk, n_pred - begin);
    QF_RETURN_IF_ERROR(model.Forward(w.subspan(begin, len), begin, buf.data(), /*all_logits=*/true));
    QF_RETURN_IF_ERROR(fn(begin, len, buf.data()));
  }
  return absl::OkStatus();
}

PerplexityResult Finish(double nll_sum, int64_t tokens, int64_t windows) {
  PerplexityResult r;
  r.tokens = tokens;
  r.windows = windows;
  r.mean_nll = tokens > 0 ? nll_sum / static_cast<double>(tokens) : 0.0;
  r.perplexity = std::exp(r.mean_nll);
  return r;
}

absl::StatusOr<PerplexityResult> PerplexityImpl(Transformer& model, const Streams& streams, int window) {
  QF_ASSIGN_OR_RETURN(auto windows, MakeWindows(streams, window, model.max_seq_len(), model.vocab_size()));
  const int vocab = model.vocab_size();
  std::vector<float> buf;
  std::vector<double> log_probs;
  double nll = 0.0;
  int64_t count = 0;
  for (std::span<const int> w : windows) {
    QF_RETURN_IF_ERROR(ForEachChunk(model, w, buf, [&](int begin, int len, const float* logits) {
      for (int i = 0; i < len; ++i) {
        LogSoftmax(std::span<const float>(logits + static_cast<size_t>(i) * vocab, vocab), log_probs);
        nll += NegLogLikelihood(log_probs, w[begin + i + 1]);
        ++count;
      }
      return absl::OkStatus();
    }));
  }
  return Finish(nll, count, static_cast<int64_t>(windows.size()));
}

absl::StatusOr<CompareResult> CompareImpl(Transformer& base, Transformer& quant, const Streams& streams, int window) {
  if (base.vocab_size() != quant.vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("base has vocabulary ", base.vocab_size(), ", quantized model ",
                                                   quant.vocab_size()));
  }
  QF_ASSIGN_OR_RETURN(auto windows,
                      MakeWindows(streams, window, std::min(base.max_seq_len(), quant.max_seq_len()), base.vocab_size()));
  QF_ASSIGN_OR_RETURN(const std::vector<WindowSums> sums, CompareWindows(base, quant, windows));
  return MergeWindows(sums);
}

Streams AsSpans(const std::vector<std::vector<int>>& streams) {
  Streams out;
  out.reserve(streams.size());
  for (const auto& s : streams) out.emplace_back(s);
  return out;
}

uint64_t StreamSeed(uint64_t seed, int index) {
  // splitmix64 finaliser: nearby (seed, index) pairs give unrelated generator states.
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (static_cast<uint64_t>(index) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

absl::StatusOr<std::vector<std::span<const int>>> MakeWindows(const Streams& streams, int window, int max_seq_len,
                                                              int vocab) {
  if (window <= 0) window = max_seq_len;
  if (window < 2) return absl::InvalidArgumentError(absl::StrCat("window of ", window, " tokens predicts nothing"));
  if (window > max_seq_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("window of ", window, " tokens exceeds the model context ", max_seq_len));
  }
  std::vector<std::span<const int>> windows;
  int64_t predictions = 0;
  for (std::span<const int> s : streams) {
    // Checked here because a window's last token is only ever a target, never a Forward input.
    for (int id : s) {
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", id, " outside [0, ", vocab, ")"));
      }
    }
    for (size_t begin = 0; begin < s.size(); begin += window) {
      const auto w = s.subspan(begin, std::min<size_t>(window, s.size() - begin));
      if (w.size() < 2) continue;  // a lone trailing token has nothing to predict
      windows.push_back(w);
      predictions += static_cast<int64_t>(w.size()) - 1;
    }
  }
  if (predictions == 0) return absl::InvalidArgumentError("evaluation needs at least two tokens in a window");
  return windows;
}

absl::StatusOr<std::vector<std::span<const int>>> CompareWindowsOf(const Transformer& base, const Transformer& quant,
                                                                   std::span<const int> tokens, int window) {
  return MakeWindows(Streams{tokens}, window, std::min(base.max_seq_len(), quant.max_seq_len()), base.vocab_size());
}

void KeepFirstWindows(std::vector<int>& tokens, int chunks, int window, int max_seq_len) {
  const size_t w = static_cast<size_t>(window > 0 ? window : max_seq_len);
  if (chunks > 0 && tokens.size() > static_cast<size_t>(chunks) * w) tokens.resize(static_cast<size_t>(chunks) * w);
}

absl::StatusOr<std::vector<WindowSums>> CompareWindows(Transformer& base, Transformer& quant,
                                                       std::span<const std::span<const int>> windows) {
  if (base.vocab_size() != quant.vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("base has vocabulary ", base.vocab_size(), ", quantized model ",
                                                   quant.vocab_size()));
  }
  const int vocab = base.vocab_size();
  std::vector<float> base_buf(static_cast<size_t>(kChunk) * vocab), quant_buf(static_cast<size_t>(kChunk) * vocab);
  std::vector<double> lp, lq;
  std::vector<WindowSums> out;
  out.reserve(windows.size());
  for (std::span<const int> w : windows) {
    // Both models advance through the window chunk by chunk in lockstep, each on its own cache, so only
    // one chunk of logits per model is held at a time.
    base.Reset();
    quant.Reset();
    WindowSums sums;
    const int n_pred = static_cast<int>(w.size()) - 1;
    for (int begin = 0; begin < n_pred; begin += kChunk) {
      const int len = std::min(kChunk, n_pred - begin);
      QF_RETURN_IF_ERROR(base.Forward(w.subspan(begin, len), begin, base_buf.data(), /*all_logits=*/true));
      QF_RETURN_IF_ERROR(quant.Forward(w.subspan(begin, len), begin, quant_buf.data(), /*all_logits=*/true));
      for (int i = 0; i < len; ++i) {
        const std::span<const float> pb(base_buf.data() + static_cast<size_t>(i) * vocab, vocab);
        const std::span<const float> pq(quant_buf.data() + static_cast<size_t>(i) * vocab, vocab);
        LogSoftmax(pb, lp);
        LogSoftmax(pq, lq);
        const int target = w[begin + i + 1];
        sums.nll_base += NegLogLikelihood(lp, target);
        sums.nll_quant += NegLogLikelihood(lq, target);
        const double kl = KlDivergence(lp, lq);
        sums.kl_sum += kl;
        sums.kl_max = std::max(sums.kl_max, kl);
        sums.top1_agree += ArgMax(pb) == ArgMax(pq);
        ++sums.positions;
      }
    }
    out.push_back(sums);
  }
  return out;
}

CompareResult MergeWindows(std::span<const WindowSums> windows) {
  double nll_base = 0.0, nll_quant = 0.0, kl_sum = 0.0, kl_max = 0.0;
  int64_t count = 0, agree = 0;
  for (const WindowSums& w : windows) {
    nll_base += w.nll_base;
    nll_quant += w.nll_quant;
    kl_sum += w.kl_sum;
    kl_max = std::max(kl_max, w.kl_max);
    count += w.positions;
    agree += w.top1_agree;
  }
  CompareResult r;
  r.positions = count;
  r.mean_kl = count > 0 ? kl_sum / static_cast<double>(count) : 0.0;
  r.max_kl = kl_max;
  r.top1_agreement = count > 0 ? static_cast<double>(agree) / static_cast<double>(count) : 0.0;
  r.base = Finish(nll_base, count, static_cast<int64_t>(windows.size()));
  r.quant = Finish(nll_quant, count, static_cast<int64_t>(windows.size()));
  return r;
}

absl::StatusOr<PerplexityResult> Perplexity(Transformer& model, std::span<const int> tokens, int window) {
  return PerplexityImpl(model, Streams{tokens}, window);
}

absl::StatusOr<PerplexityResult> Perplexity(Transformer& model, const std::vector<std::vector<int>>& streams,
                                            int window) {
  return PerplexityImpl(model, AsSpans(streams), window);
}

absl::StatusOr<CompareResult> CompareModels(Transformer& base, Transformer& quant, std::span<const int> tokens,
                                            int window) {
  return CompareImpl(base, quant, Streams{tokens}, window);
}

absl::StatusOr<CompareResult> CompareModels(Transformer& base, Transformer& quant,
                                            const std::vector<std::vector<int>>& streams, int window) {
  return CompareImpl(base, quant, AsSpans(streams), window);
}

absl::StatusOr<std::vector<std::vector<int>>> SampleStreams(Transformer& model, int n_streams, int length,
                                                            uint64_t seed, float temperature, int bos_id,
                                                            int first_stream) {
  if (n_streams < 0 || first_stream < 0) return absl::InvalidArgumentError("negative stream count or index");
  if (length < 1 || length > model.max_seq_len()) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream length ", length, " outside [1, ", model.max_seq_len(), "]"));
  }
  if (bos_id < 0 || bos_id >= model.vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("bos id ", bos_id, " outside the vocabulary"));
  }
  std::vector<std::vector<int>> streams;
  std::vector<float> logits(static_cast<size_t>(model.vocab_size()));
  for (int i = first_stream; i < first_stream + n_streams; ++i) {
    Sampler sampler({.temperature = temperature, .top_p = 1.0f, .seed = StreamSeed(seed, i)});
    std::vector<int> s = {bos_id};
    model.Reset();
    while (static_cast<int>(s.size()) < length) {
      const int pos = static_cast<int>(s.size()) - 1;
      QF_RETURN_IF_ERROR(model.Forward(std::span<const int>(&s[pos], 1), pos, logits.data(), false));
      s.push_back(sampler.Sample(logits));
    }
    streams.push_back(std::move(s));
  }
  return streams;
}

absl::StatusOr<PerplexityResult> EvalText(Transformer& model, const Tokenizer& tokenizer, const std::string& path,
                                          int window) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  if (tokenizer.vocab_size() > model.vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer has ", tokenizer.vocab_size(), " tokens, model ",
                                                   model.vocab_size()));
  }
  QF_ASSIGN_OR_RETURN(std::vector<int> tokens, tokenizer.Encode(text.str(), /*add_bos=*/true));
  return Perplexity(model, tokens, window);
}

}  // namespace qforge::eval
