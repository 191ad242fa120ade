// End-to-end tests of the chat API: a real qforge-server process serving stories260K, driven over HTTP with
// /v1/chat/completions (whole, streamed, logprobs, stop strings, bad input), /tokenize, /detokenize and
// /health, a GGUF model that carries its own chat template, and the official openai npm client.
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "core/formats/formats.h"
#include "core/formats/json.h"
#include "core/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cluster.h"
#include "tests/http_client.h"
#include "tests/server_process.h"

namespace qforge {
namespace {

using formats::Json;
using testing::HttpRequest;
using testing::ServerProcess;
using testing::SseData;
using testing::TempDir;
using ::testing::HasSubstr;

const std::string kStories = testing::Stories260KPath();
const std::string kTok512 = testing::Tok512Path();

Json Parse(const std::string& text) {
  auto j = formats::ParseJson(text);
  EXPECT_TRUE(j.ok()) << j.status() << ": " << text;
  return j.ok() ? *j : Json();
}

std::string ChatBody(const std::string& model, const std::string& messages, const std::string& extra = "") {
  return "{\"model\": \"" + model + "\", \"messages\": " + messages + ", \"temperature\": 0" +
         (extra.empty() ? "" : ", " + extra) + "}";
}

const char kStory[] = R"([{"role": "user", "content": "Once upon a time"}])";

int64_t Member(const Json& j, const std::string& path) {
  const Json* cur = &j;
  size_t start = 0;
  while (cur != nullptr) {
    const size_t dot = path.find('.', start);
    cur = cur->Find(path.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  EXPECT_TRUE(cur != nullptr && cur->is_int()) << path << " in " << j.Dump();
  return cur != nullptr ? cur->int_value() : -1;
}

class ChatTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(kStories)) GTEST_SKIP() << kStories << " not present";
    dir_ = TempDir("chat");
    server_ = std::make_unique<ServerProcess>(dir_, std::vector<std::string>{"--model", "s260k=" + kStories,
                                                                             "--tokenizer", kTok512});
    port_ = server_->http_port();
    ASSERT_GT(port_, 0);
  }
  testing::HttpResponse Post(const std::string& path, const std::string& body) {
    return HttpRequest(port_, "POST", path, body);
  }
  std::vector<int> Tokenize(const std::string& text, bool add_special) {
    const auto r = Post("/tokenize", "{\"content\": " + Json::String(text).Dump() +
                                         ", \"add_special\": " + (add_special ? "true" : "false") + "}");
    EXPECT_EQ(r.status, 200) << r.body;
    std::vector<int> ids;
    const Json j = Parse(r.body);
    if (const Json* t = j.Find("tokens"); t != nullptr) {
      for (const Json& id : t->array()) ids.push_back(static_cast<int>(id.int_value()));
    }
    return ids;
  }

