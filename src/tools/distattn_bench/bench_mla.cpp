// distattn-bench mla: MLA decode under MLA-TP vs TPLA vs decode-CP (time, bytes, memory per
// rank) and the accuracy of TPLA's per-shard softmax vs exact MLA.
//
//   mpirun -np 2 distattn-bench mla --decode --device cpu --context 8K,32K,64K --json d.json
//   mpirun -np 2 distattn-bench mla --accuracy --device cpu --context 4K --json a.json
//
// --decode (TP = number of ranks): each rank holds its shard of one sequence's paged latent
// cache (DeepSeek-V3 dims by default: 128 heads, latent 512, k_pe 64, page 64, bf16) and
// times one decode step's attention core:
//   mla-tp     ops::mla_decode, H/TP heads over the whole [512 | 64] cache
//   tpla       ops::mla_decode, H/(TP/g) heads over the [512/g | 64] shard (g = TP, and g = 2
//              when TP > 2: heads split TP/g ways inside a latent group)
//   decode-cp  decode_cp_attention: all H heads over the rank's round-robin pages, then the
//              all-gather of fp32 partials and the LSE merge
// The output projection's all-reduce of y [hidden] is the same for all three and left out.
// --device cuda copies each shard to this rank's GPU and runs the CUDA kernels (CUDA
// builds); the communicator is then NCCL when every rank has its own GPU.
// time = max over ranks of the per-rank mean over -n steps after -w warm-up steps; each step
// runs from a barrier to a barrier (a decode step ends when its slowest rank is done).
// kv_bytes_per_rank = cache bytes the step reads on the busiest rank; kv_memory_per_rank =
// cache bytes allocated for the context on the busiest rank.
//
// --accuracy: relative error (Frobenius, over all heads and evaluated decode steps) of the
// latent-space attention output diag(gamma) o_lat of TPLA vs exact MLA, for g in --groups x
// rotation {none, hadamard, pca} x RMSNorm {sliced, exact} x data {gaussian, structured}.
// A prompt of --context tokens is prefilled exactly (normalized latents, rotated + sliced by
// the resharding), then --decode-len tokens are decoded; decode tokens' latents go through
// TPLA's RMSNorm (sliced: each shard normalizes its own slice; exact: full-vector norm).
// Attention is evaluated every --eval-every decode steps. Data recipes: see docs/MLA.md.
// The TPLA side runs the library functions MlaDecoder itself uses (make_tpla_reparam,
// calibrate_tpla_mu, reshard_to_tpla, tpla_normalize_slice, tpla_shard_attention), all g
// shards in one process (g may exceed the ranks); tests/mpi/test_mla_sharding.cpp checks
// MlaDecoder against an independent fp64 TPLA.
// Configurations are spread over the ranks.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/mla.h"
#include "distattn/parallel/mla.h"
#include "distattn/runtime.h"
#include "src/tools/distattn_bench/bench_common.h"

namespace distattn::bench {
namespace {

namespace po = boost::program_options;
using parallel::MlaCache;
using parallel::MlaSharding;
using parallel::TplaNorm;
using parallel::TplaRotation;

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) v.push_back(static_cast<int64_t>(parse_size(item)));
  DISTATTN_CHECK(!v.empty(), "empty list '", s, "' (use e.g. 8K,32K,64K)");
  return v;
}

