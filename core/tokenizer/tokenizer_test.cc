#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/model/synthetic.h"
#include "core/tokenizer/sentencepiece_tokenizer.h"
#include "core/formats/sentencepiece_model.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/vocab_tokenizer.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

const std::string kLlamaModel = std::string(QFORGE_SHARED_DIR) + "/models/llama2-tokenizer/tokenizer.model";
const std::string kLlamaBin = std::string(QFORGE_SHARED_DIR) + "/models/llama2-tokenizer/tokenizer.bin";
const std::string kTok512 = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/candidate-tok512/tok512.model";

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
  auto vt = VocabTokenizer::Create((*sp)->ExportVocab());
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

// Random strings over a mix of scripts, spaces and control characters (fixed seed: the same corpus every run).
std::vector<std::string> RandomCorpus() {
  const std::vector<std::string> alphabet = {
      "a", "e", "t", "h", "s", "n", "o", "r", "L", "T", " ", " ", " ", ",", ".", "'", "\"", "\n", "\t", "0", "9",
      "\xc3\xa9", "\xc3\xb1", "\xe2\x80\x9c", "\xe2\x80\x94", "\xe4\xbd\xa0", "\xe5\xa5\xbd", "\xd0\xb6",
      "\xf0\x9f\x98\x80", "\xe2\x96\x81", "<", ">", "s", "/", "the", "ing", " and", "Lily", "\x7f", "\x01"};
  std::mt19937 rng(2024);
  std::vector<std::string> texts;
  for (int trial = 0; trial < 800; ++trial) {
    std::string text;
    const int len = static_cast<int>(rng() % 40);
    for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
    texts.push_back(std::move(text));
  }
  return texts;
}

