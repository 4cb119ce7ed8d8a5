// MLA decode on CUDA (one query token per sequence over a paged [latent | k_pe] cache).
// Block = 16 heads of one sequence and one split of its tokens; 8 warps, 2 heads each:
// lanes 0-15 score the 16 tokens of a tile for the warp's first head, lanes 16-31 for its
// second, then every lane accumulates its latent columns (c = lane + 32u) for both heads.
// Each tile of 16 tokens (gathered across pages, converted to fp32) is read from global
// memory once per 16 heads. Splits are folded by an LSE combine.
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mla_cuda.h"

namespace distattn::kernels::cuda {

namespace {

constexpr int kHeads = 16;   // heads per block
constexpr int kTokens = 16;  // tokens per tile
constexpr int kThreads = 256;
constexpr int kMaxLatentPerLane = kMlaMaxLatentDim / 32;

struct MlaParams {
  const float* q_lat;
  const float* q_pe;
  const void* pages;
  bool pages_bf16;
  bool vec16;  // page rows 16-byte aligned, width a multiple of 16 bytes
  float* out;
  float* lse;
  int64_t ql_s0, ql_s1, qp_s0, qp_s1, pg_s0, pg_s1, o_s0, o_s1, l_s0, l_s1;
  const int32_t* page_table;
  int64_t pt_s0, pt_s1;
  const int32_t* seq_lens;
  int64_t sl_s0;
  int64_t page_size;
  int B, H, Dl, Dr;
  float lat_scale_log2, pe_scale_log2;
  int num_splits;
  int64_t split_tokens;
  float* ws_out;  // [splits, B, H, Dl]
  float* ws_lse;  // [splits, B, H]
};

__global__ void __launch_bounds__(kThreads) mla_decode_kernel(const MlaParams p) {
  extern __shared__ float smem[];
  const int W = p.Dl + p.Dr;
  float* Qs = smem;             // [kHeads][W], pre-scaled (base 2, mu on the latent part)
  float* Ks = Qs + kHeads * W;  // [kTokens][W + 1]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h0 = static_cast<int>(blockIdx.x) * kHeads;
  // Sequences over grid y and z (see pair_grid): blockIdx.z = z_slice * num_splits + split.
  const int64_t bi = pair_index(blockIdx.z / static_cast<unsigned>(p.num_splits));
  if (bi >= p.B) return;  // tail of the last z slice
  const int b = static_cast<int>(bi);
  const int split = static_cast<int>(blockIdx.z % static_cast<unsigned>(p.num_splits));
  const int64_t len = p.seq_lens[b * p.sl_s0];
  const int64_t kb = static_cast<int64_t>(split) * p.split_tokens;
  const int64_t ke = kb + p.split_tokens < len ? kb + p.split_tokens : len;

  for (int idx = tid; idx < kHeads * W; idx += kThreads) {
    const int hl = idx / W, c = idx % W;
    const int h = h0 + hl;
    float val = 0.f;
    if (h < p.H)
      val = c < p.Dl ? p.q_lat[b * p.ql_s0 + h * p.ql_s1 + c] * p.lat_scale_log2
                     : p.q_pe[b * p.qp_s0 + h * p.qp_s1 + (c - p.Dl)] * p.pe_scale_log2;
    Qs[idx] = val;
  }

  const int half = lane / 16, j = lane % 16;
  const int hl_mine = warp * 2 + half;  // head this lane scores
  const bool head_ok = h0 + hl_mine < p.H;
  float m = -INFINITY, l = 0.f;  // of head hl_mine (same on the 16 lanes of a half)
  float acc[2][kMaxLatentPerLane];
#pragma unroll
  for (int u = 0; u < kMaxLatentPerLane; ++u) acc[0][u] = acc[1][u] = 0.f;

  for (int64_t n0 = kb; n0 < ke; n0 += kTokens) {
    __syncthreads();
    if (p.vec16) {
      // 16 bytes per load: decode is bound by these reads.
      const int vec = p.pages_bf16 ? 8 : 4;
      const int chunks = W / vec;
      for (int idx = tid; idx < kTokens * chunks; idx += kThreads) {
        const int jj = idx / chunks, c = (idx % chunks) * vec;
        const int64_t t = n0 + jj;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (t < ke) {
          const int64_t page = p.page_table[b * p.pt_s0 + (t / p.page_size) * p.pt_s1];
          const int64_t off = page * p.pg_s0 + (t % p.page_size) * p.pg_s1 + c;
          raw = p.pages_bf16
                    ? *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.pages) +
                                                      off)
                    : *reinterpret_cast<const uint4*>(static_cast<const float*>(p.pages) + off);
        }
        float* dst = Ks + jj * (W + 1) + c;
        if (p.pages_bf16) {
          const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
          for (int u = 0; u < 8; ++u) dst[u] = __bfloat162float(e[u]);
        } else {
          const float* e = reinterpret_cast<const float*>(&raw);
#pragma unroll
          for (int u = 0; u < 4; ++u) dst[u] = e[u];
        }
      }
    } else {
      for (int idx = tid; idx < kTokens * W; idx += kThreads) {
        const int jj = idx / W, c = idx % W;
        const int64_t t = n0 + jj;
        float val = 0.f;
        if (t < ke) {
          const int64_t page = p.page_table[b * p.pt_s0 + (t / p.page_size) * p.pt_s1];
          const int64_t off = page * p.pg_s0 + (t % p.page_size) * p.pg_s1 + c;
          val = p.pages_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.pages)[off])
                             : static_cast<const float*>(p.pages)[off];
        }
        Ks[jj * (W + 1) + c] = val;
      }
    }
    __syncthreads();
    float s = -INFINITY;
    if (head_ok && n0 + j < ke) {
      const float* qr = Qs + hl_mine * W;
      const float* kr = Ks + j * (W + 1);
      float dot = 0.f;
      for (int c = 0; c < W; ++c) dot = fmaf(qr[c], kr[c], dot);
      s = dot;
    }
    float mx = s;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_new = fmaxf(m, mx);
    const float base = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m - base);
    const float pj = exp2f(s - base);
    float sum = pj;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    l = l * alpha + sum;
    m = m_new;
    const float alpha0 = __shfl_sync(0xffffffffu, alpha, 0);
    const float alpha1 = __shfl_sync(0xffffffffu, alpha, 16);