// Cheap deterministic fill: value depends on (seed, global index) only.
float hval(uint64_t seed, uint64_t i) {
  uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(static_cast<double>(x >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

// A cache of `tokens` tokens with rows [dl | dr]; token t's row holds the values of global
// token `token_ids[t]` (so shards of one sequence hold the same data as the whole cache).
MlaCache make_cache(const std::vector<int64_t>& token_ids, int64_t capacity, int64_t page,
                    int64_t dl, int64_t dr, DType dtype) {
  MlaCache c(capacity, page, dl, dr, dtype);
  constexpr int64_t kChunk = 256;
  std::vector<float> lat(static_cast<size_t>(kChunk * dl)),
      pe(static_cast<size_t>(kChunk * std::max<int64_t>(dr, 1)));
  for (size_t t0 = 0; t0 < token_ids.size(); t0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, static_cast<int64_t>(token_ids.size() - t0));
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t g = static_cast<uint64_t>(token_ids[t0 + static_cast<size_t>(i)]);
      for (int64_t d = 0; d < dl; ++d)
        lat[static_cast<size_t>(i * dl + d)] = hval(1, g * 1024 + static_cast<uint64_t>(d));
      for (int64_t d = 0; d < dr; ++d)
        pe[static_cast<size_t>(i * dr + d)] = hval(2, g * 1024 + static_cast<uint64_t>(d));
    }
    c.append(lat.data(), pe.data(), n);
  }
  return c;
}

struct DecodeArgs {
  std::vector<int64_t> contexts;
  int64_t heads = 128, latent = 512, rope = 64, page = 64;
  DType dtype = DType::kBFloat16;
  int iters = 5, warmup = 1;
  Device device = Device::cpu();
  std::string json;
};

int run_decode(const DecodeArgs& a, comm::Communicator& world) {
  const int p = world.size(), r = world.rank();
  std::vector<JsonRow> rows;
  if (r == 0) {
    std::printf("%s", environment_header().c_str());
    std::printf(
        "# mla --decode: tp=%d heads=%lld latent=%lld rope=%lld page=%lld cache=%s "
        "iters=%d warmup=%d device=%s\n",
        p, static_cast<long long>(a.heads), static_cast<long long>(a.latent),
        static_cast<long long>(a.rope), static_cast<long long>(a.page), dtype_name(a.dtype),
        a.iters, a.warmup, a.device.str().c_str());
    std::printf("# %-9s %3s %2s %8s %6s %6s %13s %13s %10s %9s %8s %8s\n", "sharding", "tp", "g",
                "context", "heads", "width", "kv_bytes/rk", "kv_mem/rk", "time_ms", "GFLOP/s",
                "vs_tp", "vs_flops");
  }
  Device dev = a.device;
  if (dev.is_cuda()) {
    DISTATTN_CHECK_STATUS(built_with_cuda() && cuda_device_count() > 0, Status::kUnsupported,
                          "mla --decode --device cuda: this build/machine has no CUDA device "
                          "(built with CUDA: ",
                          built_with_cuda(), "); use --device cpu");
    if (runtime_info().device.is_cuda()) dev = runtime_info().device;  // this rank's GPU
  }
  DISTATTN_CHECK(a.heads % p == 0, "mla --decode: heads (", a.heads,
                 ") must be divisible by the number of ranks (", p, ")");
  const float scale = 1.0f / std::sqrt(192.0f);
  for (int64_t ctx : a.contexts) {
    struct Variant {
      MlaSharding s;
      int g;
    };
    std::vector<Variant> vars = {{MlaSharding::kMlaTp, 1}, {MlaSharding::kTpla, p}};
    if (p > 2 && p % 2 == 0) vars.push_back({MlaSharding::kTpla, 2});
    vars.push_back({MlaSharding::kDecodeCp, 1});
    // Build every variant's shard first, then time them interleaved step by step, so that
    // all three see the same machine load (these CPUs are shared).
    struct Bench {
      Variant v;
      int64_t heads, dl;
      MlaCache cache;
      Tensor q_lat, q_pe, out, lse;
      Tensor d_pages, d_table, d_lens;  // device copies of the cache (--device cuda)
      ops::MlaPagedCache view;
      double total = 0;
    };
    std::vector<Bench> benches;
    for (const Variant& v : vars) {
      int64_t heads = a.heads, dl = a.latent;
      std::vector<int64_t> ids;
      int64_t capacity = ctx;
      if (v.s == MlaSharding::kMlaTp) {
        heads = a.heads / p;
      } else if (v.s == MlaSharding::kTpla) {
        DISTATTN_CHECK(a.latent % v.g == 0 && a.heads % (p / v.g) == 0,
                       "mla --decode: tpla g=", v.g,
                       " needs latent % g == 0 and heads % (tp/g) == 0");
        heads = a.heads / (p / v.g);
        dl = a.latent / v.g;
      }
      if (v.s == MlaSharding::kDecodeCp) {
        for (int64_t pg = r; pg * a.page < ctx; pg += p)
          for (int64_t t = pg * a.page; t < std::min((pg + 1) * a.page, ctx); ++t) ids.push_back(t);
        capacity = parallel::decode_cp_local_pages(ctx, a.page, r, p) * a.page;
      } else {
        ids.resize(static_cast<size_t>(ctx));
        for (int64_t t = 0; t < ctx; ++t) ids[static_cast<size_t>(t)] = t;
      }
      // For timing only the shard's width matters: TPLA data is generated at width dl.
      Bench bn{v, heads, dl, make_cache(ids, capacity, a.page, dl, a.rope, a.dtype)};
      bn.q_lat = Tensor::empty({1, heads, dl}, DType::kFloat32);
      bn.q_pe = Tensor::empty({1, heads, a.rope}, DType::kFloat32);
      for (int64_t i = 0; i < bn.q_lat.numel(); ++i)
        bn.q_lat.data_as<float>()[i] = hval(3, static_cast<uint64_t>(i));
      for (int64_t i = 0; i < bn.q_pe.numel(); ++i)
        bn.q_pe.data_as<float>()[i] = hval(4, static_cast<uint64_t>(i));
      bn.out = Tensor::empty({1, heads, dl}, DType::kFloat32, dev);
      bn.lse = Tensor::empty({1, heads}, DType::kFloat32, dev);
      bn.view = bn.cache.view();
      if (dev.is_cuda()) {
        bn.q_lat = to_device(bn.q_lat, dev);
        bn.q_pe = to_device(bn.q_pe, dev);
        bn.d_pages = to_device(bn.view.pages, dev);
        bn.d_table = to_device(bn.view.page_table, dev);
        bn.d_lens = to_device(bn.view.seq_lens, dev);
        bn.view.pages = bn.d_pages;
        bn.view.page_table = bn.d_table;
        bn.view.seq_lens = bn.d_lens;
      }
      benches.push_back(std::move(bn));
    }
    ops::MlaDecodeOptions opts;
    opts.softmax_scale = scale;
    auto step = [&](Bench& bn) {
      if (bn.v.s == MlaSharding::kDecodeCp)
        parallel::decode_cp_attention(world, bn.q_lat, bn.q_pe, bn.view, bn.out, bn.lse, opts);
      else
        ops::mla_decode(bn.q_lat, bn.q_pe, bn.view, bn.out, bn.lse, opts);
      if (dev.is_cuda()) {  // the kernels run on the default stream: a synchronous copy waits
        float done = 0;
        device_copy(&done, Device::cpu(), bn.lse.data(), dev, sizeof(float));
      }
    };
    for (int i = 0; i < a.warmup; ++i)
      for (auto& bn : benches) step(bn);
    for (int i = 0; i < a.iters; ++i)
      for (auto& bn : benches) {
        world.barrier();
        const double t0 = now_seconds();
        step(bn);
        // A real decode step ends in the y all-reduce: it lasts until the slowest rank is
        // done, so every variant is timed to a closing barrier.
        world.barrier();
        bn.total += now_seconds() - t0;
      }
    double tp_time = 0, tp_flops = 0;
    for (auto& bn : benches) {
      const Variant& v = bn.v;
      const int64_t heads = bn.heads, dl = bn.dl;
      const MlaCache& cache = bn.cache;
      const double t_ms = max_over_ranks(world, bn.total / a.iters * 1e3);
      const double bytes = max_over_ranks(world, static_cast<double>(cache.kv_bytes_read()));
      const double mem = max_over_ranks(world, static_cast<double>(cache.kv_memory_bytes()));
      const double flops =
          max_over_ranks(world, ops::mla_decode_flops(heads, cache.length(), dl, a.rope));
      if (v.s == MlaSharding::kMlaTp) {
        tp_time = t_ms;
        tp_flops = flops;
      }
      const double ratio = tp_time > 0 ? t_ms / tp_time : 0;
      // Time ratio over FLOP ratio: 1 = no overhead beyond the extra FLOPs.
      const double vs_model = tp_flops > 0 ? ratio / (flops / tp_flops) : 0;
      const double gflops = flops / (t_ms * 1e-3) / 1e9;
      if (r == 0) {
        std::printf("  %-9s %3d %2d %8lld %6lld %6lld %13.0f %13.0f %10.3f %9.1f %8.3f %8.3f\n",
                    parallel::sharding_name(v.s), p, v.s == MlaSharding::kTpla ? v.g : 0,
                    static_cast<long long>(ctx), static_cast<long long>(heads),
                    static_cast<long long>(dl + a.rope), bytes, mem, t_ms, gflops, ratio, vs_model);
        JsonRow row;
        row.set("sharding", parallel::sharding_name(v.s))
            .set("tp", p)
            .set("context", ctx)
            .set("time_ms", t_ms)
            .set("kv_bytes_per_rank", static_cast<int64_t>(bytes))
            .set("kv_memory_per_rank", static_cast<int64_t>(mem))
            .set("groups", v.s == MlaSharding::kTpla ? v.g : 0)
            .set("heads_per_rank", heads)
            .set("row_width", dl + a.rope)
            .set("flops_per_rank", flops)
            .set("gflops", gflops)
            .set("time_vs_mla_tp", ratio)
            .set("time_vs_flop_model", vs_model)
            .set("cache_dtype", dtype_name(a.dtype));
        rows.push_back(row);
      }
    }
  }
  if (r == 0) {
    JsonRow header;
    header.set("tp", p)
        .set("heads", a.heads)
        .set("latent", a.latent)
        .set("rope", a.rope)
        .set("page", a.page)
        .set("cache_dtype", dtype_name(a.dtype))
        .set("iters", a.iters)
        .set("device", a.device.str());
    write_json(a.json, "mla --decode", header, rows);
  }
  return 0;
}

// ---- accuracy ------------------------------------------------------------------------------

struct AccArgs {
  int64_t prompt = 4096, decode_len = 4096, heads = 16, latent = 512, rope = 64, page = 64;
  int64_t eval_every = 512, calib_tokens = 2048, calib_queries = 4096;
  std::vector<int64_t> groups = {2, 4, 8};
  double logit_std = 3.0;
  uint64_t seed = 1;
  std::string json;
};

// Latent data: gaussian = i.i.d. N(0, 1). structured = anisotropic spectrum in a random
// orthonormal basis plus a mean and 4 outlier channels (docs/MLA.md):
//   c_raw = mean + sum_k sigma_k z_k r_k + outliers,   sigma_k = 1 / (1 + k/16),
//   outlier channels {7, 100, 300, 411}: +-(6 + 2 z) (fixed sign per channel).
struct LatentGen {
  bool structured = false;
  int64_t d = 512;
  std::vector<double> basis;  // [d, d] rows r_k (orthonormal)
  std::vector<double> mean;
  LatentGen(bool s, int64_t dim, uint64_t seed) : structured(s), d(dim) {
    if (!s) return;
    std::mt19937_64 rng(seed * 7919 + 13);
    std::normal_distribution<double> nd;
    basis.resize(static_cast<size_t>(d * d));
    for (auto& x : basis) x = nd(rng);
    for (int64_t k = 0; k < d; ++k) {  // Gram-Schmidt (twice for stability)
      double* rk = basis.data() + k * d;
      for (int pass = 0; pass < 2; ++pass)
        for (int64_t j = 0; j < k; ++j) {
          const double* rj = basis.data() + j * d;
          double dot = 0;
          for (int64_t i = 0; i < d; ++i) dot += rk[i] * rj[i];
          for (int64_t i = 0; i < d; ++i) rk[i] -= dot * rj[i];
        }
      double n = 0;
      for (int64_t i = 0; i < d; ++i) n += rk[i] * rk[i];
      n = 1 / std::sqrt(n);
      for (int64_t i = 0; i < d; ++i) rk[i] *= n;
    }
    mean.resize(static_cast<size_t>(d));
    for (auto& m : mean) m = 0.3 * nd(rng);
  }
  void sample(std::mt19937_64& rng, float* out, int64_t n) const {
    std::normal_distribution<double> nd;
    std::vector<double> row(static_cast<size_t>(d));
    static const int64_t kOut[4] = {7, 100, 300, 411};
    for (int64_t t = 0; t < n; ++t) {
      if (!structured) {
        for (int64_t i = 0; i < d; ++i) out[t * d + i] = static_cast<float>(nd(rng));
        continue;
      }
      std::copy(mean.begin(), mean.end(), row.begin());
      for (int64_t k = 0; k < d; ++k) {
        const double z = nd(rng) / (1.0 + static_cast<double>(k) / 16.0);
        const double* rk = basis.data() + k * d;
        for (int64_t i = 0; i < d; ++i) row[static_cast<size_t>(i)] += z * rk[i];
      }
      for (int o = 0; o < 4; ++o) {
        const int64_t c = kOut[o] % d;
        row[static_cast<size_t>(c)] += (o % 2 ? -1.0 : 1.0) * (6.0 + 2.0 * nd(rng));
      }
      for (int64_t i = 0; i < d; ++i)
        out[t * d + i] = static_cast<float>(row[static_cast<size_t>(i)]);
    }
  }
};

void normalize_rows(float* x, int64_t n, int64_t d, int64_t ld, float eps = 1e-6f) {
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[t * ld + i]) * x[t * ld + i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    for (int64_t i = 0; i < d; ++i) x[t * ld + i] *= inv;
  }
}

