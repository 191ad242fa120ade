// Runs the real `qforge` binary: exit codes, one-line errors, and the main commands on stories260K.
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/formats/formats.h"
#include "core/lora/lora.h"
#include "core/model/ggml_types.h"
#include "gtest/gtest.h"

namespace {

struct Result {
  int exit_code;
  std::string out;
  std::string err;
};

// Runs qforge with `args` (a shell-quoted string), capturing stdout and stderr.
Result RunQforge(const std::string& args) {
  // ctest runs each test case as its own process, in parallel: the capture files must not collide.
  const std::string stem = absl::StrCat(::testing::TempDir(), "/qforge_cli_", getpid(), "_",
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
  const std::string out_path = stem + ".out", err_path = stem + ".err";
  const std::string cmd = absl::StrCat(QFORGE_CLI_PATH, " ", args, " >", out_path, " 2>", err_path);
  const int status = std::system(cmd.c_str());
  auto slurp = [](const std::string& p) {
    std::ifstream in(p);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), slurp(out_path), slurp(err_path)};
}

const std::string kStories = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";

bool HaveStories() { return std::filesystem::exists(kStories); }

void ExpectOneLineError(const Result& r, int code, const std::string& needle) {
  EXPECT_EQ(r.exit_code, code) << r.err;
  EXPECT_TRUE(absl::StartsWith(r.err, "qforge: error: ")) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, needle)) << "expected '" << needle << "' in: " << r.err;
}

// Two files of one model tensor for tensor: every tensor of `plain` is in `other` with the same type, and its bytes
// are the same exactly where same(name, tensor) says they should be.
void ExpectSameBytesWhere(const std::string& plain, const std::string& other,
                          const std::function<bool(const std::string&, const qforge::Tensor&)>& same) {
  auto a = qforge::formats::LoadModel(plain);
  auto b = qforge::formats::LoadModel(other);
  ASSERT_TRUE(a.ok() && b.ok());
  for (const auto& [name, t] : a->tensors) {
    const qforge::Tensor* g = b->Find(name);
    ASSERT_NE(g, nullptr) << name;
    EXPECT_EQ(g->format.type, t.format.type) << name;
    EXPECT_EQ(t.nbytes == g->nbytes && std::memcmp(t.data, g->data, t.nbytes) == 0, same(name, t)) << name;
  }
}

TEST(Cli, UsageErrorsExitTwoWithOneLine) {
  ExpectOneLineError(RunQforge(""), 2, "no command");
  ExpectOneLineError(RunQforge("frobnicate"), 2, "unknown command 'frobnicate'");
  ExpectOneLineError(RunQforge("inspect"), 2, "usage: qforge inspect");
  ExpectOneLineError(RunQforge("inspect a b"), 2, "usage: qforge inspect");
  ExpectOneLineError(RunQforge("inspect --bogus x"), 2, "unknown flag --bogus");
  ExpectOneLineError(RunQforge("quantize --method rtn --bits 99 a b.gguf"), 2, "--bits");
  ExpectOneLineError(RunQforge("quantize --method nosuch in out.gguf"), 2, "nosuch");
  ExpectOneLineError(RunQforge("generate model --max-tokens -5 --prompt x"), 2, "--max-tokens");
}

TEST(Cli, HelpListsEveryCommand) {
  Result r = RunQforge("help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* c : {"inspect", "quantize", "generate", "eval", "convert", "compare", "methods"}) {
    EXPECT_TRUE(absl::StrContains(r.out, c)) << c;
  }
}

TEST(Cli, BadFilesFailWithOneLine) {
  const std::string dir = ::testing::TempDir();
  ExpectOneLineError(RunQforge("inspect /nonexistent/model.gguf"), 1, "/nonexistent/model.gguf");
  const std::string junk = dir + "/junk.gguf";
  {
    std::ofstream f(junk, std::ios::binary);
    f << "GGUF\x03\x00\x00\x00 this is not a real gguf file";
  }
  Result r = RunQforge("inspect " + junk);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(r.err, "qforge: error: ")) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(Cli, InspectStories) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  Result r = RunQforge("inspect " + kStories);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "dim=64 hidden=172 layers=5 heads=8 kv_heads=4 vocab=512 seq_len=512"))
      << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "tied-classifier")) << r.out;
}

