// CUDA-core attention forward: the path for fp32, head dims the tensor-core kernels do
// not cover (<= 256), unaligned strides, and split-KV decode over contiguous or paged
// caches. The GQA heads of one KV head are packed as rows (row r = query r / G, head
// hkv * G + r % G), so decode with few queries still fills a block and reads each K/V
// tile once for the whole group.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/flash_params.cuh"

namespace distattn::kernels::cuda {

namespace {

constexpr int kRows = 16;  // rows per block (4 per warp, dealt round-robin: see row_of)
constexpr int kKeys = 32;  // keys per tile: one per lane
constexpr int kThreads = 128;
constexpr int kRowsPerWarp = kRows / (kThreads / 32);
constexpr int kMaxDimPerLane = 8;  // head dims <= 256

// Block row of a warp's rr-th row: round-robin over the warps, so a block with fewer than
// kRows valid rows (decode: Sq * G = 1..8 rows) still spreads them over every warp instead
// of leaving warps 1-3 idle while warp 0 computes all of them.
__device__ __forceinline__ int row_of(int warp, int rr) {
  return rr * (kThreads / 32) + warp;
}

int simt_smem_bytes(int D, int Dv) {
  return static_cast<int>(sizeof(float)) * (kRows * D + kKeys * (D + 1) + kKeys * Dv);
}

// Keys [n0, n0 + kKeys) (those <= hi; zeros past it) of one KV head into shared memory
// as fp32 rows of `smem_stride`, 16 bytes per global load (decode is bound by these reads).
// Needs 16-byte aligned rows and width % (16 / sizeof(T)) == 0 (FwdParams::kv_vec16).
template <typename T, bool kPaged>
__device__ __forceinline__ void load_tile_vec(const FwdParams& p, float* smem, const T* g,
                                              int64_t s0, int64_t s1, int64_t head_off, int width,
                                              int smem_stride, int b, int64_t n0, int64_t hi,
                                              int tid) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const int chunks = width / kVec;
  for (int idx = tid; idx < kKeys * chunks; idx += kThreads) {
    const int j = idx / chunks, c = (idx % chunks) * kVec;
    const int64_t t = n0 + j;
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (t <= hi)
      raw = *reinterpret_cast<const uint4*>(g + key_row_offset<kPaged>(p, b, t, s0, s1) + head_off +
                                            c);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int u = 0; u < kVec; ++u) smem[j * smem_stride + c + u] = to_f32(e[u]);
  }
}

