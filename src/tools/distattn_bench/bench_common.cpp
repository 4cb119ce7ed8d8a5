#include "src/tools/distattn_bench/bench_common.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "distattn/config.h"
#include "distattn/parallel/sequence_parallel.h"
#include "kernels/cpu/flash_cpu.h"

extern char** environ;

namespace distattn::bench {

std::map<std::string, Command>& commands() {
  static std::map<std::string, Command> registry;
  return registry;
}

CommandRegistrar::CommandRegistrar(const char* name, const char* help, CommandFn fn) {
  commands()[name] = Command{name, help, fn};
}

uint64_t parse_size(const std::string& text) {
  DISTATTN_CHECK(!text.empty(), "empty size (use e.g. 64, 4K, 16M, 1G)");
  uint64_t mult = 1;
  std::string digits = text;
  const char last = static_cast<char>(std::toupper(static_cast<unsigned char>(text.back())));
  if (last == 'K' || last == 'M' || last == 'G') {
    mult = last == 'K' ? (1ull << 10) : last == 'M' ? (1ull << 20) : (1ull << 30);
    digits = text.substr(0, text.size() - 1);
  }
  size_t used = 0;
  unsigned long long v = 0;
  // Digits only: stoull would accept a sign ("-1" wraps to 2^64-1) and leading spaces.
  const bool all_digits = !digits.empty() && std::all_of(digits.begin(), digits.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c)) != 0;
  });
  bool out_of_range = false;
  if (all_digits) {
    try {
      v = std::stoull(digits, &used);
    } catch (const std::out_of_range&) {
      out_of_range = true;
    } catch (const std::exception&) {
      used = 0;
    }
  }
  DISTATTN_CHECK(out_of_range || (all_digits && used == digits.size()), "bad size '", text,
                 "' (use a number with an optional K, M or G suffix, e.g. 16M)");
  DISTATTN_CHECK(!out_of_range && v <= std::numeric_limits<uint64_t>::max() / mult, "size '", text,
                 "' does not fit in 64 bits of bytes; pass a smaller size");
  return static_cast<uint64_t>(v) * mult;
}

std::string format_size(uint64_t b) {
  if (b >= (1ull << 30) && b % (1ull << 30) == 0) return std::to_string(b >> 30) + "G";
  if (b >= (1ull << 20) && b % (1ull << 20) == 0) return std::to_string(b >> 20) + "M";
  if (b >= (1ull << 10) && b % (1ull << 10) == 0) return std::to_string(b >> 10) + "K";
  return std::to_string(b);
}

namespace {
std::string json_escape(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      o += buf;
    } else {
      o += c;
    }
  }
  return o + "\"";
}
}  // namespace

JsonRow& JsonRow::set(const std::string& key, double v) {
  std::ostringstream os;
  if (std::isfinite(v)) {
    os << std::setprecision(9) << v;
  } else {
    os << "null";  // JSON has no inf/nan
  }
  fields_.emplace_back(key, os.str());
  return *this;
}
JsonRow& JsonRow::set(const std::string& key, int64_t v) {
  fields_.emplace_back(key, std::to_string(v));
  return *this;
}
JsonRow& JsonRow::set(const std::string& key, const std::string& v) {
  fields_.emplace_back(key, json_escape(v));
  return *this;
}
JsonRow& JsonRow::set(const std::string& key, bool v) {
  fields_.emplace_back(key, v ? "true" : "false");
  return *this;
}
std::string JsonRow::str() const {
  std::string o = "{";
  for (size_t i = 0; i < fields_.size(); ++i) {
    if (i) o += ", ";
    o += json_escape(fields_[i].first) + ": " + fields_[i].second;
  }
  return o + "}";
}

void write_json(const std::string& path, const std::string& command, const JsonRow& header,
                const std::vector<JsonRow>& rows) {
  if (path.empty()) return;
  std::ofstream f(path);
  DISTATTN_CHECK_STATUS(f.good(), Status::kIoError, "cannot open '", path, "' for writing");
  f << "{\n  \"command\": " << json_escape(command) << ",\n  \"header\": " << header.str()
    << ",\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i)
    f << "    " << rows[i].str() << (i + 1 < rows.size() ? ",\n" : "\n");
  f << "  ]\n}\n";
  DISTATTN_CHECK_STATUS(f.good(), Status::kIoError, "writing '", path, "' failed");
}