TEST(VocabTokenizer, MatchesSentencePieceOnRandomText) {
  int compared = 0;
  for (const std::string& path : {kLlamaModel, kTok512}) {
    if (!std::filesystem::exists(path)) continue;
    auto sp = SentencePieceTokenizer::Load(path);
    ASSERT_TRUE(sp.ok());
    auto vt = VocabTokenizer::Create((*sp)->ExportVocab());
    ASSERT_TRUE(vt.ok());
    for (const std::string& text : RandomCorpus()) {
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

TEST(VocabTokenizer, EncodeWithControlTokensMapsTheirSpellings) {
  Vocab v;
  auto add = [&](std::string p, float s, TokenType t) {
    v.tokens.push_back(std::move(p));
    v.scores.push_back(s);
    v.types.push_back(t);
  };
  add("<unk>", 0, TokenType::kUnknown);  // 0
  add("<s>", 0, TokenType::kControl);    // 1
  add("</s>", 0, TokenType::kControl);   // 2
  add("\xe2\x96\x81", -10, TokenType::kNormal);  // 3 "▁"
  add("a", -10, TokenType::kNormal);     // 4
  add("b", -10, TokenType::kNormal);     // 5
  add("<", -10, TokenType::kNormal);     // 6
  add("s", -10, TokenType::kNormal);     // 7
  add(">", -10, TokenType::kNormal);     // 8
  add("<|x|>", 0, TokenType::kControl);  // 9
  add("<|x|>y", 0, TokenType::kControl); // 10: longer, so it wins where both match
  add("y", -10, TokenType::kNormal);     // 11
  auto t = VocabTokenizer::Create(v);
  ASSERT_TRUE(t.ok()) << t.status();
  // Plain Encode spells "<s>" out; this one makes it BOS, and each text piece gets its dummy prefix.
  EXPECT_EQ(*(*t)->Encode("<s>a", false), (std::vector<int>{3, 6, 7, 8, 4}));
  EXPECT_EQ(*(*t)->EncodeWithControlTokens("<s>a</s><s>b", false), (std::vector<int>{1, 3, 4, 2, 1, 3, 5}));
  EXPECT_EQ(*(*t)->EncodeWithControlTokens("a<|x|>ya<|x|>", true), (std::vector<int>{1, 3, 4, 10, 3, 4, 9}));
  // No control spelling: the same as Encode; "<unk>" is not a control token and stays text.
  EXPECT_EQ(*(*t)->EncodeWithControlTokens("ab<s", false), *(*t)->Encode("ab<s", false));
  EXPECT_EQ(*(*t)->EncodeWithControlTokens("", true), (std::vector<int>{1}));
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
  Vocab squeezing = v;
  squeezing.normalizer = {.add_dummy_prefix = true, .remove_extra_whitespaces = true};
  auto squeeze = VocabTokenizer::Create(squeezing);
  ASSERT_TRUE(squeeze.ok());
  EXPECT_EQ(*(*squeeze)->Encode("   ab    ab  ", false), *(*t)->Encode("ab ab", false));
  EXPECT_EQ(*(*squeeze)->Encode("   ", true), (std::vector<int>{1}));
  EXPECT_EQ(*(*t)->Encode("  ", false), (std::vector<int>{3, 3, 3}));
  Vocab no_prefix = v;
  no_prefix.normalizer.add_dummy_prefix = false;
  auto bare = VocabTokenizer::Create(no_prefix);
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


// ---- The .model reader (sp_model.h) against libsentencepiece, and on hostile bytes. ----

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string WriteTemp(const std::string& name, const std::string& bytes) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// A protobuf encoder for hand-built ModelProto bytes.
namespace pb {
std::string Varint(uint64_t v) {
  std::string out;
  do {
    out.push_back(static_cast<char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0)));
    v >>= 7;
  } while (v != 0);
  return out;
}
std::string Key(int field, int wire) { return Varint(static_cast<uint64_t>(field) << 3 | wire); }
std::string VarintField(int field, uint64_t v) { return Key(field, 0) + Varint(v); }
// int32 fields carry negative values sign-extended to 64 bits.
std::string Int32Field(int field, int32_t v) { return VarintField(field, static_cast<uint64_t>(static_cast<int64_t>(v))); }
std::string LenField(int field, const std::string& bytes) { return Key(field, 2) + Varint(bytes.size()) + bytes; }
std::string Fixed32Field(int field, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  std::string out = Key(field, 5);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(bits >> (8 * i)));
  return out;
}
std::string Piece(const std::string& text, float score, int type) {
  return LenField(1, LenField(1, text) + Fixed32Field(2, score) + VarintField(3, type));
}
}  // namespace pb

const std::string kSp = "\xe2\x96\x81";

// A minimal valid BPE model: pieces, then normalizer_spec, then trainer_spec (so that every strict prefix lacks
// the model_type and cannot parse as a BPE model).
struct TinyModel {
  std::string pieces = pb::Piece("<unk>", 0, 2) + pb::Piece("<s>", 0, 3) + pb::Piece("</s>", 0, 3) +
                       pb::Piece(kSp, -1, 1) + pb::Piece("a", -2, 1) + pb::Piece("b", -3, 1) +
                       pb::Piece(kSp + "a", -0.5f, 1) + pb::Piece("ab", -0.25f, 1);
  std::string normalizer = pb::LenField(1, "identity") + pb::VarintField(3, 1) + pb::VarintField(4, 0);
  std::string trainer = pb::VarintField(3, 2);  // model_type BPE
  std::string extra;                            // appended after everything
  std::string Bytes() const { return pieces + pb::LenField(3, normalizer) + pb::LenField(2, trainer) + extra; }
};

TEST(SpModel, ReadsExactlyWhatLibsentencepieceExports) {
  int checked = 0;
  for (const std::string& path : {kLlamaModel, kTok512}) {
    if (!std::filesystem::exists(path)) continue;
    auto sp = SentencePieceTokenizer::Load(path);
    ASSERT_TRUE(sp.ok()) << sp.status();
    auto m = formats::ReadSentencePieceModel(path);
    ASSERT_TRUE(m.ok()) << m.status();
    const Vocab want = (*sp)->ExportVocab();
    EXPECT_EQ(m->model, want.model);
    EXPECT_EQ(m->tokens, want.tokens) << path;
    EXPECT_EQ(m->scores, want.scores) << path;  // bit-exact floats
    EXPECT_EQ(m->types, want.types) << path;
    EXPECT_EQ(m->bos_id, want.bos_id);
    EXPECT_EQ(m->eos_id, want.eos_id);
    EXPECT_EQ(m->unk_id, want.unk_id);
    EXPECT_EQ(m->normalizer.add_dummy_prefix, (*sp)->NormalizerOptions().add_dummy_prefix);
    EXPECT_EQ(m->normalizer.remove_extra_whitespaces, (*sp)->NormalizerOptions().remove_extra_whitespaces);
    // Both are Llama-style: unk 0, bos 1, eos 2, then 256 byte pieces.
    EXPECT_EQ(m->unk_id, 0);
    EXPECT_EQ(m->bos_id, 1);
    EXPECT_EQ(m->eos_id, 2);
    EXPECT_EQ(m->tokens[1], "<s>");
    EXPECT_EQ(m->types[3], TokenType::kByte);
    EXPECT_EQ(ReadVocabFile(path)->tokens, want.tokens);
    // Decode's text for <unk> comes from trainer_spec.unk_surface when the file sets it.
    auto mine = LoadTokenizer(path);
    ASSERT_TRUE(mine.ok());
    EXPECT_EQ(*(*mine)->Decode(std::vector<int>{1, 0, 0}), *(*sp)->Decode(std::vector<int>{1, 0, 0}));
    ++checked;
  }
  if (checked == 0) GTEST_SKIP();
  if (std::filesystem::exists(kLlamaModel)) {
    auto m = formats::ReadSentencePieceModel(kLlamaModel);
    EXPECT_EQ(m->tokens.size(), 32000u);
    EXPECT_TRUE(m->normalizer.add_dummy_prefix);
    EXPECT_FALSE(m->normalizer.remove_extra_whitespaces);  // Llama 2 sets it false explicitly
  }
  if (std::filesystem::exists(kTok512)) {
    auto m = formats::ReadSentencePieceModel(kTok512);
    EXPECT_EQ(m->tokens.size(), 512u);
    EXPECT_TRUE(m->normalizer.remove_extra_whitespaces);  // absent from tok512's NormalizerSpec: proto2 default true
    // llama2.c's training script passed the surface octal-escaped, and libsentencepiece stored it verbatim.
    EXPECT_EQ(m->normalizer.unk_surface, " \\342\\201\\207 ");
  }
}

// LoadTokenizer(.model) is now VocabTokenizer over the reader; it must give libsentencepiece's ids and text.
TEST(SpModel, LoadTokenizerMatchesLibsentencepiece) {
  int compared = 0;
  std::vector<std::string> texts = kSentences;
  texts.insert(texts.end(), kEncodeOnly.begin(), kEncodeOnly.end());
  for (const std::string& t : RandomCorpus()) texts.push_back(t);
  for (const std::string& path : {kLlamaModel, kTok512}) {
    if (!std::filesystem::exists(path)) continue;
    auto sp = SentencePieceTokenizer::Load(path);
    ASSERT_TRUE(sp.ok());
    auto mine = LoadTokenizer(path);
    ASSERT_TRUE(mine.ok()) << mine.status();
    ASSERT_NE(dynamic_cast<const VocabTokenizer*>(mine->get()), nullptr);
    EXPECT_EQ((*mine)->vocab_size(), (*sp)->vocab_size());
    EXPECT_EQ((*mine)->bos_id(), (*sp)->bos_id());
    EXPECT_EQ((*mine)->eos_id(), (*sp)->eos_id());
    for (const std::string& text : texts) {
      for (bool bos : {true, false}) {
        auto want = (*sp)->Encode(text, bos);
        auto got = (*mine)->Encode(text, bos);
        ASSERT_TRUE(want.ok() && got.ok());
        ASSERT_EQ(*got, *want) << path << " text: [" << text << "] bos=" << bos;
        auto decoded = (*mine)->Decode(*got);
        ASSERT_TRUE(decoded.ok());
        EXPECT_EQ(*decoded, *(*sp)->Decode(*want)) << path << " text: [" << text << "]";
      }
      ++compared;
    }
    // Round trip: Llama keeps whitespace as is, so any text without a literal "▁" comes back unchanged.
    if (path == kLlamaModel) {
      for (const std::string& text : texts) {
        if (text.find(kSp) != std::string::npos) continue;
        EXPECT_EQ(*(*mine)->Decode(*(*mine)->Encode(text, true)), text);
      }
    }
  }
  if (compared == 0) GTEST_SKIP();
  std::cout << "compared " << compared << " texts with libsentencepiece\n";
}

// A .model that qforge writes (for safetensors exports) is one libsentencepiece loads and tokenizes with
// exactly as it does with the original file.
TEST(SpModel, WrittenModelsLoadInLibsentencepiece) {
  std::vector<std::string> texts = kSentences;
  for (const std::string& t : RandomCorpus()) texts.push_back(t);
  int compared = 0;
  for (const std::string& path : {kLlamaModel, kTok512}) {
    if (!std::filesystem::exists(path)) continue;
    auto vocab = formats::ReadSentencePieceModel(path);
    ASSERT_TRUE(vocab.ok()) << vocab.status();
    const std::string written = (std::filesystem::temp_directory_path() /
                                 ("qforge_written_" + std::to_string(compared) + ".model")).string();
    ASSERT_TRUE(formats::WriteSentencePieceModel(*vocab, written).ok());
    auto original = SentencePieceTokenizer::Load(path);
    auto reloaded = SentencePieceTokenizer::Load(written);
    ASSERT_TRUE(original.ok() && reloaded.ok()) << reloaded.status();
    EXPECT_EQ((*reloaded)->ExportVocab().tokens, (*original)->ExportVocab().tokens);
    EXPECT_EQ((*reloaded)->NormalizerOptions(), (*original)->NormalizerOptions());
    for (const std::string& text : texts) {
      ASSERT_EQ(*(*reloaded)->Encode(text, true), *(*original)->Encode(text, true)) << path << " [" << text << "]";
    }
    std::filesystem::remove(written);
    ++compared;
  }
  if (compared == 0) GTEST_SKIP();
}

// Protobuf semantics libsentencepiece gets from protobuf-lite: unknown fields of every wire type are skipped,
// and a message field that occurs twice is merged. Appending to Llama's file exercises both, and libsentencepiece
// loading the same bytes says what they mean.
TEST(SpModel, UnknownFieldsAndMergedSpecsAsProtobufDoes) {
  if (!HaveLlama()) GTEST_SKIP();
  std::string bytes = ReadBytes(kLlamaModel);
  bytes += pb::VarintField(100, 12345);
  bytes += pb::Key(101, 1) + std::string(8, '\x7f');
  bytes += pb::LenField(102, "whatever");
  bytes += pb::Key(103, 3) + pb::VarintField(1, 5) + pb::Key(2, 3) + pb::Fixed32Field(3, 1.0f) + pb::Key(2, 4) +
           pb::Key(103, 4);  // a group holding a nested group
  bytes += pb::Fixed32Field(104, 2.0f);
  // A second normalizer_spec that only turns remove_extra_whitespaces on (plus an unknown field inside it).
  bytes += pb::LenField(3, pb::VarintField(4, 1) + pb::VarintField(77, 1));
  // A second trainer_spec with unknown fields only: must not reset model_type or the special ids.
  bytes += pb::LenField(2, pb::LenField(199, "x") + pb::Fixed32Field(198, 0.5f));

  auto m = formats::ParseSentencePieceModel(bytes);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->normalizer.add_dummy_prefix);          // kept from the first normalizer_spec
  EXPECT_TRUE(m->normalizer.remove_extra_whitespaces);  // from the second
  EXPECT_EQ(m->tokens.size(), 32000u);

  const std::string path = WriteTemp("llama_extra_fields.model", bytes);
  auto sp = SentencePieceTokenizer::Load(path);
  ASSERT_TRUE(sp.ok()) << sp.status();
  EXPECT_TRUE((*sp)->NormalizerOptions().remove_extra_whitespaces);
  auto mine = LoadTokenizer(path);
  ASSERT_TRUE(mine.ok()) << mine.status();
  for (const std::string& text : kSentences) {
    EXPECT_EQ(*(*mine)->Encode(text, true), *(*sp)->Encode(text, true)) << "[" << text << "]";
  }
  // The merge really changed behaviour: runs of spaces now collapse, as libsentencepiece agrees above.
  auto plain = LoadTokenizer(kLlamaModel);
  ASSERT_TRUE(plain.ok());
  EXPECT_NE(*(*mine)->Encode("  two  spaces", false), *(*plain)->Encode("  two  spaces", false));
}

