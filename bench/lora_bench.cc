// What unmerged LoRA adapters cost in a batched decode step (docs/serving.md, "LoRA adapters"): one Transformer,
// `batch` sequences each prefilled with `prompt` tokens, then timed ForwardBatch steps of one token per sequence
// with (a) no adapter, (b) every sequence on a rank-R adapter of all seven linears, (c) the sequences round-robin
// over {none, that adapter, a rank-2R adapter of q and v}. The three are interleaved in every repetition, so the
// shared machine's load hits them alike; the median step time of each is reported. Then the same for a prefill: all
// sequences' prompts in one ForwardBatch (what a server's first step does when many requests arrive together).
//
//   qforge_lora_bench --model PATH [--batch 64] [--rank 8] [--prompt 8] [--steps 8] [--reps 7] [--threads 2]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/formats/formats.h"
#include "core/lora/lora.h"
#include "core/runtime/transformer.h"
#include "services/cli/flags.h"

namespace {

using namespace qforge;

int Fail(const std::string& m) {
  std::fprintf(stderr, "qforge_lora_bench: %s\n", m.c_str());
  return 1;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  auto flags = cli::Flags::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                 {"model", "batch", "rank", "prompt", "steps", "reps", "threads"}, {});
  if (!flags.ok()) return Fail(std::string(flags.status().message()));
  auto batch = flags->GetInt("batch", 64, 1, 1024);
  auto rank = flags->GetInt("rank", 8, 1, 1024);
  auto prompt = flags->GetInt("prompt", 8, 1, 1024);
  auto steps = flags->GetInt("steps", 8, 1, 1024);
  auto reps = flags->GetInt("reps", 7, 1, 1000);
  auto threads = flags->GetInt("threads", 2, 1, 1024);
  if (!batch.ok() || !rank.ok() || !prompt.ok() || !steps.ok() || !reps.ok() || !threads.ok()) return Fail("bad flag");
  auto loaded = formats::LoadModel(flags->Get("model"));
  if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
  const auto model = std::make_shared<const Model>(*std::move(loaded));
  const ModelConfig& c = model->config;
  if (*prompt + *reps * *steps * 3 > c.seq_len) return Fail("the context is too short for prompt + reps * steps * 3");
  using lora::LoraTarget;
  auto all = lora::MakeRandomAdapter(c, {LoraTarget::kAttnQ, LoraTarget::kAttnK, LoraTarget::kAttnV,
                                         LoraTarget::kAttnOutput, LoraTarget::kFfnGate, LoraTarget::kFfnUp,
                                         LoraTarget::kFfnDown}, *rank, 2.0f * *rank, 1);
  auto qv = lora::MakeRandomAdapter(c, {LoraTarget::kAttnQ, LoraTarget::kAttnV}, 2 * *rank, 4.0f * *rank, 2);
  if (!all.ok() || !qv.ok()) return Fail("adapter");
  auto rt = Transformer::Create(model, RuntimeOptions{.threads = *threads, .max_batch = *batch * *prompt});
  if (!rt.ok()) return Fail(std::string(rt.status().message()));
  std::vector<KvCache> caches;
  std::vector<int> pos(*batch, 0);
  for (int s = 0; s < *batch; ++s) {
    auto cache = (*rt)->NewCache();
    if (!cache.ok()) return Fail(std::string(cache.status().message()));
    caches.push_back(*std::move(cache));
    std::vector<BatchToken> p;
    for (int i = 0; i < *prompt; ++i) p.push_back(BatchToken{&caches[s], (s * 7 + i) % c.vocab_size, i, false});
    if (!(*rt)->ForwardBatch(p, nullptr).ok()) return Fail("prefill");
    pos[s] = *prompt;
  }
  const char* names[3] = {"no adapter", "all on rank-R all-linear", "mixed {none, R all, 2R q/v}"};
  const lora::LoraAdapter* mixed[3] = {nullptr, &*all, &*qv};
  std::vector<double> times[3];
  std::vector<float> logits(static_cast<size_t>(*batch) * c.vocab_size);
  std::vector<BatchToken> step(*batch);
  for (int r = 0; r < *reps; ++r) {
    for (int mode = 0; mode < 3; ++mode) {
      const auto start = std::chrono::steady_clock::now();
      for (int k = 0; k < *steps; ++k) {
        for (int s = 0; s < *batch; ++s) {
          const lora::LoraAdapter* a = mode == 0 ? nullptr : mode == 1 ? &*all : mixed[s % 3];
          step[s] = BatchToken{&caches[s], (s + k) % c.vocab_size, pos[s]++, true, a};
        }
        if (!(*rt)->ForwardBatch(step, logits.data()).ok()) return Fail("step");
      }
      times[mode].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / *steps);
    }
  }
  // Prefill: every cache emptied, then batch x prompt tokens in one call (the last of each sequence wants logits).
  std::vector<double> prefill[3];
  std::vector<BatchToken> all_prompts;
  for (int r = 0; r < *reps; ++r) {
    for (int mode = 0; mode < 3; ++mode) {
      all_prompts.clear();
      for (int s = 0; s < *batch; ++s) {
        caches[s].Reset();
        const lora::LoraAdapter* a = mode == 0 ? nullptr : mode == 1 ? &*all : mixed[s % 3];
        for (int i = 0; i < *prompt; ++i) {
          all_prompts.push_back(BatchToken{&caches[s], (s * 7 + i) % c.vocab_size, i, i == *prompt - 1, a});
        }
      }
      const auto start = std::chrono::steady_clock::now();
      if (!(*rt)->ForwardBatch(all_prompts, logits.data()).ok()) return Fail("prefill");
      prefill[mode].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  std::printf("model dim %d hidden %d layers %d, batch %d, rank %d, %d threads, median of %d reps\n", c.dim,
              c.hidden_dim, c.n_layers, *batch, *rank, *threads, *reps);
  for (const auto& [what, t] : {std::pair{"decode step (1 token each)", times}, std::pair{"prefill (all prompts)", prefill}}) {
    std::printf(" %s\n", what);
    const double base = Median(t[0]);
    for (int mode = 0; mode < 3; ++mode) {
      const double m = Median(t[mode]);
      std::printf("  %-32s %8.2f ms  %+6.1f %%\n", names[mode], 1e3 * m, 100.0 * (m / base - 1));
    }
  }
  return 0;
}
