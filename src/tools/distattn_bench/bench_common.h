#pragma once
// Shared harness of distattn-bench: subcommand registry, nccl-tests-style size parsing,
// JSON rows, timing helpers. Each subcommand lives in its own bench_<name>.cpp and registers
// itself with DISTATTN_BENCH_COMMAND; main() owns MPI init and error reporting.
#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/tensor_view.h"

namespace distattn::bench {

// argv[0] is "distattn-bench <command>"; returns the process exit code.
using CommandFn = int (*)(int argc, char** argv);

struct Command {
  std::string name;
  std::string help;
  CommandFn fn;
};
std::map<std::string, Command>& commands();

struct CommandRegistrar {
  CommandRegistrar(const char* name, const char* help, CommandFn fn);
};

// "64", "4K", "16M", "1G" (powers of 1024) -> bytes. Throws naming the accepted forms.
uint64_t parse_size(const std::string& text);
// 1024 -> "1K", 3000 -> "3000"
std::string format_size(uint64_t bytes);

// One JSON object; values are numbers, strings or bools.
class JsonRow {
 public:
  JsonRow& set(const std::string& key, double v);
  JsonRow& set(const std::string& key, int64_t v);
  JsonRow& set(const std::string& key, int v) { return set(key, static_cast<int64_t>(v)); }
  JsonRow& set(const std::string& key, uint64_t v) { return set(key, static_cast<int64_t>(v)); }
  JsonRow& set(const std::string& key, const std::string& v);
  JsonRow& set(const std::string& key, const char* v) { return set(key, std::string(v)); }
  JsonRow& set(const std::string& key, bool v);
  std::string str() const;

 private:
  std::vector<std::pair<std::string, std::string>> fields_;  // key -> encoded value
};

// Writes {"command": ..., "header": {...}, "rows": [...]} to `path` (rank 0 only; no-op when
// path is empty). Throws Error(kIoError) when the file cannot be written.
void write_json(const std::string& path, const std::string& command, const JsonRow& header,
                const std::vector<JsonRow>& rows);

// Max over the ranks of `comm` of a per-rank value (e.g. mean time after warm-up).
double max_over_ranks(comm::Communicator& comm, double value);
double sum_over_ranks(comm::Communicator& comm, double value);

// DISTATTN_* environment tunables and build facts, as "# key: value" header lines (rank 0
// prints them).
std::string environment_header();

double now_seconds();  // steady clock

// Masks shared by `attn` and `sp` (issue 12).
// "--window LEFT,RIGHT" -> (left, right); an empty string leaves both at -1 (unlimited).
void parse_window(const std::string& text, int64_t& left, int64_t& right);
// cu_seqlens of a packed batch: --doc-lens a,b,c (K/M suffixes) or --doc-dist longtail
// (`seq` tokens, seeded); both empty: {} (one sequence).
std::vector<int32_t> packed_documents(const std::string& doc_lens, const std::string& doc_dist,
                                      uint64_t seed, int64_t seq);
// Synthetic learned sink logits, fp32 [heads] on `device`.
Tensor synthetic_sinks(int64_t heads, Device device);

}  // namespace distattn::bench

#define DISTATTN_BENCH_CONCAT_(a, b) a##b
#define DISTATTN_BENCH_CONCAT(a, b) DISTATTN_BENCH_CONCAT_(a, b)
#define DISTATTN_BENCH_COMMAND(name, help, fn)                                                 \
  static ::distattn::bench::CommandRegistrar DISTATTN_BENCH_CONCAT(bench_reg_, __LINE__)(name, \
                                                                                         help, fn)