// A hand-built model without byte pieces (unknown characters become <unk>), under every combination of the
// two normaliser flags; libsentencepiece loads the same bytes, which also checks the test's encoder.
TEST(SpModel, HandBuiltModelMatchesLibsentencepiece) {
  {
    const TinyModel tiny;
    auto m = formats::ParseSentencePieceModel(tiny.Bytes());
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->tokens, (std::vector<std::string>{"<unk>", "<s>", "</s>", kSp, "a", "b", kSp + "a", "ab"}));
    EXPECT_EQ(m->scores, (std::vector<float>{0, 0, 0, -1, -2, -3, -0.5f, -0.25f}));
    EXPECT_EQ(m->types[0], TokenType::kUnknown);
    EXPECT_EQ(m->types[2], TokenType::kControl);
    EXPECT_EQ(m->types[7], TokenType::kNormal);
    EXPECT_TRUE(m->normalizer.add_dummy_prefix);
    EXPECT_FALSE(m->normalizer.remove_extra_whitespaces);
    EXPECT_EQ(m->normalizer.unk_surface, " \xe2\x81\x87 ");  // no trainer_spec.unk_surface: the default
  }
  const std::vector<std::string> texts = {"ab", "ba", "a b", "aab  bba", "c", "cc", "acb", "c c", "\xc3\xa9\xc3\xa9 a",
                                          " ", "", "  a  ", " ab", kSp + "a", kSp + " " + kSp + "b"};
  std::mt19937 rng(5);
  for (int flags = 0; flags < 4; ++flags) {
    TinyModel tiny;
    tiny.normalizer = pb::LenField(1, "identity") + pb::VarintField(3, flags & 1) + pb::VarintField(4, flags >> 1);
    if (flags == 3) tiny.trainer += pb::LenField(44, "<?>");  // a custom unk_surface
    const std::string path = WriteTemp("tiny" + std::to_string(flags) + ".model", tiny.Bytes());
    auto sp = SentencePieceTokenizer::Load(path);
    ASSERT_TRUE(sp.ok()) << sp.status();
    auto mine = LoadTokenizer(path);
    ASSERT_TRUE(mine.ok()) << mine.status();
    EXPECT_EQ((*sp)->ExportVocab().tokens, ReadVocabFile(path)->tokens);
    for (const std::string& text : texts) {
      auto want = (*sp)->Encode(text, true);
      ASSERT_TRUE(want.ok());
      EXPECT_EQ(*(*mine)->Encode(text, true), *want) << "flags " << flags << " [" << text << "]";
      EXPECT_EQ(*(*mine)->Decode(*want), *(*sp)->Decode(*want)) << "flags " << flags << " [" << text << "]";
    }
    for (int trial = 0; trial < 300; ++trial) {
      std::vector<int> ids(rng() % 6);
      for (int& id : ids) id = static_cast<int>(rng() % 8);
      EXPECT_EQ(*(*mine)->Decode(ids), *(*sp)->Decode(ids)) << "flags " << flags << ::testing::PrintToString(ids);
    }
  }
  // "ab" outranks "▁a", so "ab" gives ▁ ab, not ▁a b; a run of unknown characters is one <unk>.
  auto t = LoadTokenizer(WriteTemp("tiny.model", TinyModel().Bytes()));
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*(*t)->Encode("ab", false), (std::vector<int>{3, 7}));
  EXPECT_EQ(*(*t)->Encode("acca", false), (std::vector<int>{6, 0, 4}));
}

