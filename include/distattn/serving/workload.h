#pragma once
// The load generator of distattn-serve: requests with arrival times and lengths, as vLLM's
// `bench serve` makes them (Poisson arrivals at a rate, the `random` dataset's lengths
// uniform within +-range_ratio around the means), or read from a JSONL trace. Prompt tokens
// are a pure function of (seed, request id, position), so every rank can rebuild any prompt.
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace distattn::serving {

struct Request {
  int64_t id = 0;
  double arrival_s = 0;  // seconds after the run starts
  int64_t input_len = 1;
  int64_t output_len = 1;  // tokens generated, the first one by the prefill
};

struct WorkloadSpec {
  int64_t requests = 16;
  double rate = std::numeric_limits<double>::infinity();  // req/s; inf: all at t = 0
  int64_t input_len = 512;
  int64_t output_len = 64;
  double range_ratio = 0.0;  // lengths uniform in [len * (1 - r), len * (1 + r)]
  uint64_t seed = 1;
  std::string
      trace;  // JSONL file: one {"arrival_s": .., "input_len": .., "output_len": ..} per line
};

// Throws naming the flag to change (requests >= 1, rate > 0, lengths >= 1, 0 <= r < 1).
void validate(const WorkloadSpec& spec);
std::vector<Request> make_workload(const WorkloadSpec& spec);

// One trace line: a JSON object with numbers "arrival_s" (>= 0), "input_len" and "output_len"
// (integers >= 1); other keys are ignored. Throws Error(kInvalidArgument) naming the line
// number and the problem; never reads past `line`.
Request parse_trace_line(std::string_view line, int64_t line_number);
// Every non-blank line of `path`, ids 0.. in file order, sorted by arrival (stable).
std::vector<Request> load_trace(const std::string& path);

// The prompt of request `id`: `len` tokens in [0, vocab).
std::vector<int32_t> prompt_tokens(uint64_t seed, int64_t id, int64_t len, int64_t vocab);

// "inf" or a positive number of requests per second.
double parse_rate(std::string_view text);

}  // namespace distattn::serving
