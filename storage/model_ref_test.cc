#include "storage/model_ref.h"

#include "gtest/gtest.h"

namespace qforge::storage {
namespace {

TEST(ModelRef, ParsesVersionsLatestAndBareNames) {
  auto r = ParseModelRef("llama@3");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->name, "llama");
  EXPECT_EQ(r->version, 3u);
  r = ParseModelRef("llama@latest");
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->is_latest());
  r = ParseModelRef("tiny-1.5b_q4");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->name, "tiny-1.5b_q4");
  EXPECT_TRUE(r->is_latest());
  r = ParseModelRef("m@18446744073709551615");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r->version, UINT64_MAX - 0);
  EXPECT_EQ(FormatModelRef(ModelRef{"llama", 3}), "llama@3");
  EXPECT_EQ(FormatModelRef(ModelRef{"llama", std::nullopt}), "llama@latest");
}

TEST(ModelRef, RejectsMalformedReferencesWithReasons) {
  struct Case {
    const char* text;
    const char* reason;
  };
  const Case cases[] = {
      {"a@", "empty version"},
      {"@1", "no model name"},
      {"a@-1", "positive integer"},
      {"a@b@c", "more than one '@'"},
      {"a@0", "positive integer"},
      {"a@01", "positive integer"},
      {"a@+1", "positive integer"},
      {"a@1x", "positive integer"},
      {"a@99999999999999999999", "positive integer"},
      {"", "no model name"},
      {"Llama@1", "[a-z0-9._-]"},
      {"a b", "[a-z0-9._-]"},
      {".hidden", "start with a letter or digit"},
  };
  for (const Case& c : cases) {
    auto r = ParseModelRef(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(r.status().message().find(c.reason), std::string::npos) << c.text << ": " << r.status();
  }
}

TEST(ModelRef, NameRules) {
  EXPECT_TRUE(ValidateModelName("llama-2.7b_chat").ok());
  EXPECT_TRUE(ValidateModelName(std::string(kMaxModelNameChars, 'a')).ok());
  EXPECT_EQ(ValidateModelName(std::string(kMaxModelNameChars + 1, 'a')).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateModelName("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateModelName("a/b").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateModelName(std::string("a\0b", 3)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateModelName("-x").code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge::storage