#pragma unroll
    for (int u = 0; u < kMaxLatentPerLane; ++u) {
      acc[0][u] *= alpha0;
      acc[1][u] *= alpha1;
    }
    for (int jj = 0; jj < kTokens; ++jj) {
      const float p0 = __shfl_sync(0xffffffffu, pj, jj);
      const float p1 = __shfl_sync(0xffffffffu, pj, 16 + jj);
      if (p0 == 0.f && p1 == 0.f) continue;  // warp-uniform
      const float* kr = Ks + jj * (W + 1);
#pragma unroll
      for (int u = 0; u < kMaxLatentPerLane; ++u) {
        const int c = lane + 32 * u;
        if (c < p.Dl) {
          acc[0][u] = fmaf(p0, kr[c], acc[0][u]);
          acc[1][u] = fmaf(p1, kr[c], acc[1][u]);
        }
      }
    }
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const float le = __shfl_sync(0xffffffffu, l, 16 * e);
    const float me = __shfl_sync(0xffffffffu, m, 16 * e);
    const int h = h0 + warp * 2 + e;
    if (h >= p.H) continue;
    const float inv = le > 0.f ? 1.f / le : 0.f;
    const float lse_val = le > 0.f ? (me + log2f(le)) * kLn2 : -INFINITY;
    float* o;
    if (p.num_splits > 1) {
      o = p.ws_out + ((static_cast<int64_t>(split) * p.B + b) * p.H + h) * p.Dl;
      if (lane == 0) p.ws_lse[(static_cast<int64_t>(split) * p.B + b) * p.H + h] = lse_val;
    } else {
      o = p.out + b * p.o_s0 + h * p.o_s1;
      if (lane == 0) p.lse[b * p.l_s0 + h * p.l_s1] = lse_val;
    }
#pragma unroll
    for (int u = 0; u < kMaxLatentPerLane; ++u) {
      const int c = lane + 32 * u;
      if (c < p.Dl) o[c] = acc[e][u] * inv;
    }
  }
}

// One warp per (b, h): LSE-merge the splits.
__global__ void __launch_bounds__(128) mla_combine_kernel(const MlaParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.B) * p.H) return;
  const int b = static_cast<int>(row / p.H), h = static_cast<int>(row % p.H);
  const int64_t split_l = static_cast<int64_t>(p.B) * p.H;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.ws_lse[s * split_l + row]);
  float total = 0.f;
  if (mx != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s) total += expf(p.ws_lse[s * split_l + row] - mx);
  const float lse_val = mx == -INFINITY ? -INFINITY : mx + logf(total);
  float* o = p.out + b * p.o_s0 + h * p.o_s1;
  for (int c = lane; c < p.Dl; c += 32) {
    float x = 0.f;
    if (mx != -INFINITY)
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = expf(p.ws_lse[s * split_l + row] - lse_val);
        if (w != 0.f) x = fmaf(w, p.ws_out[(s * split_l + row) * p.Dl + c], x);
      }
    o[c] = x;
  }
  if (lane == 0) p.lse[b * p.l_s0 + h * p.l_s1] = lse_val;
}

}  // namespace