template <typename T, bool kPaged>
__global__ void __launch_bounds__(kThreads) flash_fwd_simt_kernel(const FwdParams p) {
  extern __shared__ float smem[];
  const int D = p.D, Dv = p.Dv, G = p.G;
  float* Qs = smem;                  // [kRows][D], pre-scaled by scale * log2(e)
  float* Ks = Qs + kRows * D;        // [kKeys][D + 1]: padded, lane j reads row j
  float* Vs = Ks + kKeys * (D + 1);  // [kKeys][Dv]: lane c reads column c
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // blockIdx.z = z_slice * num_splits + split (see pair_grid).
  const int64_t bh = pair_index(blockIdx.z / static_cast<unsigned>(p.num_splits));
  if (bh >= static_cast<int64_t>(p.B) * p.Hkv) return;  // tail of the last z slice
  const int b = static_cast<int>(bh / p.Hkv), hkv = static_cast<int>(bh % p.Hkv);
  const int split = static_cast<int>(blockIdx.z % static_cast<unsigned>(p.num_splits));
  const int64_t rows = static_cast<int64_t>(p.Sq) * G;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t r_end = r0 + kRows < rows ? r0 + kRows : rows;

  int64_t Sk = p.Sk, q_offset = p.q_offset, k_offset = p.k_offset;
  if constexpr (kPaged) {
    Sk = p.seq_lens[b * p.sl_s0];
    q_offset = Sk - p.Sq;
    k_offset = 0;
  }
  // Keys of this split, narrowed to those any row of the block can see.
  const int64_t kb = static_cast<int64_t>(split) * p.split_keys;
  const int64_t ke = kb + p.split_keys < Sk ? kb + p.split_keys : Sk;
  int64_t lo = p.mask.key_lo(q_offset + r0 / G) - k_offset;
  int64_t hi = p.mask.key_hi(q_offset + (r_end - 1) / G) - k_offset;
  lo = lo > kb ? lo : kb;
  hi = hi < ke - 1 ? hi : ke - 1;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  for (int idx = tid; idx < kRows * D; idx += kThreads) {
    const int rr = idx / D, c = idx % D;
    const int64_t r = r0 + rr;
    float val = 0.f;
    if (r < rows) {
      const int64_t i = r / G;
      const int h = hkv * G + static_cast<int>(r % G);
      val = to_f32(q[b * p.q_s0 + i * p.q_s1 + h * p.q_s2 + c]) * p.scale_log2;
    }
    Qs[idx] = val;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kMaxDimPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int u = 0; u < kMaxDimPerLane; ++u) acc[rr][u] = 0.f;
  }

  for (int64_t n0 = lo; n0 <= hi; n0 += kKeys) {
    __syncthreads();  // previous tile fully read (and Qs written on the first pass)
    if (p.kv_vec16) {
      load_tile_vec<T, kPaged>(p, Ks, k, p.k_s0, p.k_s1, hkv * p.k_s2, D, D + 1, b, n0, hi, tid);
      load_tile_vec<T, kPaged>(p, Vs, v, p.v_s0, p.v_s1, hkv * p.v_s2, Dv, Dv, b, n0, hi, tid);
    } else {
      for (int idx = tid; idx < kKeys * D; idx += kThreads) {
        const int j = idx / D, c = idx % D;
        const int64_t t = n0 + j;
        float val = 0.f;
        if (t <= hi)
          val = to_f32(k[key_row_offset<kPaged>(p, b, t, p.k_s0, p.k_s1) + hkv * p.k_s2 + c]);
        Ks[j * (D + 1) + c] = val;
      }
      for (int idx = tid; idx < kKeys * Dv; idx += kThreads) {
        const int j = idx / Dv, c = idx % Dv;
        const int64_t t = n0 + j;
        float val = 0.f;
        if (t <= hi)
          val = to_f32(v[key_row_offset<kPaged>(p, b, t, p.v_s0, p.v_s1) + hkv * p.v_s2 + c]);
        Vs[j * Dv + c] = val;
      }
    }
    __syncthreads();
    const int64_t t = n0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int lr = row_of(warp, rr);
      const int64_t r = r0 + lr;
      if (r >= rows) continue;  // warp-uniform
      const int64_t qpos = q_offset + r / G;
      float s = -INFINITY;
      if (t <= hi && p.mask.visible(qpos, k_offset + t)) {
        const float* qr = Qs + lr * D;
        const float* kr = Ks + lane * (D + 1);
        float dot = 0.f;
        for (int c = 0; c < D; ++c) dot = fmaf(qr[c], kr[c], dot);
        s = dot;
      }
      const float m_new = fmaxf(m[rr], warp_max(s));
      if (m_new == -INFINITY) continue;  // nothing visible yet for this row (warp-uniform)
      const float alpha = exp2f(m[rr] - m_new);
      const float pj = exp2f(s - m_new);
      l[rr] = l[rr] * alpha + warp_sum(pj);
      m[rr] = m_new;
#pragma unroll
      for (int u = 0; u < kMaxDimPerLane; ++u) acc[rr][u] *= alpha;
      for (int j = 0; j < kKeys; ++j) {
        const float pk = __shfl_sync(0xffffffffu, pj, j);
        if (pk == 0.f) continue;  // warp-uniform: masked or out-of-range key
        const float* vr = Vs + j * Dv;
#pragma unroll
        for (int u = 0; u < kMaxDimPerLane; ++u) {
          const int c = lane + 32 * u;
          if (c < Dv) acc[rr][u] = fmaf(pk, vr[c], acc[rr][u]);
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = r0 + row_of(warp, rr);
    if (r >= rows) continue;
    const int64_t i = r / G;
    const int h = hkv * G + static_cast<int>(r % G);
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
    const float lse_val = l[rr] > 0.f ? (m[rr] + log2f(l[rr])) * kLn2 : -INFINITY;
    if (p.num_splits > 1) {
      float* o = p.ws_out + (((static_cast<int64_t>(split) * p.B + b) * p.Sq + i) * p.Hq + h) * Dv;
#pragma unroll
      for (int u = 0; u < kMaxDimPerLane; ++u) {
        const int c = lane + 32 * u;
        if (c < Dv) o[c] = acc[rr][u] * inv;
      }
      if (lane == 0)
        p.ws_lse[((static_cast<int64_t>(split) * p.B + b) * p.Hq + h) * p.Sq + i] = lse_val;
    } else {
      const int64_t o_base = b * p.o_s0 + i * p.o_s1 + h * p.o_s2;
#pragma unroll
      for (int u = 0; u < kMaxDimPerLane; ++u) {
        const int c = lane + 32 * u;
        if (c < Dv) store_elt(p.out, o_base + c, p.out_elt, acc[rr][u] * inv);
      }
      if (lane == 0) p.lse[b * p.l_s0 + h * p.l_s1 + i * p.l_s2] = lse_val;
    }
  }
}

// One warp per (b, i, h) row: LSE-merge the num_splits partials.
__global__ void __launch_bounds__(128) combine_splits_kernel(const FwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total = static_cast<int64_t>(p.B) * p.Sq * p.Hq;
  if (row >= total) return;
  const int h = static_cast<int>(row % p.Hq);
  const int64_t i = (row / p.Hq) % p.Sq;
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Hq) * p.Sq));
  const int64_t split_o = static_cast<int64_t>(p.B) * p.Sq * p.Hq * p.Dv;
  const int64_t split_l = static_cast<int64_t>(p.B) * p.Hq * p.Sq;
  const int64_t lrow = (static_cast<int64_t>(b) * p.Hq + h) * p.Sq + i;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.ws_lse[s * split_l + lrow]);
  float total_w = 0.f;
  if (mx != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s) total_w += expf(p.ws_lse[s * split_l + lrow] - mx);
  const float lse_val = mx == -INFINITY ? -INFINITY : mx + logf(total_w);
  const int64_t o_base = b * p.o_s0 + i * p.o_s1 + h * p.o_s2;
  const float* src = p.ws_out + ((static_cast<int64_t>(b) * p.Sq + i) * p.Hq + h) * p.Dv;
  for (int c = lane; c < p.Dv; c += 32) {
    float o = 0.f;
    if (mx != -INFINITY)
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = expf(p.ws_lse[s * split_l + lrow] - lse_val);  // 0 for empty splits
        if (w != 0.f) o = fmaf(w, src[s * split_o + c], o);
      }
    store_elt(p.out, o_base + c, p.out_elt, o);
  }
  if (lane == 0) p.lse[b * p.l_s0 + h * p.l_s1 + i * p.l_s2] = lse_val;
}

