// Single-sequence decode speed of a model in each weight encoding, as a fraction of the machine's memory read
// bandwidth measured in the same run (docs/benchmarks.md, "Decode vs memory bandwidth").
//
// Autoregressive decode of one sequence on the CPU reads every weight once per generated token (plus the KV cache),
// so its ceiling is read bandwidth / bytes read per token. For each thread count this program builds one
// Transformer per encoding with that many threads, prefills a prompt and warms it up, then runs `reps`
// repetitions of:
//   1. `bw-passes` passes of the bandwidth sweep with a pool of that many threads: a read-only sum over a buffer of
//      floats (each thread its own contiguous part), then a memcpy within the same buffer for reference;
//   2. for every encoding in turn, a short re-warm and then `steps` timed Forward calls of one token each (with its
//      logits, greedy next token), always from the end of the prompt, so every repetition reads the same KV
//      positions.
// Interleaving puts the bandwidth passes right before the decodes they are compared with and lets changes in
// the shared machine's load hit all encodings alike. tokens/s is the median over repetitions; the limit that
// "of read BW" divides by is the median read pass of the same thread count.
//
// A plain main, not Google Benchmark: the result is a ratio between different measurements of one run (decode
// bytes/s over the sweep's bytes/s, encodings against each other), the measurements are interleaved across
// repetitions, and the per-encoding model set-up (quantizing an 86 M-parameter model) is done once for all thread
// counts. Google Benchmark measures each benchmark on its own, in sequence, and leaves cross-benchmark ratios to
// post-processing.
//
//   qforge_decode_bench [--dim 1024] [--hidden 2816] [--layers 6] [--heads 16] [--kv-heads 16] [--vocab 4096]
//                       [--seed 1] [--model PATH] [--encodings f32,f16,q8_0,q4_k,q4_0,nf4,rtn4_g128]
//                       [--quantize-embeddings] [--allow-fallback] [--threads 1,2] [--prompt 16] [--warmup 4]
//                       [--steps 16] [--reps 9] [--bw-mib 1024] [--bw-passes 2] [--json FILE|-]
// --model replaces the generated model by a file (a model that fits in the caches gives fractions above 1).
// A method whose blocks do not fit some matrix is skipped with a note; --allow-fallback keeps it instead, with
// those matrices in QuantizeModel's fallback encoding (listed in the "linear weights" column).
// --json writes the results as JSON to FILE ('-': stdout, and the table goes to stderr).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/table_common.h"
#include "core/base/thread_pool.h"
#include "core/formats/formats.h"
#include "core/kernels/kernels.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"

namespace qforge {
namespace {

using bench::Die;
constexpr char kProgram[] = "decode_bench";
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

// ---------------------------------------------------------------------------------------------------------------
// Memory bandwidth.

// Sum of n floats in 32 independent lanes (8 SSE accumulators), so the loop is bound by loads, not by the add
// latency. SSE2 is the x86-64 baseline; at two 16-byte loads per cycle it reads far faster than one core can
// pull from DRAM (it reads 40-50 GB/s from an 8 MiB, L3-resident buffer on the EPYC of docs/benchmarks.md).
float SumFloats(const float* p, size_t n) {
  size_t i = 0;
#if defined(__SSE2__)
  __m128 a[8];
  for (__m128& v : a) v = _mm_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 8; ++k) a[k] = _mm_add_ps(a[k], _mm_loadu_ps(p + i + 4 * k));
  }
  for (int k = 1; k < 8; ++k) a[0] = _mm_add_ps(a[0], a[k]);
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, a[0]);
  float s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#else
  float acc[32] = {};
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 32; ++k) acc[k] += p[i + k];
  }
  float s = 0;
  for (float a : acc) s += a;
#endif
  for (; i < n; ++i) s += p[i];
  return s;
}

// Per-pass bandwidths in GB/s: read = bytes read per second; copy = (bytes read + bytes written) per second.
struct Bandwidth {
  std::vector<double> read, copy;
  double read_gbs() const { return Median(read); }
  double copy_gbs() const { return Median(copy); }
};

std::pair<double, double> MinMax(const std::vector<double>& v) {
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  return {*lo, *hi};
}

