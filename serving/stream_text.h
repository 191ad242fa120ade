// The text side of a generation stream: turns the bytes of decoded pieces into text that is safe to send
// now. It holds back (1) the bytes of a UTF-8 character whose remaining bytes may still come (byte-fallback
// tokens spell a character over several tokens) and (2) the longest tail that could be the beginning of a
// stop string, so that the text sent never contains a stop string or anything after one.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace qforge::serving {

class StreamText {
 public:
  // `stops`: non-empty UTF-8 strings; the stream stops at the earliest occurrence of any of them.
  explicit StreamText(std::vector<std::string> stops);

  // Adds the bytes of the next piece and returns the text that can be released now: valid UTF-8, with
  // each byte that cannot start or continue a well-formed character replaced by U+FFFD (as
  // Tokenizer::Decode renders it). Once a stop string has appeared, returns the text before it, sets
  // stopped(), and ignores further input.
  std::string Push(std::string_view piece);

  // The end of a stream that did not stop: releases everything held back (an unfinished character as one
  // U+FFFD per byte). The released text is still checked for stop strings, so stopped() may become true.
  std::string Flush();

  bool stopped() const { return stopped_; }

 private:
  // Moves the complete characters at the front of raw_ into text_; with `final`, the unfinished tail too.
  void DecodeRaw(bool final);
  // Releases text_ up to a stop string or up to the tail that might begin one.
  std::string Release();

  std::vector<std::string> stops_;
  std::string raw_;   // bytes not yet decoded: at most an unfinished UTF-8 character
  std::string text_;  // decoded text not yet released (a possible start of a stop string)
  bool stopped_ = false;
};

}  // namespace qforge::serving
