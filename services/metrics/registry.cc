#include "services/metrics/registry.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qforge::metrics {

void Counter::Inc(double v) {
  if (!(v >= 0)) return;  // also catches NaN
  value_.fetch_add(v, std::memory_order_relaxed);
}

void Gauge::Add(double v) { value_.fetch_add(v, std::memory_order_relaxed); }

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1)) {}

void Histogram::Observe(double v) {
  if (std::isnan(v)) return;
  const size_t bucket = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  if (!(start > 0) || !(factor > 1) || count < 1 || !std::isfinite(start) || !std::isfinite(factor)) return {};
  std::vector<double> out;
  double b = start;
  for (int i = 0; i < count; ++i, b *= factor) out.push_back(b);
  return out;
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  // Go's 'g' with the shortest precision: exponent form when the decimal exponent is < -4 or >= 6 ("if
  // precision was the shortest possible, use precision 6 for this decision"), else plain digits. Both
  // branches use the shortest digits that round-trip, which std::to_chars gives in either notation.
  const auto sci = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const std::string scientific(buf, sci.ptr);
  const size_t e = scientific.find('e');
  const int exponent = std::atoi(scientific.c_str() + e + 1);
  if (exponent < -4 || exponent >= 6) return scientific;
  const auto fixed = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::fixed);
  return std::string(buf, fixed.ptr);
}

namespace {

enum class Type { kCounter, kGauge, kHistogram };

const char* TypeName(Type t) {
  switch (t) {
    case Type::kCounter: return "counter";
    case Type::kGauge: return "gauge";
    case Type::kHistogram: return "histogram";
  }
  return "untyped";
}

bool IsNameStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsNameChar(char c) { return IsNameStart(c) || (c >= '0' && c <= '9'); }

bool ValidName(const std::string& s) {
  if (s.empty() || !IsNameStart(s[0]) || s.rfind("__", 0) == 0) return false;
  return std::all_of(s.begin(), s.end(), IsNameChar);
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF.
bool ValidUtf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const unsigned char c = *p;
    int extra;
    uint32_t cp;
    if (c < 0x80) {
      ++p;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      extra = 1;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      extra = 2;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (end - p <= extra) return false;
    for (int i = 1; i <= extra; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((extra == 2 && cp < 0x800) || (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    p += extra + 1;
  }
  return true;
}

// Label values: backslash, double quote and line feed are escaped. Help: backslash and line feed only.
std::string Escape(const std::string& s, bool quote) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && quote) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

// Renders sorted labels as name="value" pairs joined by commas, without braces.
std::string LabelPairs(const Labels& sorted) {
  std::string out;
  for (const auto& [name, value] : sorted) {
    if (!out.empty()) out += ',';
    absl::StrAppend(&out, name, "=\"", Escape(value, /*quote=*/true), "\"");
  }
  return out;
}

std::string Braced(const std::string& pairs) { return pairs.empty() ? "" : "{" + pairs + "}"; }

struct Series {
  Labels labels;  // sorted by name
  std::unique_ptr<Counter> counter;
  std::unique_ptr<Gauge> gauge;
  std::unique_ptr<Histogram> histogram;
};

struct Family {
  std::string name;
  std::string help;
  Type type;
  std::vector<double> bounds;              // histograms only
  std::map<std::string, Series> series;    // by rendered label pairs, which sorts them for Render
};

// The sample names a family renders; no two families may share one.
std::vector<std::string> SampleNames(const std::string& name, Type type) {
  if (type == Type::kHistogram) return {name, name + "_bucket", name + "_sum", name + "_count"};
  return {name};
}

}  // namespace

struct Registry::State {
  std::mutex mu;  // families and sample_names
  std::map<std::string, Family> families;
  std::map<std::string, std::string> sample_names;  // sample name -> family that renders it

  std::mutex collectors_mu;
  std::vector<std::function<void(Registry&)>> collectors;

  std::mutex render_mu;  // one Render at a time, so collectors need not be reentrant

  // Validates and finds or creates the series; returns it with `mu` held by the caller.
  absl::StatusOr<Series*> Find(const std::string& name, const std::string& help, Type type,
                               const std::vector<double>& bounds, const Labels& labels) {
    if (!ValidName(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric name '", name, "' is not [a-zA-Z_][a-zA-Z0-9_]* or starts with \"__\""));
    }
    if (type == Type::kCounter && !EndsWith(name, "_total")) {
      return absl::InvalidArgumentError(absl::StrCat("counter name '", name, "' must end in _total"));
    }
    if (help.empty()) return absl::InvalidArgumentError(absl::StrCat("metric '", name, "' has no help text"));
    if (!ValidUtf8(help)) return absl::InvalidArgumentError(absl::StrCat("help of '", name, "' is not UTF-8"));
    Labels sorted = labels;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 0; i < sorted.size(); ++i) {
      const std::string& label = sorted[i].first;
      if (!ValidName(label)) {
        return absl::InvalidArgumentError(absl::StrCat("label name '", label, "' of '", name,
                                                       "' is not [a-zA-Z_][a-zA-Z0-9_]* or starts with \"__\""));
      }
      if (i > 0 && sorted[i - 1].first == label) {
        return absl::InvalidArgumentError(absl::StrCat("label '", label, "' repeats on '", name, "'"));
      }
      if (type == Type::kHistogram && label == "le") {
        return absl::InvalidArgumentError(absl::StrCat("histogram '", name, "' cannot have a label 'le'"));
      }
      if (!ValidUtf8(sorted[i].second)) {
        return absl::InvalidArgumentError(absl::StrCat("value of label '", label, "' on '", name, "' is not UTF-8"));
      }
    }

    auto family = families.find(name);
    if (family == families.end()) {
      for (const std::string& sample : SampleNames(name, type)) {
        const auto taken = sample_names.find(sample);
        if (taken != sample_names.end()) {
          return absl::AlreadyExistsError(
              absl::StrCat("metric '", name, "' would render '", sample, "', which '", taken->second, "' renders"));
        }
      }
      for (const std::string& sample : SampleNames(name, type)) sample_names[sample] = name;
      family = families.emplace(name, Family{name, help, type, bounds, {}}).first;
    } else {
      const Family& f = family->second;
      if (f.type != type) {
        return absl::AlreadyExistsError(
            absl::StrCat("metric '", name, "' is a ", TypeName(f.type), ", not a ", TypeName(type)));
      }
      if (f.help != help) {
        return absl::AlreadyExistsError(absl::StrCat("metric '", name, "' is registered with other help text"));
      }
      if (f.bounds != bounds) {
        return absl::AlreadyExistsError(absl::StrCat("histogram '", name, "' is registered with other buckets"));
      }
    }
    std::string key = LabelPairs(sorted);
    auto [it, inserted] = family->second.series.try_emplace(std::move(key));
    Series& series = it->second;
    if (inserted) {
      series.labels = std::move(sorted);
      switch (type) {
        case Type::kCounter: series.counter = std::make_unique<Counter>(); break;
        case Type::kGauge: series.gauge = std::make_unique<Gauge>(); break;
        case Type::kHistogram: series.histogram = std::make_unique<Histogram>(bounds); break;
      }
    }
    return &series;
  }
};