class BandwidthProbe {
 public:
  explicit BandwidthProbe(size_t mib) : n_(mib * 1048576 / sizeof(float) / 64 * 64) {
    buf_.reset(static_cast<float*>(std::aligned_alloc(4096, n_ * sizeof(float))));
    if (buf_ == nullptr) {
      std::fprintf(stderr, "%s: cannot allocate %zu MiB for the bandwidth sweep\n", kProgram, mib);
      std::exit(1);
    }
    // Touches every page (so no pass pays for page faults) with values whose sum is exact in fp32 lanes.
    std::fill(buf_.get(), buf_.get() + n_, 0.5f);
  }

  // Each pass: every one of the pool's threads sums its own contiguous 1/threads of the buffer (the read sweep),
  // then every thread memcpys its own part of the buffer's first half into the second half (the copy).
  void Measure(ThreadPool& pool, int passes, Bandwidth* out) {
    const int parts = pool.size();
    std::vector<double> sums(static_cast<size_t>(parts));
    for (int pass = 0; pass < passes; ++pass) {
      const auto t0 = Clock::now();
      pool.ParallelFor(parts, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const size_t lo = n_ * k / parts, hi = n_ * (k + 1) / parts;
          // fp32 lanes over 4 MiB at a time, added up in double: exact for any buffer size.
          double sum = 0;
          for (size_t i = lo; i < hi; i += kSumChunk) sum += SumFloats(buf_.get() + i, std::min(kSumChunk, hi - i));
          sums[k] = sum;
        }
      });
      const auto t1 = Clock::now();
      double total = 0;
      for (double s : sums) total += s;
      if (total != 0.5 * static_cast<double>(n_)) {
        std::fprintf(stderr, "%s: read sweep summed to %.17g, expected %.17g\n", kProgram, total, 0.5 * n_);
        std::exit(1);
      }
      const size_t half = n_ / 2;
      const auto t2 = Clock::now();
      pool.ParallelFor(parts, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const size_t lo = half * k / parts, hi = half * (k + 1) / parts;
          std::memcpy(buf_.get() + half + lo, buf_.get() + lo, (hi - lo) * sizeof(float));
        }
      });
      const auto t3 = Clock::now();
      if (out == nullptr) continue;
      out->read.push_back(static_cast<double>(n_) * sizeof(float) / Seconds(t0, t1) / 1e9);
      out->copy.push_back(2.0 * static_cast<double>(half) * sizeof(float) / Seconds(t2, t3) / 1e9);
    }
  }

 private:
  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };
  static constexpr size_t kSumChunk = size_t{1} << 20;
  size_t n_;
  std::unique_ptr<float, FreeDeleter> buf_;
};

// ---------------------------------------------------------------------------------------------------------------
// Encodings and the bytes a decode step reads.

struct EncodingSpec {
  const char* label;
  const char* method;  // nullptr: the source model as it is (f32)
  int bits = 0, group = 0;
};

const EncodingSpec kEncodings[] = {
    {"f32", nullptr}, {"f16", "f16"}, {"q8_0", "q8_0"}, {"q4_k", "q4_k"},
    {"q4_0", "q4_0"}, {"nf4", "nf4"}, {"rtn4_g128", "rtn", 4, 128},  // the methods' defaults; rtn 4-bit g128 sym
};

// Bytes one decode step at position `pos` reads, from the tensors it touches. With the default model that is
// 58-326 MB per token depending on the encoding, 2-10x a 32 MiB L3, so (nearly) all of it comes from DRAM every
// token: a step streams through it in order, and what it read first is evicted before the next step needs it.
//   - each layer's seven matrices (attn q/k/v/output, ffn gate/up/down): every byte, once (MatMulRows over all
//     rows, n = 1);
//   - the classifier (output.weight, or token_embd.weight when tied): every byte;
//   - the input token's row of token_embd.weight (DequantizeRows of one row): nbytes / rows;
//   - the norm weights, which the Transformer holds decoded to f32: (2 * n_layers + 1) * dim * 4;
//   - the fp32 KV cache: attention at position p reads the keys and the values of positions [0, p] in every
//     layer (the new position's, just written by the K/V matmuls, included): n_layers * 2 * (p + 1) * kv_dim * 4.
//     Query heads that share a kv head (GQA) read the same rows; they are counted once.
// Not counted: activations and scratch, the RoPE row, the logits written (together a few tens of KiB, resident
// in L1/L2), and the K/V bytes written.
struct StepBytes {
  double weights = 0;     // matrices + classifier + embedding row + norms: the same at every position
  double kv_per_pos = 0;  // KV bytes read = kv_per_pos * (pos + 1)
  double At(double pos) const { return weights + kv_per_pos * (pos + 1); }
};