TEST(Cli, MakeLoraWritesAdaptersTheServerCanRead) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string dir = absl::StrCat(::testing::TempDir(), "/qforge_cli_lora_", getpid());
  Result g = RunQforge("make-lora " + kStories + " " + dir + "/a.gguf --rank 4 --targets q,v,down");
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_TRUE(absl::StrContains(g.out, "15 matrices, rank 4")) << g.out;  // 3 targets x 5 layers
  Result p = RunQforge("make-lora " + kStories + " " + dir + "/peft --rank 2");
  ASSERT_EQ(p.exit_code, 0) << p.err;
  auto base = qforge::formats::LoadModel(kStories);
  ASSERT_TRUE(base.ok());
  auto a = qforge::lora::LoadAdapter(dir + "/a.gguf", base->config);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->matrices.size(), 15u);
  EXPECT_EQ(a->format, "gguf");
  auto peft = qforge::lora::LoadAdapter(dir + "/peft", base->config);
  ASSERT_TRUE(peft.ok()) << peft.status();
  EXPECT_EQ(peft->matrices.size(), 35u);
  EXPECT_EQ(peft->max_rank(), 2);
  ExpectOneLineError(RunQforge("make-lora " + kStories + " " + dir + "/x.gguf --targets q,lm_head"), 2, "lm_head");
  std::filesystem::remove_all(dir);
}

TEST(Cli, QuantizeInspectEvalGenerate) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string out = ::testing::TempDir() + "/s260k-q8.gguf";
  Result q = RunQforge("quantize --method q8_0 " + kStories + " " + out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  Result i = RunQforge("inspect " + out);
  ASSERT_EQ(i.exit_code, 0) << i.err;
  EXPECT_TRUE(absl::StrContains(i.out, "q8_0")) << i.out;
  Result e = RunQforge("eval " + out + " --base " + kStories + " --streams 2 --stream-len 64 --seed 3");
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_TRUE(absl::StrContains(e.out, "KL")) << e.out;
  EXPECT_TRUE(absl::StrContains(e.out, "top-1")) << e.out;
  // Real text, cut to its first windows as llama-perplexity's --chunks: 3 windows of 32 tokens predict 3 x 31.
  const std::string text = std::string(QFORGE_SHARED_DIR) + "/data/tinystories-eval.txt";
  if (std::filesystem::exists(text)) {
    Result t = RunQforge("eval " + out + " --base " + kStories + " --text " + text +
                         " --window 32 --chunks 3 --streams 0");
    ASSERT_EQ(t.exit_code, 0) << t.err;
    EXPECT_TRUE(absl::StrContains(t.out, "(93 tokens)")) << t.out;
    // fp32 activations (the reference) multiply other numbers than the default 8-bit blocks: the base's line
    // (f32 weights, no integer kernel) is the same, the Q8_0 file's KL is not.
    Result f = RunQforge("eval " + out + " --base " + kStories + " --text " + text +
                         " --window 32 --chunks 3 --streams 0 --activations float");
    ASSERT_EQ(f.exit_code, 0) << f.err;
    auto line = [](const std::string& s, const char* needle) {
      for (absl::string_view l : absl::StrSplit(s, '\n')) {
        if (absl::StrContains(l, needle)) return std::string(l);
      }
      return std::string();
    };
    EXPECT_NE(line(t.out, "KL("), "");
    EXPECT_NE(line(t.out, "KL("), line(f.out, "KL("));
    const std::string base_ppl = line(t.out, "perplexity base");
    EXPECT_EQ(base_ppl.substr(0, base_ppl.find("model")), line(f.out, "perplexity base").substr(0, base_ppl.find("model")));
  }
  ExpectOneLineError(RunQforge("eval " + out + " --activations int4"), 2, "--activations");
  // The file carries tok512 (found beside the checkpoint), so generation prints the card's opening words.
  Result g = RunQforge("generate " + out + " --max-tokens 8 --temperature 0");
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_TRUE(absl::StartsWith(g.out, "Once upon a time")) << g.out;
}

