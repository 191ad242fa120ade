#include "serving/stream_text.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace qforge::serving {
namespace {

// Feeds pieces one by one and returns everything released, Flush included unless the stream stopped.
std::string Feed(StreamText& t, const std::vector<std::string>& pieces, std::vector<std::string>* released = nullptr) {
  std::string out;
  for (const std::string& p : pieces) {
    const std::string r = t.Push(p);
    if (released) released->push_back(r);
    out += r;
  }
  if (!t.stopped()) out += t.Flush();
  return out;
}

TEST(StreamText, PassesTextThroughWithoutStops) {
  StreamText t({});
  std::vector<std::string> released;
  EXPECT_EQ(Feed(t, {"Once", " upon", " a time"}, &released), "Once upon a time");
  EXPECT_EQ(released, (std::vector<std::string>{"Once", " upon", " a time"}));
  EXPECT_FALSE(t.stopped());
}

TEST(StreamText, StopStringSplitAcrossPiecesIsNeverReleased) {
  StreamText t({"lo wo"});
  std::vector<std::string> released;
  EXPECT_EQ(Feed(t, {"Hel", "lo", " w", "orld", "!"}, &released), "Hel");
  EXPECT_TRUE(t.stopped());
  // "l", "lo" and "lo w" could each begin the stop string, so they were held back.
  EXPECT_EQ(released, (std::vector<std::string>{"He", "l", "", "", ""}));
}

TEST(StreamText, HeldBackTextIsReleasedWhenItStopsMatching) {
  StreamText t({"abc"});
  std::vector<std::string> released;
  EXPECT_EQ(Feed(t, {"xa", "b", "d", "ab"}, &released), "xabdab");
  EXPECT_EQ(released, (std::vector<std::string>{"x", "", "abd", ""}));
  EXPECT_FALSE(t.stopped());
}

TEST(StreamText, EarliestOfSeveralStopsWins) {
  StreamText t({"world", "o w"});
  EXPECT_EQ(Feed(t, {"hello world"}), "hell");
  EXPECT_TRUE(t.stopped());
  EXPECT_EQ(t.Push("more"), "");
  EXPECT_EQ(t.Flush(), "");
}

TEST(StreamText, StopAtTheVeryStart) {
  StreamText t({"\n"});
  EXPECT_EQ(Feed(t, {"\nafter"}), "");
  EXPECT_TRUE(t.stopped());
}

TEST(StreamText, UnfinishedUtf8IsHeldUntilItsLastByte) {
  StreamText t({});
  std::vector<std::string> released;
  // "é" = C3 A9 and "€" = E2 82 AC, spelled one byte token at a time.
  EXPECT_EQ(Feed(t, {"caf", "\xc3", "\xa9", " ", "\xe2", "\x82", "\xac"}, &released), "caf\xc3\xa9 \xe2\x82\xac");
  EXPECT_EQ(released, (std::vector<std::string>{"caf", "", "\xc3\xa9", " ", "", "", "\xe2\x82\xac"}));
}

TEST(StreamText, MalformedBytesBecomeReplacementCharacters) {
  const std::string fffd = "\xef\xbf\xbd";
  StreamText t({});
  // A lone continuation byte, an overlong lead (C0), a lead interrupted by ASCII, a surrogate (ED A0 80).
  EXPECT_EQ(Feed(t, {"\x80", "\xc0", "a", "\xe2", "b", "\xed\xa0\x80"}),
            fffd + fffd + "a" + fffd + "b" + fffd + fffd + fffd);
  // An unfinished character at the end of the stream: one U+FFFD per byte.
  StreamText u({});
  EXPECT_EQ(Feed(u, {"ok", "\xf0\x9f\x98"}), "ok" + fffd + fffd + fffd);
}

TEST(StreamText, StopStringWithMultibyteCharacters) {
  StreamText t({"\xc3\xa9t\xc3\xa9"});  // "été"
  EXPECT_EQ(Feed(t, {"un \xc3", "\xa9", "t", "\xc3", "\xa9", " chaud"}), "un ");
  EXPECT_TRUE(t.stopped());
}

TEST(StreamText, FlushReleasesAHeldPrefix) {
  StreamText t({"STOP"});
  EXPECT_EQ(t.Push("go ST"), "go ");
  EXPECT_EQ(t.Flush(), "ST");
  EXPECT_FALSE(t.stopped());
}

}  // namespace
}  // namespace qforge::serving