struct AccRow {
  int g;
  TplaRotation rot;
  TplaNorm norm;
  bool structured;
  double rel_err;
  double mu_mean;
};

int run_accuracy(const AccArgs& a, comm::Communicator& world) {
  const int p = world.size(), r = world.rank();
  const int64_t d = a.latent, dr = a.rope, h = a.heads, total = a.prompt + a.decode_len;
  const float scale = 1.0f / std::sqrt(192.0f);
  for (int64_t g : a.groups)
    DISTATTN_CHECK(g >= 1 && d % g == 0,
                   "mla --accuracy: every group count must divide the "
                   "latent width ",
                   d, ", got ", g);
  if (r == 0) {
    std::printf("%s", environment_header().c_str());
    std::printf(
        "# mla --accuracy: prompt=%lld decode=%lld heads=%lld latent=%lld rope=%lld "
        "eval_every=%lld logit_std=%.1f calib_tokens=%lld calib_queries=%lld ranks=%d\n",
        static_cast<long long>(a.prompt), static_cast<long long>(a.decode_len),
        static_cast<long long>(h), static_cast<long long>(d), static_cast<long long>(dr),
        static_cast<long long>(a.eval_every), a.logit_std, static_cast<long long>(a.calib_tokens),
        static_cast<long long>(a.calib_queries), p);
    std::printf("# %-6s %-9s %-7s %-11s %10s %8s\n", "groups", "rotation", "rmsnorm", "data",
                "rel_err", "mu_mean");
  }
  const TplaRotation rots[3] = {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca};
  const TplaNorm norms[2] = {TplaNorm::kSliced, TplaNorm::kExact};
  // Work items: (data, rotation) pairs over the ranks; each does all g x norm for its pair.
  std::vector<double> results;  // flattened [data][rot][g][norm] x {rel_err, mu}
  const size_t ng = a.groups.size();
  results.assign(2 * 3 * ng * 2 * 2, 0.0);
  for (int data = 0; data < 2; ++data) {
    const bool structured = data == 1;
    for (int ri = 0; ri < 3; ++ri) {
      if ((data * 3 + ri) % p != r) continue;
      const uint64_t seed = a.seed * 1000 + static_cast<uint64_t>(data);
      LatentGen gen(structured, d, seed);
      std::mt19937_64 rng(seed);
      std::normal_distribution<double> nd;
      std::vector<float> raw(static_cast<size_t>(total * d)), kpe(static_cast<size_t>(total * dr));
      gen.sample(rng, raw.data(), total);
      for (auto& x : kpe) x = static_cast<float>(nd(rng));
      std::vector<float> gamma(static_cast<size_t>(d));
      for (auto& x : gamma)
        x = static_cast<float>(1.0 +
                               0.25 * (2.0 * std::uniform_real_distribution<double>()(rng) - 1.0));
      std::vector<float> cnorm(raw);
      normalize_rows(cnorm.data(), total, d, d);
      // Queries: absorbed q_lat = gamma * z (isotropic z), sized for the requested logit std.
      const double sigma_q = a.logit_std / (scale * std::sqrt(static_cast<double>(d)));
      auto make_queries = [&](int64_t n, float* ql, float* qp) {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < d; ++j)
            ql[i * d + j] = static_cast<float>(sigma_q * nd(rng)) * gamma[static_cast<size_t>(j)];
        if (qp)
          for (int64_t i = 0; i < n * dr; ++i) qp[i] = static_cast<float>(nd(rng));
      };
      // Calibration set: other latents and queries from the same recipe.
      std::vector<float> cal(static_cast<size_t>(a.calib_tokens * d));
      gen.sample(rng, cal.data(), a.calib_tokens);
      normalize_rows(cal.data(), a.calib_tokens, d, d);
      std::vector<float> calq(static_cast<size_t>(a.calib_queries * d));
      make_queries(a.calib_queries, calq.data(), nullptr);
      // Evaluation steps and their queries.
      std::vector<int64_t> steps;
      for (int64_t t = a.eval_every - 1; t < a.decode_len; t += a.eval_every) steps.push_back(t);
      if (steps.empty() || steps.back() != a.decode_len - 1) steps.push_back(a.decode_len - 1);
      const int64_t ns = static_cast<int64_t>(steps.size());
      std::vector<float> qlat(static_cast<size_t>(ns * h * d)),
          qpe(static_cast<size_t>(ns * h * dr));
      make_queries(ns * h, qlat.data(), qpe.data());

      // Exact MLA outputs (the cache of normalized latents, kernel in fp32).
      auto decode = [&](const MlaCache& cache, int64_t len, const float* ql, const float* qp,
                        int64_t dl, float mu, float* o) {
        ops::MlaPagedCache v = cache.view();
        Tensor lens = Tensor::empty({1}, DType::kInt32);
        lens.data_as<int32_t>()[0] = static_cast<int32_t>(len);
        v.seq_lens = lens;
        TensorView qlv(const_cast<float*>(ql), DType::kFloat32, Device::cpu(), {1, h, dl});
        TensorView qpv(const_cast<float*>(qp), DType::kFloat32, Device::cpu(), {1, h, dr});
        Tensor lse = Tensor::empty({1, h}, DType::kFloat32);
        TensorView ov(o, DType::kFloat32, Device::cpu(), {1, h, dl});
        ops::MlaDecodeOptions opts;
        opts.softmax_scale = scale;
        opts.latent_logit_scale = mu;
        ops::mla_decode(qlv, qpv, v, ov, lse, opts);
      };
      MlaCache exact(total, a.page, d, dr, DType::kFloat32);
      exact.append(cnorm.data(), kpe.data(), total);
      std::vector<float> ref(static_cast<size_t>(ns * h * d));
      for (int64_t si = 0; si < ns; ++si)
        decode(exact, a.prompt + steps[static_cast<size_t>(si)] + 1, qlat.data() + si * h * d,
               qpe.data() + si * h * dr, d, 1.0f, ref.data() + si * h * d);
      double ref_norm = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        const double v = ref[i] * gamma[i % static_cast<size_t>(d)];
        ref_norm += v * v;
      }

      const TplaRotation rot = rots[ri];
      // The library's TPLA path, as MlaDecoder runs it on the rank of latent group i:
      // make_tpla_reparam / calibrate_tpla_mu (U, mu), reshard_to_tpla (prompt: rotate the
      // normalized latents, slice), tpla_normalize_slice (decode tokens: slice of the rotated
      // raw latent, sliced or exact RMSNorm), tpla_shard_attention (per-shard softmax with
      // mu_i). MlaDecoder folds U into W_UK / W_UV; here the queries are rotated and the
      // shard outputs rotated back (o_lat += O_i U_i^T), the same linear maps.
      // The rotation does not depend on g: one U, mu re-fitted per g.
      const auto rp0 = parallel::make_tpla_reparam(d, 1, rot, seed, cal.data(), a.calib_tokens);
      MlaCache prompt_cache(a.prompt, a.page, d, dr, DType::kFloat32);
      prompt_cache.append(cnorm.data(), kpe.data(), a.prompt);
      std::vector<float> rawrot(raw.begin() + a.prompt * d, raw.end()), qrot(qlat);
      rp0.rotate_rows(rawrot.data(), a.decode_len);
      rp0.rotate_rows(qrot.data(), ns * h);
      std::vector<double> raw_ss(static_cast<size_t>(a.decode_len), 0.0);
      for (int64_t t = 0; t < a.decode_len; ++t)
        for (int64_t k = 0; k < d; ++k) {
          const double v = raw[static_cast<size_t>((a.prompt + t) * d + k)];
          raw_ss[static_cast<size_t>(t)] += v * v;
        }
      for (size_t gi = 0; gi < ng; ++gi) {
        const int g = static_cast<int>(a.groups[gi]);
        parallel::TplaReparam rp = rp0;
        rp.groups = g;
        parallel::calibrate_tpla_mu(rp, cal.data(), a.calib_tokens, calq.data(), a.calib_queries);
        const int64_t w = d / g;
        double mu_mean = 0;
        for (float m : rp.mu) mu_mean += m / g;
        for (int ni = 0; ni < 2; ++ni) {
          const TplaNorm norm = norms[ni];
          std::vector<double> approx(static_cast<size_t>(ns * h * d), 0.0);
          std::vector<float> sl(static_cast<size_t>(w)), o(static_cast<size_t>(h * w));
          std::vector<float> qs(static_cast<size_t>(h * w));
          Tensor lse = Tensor::empty({1, h}, DType::kFloat32);
          Tensor lens = Tensor::empty({1}, DType::kInt32);
          ops::MlaDecodeOptions opts;
          opts.softmax_scale = scale;
          for (int gs = 0; gs < g; ++gs) {
            MlaCache shard = parallel::reshard_to_tpla(prompt_cache, rp, gs, total);
            for (int64_t t = 0; t < a.decode_len; ++t) {
              const float* src = rawrot.data() + t * d + gs * w;
              std::copy(src, src + w, sl.data());
              parallel::tpla_normalize_slice(sl.data(), w, norm, raw_ss[static_cast<size_t>(t)], d,
                                             1e-6f);
              shard.append(sl.data(), kpe.data() + (a.prompt + t) * dr, 1);
            }
            ops::MlaPagedCache view = shard.view();
            view.seq_lens = lens;
            for (int64_t si = 0; si < ns; ++si) {
              for (int64_t hh = 0; hh < h; ++hh)
                std::copy(qrot.data() + (si * h + hh) * d + gs * w,
                          qrot.data() + (si * h + hh) * d + (gs + 1) * w, qs.data() + hh * w);
              lens.data_as<int32_t>()[0] =
                  static_cast<int32_t>(a.prompt + steps[static_cast<size_t>(si)] + 1);
              TensorView qv(qs.data(), DType::kFloat32, Device::cpu(), {1, h, w});
              TensorView pv(qpe.data() + si * h * dr, DType::kFloat32, Device::cpu(), {1, h, dr});
              TensorView ov(o.data(), DType::kFloat32, Device::cpu(), {1, h, w});
              parallel::tpla_shard_attention(rp, gs, qv, pv, view, ov, lse, opts);
              // Back to the unrotated latent space: o_lat += O_i U_i^T.
              for (int64_t hh = 0; hh < h; ++hh) {
                double* dst = approx.data() + (si * h + hh) * d;
                const float* oi = o.data() + hh * w;
                for (int64_t k = 0; k < d; ++k) {
                  const double* uk = rp.u.data() + k * d + gs * w;
                  double acc = 0;
                  for (int64_t j = 0; j < w; ++j) acc += uk[j] * oi[j];
                  dst[k] += acc;
                }
              }
            }
          }
          double err = 0;
          for (size_t i = 0; i < approx.size(); ++i) {
            const double gm = gamma[i % static_cast<size_t>(d)];
            const double e = (approx[i] - ref[i]) * gm;
            err += e * e;
          }
          const size_t idx = (((static_cast<size_t>(data) * 3 + ri) * ng + gi) * 2 + ni) * 2;
          results[idx] = std::sqrt(err / ref_norm);
          results[idx + 1] = mu_mean;
        }
      }
    }
  }
  world.all_reduce(results.data(), results.data(), results.size(), DType::kFloat64,
                   comm::ReduceOp::kSum);
  if (r == 0) {
    std::vector<JsonRow> rows;
    for (int data = 0; data < 2; ++data)
      for (size_t gi = 0; gi < ng; ++gi)
        for (int ri = 0; ri < 3; ++ri)
          for (int ni = 0; ni < 2; ++ni) {
            const size_t idx = (((static_cast<size_t>(data) * 3 + ri) * ng + gi) * 2 + ni) * 2;
            const char* dn = data ? "structured" : "gaussian";
            std::printf("  %-6lld %-9s %-7s %-11s %10.5f %8.3f\n",
                        static_cast<long long>(a.groups[gi]), parallel::rotation_name(rots[ri]),
                        parallel::norm_name(norms[ni]), dn, results[idx], results[idx + 1]);
            JsonRow row;
            row.set("groups", a.groups[gi])
                .set("rotation", parallel::rotation_name(rots[ri]))
                .set("rmsnorm", parallel::norm_name(norms[ni]))
                .set("data", dn)
                .set("rel_err", results[idx])
                .set("mu_mean", results[idx + 1])
                .set("prompt", a.prompt)
                .set("decode", a.decode_len);
            rows.push_back(row);
          }
    JsonRow header;
    header.set("prompt", a.prompt)
        .set("decode", a.decode_len)
        .set("heads", a.heads)
        .set("latent", a.latent)
        .set("rope", a.rope)
        .set("eval_every", a.eval_every)
        .set("logit_std", a.logit_std);
    write_json(a.json, "mla --accuracy", header, rows);
  }
  return 0;
}

