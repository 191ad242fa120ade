// KvCache and Transformer::ForwardBatch: sequences batched together, each at its own position, prompts
// prefilled in pieces beside other sequences' decode tokens, get exactly the logits they get alone.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "core/kernels/kernels.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

std::vector<int> Tokens(int n, int vocab, uint64_t seed) {
  std::vector<int> t(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 7;
  for (int i = 0; i < n; ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    t[i] = static_cast<int>((s >> 33) % static_cast<uint64_t>(vocab));
  }
  t[0] = 1;
  return t;
}

std::shared_ptr<const Model> Quantized(const Model& m, const std::string& method) {
  quant::QuantRecipe recipe;
  recipe.method = method;
  recipe.quantize_embeddings = true;
  auto q = quant::QuantizeModel(m, recipe, nullptr);
  EXPECT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->report.fallbacks.empty()) << method << " fell back on " << q->report.fallbacks.front();
  return std::make_shared<const Model>(std::move(q->model));
}

std::unique_ptr<Transformer> Runtime(std::shared_ptr<const Model> m, RuntimeOptions o) {
  auto t = Transformer::Create(std::move(m), o);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

struct Sequence {
  std::vector<int> tokens;  // prompt, then the tokens fed back one at a time
  int prompt_len;
  int join_step;  // the batched schedule's step at which it starts
};

// Logits at every position of `s` run alone through Forward the way Generate runs it: the whole prompt in
// one call, then one token per call.
std::vector<std::vector<float>> AloneLogits(Transformer& rt, const Sequence& s) {
  const int vocab = rt.vocab_size();
  std::vector<std::vector<float>> out(s.tokens.size(), std::vector<float>(vocab));
  std::vector<float> prompt_logits(static_cast<size_t>(s.prompt_len) * vocab);
  rt.Reset();
  EXPECT_TRUE(rt.Forward(std::span<const int>(s.tokens).first(s.prompt_len), 0, prompt_logits.data(), true).ok());
  for (int p = 0; p < s.prompt_len; ++p) {
    std::copy_n(&prompt_logits[static_cast<size_t>(p) * vocab], vocab, out[p].data());
  }
  for (int p = s.prompt_len; p < static_cast<int>(s.tokens.size()); ++p) {
    EXPECT_TRUE(rt.Forward(std::span<const int>(&s.tokens[p], 1), p, out[p].data(), false).ok());
  }
  return out;
}

struct Received {
  int seq, pos;
};

// Runs the sequences through ForwardBatch on a schedule that mixes everything the engine does: sequences
// join at different steps; prompts are prefilled in pieces of 3..7 tokens that cross max_batch chunk
// boundaries, beside decode tokens of other sequences; the span order changes from step to step; and on
// even steps only a prefill piece's last token wants logits. Checks every returned logits row bit for bit.
void ExpectBatchedEqualsAlone(std::shared_ptr<const Model> m, const std::vector<Sequence>& seqs) {
  const int vocab = m->config.vocab_size;
  auto alone = Runtime(m, {.threads = 1});
  auto batched = Runtime(m, {.threads = 2, .max_batch = 8});
  ASSERT_TRUE(alone && batched);
  std::vector<std::vector<std::vector<float>>> expected;
  for (const Sequence& s : seqs) expected.push_back(AloneLogits(*alone, s));

  std::vector<KvCache> caches;
  for (const Sequence& s : seqs) {
    auto c = batched->NewCache(static_cast<int>(s.tokens.size()));
    ASSERT_TRUE(c.ok()) << c.status();
    caches.push_back(std::move(*c));
  }
  std::vector<int> next(seqs.size(), 0);  // next position to feed per sequence
  int compared = 0, max_sequences_in_step = 0;
  for (int step = 0;; ++step) {
    std::vector<BatchToken> batch;
    std::vector<Received> rows;
    std::vector<int> order(seqs.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
    if (step % 2 == 1) std::reverse(order.begin(), order.end());
    int sequences_in_step = 0;
    for (int i : order) {
      const Sequence& s = seqs[i];
      if (step < s.join_step || next[i] >= static_cast<int>(s.tokens.size())) continue;
      ++sequences_in_step;
      const int piece = next[i] < s.prompt_len ? std::min(s.prompt_len - next[i], 3 + (step + i) % 5) : 1;
      for (int k = 0; k < piece; ++k) {
        const int pos = next[i] + k;
        const bool want = step % 2 == 1 || k == piece - 1;
        batch.push_back(BatchToken{&caches[i], s.tokens[pos], pos, want});
        if (want) rows.push_back({i, pos});
      }
      next[i] += piece;
    }
    if (batch.empty()) {
      if (std::all_of(seqs.begin(), seqs.end(), [&](const Sequence& s) { return step > s.join_step; })) break;
      continue;
    }
    max_sequences_in_step = std::max(max_sequences_in_step, sequences_in_step);
    std::vector<float> logits(rows.size() * vocab);
    const absl::Status st = batched->ForwardBatch(batch, logits.data());
    ASSERT_TRUE(st.ok()) << st;
    for (size_t r = 0; r < rows.size(); ++r) {
      const std::vector<float>& want = expected[rows[r].seq][rows[r].pos];
      ASSERT_EQ(std::memcmp(&logits[r * vocab], want.data(), vocab * sizeof(float)), 0)
          << "step " << step << ": sequence " << rows[r].seq << " position " << rows[r].pos
          << " differs from running it alone";
      ++compared;
    }
  }
  for (size_t i = 0; i < seqs.size(); ++i) EXPECT_EQ(caches[i].positions(), static_cast<int>(seqs[i].tokens.size()));
  EXPECT_EQ(max_sequences_in_step, static_cast<int>(seqs.size()));
  EXPECT_GT(compared, 60);
}

std::vector<Sequence> FourSequences(int vocab) {
  return {
      {Tokens(1 + 12, vocab, 1), 1, 0},    // BOS only, then decode
      {Tokens(7 + 9, vocab, 2), 7, 0},
      {Tokens(19 + 15, vocab, 3), 19, 2},  // joins while the others decode
      {Tokens(30 + 5, vocab, 4), 30, 5},
  };
}

struct ModelCase {
  const char* name;
  ModelConfig (*config)();  // TinyTestConfig, Q4kTestConfig (every row a multiple of 256), TinyMoeTestConfig
  const char* method;       // "" keeps f32
};

void PrintTo(const ModelCase& c, std::ostream* os) { *os << c.name; }

class BatchedForwardTest : public ::testing::TestWithParam<ModelCase> {
 protected:
  std::shared_ptr<const Model> MakeModel() const {
    const ModelCase& p = GetParam();
    Model m = MakeSyntheticModel(p.config(), 41);
    if (std::string(p.method).empty()) return std::make_shared<const Model>(std::move(m));
    return Quantized(m, p.method);
  }
};

// The guarantee the serving engine relies on: each matmul is one multi-token kernel call, and every kernel
// path (scalar, AVX2, AVX-512) computes each (token, row) dot product in one fixed order whatever the batch,
// so batching changes no bit, on every ISA this CPU has.
TEST_P(BatchedForwardTest, BatchedIsBitIdenticalToAloneOnEveryIsa) {
  auto m = MakeModel();
  const kernels::Isa original = kernels::ActiveIsa();
  for (kernels::Isa isa : {kernels::Isa::kScalar, kernels::Isa::kAvx2, kernels::Isa::kAvx512}) {
    if (kernels::SetIsa(isa) != isa) continue;
    SCOPED_TRACE(kernels::IsaName(isa));
    ExpectBatchedEqualsAlone(m, FourSequences(m->config.vocab_size));
  }
  kernels::SetIsa(original);
}

// Whole sequences side by side in one call (every position wanted; chunks of max_batch mix prompts of
// different sequences): each logits row is bit-identical to the sequence's lone run, on every ISA.
TEST_P(BatchedForwardTest, WholeSequencesAreBitIdenticalOnEveryIsa) {
  auto m = MakeModel();
  const int vocab = m->config.vocab_size;
  const kernels::Isa original = kernels::ActiveIsa();
  for (kernels::Isa isa : {kernels::Isa::kScalar, kernels::Isa::kAvx2, kernels::Isa::kAvx512}) {
    if (kernels::SetIsa(isa) != isa) continue;
    SCOPED_TRACE(kernels::IsaName(isa));
    auto alone = Runtime(m, {.threads = 1});
    auto batched = Runtime(m, {.threads = 2, .max_batch = 8});
    ASSERT_TRUE(alone && batched);
    const std::vector<Sequence> seqs = FourSequences(vocab);
    std::vector<KvCache> caches;
    std::vector<BatchToken> batch;
    std::vector<std::vector<std::vector<float>>> expected;
    for (const Sequence& s : seqs) {
      expected.push_back(AloneLogits(*alone, s));
      caches.push_back(*batched->NewCache());
    }
    for (size_t i = 0; i < seqs.size(); ++i) {
      for (size_t p = 0; p < seqs[i].tokens.size(); ++p) {
        batch.push_back({&caches[i], seqs[i].tokens[p], static_cast<int>(p), true});
      }
    }
    std::vector<float> logits(batch.size() * vocab);
    ASSERT_TRUE(batched->ForwardBatch(batch, logits.data()).ok());
    size_t row = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      for (size_t p = 0; p < seqs[i].tokens.size(); ++p, ++row) {
        ASSERT_EQ(std::memcmp(&logits[row * vocab], expected[i][p].data(), vocab * sizeof(float)), 0)
            << "sequence " << i << " position " << p;
      }
    }
  }
  kernels::SetIsa(original);
}

INSTANTIATE_TEST_SUITE_P(Formats, BatchedForwardTest,
                         ::testing::Values(ModelCase{"F32", TinyTestConfig, ""},
                                           ModelCase{"Q8_0", TinyTestConfig, "q8_0"},
                                           ModelCase{"Q4_K", Q4kTestConfig, "q4_k"},
                                           ModelCase{"MoeF32", TinyMoeTestConfig, ""},
                                           ModelCase{"MoeQ8_0", TinyMoeTestConfig, "q8_0"}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(KvCache, SizeCapacityAndReset) {
  const ModelConfig c = TinyTestConfig();
  auto cache = KvCache::Create(c, 40);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ(cache->capacity(), 40);
  EXPECT_EQ(cache->positions(), 0);
  EXPECT_EQ(cache->bytes(), 2u * c.n_layers * 40 * c.kv_dim() * sizeof(float));
  EXPECT_EQ(KvCache::Create(c, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvCache::Create(c, c.seq_len + 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(KvCache::Create(c, c.seq_len).ok());
  EXPECT_FALSE(KvCache::Create(ModelConfig{}, 4).ok());

  auto rt = Runtime(std::make_shared<const Model>(MakeSyntheticModel(c, 3)), {.threads = 1, .max_seq_len = 48});
  EXPECT_EQ(rt->NewCache().value().capacity(), 48);
  EXPECT_EQ(rt->NewCache(49).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> logits(c.vocab_size);
  std::vector<BatchToken> two = {{&*cache, 1, 0, false}, {&*cache, 5, 1, true}};
  ASSERT_TRUE(rt->ForwardBatch(two, logits.data()).ok());
  EXPECT_EQ(cache->positions(), 2);
  cache->Reset();
  EXPECT_EQ(cache->positions(), 0);
}

// Rewinding a cache inside ForwardBatch behaves as Forward's start_pos: later positions are dropped.
TEST(KvCache, RewindInForwardBatchOverwritesTheTail) {
  const ModelConfig c = TinyTestConfig();
  auto m = std::make_shared<const Model>(MakeSyntheticModel(c, 5));
  auto rt = Runtime(m, {.threads = 1});
  const std::vector<int> a = Tokens(12, c.vocab_size, 9);
  std::vector<int> b = a;
  b[10] = (a[10] + 1) % c.vocab_size;
  b[11] = (a[11] + 2) % c.vocab_size;
  KvCache cache = *rt->NewCache();
  std::vector<BatchToken> batch;
  for (int p = 0; p < 12; ++p) batch.push_back({&cache, a[p], p, false});
  ASSERT_TRUE(rt->ForwardBatch(batch, nullptr).ok());
  std::vector<float> rewound(c.vocab_size), fresh(c.vocab_size);
  std::vector<BatchToken> tail = {{&cache, b[10], 10, false}, {&cache, b[11], 11, true}};
  ASSERT_TRUE(rt->ForwardBatch(tail, rewound.data()).ok());
  EXPECT_EQ(cache.positions(), 12);
  ASSERT_TRUE(rt->Forward(b, 0, fresh.data(), false).ok());
  EXPECT_EQ(std::memcmp(rewound.data(), fresh.data(), fresh.size() * sizeof(float)), 0);
}

TEST(BatchedForward, RejectsBadBatchesAndChangesNothing) {
  const ModelConfig c = TinyTestConfig();
  auto m = std::make_shared<const Model>(MakeSyntheticModel(c, 6));
  auto rt = Runtime(m, {.threads = 1, .max_seq_len = 64});
  KvCache a = *rt->NewCache(16), b = *rt->NewCache(16);
  std::vector<float> logits(4 * c.vocab_size);
  std::vector<BatchToken> ok = {{&a, 1, 0, true}, {&b, 1, 0, true}, {&a, 7, 1, true}};
  ASSERT_TRUE(rt->ForwardBatch(ok, logits.data()).ok());
  ASSERT_EQ(a.positions(), 2);
  ASSERT_EQ(b.positions(), 1);

  auto code = [&](std::vector<BatchToken> batch, float* out) { return rt->ForwardBatch(batch, out).code(); };
  using absl::StatusCode;
  EXPECT_EQ(code({}, logits.data()), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{nullptr, 1, 0, false}}, logits.data()), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{&a, c.vocab_size, 2, false}}, logits.data()), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{&a, -1, 2, false}}, logits.data()), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{&a, 3, -1, false}}, logits.data()), StatusCode::kInvalidArgument);
  // First position of a sequence past what its cache holds.
  EXPECT_EQ(code({{&b, 3, 2, false}}, logits.data()), StatusCode::kFailedPrecondition);
  // A gap, and a repeat, within one sequence.
  EXPECT_EQ(code({{&a, 3, 2, false}, {&b, 3, 1, false}, {&a, 3, 4, false}}, logits.data()),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{&a, 3, 2, false}, {&a, 3, 2, false}}, logits.data()), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{&a, 3, 2, true}}, nullptr), StatusCode::kInvalidArgument);
  // Past the cache's capacity (16), also when a sequence crosses it.
  KvCache full = *rt->NewCache(3);
  EXPECT_EQ(code({{&full, 1, 0, false}, {&full, 1, 1, false}, {&full, 1, 2, false}, {&full, 1, 3, false}}, nullptr),
            StatusCode::kOutOfRange);
  // A cache for another model shape, and one longer than this Transformer's context.
  ModelConfig other = c;
  other.n_layers = 3;
  KvCache foreign = *KvCache::Create(other, 8);
  EXPECT_EQ(code({{&foreign, 1, 0, false}}, nullptr), StatusCode::kInvalidArgument);
  KvCache too_long = *KvCache::Create(c, 65);
  EXPECT_EQ(code({{&too_long, 1, 0, false}}, nullptr), StatusCode::kInvalidArgument);
  // None of the failures touched the caches.
  EXPECT_EQ(a.positions(), 2);
  EXPECT_EQ(b.positions(), 1);
  EXPECT_EQ(full.positions(), 0);
}

