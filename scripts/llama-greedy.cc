// Greedy text from llama.cpp's library (libllama) with the arithmetic chosen, for scripts/check-llama-cpp.sh; not
// part of the qforge build (the script compiles it against the llama.cpp that ../shared/tools/peer-llama-cpp.sh
// builds). llama-simple always runs llama.cpp's defaults, and on the CPU those are Flash Attention with an f16
// K/V cache, whose kernel accumulates softmax(QK) V in an f16 vector rounded after every cached position
// (ggml-cpu ops.cpp, flash_attn_ext_f16): logits move by ~1e-4, enough to flip a near-tie. --full-precision runs
// no Flash Attention and an f32 cache, the fp32 attention qforge runs, so that what differs is the kernels.
// Usage: llama-greedy MODEL.gguf N_TOKENS PROMPT [--full-precision]
// Prints the prompt and the continuation as `qforge generate` prints them (no BOS, no leading space).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.gguf N_TOKENS PROMPT [--full-precision]\n", argv[0]);
    return 2;
  }
  const int n_tokens = std::atoi(argv[2]);
  const std::string prompt = argv[3];
  const bool full_precision = argc > 4 && std::strcmp(argv[4], "--full-precision") == 0;

  llama_backend_init();
  llama_log_set([](ggml_log_level, const char*, void*) {}, nullptr);  // keep stdout/stderr to the text
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (model == nullptr) {
    std::fprintf(stderr, "llama-greedy: cannot load %s\n", argv[1]);
    return 1;
  }
  const llama_vocab* vocab = llama_model_get_vocab(model);

  std::vector<llama_token> tokens(prompt.size() + 8);
  const int n_prompt = llama_tokenize(vocab, prompt.c_str(), static_cast<int>(prompt.size()), tokens.data(),
                                      static_cast<int>(tokens.size()), /*add_special=*/true, /*parse_special=*/false);
  if (n_prompt <= 0) {
    std::fprintf(stderr, "llama-greedy: cannot tokenize the prompt\n");
    return 1;
  }
  tokens.resize(static_cast<size_t>(n_prompt));

  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(n_prompt + n_tokens);
  cp.n_batch = cp.n_ctx;
  cp.n_threads = cp.n_threads_batch = 1;
  if (full_precision) {
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
  }
  llama_context* ctx = llama_init_from_model(model, cp);
  if (ctx == nullptr) {
    std::fprintf(stderr, "llama-greedy: cannot create a context\n");
    return 1;
  }

  std::string text;
  auto append = [&](llama_token t, bool first) {
    char piece[256];
    const int n = llama_token_to_piece(vocab, t, piece, sizeof piece, /*lstrip=*/first ? 1 : 0, /*special=*/false);
    if (n > 0) text.append(piece, static_cast<size_t>(n));
  };
  for (int i = 0; i < n_prompt; ++i) {
    if (tokens[i] != llama_vocab_bos(vocab)) append(tokens[i], text.empty());
  }

  const int n_vocab = llama_vocab_n_tokens(vocab);
  llama_batch batch = llama_batch_get_one(tokens.data(), n_prompt);
  llama_token next = 0;
  for (int generated = 0; generated < n_tokens; ++generated) {
    if (llama_decode(ctx, batch) != 0) {
      std::fprintf(stderr, "llama-greedy: llama_decode failed\n");
      return 1;
    }
    const float* logits = llama_get_logits_ith(ctx, -1);
    next = 0;
    for (llama_token t = 1; t < n_vocab; ++t) {
      if (logits[t] > logits[next]) next = t;  // the first of equal maxima, as qforge's greedy sampler
    }
    if (llama_vocab_is_eog(vocab, next)) break;
    append(next, text.empty());
    batch = llama_batch_get_one(&next, 1);
  }
  std::printf("%s\n", text.c_str());
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