TEST(SpModel, UnimplementedFeaturesAreRejected) {
  auto code = [](const TinyModel& t) { return formats::ParseSentencePieceModel(t.Bytes()).status(); };
  auto expect_unimplemented = [&](const TinyModel& t, const std::string& mentions) {
    const absl::Status s = code(t);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
    EXPECT_NE(s.message().find(mentions), std::string::npos) << s;
  };
  {
    TinyModel t;
    t.trainer = pb::VarintField(3, 1);
    expect_unimplemented(t, "UNIGRAM");
  }
  {
    TinyModel t;
    t.trainer = "";  // model_type absent: proto2 default UNIGRAM
    expect_unimplemented(t, "UNIGRAM");
  }
  {
    TinyModel t;
    t.trainer = pb::VarintField(3, 4);
    expect_unimplemented(t, "CHAR");
  }
  {
    TinyModel t;  // nmt_nfkc-style: a character map
    t.normalizer = pb::LenField(1, "nmt_nfkc") + pb::LenField(2, std::string(40, '\x01'));
    expect_unimplemented(t, "40-byte precompiled_charsmap");
  }
  {
    TinyModel t;  // an empty charsmap is what "identity" has: accepted
    t.normalizer += pb::LenField(2, "");
    EXPECT_TRUE(code(t).ok()) << code(t);
  }
  {
    TinyModel t;
    t.normalizer += pb::VarintField(5, 0);
    expect_unimplemented(t, "escape_whitespaces");
  }
  {
    TinyModel t;
    t.extra = pb::LenField(5, pb::LenField(2, "xyz"));  // denormalizer_spec with a charsmap
    expect_unimplemented(t, "denormalizer");
  }
  {
    TinyModel t;
    t.trainer += pb::VarintField(24, 1);
    expect_unimplemented(t, "treat_whitespace_as_suffix");
  }
  {
    TinyModel t;
    t.pieces += pb::Piece("<mask>", 0, 4);
    expect_unimplemented(t, "USER_DEFINED");
  }
  {
    TinyModel t;
    t.pieces += pb::Piece("ba", 0, 5);
    expect_unimplemented(t, "UNUSED");
  }
  {
    TinyModel t;  // bos_id -1 (sign-extended 10-byte varint) disables BOS
    t.trainer += pb::Int32Field(41, -1);
    expect_unimplemented(t, "bos_id is -1");
  }
}

