// libFuzzer harness: the argument parsers distattn-bench's sizes and names go through
// (src/tools/distattn_bench/bench_common.cpp parse_size/format_size; parse_dtype,
// parse_device, parallel::parse_strategy, comm::parse_backend). The input is split at NUL
// bytes into words. Each parser must return a value or throw distattn::Error
// (kInvalidArgument) whose message quotes what to write; a size it accepts must print
// (format_size) to a string that parses back to the same number. Never another exception,
// a crash or undefined behaviour (UBSan: the size arithmetic).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "distattn/comm/communicator.h"
#include "distattn/core/device.h"
#include "distattn/core/dtype.h"
#include "distattn/core/error.h"
#include "distattn/parallel/sequence_parallel.h"
#include "src/tools/distattn_bench/bench_common.h"

namespace {

[[noreturn]] void fail(const std::string& what, const std::string& word) {
  std::fprintf(stderr, "fuzz_bench_args: %s (input '%s')\n", what.c_str(), word.c_str());
  std::abort();
}

template <typename F>
void expect_value_or_error(const std::string& word, const char* parser, F&& f) {
  try {
    f();
  } catch (const distattn::Error& e) {
    if (e.status() != distattn::Status::kInvalidArgument)
      fail(std::string(parser) + " threw a status other than kInvalidArgument", word);
    if (e.message().empty()) fail(std::string(parser) + " threw without a message", word);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace distattn;
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  size_t at = 0;
  while (at <= all.size()) {
    size_t end = all.find('\0', at);
    if (end == std::string_view::npos) end = all.size();
    const std::string word(all.substr(at, end - at));
    at = end + 1;
    expect_value_or_error(word, "parse_size", [&] {
      const uint64_t v = bench::parse_size(word);
      const std::string printed = bench::format_size(v);
      uint64_t again = 0;
      try {
        again = bench::parse_size(printed);
      } catch (const Error&) {
        fail("format_size printed '" + printed + "', which parse_size rejects", word);
      }
      if (again != v) fail("format_size/parse_size round trip changed the value", word);
    });
    expect_value_or_error(word, "parse_dtype", [&] { (void)parse_dtype(word); });
    expect_value_or_error(word, "parse_device", [&] { (void)parse_device(word); });
    expect_value_or_error(word, "parse_strategy", [&] { (void)parallel::parse_strategy(word); });
    expect_value_or_error(word, "parse_backend", [&] { (void)comm::parse_backend(word); });
  }
  return 0;
}
