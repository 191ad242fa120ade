#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/model/synthetic.h"
#include "core/tokenizer/sentencepiece_tokenizer.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/vocab_tokenizer.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

const std::string kLlamaModel = std::string(QFORGE_SHARED_DIR) + "/models/llama2-tokenizer/tokenizer.model";
const std::string kLlamaBin = std::string(QFORGE_SHARED_DIR) + "/models/llama2-tokenizer/tokenizer.bin";

// ASCII, punctuation, digits, unicode (accents, CJK, Cyrillic), emoji (byte fallback), control characters,
// runs of spaces, leading/trailing spaces, and text that spells special pieces.
const std::vector<std::string> kSentences = {
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    "The quick brown fox jumps over the lazy dog 1234567890 times!",
    " leading space",
    "trailing space ",
    "  two leading and   three inner   spaces  ",
    "tabs\tand\nnewlines\r\n",
    "caf\xc3\xa9 na\xc3\xafve r\xc3\xa9sum\xc3\xa9 \xc3\x9c" "ber",
    "\xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c\xe4\xb8\x96\xe7\x95\x8c",            // 你好，世界
    "\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82 \xd0\xbc\xd0\xb8\xd1\x80",  // Привет мир
    "emoji \xf0\x9f\x98\x80\xf0\x9f\x8e\x89 and \xf0\x9f\xa6\x99!",                // 😀🎉 🦙
    "<s> is not BOS and </s> is not EOS, <0x41> is not a byte",
    "a",
    " ",
    "llama.cpp's SPM tokenizer vs. sentencepiece: ((()))[]{}--==++ ... ???",
    "unbelievably antidisestablishmentarianism internationalization",
};

// Encoded identically by both tokenizers but not round-trippable: a literal "▁" decodes as a space.
const std::vector<std::string> kEncodeOnly = {"x\xe2\x96\x81y", "\xe2\x96\x81", "a\xe2\x96\x81\xe2\x96\x81 b"};

bool HaveLlama() { return std::filesystem::exists(kLlamaModel); }

TEST(SentencePieceTokenizer, LoadsLlamaAndRoundTrips) {
  if (!HaveLlama()) GTEST_SKIP() << "no " << kLlamaModel;
  auto sp = SentencePieceTokenizer::Load(kLlamaModel);
  ASSERT_TRUE(sp.ok()) << sp.status();
  EXPECT_EQ((*sp)->vocab_size(), 32000);
  EXPECT_EQ((*sp)->bos_id(), 1);
  EXPECT_EQ((*sp)->eos_id(), 2);
  auto ids = (*sp)->Encode("Hello world", true);
  ASSERT_TRUE(ids.ok());
  // Ids of the Llama 2 tokenizer: <s> ▁Hello ▁world.
  EXPECT_EQ(*ids, (std::vector<int>{1, 15043, 3186}));
  for (const std::string& s : kSentences) {
    auto e = (*sp)->Encode(s, true);
    ASSERT_TRUE(e.ok());
    auto d = (*sp)->Decode(*e);
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(*d, s);
  }
  EXPECT_FALSE((*sp)->Decode(std::vector<int>{5, 32000}).ok());
  EXPECT_FALSE(SentencePieceTokenizer::Load("/nonexistent.model").ok());
}

TEST(SentencePieceTokenizer, ExportVocabTypes) {
  if (!HaveLlama()) GTEST_SKIP();
  auto sp = SentencePieceTokenizer::Load(kLlamaModel);
  ASSERT_TRUE(sp.ok());
  Vocab v = (*sp)->ExportVocab();
  ASSERT_EQ(v.tokens.size(), 32000u);
  EXPECT_EQ(v.tokens[0], "<unk>");
  EXPECT_EQ(v.types[0], TokenType::kUnknown);
  EXPECT_EQ(v.types[1], TokenType::kControl);
  EXPECT_EQ(v.types[2], TokenType::kControl);
  EXPECT_EQ(v.tokens[3], "<0x00>");
  EXPECT_EQ(v.types[3], TokenType::kByte);
  EXPECT_EQ(v.types[258], TokenType::kByte);
  EXPECT_EQ(v.types[259], TokenType::kNormal);
  EXPECT_EQ(v.tokens[15043], "\xe2\x96\x81Hello");
  EXPECT_FLOAT_EQ(v.scores[15043], (*sp)->ExportVocab().scores[15043]);
}