// llama-quantize's Q4_K_M preset through the CLI: the GGUF holds q6_k for output.weight and for attn_v /
// ffn_down of layers 0, 3, 6, 7 of 8 (use_more_bits), q4_k everywhere else (token_embd included), f32 norms;
// --pure gives the base type alone.
TEST(Cli, QuantizeWithLlamaPreset) {
  const std::string dir = ::testing::TempDir();
  const std::string in = dir + "/preset-in.gguf", out = dir + "/preset-q4_k_m.gguf", pure = dir + "/preset-pure.gguf";
  Result m = RunQforge("make-synthetic " + in + " --dim 256 --hidden 768 --layers 8 --heads 4 --kv-heads 2 --vocab 512");
  ASSERT_EQ(m.exit_code, 0) << m.err;
  Result q = RunQforge("quantize --method q4_k_m " + in + " " + out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  auto model = qforge::formats::LoadModel(out);
  ASSERT_TRUE(model.ok()) << model.status();
  auto type = [&](const std::string& name) {
    const qforge::Tensor* t = model->Find(name);
    return t == nullptr ? std::string("missing") : std::string(qforge::FindGgmlType(t->format.type)->name);
  };
  for (int l = 0; l < 8; ++l) {
    const std::string blk = absl::StrCat("blk.", l, ".");
    const bool more = l == 0 || l == 3 || l == 6 || l == 7;
    EXPECT_EQ(type(blk + "attn_v.weight"), more ? "q6_k" : "q4_k") << l;
    EXPECT_EQ(type(blk + "ffn_down.weight"), more ? "q6_k" : "q4_k") << l;
    EXPECT_EQ(type(blk + "attn_q.weight"), "q4_k") << l;
    EXPECT_EQ(type(blk + "ffn_up.weight"), "q4_k") << l;
    EXPECT_EQ(type(blk + "attn_norm.weight"), "f32") << l;
  }
  EXPECT_EQ(type("output.weight"), "q6_k");
  EXPECT_EQ(type("token_embd.weight"), "q4_k");
  Result p = RunQforge("quantize --method q6_k --pure " + in + " " + pure);
  ASSERT_EQ(p.exit_code, 0) << p.err;
  auto pure_model = qforge::formats::LoadModel(pure);
  ASSERT_TRUE(pure_model.ok()) << pure_model.status();
  EXPECT_EQ(pure_model->Find("blk.3.attn_v.weight")->format.type, qforge::WeightType::kQ6_K);
  EXPECT_EQ(pure_model->Find("token_embd.weight")->format.type, qforge::WeightType::kF32);  // --pure: linear weights only
  Result list = RunQforge("methods");
  EXPECT_TRUE(absl::StrContains(list.out, "q4_k_m")) << list.out;
  EXPECT_TRUE(absl::StrContains(list.out, "q6_k")) << list.out;
}

// --method gptq --ggml-type: GPTQ onto a ggml type, or onto a preset's per-tensor types. The Q4_K_M file has the
// preset's types tensor for tensor (the same as the plain preset's file), its linear weights differ from the plain
// encoder's (the feedback moved codes), the untied token embeddings are the plain q4_k bytes (no calibration sees a
// lookup), and the report names the gptq_ methods. A wrong pairing is a usage error naming the flag.
TEST(Cli, QuantizeGptqOntoGgmlTypes) {
  const std::string dir = ::testing::TempDir();
  const std::string in = dir + "/gptq-ggml-in.gguf", plain = dir + "/gptq-ggml-plain.gguf",
                    out = dir + "/gptq-ggml-q4_k_m.gguf";
  Result m = RunQforge("make-synthetic " + in + " --dim 256 --hidden 512 --layers 2 --heads 4 --kv-heads 2 --vocab 512");
  ASSERT_EQ(m.exit_code, 0) << m.err;
  ASSERT_EQ(RunQforge("quantize --method q4_k_m " + in + " " + plain).exit_code, 0);
  Result q = RunQforge("quantize --method gptq --ggml-type q4_k_m --calib-streams 4 --calib-len 32 " + in + " " + out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(absl::StrContains(q.out, "gptq_q4_k")) << q.out;
  EXPECT_TRUE(absl::StrContains(q.out, "gptq_q6_k")) << q.out;
  ExpectSameBytesWhere(plain, out, [](const std::string& name, const qforge::Tensor& t) {
    return name == "token_embd.weight" || t.format.type == qforge::WeightType::kF32;
  });
  ExpectOneLineError(RunQforge("quantize --method rtn --ggml-type q4_k " + in + " " + out), 2, "--ggml-type");
  ExpectOneLineError(RunQforge("quantize --method gptq --ggml-type q8_0 " + in + " " + out), 2, "--ggml-type");
}

// --imatrix: llama-imatrix's file (here written by qforge's writer, byte for byte its layout) weights the K-quants'
// fits: every matrix it names differs from the plain encoding, the rest (token embeddings, norms) are the plain
// bytes, and the report says how many it weighted. Misuse is one line naming the flag or the file's fault.
TEST(Cli, QuantizeWithImatrix) {
  const std::string dir = ::testing::TempDir();
  const std::string in = dir + "/imatrix-in.gguf", plain = dir + "/imatrix-plain.gguf",
                    out = dir + "/imatrix-q4_k.gguf", imatrix = dir + "/imatrix.gguf";
  Result m = RunQforge("make-synthetic " + in + " --dim 256 --hidden 512 --layers 2 --heads 4 --kv-heads 2 --vocab 512");
  ASSERT_EQ(m.exit_code, 0) << m.err;
  auto model = qforge::formats::LoadModel(in);
  ASSERT_TRUE(model.ok()) << model.status();
  qforge::formats::ImportanceMatrix im;
  im.chunk_count = 1;
  im.chunk_size = 64;
  int weighted = 0;
  for (const auto& [name, t] : model->tensors) {
    if (!absl::StartsWith(name, "blk.") || t.shape.size() != 2) continue;
    qforge::formats::ImportanceMatrix::Entry e{.cols = t.cols(), .experts = 1, .sum_squares = {}, .tokens = {64}};
    for (int64_t c = 0; c < t.cols(); ++c) e.sum_squares.push_back(static_cast<float>(1 + (c * 7919) % 97));
    im.entries.emplace(name, std::move(e));
    ++weighted;
  }
  ASSERT_GT(weighted, 0);
  ASSERT_TRUE(qforge::formats::WriteImatrixGguf(im, imatrix).ok());
  ASSERT_EQ(RunQforge("quantize --method q4_k " + in + " " + plain).exit_code, 0);
  Result q = RunQforge("quantize --method q4_k --imatrix " + imatrix + " " + in + " " + out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(absl::StrContains(q.out, absl::StrCat("imatrix: ", weighted, " of ", weighted))) << q.out;
  ExpectSameBytesWhere(plain, out,
                       [&](const std::string& name, const qforge::Tensor&) { return im.entries.count(name) == 0; });
  ExpectOneLineError(RunQforge("quantize --method gptq_q4_k --imatrix " + imatrix + " " + in + " " + out), 2,
                     "--imatrix");
  ExpectOneLineError(RunQforge("quantize --method q4_k --imatrix " + in + " " + in + " " + out), 1, "general.type");
  // Every type qforge writes has a weighted fit (q8_0's is its plain one, as in ggml).
  for (const char* type : {"q4_1", "iq4_xs", "q8_0"}) {
    Result t = RunQforge(absl::StrCat("quantize --method ", type, " --imatrix ", imatrix, " ", in, " ", out));
    EXPECT_EQ(t.exit_code, 0) << type << ": " << t.err;
  }
}

// qforge imatrix: llama-imatrix's file from qforge's calibration, one entry per matrix with every calibration
// token counted, which quantize --imatrix then weighs with (llama-quantize reads it too: docs/calibrated.md).
TEST(Cli, ImatrixFromCalibration) {
  const std::string dir = ::testing::TempDir();
  const std::string in = dir + "/imatrix-cal-in.gguf", imatrix = dir + "/imatrix-cal.gguf",
                    out = dir + "/imatrix-cal-q4_k.gguf", moe = dir + "/imatrix-cal-moe.gguf";
  ASSERT_EQ(RunQforge("make-synthetic " + in + " --dim 256 --hidden 512 --layers 2 --heads 4 --kv-heads 2 --vocab 512")
                .exit_code,
            0);
  Result r = RunQforge("imatrix " + in + " " + imatrix + " --calib-streams 4 --calib-len 32 --window 32");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto im = qforge::formats::ReadImatrixGguf(imatrix);
  ASSERT_TRUE(im.ok()) << im.status();
  auto model = qforge::formats::LoadModel(in);
  ASSERT_TRUE(model.ok());
  int matrices = 0;
  for (const auto& [name, t] : model->tensors) {
    if (!absl::StartsWith(name, "blk.") || t.shape.size() != 2) continue;
    ++matrices;
    ASSERT_TRUE(im->entries.count(name)) << name;
    const auto& e = im->entries.at(name);
    EXPECT_EQ(e.cols, t.cols()) << name;
    EXPECT_EQ(e.tokens, std::vector<float>{128}) << name;
    double sum = 0;
    for (float v : e.sum_squares) {
      EXPECT_GE(v, 0) << name;
      sum += v;
    }
    EXPECT_GT(sum, 0) << name;
  }
  EXPECT_EQ(im->chunk_size, 32);
  EXPECT_EQ(im->chunk_count, 4);
  // The q/k/v matrices read the same activations: the same entry values.
  EXPECT_EQ(im->entries.at("blk.0.attn_q.weight").sum_squares, im->entries.at("blk.0.attn_v.weight").sum_squares);
  Result q = RunQforge("quantize --method q4_k --imatrix " + imatrix + " " + in + " " + out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(absl::StrContains(q.out, absl::StrCat("imatrix: ", im->entries.size(), " of ", im->entries.size())))
      << q.out;
  EXPECT_GE(static_cast<int>(im->entries.size()), matrices);
  // A Mixture of Experts: each layer's expert matrices stacked into llama.cpp's ffn_*_exps entry, one row and one
  // count per expert (the tokens routed to it: every token goes to 2 of the 4), which quantize --imatrix splits
  // back onto the experts' matrices.
  ASSERT_EQ(RunQforge("make-synthetic " + moe + " --dim 64 --hidden 128 --layers 1 --vocab 512 --experts 4 "
                      "--experts-used 2")
                .exit_code,
            0);
  const std::string moe_imatrix = dir + "/imatrix-cal-moe-im.gguf";
  Result rm = RunQforge("imatrix " + moe + " " + moe_imatrix + " --calib-streams 2 --calib-len 8 --window 8");
  ASSERT_EQ(rm.exit_code, 0) << rm.err;
  auto moe_im = qforge::formats::ReadImatrixGguf(moe_imatrix);
  ASSERT_TRUE(moe_im.ok()) << moe_im.status();
  for (const char* stacked : {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"}) {
    ASSERT_TRUE(moe_im->entries.count(stacked)) << stacked;
    const auto& e = moe_im->entries.at(stacked);
    EXPECT_EQ(e.experts, 4) << stacked;
    EXPECT_EQ(e.cols, std::string(stacked).find("down") != std::string::npos ? 128 : 64) << stacked;
    float routed = 0;
    for (float n : e.tokens) routed += n;
    EXPECT_EQ(routed, 2 * 16) << stacked;
    EXPECT_EQ(e.sum_squares.size(), static_cast<size_t>(4 * e.cols)) << stacked;
  }
  EXPECT_FALSE(moe_im->entries.count("blk.0.ffn_down.0.weight")) << "experts are stacked, not one entry each";
  Result qm = RunQforge("quantize --method q4_0 --imatrix " + moe_imatrix + " " + moe + " " + dir + "/imatrix-moe-q4_0.gguf");
  ASSERT_EQ(qm.exit_code, 0) << qm.err;
  // 8 entries: 4 attention matrices, the router, 3 stacked; 17 matrices: the stacks split into 3 x 4 experts.
  EXPECT_TRUE(absl::StrContains(qm.out, "imatrix: 8 of 8 entries weight 17 of the model's matrices")) << qm.out;
  // Another model's experts (the same shapes, 8 of them) are refused, not applied to the first four.
  const std::string moe8 = dir + "/imatrix-cal-moe8.gguf";
  ASSERT_EQ(RunQforge("make-synthetic " + moe8 + " --dim 64 --hidden 128 --layers 1 --vocab 512 --experts 8 "
                      "--experts-used 2")
                .exit_code,
            0);
  ExpectOneLineError(RunQforge("quantize --method q4_0 --imatrix " + moe_imatrix + " " + moe8 + " " + dir +
                               "/imatrix-moe8.gguf"),
                     1, "stacks 4 experts, the model has 8");
  ExpectOneLineError(RunQforge("imatrix " + in + " " + dir + "/imatrix.dat"), 2, "must end in .gguf");
}

// compare decodes both files' tensors to fp32: a model against itself in another container is bit-identical;
// against its Q8_0 quantization every linear weight differs (exit 1, one DIFFER line each).
TEST(Cli, CompareDecodedTensors) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string f32 = ::testing::TempDir() + "/s260k-cmp-f32.gguf";
  const std::string q8 = ::testing::TempDir() + "/s260k-cmp-q8.gguf";
  ASSERT_EQ(RunQforge("convert " + kStories + " " + f32).exit_code, 0);
  ASSERT_EQ(RunQforge("quantize --method q8_0 " + kStories + " " + q8).exit_code, 0);
  Result same = RunQforge("compare " + kStories + " " + f32 + " --quiet");
  EXPECT_EQ(same.exit_code, 0) << same.err;
  EXPECT_TRUE(absl::StrContains(same.out, "0 differ, 0 missing")) << same.out;
  Result differ = RunQforge("compare " + f32 + " " + q8);
  EXPECT_EQ(differ.exit_code, 1) << differ.out;
  EXPECT_TRUE(absl::StrContains(differ.out, "DIFFER   blk.0.attn_q.weight (f32 / q8_0)")) << differ.out;
  EXPECT_TRUE(absl::StrContains(differ.out, "same     blk.0.attn_norm.weight (f32 / f32)")) << differ.out;
  ExpectOneLineError(RunQforge("compare " + f32), 2, "usage: qforge compare");
}

// convert --type: bf16 matrices with f32 norms, then back to f32 with the bf16 values exactly (compare decodes both).
TEST(Cli, ConvertChangesTheFloatType) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string bf16 = ::testing::TempDir() + "/s260k-type-bf16.gguf";
  const std::string f32 = ::testing::TempDir() + "/s260k-type-f32.gguf";
  ASSERT_EQ(RunQforge("convert " + kStories + " " + bf16 + " --type bf16").exit_code, 0);
  ASSERT_EQ(RunQforge("convert " + bf16 + " " + f32 + " --type f32").exit_code, 0);
  Result r = RunQforge("compare " + bf16 + " " + f32);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "same     blk.0.attn_q.weight (bf16 / f32)")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "same     blk.0.attn_norm.weight (f32 / f32)")) << r.out;
  Result lossy = RunQforge("compare " + kStories + " " + bf16);
  EXPECT_EQ(lossy.exit_code, 1) << lossy.out;
  EXPECT_TRUE(absl::StrContains(lossy.out, "DIFFER   blk.0.attn_q.weight (f32 / bf16)")) << lossy.out;
  ExpectOneLineError(RunQforge("convert " + kStories + " " + f32 + " --type q4"), 2, "--type 'q4'");
}