Registry::Registry() : state_(std::make_unique<State>()) {}
Registry::~Registry() = default;

absl::StatusOr<Counter*> Registry::GetCounter(const std::string& name, const std::string& help,
                                              const Labels& labels) {
  std::lock_guard<std::mutex> lock(state_->mu);
  absl::StatusOr<Series*> series = state_->Find(name, help, Type::kCounter, {}, labels);
  if (!series.ok()) return series.status();
  return (*series)->counter.get();
}

absl::StatusOr<Gauge*> Registry::GetGauge(const std::string& name, const std::string& help, const Labels& labels) {
  std::lock_guard<std::mutex> lock(state_->mu);
  absl::StatusOr<Series*> series = state_->Find(name, help, Type::kGauge, {}, labels);
  if (!series.ok()) return series.status();
  return (*series)->gauge.get();
}

absl::StatusOr<Histogram*> Registry::GetHistogram(const std::string& name, const std::string& help,
                                                  const std::vector<double>& buckets, const Labels& labels) {
  std::vector<double> bounds = buckets;
  if (!bounds.empty() && std::isinf(bounds.back()) && bounds.back() > 0) bounds.pop_back();
  if (bounds.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("histogram '", name, "' needs at least one finite bucket"));
  }
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) {
      return absl::InvalidArgumentError(
          absl::StrCat("buckets of histogram '", name, "' must be finite and strictly increasing"));
    }
  }
  std::lock_guard<std::mutex> lock(state_->mu);
  absl::StatusOr<Series*> series = state_->Find(name, help, Type::kHistogram, bounds, labels);
  if (!series.ok()) return series.status();
  return (*series)->histogram.get();
}

void Registry::AddCollector(std::function<void(Registry&)> collect) {
  std::lock_guard<std::mutex> lock(state_->collectors_mu);
  state_->collectors.push_back(std::move(collect));
}

std::string Registry::Render() {
  std::lock_guard<std::mutex> render_lock(state_->render_mu);
  std::vector<std::function<void(Registry&)>> collectors;
  {
    std::lock_guard<std::mutex> lock(state_->collectors_mu);
    collectors = state_->collectors;
  }
  for (const auto& collect : collectors) collect(*this);

  std::lock_guard<std::mutex> lock(state_->mu);
  std::string out;
  for (const auto& [name, family] : state_->families) {
    if (family.series.empty()) continue;
    absl::StrAppend(&out, "# HELP ", name, " ", Escape(family.help, /*quote=*/false), "\n");
    absl::StrAppend(&out, "# TYPE ", name, " ", TypeName(family.type), "\n");
    for (const auto& [pairs, series] : family.series) {
      switch (family.type) {
        case Type::kCounter:
          absl::StrAppend(&out, name, Braced(pairs), " ", FormatValue(series.counter->value()), "\n");
          break;
        case Type::kGauge:
          absl::StrAppend(&out, name, Braced(pairs), " ", FormatValue(series.gauge->value()), "\n");
          break;
        case Type::kHistogram: {
          const Histogram& h = *series.histogram;
          const std::vector<uint64_t> counts = h.CumulativeCounts();
          const std::string prefix = pairs.empty() ? "" : pairs + ",";
          for (size_t i = 0; i < counts.size(); ++i) {
            const std::string le = i < h.bounds().size() ? FormatValue(h.bounds()[i]) : "+Inf";
            absl::StrAppend(&out, name, "_bucket{", prefix, "le=\"", le, "\"} ", counts[i], "\n");
          }
          absl::StrAppend(&out, name, "_sum", Braced(pairs), " ", FormatValue(h.sum()), "\n");
          absl::StrAppend(&out, name, "_count", Braced(pairs), " ", counts.back(), "\n");
          break;
        }
      }
    }
  }
  return out;
}

}  // namespace qforge::metrics
