// MLA decode on the CPU: portable build of the kernel body, scratch allocation and the
// run-time choice between the portable and the AVX-512 build.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "distattn/config.h"
#include "distattn/core/error.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/mla_cpu.h"
#include "kernels/cpu/mla_decode_body.h"

namespace distattn::kernels::cpu {

namespace detail {
void mla_decode_run_portable(const MlaDecodeParams& p) {
  mla_decode_run(p);
}
#if DISTATTN_WITH_AVX512
void mla_decode_run_avx512(const MlaDecodeParams& p);  // mla_decode_avx512.cpp
#endif
#if DISTATTN_WITH_AMX
void mla_decode_run_amx(const MlaDecodeParams& p);  // mla_decode_amx.cpp
#endif
}  // namespace detail

namespace {

using RunFn = void (*)(const detail::MlaDecodeParams&);

void run_with(RunFn fn, const TensorView& q_lat, const TensorView& q_pe,
              const ops::MlaPagedCache& cache, const TensorView& out, const TensorView& lse,
              const ops::MlaDecodeOptions& opts) {
  detail::MlaDecodeParams p;
  p.batch = q_lat.size(0);
  p.heads = q_lat.size(1);
  p.latent = cache.latent_dim;
  p.rope = cache.rope_dim();
  p.q_lat = q_lat.data_as<const float>();
  p.ql_sb = q_lat.stride(0);
  p.ql_sh = q_lat.stride(1);
  if (p.rope > 0) {
    p.q_pe = q_pe.data_as<const float>();
    p.qp_sb = q_pe.stride(0);
    p.qp_sh = q_pe.stride(1);
  }
  p.pages = cache.pages.data;
  p.pages_bf16 = cache.pages.dtype == DType::kBFloat16;
  p.pg_s0 = cache.pages.stride(0);
  p.pg_s1 = cache.pages.stride(1);
  p.page_size = cache.page_size();
  p.page_table = cache.page_table.data_as<const int32_t>();
  p.pt_s0 = cache.page_table.stride(0);
  p.pt_s1 = cache.page_table.stride(1);
  p.seq_lens = cache.seq_lens.data_as<const int32_t>();
  p.sl_s0 = cache.seq_lens.stride(0);
  p.out = out.data_as<float>();
  p.o_sb = out.stride(0);
  p.o_sh = out.stride(1);
  p.lse = lse.data_as<float>();
  p.l_sb = lse.stride(0);
  p.l_sh = lse.stride(1);
  p.scale = opts.softmax_scale;
  p.mu = opts.latent_logit_scale;
  p.threads = std::max(1, omp_get_max_threads());

  int64_t max_tiles = 1;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = p.seq_lens[b * p.sl_s0];
    max_tiles = std::max<int64_t>(max_tiles, (len + detail::kMlaTile - 1) / detail::kMlaTile);
  }
  int64_t splits = opts.num_splits;
  if (splits <= 0) {
    // Enough tasks to keep every thread busy (x2 for balance), at least 4 tiles per split.
    const int64_t want = p.threads == 1 ? 1 : (2 * p.threads + p.batch - 1) / p.batch;
    splits = std::max<int64_t>(1, std::min<int64_t>(want, max_tiles / 4));
  }
  p.splits = static_cast<int>(std::min<int64_t>(splits, max_tiles));
  p.threads = static_cast<int>(std::min<int64_t>(p.threads, p.batch * p.splits));

  p.thread_scratch_floats = detail::mla_thread_scratch_floats(p.heads, p.latent, p.rope);
  std::vector<float> scratch(static_cast<size_t>(p.thread_scratch_floats * p.threads));
  const int64_t tasks = p.batch * p.splits;
  std::vector<float> part_acc(static_cast<size_t>(tasks * p.heads * p.latent));
  std::vector<float> part_ml(static_cast<size_t>(2 * tasks * p.heads));
  p.thread_scratch = scratch.data();
  p.part_acc = part_acc.data();
  p.part_m = part_ml.data();
  p.part_l = part_ml.data() + tasks * p.heads;
  fn(p);
}

}  // namespace

bool mla_decode_avx512_available() {
#if DISTATTN_WITH_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

void mla_decode_portable(const TensorView& q_lat, const TensorView& q_pe,
                         const ops::MlaPagedCache& cache, const TensorView& out,
                         const TensorView& lse, const ops::MlaDecodeOptions& opts) {
  run_with(&detail::mla_decode_run_portable, q_lat, q_pe, cache, out, lse, opts);
}

void mla_decode_avx512(const TensorView& q_lat, const TensorView& q_pe,
                       const ops::MlaPagedCache& cache, const TensorView& out,
                       const TensorView& lse, const ops::MlaDecodeOptions& opts) {
  DISTATTN_CHECK_STATUS(mla_decode_avx512_available(), Status::kUnsupported,
                        "mla_decode_avx512: this CPU or build has no AVX-512 (use "
                        "mla_decode_portable, or build with -DDISTATTN_AVX512=ON)");
#if DISTATTN_WITH_AVX512
  run_with(&detail::mla_decode_run_avx512, q_lat, q_pe, cache, out, lse, opts);
#endif
}

bool mla_decode_amx_available() {
  return cpu_kernel_isa_available(CpuKernelIsa::kAmx);
}

void mla_decode_amx(const TensorView& q_lat, const TensorView& q_pe,
                    const ops::MlaPagedCache& cache, const TensorView& out, const TensorView& lse,
                    const ops::MlaDecodeOptions& opts) {
  DISTATTN_CHECK_STATUS(mla_decode_amx_available(), Status::kUnsupported,
                        "mla_decode_amx: this CPU, kernel or build has no AMX tiles (use "
                        "mla_decode_avx512 or mla_decode_portable)");
#if DISTATTN_WITH_AMX
  run_with(&detail::mla_decode_run_amx, q_lat, q_pe, cache, out, lse, opts);
#endif
}

void mla_decode(const TensorView& q_lat, const TensorView& q_pe, const ops::MlaPagedCache& cache,
                const TensorView& out, const TensorView& lse, const ops::MlaDecodeOptions& opts) {
  if (active_cpu_kernel_isa() == CpuKernelIsa::kAmx)
    mla_decode_amx(q_lat, q_pe, cache, out, lse, opts);
  else if (mla_decode_avx512_available())
    mla_decode_avx512(q_lat, q_pe, cache, out, lse, opts);
  else
    mla_decode_portable(q_lat, q_pe, cache, out, lse, opts);
}

}  // namespace distattn::kernels::cpu
