// The load generator (distattn/serving/workload.h).
#include "distattn/serving/workload.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>

#include "distattn/core/error.h"
#include "distattn/core/random.h"

namespace distattn::serving {

namespace {

enum : uint64_t { kArrivals = 0xA771, kInputLens, kOutputLens, kPromptTokens };

double unit(uint64_t seed, uint64_t stream, uint64_t i) {  // [0, 1)
  return 0.5 * (hash_uniform(seed, stream, i) + 1.0);
}

int64_t sample_len(uint64_t seed, uint64_t stream, uint64_t i, int64_t mean, double ratio) {
  if (ratio <= 0) return mean;
  const int64_t lo = std::max<int64_t>(1, static_cast<int64_t>(std::floor(mean * (1 - ratio))));
  const int64_t hi = std::max(lo, static_cast<int64_t>(std::ceil(mean * (1 + ratio))));
  return lo + static_cast<int64_t>(unit(seed, stream, i) * static_cast<double>(hi - lo + 1));
}

// The number after "key": in a JSON object line (whitespace allowed around ':').
bool find_number(std::string_view line, std::string_view key, double* out) {
  const std::string quoted = "\"" + std::string(key) + "\"";
  const size_t k = line.find(quoted);
  if (k == std::string_view::npos) return false;
  size_t i = k + quoted.size();
  while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
  if (i >= line.size() || line[i] != ':') return false;
  ++i;
  while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
  const char* b = line.data() + i;
  const char* e = line.data() + line.size();
  const auto r = std::from_chars(b, e, *out);
  return r.ec == std::errc() && r.ptr != b;
}

}  // namespace

double parse_rate(std::string_view text) {
  if (text == "inf") return std::numeric_limits<double>::infinity();
  double v = 0;
  const auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  DISTATTN_CHECK(
      r.ec == std::errc() && r.ptr == text.data() + text.size() && v > 0 && std::isfinite(v),
      "--rate takes 'inf' or a positive number of requests per second; got '", text, "'");
  return v;
}

void validate(const WorkloadSpec& s) {
  if (!s.trace.empty()) return;
  DISTATTN_CHECK(s.requests >= 1, "--requests must be >= 1; got ", s.requests);
  DISTATTN_CHECK(s.rate > 0, "--rate must be > 0 (or inf); got ", s.rate);
  DISTATTN_CHECK(s.input_len >= 1 && s.output_len >= 1,
                 "--input-len and --output-len must be >= 1; got ", s.input_len, " and ",
                 s.output_len);
  DISTATTN_CHECK(s.range_ratio >= 0 && s.range_ratio < 1, "--range-ratio must be in [0, 1); got ",
                 s.range_ratio);
}

std::vector<Request> make_workload(const WorkloadSpec& spec) {
  validate(spec);
  if (!spec.trace.empty()) return load_trace(spec.trace);
  std::vector<Request> out;
  double t = 0;
  for (int64_t i = 0; i < spec.requests; ++i) {
    Request r;
    r.id = i;
    if (std::isfinite(spec.rate)) {
      // Exponential inter-arrival gaps (a Poisson process), the first one included.
      const double u = std::max(1e-12, 1.0 - unit(spec.seed, kArrivals, static_cast<uint64_t>(i)));
      t += -std::log(u) / spec.rate;
    }
    r.arrival_s = t;
    r.input_len = sample_len(spec.seed, kInputLens, static_cast<uint64_t>(i), spec.input_len,
                             spec.range_ratio);
    r.output_len = sample_len(spec.seed, kOutputLens, static_cast<uint64_t>(i), spec.output_len,
                              spec.range_ratio);
    out.push_back(r);
  }
  return out;
}

Request parse_trace_line(std::string_view line, int64_t line_number) {
  size_t b = 0;
  while (b < line.size() && (line[b] == ' ' || line[b] == '\t' || line[b] == '\r')) ++b;
  DISTATTN_CHECK(b < line.size() && line[b] == '{' && line.find('}') != std::string_view::npos,
                 "trace line ", line_number, ": expected a JSON object {...}");
  double arrival = 0, in = 0, out = 0;
  DISTATTN_CHECK(find_number(line, "arrival_s", &arrival) && find_number(line, "input_len", &in) &&
                     find_number(line, "output_len", &out),
                 "trace line ", line_number,
                 ": needs numbers \"arrival_s\", \"input_len\" and \"output_len\"");
  DISTATTN_CHECK(std::isfinite(arrival) && arrival >= 0, "trace line ", line_number,
                 ": arrival_s must be a finite number >= 0; got ", arrival);
  DISTATTN_CHECK(in >= 1 && out >= 1 && in == std::floor(in) && out == std::floor(out) &&
                     in < 1e9 && out < 1e9,
                 "trace line ", line_number,
                 ": input_len and output_len must be integers in [1, 1e9); got ", in, " and ", out);
  Request r;
  r.arrival_s = arrival;
  r.input_len = static_cast<int64_t>(in);
  r.output_len = static_cast<int64_t>(out);
  return r;
}

std::vector<Request> load_trace(const std::string& path) {
  std::ifstream f(path);
  DISTATTN_CHECK_STATUS(f.good(), Status::kIoError, "--trace: cannot open '", path, "'");
  std::vector<Request> out;
  std::string line;
  int64_t n = 0;
  while (std::getline(f, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Request r = parse_trace_line(line, n);
    r.id = static_cast<int64_t>(out.size());
    out.push_back(r);
  }
  DISTATTN_CHECK(!out.empty(), "--trace: '", path, "' has no requests");
  std::stable_sort(out.begin(), out.end(),
                   [](const Request& a, const Request& b) { return a.arrival_s < b.arrival_s; });
  return out;
}

std::vector<int32_t> prompt_tokens(uint64_t seed, int64_t id, int64_t len, int64_t vocab) {
  std::vector<int32_t> t(static_cast<size_t>(len));
  for (int64_t i = 0; i < len; ++i) {
    const uint64_t idx = (static_cast<uint64_t>(id) << 32) ^ static_cast<uint64_t>(i);
    t[static_cast<size_t>(i)] = static_cast<int32_t>(std::min<int64_t>(
        vocab - 1,
        static_cast<int64_t>(unit(seed, kPromptTokens, idx) * static_cast<double>(vocab))));
  }
  return t;
}

}  // namespace distattn::serving
