// The chat-template engine against real models' templates (testdata/SOURCES.md says where each came from) and
// against the language features one by one. Every expected string was worked out by hand from the template
// and Jinja's semantics (trim_blocks and lstrip_blocks on, as transformers renders them).
#include "serving/chat_template/chat_template.h"

#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::chat {
namespace {

using ::testing::HasSubstr;

std::string ReadTestTemplate(const std::string& name) {
  std::ifstream in(std::string(QFORGE_CHAT_TEMPLATE_TESTDATA) + "/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

ChatTemplate MustParse(const std::string& source, TemplateOptions options = {}) {
  auto t = ChatTemplate::Parse(source, options);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return *ChatTemplate::Parse("");
  return *std::move(t);
}

// The conversation most tests render: a system prompt, then alternating turns ending with the user.
const std::vector<ChatMessage> kConversation = {
    {"system", "You are a helpful assistant"},
    {"user", "Hello"},
    {"assistant", "Hi there"},
    {"user", "Who are you"},
    {"assistant", "   I am an assistant   "},
    {"user", "Another question"},
};
const std::vector<ChatMessage> kNoSystem = {kConversation.begin() + 1, kConversation.end()};

std::string Apply(const std::string& file, const std::vector<ChatMessage>& messages, const std::string& bos,
                  const std::string& eos, bool add_generation_prompt = true) {
  const ChatTemplate t = MustParse(ReadTestTemplate(file));
  auto out = t.Apply(messages, bos, eos, add_generation_prompt);
  EXPECT_TRUE(out.ok()) << file << ": " << out.status();
  return out.ok() ? *out : "";
}

std::string Render(const std::string& source, const std::map<std::string, Value>& vars = {}) {
  auto t = ChatTemplate::Parse(source);
  if (!t.ok()) return "PARSE ERROR: " + std::string(t.status().message());
  auto out = t->Render(vars);
  if (!out.ok()) return "RENDER ERROR: " + std::string(out.status().message());
  return *out;
}

absl::Status RenderError(const std::string& source, const std::map<std::string, Value>& vars = {}) {
  auto t = ChatTemplate::Parse(source);
  if (!t.ok()) return t.status();
  auto out = t->Render(vars);
  return out.ok() ? absl::OkStatus() : out.status();
}

// --- real templates ------------------------------------------------------------------------------------------

TEST(RealTemplatesTest, Llama2ChatFoldsTheSystemPromptIntoTheFirstTurn) {
  EXPECT_EQ(Apply("llama2-chat.jinja", kConversation, "<s>", "</s>"),
            "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]"
            " Hi there </s>"
            "<s>[INST] Who are you [/INST]"
            " I am an assistant </s>"  // .strip() removed the padding
            "<s>[INST] Another question [/INST]");
  EXPECT_EQ(Apply("llama2-chat.jinja", {{"user", "Hi"}}, "<s>", "</s>"), "<s>[INST] Hi [/INST]");
}

TEST(RealTemplatesTest, Llama2ChatRejectsTurnsThatDoNotAlternate) {
  const ChatTemplate t = MustParse(ReadTestTemplate("llama2-chat.jinja"));
  const std::vector<ChatMessage> twice = {{"user", "a"}, {"user", "b"}};
  auto out = t.Apply(twice, "<s>", "</s>", true);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("Conversation roles must alternate user/assistant/user/assistant/..."));
  EXPECT_THAT(out.status().message(), HasSubstr("line 1, column "));
}

TEST(RealTemplatesTest, ChatMlKeepsContentVerbatim) {
  EXPECT_EQ(Apply("chatml-openhermes.jinja", kConversation, "<s>", "</s>"),
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
            "<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\nHi there<|im_end|>\n"
            "<|im_start|>user\nWho are you<|im_end|>\n"
            "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n"
            "<|im_start|>user\nAnother question<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(Apply("chatml-openhermes.jinja", {{"user", "Hello"}}, "", "", /*add_generation_prompt=*/false),
            "<|im_start|>user\nHello<|im_end|>\n");
}

TEST(RealTemplatesTest, Qwen2AddsItsDefaultSystemMessageOnlyWhenThereIsNone) {
  EXPECT_EQ(Apply("qwen2-instruct.jinja", {{"user", "Hello"}}, "", "<|im_end|>"),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(Apply("qwen2-instruct.jinja", {{"system", "Be brief."}, {"user", "Hello"}}, "", "<|im_end|>"),
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\n");
}

TEST(RealTemplatesTest, ZephyrRendersAsTransformersDoesWithTrimAndLstripBlocks) {
  const std::vector<ChatMessage> chat = {{"system", "You are a friendly chatbot"}, {"user", "Hello"}};
  EXPECT_EQ(Apply("zephyr.jinja", chat, "<s>", "</s>"),
            "<|system|>\nYou are a friendly chatbot</s>\n<|user|>\nHello</s>\n<|assistant|>\n");
  EXPECT_EQ(Apply("zephyr.jinja", chat, "<s>", "</s>", /*add_generation_prompt=*/false),
            "<|system|>\nYou are a friendly chatbot</s>\n<|user|>\nHello</s>\n");
  // Without trim_blocks every line break between the tags is printed: 2 before the turn, 3 after.
  const ChatTemplate raw = MustParse(ReadTestTemplate("zephyr.jinja"), {.trim_blocks = false, .lstrip_blocks = false});
  auto out = raw.Apply(std::vector<ChatMessage>{{"user", "Hello"}}, "<s>", "</s>", false);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "\n\n<|user|>\nHello</s>\n\n\n");
}

TEST(RealTemplatesTest, Llama3TrimsOnlyTheContent) {
  EXPECT_EQ(Apply("llama3-instruct.jinja", kConversation, "<|begin_of_text|>", "<|eot_id|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(RealTemplatesTest, GemmaRenamesTheAssistantAndRefusesSystemMessages) {
  const std::vector<ChatMessage> chat = {{"user", "Hello"}, {"assistant", "  Hi there  "}, {"user", "Who are you"}};
  EXPECT_EQ(Apply("gemma-it.jinja", chat, "<bos>", "<eos>"),
            "<bos><start_of_turn>user\nHello<end_of_turn>\n"
            "<start_of_turn>model\nHi there<end_of_turn>\n"
            "<start_of_turn>user\nWho are you<end_of_turn>\n"
            "<start_of_turn>model\n");
  const ChatTemplate t = MustParse(ReadTestTemplate("gemma-it.jinja"));
  auto out = t.Apply(kConversation, "<bos>", "<eos>", true);
  ASSERT_FALSE(out.ok());
  EXPECT_THAT(out.status().message(), HasSubstr("System role not supported"));
}

TEST(RealTemplatesTest, MistralInstruct) {
  const std::vector<ChatMessage> chat = {{"user", "Hello"}, {"assistant", "Hi there"}, {"user", "Who are you"}};
  EXPECT_EQ(Apply("mistral-instruct-v0.2.jinja", chat, "<s>", "</s>"),
            "<s>[INST] Hello [/INST]Hi there</s>[INST] Who are you [/INST]");
  const ChatTemplate t = MustParse(ReadTestTemplate("mistral-instruct-v0.2.jinja"));
  auto out = t.Apply(kConversation, "<s>", "</s>", true);  // a system message breaks the alternation
  ASSERT_FALSE(out.ok());
  EXPECT_THAT(out.status().message(), HasSubstr("Conversation roles must alternate"));
}

TEST(RealTemplatesTest, DefaultTemplateIsChatMl) {
  const ChatTemplate t = MustParse(kDefaultChatTemplate);
  auto out = t.Apply(std::vector<ChatMessage>{{"system", "Be brief."}, {"user", "Hello"}}, "<s>", "</s>", true);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(*out, Apply("chatml-openhermes.jinja", {{"system", "Be brief."}, {"user", "Hello"}}, "<s>", "</s>"));
}

// --- the language, feature by feature --------------------------------------------------------------------------

TEST(TemplateLanguageTest, WhitespaceControl) {
  EXPECT_EQ(Render("a  {%- if true -%}  b  {%- endif -%}  c"), "abc");
  EXPECT_EQ(Render("a {{- 'b' -}} \n c"), "abc");
  EXPECT_EQ(Render("a {# note #} b"), "a  b");
  EXPECT_EQ(Render("a {#- note -#} b"), "ab");
  // lstrip_blocks removes the indentation before block tags, trim_blocks the line break after them; text and
  // {{ }} lines keep theirs.
  EXPECT_EQ(Render("x\n    {% if true %}\n    y\n    {% endif %}\nz"), "x\n    y\nz");
  EXPECT_EQ(Render("x\n  {{ 'y' }}\nz"), "x\n  y\nz");
  // A tag that does not start its line keeps the spaces before it.
  EXPECT_EQ(Render("x  {% if true %}y{% endif %}"), "x  y");
  // "+" turns lstrip off for one tag.
  EXPECT_EQ(Render("x\n  {%+ if true %}y{% endif %}"), "x\n  y");
}

TEST(TemplateLanguageTest, LoopVariables) {
  EXPECT_EQ(Render("{% for x in ['a', 'b', 'c'] %}{{ loop.index0 }}{{ loop.index }}{{ x }}"
                   "{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}{{ loop.revindex }}{{ loop.length }},"
                   "{% endfor %}"),
            "01aF33,12b23,23cL13,");
  EXPECT_EQ(Render("{% for x in [1, 2, 3] %}{{ loop.previtem | default('-') }}{{ loop.nextitem | default('-') }} {% endfor %}"),
            "-2 13 2- ");
  EXPECT_EQ(Render("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}"), "a=1;b=2;");
  EXPECT_EQ(Render("{% for c in 'hé' %}[{{ c }}]{% endfor %}"), "[h][é]");
  EXPECT_EQ(Render("{% for x in [1, 2, 3, 4] if x is even %}{{ x }}{% else %}none{% endfor %}|"
                   "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}"),
            "24|empty");
  EXPECT_EQ(Render("{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}"
                   "{{ x }}{% endfor %}"),
            "013");
  EXPECT_EQ(Render("{% for i in range(1, 7, 2) %}{{ i }}{% endfor %}{% for i in range(3, 0, -1) %}{{ i }}{% endfor %}"), "135321");
}

TEST(TemplateLanguageTest, SetScopesAndNamespaces) {
  // A set inside a loop does not leak out of it; a namespace is how templates carry state out.
  EXPECT_EQ(Render("{% set x = 1 %}{% for i in [1, 2] %}{% set x = i * 10 %}{{ x }}{% endfor %}{{ x }}"), "10201");
  // A set inside an if does leak (if opens no scope).
  EXPECT_EQ(Render("{% if true %}{% set y = 'in' %}{% endif %}{{ y }}"), "in");
  Value messages = Value::MakeList({Value::MakeDict({{"role", Value::String("user")}}),
                                    Value::MakeDict({{"role", Value::String("system")}})});
  EXPECT_EQ(Render("{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                   "{% if m.role == 'system' %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.found }} {{ ns.n }}",
                   {{"messages", messages}}),
            "True 2");
  EXPECT_EQ(Render("{% set s %}x{{ 1 + 1 }}{% endset %}[{{ s }}]"), "[x2]");
}

TEST(TemplateLanguageTest, OperatorsAndPrecedence) {
  EXPECT_EQ(Render("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} "
                   "{{ 7 / 2 }} {{ 0.5 + 1 }} {{ 'a' ~ 1 ~ none }} {{ 'ab' * 2 }} {{ [1] + [2] }}"),
            "7 9 3 -4 1 2 1024 3.5 1.5 a1None abab [1, 2]");
  EXPECT_EQ(Render("{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'ell' in 'hello' }} {{ 'x' not in ['a'] }} {{ not true or false }} "
                   "{{ none is none }} {{ x is defined }} {{ x is not defined }} {{ 0 or 'fallback' }} {{ 1 and 'yes' }}"),
            "True False True True False True False True fallback yes");
  EXPECT_EQ(Render("{{ (1 == 1) != (2 == 3) }} {{ True == 1 }} {{ 'a' == 'a' and [1, 'x'] == [1, 'x'] }}"), "True True True");
  EXPECT_EQ(Render("{{ 'a' if false else 'b' }}{{ 'c' if true }}{{ 'd' if false }}"), "bc");
  EXPECT_EQ(Render("{{ 'k' in {'k': 1} }} {{ 3 is divisibleby 3 }} {{ 4 is odd }} {{ 'x' is string }} {{ 1 is number }}"),
            "True True False True True");
  // A filter binds tighter than any operator: only '  b ' is trimmed.
  EXPECT_EQ(Render("{{ ' a ' + '  b ' | trim + ' c ' }}"), " a b c ");
}

TEST(TemplateLanguageTest, SubscriptsAttributesAndSlices) {
  Value messages = Value::MakeList({Value::MakeDict({{"role", Value::String("system")}, {"content", Value::String("s")}}),
                                    Value::MakeDict({{"role", Value::String("user")}, {"content", Value::String("u")}})});
  EXPECT_EQ(Render("{{ messages[0]['role'] }} {{ messages[-1].content }} {{ messages[1:] | length }} {{ messages[5] is defined }} "
                   "{{ messages[0].missing is defined }} {{ 'abcdef'[1:4] }} {{ 'abc'[::-1] }} {{ [1, 2, 3, 4][::2] }} {{ 'héllo'[1] }}",
                   {{"messages", messages}}),
            "system u 1 False False bcd cba [1, 3] é");
}

TEST(TemplateLanguageTest, FiltersAndMethods) {
  EXPECT_EQ(Render("{{ '  hi  ' | trim }}|{{ 'Hi' | upper }}{{ 'Hi' | lower }}|{{ [1, 2, 3] | length }}|{{ 'héllo' | length }}|"
                   "{{ ['a', 'b'] | join(', ') }}|{{ nothing | default('d') }}|{{ '' | default('e', true) }}|"
                   "{{ 'hello world' | title }}|{{ [3, 1] | first }}{{ [3, 1] | last }}|{{ 'abc' | capitalize }}|{{ '5' | int + 1 }}"),
            "hi|HIhi|3|5|a, b|d|e|Hello World|31|Abc|6");
  EXPECT_EQ(Render("{{ {'a': [1, 'x\"', none, true, 1.5]} | tojson }}"), "{\"a\": [1, \"x\\\"\", null, true, 1.5]}");
  EXPECT_EQ(Render("{{ '  x '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'Hello'.startswith('He') }}|{{ 'Hello'.endswith(('x', 'lo')) }}|"
                   "{{ 'abc'.replace('b', 'X') }}|{{ 'ab'.upper() }}|{{ {'k': 'v'}.get('k') }}{{ {'k': 'v'}.get('z', 'w') }}|"
                   "{{ 'user'.title() }}|{{ {'a': 1}.keys() | list }}"),
            "x|['a', 'b']|True|True|aXc|AB|vw|User|['a']");
  EXPECT_EQ(Render("{{ none }} {{ true }} {{ [none, 'it\\'s'] }} {{ undefined_name }}."), "None True [None, \"it's\"] .");
}

// --- errors -----------------------------------------------------------------------------------------------------

TEST(TemplateErrorsTest, SyntaxErrorsNameTheirPosition) {
  absl::Status s = RenderError("line one\n{{ 1 + }}");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("line 2, column 8"));
  EXPECT_THAT(s.message(), HasSubstr("expected an expression, found '}}'"));
  EXPECT_THAT(RenderError("{% if true %}x").message(), HasSubstr("missing {% endif %}"));
  EXPECT_THAT(RenderError("{% endfor %}").message(), HasSubstr("unexpected {% endfor %}"));
  EXPECT_THAT(RenderError("ab\n  {% frobnicate %}").message(), HasSubstr("line 2, column 6: unsupported tag 'frobnicate'"));
  EXPECT_THAT(RenderError("{{ x").message(), HasSubstr("line 1, column 1: unclosed '{{'"));
  EXPECT_THAT(RenderError("{# x").message(), HasSubstr("unclosed comment"));
  EXPECT_THAT(RenderError("{{ 'abc }}").message(), HasSubstr("unterminated string literal"));
  EXPECT_THAT(RenderError("{% break %}").message(), HasSubstr("'break' outside a for loop"));
  EXPECT_THAT(RenderError("{{ a $ b }}").message(), HasSubstr("unexpected character '$'"));
}

TEST(TemplateErrorsTest, RenderErrorsNameTheirPosition) {
  absl::Status s = RenderError("ok\n  {{ raise_exception('bad role: ' ~ 'x') }}");
  EXPECT_THAT(s.message(), HasSubstr("line 2, column 6: bad role: x"));
  EXPECT_THAT(RenderError("{{ x.y }}").message(), HasSubstr("line 1, column 5: 'x' is undefined"));
  EXPECT_THAT(RenderError("{{ 'a' + 1 }}").message(), HasSubstr("unsupported operand types for '+': string and integer"));
  EXPECT_THAT(RenderError("{{ 1 // 0 }}").message(), HasSubstr("division by zero"));
  EXPECT_THAT(RenderError("{{ 'a' | frob }}").message(), HasSubstr("unsupported filter 'frob'"));
  EXPECT_THAT(RenderError("{% for x in 3 %}{% endfor %}").message(), HasSubstr("cannot iterate"));
  EXPECT_THAT(RenderError("{{ 9223372036854775807 + 1 }}").message(), HasSubstr("integer overflow"));
  EXPECT_THAT(RenderError("{{ [1] | tojson(indent=4) }}").message(), HasSubstr("indent is not supported"));
}

TEST(TemplateErrorsTest, HostileTemplatesHitBoundsInsteadOfExhaustingResources) {
  EXPECT_THAT(RenderError("{{ " + std::string(300, '(') + "1" + std::string(300, ')') + " }}").message(),
              HasSubstr("nested"));
  std::string ifs;
  for (int i = 0; i < 300; ++i) ifs += "{% if true %}";
  EXPECT_THAT(RenderError(ifs).message(), HasSubstr("nested deeper than"));
  std::string chain = "{{ 1";
  for (int i = 0; i < 300; ++i) chain += " + 1";
  EXPECT_THAT(RenderError(chain + " }}").message(), HasSubstr("nested deeper than"));
  EXPECT_THAT(RenderError("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").message(),
              HasSubstr("steps"));
  EXPECT_THAT(RenderError("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}").message(), HasSubstr("exceeds"));
  EXPECT_THAT(RenderError("{{ range(10000000) | length }}").message(), HasSubstr("range longer than"));
  EXPECT_THAT(RenderError("{% set ns = namespace() %}{% set ns.me = [ns] %}{{ ns }}").message(),
              HasSubstr("cannot hold a namespace"));
  EXPECT_THAT(RenderError("{% set ns = namespace(v=[]) %}{% for i in range(500) %}{% set ns.v = [ns.v] %}{% endfor %}").message(),
              HasSubstr("nested deeper than"));
}

}  // namespace
}  // namespace qforge::chat