// Every file qforge writes carries the vocabulary: safetensors as tokenizer.model beside it, GGUF inside. A
// source without one cannot become a GGUF (llama.cpp would refuse it) until --tokenizer gives it one.
TEST(Cli, OutputsCarryTheTokenizer) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string dir = ::testing::TempDir() + "/carry";
  std::filesystem::create_directories(dir + "/st");
  const std::string st = dir + "/st/model.safetensors";
  Result q = RunQforge("quantize --method rtn --bits 4 --group 32 " + kStories + " " + st);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(std::filesystem::exists(dir + "/st/tokenizer.model"));
  Result g = RunQforge("generate " + st + " --max-tokens 8 --temperature 0");
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_TRUE(absl::StartsWith(g.out, "Once upon a time")) << g.out;

  const std::string bare = dir + "/stories260K.bin";  // the checkpoint alone, without tok512.bin
  std::filesystem::copy_file(kStories, bare, std::filesystem::copy_options::overwrite_existing);
  ExpectOneLineError(RunQforge("quantize --method q8_0 " + bare + " " + dir + "/bare.gguf"), 1, "no vocabulary");
  const std::string tok = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/tok512.bin";
  Result ok = RunQforge("quantize --method q8_0 --tokenizer " + tok + " " + bare + " " + dir + "/bare.gguf");
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
}

}  // namespace

