// distattn-bench attn: local attention timing (forward, backward, decode) over a sequence
// length sweep, and a .npy round trip for checking against other implementations.
//
//   distattn-bench attn --op fwd --dtype bf16 --heads 8 --dim 128 --causal -b 512 -e 4K -f 2 -c
//   distattn-bench attn --op decode --decode-queries 1 -b 4K -e 64K -f 4 --batch 4
//   distattn-bench attn --op fwd --gemm-ceiling -b 2K -e 2K
//   distattn-bench attn --op bwd --inputs in/ --outputs out/   (q.npy k.npy v.npy dout.npy)
//
// One row per sequence length S (fwd/bwd: Sq = Sk = S; decode: Sk = S cache tokens and
// Sq = --decode-queries new tokens at its end). Time is the max over ranks of each rank's
// mean over -n iterations after -w warm-up ones (ranks run independently under mpirun).
// FLOPs (REFERENCE.md): forward 4*B*Hq*Sq*Sk*D (2*(D+Dv) per pair when D != Dv), counting
// only the visible (query, key) pairs when causal (S*(S+1)/2 pairs for Sq == Sk); backward
// 2.5x the forward. -c compares with the fp64 reference: the whole problem when it is small,
// otherwise the first and last query rows of batch 0 (all heads; dq only for bwd), as the
// header line says.
#include <omp.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/config.h"
#include "distattn/core/half.h"
#include "distattn/core/npy.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"
#include "distattn/parallel/sequence_parallel.h"
#include "distattn/runtime.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/reference.h"
#include "src/tools/distattn_bench/bench_common.h"

#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif
#if DISTATTN_BENCH_HAVE_BLAS
#include <cblas.h>
#endif