StepBytes DecodeStepBytes(const Model& m) {
  const ModelConfig& c = m.config;
  StepBytes b;
  for (int l = 0; l < c.n_layers; ++l) {
    for (const std::string& name : {names::AttnQ(l), names::AttnK(l), names::AttnV(l), names::AttnOutput(l),
                                    names::FfnGate(l), names::FfnUp(l), names::FfnDown(l)}) {
      b.weights += static_cast<double>(m.tensors.at(name).nbytes);
    }
  }
  const Tensor& embd = m.tensors.at(names::kTokenEmbd);
  b.weights += static_cast<double>((c.tied_embeddings ? embd : m.tensors.at(names::kOutput)).nbytes);
  b.weights += static_cast<double>(embd.nbytes) / static_cast<double>(embd.rows());
  b.weights += (2.0 * c.n_layers + 1) * c.dim * sizeof(float);
  b.kv_per_pos = static_cast<double>(c.n_layers) * 2 * c.kv_dim() * sizeof(float);
  return b;
}

struct Subject {
  std::string label;
  std::string formats;          // the encodings of the linear weights
  double bits_per_weight = 32;  // over the linear weights
  size_t model_bytes = 0;
  std::shared_ptr<const Model> model;
  StepBytes bytes;
};

size_t ModelBytes(const Model& m) {
  size_t b = 0;
  for (const auto& [name, t] : m.tensors) b += t.nbytes;
  return b;
}

// ---------------------------------------------------------------------------------------------------------------
// Decode timing.

struct Options {
  ModelConfig config{.dim = 1024, .hidden_dim = 2816, .n_layers = 6, .n_heads = 16, .n_kv_heads = 16,
                     .vocab_size = 4096, .seq_len = 2048};
  uint64_t seed = 1;
  std::string model_path;
  std::vector<std::string> encodings;
  bool quantize_embeddings = false;
  bool allow_fallback = false;  // keep a method whose blocks do not fit some matrices (they fall back per tensor)
  std::vector<int> threads{1, 2};
  int prompt = 16, warmup = 4, steps = 16, reps = 9;
  size_t bw_mib = 1024;
  int bw_passes = 2;  // per repetition
  std::string json;
};

struct Result {
  int threads = 0;
  const Subject* subject = nullptr;
  double tokens_per_s = 0;  // median over repetitions
  std::vector<double> rep_tokens_per_s;
  double bytes_per_token = 0;  // mean over the timed positions
  double gbs = 0, fraction = 0, speed_vs_f32 = 0;
};

// One Transformer per encoding with the prompt prefilled. Every run decodes from the end of the prompt (Forward at
// start_pos = prompt length overwrites the cache from there on), so all runs read the same KV positions.
class Decoder {
 public:
  Decoder(const Subject& s, const Options& o, const std::vector<int>& prompt, int threads)
      : label_(s.label), prompt_len_(static_cast<int>(prompt.size())) {
    const int need = prompt_len_ + std::max(o.warmup, o.steps);
    auto t = Transformer::Create(s.model, RuntimeOptions{.threads = threads, .max_seq_len = need});
    if (!t.ok()) Die(kProgram, s.label, t.status());
    t_ = std::move(*t);
    logits_.resize(static_cast<size_t>(t_->vocab_size()));
    Check(t_->Forward(prompt, 0, logits_.data(), false));
    first_ = Argmax();
  }

  // Decodes `steps` tokens greedily (Forward of one token with its logits, argmax) from the end of the prompt;
  // returns the seconds it took.
  double Run(int steps) {
    int token = first_;
    const auto t0 = Clock::now();
    for (int i = 0; i < steps; ++i) {
      const int one[1] = {token};
      Check(t_->Forward(one, prompt_len_ + i, logits_.data(), false));
      token = Argmax();
    }
    return Seconds(t0, Clock::now());
  }