absl::StatusCode ParseCode(const std::string& bytes) { return formats::ParseSentencePieceModel(bytes).status().code(); }

std::string ParseMessage(const std::string& bytes) {
  return std::string(formats::ParseSentencePieceModel(bytes).status().message());
}

TEST(SpModel, HostileBytesAreInvalidArgument) {
  const absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(ParseCode(""), kInvalid);
  EXPECT_NE(ParseMessage("").find("empty"), std::string::npos);

  // A length past the end, including one near 2^64 (no overflow in the bounds check).
  EXPECT_EQ(ParseCode(pb::Key(1, 2) + pb::Varint(1000) + "abc"), kInvalid);
  EXPECT_NE(ParseMessage(pb::Key(1, 2) + pb::Varint(1000) + "abc").find("runs past the end"), std::string::npos);
  EXPECT_EQ(ParseCode(pb::Key(1, 2) + pb::Varint(~uint64_t{0} - 3) + "abc"), kInvalid);
  // Inside a piece message: the piece's own length overruns its (in-bounds) message.
  EXPECT_EQ(ParseCode(pb::LenField(1, pb::Key(1, 2) + pb::Varint(50) + "ab")), kInvalid);

  // Overlong varints: 11 bytes, and a 10th byte with bits past 64.
  EXPECT_EQ(ParseCode(std::string(10, '\x80') + '\x01'), kInvalid);
  EXPECT_NE(ParseMessage(std::string(10, '\x80') + '\x01').find("longer than 10 bytes"), std::string::npos);
  EXPECT_NE(ParseMessage(pb::Key(100, 0) + std::string(9, '\xff') + '\x02').find("overflows"), std::string::npos);
  EXPECT_EQ(ParseCode(pb::Key(100, 0) + "\x80\x80"), kInvalid);  // truncated varint

  // Bad tags and wire types.
  EXPECT_EQ(ParseCode(std::string("\x00\x01", 2)), kInvalid);  // field number 0
  EXPECT_EQ(ParseCode(pb::Key(9, 6) + "xx"), kInvalid);
  EXPECT_EQ(ParseCode(pb::Key(9, 7) + "xx"), kInvalid);
  EXPECT_EQ(ParseCode(pb::Key(9, 4)), kInvalid);                           // end-group without start
  EXPECT_EQ(ParseCode(pb::Key(9, 3) + pb::VarintField(1, 1)), kInvalid);   // group without end
  EXPECT_EQ(ParseCode(pb::Key(9, 3) + pb::Key(8, 4)), kInvalid);           // mismatched end
  EXPECT_EQ(ParseCode(pb::Key(9, 1) + "1234567"), kInvalid);               // truncated fixed64
  EXPECT_EQ(ParseCode(pb::LenField(1, pb::Key(2, 5) + "12")), kInvalid);   // truncated score
  std::string deep;
  for (int i = 0; i < 100; ++i) deep += pb::Key(9, 3);
  for (int i = 0; i < 100; ++i) deep += pb::Key(9, 4);
  EXPECT_NE(ParseMessage(deep).find("nested too deeply"), std::string::npos);
  // Shallow unknown groups are fine.
  EXPECT_TRUE(formats::ParseSentencePieceModel(pb::Key(9, 3) + pb::Key(8, 3) + pb::Key(8, 4) + pb::Key(9, 4) +
                                      TinyModel().Bytes())
                  .ok());

  // A piece-count blow-up: 2^20 + 1 five-byte pieces stop at the limit rather than growing without bound.
  std::string many;
  const std::string one = pb::LenField(1, pb::LenField(1, "a"));
  many.reserve(one.size() * ((1 << 20) + 1));
  for (int i = 0; i < (1 << 20) + 1; ++i) many += one;
  EXPECT_EQ(ParseCode(many), kInvalid);
  EXPECT_NE(ParseMessage(many).find("more than 1048576 pieces"), std::string::npos);

  // Pieces and special ids that libsentencepiece would refuse, or that VocabTokenizer cannot index.
  auto with = [](std::string pieces, std::string trainer_extra = "") {
    TinyModel t;
    t.pieces = std::move(pieces);
    t.trainer += trainer_extra;
    return t.Bytes();
  };
  const std::string base = TinyModel().pieces;
  EXPECT_NE(ParseMessage(with(base + pb::Piece("a", 0, 1))).find("duplicates piece 4"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece("", 0, 1))).find("is empty"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece(std::string("x\0y", 3), 0, 1))).find("NUL"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece(std::string(8000, 'x'), 0, 1))).find("8000 bytes"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece("q", std::nanf(""), 1))).find("NaN"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece("q", 0, 9))).find("unknown type 9"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece("<unk2>", 0, 2))).find("2 UNKNOWN pieces"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece("<0x41>", 0, 6))).find("byte_fallback is false"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base + pb::Piece("<0x4a>", 0, 6), pb::VarintField(35, 1))).find("not spelled"),
            std::string::npos);  // libsentencepiece knows only upper-case hex
  EXPECT_NE(ParseMessage(with(base + pb::Piece("<0x41>", 0, 6), pb::VarintField(35, 1))).find("no byte piece for 0x00"),
            std::string::npos);
  EXPECT_NE(ParseMessage(with(base, pb::Int32Field(41, 4))).find("bos_id 4 is NORMAL piece \"a\""), std::string::npos);
  EXPECT_NE(ParseMessage(with(base, pb::Int32Field(42, 1000))).find("outside the 8 pieces"), std::string::npos);
  EXPECT_NE(ParseMessage(with(base, pb::LenField(46, "<bos>"))).find("not the CONTROL piece \"<bos>\""),
            std::string::npos);
  EXPECT_EQ(ParseCode(with("")), kInvalid);  // no pieces at all
  for (const std::string& bytes : {with(base + pb::Piece("a", 0, 1)), with(base, pb::Int32Field(40, 1))}) {
    EXPECT_EQ(ParseCode(bytes), kInvalid);
  }

  // Files: a missing one is NOT_FOUND, an empty one INVALID_ARGUMENT naming the path.
  EXPECT_EQ(formats::ReadSentencePieceModel("/nonexistent/x.model").status().code(), absl::StatusCode::kNotFound);
  const std::string empty = WriteTemp("empty.model", "");
  EXPECT_EQ(formats::ReadSentencePieceModel(empty).status().code(), kInvalid);
  EXPECT_NE(formats::ReadSentencePieceModel(empty).status().message().find(empty), std::string::npos);  // names the file
  EXPECT_EQ(LoadTokenizer(empty).status().code(), kInvalid);
}