double max_over_ranks(comm::Communicator& comm, double value) {
  double out = value;
  comm.all_reduce(&value, &out, 1, DType::kFloat64, comm::ReduceOp::kMax);
  return out;
}

double sum_over_ranks(comm::Communicator& comm, double value) {
  double out = value;
  comm.all_reduce(&value, &out, 1, DType::kFloat64, comm::ReduceOp::kSum);
  return out;
}

std::string environment_header() {
  std::ostringstream os;
  os << "# distattn " << DISTATTN_VERSION << " (" << DISTATTN_BUILD_TYPE
     << ", cuda=" << DISTATTN_WITH_CUDA << " archs=" << DISTATTN_CUDA_ARCHITECTURES
     << ", nccl=" << DISTATTN_WITH_NCCL << ", nvtx=" << DISTATTN_WITH_NVTX
     << ", avx512=" << DISTATTN_WITH_AVX512 << ", avx512bf16=" << DISTATTN_WITH_AVX512BF16
     << ", amx=" << DISTATTN_WITH_AMX << ")\n";
  // The CPU attention kernels this run uses (DISTATTN_CPU_KERNEL or the CPU's widest level).
  os << "# cpu_kernel " << kernels::cpu::cpu_kernel_isa_name(kernels::cpu::active_cpu_kernel_isa())
     << "\n";
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    if (std::strncmp(*e, "DISTATTN_", 9) == 0 || std::strncmp(*e, "OMP_NUM_THREADS=", 16) == 0)
      os << "# env " << *e << "\n";
  }
  return os.str();
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void parse_window(const std::string& text, int64_t& left, int64_t& right) {
  if (text.empty()) return;
  const size_t comma = text.find(',');
  DISTATTN_CHECK(comma != std::string::npos,
                 "--window takes LEFT,RIGHT (e.g. 4096,0 for a causal sliding window; -1 for an "
                 "unlimited side), got '",
                 text, "'");
  try {
    left = std::stoll(text.substr(0, comma));
    right = std::stoll(text.substr(comma + 1));
  } catch (const std::exception&) {
    DISTATTN_THROW(Status::kInvalidArgument, "--window takes two integers LEFT,RIGHT, got '", text,
                   "'");
  }
}

std::vector<int32_t> packed_documents(const std::string& doc_lens, const std::string& doc_dist,
                                      uint64_t seed, int64_t seq) {
  DISTATTN_CHECK(doc_lens.empty() || doc_dist.empty(),
                 "--doc-lens and --doc-dist exclude each other: pass one");
  if (!doc_lens.empty()) {
    std::vector<int64_t> lens;
    std::stringstream ss(doc_lens);
    std::string item;
    while (std::getline(ss, item, ',')) {
      try {
        lens.push_back(static_cast<int64_t>(parse_size(item)));
      } catch (const std::exception&) {
        DISTATTN_THROW(Status::kInvalidArgument, "--doc-lens: '", item,
                       "' is not a length (a,b,c with optional K/M suffix)");
      }
    }
    return parallel::cu_seqlens_of(lens);
  }
  if (doc_dist.empty()) return {};
  DISTATTN_CHECK(doc_dist == "longtail", "--doc-dist takes 'longtail', got '", doc_dist, "'");
  return parallel::cu_seqlens_of(parallel::longtail_document_lengths(seq, seed));
}

Tensor synthetic_sinks(int64_t heads, Device device) {
  Tensor s = Tensor::empty({heads}, DType::kFloat32);
  for (int64_t h = 0; h < heads; ++h)
    s.data_as<float>()[h] = 0.25f * static_cast<float>(h % 8) - 0.5f;
  return device.is_cpu() ? s : to_device(s.view(), device);
}

}  // namespace distattn::bench
