#include "core/tokenizer/vocab_tokenizer.h"

#include <algorithm>
#include <cstring>
#include <queue>

#include "absl/strings/str_cat.h"
#include "core/tokenizer/piece_text.h"

namespace qforge {
namespace {

using tokenizer_internal::kSpaceSymbol;

// Length of the UTF-8 character starting with `lead`; stray continuation or invalid lead bytes count as
// one-byte characters (they can only be byte-fallback tokens anyway).
int Utf8Length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

struct Symbol {
  size_t start;
  size_t len;  // 0 once merged into its left neighbour
  int prev, next;
};

struct Candidate {
  float score;
  int left, right;
  size_t len;  // combined length when queued; a mismatch later means a side has changed
};

struct CandidateOrder {
  // Highest score first; among equal scores the leftmost pair (as SentencePiece's BPE does).
  bool operator()(const Candidate& a, const Candidate& b) const {
    if (a.score != b.score) return a.score < b.score;
    return a.left > b.left;
  }
};

}  // namespace

VocabTokenizer::VocabTokenizer(Vocab vocab) : vocab_(std::move(vocab)) {
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  for (int id = 0; id < static_cast<int>(vocab_.tokens.size()); ++id) {
    const TokenType type = vocab_.types[id];
    if (type == TokenType::kNormal || type == TokenType::kUserDefined) {
      // The first id wins for duplicate pieces, as in a SentencePiece model.
      mergeable_.emplace(vocab_.tokens[id], id);
    } else if (type == TokenType::kByte) {
      const int b = ParseBytePiece(vocab_.tokens[id]);
      if (b >= 0 && byte_ids_[b] < 0) byte_ids_[b] = id;
    } else if (type == TokenType::kControl && !vocab_.tokens[id].empty()) {
      control_ids_.push_back(id);
    }
  }
  std::stable_sort(control_ids_.begin(), control_ids_.end(),
                   [&](int a, int b) { return vocab_.tokens[a].size() > vocab_.tokens[b].size(); });
}

absl::StatusOr<std::vector<int>> VocabTokenizer::EncodeWithControlTokens(const std::string& text, bool add_bos) const {
  std::vector<int> ids;
  if (add_bos) ids.push_back(vocab_.bos_id);
  bool first_byte[256] = {};
  for (int id : control_ids_) first_byte[static_cast<unsigned char>(vocab_.tokens[id][0])] = true;
  size_t segment = 0;  // start of the text not yet encoded
  auto flush = [&](size_t end) -> absl::Status {
    if (end > segment) {
      absl::StatusOr<std::vector<int>> piece = Encode(text.substr(segment, end - segment), false);
      if (!piece.ok()) return piece.status();
      ids.insert(ids.end(), piece->begin(), piece->end());
    }
    return absl::OkStatus();
  };
  for (size_t i = 0; i < text.size();) {
    int match = -1;
    if (first_byte[static_cast<unsigned char>(text[i])]) {
      for (int id : control_ids_) {  // longest first
        const std::string& piece = vocab_.tokens[id];
        if (text.compare(i, piece.size(), piece) == 0) {
          match = id;
          break;
        }
      }
    }
    if (match < 0) {
      ++i;
      continue;
    }
    if (absl::Status s = flush(i); !s.ok()) return s;
    ids.push_back(match);
    i += vocab_.tokens[match].size();
    segment = i;
  }
  if (absl::Status s = flush(text.size()); !s.ok()) return s;
  return ids;
}

absl::StatusOr<std::unique_ptr<VocabTokenizer>> VocabTokenizer::Create(Vocab vocab) {
  const size_t n = vocab.tokens.size();
  if (n == 0) return absl::InvalidArgumentError("vocabulary is empty");
  if (vocab.scores.size() != n || vocab.types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("vocabulary has ", n, " tokens but ", vocab.scores.size(),
                                                   " scores and ", vocab.types.size(), " types"));
  }
  for (int id : {vocab.bos_id, vocab.eos_id, vocab.unk_id}) {
    if (id < 0 || id >= static_cast<int>(n)) {
      return absl::InvalidArgumentError(absl::StrCat("special token id ", id, " outside the vocabulary of ", n));
    }
  }
  return std::unique_ptr<VocabTokenizer>(new VocabTokenizer(std::move(vocab)));
}

