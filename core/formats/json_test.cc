#include "core/formats/json.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::formats {
namespace {

using ::testing::HasSubstr;

std::string Err(const std::string& text, const JsonLimits& limits = {}) {
  auto r = ParseJson(text, limits);
  return r.ok() ? "OK" : std::string(r.status().message());
}

TEST(JsonTest, ParsesValues) {
  auto j = ParseJson(R"( {"a": [1, -2, 3.5, 1e3, true, false, null], "b": {"c": "d"}, "big": 9223372036854775807,
                         "bigger": 9223372036854775808, "neg0": -0, "tiny": 1e-400} )");
  ASSERT_TRUE(j.ok()) << j.status();
  const Json::Array& a = j->Find("a")->array();
  ASSERT_EQ(a.size(), 7u);
  EXPECT_TRUE(a[0].is_int());
  EXPECT_EQ(a[0].int_value(), 1);
  EXPECT_EQ(a[1].int_value(), -2);
  EXPECT_EQ(a[2].kind(), Json::Kind::kDouble);
  EXPECT_DOUBLE_EQ(a[2].number_value(), 3.5);
  EXPECT_EQ(a[3].kind(), Json::Kind::kDouble);  // exponent form is a double even when integral
  EXPECT_DOUBLE_EQ(a[3].number_value(), 1000.0);
  EXPECT_TRUE(a[4].bool_value());
  EXPECT_TRUE(a[5].is_bool());
  EXPECT_FALSE(a[5].bool_value());
  EXPECT_TRUE(a[6].is_null());
  EXPECT_EQ(j->Find("b")->Find("c")->string_value(), "d");
  EXPECT_EQ(j->Find("big")->int_value(), INT64_MAX);
  EXPECT_EQ(j->Find("bigger")->kind(), Json::Kind::kDouble);
  EXPECT_DOUBLE_EQ(j->Find("bigger")->number_value(), 9223372036854775808.0);
  EXPECT_TRUE(j->Find("neg0")->is_int());
  EXPECT_EQ(j->Find("tiny")->number_value(), 0.0);
  EXPECT_EQ(j->Find("missing"), nullptr);
}

TEST(JsonTest, StringEscapes) {
  auto j = ParseJson(R"(["a\"b\\c\/d\b\f\n\r\t", "\u00e9\u20ac", "\ud83d\ude00", "\u0000x", "h\u00C9llo", "é€😀"])");
  ASSERT_TRUE(j.ok()) << j.status();
  const Json::Array& a = j->array();
  EXPECT_EQ(a[0].string_value(), "a\"b\\c/d\b\f\n\r\t");
  EXPECT_EQ(a[1].string_value(), "\xc3\xa9\xe2\x82\xac");
  EXPECT_EQ(a[2].string_value(), "\xf0\x9f\x98\x80");  // U+1F600 from a surrogate pair
  EXPECT_EQ(a[3].string_value(), std::string("\0x", 2));
  EXPECT_EQ(a[4].string_value(), "h\xc3\x89llo");
  EXPECT_EQ(a[5].string_value(), "é€😀");
}

TEST(JsonTest, DumpRoundTrips) {
  const std::string text =
      R"({"s":"q\"\\\n\u0001é","i":-42,"d":0.1,"e":1e-05,"a":[true,false,null,[]],"o":{}})";
  auto j = ParseJson(text);
  ASSERT_TRUE(j.ok()) << j.status();
  const std::string dumped = j->Dump();
  EXPECT_EQ(dumped, R"({"s":"q\"\\\n\u0001é","i":-42,"d":0.1,"e":1e-05,"a":[true,false,null,[]],"o":{}})");
  auto again = ParseJson(dumped);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->Dump(), dumped);
  // Integral doubles stay doubles through a dump (the JSON fuzzer's round-trip oracle relies on it).
  auto doubles = ParseJson("[-0.0, 5.0, 1e300]");
  ASSERT_TRUE(doubles.ok());
  EXPECT_EQ(doubles->Dump(), "[-0.0,5.0,1e+300]");
  EXPECT_EQ(ParseJson(doubles->Dump())->array()[0].kind(), Json::Kind::kDouble);
}

