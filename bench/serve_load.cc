// Load generator for qforge-server: N concurrent gRPC Generate streams, each running R requests back to back,
// against one loaded model on 127.0.0.1 only. Reports throughput (generated tokens / wall second), time to first
// token and the gaps between tokens (p50 / p99), and failures. Bounded in count (streams x requests) and time
// (--deadline-s per request).
//
//   qforge_serve_load --server 127.0.0.1:7701 --model gen@file --streams 1,8,32 --requests 2 --max-tokens 32
//   qforge_serve_load ... --adapters a1,a2,   (LoRA adapters round-robin over the streams; "" = the base model)
//   qforge_serve_load ... --prompt "$(cat system.txt)" --unique-suffix   (one shared prefix, then " #s.q" per request)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "qforge/v1/inference.grpc.pb.h"
#include "services/cli/flags.h"
#include "services/rpc/rpc_util.h"

namespace {

namespace v1 = qforge::v1;
using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

struct RunResult {
  int streams = 0, requests = 0, failures = 0;
  int64_t tokens = 0;
  double seconds = 0;
  std::vector<double> ttft, gaps;
  std::string first_error;
};

RunResult Run(v1::InferenceService::Stub& stub, const std::string& model, const std::vector<std::string>& adapters,
              int streams, int requests, int max_tokens, const std::string& prompt, bool unique_suffix,
              int deadline_s) {
  RunResult r;
  r.streams = streams;
  std::mutex mu;
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back([&, s] {
      for (int q = 0; q < requests; ++q) {
        v1::GenerateRequest req;
        req.mutable_model()->set_name(model);
        // Stream s uses adapter s mod |adapters| ("" = the base model), so every step mixes them.
        req.set_adapter(adapters[s % adapters.size()]);
        // A shared prompt prefix, different per request only at its end (the prefix-caching load).
        req.set_prompt(unique_suffix ? prompt + " #" + std::to_string(s) + "." + std::to_string(q) : prompt);
        req.set_max_tokens(max_tokens);
        req.set_temperature(1.0f);
        req.set_seed(static_cast<uint64_t>(s * 1000 + q));
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(deadline_s));
        const Clock::time_point sent = Clock::now();
        auto reader = stub.Generate(&ctx, req);
        v1::GenerateResponse msg;
        std::vector<double> gaps;
        double ttft = -1;
        Clock::time_point last = sent;
        int64_t n = 0;
        while (reader->Read(&msg)) {
          if (msg.token_ids_size() == 0) continue;
          const Clock::time_point now = Clock::now();
          if (ttft < 0) {
            ttft = std::chrono::duration<double>(now - sent).count();
          } else {
            gaps.push_back(std::chrono::duration<double>(now - last).count() / msg.token_ids_size());
          }
          last = now;
          n += msg.token_ids_size();
        }
        const grpc::Status st = reader->Finish();
        std::lock_guard<std::mutex> l(mu);
        ++r.requests;
        if (!st.ok()) {
          ++r.failures;
          if (r.first_error.empty()) r.first_error = st.error_message();
          continue;
        }
        r.tokens += n;
        if (ttft >= 0) r.ttft.push_back(ttft);
        r.gaps.insert(r.gaps.end(), gaps.begin(), gaps.end());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  auto flags = qforge::cli::Flags::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                         {"server", "model", "streams", "requests", "max-tokens", "prompt",
                                          "deadline-s", "label", "adapters"},
                                         {"unique-suffix"});
  if (!flags.ok()) {
    std::cerr << "qforge_serve_load: " << flags.status().message() << "\n";
    return 2;
  }
  const std::string server = flags->Get("server", "127.0.0.1:7701");
  if (server.rfind("127.", 0) != 0 && server.rfind("localhost:", 0) != 0 && server.rfind("[::1]", 0) != 0) {
    std::cerr << "qforge_serve_load: loopback addresses only (got " << server << ")\n";
    return 2;
  }
  auto requests = flags->GetInt("requests", 2, 1, 1000);
  auto max_tokens = flags->GetInt("max-tokens", 32, 1, 1 << 16);
  auto deadline = flags->GetInt("deadline-s", 300, 1, 3600);
  if (!requests.ok() || !max_tokens.ok() || !deadline.ok()) {
    std::cerr << "qforge_serve_load: bad --requests / --max-tokens / --deadline-s\n";
    return 2;
  }
  std::vector<int> stream_counts;
  for (const std::string& s : std::vector<std::string>(absl::StrSplit(flags->Get("streams", "1,8,32"), ','))) {
    int n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < 1 || n > 256) {
      std::cerr << "qforge_serve_load: --streams takes counts 1..256\n";
      return 2;
    }
    stream_counts.push_back(n);
  }
  auto stub = v1::InferenceService::NewStub(qforge::rpc::MakeChannel(server));
  const std::string model = flags->Get("model"), label = flags->Get("label", model);
  const std::string prompt = flags->Get("prompt", "Once upon a time");
  // --adapters a,b, : LoRA adapters (loaded with POST /v1/adapters) assigned to streams round-robin; an empty
  // entry is the base model.
  std::vector<std::string> adapters = absl::StrSplit(flags->Get("adapters", ""), ',');
  if (adapters.empty()) adapters.push_back("");
  std::printf("%-12s %7s %8s %8s %10s %10s %10s %10s %10s %8s\n", "model", "streams", "requests", "tokens",
              "tokens/s", "ttft p50", "ttft p99", "tpot p50", "tpot p99", "failed");
  int failures = 0;
  for (int streams : stream_counts) {
    const RunResult r = Run(*stub, model, adapters, streams, *requests, *max_tokens, prompt,
                            flags->GetBool("unique-suffix"), *deadline);
    failures += r.failures;
    std::printf("%-12s %7d %8d %8lld %10.1f %8.1fms %8.1fms %8.1fms %8.1fms %8d\n", label.c_str(), streams, r.requests,
                static_cast<long long>(r.tokens), static_cast<double>(r.tokens) / r.seconds,
                1e3 * Percentile(r.ttft, 0.5), 1e3 * Percentile(r.ttft, 0.99), 1e3 * Percentile(r.gaps, 0.5),
                1e3 * Percentile(r.gaps, 0.99), r.failures);
    if (!r.first_error.empty()) std::printf("  first error: %s\n", r.first_error.c_str());
    std::fflush(stdout);
  }
  return failures == 0 ? 0 : 1;
}