namespace distattn::bench {
namespace {

namespace po = boost::program_options;

enum class AttnOp { kFwd, kBwd, kDecode };

struct Args {
  AttnOp op = AttnOp::kFwd;
  std::string op_name = "fwd";
  Device device = Device::cpu();
  DType dtype = DType::kFloat32;
  int64_t batch = 1, heads = 8, kv_heads = 0, dim = 128, dim_v = 0;
  int64_t seq_begin = 1024, seq_end = 1024, decode_queries = 1;
  double factor = 2;
  bool causal = false;
  int iters = 5, warmup = 1, num_splits = 0;
  int check = 0;
  int64_t check_rows = 16;
  bool gemm_ceiling = false;
  bool bw_ceiling = false;
  int64_t bw_bytes = int64_t{1} << 30;
  std::optional<float> scale;
  std::string json, inputs, outputs;
  // Masks (issue 12): --window L,R, --sink-tokens N, --sinks, packed documents --doc-lens a,b,c
  // or --doc-dist longtail (fwd/bwd, batch 1).
  std::string window, doc_lens, doc_dist;
  int64_t window_left = -1, window_right = -1, sink_tokens = 0;
  bool sinks = false;
  uint64_t doc_seed = 1;
};

std::vector<int32_t> documents_for(const Args& a, int64_t seq) {
  return packed_documents(a.doc_lens, a.doc_dist, a.doc_seed, seq);
}

void apply_masks(const Args& a, ops::AttentionOptions& o) {
  o.window_left = a.window_left;
  o.window_right = a.window_right;
  o.sink_tokens = a.sink_tokens;
}

// ---- data --------------------------------------------------------------------------------

// Uniform [-1, 1) from (seed, index): the same inputs on every run and every rank.
float data_value(uint64_t seed, uint64_t i) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + i + 0x632be59bd9b4e019ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(static_cast<double>(x >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

// A packed tensor of `dtype` on `device` filled with data_value(seed, i).
Tensor make_data(std::initializer_list<int64_t> shape, DType dtype, Device device, uint64_t seed) {
  Tensor f = Tensor::empty(shape, DType::kFloat32);
  float* p = f.data_as<float>();
  const int64_t n = f.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = data_value(seed, static_cast<uint64_t>(i));
  Tensor host = f;
  if (dtype != DType::kFloat32) {
    host = Tensor::empty(shape, dtype);
    convert_dtype_cpu(f.view(), host.view());
  }
  return device.is_cpu() ? host : to_device(host.view(), device);
}

Tensor to_host_fp32(const TensorView& t) {
  Tensor h = to_device(t, Device::cpu());
  if (h.dtype() == DType::kFloat32) return h;
  Tensor f = Tensor::empty(std::span<const int64_t>(t.shape.data(), t.ndim), DType::kFloat32);
  convert_dtype_cpu(h.view(), f.view());
  return f;
}

// max |got - ref| and max |ref| over finite reference entries; NaN/Inf mismatches are
// reported as an infinite error.
struct Err {
  double max_abs = 0, max_ref = 0;
  void add(double got, double ref) {
    if (!std::isfinite(ref) || !std::isfinite(got)) {
      if (!(std::isinf(ref) && got == ref)) max_abs = std::numeric_limits<double>::infinity();
      return;
    }
    max_abs = std::max(max_abs, std::abs(got - ref));
    max_ref = std::max(max_ref, std::abs(ref));
  }
  double rel() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
};

void accumulate_error(Err& e, const TensorView& got, const Tensor& ref_fp64) {
  Tensor g = to_host_fp32(got);
  const float* gp = g.data_as<float>();
  const double* rp = ref_fp64.data_as<double>();
  for (int64_t i = 0; i < g.numel(); ++i) e.add(gp[i], rp[i]);
}

// Relative (to max |ref|) error allowed by -c: accumulation over long rows in fp32, storage
// rounding for 16-bit outputs.
double check_tolerance(DType t) {
  return t == DType::kBFloat16 ? 3e-2 : t == DType::kFloat16 ? 1e-2 : 1e-4;
}

std::string fmt(const char* f, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

// ---- one problem -------------------------------------------------------------------------

struct Problem {
  const Args& a;
  int64_t sq, sk, hkv, dv;
  ops::AttentionOptions opts;
  ops::BackwardOptions bopts;
  std::vector<int32_t> cu;
  Tensor q, k, v, out, lse, dout, dq, dk, dv_t, sinks, dsinks;

  Problem(const Args& args, int64_t seq) : a(args) {
    cu = documents_for(a, seq);
    if (!cu.empty()) seq = cu.back();
    sk = seq;
    sq = a.op == AttnOp::kDecode ? a.decode_queries : seq;
    hkv = a.kv_heads;
    dv = a.dim_v;
    opts.causal = a.causal;
    opts.q_offset = cu.empty() ? sk - sq : 0;  // queries are the last positions (0 for fwd/bwd)
    opts.softmax_scale = a.scale;
    apply_masks(a, opts);
    opts.cu_seqlens = cu;
    if (a.sinks) {
      sinks = synthetic_sinks(a.heads, a.device);
      dsinks = Tensor::zeros({a.heads}, DType::kFloat32, a.device);
      opts.sinks = sinks.view();
      bopts.dsinks = dsinks.view();
    }
    const DType dt = a.dtype;
    q = make_data({a.batch, sq, a.heads, a.dim}, dt, a.device, 1);
    k = make_data({a.batch, sk, hkv, a.dim}, dt, a.device, 2);
    v = make_data({a.batch, sk, hkv, dv}, dt, a.device, 3);
    out = Tensor::empty({a.batch, sq, a.heads, dv}, dt, a.device);
    lse = Tensor::empty({a.batch, a.heads, sq}, DType::kFloat32, a.device);
    if (a.op == AttnOp::kBwd) {
      dout = make_data({a.batch, sq, a.heads, dv}, dt, a.device, 4);
      dq = Tensor::empty({a.batch, sq, a.heads, a.dim}, dt, a.device);
      dk = Tensor::empty({a.batch, sk, hkv, a.dim}, dt, a.device);
      dv_t = Tensor::empty({a.batch, sk, hkv, dv}, dt, a.device);
      ops::attention_forward(q, k, v, out, lse, opts);  // backward consumes out and lse
    }
  }

  void run() {
    switch (a.op) {
      case AttnOp::kFwd:
        ops::attention_forward(q, k, v, out, lse, opts);
        break;
      case AttnOp::kBwd:
        ops::attention_backward(q, k, v, out, dout, lse, dq, dk, dv_t, opts, bopts);
        break;
      case AttnOp::kDecode:
        ops::attention_decode(q, k, v, out, lse, opts, {.num_splits = a.num_splits});
        break;
    }
  }

  double flops() const {
    double fwd = ops::attention_forward_flops(a.batch, a.heads, sq, sk, a.dim, dv, opts);
    if (!cu.empty() || a.sink_tokens > 0) {
      // Visible pairs with documents / sink tokens (the sequence-parallel model on one rank).
      parallel::SpShape sh;
      sh.seq = sk;
      sh.cu_seqlens = cu;
      parallel::SpOptions po;
      po.causal = a.causal;
      po.window_left = a.window_left;
      po.window_right = a.window_right;
      po.sink_tokens = a.sink_tokens;
      fwd = 2.0 * static_cast<double>(a.batch * a.heads * (a.dim + dv)) *
            parallel::rank_visible_pairs({parallel::Strategy::kHeads, 1, 1}, sh, 0, po);
    }
    return a.op == AttnOp::kBwd ? 2.5 * fwd : fwd;
  }

  double kv_bytes() const {
    return static_cast<double>(a.batch) * sk * hkv * (a.dim + dv) *
           static_cast<double>(dtype_size(a.dtype));
  }

  // Compares the last run with the fp64 reference; returns the error and a description of
  // what was checked.
  Err check(std::string& what) {
    Err e;
    const double work = static_cast<double>(a.batch) * a.heads * sq * sk * (a.dim + dv);
    // Documents: row slices would cut them; the reference takes the whole problem.
    const bool full = work <= 2e9 || sq <= 2 * a.check_rows || !cu.empty();
    if (full) {
      what = a.op == AttnOp::kBwd ? "all of dq, dk, dv" : "all of out and lse";
      if (a.op == AttnOp::kBwd) {
        auto r = kernels::cpu::reference_attention_backward(q, k, v, dout, opts);
        accumulate_error(e, dq, r.dq);
        accumulate_error(e, dk, r.dk);
        accumulate_error(e, dv_t, r.dv);
        if (a.sinks) accumulate_error(e, dsinks, r.dsinks);
      } else {
        auto r = kernels::cpu::reference_attention_forward(q, k, v, opts);
        accumulate_error(e, out, r.out);
        accumulate_error(e, lse, r.lse);
      }
      return e;
    }
    // Rows [0, r) and [sq - r, sq) of batch 0: the reference of a query row needs only that
    // row (and all keys), so a slice of q with a shifted q_offset reproduces it exactly.
    const int64_t r = a.check_rows;
    what = "query rows [0," + std::to_string(r) + ") and [" + std::to_string(sq - r) + "," +
           std::to_string(sq) + ") of batch 0, all heads" +
           (a.op == AttnOp::kBwd ? " (dq only; dk/dv need every row)" : " (out and lse)");
    const TensorView q0 = q.view().slice(0, 0, 1), k0 = k.view().slice(0, 0, 1);
    const TensorView v0 = v.view().slice(0, 0, 1);
    Tensor lse_host;
    for (int64_t start : {int64_t{0}, sq - r}) {
      ops::AttentionOptions o = opts;
      o.q_offset += start;
      const TensorView qs = q0.slice(1, start, r);
      if (a.op == AttnOp::kBwd) {
        const TensorView dos = dout.view().slice(0, 0, 1).slice(1, start, r);
        auto ref = kernels::cpu::reference_attention_backward(qs, k0, v0, dos, o);
        accumulate_error(e, dq.view().slice(0, 0, 1).slice(1, start, r), ref.dq);
      } else {
        auto ref = kernels::cpu::reference_attention_forward(qs, k0, v0, o);
        accumulate_error(e, out.view().slice(0, 0, 1).slice(1, start, r), ref.out);
        // An lse row slice is strided; take it from a host copy (CUDA views copy packed only).
        if (!lse_host.defined()) lse_host = to_device(lse.view(), Device::cpu());
        accumulate_error(e, lse_host.view().slice(0, 0, 1).slice(2, start, r), ref.lse);
      }
    }
    return e;
  }
};

// ---- timing ------------------------------------------------------------------------------

// Mean seconds per run() over `iters` runs. CUDA kernels are asynchronous: on a CUDA device
// the runs are timed with events on the default stream (where the ops queue with
// opts.stream = null), after the device has drained the warm-up work.
template <typename Run>
double time_runs(const Device& dev, int iters, Run&& run) {
#if DISTATTN_WITH_CUDA
  if (dev.is_cuda()) {
    auto check = [](cudaError_t rc, const char* what) {
      if (rc != cudaSuccess)
        DISTATTN_THROW(Status::kCudaError, "distattn-bench attn: ", what,
                       " failed: ", cudaGetErrorString(rc));
    };
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cudaEvent_t start = nullptr, stop = nullptr;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    check(cudaEventRecord(start, nullptr), "cudaEventRecord");
    for (int i = 0; i < iters; ++i) run();
    check(cudaEventRecord(stop, nullptr), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
    return static_cast<double>(ms) * 1e-3 / iters;
  }
#else
  (void)dev;
#endif
  const double t0 = now_seconds();
  for (int i = 0; i < iters; ++i) run();
  return (now_seconds() - t0) / iters;
}

// ---- sgemm ceiling -----------------------------------------------------------------------

// GFLOP/s of a 2048^3 fp32 GEMM through OpenBLAS on this rank's threads.
double sgemm_gflops(int iters) {
#if DISTATTN_BENCH_HAVE_BLAS
  const int n = 2048;
  std::vector<float> A(static_cast<size_t>(n) * n), B(A.size()), C(A.size());
  for (size_t i = 0; i < A.size(); ++i) {
    A[i] = data_value(5, i);
    B[i] = data_value(6, i);
  }
  auto once = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, A.data(), n, B.data(), n,
                0.0f, C.data(), n);
  };
  once();  // warm-up: thread pool start, page faults
  const double t0 = now_seconds();
  for (int i = 0; i < iters; ++i) once();
  const double t = (now_seconds() - t0) / iters;
  return 2.0 * n * n * static_cast<double>(n) / t / 1e9;
#else
  (void)iters;
  DISTATTN_THROW(Status::kUnsupported,
                 "--gemm-ceiling needs BLAS, which was not found when distattn-bench was built "
                 "(install libopenblas-dev and re-run cmake)");
#endif
}

// ---- memory copy ceiling -----------------------------------------------------------------

// dst[0, n) = src[0, n) as a vector loop of plain loads and stores, the way tensor copies run
// (scripts/bench_sdpa_cpu.py times PyTorch's). Not memcpy: glibc's large-copy paths (rep movsb,
// non-temporal stores) measured 35-40 % below this on the 2-core VMs.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))
#endif
void copy_floats(const float* __restrict src, float* __restrict dst, size_t n) {
#pragma omp simd
  for (size_t i = 0; i < n; ++i) dst[i] = src[i];
}

// Read + write bytes per second of a buffer copy (`bytes` each way, best of `iters`), split
// evenly over this rank's OpenMP threads: the ceiling a decode step that reads its cache once
// is measured against.
double copy_gbps(int64_t bytes, int iters) {
  const size_t n = static_cast<size_t>(bytes) / sizeof(float);
  std::vector<float> src(n, 1.0f), dst(n, 0.0f);  // both written once: no page faults timed
  auto once = [&] {
#pragma omp parallel
    {
      const size_t t = static_cast<size_t>(omp_get_thread_num());
      const size_t nt = static_cast<size_t>(omp_get_num_threads());
      const size_t b = n * t / nt, e = n * (t + 1) / nt;
      copy_floats(src.data() + b, dst.data() + b, e - b);
    }
  };
  once();
  double best = std::numeric_limits<double>::infinity();
  for (int i = 0; i < iters; ++i) {
    const double t0 = now_seconds();
    once();
    best = std::min(best, now_seconds() - t0);
  }
  return 2.0 * static_cast<double>(n * sizeof(float)) / best / 1e9;
}

// ---- npy round trip ----------------------------------------------------------------------

Tensor read_input(const std::string& dir, const char* name) {
  const std::string path = (std::filesystem::path(dir) / name).string();
  const NpyInfo info = read_npy_info(path);
  DISTATTN_CHECK(info.shape.size() == 4, "'", path, "' has shape of rank ", info.shape.size(),
                 "; attention inputs are 4-D float32 [batch, seq, heads, head_dim]");
  DISTATTN_CHECK(info.dtype == DType::kFloat32, "'", path, "' holds ", dtype_name(info.dtype),
                 "; save it as float32 (arr.astype(np.float32))");
  return read_npy(path, {.dtype = DType::kFloat32, .rank = 4});
}

Tensor convert_to(const Tensor& t, DType dt, Device dev) {
  Tensor c = t;
  if (dt != DType::kFloat32) {
    c = Tensor::empty(std::span<const int64_t>(t.view().shape.data(), t.view().ndim), dt);
    convert_dtype_cpu(t.view(), c.view());
  }
  return dev.is_cpu() ? c : to_device(c.view(), dev);
}

int run_npy(const Args& a, int rank) {
  DISTATTN_CHECK(!a.inputs.empty() && !a.outputs.empty(),
                 "--inputs and --outputs go together (directories)");
  if (rank != 0) return 0;  // one writer: other ranks would race on the same files
  DISTATTN_CHECK(std::filesystem::is_directory(a.outputs), "--outputs '", a.outputs,
                 "' is not an existing directory; create it first");
  // Read and validate everything before computing or writing anything.
  Tensor q32 = read_input(a.inputs, "q.npy"), k32 = read_input(a.inputs, "k.npy");
  Tensor v32 = read_input(a.inputs, "v.npy");
  Tensor do32;
  if (a.op == AttnOp::kBwd) do32 = read_input(a.inputs, "dout.npy");
  const TensorView& qv = q32.view();
  const int64_t B = qv.size(0), Sq = qv.size(1), Hq = qv.size(2), D = qv.size(3);
  const int64_t Sk = k32.view().size(1), Hkv = k32.view().size(2), Dv = v32.view().size(3);
  ops::AttentionOptions o;
  o.causal = a.causal;
  o.q_offset = Sk - Sq;  // queries are the last positions of the keys (0 when Sq == Sk)
  o.softmax_scale = a.scale;
  apply_masks(a, o);
  Tensor cu_t, sinks_h, sinks_d, dsinks;
  const std::string cu_path = (std::filesystem::path(a.inputs) / "cu_seqlens.npy").string();
  const std::string sinks_path = (std::filesystem::path(a.inputs) / "sinks.npy").string();
  if (std::filesystem::exists(cu_path)) {
    NpyReadOptions co;
    co.dtype = DType::kInt32;
    co.rank = 1;
    cu_t = read_npy(cu_path, co);
    o.cu_seqlens =
        std::span<const int32_t>(cu_t.data_as<int32_t>(), static_cast<size_t>(cu_t.numel()));
    o.q_offset = 0;
  }
  if (std::filesystem::exists(sinks_path)) {
    NpyReadOptions so;
    so.dtype = DType::kFloat32;
    so.rank = 1;
    sinks_h = read_npy(sinks_path, so);
    sinks_d = to_device(sinks_h.view(), a.device);
    dsinks = Tensor::zeros({sinks_h.numel()}, DType::kFloat32, a.device);
    o.sinks = sinks_d.view();
  }
  Tensor q = convert_to(q32, a.dtype, a.device), k = convert_to(k32, a.dtype, a.device);
  Tensor v = convert_to(v32, a.dtype, a.device);
  Tensor out = Tensor::empty({B, Sq, Hq, Dv}, a.dtype, a.device);
  Tensor lse = Tensor::empty({B, Hq, Sq}, DType::kFloat32, a.device);
  std::vector<std::pair<const char*, Tensor>> results;
  if (a.op == AttnOp::kDecode) {
    ops::attention_decode(q, k, v, out, lse, o, {.num_splits = a.num_splits});
  } else {
    ops::attention_forward(q, k, v, out, lse, o);  // validates shapes (messages name tensors)
  }
  results.emplace_back("out.npy", to_host_fp32(out));
  results.emplace_back("lse.npy", to_host_fp32(lse));
  if (a.op == AttnOp::kBwd) {
    Tensor dout = convert_to(do32, a.dtype, a.device);
    Tensor dq = Tensor::empty({B, Sq, Hq, D}, a.dtype, a.device);
    Tensor dk = Tensor::empty({B, Sk, Hkv, D}, a.dtype, a.device);
    Tensor dv = Tensor::empty({B, Sk, Hkv, Dv}, a.dtype, a.device);
    ops::BackwardOptions bo;
    if (o.sinks.data != nullptr) bo.dsinks = dsinks.view();
    ops::attention_backward(q, k, v, out, dout, lse, dq, dk, dv, o, bo);
    results.emplace_back("dq.npy", to_host_fp32(dq));
    results.emplace_back("dk.npy", to_host_fp32(dk));
    results.emplace_back("dv.npy", to_host_fp32(dv));
    if (o.sinks.data != nullptr)
      results.emplace_back("dsinks.npy", to_device(dsinks.view(), Device::cpu()));
  }
  for (const auto& [name, t] : results) {
    const std::string path = (std::filesystem::path(a.outputs) / name).string();
    write_npy(path, t);
    std::printf("# wrote %s %s\n", path.c_str(), t.view().str().c_str());
  }
  return 0;
}

// ---- arguments ---------------------------------------------------------------------------

Args parse(int argc, char** argv, bool& help) {
  Args a;
  std::string op = "fwd", device = "cpu", dtype = "fp32", b = "1024", e = "", scale,
              bw_bytes = "1G";
  po::options_description desc(
      "distattn-bench attn: local attention timing and .npy round trip\n"
      "(run under mpirun: every rank runs the same problem; time is the max over ranks)");
  // clang-format off
  desc.add_options()
    ("help,h", "this help")
    ("op", po::value(&op)->default_value("fwd"), "fwd|bwd|decode")
    ("device", po::value(&device)->default_value("cpu"), "cpu|cuda")
    ("dtype,d", po::value(&dtype)->default_value("fp32"), "fp32|bf16|fp16 (storage dtype)")
    ("batch", po::value(&a.batch)->default_value(1), "batch size")
    ("minseq,b", po::value(&b)->default_value("1024"),
     "first sequence length (K suffix = 1024); decode: cache length")
    ("maxseq,e", po::value(&e), "last sequence length (default: -b)")
    ("stepfactor,f", po::value(&a.factor)->default_value(2), "sequence length multiplier (> 1)")
    ("heads", po::value(&a.heads)->default_value(8), "query heads")
    ("kv-heads", po::value(&a.kv_heads)->default_value(0), "KV heads (0: = --heads)")
    ("dim", po::value(&a.dim)->default_value(128), "head dim of q and k")
    ("dim-v", po::value(&a.dim_v)->default_value(0), "head dim of v (0: = --dim)")
    ("causal", po::bool_switch(&a.causal), "causal mask (queries at the end of the keys)")
    ("scale", po::value(&scale), "softmax scale (default 1/sqrt(dim))")
    ("window", po::value(&a.window)->default_value(""),
     "sliding window LEFT,RIGHT (-1: unlimited side; causal: R = 0)")
    ("sink-tokens", po::value(&a.sink_tokens)->default_value(0),
     "the first N keys of each document ignore the window")
    ("sinks", po::bool_switch(&a.sinks), "learned sink logits per query head (synthetic)")
    ("doc-lens", po::value(&a.doc_lens)->default_value(""),
     "fwd/bwd: a packed batch of documents of these lengths (sets the sequence to their sum)")
    ("doc-dist", po::value(&a.doc_dist)->default_value(""),
     "fwd/bwd: longtail = a packed batch of each length with long-tail documents (--doc-seed)")
    ("doc-seed", po::value(&a.doc_seed)->default_value(1), "seed of --doc-dist")
    ("decode-queries", po::value(&a.decode_queries)->default_value(1),
     "decode: new tokens per sequence (<= 16)")
    ("num-splits", po::value(&a.num_splits)->default_value(0), "decode: key chunks (0: choose)")
    ("iters,n", po::value(&a.iters)->default_value(5), "timed iterations per row")
    ("warmup_iters,w", po::value(&a.warmup)->default_value(1), "untimed iterations per row")
    ("check,c", po::value(&a.check)->default_value(0)->implicit_value(1),
     "1: compare with the fp64 reference (a subset of rows for large problems)")
    ("check-rows", po::value(&a.check_rows)->default_value(16),
     "query rows checked at each end when the whole problem is too big for the reference")
    ("gemm-ceiling", po::bool_switch(&a.gemm_ceiling),
     "also time a 2048^3 OpenBLAS sgemm and print attention / sgemm")
    ("bw-ceiling", po::bool_switch(&a.bw_ceiling),
     "--op decode: also time a memory copy on the same threads and print KV GB/s / copy GB/s")
    ("bw-bytes", po::value(&bw_bytes)->default_value("1G"),
     "--bw-ceiling: bytes copied each way (K/M/G suffixes = 2^10/2^20/2^30)")
    ("json", po::value(&a.json)->default_value(""), "write rows to this JSON file")
    ("inputs", po::value(&a.inputs)->default_value(""),
     "directory with q.npy k.npy v.npy (+ dout.npy for bwd), float32 [B, S, H, D]; optional "
     "cu_seqlens.npy (int32) and sinks.npy (float32 [Hq])")
    ("outputs", po::value(&a.outputs)->default_value(""),
     "directory for out.npy lse.npy (+ dq.npy dk.npy dv.npy, dsinks.npy with sinks), float32");
  // clang-format on
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const po::error& ex) {
    DISTATTN_THROW(Status::kInvalidArgument, ex.what(), " (see distattn-bench attn --help)");
  }
  help = vm.count("help") > 0;
  if (help) {
    std::ostringstream os;
    os << desc;
    std::printf("%s", os.str().c_str());
    return a;
  }
  parse_window(a.window, a.window_left, a.window_right);
  (void)packed_documents(a.doc_lens, a.doc_dist, a.doc_seed, 1);  // validates the flags
  a.op_name = op;
  if (op == "fwd")
    a.op = AttnOp::kFwd;
  else if (op == "bwd")
    a.op = AttnOp::kBwd;
  else if (op == "decode")
    a.op = AttnOp::kDecode;
  else
    DISTATTN_THROW(Status::kInvalidArgument, "--op '", op, "' is not one of fwd|bwd|decode");
  a.device = parse_device(device);
  DISTATTN_CHECK_STATUS(a.device.is_cpu() || cuda_device_count() > a.device.index,
                        Status::kUnsupported, "--device ", device, ": ",
                        built_with_cuda() ? "no such CUDA device is visible"
                                          : "this build has no CUDA (-DDISTATTN_CUDA=ON)",
                        "; use --device cpu");
  a.dtype = parse_dtype(dtype);
  DISTATTN_CHECK(
      a.dtype == DType::kFloat32 || a.dtype == DType::kBFloat16 || a.dtype == DType::kFloat16,
      "--dtype ", dtype, " is not a storage dtype: use fp32, bf16 or fp16");
  a.seq_begin = static_cast<int64_t>(parse_size(b));
  a.seq_end = e.empty() ? a.seq_begin : static_cast<int64_t>(parse_size(e));
  DISTATTN_CHECK(a.seq_begin >= 1 && a.seq_end >= a.seq_begin, "-b ", a.seq_begin, " / -e ",
                 a.seq_end, ": need 1 <= begin <= end");
  DISTATTN_CHECK(a.factor > 1 || a.seq_begin == a.seq_end, "-f must be > 1, got ", a.factor);
  if (a.kv_heads == 0) a.kv_heads = a.heads;
  if (a.dim_v == 0) a.dim_v = a.dim;
  DISTATTN_CHECK(a.batch >= 1 && a.heads >= 1 && a.dim >= 1 && a.dim_v >= 1,
                 "--batch, --heads, --dim, --dim-v must be positive");
  DISTATTN_CHECK(a.kv_heads >= 1 && a.heads % a.kv_heads == 0, "--heads ", a.heads,
                 " must be a multiple of --kv-heads ", a.kv_heads);
  DISTATTN_CHECK(a.op != AttnOp::kDecode || (a.decode_queries >= 1 && a.decode_queries <= 16),
                 "--decode-queries must be in [1, 16], got ", a.decode_queries);
  DISTATTN_CHECK(a.iters >= 1 && a.warmup >= 0, "-n must be >= 1 and -w >= 0");
  DISTATTN_CHECK(a.check_rows >= 1, "--check-rows must be >= 1");
  DISTATTN_CHECK(!a.bw_ceiling || a.op == AttnOp::kDecode,
                 "--bw-ceiling compares decode's KV bandwidth with a memory copy: use it with "
                 "--op decode");
  DISTATTN_CHECK(!a.bw_ceiling || a.device.is_cpu(),
                 "--bw-ceiling times a host memory copy: use it with --device cpu");
  a.bw_bytes = static_cast<int64_t>(parse_size(bw_bytes));
  DISTATTN_CHECK(a.bw_bytes >= (int64_t{1} << 20) && a.bw_bytes <= (int64_t{8} << 30),
                 "--bw-bytes must be in [1M, 8G] (below: it fits in cache and is no ceiling; the "
                 "probe holds two buffers of that size), got ",
                 bw_bytes);
  if (!scale.empty()) {
    try {
      a.scale = std::stof(scale);
    } catch (const std::exception&) {
      DISTATTN_THROW(Status::kInvalidArgument, "--scale '", scale, "' is not a number");
    }
  }
  if (!a.doc_lens.empty() || !a.doc_dist.empty()) {
    DISTATTN_CHECK(a.op != AttnOp::kDecode && a.batch == 1,
                   "--doc-lens / --doc-dist: packed documents take --op fwd or bwd with --batch 1");
    if (!a.doc_lens.empty()) a.seq_end = a.seq_begin;  // one row: the documents' sum
  }
  return a;
}

int attn_main(int argc, char** argv) {
  bool help = false;
  const Args a = parse(argc, argv, help);
  if (help) return 0;
  const RuntimeInfo& info = runtime_info();
  if (!a.inputs.empty() || !a.outputs.empty()) return run_npy(a, info.rank);

  std::unique_ptr<comm::Communicator> world =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  const bool root = info.rank == 0;
  double gemm = 0;
  if (a.gemm_ceiling) gemm = max_over_ranks(*world, -sgemm_gflops(3)) * -1;  // min over ranks
  double copy = 0;
  if (a.bw_ceiling) copy = max_over_ranks(*world, -copy_gbps(a.bw_bytes, 5)) * -1;
  std::string command = argv[0];  // "distattn-bench attn"
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  if (root) {
    std::printf("%s", environment_header().c_str());
    std::printf(
        "# attn op=%s device=%s dtype=%s batch=%ld heads=%ld kv_heads=%ld dim=%ld "
        "dim_v=%ld causal=%d%s ranks=%d threads=%d iters=%d warmup=%d\n",
        a.op_name.c_str(), a.device.str().c_str(), dtype_name(a.dtype), static_cast<long>(a.batch),
        static_cast<long>(a.heads), static_cast<long>(a.kv_heads), static_cast<long>(a.dim),
        static_cast<long>(a.dim_v), a.causal ? 1 : 0,
        a.op == AttnOp::kDecode ? (" decode_queries=" + std::to_string(a.decode_queries) +
                                   " num_splits=" + std::to_string(a.num_splits))
                                      .c_str()
                                : "",
        info.size, omp_get_max_threads(), a.iters, a.warmup);
    if (a.gemm_ceiling)
      std::printf("# sgemm 2048^3 (OpenBLAS): %.1f GFLOP/s (min over ranks)\n", gemm);
    if (a.bw_ceiling)
      std::printf(
          "# memory copy of %.0f MiB, read + write, %d threads: %.1f GB/s (min over "
          "ranks)\n",
          static_cast<double>(a.bw_bytes) / (1 << 20), omp_get_max_threads(), copy);
    std::printf("# %9s %11s %10s %10s%s %12s%s%s\n", "seq", "time(ms)", "TFLOP/s", "GFLOP/s",
                a.op == AttnOp::kDecode ? "  kv_GB/s" : "", a.check ? "max_abs_err" : "",
                a.gemm_ceiling ? "  vs_sgemm" : "", a.bw_ceiling ? "  vs_copy" : "");
  }
  JsonRow header;
  header.set("op", a.op_name)
      .set("device", a.device.str())
      .set("cpu_kernel", kernels::cpu::cpu_kernel_isa_name(kernels::cpu::active_cpu_kernel_isa()))
      .set("dtype", dtype_name(a.dtype))
      .set("batch", a.batch)
      .set("heads", a.heads)
      .set("kv_heads", a.kv_heads)
      .set("dim", a.dim)
      .set("dim_v", a.dim_v)
      .set("causal", a.causal)
      .set("window", a.window.empty() ? std::string("none") : a.window)
      .set("sink_tokens", a.sink_tokens)
      .set("sinks", a.sinks)
      .set("decode_queries", a.decode_queries)
      .set("ranks", info.size)
      .set("threads", omp_get_max_threads())
      .set("iters", a.iters)
      .set("warmup", a.warmup);
  if (a.gemm_ceiling) header.set("sgemm_gflops", gemm);
  if (a.bw_ceiling) header.set("copy_gbps", copy).set("copy_bytes", a.bw_bytes);
  std::vector<JsonRow> rows;
  bool all_ok = true;
  for (int64_t s = a.seq_begin; s <= a.seq_end;) {
    Problem p(a, s);
    for (int i = 0; i < a.warmup; ++i) p.run();
    world->barrier();
    const double mine = time_runs(a.device, a.iters, [&] { p.run(); });
    const double t = max_over_ranks(*world, mine);
    const double flops = p.flops();
    JsonRow row;
    row.set("op", a.op_name)
        .set("window", a.window.empty() ? std::string("none") : a.window)
        .set("sink_tokens", a.sink_tokens)
        .set("docs", static_cast<int64_t>(p.cu.empty() ? 1 : p.cu.size() - 1))
        .set("seq", p.sk)
        .set("seq_q", p.sq)
        .set("seq_k", p.sk)
        .set("time_ms", t * 1e3)
        .set("flops", flops)
        .set("tflops", flops / t / 1e12)
        .set("gflops", flops / t / 1e9);
    std::string kv_text, copy_text;
    if (a.op == AttnOp::kDecode) {
      // Decode is bound by reading the cache: K and V bytes per second.
      const double gbps = p.kv_bytes() / t / 1e9;
      row.set("kv_gbps", gbps);
      kv_text = fmt("  %7.2f", gbps);
      if (a.bw_ceiling) {
        row.set("vs_copy", gbps / copy);
        copy_text = fmt("  %7.3f", gbps / copy);
      }
    }
    std::string err_text, check_line;
    if (a.check) {
      std::string what;
      const Err e = p.check(what);
      // Every rank ran the same problem: report the worst.
      const double err = max_over_ranks(*world, e.max_abs);
      const double ref = max_over_ranks(*world, e.max_ref);
      const double rel = ref > 0 ? err / ref : err;
      const bool ok = rel <= check_tolerance(a.dtype);
      all_ok = all_ok && ok;
      row.set("max_abs_err", err)
          .set("max_ref", ref)
          .set("rel_err", rel)
          .set("checked", what)
          .set("ok", ok);
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%12.3e", err);
      err_text = buf;
      check_line = "#   check vs fp64 reference: " + what + "; relative " + fmt("%.2e", rel) +
                   " (limit " + fmt("%.0e", check_tolerance(a.dtype)) + ") " +
                   (ok ? "OK" : "FAILED");
    } else {
      row.set("max_abs_err", std::numeric_limits<double>::quiet_NaN());
    }
    std::string ratio;
    if (a.gemm_ceiling) {
      const double r = flops / t / 1e9 / gemm;
      row.set("vs_sgemm", r);
      char buf[32];
      std::snprintf(buf, sizeof(buf), "  %8.3f", r);
      ratio = buf;
    }
    if (root)
      std::printf("  %9ld %11.3f %10.4f %10.2f%s %12s%s%s\n", static_cast<long>(p.sk), t * 1e3,
                  flops / t / 1e12, flops / t / 1e9, kv_text.c_str(), err_text.c_str(),
                  ratio.c_str(), copy_text.c_str());
    if (root && !check_line.empty()) std::printf("%s\n", check_line.c_str());
    std::fflush(stdout);
    rows.push_back(row);
    const int64_t next = static_cast<int64_t>(std::llround(static_cast<double>(s) * a.factor));
    if (a.seq_end == a.seq_begin || next <= s) break;
    s = next;
  }
  if (root) {
    write_json(a.json, command, header, rows);
    if (a.check) std::printf("# %s\n", all_ok ? "OK" : "FAILED");
  }
  return all_ok ? 0 : 1;
}

}  // namespace

DISTATTN_BENCH_COMMAND("attn", "local attention fwd/bwd/decode timing, .npy round trip", attn_main);

}  // namespace distattn::bench