void mla_decode(const TensorView& q_lat, const TensorView& q_pe, const ops::MlaPagedCache& cache,
                const TensorView& out, const TensorView& lse, const ops::MlaDecodeOptions& opts,
                int64_t max_seq_len) {
  const int64_t B = q_lat.size(0), H = q_lat.size(1), Dl = q_lat.size(2);
  const int64_t Dr = cache.rope_dim();
  DISTATTN_CHECK_STATUS(Dl <= kMlaMaxLatentDim && Dr <= kMlaMaxRopeDim, Status::kUnsupported,
                        "mla_decode: the CUDA kernel takes latent widths up to ", kMlaMaxLatentDim,
                        " and rope widths up to ", kMlaMaxRopeDim, ", got ", Dl, " + ", Dr);
  DISTATTN_CHECK_STATUS(B <= INT32_MAX && H <= INT32_MAX, Status::kUnsupported,
                        "mla_decode: batch and heads must be < 2^31 on CUDA, got ", B, " and ", H);
  if (B == 0 || H == 0) return;
  DeviceGuard guard(q_lat.device.index);
  const cudaStream_t stream = static_cast<cudaStream_t>(opts.stream);
  MlaParams p{};
  p.q_lat = q_lat.data_as<const float>();
  p.q_pe = Dr > 0 ? q_pe.data_as<const float>() : nullptr;
  p.pages = cache.pages.data;
  p.pages_bf16 = cache.pages.dtype == DType::kBFloat16;
  {
    const int64_t vec = p.pages_bf16 ? 8 : 4;
    const TensorView& pg = cache.pages;
    p.vec16 = reinterpret_cast<uintptr_t>(pg.data) % 16 == 0 && (Dl + Dr) % vec == 0 &&
              (pg.size(0) <= 1 || pg.stride(0) % vec == 0) &&
              (pg.size(1) <= 1 || pg.stride(1) % vec == 0);
  }
  p.out = out.data_as<float>();
  p.lse = lse.data_as<float>();
  p.ql_s0 = q_lat.stride(0), p.ql_s1 = q_lat.stride(1);
  if (Dr > 0) p.qp_s0 = q_pe.stride(0), p.qp_s1 = q_pe.stride(1);
  p.pg_s0 = cache.pages.stride(0), p.pg_s1 = cache.pages.stride(1);
  p.o_s0 = out.stride(0), p.o_s1 = out.stride(1);
  p.l_s0 = lse.stride(0), p.l_s1 = lse.stride(1);
  p.page_table = cache.page_table.data_as<const int32_t>();
  p.pt_s0 = cache.page_table.stride(0), p.pt_s1 = cache.page_table.stride(1);
  p.seq_lens = cache.seq_lens.data_as<const int32_t>();
  p.sl_s0 = cache.seq_lens.stride(0);
  p.page_size = cache.page_size();
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.Dl = static_cast<int>(Dl);
  p.Dr = static_cast<int>(Dr);
  p.pe_scale_log2 = opts.softmax_scale * kLog2e;
  p.lat_scale_log2 = opts.softmax_scale * opts.latent_logit_scale * kLog2e;

  const int64_t head_blocks = (H + kHeads - 1) / kHeads;
  const int64_t max_len = std::max<int64_t>(max_seq_len, 1);
  int64_t splits = opts.num_splits;
  if (splits <= 0) {
    const int64_t blocks = head_blocks * B;
    splits = std::min<int64_t>((2 * device_sm_count() + blocks - 1) / blocks, max_len / 256);
  }
  splits = std::clamp<int64_t>(splits, 1, std::min<int64_t>(max_len, 1024));
  const int64_t split_tokens = (max_len + splits - 1) / splits;
  splits = (max_len + split_tokens - 1) / split_tokens;
  p.num_splits = static_cast<int>(splits);
  p.split_tokens = split_tokens;

  const int smem = static_cast<int>(sizeof(float)) *
                   (kHeads * static_cast<int>(Dl + Dr) + kTokens * static_cast<int>(Dl + Dr + 1));
  set_max_dynamic_smem(reinterpret_cast<const void*>(mla_decode_kernel), smem);
  const PairGrid pg = pair_grid(B, splits, "mla_decode");
  const dim3 grid(static_cast<unsigned>(head_blocks), pg.y, pg.z);
  if (splits == 1) {
    mla_decode_kernel<<<grid, kThreads, smem, stream>>>(p);
    DISTATTN_CUDA_CHECK_LAUNCH("mla_decode_kernel");
    return;
  }
  const size_t rows = static_cast<size_t>(B * H);
  Workspace ws(static_cast<size_t>(splits) * rows * (static_cast<size_t>(Dl) + 1) * sizeof(float),
               stream);
  p.ws_out = ws.as<float>();
  p.ws_lse = p.ws_out + static_cast<size_t>(splits) * rows * static_cast<size_t>(Dl);
  mla_decode_kernel<<<grid, kThreads, smem, stream>>>(p);
  DISTATTN_CUDA_CHECK_LAUNCH("mla_decode_kernel");
  mla_combine_kernel<<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p);
  DISTATTN_CUDA_CHECK_LAUNCH("mla_combine_kernel");
}

}  // namespace distattn::kernels::cuda
