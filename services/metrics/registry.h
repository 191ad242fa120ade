// Metrics for qforge's services in the Prometheus text exposition format, version 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/). prometheus-cpp is not packaged for
// Debian 12, and the format is small: this is all of it that qforge needs (counters, gauges, histograms,
// scrape-time collectors).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace qforge::metrics {

// Label (name, value) pairs. Their order does not matter: a series is identified by the set, and rendered
// with its labels sorted by name.
using Labels = std::vector<std::pair<std::string, std::string>>;

// A value that only goes up. Increments are lock-free (one compare-and-swap loop on an atomic double).
class Counter {
 public:
  Counter() = default;
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  // Negative and NaN increments are ignored: a counter never goes down.
  void Inc(double v = 1);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// A value that goes up and down. Lock-free.
class Gauge {
 public:
  Gauge() = default;
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;

  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double v);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// Counts observations into buckets by upper bound (a value v lands in the first bucket with v <= bound,
// or in the implicit +Inf bucket) and keeps their sum. Observe is lock-free: one atomic increment and one
// atomic add. A scrape racing with observations may see a sum that lags the counts by those observations;
// the count it reports is always the +Inf bucket, as the format requires.
class Histogram {
 public:
  // `bounds`: finite and strictly increasing (Registry::GetHistogram checks).
  explicit Histogram(std::vector<double> bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  // NaN observations are ignored (they would make the sum meaningless).
  void Observe(double v);

  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts, one per bound plus the +Inf bucket last (which is the total count).
  std::vector<uint64_t> CumulativeCounts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  const std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // per bucket, not cumulative; bounds_.size() + 1
  std::atomic<double> sum_{0};
};

// Owns metric families and renders them. Thread-safe. Families are created on first use; the same name and
// label set returns the same object, whose address stays valid for the registry's lifetime, so callers look
// a metric up once and keep the pointer for the hot path.
//
// Errors (absl::StatusOr):
//  - InvalidArgument: a name outside the data model ([a-zA-Z_][a-zA-Z0-9_]*; colons are refused because
//    they are reserved for recording rules, and names starting "__" because they are Prometheus's own), a
//    counter whose name does not end in "_total", an empty help text, a label name that is invalid, starts
//    with "__", repeats, or is "le" on a histogram, label values or help that are not valid UTF-8 (one such
//    value would make Prometheus reject the whole scrape), bucket bounds that are empty, not finite or not
//    strictly increasing (a trailing +Inf is accepted and implied anyway).
//  - AlreadyExists: the name is registered with another type, help text or bucket layout, or one of the
//    sample names it renders (a histogram "x" renders x_bucket, x_sum, x_count) is another family's.
// These are programming errors; callers typically check once at start-up.
class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  absl::StatusOr<Counter*> GetCounter(const std::string& name, const std::string& help, const Labels& labels = {});
  absl::StatusOr<Gauge*> GetGauge(const std::string& name, const std::string& help, const Labels& labels = {});
  absl::StatusOr<Histogram*> GetHistogram(const std::string& name, const std::string& help,
                                          const std::vector<double>& buckets, const Labels& labels = {});

  // Called at the start of every Render, one at a time, for values computed at scrape time (process RSS,
  // power); a collector typically calls GetGauge(...) and Set. It must not call Render.
  void AddCollector(std::function<void(Registry&)> collect);

  // The text format: per family (sorted by name) "# HELP" and "# TYPE" lines, then its series sorted by
  // labels; histograms as _bucket{le=...} lines (cumulative, ending in le="+Inf"), _sum and _count. Values
  // are written as Go's strconv.FormatFloat(v, 'g', -1, 64) writes them, as Prometheus's own client does,
  // so the same bound renders as the same le="..." string everywhere.
  std::string Render();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The content type to serve Render() with.
inline constexpr char kTextContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// `count` bounds start, start*factor, start*factor^2, ...; empty (which GetHistogram refuses) unless
// start > 0, factor > 1 and count >= 1.
std::vector<double> ExponentialBuckets(double start, double factor, int count);

// A sample value (or le bound) as the text format writes it: "+Inf", "-Inf", "NaN", else Go's shortest 'g'
// form ("1", "0.25", "1e+06", "1.5e-05").
std::string FormatValue(double v);

}  // namespace qforge::metrics