  std::string dir_;
  std::unique_ptr<ServerProcess> server_;
  int port_ = 0;
};

TEST_F(ChatTest, WholeAndStreamedAgreeAndUseTheDefaultTemplate) {
  const auto whole = Post("/v1/chat/completions", ChatBody("s260k@file", kStory, "\"max_tokens\": 20"));
  ASSERT_EQ(whole.status, 200) << whole.body;
  const Json w = Parse(whole.body);
  EXPECT_EQ(w.Find("object")->string_value(), "chat.completion");
  EXPECT_THAT(w.Find("id")->string_value(), ::testing::StartsWith("chatcmpl-"));
  EXPECT_EQ(w.Find("model")->string_value(), "s260k@file");
  ASSERT_EQ(w.Find("choices")->array().size(), 1u);
  const Json& choice = w.Find("choices")->array()[0];
  EXPECT_EQ(choice.Find("message")->Find("role")->string_value(), "assistant");
  const std::string content = choice.Find("message")->Find("content")->string_value();
  EXPECT_FALSE(content.empty());
  EXPECT_TRUE(choice.Find("logprobs")->is_null());
  const std::string finish = choice.Find("finish_reason")->string_value();
  EXPECT_TRUE(finish == "stop" || finish == "length") << finish;
  const int64_t prompt_tokens = Member(w, "usage.prompt_tokens");
  const int64_t completion_tokens = Member(w, "usage.completion_tokens");
  EXPECT_EQ(Member(w, "usage.total_tokens"), prompt_tokens + completion_tokens);
  if (finish == "length") EXPECT_EQ(completion_tokens, 20);

  // stories260K carries no template, so the prompt is the default (ChatML) rendering, tokenized with BOS; the
  // same text through /v1/completions generates the same greedy continuation.
  const std::string rendered = "<|im_start|>user\nOnce upon a time<|im_end|>\n<|im_start|>assistant\n";
  EXPECT_EQ(prompt_tokens, static_cast<int64_t>(Tokenize(rendered, true).size()));
  const auto completion = Post("/v1/completions", "{\"model\": \"s260k@file\", \"prompt\": " + Json::String(rendered).Dump() +
                                                      ", \"max_tokens\": 20, \"temperature\": 0}");
  ASSERT_EQ(completion.status, 200) << completion.body;
  const Json c = Parse(completion.body);
  EXPECT_EQ(c.Find("choices")->array()[0].Find("text")->string_value(), content);
  EXPECT_EQ(Member(c, "usage.prompt_tokens"), prompt_tokens);

  const auto streamed = Post("/v1/chat/completions", ChatBody("s260k@file", kStory,
                                                              "\"max_tokens\": 20, \"stream\": true, "
                                                              "\"stream_options\": {\"include_usage\": true}"));
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  EXPECT_THAT(streamed.headers, HasSubstr("text/event-stream"));
  const std::vector<std::string> events = SseData(streamed.body);
  ASSERT_GE(events.size(), 4u) << streamed.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string streamed_finish;
  int64_t streamed_completion_tokens = -1;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const Json e = Parse(events[i]);
    EXPECT_EQ(e.Find("object")->string_value(), "chat.completion.chunk");
    EXPECT_EQ(e.Find("id")->string_value(), e.Find("id")->string_value());
    const Json::Array& choices = e.Find("choices")->array();
    if (i == 0) EXPECT_EQ(choices.at(0).Find("delta")->Find("role")->string_value(), "assistant");
    if (choices.empty()) {  // the usage chunk
      EXPECT_EQ(i, events.size() - 2);
      EXPECT_EQ(Member(e, "usage.prompt_tokens"), prompt_tokens);
      streamed_completion_tokens = Member(e, "usage.completion_tokens");
      continue;
    }
    if (const Json* piece = choices[0].Find("delta")->Find("content"); piece != nullptr) text += piece->string_value();
    if (!choices[0].Find("finish_reason")->is_null()) streamed_finish = choices[0].Find("finish_reason")->string_value();
  }
  EXPECT_EQ(text, content);
  EXPECT_EQ(streamed_finish, finish);
  EXPECT_EQ(streamed_completion_tokens, completion_tokens);
}

TEST_F(ChatTest, LogprobsAndStopStrings) {
  const auto r = Post("/v1/chat/completions",
                      ChatBody("s260k@file", kStory, "\"max_tokens\": 10, \"logprobs\": true, \"top_logprobs\": 3"));
  ASSERT_EQ(r.status, 200) << r.body;
  const Json j = Parse(r.body);
  const Json& choice = j.Find("choices")->array()[0];
  const Json::Array& entries = choice.Find("logprobs")->Find("content")->array();
  ASSERT_EQ(static_cast<int64_t>(entries.size()), Member(j, "usage.completion_tokens"));
  std::string joined;
  for (const Json& e : entries) {
    joined += e.Find("token")->string_value();
    const double lp = e.Find("logprob")->number_value();
    EXPECT_LE(lp, 0.0);
    const Json::Array& top = e.Find("top_logprobs")->array();
    ASSERT_EQ(top.size(), 3u);
    // Greedy decoding picks the most likely token; the alternatives come most likely first.
    EXPECT_EQ(top[0].Find("logprob")->number_value(), lp);
    EXPECT_EQ(top[0].Find("token")->string_value(), e.Find("token")->string_value());
    EXPECT_GE(top[0].Find("logprob")->number_value(), top[1].Find("logprob")->number_value());
    EXPECT_GE(top[1].Find("logprob")->number_value(), top[2].Find("logprob")->number_value());
    std::string bytes;
    for (const Json& b : e.Find("bytes")->array()) bytes += static_cast<char>(b.int_value());
    EXPECT_EQ(bytes, e.Find("token")->string_value());
  }
  const std::string content = choice.Find("message")->Find("content")->string_value();
  EXPECT_EQ(joined, content);

  // A stop string taken from the greedy text cuts it there, with finish_reason "stop".
  ASSERT_GE(content.size(), 4u);
  const std::string stop = content.substr(2, 2);
  const auto stopped = Post("/v1/chat/completions",
                            ChatBody("s260k@file", kStory, "\"max_tokens\": 10, \"stop\": [" + Json::String(stop).Dump() + "]"));
  ASSERT_EQ(stopped.status, 200) << stopped.body;
  const Json s = Parse(stopped.body);
  const Json& sc = s.Find("choices")->array()[0];
  EXPECT_EQ(sc.Find("finish_reason")->string_value(), "stop");
  EXPECT_EQ(sc.Find("message")->Find("content")->string_value(), content.substr(0, content.find(stop)));
}

