// Serving metrics, JSON and the table (distattn/serving/metrics.h).
#include "distattn/serving/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "distattn/core/error.h"

namespace distattn::serving {

namespace {

std::string num(double v) {
  if (!std::isfinite(v)) return std::isnan(v) ? "null" : (v > 0 ? "\"inf\"" : "\"-inf\"");
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string quote(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      o += buf;
    } else {
      o += c;
    }
  }
  return o + "\"";
}

std::string dist_json(const Distribution& d) {
  return "{\"mean\": " + num(d.mean) + ", \"p50\": " + num(d.p50) + ", \"p90\": " + num(d.p90) +
         ", \"p99\": " + num(d.p99) + "}";
}

}  // namespace

double RequestRecord::ttft_s() const {
  return token_times.empty() ? std::numeric_limits<double>::quiet_NaN()
                             : token_times.front() - arrival_s;
}

double RequestRecord::e2e_s() const {
  return token_times.empty() ? std::numeric_limits<double>::quiet_NaN()
                             : token_times.back() - arrival_s;
}

double RequestRecord::tpot_s() const {
  if (token_times.size() < 2) return std::numeric_limits<double>::quiet_NaN();
  return (e2e_s() - ttft_s()) / static_cast<double>(token_times.size() - 1);
}

double percentile_sorted(const std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  const double f = pos - static_cast<double>(lo);
  return v[lo] + (v[hi] - v[lo]) * f;
}

Distribution summarize(std::vector<double> values) {
  Distribution d;
  if (values.empty()) return d;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double x : values) sum += x;
  d.count = static_cast<int64_t>(values.size());
  d.mean = sum / static_cast<double>(values.size());
  d.p50 = percentile_sorted(values, 50);
  d.p90 = percentile_sorted(values, 90);
  d.p99 = percentile_sorted(values, 99);
  return d;
}

bool Slo::set() const {
  return std::isfinite(ttft_ms) || std::isfinite(tpot_ms);
}

Slo parse_goodput(const std::string& text) {
  Slo s;
  std::string t = text;
  std::replace(t.begin(), t.end(), ',', ' ');
  std::istringstream is(t);
  std::string item;
  bool any = false;
  while (is >> item) {
    const size_t c = item.find(':');
    double v = 0;
    bool ok = c != std::string::npos;
    if (ok) {
      try {
        size_t used = 0;
        v = std::stod(item.substr(c + 1), &used);
        ok = used == item.size() - c - 1 && v > 0 && std::isfinite(v);
      } catch (const std::exception&) {
        ok = false;
      }
    }
    const std::string key = ok ? item.substr(0, c) : "";
    DISTATTN_CHECK(ok && (key == "ttft" || key == "tpot"), "--goodput takes 'ttft:MS tpot:MS' ",
                   "(positive milliseconds, either or both); got '", text, "'");
    (key == "ttft" ? s.ttft_ms : s.tpot_ms) = v;
    any = true;
  }
  DISTATTN_CHECK(any, "--goodput takes 'ttft:MS tpot:MS'; got '", text, "'");
  return s;
}

void compute_metrics(const std::vector<RequestRecord>& records, const Slo& slo, RunMetrics& m) {
  std::vector<double> ttft, tpot, itl, e2e;
  int64_t tokens = 0, good = 0;
  double end = 0, start = records.empty() ? 0 : records.front().arrival_s;
  m.requests = static_cast<int64_t>(records.size());
  m.completed = m.failed = 0;
  for (const RequestRecord& r : records) {
    start = std::min(start, r.arrival_s);
    if (!r.token_times.empty()) end = std::max(end, r.token_times.back());
    if (!r.completed) {
      ++m.failed;
      continue;
    }
    ++m.completed;
    tokens += static_cast<int64_t>(r.token_times.size());
    ttft.push_back(r.ttft_s() * 1e3);
    e2e.push_back(r.e2e_s() * 1e3);
    if (r.token_times.size() >= 2) tpot.push_back(r.tpot_s() * 1e3);
    for (size_t i = 1; i < r.token_times.size(); ++i)
      itl.push_back((r.token_times[i] - r.token_times[i - 1]) * 1e3);
    const bool ttft_ok = r.ttft_s() * 1e3 <= slo.ttft_ms;
    const bool tpot_ok = r.token_times.size() < 2 || r.tpot_s() * 1e3 <= slo.tpot_ms;
    if (ttft_ok && tpot_ok) ++good;
  }
  m.duration_s = std::max(0.0, end - start);
  const double dur = m.duration_s > 0 ? m.duration_s : 1.0;
  m.throughput_rps = static_cast<double>(m.completed) / dur;
  m.output_tok_s = static_cast<double>(tokens) / dur;
  m.goodput_rps = static_cast<double>(good) / dur;
  m.slo = slo;
  m.slo_attainment =
      m.requests > 0 ? static_cast<double>(good) / static_cast<double>(m.requests) : 0;
  m.ttft_all_ms = ttft;
  m.tpot_all_ms = tpot;
  m.ttft_ms = summarize(ttft);
  m.tpot_ms = summarize(tpot);
  m.itl_ms = summarize(itl);
  m.e2e_ms = summarize(e2e);
}

