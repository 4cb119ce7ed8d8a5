#pragma once
// Serving metrics as vLLM's `bench serve` defines them (SERVING.md "Metrics"):
//   TTFT  arrival -> first output token available to the client
//   TPOT  per request (E2E - TTFT) / (output tokens - 1)   (requests with >= 2 tokens)
//   ITL   every gap between consecutive tokens, pooled over requests
//   E2E   arrival -> last token
// each with mean / p50 / p90 / p99 (linear interpolation, as numpy.percentile); request and
// output-token throughput over the run; goodput = completed requests meeting every SLO per
// second. Plus the KV transfer's bytes, time and rate, and the page accounting.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace distattn::serving {

// Everything known about one request at the end of a run (merged from both sides).
struct RequestRecord {
  int64_t id = 0;
  double arrival_s = 0;
  int64_t input_len = 0;
  int64_t output_len = 0;  // requested
  bool completed = false;
  std::string reason;  // failure reason (empty when completed)
  double prefill_start_s = std::numeric_limits<double>::quiet_NaN();
  double prefill_end_s = std::numeric_limits<double>::quiet_NaN();
  double kv_ready_s = std::numeric_limits<double>::quiet_NaN();  // KV complete on the decode side
  std::vector<double> token_times;  // emission time of each output token (run clock, s)
  std::vector<int32_t> tokens;      // output tokens
  std::vector<float> hidden;        // [tokens, hidden] final hidden per step (--check)

  double ttft_s() const;  // NaN unless a token was emitted
  double e2e_s() const;
  double tpot_s() const;  // NaN for fewer than 2 tokens
};

struct Distribution {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;
  int64_t count = 0;
};
// Summary of values (empty: all zero, count 0).
Distribution summarize(std::vector<double> values);
// Linear-interpolated percentile (numpy's default), q in [0, 100]; values sorted.
double percentile_sorted(const std::vector<double>& sorted, double q);

struct Slo {
  double ttft_ms = std::numeric_limits<double>::infinity();
  double tpot_ms = std::numeric_limits<double>::infinity();
  bool set() const;
};
// "ttft:MS tpot:MS" (either or both, space or comma separated). Throws naming the format.
Slo parse_goodput(const std::string& text);

struct RunMetrics {  // the JSON keys are these names (serving metrics, docs/SERVING.md)
  std::string mode;  // "disagg" | "colocated"
  std::string model;
  int prefill_ranks = 0, decode_ranks = 0;
  std::string prefill_sharding, decode_sharding;
  double rate = 0;  // requests/s (inf: all at once)
  int64_t requests = 0, completed = 0, failed = 0;
  double duration_s = 0;
  double throughput_rps = 0, output_tok_s = 0, goodput_rps = 0;
  Distribution ttft_ms, tpot_ms, itl_ms, e2e_ms;
  int64_t kv_transfer_bytes = 0;  // bytes the decode side received (0 colocated)
  double kv_transfer_s = 0;       // summed per-request transfer windows
  double kv_transfer_gbps = 0;    // bytes / kv_transfer_s
  double kv_exposed_ms = 0;       // mean (KV ready - prefill end): the transfer not hidden
  int64_t kv_pages_leaked = 0;    // pages (and prefill send buffers) still held at the end
  double max_rel_err = std::numeric_limits<double>::quiet_NaN();  // --check
  // For plots (scripts/plot_serve.py): every completed request's TTFT and TPOT, the SLOs and
  // the fraction of requests meeting all of them.
  std::vector<double> ttft_all_ms, tpot_all_ms;
  Slo slo;
  double slo_attainment = 0;
};

// Fills the latency/throughput fields from the records (the rest is the caller's).
void compute_metrics(const std::vector<RequestRecord>& records, const Slo& slo, RunMetrics& m);

// One JSON object with the keys the issue names (serving metrics JSON; NaN -> null).
std::string metrics_json(const RunMetrics& m);
// A JSON list of objects.
std::string metrics_json_list(const std::vector<RunMetrics>& runs);
// One JSONL line per request: id, arrival_s, input_len, output_len, output_tokens, ttft_ms,
// tpot_ms, e2e_ms, prefill_ms, kv_after_prefill_ms (KV complete on the decode side minus the
// prefill's end: negative when the transfer finished before the prefill did), status, reason.
std::string request_jsonl(const RequestRecord& r);
// The table rank 0 prints (one block per run).
std::string metrics_table(const std::vector<RunMetrics>& runs);

}  // namespace distattn::serving