 private:
  int Argmax() const { return static_cast<int>(std::max_element(logits_.begin(), logits_.end()) - logits_.begin()); }
  void Check(const absl::Status& s) const {
    if (!s.ok()) Die(kProgram, label_ + " forward", s);
  }

  std::string label_;
  int prompt_len_;
  std::unique_ptr<Transformer> t_;
  std::vector<float> logits_;
  int first_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// Reporting.

std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown";
}

// The SIMD flags of /proc/cpuinfo that matter to the kernels.
std::string CpuFlags() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::vector<std::string> have;
    for (absl::string_view flag : absl::StrSplit(line.substr(line.find(':') + 1), ' ', absl::SkipEmpty())) {
      if (flag == "avx" || flag == "avx2" || flag == "fma" || flag == "f16c" || flag.rfind("avx512", 0) == 0 ||
          flag == "avx_vnni") {
        have.emplace_back(flag);
      }
    }
    if (std::none_of(have.begin(), have.end(), [](const std::string& s) { return s.rfind("avx512", 0) == 0; })) {
      have.emplace_back("(no avx512)");
    }
    return absl::StrJoin(have, " ");
  }
  return "unknown";
}

// The 1-minute load average (/proc/loadavg): how busy the shared machine was.
double LoadAverage() {
  std::ifstream f("/proc/loadavg");
  double one = -1;
  f >> one;
  return one;
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      out += absl::StrFormat("\\u%04x", ch);
      continue;
    }
    out += ch;
  }
  return out + "\"";
}

// ---------------------------------------------------------------------------------------------------------------

[[noreturn]] void Usage(const std::string& why) {
  std::fprintf(stderr,
               "%s: %s\nusage: qforge_decode_bench [--dim N] [--hidden N] [--layers N] [--heads N] [--kv-heads N] "
               "[--vocab N] [--seed N] [--model PATH] [--encodings LIST] [--quantize-embeddings] [--allow-fallback] "
               "[--threads LIST] "
               "[--prompt N] [--warmup N] [--steps N] [--reps N] [--bw-mib N] [--bw-passes N] [--json FILE|-]\n",
               kProgram, why.c_str());
  std::exit(2);
}

int PositiveInt(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x <= 0 || x > (1 << 30)) Usage(flag + " needs a positive integer, got '" + v + "'");
  return static_cast<int>(x);
}

Options ParseFlags(int argc, char** argv) {
  Options o;
  for (const EncodingSpec& e : kEncodings) o.encodings.emplace_back(e.label);
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], v;
    bool has_value = false;
    if (const size_t eq = a.find('='); eq != std::string::npos && a.rfind("--", 0) == 0) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
      has_value = true;
    }
    auto value = [&]() -> std::string {
      if (has_value) return v;
      if (i + 1 >= argc) Usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--dim") o.config.dim = PositiveInt(a, value());
    else if (a == "--hidden") o.config.hidden_dim = PositiveInt(a, value());
    else if (a == "--layers") o.config.n_layers = PositiveInt(a, value());
    else if (a == "--heads") o.config.n_heads = PositiveInt(a, value());
    else if (a == "--kv-heads") o.config.n_kv_heads = PositiveInt(a, value());
    else if (a == "--vocab") o.config.vocab_size = PositiveInt(a, value());
    else if (a == "--seed") o.seed = static_cast<uint64_t>(PositiveInt(a, value()));
    else if (a == "--model") o.model_path = value();
    else if (a == "--quantize-embeddings" && !has_value) o.quantize_embeddings = true;
    else if (a == "--allow-fallback" && !has_value) o.allow_fallback = true;
    else if (a == "--prompt") o.prompt = PositiveInt(a, value());
    else if (a == "--warmup") o.warmup = PositiveInt(a, value());
    else if (a == "--steps") o.steps = PositiveInt(a, value());
    else if (a == "--reps") o.reps = PositiveInt(a, value());
    else if (a == "--bw-mib") o.bw_mib = static_cast<size_t>(PositiveInt(a, value()));
    else if (a == "--bw-passes") o.bw_passes = PositiveInt(a, value());
    else if (a == "--json") o.json = value();
    else if (a == "--threads") {
      o.threads.clear();
      for (absl::string_view t : absl::StrSplit(value(), ',', absl::SkipEmpty())) {
        o.threads.push_back(PositiveInt(a, std::string(t)));
      }
      if (o.threads.empty()) Usage("--threads needs a list such as 1,2");
    } else if (a == "--encodings") {
      o.encodings.clear();
      for (absl::string_view e : absl::StrSplit(value(), ',', absl::SkipEmpty())) {
        const bool known = std::any_of(std::begin(kEncodings), std::end(kEncodings),
                                       [&](const EncodingSpec& s) { return e == s.label; });
        if (!known) Usage("unknown encoding '" + std::string(e) + "' (known: f32,f16,q8_0,q4_k,q4_0,nf4,rtn4_g128)");
        o.encodings.emplace_back(e);
      }
      if (o.encodings.empty()) Usage("--encodings needs a list");
    } else {
      Usage("unknown argument " + std::string(argv[i]));
    }
  }
  o.config.seq_len = std::max(o.config.seq_len, o.prompt + std::max(o.warmup, o.steps));
  return o;
}