TEST(JsonTest, DumpReplacesInvalidUtf8) {
  const std::string dumped = Json::String("a\xff\xc3\xa9\xe2\x82").Dump();
  EXPECT_EQ(dumped, "\"a\xef\xbf\xbd\xc3\xa9\xef\xbf\xbd\xef\xbf\xbd\"");  // U+FFFD per bad byte
  auto back = ParseJson(dumped);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->string_value(), "a\xef\xbf\xbd\xc3\xa9\xef\xbf\xbd\xef\xbf\xbd");
}

TEST(JsonTest, CopiesAreIndependent) {
  Json a = Json::MakeArray({Json::Int(1)});
  Json b = a;
  b.mutable_array().push_back(Json::Int(2));
  EXPECT_EQ(a.array().size(), 1u);
  EXPECT_EQ(b.array().size(), 2u);
}

TEST(JsonTest, RejectsMalformed) {
  struct Case {
    std::string text;
    const char* expect;
  } cases[] = {
      {"", "unexpected end of input"},
      {"   ", "unexpected end of input"},
      {"{", "expected a string key"},
      {"{\"a\"}", "expected ':'"},
      {"{\"a\":1,}", "expected a string key"},
      {"[1,]", "unexpected character ']'"},
      {"[1 2]", "expected ',' or ']'"},
      {"{\"a\":1 \"b\":2}", "expected ',' or '}'"},
      {"{\"a\":1,\"a\":2}", "duplicate key \"a\""},
      {"01", "leading zero"},
      {"-", "expected a digit"},
      {"1.", "expected a digit after '.'"},
      {"1e", "expected a digit in exponent"},
      {"1e999", "number out of range"},
      {"NaN", "unexpected character 'N'"},
      {"Infinity", "unexpected character 'I'"},
      {"tru", "unexpected character 't'"},
      {"1 2", "trailing characters"},
      {"\"abc", "unterminated string"},
      {"\"a\nb\"", "unescaped control character"},
      {"\"\\x\"", "invalid escape '\\x'"},
      {"\"\\u12zz\"", "bad hex digit"},
      {"\"\\u12", "truncated \\u escape"},
      {"\"\\ud800\"", "high surrogate not followed"},
      {"\"\\ud800\\u0041\"", "non-low-surrogate"},
      {"\"\\udc00\"", "lone low surrogate"},
      {"\"\xff\"", "invalid UTF-8"},
      {"\"\xc0\xaf\"", "invalid UTF-8"},          // overlong '/'
      {"\"\xed\xa0\x80\"", "invalid UTF-8"},      // encoded surrogate
      {"\"\xf4\x90\x80\x80\"", "invalid UTF-8"},  // beyond U+10FFFF
      {"\"\xe2\x82\"", "invalid UTF-8"},          // truncated sequence
      {"// c\n1", "unexpected character '/'"},
      {"\x01", "unexpected character '\\x01'"},
  };
  for (const Case& k : cases) EXPECT_THAT(Err(k.text), HasSubstr(k.expect)) << k.text;
  EXPECT_THAT(Err("[1,\n  x]"), HasSubstr("at offset 6"));
}

TEST(JsonTest, EnforcesLimits) {
  JsonLimits limits;
  limits.max_depth = 4;
  EXPECT_EQ(Err("[[[[1]]]]", limits), "OK");
  EXPECT_THAT(Err("[[[[[1]]]]]", limits), HasSubstr("nesting deeper than 4"));
  EXPECT_THAT(Err("{\"a\":{\"a\":{\"a\":{\"a\":{}}}}}", limits), HasSubstr("nesting deeper than 4"));
  // The default depth limit stops a stack-exhausting document long before it matters.
  EXPECT_THAT(Err(std::string(100000, '[')), HasSubstr("nesting deeper than 64"));
  limits = {};
  limits.max_bytes = 10;
  EXPECT_THAT(Err("[1,2,3,4,5,6]", limits), HasSubstr("exceeds the limit of 10"));
  limits = {};
  limits.max_string_bytes = 4;
  EXPECT_EQ(Err("\"abcd\"", limits), "OK");
  EXPECT_THAT(Err("\"abcdefgh\"", limits), HasSubstr("string longer than 4"));
  limits = {};
  limits.max_members = 3;
  EXPECT_EQ(Err("[1,2,3]", limits), "OK");
  EXPECT_THAT(Err("[1,2,3,4]", limits), HasSubstr("too many elements"));
  EXPECT_THAT(Err("{\"a\":1,\"b\":1,\"c\":1,\"d\":1}", limits), HasSubstr("too many members"));
}

}  // namespace
}  // namespace qforge::formats