// Every strict prefix of a real file fails, except the one that ends exactly between trainer_spec and
// normalizer_spec: that is a valid ModelProto whose normaliser is all proto2 defaults.
TEST(SpModel, TruncatedFilesFail) {
  if (!std::filesystem::exists(kTok512)) GTEST_SKIP();
  const std::string bytes = ReadBytes(kTok512);
  int invalid = 0, unimplemented = 0, parsed = 0;
  for (size_t len = 0; len < bytes.size(); ++len) {
    auto m = formats::ParseSentencePieceModel(std::string_view(bytes.data(), len));
    if (m.ok()) {
      ++parsed;
      EXPECT_EQ(static_cast<unsigned char>(bytes[len]), 0x1a) << "prefix " << len << " is not before a field-3 tag";
      EXPECT_TRUE(m->normalizer.remove_extra_whitespaces && m->normalizer.add_dummy_prefix);
    } else if (m.status().code() == absl::StatusCode::kInvalidArgument) {
      ++invalid;
    } else {
      // Prefixes that end between pieces lack trainer_spec, hence model_type: default UNIGRAM.
      EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented) << m.status();
      ++unimplemented;
    }
  }
  EXPECT_EQ(parsed, 1);
  std::cout << bytes.size() << " prefixes of tok512.model: " << invalid << " INVALID_ARGUMENT, " << unimplemented
            << " UNIMPLEMENTED, " << parsed << " valid\n";
  // The hand-built model puts trainer_spec last: every one of its prefixes fails.
  const std::string tiny = TinyModel().Bytes();
  for (size_t len = 0; len < tiny.size(); ++len) {
    EXPECT_FALSE(formats::ParseSentencePieceModel(std::string_view(tiny.data(), len)).ok()) << len;
  }
  if (HaveLlama()) {
    // Llama's file has the same layout; sample 200 prefixes of it.
    const std::string llama = ReadBytes(kLlamaModel);
    std::mt19937 rng(7);
    for (int i = 0; i < 200; ++i) {
      const size_t len = rng() % llama.size();
      const bool ok = formats::ParseSentencePieceModel(std::string_view(llama.data(), len)).ok();
      EXPECT_TRUE(!ok || static_cast<unsigned char>(llama[len]) == 0x1a) << len;
    }
  }
}