TEST_F(ChatTest, BadInputGets400NamingTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"model\": \"s260k@file\"}", "messages: required"},
      {ChatBody("s260k@file", "[]"), "messages: required non-empty array"},
      {ChatBody("s260k@file", "[{\"role\": \"robot\", \"content\": \"x\"}]"), "messages[0].role"},
      {ChatBody("s260k@file", "[{\"role\": \"user\"}]"), "messages[0].content"},
      {ChatBody("s260k@file", "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]"), "messages[0].content[0]"},
      {std::string("{\"model\": \"s260k@file\", \"messages\": ") + kStory + ", \"temperature\": \"hot\"}", "temperature"},
      {ChatBody("s260k@file", kStory, "\"top_p\": 2"), "top_p"},
      {ChatBody("s260k@file", kStory, "\"max_tokens\": -1"), "max_tokens"},
      {ChatBody("s260k@file", kStory, "\"stop\": 5"), "stop"},
      {ChatBody("s260k@file", kStory, "\"n\": 2"), "n: only 1"},
      {ChatBody("s260k@file", kStory, "\"logprobs\": true, \"top_logprobs\": 50"), "top_logprobs"},
      {ChatBody("s260k@file", kStory, "\"top_logprobs\": 2"), "top_logprobs: needs logprobs"},
      {ChatBody("s260k@file", kStory, "\"stream\": \"yes\""), "stream"},
      {"not json", "body: not a JSON object"},
  };
  for (const auto& [body, field] : cases) {
    const auto r = Post("/v1/chat/completions", body);
    EXPECT_EQ(r.status, 400) << body << " -> " << r.body;
    const Json j = Parse(r.body);
    ASSERT_NE(j.Find("error"), nullptr) << r.body;
    EXPECT_THAT(j.Find("error")->Find("message")->string_value(), HasSubstr(field)) << body;
    EXPECT_EQ(j.Find("error")->Find("type")->string_value(), "invalid_request_error");
  }
  EXPECT_EQ(Post("/v1/chat/completions", ChatBody("nosuch@file", kStory)).status, 404);
  // Still serving.
  EXPECT_EQ(Post("/v1/chat/completions", ChatBody("s260k@file", kStory, "\"max_tokens\": 2")).status, 200);
}