int Main(int argc, char** argv) {
  const Options o = ParseFlags(argc, argv);
  // With --json -, stdout carries the JSON alone and the table moves to stderr.
  FILE* table = o.json == "-" ? stderr : stdout;

  // The source model.
  Model source;
  std::string source_title;
  if (o.model_path.empty()) {
    if (absl::Status s = ValidateConfig(o.config); !s.ok()) Usage(std::string(s.message()));
    std::fprintf(stderr, "%s: generating the model...\n", kProgram);
    source = MakeSyntheticModel(o.config, o.seed);
    source_title = absl::StrFormat("generated Llama (MakeSyntheticModel, seed %d)", o.seed);
  } else {
    auto m = formats::LoadModel(o.model_path);
    if (!m.ok()) Die(kProgram, o.model_path, m.status());
    source = std::move(*m);
    source_title = o.model_path;
  }
  const ModelConfig c = source.config;  // a copy: `source` is released once every encoding is made
  if (o.prompt + std::max(o.warmup, o.steps) > c.seq_len) {
    Usage(absl::StrFormat("prompt + steps = %d exceed the model's context %d", o.prompt + std::max(o.warmup, o.steps),
                          c.seq_len));
  }
  int64_t params = 0;
  for (const auto& [name, t] : source.tensors) params += t.numel();
  const size_t source_bytes = ModelBytes(source);

  // Every encoding, quantized once (the pool's size does not change the bytes).
  std::vector<Subject> subjects;
  std::vector<std::string> notes;
  {
    ThreadPool pool(*std::max_element(o.threads.begin(), o.threads.end()));
    auto source_ptr = std::make_shared<const Model>(source);
    for (const EncodingSpec& spec : kEncodings) {
      if (std::find(o.encodings.begin(), o.encodings.end(), spec.label) == o.encodings.end()) continue;
      Subject s;
      s.label = spec.label;
      if (spec.method == nullptr) {
        s.model = source_ptr;
        std::vector<std::string> formats;
        for (const std::string& name : LinearWeightNames(c)) {
          const std::string f = FormatName(source.tensors.at(name).format);
          if (std::find(formats.begin(), formats.end(), f) == formats.end()) formats.push_back(f);
        }
        s.formats = absl::StrJoin(formats, ",");
        if (s.formats != "f32") s.label = "source";  // a file stored in another encoding is measured as it is
        s.bits_per_weight = 0;
        int64_t n = 0;
        for (const std::string& name : LinearWeightNames(c)) {
          s.bits_per_weight += 8.0 * source.tensors.at(name).nbytes;
          n += source.tensors.at(name).numel();
        }
        s.bits_per_weight /= static_cast<double>(n);
      } else {
        std::fprintf(stderr, "%s: quantizing to %s...\n", kProgram, spec.label);
        const quant::QuantMethod* method = quant::FindMethod(spec.method);
        if (method == nullptr) Die(kProgram, spec.label, absl::NotFoundError("no such method"));
        quant::QuantParams p = method->DefaultParams();
        if (spec.bits > 0) p.bits = spec.bits;
        if (spec.group > 0) p.group = spec.group;
        quant::QuantRecipe recipe{.method = spec.method, .params = p, .quantize_embeddings = o.quantize_embeddings};
        auto q = quant::QuantizeModel(source, recipe, &pool);
        if (!q.ok()) Die(kProgram, spec.label, q.status());
        if (!q->report.fallbacks.empty()) {
          const auto it = std::find_if(q->report.tensors.begin(), q->report.tensors.end(),
                                       [](const quant::TensorQuantReport& t) { return t.fell_back; });
          notes.push_back(absl::StrFormat("%s %s: %d of %d matrices do not fit its blocks (e.g. %s: %s)", spec.label,
                                          o.allow_fallback ? "kept with per-tensor fallbacks" : "skipped",
                                          q->report.fallbacks.size(), q->report.tensors.size(), it->name,
                                          it->fallback_reason));
          std::fprintf(stderr, "%s: note: %s\n", kProgram, notes.back().c_str());
          if (!o.allow_fallback) continue;
        }
        std::vector<std::string> formats;
        for (const auto& t : q->report.tensors) {
          if (std::find(formats.begin(), formats.end(), t.format) == formats.end()) formats.push_back(t.format);
        }
        s.formats = absl::StrJoin(formats, ",");
        s.bits_per_weight = q->report.bits_per_weight;
        s.model = std::make_shared<const Model>(std::move(q->model));
      }
      s.model_bytes = ModelBytes(*s.model);
      s.bytes = DecodeStepBytes(*s.model);
      subjects.push_back(std::move(s));
    }
  }
  source = Model();  // the f32 subject keeps its own copy
  if (subjects.empty()) {
    std::fprintf(stderr, "%s: no encoding left to measure\n", kProgram);
    return 1;
  }

  // The prompt: fixed pseudo-random token ids (the weights are random too, so the text does not matter).
  std::vector<int> prompt(static_cast<size_t>(o.prompt));
  std::mt19937 rng(12345);
  for (int& t : prompt) t = static_cast<int>(rng() % static_cast<uint32_t>(c.vocab_size));
  // The timed steps run at positions [prompt, prompt + steps); bytes per token is the mean over them.
  const double mean_pos = o.prompt + (o.steps - 1) / 2.0;

  // Per thread count: one Transformer per encoding (prefilled, warmed up), then `reps` repetitions of
  // [bandwidth passes, then every encoding's timed decode]. Interleaving keeps the bandwidth that the decodes are
  // divided by measured right before them, under the same load on the shared machine.
  const double load_before = LoadAverage();
  BandwidthProbe probe(o.bw_mib);
  struct PerThreads {
    int threads;
    Bandwidth bw;
  };
  std::vector<PerThreads> bandwidth;
  std::vector<Result> results;
  for (int threads : o.threads) {
    std::fprintf(stderr, "%s: %d thread(s): preparing...\n", kProgram, threads);
    ThreadPool pool(threads);
    std::vector<std::unique_ptr<Decoder>> decoders;
    for (const Subject& s : subjects) {
      decoders.push_back(std::make_unique<Decoder>(s, o, prompt, threads));
      decoders.back()->Run(o.warmup);  // first touch of the weights, the pool's threads, the kernels' paths
    }
    probe.Measure(pool, 1, nullptr);  // warm-up pass
    PerThreads pt{threads, {}};
    std::vector<std::vector<double>> tps(subjects.size());
    for (int rep = 0; rep < o.reps; ++rep) {
      probe.Measure(pool, o.bw_passes, &pt.bw);
      for (size_t k = 0; k < subjects.size(); ++k) {
        decoders[k]->Run(std::min(2, o.warmup));  // re-warm after the previous encoding evicted everything
        tps[k].push_back(o.steps / decoders[k]->Run(o.steps));
      }
      std::fprintf(stderr, "%s: %d thread(s): repetition %d/%d done\n", kProgram, threads, rep + 1, o.reps);
    }
    bandwidth.push_back(pt);
    double f32_tps = 0;
    for (size_t k = 0; k < subjects.size(); ++k) {
      Result r;
      r.threads = threads;
      r.subject = &subjects[k];
      r.rep_tokens_per_s = tps[k];
      r.tokens_per_s = Median(tps[k]);
      r.bytes_per_token = subjects[k].bytes.At(mean_pos);
      r.gbs = r.bytes_per_token * r.tokens_per_s / 1e9;
      r.fraction = r.gbs / pt.bw.read_gbs();
      if (subjects[k].label == "f32" || subjects[k].label == "source") f32_tps = r.tokens_per_s;
      results.push_back(r);
    }
    for (Result& r : results) {
      if (r.threads == threads && f32_tps > 0) r.speed_vs_f32 = r.tokens_per_s / f32_tps;
    }
  }

  const double load_after = LoadAverage();

  // The table.
  const std::string date = UtcNow(), cpu = CpuModel(), flags = CpuFlags();
  const char* isa = kernels::IsaName(kernels::ActiveIsa());
  std::fprintf(table, "model: %s: dim %d, hidden %d, %d layers, %d heads / %d kv heads, vocab %d%s; %.1f M params, "
                      "%.1f MB as stored\n",
               source_title.c_str(), c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
               c.tied_embeddings ? " (tied)" : "", params / 1e6, source_bytes / 1e6);
  std::fprintf(table, "embeddings and classifier: %s\n",
               o.quantize_embeddings ? "quantized with the matrices" : "kept as in the source (QuantizeModel default)");
  std::fprintf(table, "decode: prompt %d tokens, then %d steps timed at positions %d..%d (after %d warm-up), median of "
                      "%d repetitions; %s kernels\n",
               o.prompt, o.steps, o.prompt, o.prompt + o.steps - 1, o.warmup, o.reps, isa);
  std::fprintf(table, "date %s; cpu: %s; flags: %s; %u hardware threads; load average %.2f before the measurements, "
                      "%.2f after\n",
               date.c_str(), cpu.c_str(), flags.c_str(), std::thread::hardware_concurrency(), load_before, load_after);
  for (const std::string& n : notes) std::fprintf(table, "note: %s\n", n.c_str());
  for (const PerThreads& b : bandwidth) {
    const auto [rlo, rhi] = MinMax(b.bw.read);
    const auto [clo, chi] = MinMax(b.bw.copy);
    std::fprintf(table, "bandwidth, %d thread(s), %zu MiB buffer, %zu passes (%d before each repetition): "
                        "read %.2f GB/s (median; min %.2f, max %.2f), copy %.2f GB/s (read + write bytes; "
                        "min %.2f, max %.2f)\n",
                 b.threads, o.bw_mib, b.bw.read.size(), o.bw_passes, b.bw.read_gbs(), rlo, rhi, b.bw.copy_gbs(), clo,
                 chi);
  }
  // Aligned, and a Markdown table as it stands.
  std::fprintf(table, "\n| %-7s | %-10s | %-16s | %6s | %8s | %8s | %8s | %6s | %6s | %10s | %6s |\n", "threads",
               "encoding", "linear weights", "bits/w", "MB/token", "tokens/s", "ms/token", "GB/s", "vs f32",
               "of read BW", "spread");
  std::fprintf(table, "|---------|------------|------------------|-------:|---------:|---------:|---------:|-------:|"
                      "-------:|-----------:|-------:|\n");
  for (const Result& r : results) {
    const auto [lo, hi] = MinMax(r.rep_tokens_per_s);
    std::fprintf(table,
                 "| %-7d | %-10s | %-16s | %6.3f | %8.2f | %8.2f | %8.2f | %6.2f | %5.2fx | %9.1f%% | %5.0f%% |\n",
                 r.threads, r.subject->label.c_str(), r.subject->formats.c_str(), r.subject->bits_per_weight,
                 r.bytes_per_token / 1e6, r.tokens_per_s, 1000.0 / r.tokens_per_s, r.gbs, r.speed_vs_f32,
                 100.0 * r.fraction, 100.0 * (hi - lo) / r.tokens_per_s);
  }
  std::fprintf(table, "\n(MB/token: bytes read per decode step, weights + KV cache at the mean timed position; "
                      "GB/s = MB/token x tokens/s; of read BW = GB/s / median read pass of the same thread count; "
                      "spread = (max - min) / median tokens/s over the repetitions)\n");
  std::fflush(table);

  if (!o.json.empty()) {
    std::string j = "{\n";
    j += absl::StrFormat("  \"date\": %s,\n  \"cpu\": %s,\n  \"cpu_flags\": %s,\n  \"isa\": %s,\n", JsonString(date),
                         JsonString(cpu), JsonString(flags), JsonString(isa));
    j += absl::StrFormat("  \"hardware_threads\": %u,\n  \"load_average_before\": %.2f,\n"
                         "  \"load_average_after\": %.2f,\n",
                         std::thread::hardware_concurrency(), load_before, load_after);
    j += absl::StrFormat("  \"model\": {\"source\": %s, \"dim\": %d, \"hidden_dim\": %d, \"n_layers\": %d, "
                         "\"n_heads\": %d, \"n_kv_heads\": %d, \"vocab_size\": %d, \"params\": %d, "
                         "\"quantize_embeddings\": %s},\n",
                         JsonString(source_title), c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                         c.vocab_size, params, o.quantize_embeddings ? "true" : "false");
    j += absl::StrFormat("  \"decode\": {\"prompt\": %d, \"warmup\": %d, \"steps\": %d, \"reps\": %d},\n", o.prompt,
                         o.warmup, o.steps, o.reps);
    j += "  \"notes\": [";
    for (size_t i = 0; i < notes.size(); ++i) j += (i ? ", " : "") + JsonString(notes[i]);
    j += "],\n  \"bandwidth\": [\n";
    for (size_t i = 0; i < bandwidth.size(); ++i) {
      const PerThreads& b = bandwidth[i];
      auto list = [](const std::vector<double>& v) {
        return absl::StrJoin(v, ", ", [](std::string* out, double x) { absl::StrAppendFormat(out, "%.4f", x); });
      };
      j += absl::StrFormat("    {\"threads\": %d, \"buffer_mib\": %d, \"read_gbs\": %.4f, \"copy_gbs\": %.4f, "
                           "\"read_passes_gbs\": [%s], \"copy_passes_gbs\": [%s]}%s\n",
                           b.threads, o.bw_mib, b.bw.read_gbs(), b.bw.copy_gbs(), list(b.bw.read), list(b.bw.copy),
                           i + 1 < bandwidth.size() ? "," : "");
    }
    j += "  ],\n  \"results\": [\n";
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      const Subject& s = *r.subject;
      j += absl::StrFormat("    {\"threads\": %d, \"encoding\": %s, \"linear_formats\": %s, \"bits_per_weight\": %.4f, "
                           "\"model_bytes\": %d, \"weight_bytes_per_token\": %.0f, \"kv_bytes_per_token\": %.0f, "
                           "\"bytes_per_token\": %.0f, \"tokens_per_s\": %.4f, \"ms_per_token\": %.4f, "
                           "\"gbs\": %.4f, \"fraction_of_read_bw\": %.4f, \"speed_vs_f32\": %.4f, "
                           "\"rep_tokens_per_s\": [%s]}%s\n",
                           r.threads, JsonString(s.label), JsonString(s.formats), s.bits_per_weight, s.model_bytes,
                           s.bytes.weights, s.bytes.kv_per_pos * (mean_pos + 1), r.bytes_per_token, r.tokens_per_s,
                           1000.0 / r.tokens_per_s, r.gbs, r.fraction, r.speed_vs_f32,
                           absl::StrJoin(r.rep_tokens_per_s, ", ",
                                         [](std::string* out, double v) { absl::StrAppendFormat(out, "%.4f", v); }),
                           i + 1 < results.size() ? "," : "");
    }
    j += "  ]\n}\n";
    if (o.json == "-") {
      std::fputs(j.c_str(), stdout);
    } else {
      std::ofstream f(o.json);
      f << j;
      if (!f) {
        std::fprintf(stderr, "%s: cannot write %s\n", kProgram, o.json.c_str());
        return 1;
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) { return qforge::Main(argc, argv); }