// The core equivalence: encoding from the bare vocabulary gives libsentencepiece's ids exactly.
TEST(VocabTokenizer, MatchesSentencePieceOnLlamaVocab) {
  if (!HaveLlama()) GTEST_SKIP();
  auto sp = SentencePieceTokenizer::Load(kLlamaModel);
  ASSERT_TRUE(sp.ok());
  EXPECT_FALSE((*sp)->NormalizerOptions().remove_extra_whitespaces);
  EXPECT_TRUE((*sp)->NormalizerOptions().add_dummy_prefix);
  auto vt = VocabTokenizer::Create((*sp)->ExportVocab());
  ASSERT_TRUE(vt.ok()) << vt.status();
  for (const std::string& s : kSentences) {
    for (bool bos : {true, false}) {
      auto want = (*sp)->Encode(s, bos);
      auto got = (*vt)->Encode(s, bos);
      ASSERT_TRUE(want.ok() && got.ok());
      EXPECT_EQ(*got, *want) << "text: [" << s << "] bos=" << bos;
    }
    auto ids = (*sp)->Encode(s, true);
    auto mine = (*vt)->Decode(*ids);
    auto theirs = (*sp)->Decode(*ids);
    ASSERT_TRUE(mine.ok() && theirs.ok());
    EXPECT_EQ(*mine, *theirs) << s;
    EXPECT_EQ(*mine, s);
  }
  for (const std::string& s : kEncodeOnly) {
    auto want = (*sp)->Encode(s, true);
    auto got = (*vt)->Encode(s, true);
    ASSERT_TRUE(want.ok() && got.ok());
    EXPECT_EQ(*got, *want) << "text: [" << s << "]";
    EXPECT_EQ(*(*vt)->Decode(*got), *(*sp)->Decode(*want));
  }
  // Byte fallback really happened for the emoji.
  auto emoji = (*vt)->Encode("\xf0\x9f\xa6\x99", false);
  ASSERT_TRUE(emoji.ok());
  EXPECT_EQ(*emoji, (std::vector<int>{29871, 3 + 0xF0, 3 + 0x9F, 3 + 0xA6, 3 + 0x99}));
}

// tok512 (llama2.c's TinyStories vocabulary, also an identity normaliser): same equivalence on a small vocab
// where far more text falls back to bytes.
TEST(VocabTokenizer, MatchesSentencePieceOnTok512) {
  const std::string path = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/candidate-tok512/tok512.model";
  if (!std::filesystem::exists(path)) GTEST_SKIP();
  auto sp = SentencePieceTokenizer::Load(path);
  ASSERT_TRUE(sp.ok()) << sp.status();
  EXPECT_EQ((*sp)->vocab_size(), 512);
  // llama2.c trained tok512 with SentencePiece's default remove_extra_whitespaces; Llama 2 turned it off.
  EXPECT_TRUE((*sp)->NormalizerOptions().remove_extra_whitespaces);
  EXPECT_TRUE((*sp)->NormalizerOptions().add_dummy_prefix);
  auto vt = VocabTokenizer::Create((*sp)->ExportVocab(), (*sp)->NormalizerOptions());
  ASSERT_TRUE(vt.ok());
  std::vector<std::string> texts = kSentences;
  texts.push_back("Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do.");
  for (const std::string& s : texts) {
    auto want = (*sp)->Encode(s, true);
    auto got = (*vt)->Encode(s, true);
    ASSERT_TRUE(want.ok() && got.ok());
    EXPECT_EQ(*got, *want) << "text: [" << s << "]";
    EXPECT_EQ(*(*vt)->Decode(*got), *(*sp)->Decode(*want));
  }
}