std::string metrics_json(const RunMetrics& m) {
  std::ostringstream os;
  os << "{\"mode\": " << quote(m.mode) << ", \"model\": " << quote(m.model)
     << ", \"prefill_ranks\": " << m.prefill_ranks << ", \"decode_ranks\": " << m.decode_ranks
     << ", \"prefill_sharding\": " << quote(m.prefill_sharding)
     << ", \"decode_sharding\": " << quote(m.decode_sharding) << ", \"rate\": " << num(m.rate)
     << ", \"requests\": " << m.requests << ", \"completed\": " << m.completed
     << ", \"failed\": " << m.failed << ", \"duration_s\": " << num(m.duration_s)
     << ", \"throughput_rps\": " << num(m.throughput_rps)
     << ", \"output_tok_s\": " << num(m.output_tok_s) << ", \"ttft_ms\": " << dist_json(m.ttft_ms)
     << ", \"tpot_ms\": " << dist_json(m.tpot_ms) << ", \"itl_ms\": " << dist_json(m.itl_ms)
     << ", \"e2e_ms\": " << dist_json(m.e2e_ms) << ", \"goodput_rps\": " << num(m.goodput_rps)
     << ", \"kv_transfer_bytes\": " << m.kv_transfer_bytes
     << ", \"kv_transfer_s\": " << num(m.kv_transfer_s)
     << ", \"kv_transfer_gbps\": " << num(m.kv_transfer_gbps)
     << ", \"kv_exposed_ms\": " << num(m.kv_exposed_ms)
     << ", \"kv_pages_leaked\": " << m.kv_pages_leaked;
  if (!std::isnan(m.max_rel_err)) os << ", \"max_rel_err\": " << num(m.max_rel_err);
  os << ", \"slo_ttft_ms\": " << num(m.slo.ttft_ms) << ", \"slo_tpot_ms\": " << num(m.slo.tpot_ms)
     << ", \"slo_attainment\": " << num(m.slo_attainment);
  auto list = [&](const char* key, const std::vector<double>& v) {
    os << ", \"" << key << "\": [";
    for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << num(v[i]);
    os << "]";
  };
  list("requests_ttft_ms", m.ttft_all_ms);
  list("requests_tpot_ms", m.tpot_all_ms);
  os << "}";
  return os.str();
}

std::string metrics_json_list(const std::vector<RunMetrics>& runs) {
  std::string s = "[\n";
  for (size_t i = 0; i < runs.size(); ++i)
    s += "  " + metrics_json(runs[i]) + (i + 1 < runs.size() ? ",\n" : "\n");
  return s + "]\n";
}

std::string request_jsonl(const RequestRecord& r) {
  std::ostringstream os;
  os << "{\"id\": " << r.id << ", \"arrival_s\": " << num(r.arrival_s)
     << ", \"input_len\": " << r.input_len << ", \"output_len\": " << r.output_len
     << ", \"output_tokens\": " << r.token_times.size()
     << ", \"ttft_ms\": " << num(r.ttft_s() * 1e3) << ", \"tpot_ms\": " << num(r.tpot_s() * 1e3)
     << ", \"e2e_ms\": " << num(r.e2e_s() * 1e3)
     << ", \"prefill_ms\": " << num((r.prefill_end_s - r.prefill_start_s) * 1e3)
     << ", \"kv_after_prefill_ms\": " << num((r.kv_ready_s - r.prefill_end_s) * 1e3)
     << ", \"status\": " << quote(r.completed ? "completed" : "failed")
     << ", \"reason\": " << quote(r.reason) << "}";
  return os.str();
}

std::string metrics_table(const std::vector<RunMetrics>& runs) {
  std::ostringstream os;
  char line[256];
  os << "#\n# "
     << "mode       P+D  prefill/decode      rate   done fail   req/s  tok/s  "
     << "goodput | ttft ms mean   p50    p99 | tpot ms mean   p99 | itl ms p50    p99 | "
     << "kv GB/s exposed ms leaked";
  if (!runs.empty() && !std::isnan(runs.front().max_rel_err)) os << "  max_rel_err";
  os << "\n";
  for (const RunMetrics& m : runs) {
    const std::string sh = m.prefill_sharding + "/" + m.decode_sharding;
    const std::string pd = std::to_string(m.prefill_ranks) + "+" + std::to_string(m.decode_ranks);
    std::snprintf(line, sizeof line,
                  "  %-10s %-4s %-18s %6s %5lld %4lld %7.2f %6.0f %8.2f | %12.1f %6.1f %6.1f | "
                  "%12.2f %5.1f | %10.2f %6.1f | %7.2f %10.2f %6lld",
                  m.mode.c_str(), pd.c_str(), sh.c_str(),
                  std::isfinite(m.rate) ? num(m.rate).c_str() : "inf",
                  static_cast<long long>(m.completed), static_cast<long long>(m.failed),
                  m.throughput_rps, m.output_tok_s, m.goodput_rps, m.ttft_ms.mean, m.ttft_ms.p50,
                  m.ttft_ms.p99, m.tpot_ms.mean, m.tpot_ms.p99, m.itl_ms.p50, m.itl_ms.p99,
                  m.kv_transfer_gbps, m.kv_exposed_ms, static_cast<long long>(m.kv_pages_leaked));
    os << line;
    if (!std::isnan(m.max_rel_err)) {
      std::snprintf(line, sizeof line, "  %11.3e", m.max_rel_err);
      os << line;
    }
    os << "\n";
  }
  return os.str();
}

}  // namespace distattn::serving
