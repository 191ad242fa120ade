#include "bench/table_common.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/model/synthetic.h"

namespace qforge::bench {

void Die(const char* program, const std::string& what, const absl::Status& s) {
  std::fprintf(stderr, "%s: %s: %s\n", program, what.c_str(), std::string(s.message()).c_str());
  std::exit(1);
}

std::unique_ptr<Transformer> MakeRuntime(const char* program, Model m, int threads) {
  auto t = Transformer::Create(std::make_shared<const Model>(std::move(m)), RuntimeOptions{.threads = threads});
  if (!t.ok()) Die(program, "runtime", t.status());
  return std::move(*t);
}

Model GeneratedEvalModel() {
  const ModelConfig c{.dim = 512, .hidden_dim = 1536, .n_layers = 4, .n_heads = 8, .n_kv_heads = 4,
                      .vocab_size = 2048, .seq_len = 512};
  Model generated = MakeSyntheticModel(c, 7);
  const Tensor& out = generated.tensors.at(names::kOutput);
  std::vector<float> scaled(out.numel());
  std::memcpy(scaled.data(), out.data, out.nbytes);
  for (float& v : scaled) v *= 4.0f;
  generated.tensors[names::kOutput] = Tensor::FromFloats(names::kOutput, out.shape, scaled);
  return generated;
}

}  // namespace qforge::bench