// Forward keeps its own cache, allocated on first use, and its own error codes.
TEST(BatchedForward, ForwardStillOwnsItsCache) {
  const ModelConfig c = TinyTestConfig();
  auto m = std::make_shared<const Model>(MakeSyntheticModel(c, 8));
  auto rt = Runtime(m, {.threads = 1});
  EXPECT_EQ(rt->cached_positions(), 0);
  const std::vector<int> t = Tokens(20, c.vocab_size, 4);
  std::vector<float> all(t.size() * c.vocab_size), one(c.vocab_size);
  ASSERT_TRUE(rt->Forward(t, 0, all.data(), true).ok());
  EXPECT_EQ(rt->cached_positions(), 20);
  // Token by token gives the same bits as the whole prompt at once.
  auto single = Runtime(m, {.threads = 2});
  for (size_t p = 0; p < t.size(); ++p) {
    ASSERT_TRUE(single->Forward(std::span<const int>(&t[p], 1), static_cast<int>(p), one.data(), false).ok());
    ASSERT_EQ(std::memcmp(one.data(), &all[p * c.vocab_size], one.size() * sizeof(float)), 0) << p;
  }
  EXPECT_EQ(rt->Forward(t, 21, one.data(), false).code(), absl::StatusCode::kFailedPrecondition);
  rt->Reset();
  EXPECT_EQ(rt->cached_positions(), 0);
}

}  // namespace
}  // namespace qforge