namespace {
TEST(Cli, GptqCalibratesFromSampledStreams) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string out = ::testing::TempDir() + "/s260k-gptq.safetensors";
  Result q = RunQforge("quantize --method gptq --bits 4 --group 0 --act-order --calib-streams 4 --calib-len 64 " +
                       kStories + " " + out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(absl::StrContains(q.out, "calibration: 4 streams x 64 tokens")) << q.out;
  EXPECT_TRUE(absl::StrContains(q.out, "qint4_pc_sym")) << q.out;
  Result i = RunQforge("inspect " + out);
  ASSERT_EQ(i.exit_code, 0) << i.err;
  EXPECT_TRUE(absl::StrContains(i.out, "qint4_pc_sym")) << i.out;
  ExpectOneLineError(RunQforge("quantize --method gptq --damp -1 " + kStories + " " + out), 2, "--damp");
  ExpectOneLineError(RunQforge("quantize --method gptq --calib-len 100000 " + kStories + " " + out), 2,
                     "--calib-len");
}

// --calib-sequential: the same streams, block i calibrated on the quantized blocks < i, so the file differs from
// the one-pass one; without a calibrated method it is a usage error.
TEST(Cli, SequentialCalibrationChangesTheResult) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string one_pass = ::testing::TempDir() + "/s260k-gptq3.safetensors";
  const std::string sequential = ::testing::TempDir() + "/s260k-gptq3-seq.safetensors";
  const std::string args = "quantize --method gptq --bits 3 --group 0 --calib-streams 4 --calib-len 64 ";
  Result a = RunQforge(args + kStories + " " + one_pass);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  Result b = RunQforge(args + "--calib-sequential " + kStories + " " + sequential);
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_TRUE(absl::StrContains(b.out, "calibration: sequential")) << b.out;
  Result c = RunQforge("compare " + one_pass + " " + sequential);
  EXPECT_NE(c.exit_code, 0) << c.out;  // some tensor's bytes differ
  ExpectOneLineError(RunQforge("quantize --method q8_0 --calib-sequential " + kStories + " " + one_pass), 2,
                     "--calib-sequential");
}
}  // namespace