// Random strings over a mix of scripts, spaces and control characters, on both vocabularies.
TEST(VocabTokenizer, MatchesSentencePieceOnRandomText) {
  const std::vector<std::string> alphabet = {
      "a", "e", "t", "h", "s", "n", "o", "r", "L", "T", " ", " ", " ", ",", ".", "'", "\"", "\n", "\t", "0", "9",
      "\xc3\xa9", "\xc3\xb1", "\xe2\x80\x9c", "\xe2\x80\x94", "\xe4\xbd\xa0", "\xe5\xa5\xbd", "\xd0\xb6",
      "\xf0\x9f\x98\x80", "\xe2\x96\x81", "<", ">", "s", "/", "the", "ing", " and", "Lily", "\x7f", "\x01"};
  std::mt19937 rng(2024);
  int compared = 0;
  for (const std::string& path :
       {kLlamaModel, std::string(QFORGE_SHARED_DIR) + "/models/stories260K/candidate-tok512/tok512.model"}) {
    if (!std::filesystem::exists(path)) continue;
    auto sp = SentencePieceTokenizer::Load(path);
    ASSERT_TRUE(sp.ok());
    auto vt = VocabTokenizer::Create((*sp)->ExportVocab(), (*sp)->NormalizerOptions());
    ASSERT_TRUE(vt.ok());
    for (int trial = 0; trial < 400; ++trial) {
      std::string text;
      const int len = static_cast<int>(rng() % 40);
      for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
      auto want = (*sp)->Encode(text, true);
      auto got = (*vt)->Encode(text, true);
      ASSERT_TRUE(want.ok() && got.ok());
      EXPECT_EQ(*got, *want) << path << " text: [" << text << "]";
      ++compared;
    }
  }
  if (compared == 0) GTEST_SKIP();
}

TEST(VocabTokenizer, StreamingPiecesConcatenateToDecode) {
  if (!HaveLlama()) GTEST_SKIP();
  auto sp = SentencePieceTokenizer::Load(kLlamaModel);
  ASSERT_TRUE(sp.ok());
  auto vt = VocabTokenizer::Create((*sp)->ExportVocab());
  ASSERT_TRUE(vt.ok());
  for (const Tokenizer* t : {static_cast<const Tokenizer*>(sp->get()), static_cast<const Tokenizer*>(vt->get())}) {
    for (const std::string& s : kSentences) {
      auto ids = t->Encode(s, true);
      ASSERT_TRUE(ids.ok());
      std::string streamed;
      int prev = -1;
      for (int id : *ids) {
        auto piece = t->DecodePiece(prev, id);
        ASSERT_TRUE(piece.ok());
        streamed += *piece;
        prev = id;
      }
      EXPECT_EQ(streamed, s);
    }
  }
}

TEST(VocabTokenizer, LlamaTokenizerBinEqualsModel) {
  if (!HaveLlama() || !std::filesystem::exists(kLlamaBin)) GTEST_SKIP();
  auto bin = LoadTokenizer(kLlamaBin, 32000);
  ASSERT_TRUE(bin.ok()) << bin.status();
  auto model = LoadTokenizer(kLlamaModel);
  ASSERT_TRUE(model.ok()) << model.status();
  for (const std::string& s : kSentences) {
    auto a = (*bin)->Encode(s, true);
    auto b = (*model)->Encode(s, true);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b) << s;
    auto d = (*bin)->Decode(*a);
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(*d, s);
  }
  EXPECT_FALSE(LoadTokenizer(kLlamaBin).ok());  // vocab_size is required for .bin
  // Both files give the same canonical vocabulary (pieces, scores, types, specials).
  auto from_bin = ReadVocabFile(kLlamaBin, 32000);
  auto from_model = ReadVocabFile(kLlamaModel);
  ASSERT_TRUE(from_bin.ok() && from_model.ok()) << from_bin.status() << from_model.status();
  EXPECT_EQ(from_bin->tokens, from_model->tokens);
  EXPECT_EQ(from_bin->scores, from_model->scores);
  EXPECT_EQ(from_bin->types, from_model->types);
  EXPECT_EQ(from_bin->bos_id, from_model->bos_id);
  EXPECT_EQ(from_bin->eos_id, from_model->eos_id);
}

TEST(VocabTokenizer, ByteVocabularyRoundTripAndMerges) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 1, /*with_vocab=*/true);
  auto t = TokenizerFromVocab(*m.vocab);
  ASSERT_TRUE(t.ok()) << t.status();
  // Every space is followed by a letter: this vocabulary has no bare "▁" piece, so a lone space would
  // fall back to the bytes of "▁" and decode as that character.
  for (const std::string s : {"hello there", "a b c", "zz", "e\xc3\xa9t\xc3\xa9\xf0\x9f\x98\x80", ""}) {
    auto ids = (*t)->Encode(s, true);
    ASSERT_TRUE(ids.ok());
    auto d = (*t)->Decode(*ids);
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(*d, s);
  }
  const Vocab& v = *m.vocab;
  auto pieces = [&](const std::string& text) {
    std::vector<std::string> out;
    const std::vector<int> ids = *(*t)->Encode(text, false);
    for (int id : ids) out.push_back(v.tokens[id]);
    return out;
  };
  EXPECT_EQ(pieces("e q"), (std::vector<std::string>{"\xe2\x96\x81" "e", "\xe2\x96\x81" "q"}));
  // "é" has no piece and "▁" cannot merge with it: five byte tokens.
  EXPECT_EQ(pieces("\xc3\xa9"), (std::vector<std::string>{"<0xE2>", "<0x96>", "<0x81>", "<0xC3>", "<0xA9>"}));
}

