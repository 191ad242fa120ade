// Helpers shared by the formats tests (not part of the library).
#pragma once

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <unistd.h>
#include <string>
#include <vector>

#include "core/model/model.h"
#include "core/model/synthetic.h"
#include "gtest/gtest.h"

namespace qforge::formats::testing {

inline const std::string kStories = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";
inline const std::string kLlamaTok = std::string(QFORGE_SHARED_DIR) + "/models/llama2-tokenizer/tokenizer.bin";
inline const std::string kLlamaModel = std::string(QFORGE_SHARED_DIR) + "/models/llama2-tokenizer/tokenizer.model";
inline const std::string kTok512Bin = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/tok512.bin";
inline const std::string kTok512Model =
    std::string(QFORGE_SHARED_DIR) + "/models/stories260K/candidate-tok512/tok512.model";

inline bool Exists(const std::string& p) { return std::filesystem::exists(p); }

inline std::vector<uint8_t> FileBytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void WriteBytes(const std::string& p, const std::vector<uint8_t>& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A fresh empty directory under the test temp dir.
inline std::string TempDir(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::filesystem::path p = std::filesystem::path(base ? base : std::filesystem::temp_directory_path().string()) /
                            ("qforge_formats_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// Every tensor present in both with identical name, shape, format and bytes.
inline void ExpectSameTensors(const Model& a, const Model& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    const Tensor* u = b.Find(name);
    ASSERT_NE(u, nullptr) << name;
    EXPECT_EQ(t.shape, u->shape) << name;
    EXPECT_EQ(t.format, u->format) << name;
    ASSERT_EQ(t.nbytes, u->nbytes) << name;
    EXPECT_EQ(0, std::memcmp(t.data, u->data, t.nbytes)) << name;
  }
}

inline void ExpectSameVocab(const Vocab& a, const Vocab& b) {
  EXPECT_EQ(a.model, b.model);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.scores, b.scores);
  EXPECT_EQ(a.types, b.types);
  EXPECT_EQ(a.bos_id, b.bos_id);
  EXPECT_EQ(a.eos_id, b.eos_id);
  EXPECT_EQ(a.unk_id, b.unk_id);
  EXPECT_EQ(a.normalizer, b.normalizer);
}

// `m` with every linear weight replaced by arbitrary bytes of the right size in `f` (no quantizer needed:
// the formats only move bytes). Norms stay f32.
inline Model WithEncoding(Model m, const WeightFormat& f, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> linear = LinearWeightNames(m.config);
  linear.push_back(names::kTokenEmbd);
  if (!m.config.tied_embeddings) linear.push_back(names::kOutput);
  for (const std::string& n : linear) {
    Tensor& t = m.tensors.at(n);
    auto size = EncodedBytes(f, t.rows(), t.cols());
    EXPECT_TRUE(size.ok()) << n << " " << size.status();
    std::vector<uint8_t> bytes(*size);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    t = Tensor::FromBytes(n, t.shape, f, std::move(bytes));
  }
  return m;
}

}  // namespace qforge::formats::testing