// Corrupted files: random byte changes to tok512.model never crash the reader, and whatever it still
// accepts is a vocabulary VocabTokenizer takes and can encode with.
TEST(SpModel, MutatedFilesAreRejectedOrUsable) {
  if (!std::filesystem::exists(kTok512)) GTEST_SKIP();
  const std::string original = ReadBytes(kTok512);
  std::mt19937 rng(11);
  int accepted = 0, rejected = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bytes = original;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0: bytes[at] = static_cast<char>(rng()); break;       // overwrite
        case 1: bytes.erase(at, 1 + rng() % 8); break;             // delete a few bytes
        default: bytes.insert(bytes.begin() + static_cast<std::ptrdiff_t>(at), static_cast<char>(rng()));  // insert one
      }
      if (bytes.empty()) bytes.push_back('x');
    }
    auto m = formats::ParseSentencePieceModel(bytes);
    if (!m.ok()) {
      EXPECT_TRUE(m.status().code() == absl::StatusCode::kInvalidArgument ||
                  m.status().code() == absl::StatusCode::kUnimplemented)
          << m.status();
      ++rejected;
      continue;
    }
    auto t = VocabTokenizer::Create(*std::move(m));
    ASSERT_TRUE(t.ok()) << "trial " << trial << ": " << t.status();
    auto ids = (*t)->Encode("Lily saw a big red ball.", true);
    ASSERT_TRUE(ids.ok());
    EXPECT_TRUE((*t)->Decode(*ids).ok());
    ++accepted;
  }
  std::cout << "mutated tok512.model: " << accepted << " accepted, " << rejected << " rejected\n";
  EXPECT_GT(rejected, 0);
}