TEST(VocabTokenizer, MergesByScoreNotLength) {
  // Pieces: a, b, c, ab (score -5), bc (score -1), abc (score -2). "abc": bc outranks ab, then a+bc=abc.
  Vocab v;
  auto add = [&](std::string p, float s, TokenType t) {
    v.tokens.push_back(std::move(p));
    v.scores.push_back(s);
    v.types.push_back(t);
  };
  add("<unk>", 0, TokenType::kUnknown);
  add("<s>", 0, TokenType::kControl);
  add("</s>", 0, TokenType::kControl);
  add("\xe2\x96\x81", -10, TokenType::kNormal);
  add("a", -10, TokenType::kNormal);
  add("b", -10, TokenType::kNormal);
  add("c", -10, TokenType::kNormal);
  add("ab", -5, TokenType::kNormal);
  add("bc", -1, TokenType::kNormal);
  add("abc", -2, TokenType::kNormal);
  add("\xe2\x96\x81" "ab", -0.5f, TokenType::kNormal);
  auto t = VocabTokenizer::Create(v);
  ASSERT_TRUE(t.ok());
  // "▁abc": pairs ▁a (absent), ab (-5), bc (-1) -> merge bc; then ▁ a bc: a+bc=abc (-2) -> ▁ abc.
  EXPECT_EQ(*(*t)->Encode("abc", false), (std::vector<int>{3, 9}));
  // "▁ab": ab (-5) merges first (▁a is no piece), then ▁+ab = ▁ab (-0.5).
  EXPECT_EQ(*(*t)->Encode("ab", false), (std::vector<int>{10}));
  // remove_extra_whitespaces drops leading/trailing spaces and collapses runs; without the dummy prefix
  // the first word has no "▁".
  auto squeeze = VocabTokenizer::Create(v, {.add_dummy_prefix = true, .remove_extra_whitespaces = true});
  ASSERT_TRUE(squeeze.ok());
  EXPECT_EQ(*(*squeeze)->Encode("   ab    ab  ", false), *(*t)->Encode("ab ab", false));
  EXPECT_EQ(*(*squeeze)->Encode("   ", true), (std::vector<int>{1}));
  EXPECT_EQ(*(*t)->Encode("  ", false), (std::vector<int>{3, 3, 3}));
  auto bare = VocabTokenizer::Create(v, {.add_dummy_prefix = false});
  ASSERT_TRUE(bare.ok());
  EXPECT_EQ(*(*bare)->Encode("ab", false), (std::vector<int>{7}));
  // No byte tokens: an unknown character becomes one <unk>.
  EXPECT_EQ(*(*t)->Encode("a\xc3\xa9", true), (std::vector<int>{1, 3, 4, 0}));
  EXPECT_EQ(*(*t)->Decode(std::vector<int>{1, 3, 4, 0, 2}), "a \xe2\x81\x87 ");
}

TEST(Tokenizer, RejectsBadInput) {
  EXPECT_FALSE(LoadTokenizer("/tmp/whatever.txt").ok());
  Vocab v;
  EXPECT_FALSE(TokenizerFromVocab(v).ok());
  v.tokens = {"<unk>", "<s>"};
  v.scores = {0};
  v.types = {TokenType::kUnknown, TokenType::kControl};
  EXPECT_FALSE(TokenizerFromVocab(v).ok());
  v.scores = {0, 0};
  EXPECT_FALSE(TokenizerFromVocab(v).ok());  // eos_id 2 outside
  v.eos_id = 1;
  auto t = TokenizerFromVocab(v);
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE((*t)->Decode(std::vector<int>{0, 7}).ok());
  EXPECT_FALSE((*t)->DecodePiece(1, -3).ok());
}

}  // namespace
}  // namespace qforge