namespace {
TEST(Cli, AwqFoldsScalesThenQuantizes) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string out = ::testing::TempDir() + "/s260k-awq.safetensors";
  Result q = RunQforge("quantize --method awq --bits 4 --group 0 --calib-streams 4 --calib-len 64 " + kStories + " " +
                       out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(absl::StrContains(q.out, "awq: model transform applied")) << q.out;
  Result e = RunQforge("eval " + out + " --base " + kStories + " --streams 2 --stream-len 32");
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_TRUE(absl::StrContains(e.out, "KL")) << e.out;
}
}  // namespace

namespace {
TEST(Cli, SmoothQuantFoldsThenWritesW8A8) {
  if (!HaveStories()) GTEST_SKIP() << kStories << " not present";
  const std::string out = ::testing::TempDir() + "/s260k-smoothquant.safetensors";
  Result q = RunQforge("quantize --method smoothquant --alpha 0.8 --calib-streams 4 --calib-len 64 " + kStories + " " +
                       out);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_TRUE(absl::StrContains(q.out, "smoothquant: model transform applied")) << q.out;
  EXPECT_TRUE(absl::StrContains(q.out, "alpha=0.8")) << q.out;
  Result i = RunQforge("inspect " + out);
  ASSERT_EQ(i.exit_code, 0) << i.err;
  EXPECT_TRUE(absl::StrContains(i.out, "w8a8")) << i.out;
  Result e = RunQforge("eval " + out + " --base " + kStories + " --streams 2 --stream-len 32");
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_TRUE(absl::StrContains(e.out, "KL")) << e.out;
  ExpectOneLineError(RunQforge("quantize --method smoothquant --bits 4 " + kStories + " " + out), 2, "bits");
  ExpectOneLineError(RunQforge("quantize --method smoothquant --alpha 2 " + kStories + " " + out), 2, "--alpha");
}
}  // namespace