template <typename T, bool kPaged>
void launch_typed(const FwdParams& p, cudaStream_t stream) {
  const int smem = simt_smem_bytes(p.D, p.Dv);
  auto kernel = flash_fwd_simt_kernel<T, kPaged>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  const int64_t rows = static_cast<int64_t>(p.Sq) * p.G;
  const PairGrid pg =
      pair_grid(static_cast<int64_t>(p.B) * p.Hkv, p.num_splits, "attention forward (CUDA cores)");
  const dim3 grid(static_cast<unsigned>((rows + kRows - 1) / kRows), pg.y, pg.z);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  DISTATTN_CUDA_CHECK_LAUNCH("flash_fwd_simt_kernel");
}

}  // namespace

void launch_flash_fwd_simt(const FwdParams& p, DType dtype, bool paged, cudaStream_t stream) {
  DISTATTN_CHECK_STATUS(p.D <= 256 && p.Dv <= 256, Status::kUnsupported,
                        "CUDA attention supports head dims up to 256, got D = ", p.D,
                        ", Dv = ", p.Dv);
  switch (dtype) {
    case DType::kFloat32:
      paged ? launch_typed<float, true>(p, stream) : launch_typed<float, false>(p, stream);
      break;
    case DType::kBFloat16:
      paged ? launch_typed<__nv_bfloat16, true>(p, stream)
            : launch_typed<__nv_bfloat16, false>(p, stream);
      break;
    case DType::kFloat16:
      paged ? launch_typed<__half, true>(p, stream) : launch_typed<__half, false>(p, stream);
      break;
    default:
      DISTATTN_THROW(Status::kInternal, "flash_fwd_simt: unexpected dtype ", dtype_name(dtype));
  }
}

void launch_combine_splits(const FwdParams& p, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.B) * p.Sq * p.Hq;
  if (total == 0) return;
  combine_splits_kernel<<<static_cast<unsigned>((total + 3) / 4), 128, 0, stream>>>(p);
  DISTATTN_CUDA_CHECK_LAUNCH("combine_splits_kernel");
}

}  // namespace distattn::kernels::cuda