TEST_F(ChatTest, TokenizeDetokenizeAndHealth) {
  const std::vector<int> ids = Tokenize("Once upon a time", false);
  ASSERT_FALSE(ids.empty());
  auto tokenizer = LoadTokenizer(kTok512, 512);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(ids, *(*tokenizer)->Encode("Once upon a time", false));
  std::vector<int> with_bos = Tokenize("Once upon a time", true);
  ASSERT_EQ(with_bos.size(), ids.size() + 1);
  EXPECT_EQ(with_bos[0], (*tokenizer)->bos_id());

  std::string list;
  for (int id : ids) list += (list.empty() ? "" : ", ") + std::to_string(id);
  const auto back = Post("/detokenize", "{\"tokens\": [" + list + "]}");
  ASSERT_EQ(back.status, 200) << back.body;
  EXPECT_EQ(Parse(back.body).Find("content")->string_value(), "Once upon a time");

  const auto bad_id = Post("/detokenize", "{\"tokens\": [1, 99999]}");
  EXPECT_EQ(bad_id.status, 400);
  EXPECT_THAT(bad_id.body, HasSubstr("tokens[1]"));
  EXPECT_THAT(Post("/tokenize", "{}").body, HasSubstr("content: required string"));
  EXPECT_EQ(Post("/tokenize", "{\"content\": \"x\", \"model\": \"nosuch@file\"}").status, 404);
  EXPECT_EQ(Post("/tokenize", "{\"content\": \"x\", \"model\": \"s260k@file\"}").status, 200);

  const auto health = HttpRequest(port_, "GET", "/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(health.body, "{\"status\":\"ok\"}");
}

TEST(ChatServerTest, TokenizeNeedsAModelWhenTheServerHoldsSeveral) {
  if (!std::filesystem::exists(kStories)) GTEST_SKIP() << kStories << " not present";
  const std::string dir = TempDir("chat-two");
  ServerProcess server(dir, {"--model", "a=" + kStories + ",b=" + kStories, "--tokenizer", kTok512});
  const auto none = HttpRequest(server.http_port(), "POST", "/tokenize", "{\"content\": \"x\"}");
  EXPECT_EQ(none.status, 400);
  EXPECT_THAT(none.body, HasSubstr("model: required when the server holds 2 models"));
  EXPECT_EQ(HttpRequest(server.http_port(), "POST", "/tokenize", "{\"content\": \"x\", \"model\": \"b@file\"}").status, 200);
}

// A GGUF file carrying tokenizer.chat_template (and its vocabulary): the server renders chats with that template.
TEST(ChatServerTest, ModelWithItsOwnTemplate) {
  if (!std::filesystem::exists(kStories)) GTEST_SKIP() << kStories << " not present";
  const std::string dir = TempDir("chat-gguf");
  auto model = formats::LoadModel(kStories);
  ASSERT_TRUE(model.ok()) << model.status();
  auto vocab = ReadVocabFile(kTok512, model->config.vocab_size);
  ASSERT_TRUE(vocab.ok()) << vocab.status();
  model->vocab = *vocab;
  // Llama 2's [INST] convention, short enough for stories260K's context, with its alternation check.
  model->metadata[formats::kChatTemplateKey] =
      "{{ bos_token }}{% for message in messages %}"
      "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
      "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
      "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}";
  const std::string path = dir + "/s260k-chat.gguf";
  ASSERT_TRUE(formats::WriteGguf(*model, path).ok());
  ServerProcess server(dir, {"--model", "inst=" + path});
  const int port = server.http_port();
  const auto r = HttpRequest(port, "POST", "/v1/chat/completions",
                             ChatBody("inst@file", R"([{"role": "user", "content": "  Tell a story  "}])", "\"max_tokens\": 4"));
  ASSERT_EQ(r.status, 200) << r.body << server.log();
  // The leading bos_token is the BOS token, not its spelling; the rest is the template's text.
  auto tokenizer = TokenizerFromVocab(*vocab);
  ASSERT_TRUE(tokenizer.ok());
  EXPECT_EQ(Member(Parse(r.body), "usage.prompt_tokens"),
            static_cast<int64_t>((*tokenizer)->Encode("[INST] Tell a story [/INST]", true)->size()));
  // eos_token between turns is the EOS token too (its spelling would be 4+ text tokens): BOS, the first turns'
  // text, EOS, then the last turn's text, each text piece encoded on its own.
  const auto turns = HttpRequest(port, "POST", "/v1/chat/completions",
                                 ChatBody("inst@file",
                                          R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                              {"role": "user", "content": "More"}])",
                                          "\"max_tokens\": 2"));
  ASSERT_EQ(turns.status, 200) << turns.body;
  const size_t expected = 1 + (*tokenizer)->Encode("[INST] Hi [/INST] Hello ", false)->size() + 1 +
                          (*tokenizer)->Encode("[INST] More [/INST]", false)->size();
  EXPECT_EQ(Member(Parse(turns.body), "usage.prompt_tokens"), static_cast<int64_t>(expected));
  const auto raised = HttpRequest(port, "POST", "/v1/chat/completions",
                                  ChatBody("inst@file", R"([{"role": "assistant", "content": "x"}])"));
  EXPECT_EQ(raised.status, 400);
  EXPECT_THAT(raised.body, HasSubstr("messages: chat template: line 1"));
  EXPECT_THAT(raised.body, HasSubstr("roles must alternate"));
}

// The official openai npm client against the server: tests/openai/chat_client.mjs. Optional dependency
// (scripts/install-node-deps.sh); skipped without node or without tests/openai/node_modules/openai.
TEST_F(ChatTest, OpenAiNpmClient) {
  const std::string script_dir = std::string(QFORGE_SOURCE_DIR) + "/tests/openai";
  if (!std::filesystem::exists(script_dir + "/node_modules/openai/package.json")) {
    GTEST_SKIP() << "openai npm client not installed (bash scripts/install-node-deps.sh)";
  }
  if (std::system("node --version > /dev/null 2>&1") != 0) GTEST_SKIP() << "node not found";
  const std::string out = dir_ + "/openai-client.out";
  const std::string cmd = "cd " + script_dir + " && QFORGE_BASE_URL=http://127.0.0.1:" + std::to_string(port_) +
                          " QFORGE_MODEL=s260k@file node chat_client.mjs > " + out + " 2>&1";
  const int status = std::system(cmd.c_str());
  const std::string output = testing::ReadFile(out);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << output;
  const Json summary = Parse(output);
  EXPECT_GT(Member(summary, "usage.completion_tokens"), 0);
  EXPECT_GE(Member(summary, "chunks"), 3);
}

}  // namespace
}  // namespace qforge
