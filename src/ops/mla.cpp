// Validation and device dispatch of the MLA local ops (distattn/ops/mla.h).
#include "distattn/ops/mla.h"

#include <algorithm>
#include <cmath>

#include "distattn/config.h"
#include "distattn/core/error.h"
#include "distattn/core/stream.h"
#include "kernels/cpu/mla_cpu.h"
#if DISTATTN_WITH_CUDA
#include "kernels/cuda/mla_cuda.h"
#endif

namespace distattn::ops {

namespace {

// CPU tensors always work; CUDA tensors when the build has the CUDA kernels.
void require_supported_device(const TensorView& t, const char* op) {
  DISTATTN_CHECK_STATUS(t.device.is_cpu() || (DISTATTN_WITH_CUDA && t.device.is_cuda()),
                        Status::kUnsupported, op, ": tensors are on ", t.device.str(),
                        " but this build has no CUDA kernels: pass CPU tensors or build with "
                        "-DDISTATTN_CUDA=ON");
}

bool last_dim_contiguous(const TensorView& t) {
  return t.ndim == 0 || t.stride(-1) == 1;
}

}  // namespace

void hadamard_transform(const TensorView& x, float scale, Stream stream) {
  DISTATTN_CHECK(x.ndim >= 1, "hadamard_transform: x must have at least one dim, got ", x.str());
  DISTATTN_CHECK(x.dtype == DType::kFloat32, "hadamard_transform: x must be fp32, got ", x.str(),
                 " (convert with convert_dtype_cpu first)");
  const int64_t d = x.size(-1);
  DISTATTN_CHECK(d >= 1 && d <= (int64_t{1} << 20) && (d & (d - 1)) == 0,
                 "hadamard_transform: the last dim must be a power of two in [1, 2^20], got ", d,
                 " (pad the rows to the next power of two)");
  DISTATTN_CHECK(last_dim_contiguous(x),
                 "hadamard_transform: the last dim of x must be contiguous (stride 1), got ",
                 x.str());
  DISTATTN_CHECK(std::isfinite(scale), "hadamard_transform: scale must be finite, got ", scale);
  if (x.empty()) return;
  require_supported_device(x, "hadamard_transform");
#if DISTATTN_WITH_CUDA
  if (x.device.is_cuda()) {
    kernels::cuda::hadamard_transform(x, scale, stream);
    return;
  }
#endif
  kernels::cpu::hadamard_transform(x, scale);
}

void mla_decode(const TensorView& q_lat, const TensorView& q_pe, const MlaPagedCache& cache,
                const TensorView& out, const TensorView& lse, const MlaDecodeOptions& opts) {
  const char* op = "mla_decode";
  DISTATTN_CHECK(q_lat.ndim == 3, op, ": q_lat must be [B, H, Dl], got ", q_lat.str());
  const int64_t b = q_lat.size(0), h = q_lat.size(1), dl = q_lat.size(2);
  DISTATTN_CHECK(cache.pages.ndim == 3, op,
                 ": cache.pages must be [num_pages, page_size, Dl + Dr], got ", cache.pages.str());
  DISTATTN_CHECK(cache.latent_dim == dl && dl >= 1, op, ": cache.latent_dim (", cache.latent_dim,
                 ") must equal q_lat's last dim (", dl, ") and be >= 1");
  const int64_t dr = cache.rope_dim();
  DISTATTN_CHECK(dr >= 0, op, ": cache.pages row width ", cache.pages.size(2),
                 " is smaller than latent_dim ", dl);
  DISTATTN_CHECK(cache.page_size() >= 1, op, ": page_size must be >= 1, got ", cache.pages.str());
  DISTATTN_CHECK(q_lat.dtype == DType::kFloat32 && out.dtype == DType::kFloat32 &&
                     lse.dtype == DType::kFloat32,
                 op, ": q_lat, out and lse must be fp32, got ", q_lat.str(), ", ", out.str(), ", ",
                 lse.str());
  DISTATTN_CHECK(cache.pages.dtype == DType::kFloat32 || cache.pages.dtype == DType::kBFloat16, op,
                 ": cache.pages must be fp32 or bf16, got ", cache.pages.str());
  if (dr > 0) {
    DISTATTN_CHECK(q_pe.ndim == 3 && q_pe.size(0) == b && q_pe.size(1) == h && q_pe.size(2) == dr,
                   op, ": q_pe must be [B, H, Dr] = [", b, ", ", h, ", ", dr, "], got ",
                   q_pe.str());
    DISTATTN_CHECK(q_pe.dtype == DType::kFloat32, op, ": q_pe must be fp32, got ", q_pe.str());
    DISTATTN_CHECK(last_dim_contiguous(q_pe), op, ": q_pe needs a contiguous last dim");
  }
  DISTATTN_CHECK(out.ndim == 3 && out.size(0) == b && out.size(1) == h && out.size(2) == dl, op,
                 ": out must be [B, H, Dl] = [", b, ", ", h, ", ", dl, "], got ", out.str());
  DISTATTN_CHECK(lse.ndim == 2 && lse.size(0) == b && lse.size(1) == h, op,
                 ": lse must be [B, H] = [", b, ", ", h, "], got ", lse.str());
  DISTATTN_CHECK(
      last_dim_contiguous(q_lat) && last_dim_contiguous(out) && last_dim_contiguous(cache.pages),
      op, ": q_lat, out and cache.pages need a contiguous last dim");
  DISTATTN_CHECK(cache.page_table.ndim == 2 && cache.page_table.size(0) == b &&
                     cache.page_table.dtype == DType::kInt32,
                 op, ": page_table must be int32 [B, max_pages] with B = ", b, ", got ",
                 cache.page_table.str());
  DISTATTN_CHECK(cache.seq_lens.ndim == 1 && cache.seq_lens.size(0) == b &&
                     cache.seq_lens.dtype == DType::kInt32,
                 op, ": seq_lens must be int32 [B] with B = ", b, ", got ", cache.seq_lens.str());
  DISTATTN_CHECK(opts.softmax_scale > 0 && std::isfinite(opts.softmax_scale), op,
                 ": opts.softmax_scale must be set (> 0), got ", opts.softmax_scale,
                 " (MLA: 1/sqrt(qk_nope + qk_rope) times the YaRN factor)");
  DISTATTN_CHECK(std::isfinite(opts.latent_logit_scale), op,
                 ": opts.latent_logit_scale must be finite");
  DISTATTN_CHECK(opts.num_splits >= 0, op, ": num_splits must be >= 0 (0 = choose)");
  require_supported_device(q_lat, op);
  for (const TensorView* t : {&out, &lse, &cache.pages, &cache.page_table, &cache.seq_lens})
    DISTATTN_CHECK(t->device == q_lat.device, op, ": every tensor must be on ", q_lat.device.str(),
                   " (q_lat's device), got ", t->str());
  if (dr > 0)
    DISTATTN_CHECK(q_pe.device == q_lat.device, op, ": q_pe must be on ", q_lat.device.str(),
                   ", got ", q_pe.str());
  if (b == 0 || h == 0) return;

  // Check every page a sequence will read is in range (on a host copy for CUDA tensors).
  Tensor pt_host, sl_host;
  TensorView ptv = cache.page_table, slv = cache.seq_lens;
  if (!q_lat.device.is_cpu()) {
    // The table and lengths may have been written on opts.stream (a non-blocking stream the
    // legacy-stream copy below does not wait for): let that work land first.
    stream_synchronize(q_lat.device, opts.stream);
    pt_host = to_device(cache.page_table, Device::cpu());
    sl_host = to_device(cache.seq_lens, Device::cpu());
    ptv = pt_host.view();
    slv = sl_host.view();
  }
  const int64_t ps = cache.page_size(), num_pages = cache.pages.size(0);
  const int64_t max_pages = cache.page_table.size(1);
  const auto* pt = ptv.data_as<const int32_t>();
  const auto* sl = slv.data_as<const int32_t>();
  int64_t max_len = 0;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t len = sl[i * slv.stride(0)];
    max_len = std::max(max_len, len);
    DISTATTN_CHECK(len >= 0 && len <= max_pages * ps, op, ": seq_lens[", i, "] = ", len,
                   " must be in [0, max_pages * page_size = ", max_pages * ps, "]");
    for (int64_t pg = 0; pg < (len + ps - 1) / ps; ++pg) {
      const int64_t id = pt[i * ptv.stride(0) + pg * ptv.stride(1)];
      DISTATTN_CHECK(id >= 0 && id < num_pages, op, ": page_table[", i, ", ", pg, "] = ", id,
                     " is outside [0, ", num_pages, ")");
    }
  }
#if DISTATTN_WITH_CUDA
  if (q_lat.device.is_cuda()) {
    kernels::cuda::mla_decode(q_lat, q_pe, cache, out, lse, opts, max_len);
    return;
  }
#endif
  (void)max_len;
  kernels::cpu::mla_decode(q_lat, q_pe, cache, out, lse, opts);
}

double mla_decode_flops(int64_t heads, int64_t total_tokens, int64_t latent_dim, int64_t rope_dim) {
  return 2.0 * static_cast<double>(heads) * static_cast<double>(total_tokens) *
         static_cast<double>(2 * latent_dim + rope_dim);
}

double mla_decode_bytes(int64_t total_tokens, int64_t latent_dim, int64_t rope_dim,
                        DType cache_dtype) {
  return static_cast<double>(total_tokens) * static_cast<double>(latent_dim + rope_dim) *
         static_cast<double>(dtype_size(cache_dtype));
}

}  // namespace distattn::ops
