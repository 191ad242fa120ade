#include "core/runtime/generate.h"

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"

namespace qforge {

absl::StatusOr<GenerateResult> Generate(Transformer& model, std::span<const int> prompt,
                                        const GenerateOptions& options, const TokenCallback& on_token) {
  if (prompt.empty()) return absl::InvalidArgumentError("Generate: empty prompt (start with BOS)");
  if (static_cast<int>(prompt.size()) > model.max_seq_len()) {
    return absl::OutOfRangeError(
        absl::StrCat("Generate: prompt of ", prompt.size(), " tokens exceeds the context ", model.max_seq_len()));
  }
  GenerateResult result;
  result.prompt_tokens = static_cast<int>(prompt.size());
  Sampler sampler(options.sampler);
  std::vector<float> logits(static_cast<size_t>(model.vocab_size()));

  model.Reset();
  QF_RETURN_IF_ERROR(model.Forward(prompt, 0, logits.data(), /*all_logits=*/false));
  int pos = static_cast<int>(prompt.size());
  while (static_cast<int>(result.tokens.size()) < options.max_new_tokens) {
    const int next = sampler.Sample(logits);
    if (next == options.eos_id) {
      result.stop = StopReason::kEos;
      return result;
    }
    result.tokens.push_back(next);
    if (on_token && !on_token(next)) {
      result.stop = StopReason::kCallback;
      return result;
    }
    if (static_cast<int>(result.tokens.size()) >= options.max_new_tokens) break;
    if (pos >= model.max_seq_len()) {
      result.stop = StopReason::kContextFull;
      return result;
    }
    const int token = next;
    QF_RETURN_IF_ERROR(model.Forward(std::span<const int>(&token, 1), pos, logits.data(), false));
    ++pos;
  }
  result.stop = StopReason::kMaxTokens;
  return result;
}

}  // namespace qforge
