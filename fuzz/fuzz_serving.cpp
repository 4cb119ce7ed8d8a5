// libFuzzer harness: the serving wire and text parsers (include/distattn/serving/).
//   - Handshake::parse on the raw bytes: throws distattn::Error (kInvalidArgument) or returns
//     a handshake whose serialize() parses back to the same fields, compares equal to itself
//     and never reads past the buffer (ASan);
//   - parse_trace_line (the JSONL request parser), parse_fault, parse_rate and the sharding and
//     family name parsers on the bytes as text: return or throw Error(kInvalidArgument); an
//     accepted trace line has arrival_s >= 0 and lengths >= 1.
// Never a crash, a hang, another exception type or undefined behaviour (UBSan).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <string_view>

#include "distattn/core/error.h"
#include "distattn/serving/engine.h"
#include "distattn/serving/handshake.h"
#include "distattn/serving/sharding.h"
#include "distattn/serving/workload.h"

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_serving: %s\n", what.c_str());
  std::abort();
}

template <typename F>
void value_or_invalid_argument(const char* parser, F&& f) {
  try {
    f();
  } catch (const distattn::Error& e) {
    if (e.status() != distattn::Status::kInvalidArgument)
      fail(std::string(parser) + " threw a status other than kInvalidArgument: " + e.what());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace distattn::serving;
  value_or_invalid_argument("Handshake::parse", [&] {
    const Handshake h = Handshake::parse(std::span<const uint8_t>(data, size));
    const std::vector<uint8_t> wire = h.serialize();
    if (wire.size() != handshake_wire_bytes()) fail("serialize() size differs from the wire size");
    const Handshake again = Handshake::parse(wire);
    if (again.fields() != h.fields()) fail("parse(serialize(h)) changed a field");
    if (!compare_handshakes(h, again).empty()) fail("a handshake mismatches its own round trip");
  });
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  value_or_invalid_argument("parse_trace_line", [&] {
    const Request r = parse_trace_line(text, 1);
    if (!(r.arrival_s >= 0) || r.input_len < 1 || r.output_len < 1)
      fail("parse_trace_line accepted an arrival < 0 or a length < 1");
  });
  const std::string s(text);
  value_or_invalid_argument("parse_fault", [&] { (void)parse_fault(s); });
  value_or_invalid_argument("parse_rate", [&] {
    const double r = parse_rate(text);
    if (!(r > 0)) fail("parse_rate accepted a rate that is not positive");
  });
  value_or_invalid_argument("parse_family", [&] { (void)parse_family(text); });
  value_or_invalid_argument("parse_prefill_sharding", [&] { (void)parse_prefill_sharding(text); });
  value_or_invalid_argument("parse_decode_sharding", [&] { (void)parse_decode_sharding(text); });
  return 0;
}
