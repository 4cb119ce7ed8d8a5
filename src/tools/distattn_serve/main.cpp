// distattn-serve: the disaggregated prefill/decode engine under load (and its colocated
// baseline), on a synthetic transformer. Runs under mpirun; world rank 0 prints the table.
// Thin main: flags -> distattn::serving (include/distattn/serving/), results -> table / JSON.
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/error.h"
#include "distattn/ops/dense.h"
#include "distattn/runtime.h"
#include "distattn/serving/engine.h"

namespace po = boost::program_options;
using namespace distattn;
using namespace distattn::serving;

namespace {

struct Args {
  std::string model = "gqa";
  int64_t hidden = 1024, heads = 0, kv_heads = 4, head_dim = 64, layers = 4, ffn = 2816;
  int64_t vocab = 4096;
  std::string dtype = "fp32";
  uint64_t seed = 1;
  int64_t mla_latent = 512, mla_rope = 64, mla_nope = 128, mla_v = 128, mla_q_lora = 0;
  int prefill_ranks = 0, decode_ranks = 0, prefill_ulysses = 0, tpla_groups = 0;
  std::string prefill_sharding = "heads", decode_sharding, tpla_rotation = "hadamard";
  std::string tpla_norm = "exact";
  int64_t page_size = 16, kv_pages = 1024, max_batch = 32, transfer_window = 2;
  int64_t requests = 16, input_len = 512, output_len = 64;
  std::string rate = "inf", trace, goodput, mode = "disagg", json, requests_out;
  std::string device = "cpu", backend = "auto";
  double range_ratio = 0;
  bool check = false, verbose = false, no_progress = false;
  std::vector<std::string> faults;
  double admission_timeout_ms = 60000, kv_timeout_ms = 60000;
  bool transfer_bench = false;
  int iters = 5, warmup = 1;
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

EngineOptions engine_options(const Args& a, int world) {
  EngineOptions o;
  o.model = ModelConfig::defaults(parse_family(a.model));
  ModelConfig& m = o.model;
  m.hidden = a.hidden;
  if (a.heads > 0) m.heads = a.heads;
  m.kv_heads = m.family == ModelFamily::kGqa ? a.kv_heads : 1;
  m.head_dim = m.family == ModelFamily::kGqa ? a.head_dim : 0;
  m.layers = a.layers;
  m.ffn = a.ffn;
  m.vocab = a.vocab;
  m.dtype = parse_dtype(a.dtype);
  m.seed = a.seed;
  m.mla_latent = a.mla_latent;
  m.mla_rope = a.mla_rope;
  m.mla_nope = a.mla_nope;
  m.mla_v = a.mla_v;
  m.mla_q_lora = a.mla_q_lora;
  int p = a.prefill_ranks, d = a.decode_ranks;
  if (p == 0 && d == 0) p = std::max(1, world / 2);
  if (p == 0) p = world - d;
  if (d == 0) d = world - p;
  o.prefill.sharding = parse_prefill_sharding(a.prefill_sharding);
  o.prefill.ranks = p;
  o.prefill.ulysses = a.prefill_ulysses > 0 ? a.prefill_ulysses : (p % 2 == 0 ? 2 : 1);
  const std::string ds = a.decode_sharding.empty()
                             ? (m.family == ModelFamily::kGqa ? "heads" : "mla-tp")
                             : a.decode_sharding;
  o.decode.layout.sharding = parse_decode_sharding(ds);
  o.decode.layout.ranks = d;
  o.decode.layout.tpla_groups = a.tpla_groups;
  o.decode.rotation = parallel::parse_rotation(a.tpla_rotation);
  o.decode.norm = parallel::parse_norm(a.tpla_norm);
  o.decode.page_size = a.page_size;
  o.kv_pages = a.kv_pages;
  o.max_batch = a.max_batch;
  o.transfer_window = a.transfer_window;
  o.admission_timeout_s = a.admission_timeout_ms / 1e3;
  o.kv_timeout_s = a.kv_timeout_ms / 1e3;
  o.check = a.check;
  DISTATTN_CHECK(a.device == "cpu" || a.device == "cuda", "--device takes cpu or cuda; got '",
                 a.device, "'");
  if (a.device == "cuda") {
    DISTATTN_CHECK_STATUS(runtime_info().device.is_cuda(), Status::kUnsupported,
                          "--device cuda: this rank sees no CUDA device (",
                          runtime_info().cuda_devices, " visible); use --device cpu");
    o.device = runtime_info().device;
  }
  o.backend = comm::parse_backend(a.backend);
  o.verbose = a.verbose;
  o.progress = !a.no_progress;
  for (const std::string& f : a.faults) o.faults.push_back(parse_fault(f));
  return o;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  DISTATTN_CHECK_STATUS(f.good(), Status::kIoError, "cannot write '", path, "'");
  f << text;
  DISTATTN_CHECK_STATUS(f.good(), Status::kIoError, "writing '", path, "' failed");
}

// Exact shardings must reproduce the single-rank reference; TPLA only reports its error.
double check_tolerance(const EngineOptions& o) {
  return o.model.dtype == DType::kFloat32 ? 1e-4 : 5e-2;
}

int run(int argc, char** argv) {
  Args a;
  po::options_description desc(
      "distattn-serve: disaggregated prefill/decode under load (mpirun -np P+D)\noptions");
  // clang-format off
  desc.add_options()
    ("help,h", "this help")
    ("model", po::value(&a.model)->default_value(a.model), "gqa (Llama-like) | mla (DeepSeek-style)")
    ("hidden", po::value(&a.hidden)->default_value(a.hidden), "model width")
    ("heads", po::value(&a.heads)->default_value(0), "query heads (0: 16 for gqa, 8 for mla)")
    ("kv-heads", po::value(&a.kv_heads)->default_value(a.kv_heads), "GQA KV heads")
    ("head-dim", po::value(&a.head_dim)->default_value(a.head_dim), "GQA head dim")
    ("layers", po::value(&a.layers)->default_value(a.layers), "transformer layers")
    ("ffn", po::value(&a.ffn)->default_value(a.ffn), "MLP width")
    ("vocab", po::value(&a.vocab)->default_value(a.vocab), "vocabulary (greedy sampling)")
    ("dtype", po::value(&a.dtype)->default_value(a.dtype), "fp32|bf16: q/k/v, attention inputs, KV cache and transfer")
    ("seed", po::value(&a.seed)->default_value(a.seed), "weights, prompts and arrivals")
    ("mla-latent", po::value(&a.mla_latent)->default_value(a.mla_latent), "MLA latent (kv_lora_rank)")
    ("mla-rope", po::value(&a.mla_rope)->default_value(a.mla_rope), "MLA RoPE key dim")
    ("mla-nope", po::value(&a.mla_nope)->default_value(a.mla_nope), "MLA non-RoPE query/key dim")
    ("mla-v", po::value(&a.mla_v)->default_value(a.mla_v), "MLA value head dim")
    ("mla-q-lora", po::value(&a.mla_q_lora)->default_value(a.mla_q_lora), "MLA query compression (0: none)")
    ("prefill-ranks", po::value(&a.prefill_ranks)->default_value(0), "P (0: world/2, or world - D)")
    ("decode-ranks", po::value(&a.decode_ranks)->default_value(0), "D (0: world - P)")
    ("prefill-sharding", po::value(&a.prefill_sharding)->default_value(a.prefill_sharding), "heads|zigzag|ulysses|hybrid (MLA: heads)")
    ("prefill-ulysses", po::value(&a.prefill_ulysses)->default_value(0), "hybrid prefill: Ulysses degree (0: 2 when P is even, else 1)")
    ("decode-sharding", po::value(&a.decode_sharding)->default_value(""), "GQA heads|decode-cp; MLA mla-tp|tpla|decode-cp (default heads / mla-tp)")
    ("tpla-rotation", po::value(&a.tpla_rotation)->default_value(a.tpla_rotation), "TPLA: none|hadamard|pca")
    ("tpla-norm", po::value(&a.tpla_norm)->default_value(a.tpla_norm), "TPLA: sliced|exact RMSNorm of decode tokens")
    ("tpla-groups", po::value(&a.tpla_groups)->default_value(0), "TPLA latent groups g (0: D)")
    ("page-size", po::value(&a.page_size)->default_value(a.page_size), "tokens per KV page")
    ("kv-pages", po::value(&a.kv_pages)->default_value(a.kv_pages), "pages per decode rank")
    ("max-batch", po::value(&a.max_batch)->default_value(a.max_batch), "requests decoded together at most")
    ("transfer-window", po::value(&a.transfer_window)->default_value(a.transfer_window), "granted requests waiting for their KV at most (pages reserved just ahead of the prefill)")
    ("requests", po::value(&a.requests)->default_value(a.requests), "requests to generate")
    ("rate", po::value(&a.rate)->default_value(a.rate), "Poisson arrivals, req/s; inf = all at once; a list a,b,c sweeps")
    ("input-len", po::value(&a.input_len)->default_value(a.input_len), "mean prompt tokens")
    ("output-len", po::value(&a.output_len)->default_value(a.output_len), "mean output tokens (the first from the prefill)")
    ("range-ratio", po::value(&a.range_ratio)->default_value(a.range_ratio), "lengths uniform in len*(1 +- r)")
    ("trace", po::value(&a.trace)->default_value(""), "JSONL trace (arrival_s, input_len, output_len per line) instead")
    ("goodput", po::value(&a.goodput)->default_value(""), "SLOs 'ttft:MS tpot:MS' for goodput")
    ("mode", po::value(&a.mode)->default_value(a.mode), "disagg|colocated|both")
    ("device", po::value(&a.device)->default_value(a.device), "cpu|cuda (GQA): where weights, pools and KV live")
    ("backend", po::value(&a.backend)->default_value(a.backend), "--device cuda: mpi|nccl|auto for the groups and the KV channel")
    ("check", po::bool_switch(&a.check), "recompute every step on one rank (teacher forcing); report max_rel_err")
    ("json", po::value(&a.json)->default_value(""), "write a JSON list, one object per mode run")
    ("requests-out", po::value(&a.requests_out)->default_value(""), "write one JSONL line per request")
    ("fault", po::value(&a.faults)->composing(), "inject a fault (repeatable): refuse:REQ[:RANK], drop-completion:REQ, prefill-throw:REQ[:RANK[:LAYER]], handshake:FIELD, exit:WORLD_RANK:REQ, hang:WORLD_RANK:REQ")
    ("admission-timeout-ms", po::value(&a.admission_timeout_ms)->default_value(a.admission_timeout_ms), "a request waiting longer for pages is refused")
    ("kv-timeout-ms", po::value(&a.kv_timeout_ms)->default_value(a.kv_timeout_ms), "a granted request whose KV/completion is not in by then fails")
    ("transfer-bench", po::bool_switch(&a.transfer_bench), "measure the KV transfer alone (engine vs plain send/recv) at --input-len tokens, then exit")
    ("iters,n", po::value(&a.iters)->default_value(a.iters), "--transfer-bench: timed iterations")
    ("warmup_iters,w", po::value(&a.warmup)->default_value(a.warmup), "--transfer-bench: untimed iterations")
    ("verbose", po::bool_switch(&a.verbose), "log every request state transition (also DISTATTN_VERBOSE=1)")
    ("no-progress", po::bool_switch(&a.no_progress), "no progress lines on stderr");
  // clang-format on
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    if (runtime_info().rank == 0) std::fprintf(stderr, "distattn-serve: %s\n", e.what());
    return 2;
  }
  if (vm.count("help")) {
    if (runtime_info().rank == 0) std::cout << desc << "\n";
    return 0;
  }
  auto world = comm::create_world(comm::Backend::kMpi, Device::cpu());
  const int rank = world->rank();
  EngineOptions opts;
  WorkloadSpec spec;
  Slo slo;
  std::vector<double> rates;
  try {
    opts = engine_options(a, world->size());
    validate(opts, world->size());
    DISTATTN_CHECK(a.mode == "disagg" || a.mode == "colocated" || a.mode == "both",
                   "--mode takes disagg, colocated or both; got '", a.mode, "'");
    for (const std::string& r : split_list(a.rate)) rates.push_back(parse_rate(r));
    DISTATTN_CHECK(!rates.empty(), "--rate needs a value");
    spec.requests = a.requests;
    spec.input_len = a.input_len;
    spec.output_len = a.output_len;
    spec.range_ratio = a.range_ratio;
    spec.seed = a.seed;
    spec.trace = a.trace;
    spec.rate = rates.front();
    validate(spec);
    if (!a.goodput.empty()) slo = parse_goodput(a.goodput);
  } catch (const Error& e) {
    if (rank == 0) std::fprintf(stderr, "distattn-serve: %s\n", e.message().c_str());
    return 2;
  }