absl::StatusOr<std::vector<int>> VocabTokenizer::Encode(const std::string& text, bool add_bos) const {
  std::vector<int> ids;
  if (add_bos) ids.push_back(vocab_.bos_id);

  // SentencePiece's normaliser without a character map: optional dummy prefix, spaces escaped to "▁";
  // with remove_extra_whitespaces, spaces at the start and after a space are skipped, and every trailing
  // "▁" is cut at the end (that includes a literal "▁" from the input, which mid-text stays as it is).
  if (text.empty()) return ids;
  const size_t sym_len = std::strlen(kSpaceSymbol);
  std::string s;
  s.reserve(text.size() * 3 + 3);
  if (vocab_.normalizer.add_dummy_prefix) s += kSpaceSymbol;
  bool prev_space = vocab_.normalizer.remove_extra_whitespaces;
  for (char ch : text) {
    if (ch == ' ') {
      if (!(vocab_.normalizer.remove_extra_whitespaces && prev_space)) s += kSpaceSymbol;
      prev_space = true;
    } else {
      s.push_back(ch);
      prev_space = false;
    }
  }
  if (vocab_.normalizer.remove_extra_whitespaces) {
    while (s.size() >= sym_len && s.compare(s.size() - sym_len, sym_len, kSpaceSymbol) == 0) s.resize(s.size() - sym_len);
  }
  if (s.empty()) return ids;

  std::vector<Symbol> sym;
  for (size_t i = 0; i < s.size();) {
    const size_t len = std::min<size_t>(Utf8Length(static_cast<unsigned char>(s[i])), s.size() - i);
    const int index = static_cast<int>(sym.size());
    sym.push_back({i, len, index - 1, -1});
    if (index > 0) sym[index - 1].next = index;
    i += len;
  }

  std::priority_queue<Candidate, std::vector<Candidate>, CandidateOrder> queue;
  auto consider = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const size_t len = sym[left].len + sym[right].len;
    auto it = mergeable_.find(s.substr(sym[left].start, len));
    if (it == mergeable_.end()) return;
    queue.push({vocab_.scores[it->second], left, right, len});
  };
  for (size_t i = 0; i + 1 < sym.size(); ++i) consider(static_cast<int>(i), static_cast<int>(i + 1));

  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = sym[c.left];
    Symbol& r = sym[c.right];
    if (l.len == 0 || r.len == 0 || l.next != c.right || l.len + r.len != c.len) continue;  // stale
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = c.left;
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }

  bool prev_unk = false;
  for (int i = 0; i >= 0 && i < static_cast<int>(sym.size()); i = sym[i].next) {
    const std::string piece = s.substr(sym[i].start, sym[i].len);
    auto it = mergeable_.find(piece);
    if (it != mergeable_.end()) {
      ids.push_back(it->second);
      prev_unk = false;
      continue;
    }
    for (unsigned char b : piece) {
      if (byte_ids_[b] >= 0) {
        ids.push_back(byte_ids_[b]);
        prev_unk = false;
      } else {
        // Without byte tokens the whole character is unknown (one unk, not one per byte), and
        // libsentencepiece merges a run of unknown characters into one unk too.
        if (!prev_unk) ids.push_back(vocab_.unk_id);
        prev_unk = true;
        break;
      }
    }
  }
  return ids;
}

absl::StatusOr<std::string> VocabTokenizer::Decode(std::span<const int> ids) const {
  // libsentencepiece's Decode, step by step: byte tokens collect into runs rendered together; `at_start`
  // (its is_bos_ws) says a leading "▁" may still be dropped, and turns false for good once text exists or
  // a dropped "▁" counts as the one dummy prefix (`dropped`, its bos_ws_seen from the previous piece).
  const size_t sym = std::strlen(kSpaceSymbol);
  const bool strip = vocab_.normalizer.add_dummy_prefix || vocab_.normalizer.remove_extra_whitespaces;
  std::string text, bytes;
  bool at_start = true, dropped = false;
  for (int id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat("decode: token id ", id, " outside [0, ", vocab_size(), ")"));
    }
    const std::string& piece = vocab_.tokens[id];
    const TokenType type = vocab_.types[id];
    if (type == TokenType::kByte) {
      const int b = ParseBytePiece(piece);
      if (b >= 0) {
        bytes.push_back(static_cast<char>(b));
        continue;
      }
    }
    tokenizer_internal::AppendByteRun(bytes, &text);
    bytes.clear();
    if (dropped || !text.empty()) at_start = false;
    dropped = false;
    if (type == TokenType::kControl) continue;
    if (type == TokenType::kUnknown) {
      text += vocab_.normalizer.unk_surface;
      continue;
    }
    size_t from = 0;
    if (at_start && strip && piece.compare(0, sym, kSpaceSymbol) == 0) {
      from = sym;
      // With remove_extra_whitespaces every leading space goes, so the next piece may lose its "▁" too.
      dropped = !vocab_.normalizer.remove_extra_whitespaces;
    }
    tokenizer_internal::AppendUnescaped(piece, from, &text);
  }
  tokenizer_internal::AppendByteRun(bytes, &text);
  return text;
}

absl::StatusOr<std::string> VocabTokenizer::DecodePiece(int prev, int id) const {
  if (id < 0 || id >= vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("decode: token id ", id, " outside [0, ", vocab_size(), ")"));
  }
  if (vocab_.types[id] == TokenType::kUnknown) return vocab_.normalizer.unk_surface;
  const bool strip = vocab_.normalizer.add_dummy_prefix || vocab_.normalizer.remove_extra_whitespaces;
  return tokenizer_internal::PieceSurface(vocab_.tokens[id], vocab_.types[id],
                                          strip && (prev < 0 || prev == vocab_.bos_id));
}

}  // namespace qforge