int mla_main(int argc, char** argv) {
  po::options_description desc("distattn-bench mla options");
  std::string context = "8K,32K,64K", device = "cpu", dtype = "bf16", groups = "2,4,8", json;
  DecodeArgs d;
  AccArgs ac;
  std::string decode_len = "4K";
  desc.add_options()("help,h", "this help")("decode", "decode time/bytes/memory per rank")(
      "accuracy", "TPLA accuracy vs exact MLA")("device", po::value(&device)->default_value("cpu"),
                                                "cpu | cuda")(
      "context", po::value(&context),
      "context lengths, comma separated (decode default 8K,32K,64K; accuracy: the prompt, "
      "default 4K)")("json", po::value(&json), "write rows as JSON to FILE")(
      "heads", po::value<int64_t>(), "query heads (decode default 128, accuracy 16)")(
      "latent", po::value<int64_t>(), "kv_lora_rank (default 512)")(
      "rope", po::value<int64_t>(), "qk_rope (default 64)")("page", po::value<int64_t>(),
                                                            "page size in tokens (default 64)")(
      "dtype,d", po::value(&dtype)->default_value("bf16"), "decode cache dtype: bf16 | fp32")(
      "iters,n", po::value(&d.iters)->default_value(5), "decode: timed steps")(
      "warmup,w", po::value(&d.warmup)->default_value(1), "decode: warm-up steps")(
      "groups", po::value(&groups)->default_value("2,4,8"), "accuracy: TPLA group counts")(
      "decode-len", po::value(&decode_len)->default_value("4K"), "accuracy: decoded tokens")(
      "eval-every", po::value(&ac.eval_every)->default_value(512),
      "accuracy: evaluate attention every N decode steps")(
      "logit-std", po::value(&ac.logit_std)->default_value(3.0),
      "accuracy: std of the latent logits (query scale)")(
      "seed", po::value(&ac.seed)->default_value(1), "accuracy: data seed")(
      "calib-tokens", po::value(&ac.calib_tokens)->default_value(2048),
      "accuracy: calibration latents (PCA and the mu fit)")(
      "calib-queries", po::value(&ac.calib_queries)->default_value(4096),
      "accuracy: calibration queries of the mu fit (each against every calibration latent)");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, desc), vm);
  po::notify(vm);
  if (vm.count("help") || (vm.count("decode") == 0 && vm.count("accuracy") == 0)) {
    std::cout << "usage: mpirun -np TP distattn-bench mla --decode|--accuracy [options]\n"
              << desc << "\n";
    return vm.count("help") ? 0 : 2;
  }
  DISTATTN_CHECK(vm.count("decode") + vm.count("accuracy") == 1,
                 "mla: pass exactly one of --decode and --accuracy");
  if (vm.count("decode")) {
    d.contexts = parse_list(vm.count("context") ? context : "8K,32K,64K");
    if (vm.count("heads")) d.heads = vm["heads"].as<int64_t>();
    if (vm.count("latent")) d.latent = vm["latent"].as<int64_t>();
    if (vm.count("rope")) d.rope = vm["rope"].as<int64_t>();
    if (vm.count("page")) d.page = vm["page"].as<int64_t>();
    d.dtype = parse_dtype(dtype);
    d.device = parse_device(device);
    d.json = json;
    DISTATTN_CHECK(d.iters >= 1 && d.warmup >= 0, "mla: -n must be >= 1 and -w >= 0");
    // NCCL when every rank has its own GPU, MPI otherwise (CPU, or GPUs shared by ranks).
    std::unique_ptr<comm::Communicator> world = comm::create_world(
        comm::Backend::kAuto, d.device.is_cuda() && runtime_info().device.is_cuda()
                                  ? runtime_info().device
                                  : Device::cpu());
    return run_decode(d, *world);
  }
  DISTATTN_CHECK(parse_device(device).is_cpu(),
                 "mla --accuracy runs on the CPU (it measures "
                 "TPLA's math, not a device); use --device cpu");
  ac.prompt = vm.count("context") ? parse_list(context).front() : 4096;
  ac.decode_len = static_cast<int64_t>(parse_size(decode_len));
  if (vm.count("heads")) ac.heads = vm["heads"].as<int64_t>();
  if (vm.count("latent")) ac.latent = vm["latent"].as<int64_t>();
  if (vm.count("rope")) ac.rope = vm["rope"].as<int64_t>();
  if (vm.count("page")) ac.page = vm["page"].as<int64_t>();
  ac.groups = parse_list(groups);
  ac.json = json;
  DISTATTN_CHECK(ac.prompt >= 1 && ac.decode_len >= 1 && ac.eval_every >= 1,
                 "mla --accuracy: context, --decode-len and --eval-every must be >= 1");
  DISTATTN_CHECK(ac.calib_tokens >= 2 && ac.calib_queries >= 1,
                 "mla --accuracy: --calib-tokens must be >= 2 and --calib-queries >= 1");
  std::unique_ptr<comm::Communicator> world =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  return run_accuracy(ac, *world);
}

}  // namespace

DISTATTN_BENCH_COMMAND("mla", "MLA decode: MLA-TP vs TPLA vs decode-CP (--decode | --accuracy)",
                       mla_main);

}  // namespace distattn::bench