  if (rank == 0) {
    std::printf("# device %s", opts.device.str().c_str());
    if (opts.device.is_cuda()) std::printf(", backend %s", comm::backend_name(opts.backend));
    std::printf("\n");
    std::printf("# distattn-serve  world %d = %d prefill + %d decode ranks\n", world->size(),
                opts.prefill.ranks, opts.decode.layout.ranks);
    std::printf("# model: %s\n", opts.model.str().c_str());
    std::printf("# prefill %s, decode %s", prefill_sharding_name(opts.prefill.sharding),
                decode_sharding_name(opts.decode.layout.sharding));
    if (opts.decode.layout.sharding == DecodeSharding::kTpla)
      std::printf(" (g=%d, rotation %s, norm %s)", opts.decode.layout.groups(),
                  parallel::rotation_name(opts.decode.rotation),
                  parallel::norm_name(opts.decode.norm));
    std::printf(", page %lld tokens, %lld pages/rank, max batch %lld\n# dense: %s, %s threads\n",
                static_cast<long long>(opts.decode.page_size),
                static_cast<long long>(opts.kv_pages), static_cast<long long>(opts.max_batch),
                ops::matmul_backend(),
                std::getenv("OMP_NUM_THREADS") ? std::getenv("OMP_NUM_THREADS") : "default");
    if (std::string(ops::matmul_backend()).find("Prescott") != std::string::npos)
      std::printf(
          "# warning: OpenBLAS runs its SSE3 kernels; on an AVX-512 CPU set "
          "OPENBLAS_CORETYPE=SkylakeX (launch/mpirun.sh does)\n");
  }

