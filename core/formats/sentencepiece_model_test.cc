// The .model writer against the reader (libsentencepiece's view of written files is checked in
// core/tokenizer/tokenizer_test.cc, the only place allowed to link it).
#include "core/formats/sentencepiece_model.h"

#include "core/formats/test_util.h"
#include "core/model/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::formats {
namespace {

using ::testing::HasSubstr;
using namespace ::qforge::formats::testing;

void ExpectRoundTrip(const Vocab& v) {
  auto bytes = SerializeSentencePieceModel(v);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto back = ParseSentencePieceModel(*bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameVocab(v, *back);
  // Writing what was read gives the same bytes again: nothing depends on state outside the vocabulary.
  auto again = SerializeSentencePieceModel(*back);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *bytes);
}

TEST(SentencePieceModelTest, RealModelsRoundTrip) {
  for (const std::string& path : {kTok512Model, kLlamaModel}) {
    if (!Exists(path)) GTEST_SKIP() << path << " not present";
    auto v = ReadSentencePieceModel(path);
    ASSERT_TRUE(v.ok()) << v.status();
    ExpectRoundTrip(*v);
  }
}

TEST(SentencePieceModelTest, EveryNormalizerSettingRoundTrips) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 5, /*with_vocab=*/true);
  for (int flags = 0; flags < 8; ++flags) {
    Vocab v = *m.vocab;
    v.normalizer.add_dummy_prefix = flags & 1;
    v.normalizer.remove_extra_whitespaces = flags & 2;
    if (flags & 4) v.normalizer.unk_surface = "<?>";
    ExpectRoundTrip(v);
  }
  // Scores are stored bit-exactly, negative zero and tiny values included.
  Vocab v = *m.vocab;
  v.scores[300] = -0.0f;
  v.scores[301] = 1e-30f;
  ExpectRoundTrip(v);
}

TEST(SentencePieceModelTest, WritesAndReadsFiles) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 6, /*with_vocab=*/true);
  const std::string path = TempDir("spm_write") + "/tokenizer.model";
  ASSERT_TRUE(WriteSentencePieceModel(*m.vocab, path).ok());
  auto back = ReadSentencePieceModel(path);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameVocab(*m.vocab, *back);
}

TEST(SentencePieceModelTest, RefusesWhatIsNotSentencePieceBpe) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 5, /*with_vocab=*/true);
  Vocab gpt2 = *m.vocab;
  gpt2.model = "gpt2";
  EXPECT_THAT(SerializeSentencePieceModel(gpt2).status().message(), HasSubstr("'gpt2'"));
  Vocab ragged = *m.vocab;
  ragged.scores.pop_back();
  EXPECT_FALSE(SerializeSentencePieceModel(ragged).ok());
}

}  // namespace
}  // namespace qforge::formats