// Decoding arbitrary id sequences (control, unknown and byte pieces anywhere, broken UTF-8, leading spaces).
TEST(SpModel, DecodeMatchesLibsentencepieceOnRandomIds) {
  int compared = 0;
  for (const std::string& path : {kLlamaModel, kTok512}) {
    if (!std::filesystem::exists(path)) continue;
    auto sp = SentencePieceTokenizer::Load(path);
    ASSERT_TRUE(sp.ok());
    auto mine = LoadTokenizer(path);
    ASSERT_TRUE(mine.ok());
    const int n = (*sp)->vocab_size();
    std::mt19937 rng(99);
    for (int trial = 0; trial < 2000; ++trial) {
      std::vector<int> ids;
      const int len = static_cast<int>(rng() % 8);
      for (int i = 0; i < len; ++i) {
        // Mostly the first 300 ids (specials, bytes, short pieces, "▁"), sometimes anything.
        ids.push_back(rng() % 4 == 0 ? static_cast<int>(rng() % n) : static_cast<int>(rng() % 300));
      }
      auto want = (*sp)->Decode(ids);
      auto got = (*mine)->Decode(ids);
      ASSERT_TRUE(want.ok() && got.ok());
      EXPECT_EQ(*got, *want) << path << " ids: " << ::testing::PrintToString(ids);
      ++compared;
    }
  }
  if (compared == 0) GTEST_SKIP();
}

}  // namespace
}  // namespace qforge