  if (a.transfer_bench) {
    const TransferBenchResult r = bench_transfer(*world, opts, a.input_len, a.iters, a.warmup);
    if (rank == 0) {
      std::printf(
          "#\n# KV transfer of one %lld-token request (%lld layers), engine vs plain "
          "send/recv of the same messages\n",
          static_cast<long long>(r.tokens), static_cast<long long>(opts.model.layers));
      std::printf("#  %10s %8s %12s %12s %10s %12s %10s %7s\n", "bytes", "messages", "max_msg",
                  "engine_ms", "engine_GB/s", "sendrecv_ms", "raw_GB/s", "ratio");
      std::printf("   %10lld %8lld %12lld %12.3f %10.2f %12.3f %10.2f %7.3f\n",
                  static_cast<long long>(r.bytes), static_cast<long long>(r.messages),
                  static_cast<long long>(r.max_message), r.transfer_s * 1e3, r.transfer_gbps(),
                  r.raw_s * 1e3, r.raw_gbps(), r.raw_s > 0 ? r.raw_s / r.transfer_s : 0.0);
      if (!a.json.empty()) {
        std::ostringstream os;
        os << "[{\"mode\": \"transfer-bench\", \"model\": \"" << family_name(opts.model.family)
           << "\", \"prefill_ranks\": " << opts.prefill.ranks
           << ", \"decode_ranks\": " << opts.decode.layout.ranks << ", \"prefill_sharding\": \""
           << prefill_sharding_name(opts.prefill.sharding) << "\", \"decode_sharding\": \""
           << decode_sharding_name(opts.decode.layout.sharding) << "\", \"tokens\": " << r.tokens
           << ", \"kv_transfer_bytes\": " << r.bytes << ", \"messages\": " << r.messages
           << ", \"max_message_bytes\": " << r.max_message
           << ", \"kv_transfer_gbps\": " << r.transfer_gbps()
           << ", \"sendrecv_gbps\": " << r.raw_gbps()
           << ", \"ratio\": " << (r.raw_s > 0 ? r.raw_s / r.transfer_s : 0.0) << "}]\n";
        write_file(a.json, os.str());
      }
    }
    return 0;
  }

  std::vector<RunMetrics> runs;
  std::string jsonl;
  bool check_failed = false;
  for (double rate : rates) {
    spec.rate = rate;
    const std::vector<Request> wl = make_workload(spec);
    for (const char* mode : {"disagg", "colocated"}) {
      if (a.mode != "both" && a.mode != mode) continue;
      RunResult r;
      try {
        r = std::string(mode) == "disagg" ? run_disaggregated(*world, opts, wl, spec, slo)
                                          : run_colocated(*world, opts, wl, spec, slo);
      } catch (const Error& e) {
        // Bad configurations (a handshake mismatch among them) are found on every rank
        // alike, before any KV moves: report and exit without tearing the job down.
        if (e.status() != Status::kInvalidArgument) throw;
        if (rank == 0) std::fprintf(stderr, "distattn-serve: %s\n", e.message().c_str());
        return 2;
      }
      if (rank != 0) continue;
      runs.push_back(r.metrics);
      for (const RequestRecord& rec : r.records) {
        jsonl += request_jsonl(rec) + "\n";
        if (!rec.completed && !opts.faults.empty())
          std::fprintf(stderr, "[distattn-serve] %s request %lld failed: %s\n", mode,
                       static_cast<long long>(rec.id), rec.reason.c_str());
      }
      const bool approx =
          std::string(mode) == "disagg" && opts.decode.layout.sharding == DecodeSharding::kTpla;
      if (opts.check && !approx &&
          !(r.metrics.max_rel_err <= check_tolerance(opts) || std::isnan(r.metrics.max_rel_err))) {
        std::fprintf(stderr, "distattn-serve: %s check FAILED: max_rel_err %.3e > %.1e\n", mode,
                     r.metrics.max_rel_err, check_tolerance(opts));
        check_failed = true;
      }
      if (r.metrics.kv_pages_leaked != 0) {
        std::fprintf(stderr, "distattn-serve: %s run leaked %lld pages/buffers\n", mode,
                     static_cast<long long>(r.metrics.kv_pages_leaked));
        check_failed = true;
      }
    }
  }
  if (rank == 0) {
    std::printf("%s", metrics_table(runs).c_str());
    if (opts.check)
      std::printf("# check (teacher-forced single-rank reference): %s\n",
                  check_failed ? "FAILED" : "OK");
    if (!a.json.empty()) write_file(a.json, metrics_json_list(runs));
    if (!a.requests_out.empty()) write_file(a.requests_out, jsonl);
  }
  int bad = check_failed ? 1 : 0;
  world->broadcast(&bad, &bad, 1, DType::kInt32, 0);
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  int size = 1;
  try {
    const auto& info = runtime_init(&argc, &argv, {.use_gpu = true});
    size = info.size;
    const int rc = run(argc, argv);
    runtime_finalize();
    return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "distattn-serve: %s\n", e.what());
    if (size > 1) runtime_abort(1, e.what());  // don't leave peers waiting
    runtime_finalize();
    return 1;
  }
}
