// Attention backward on CUDA cores (head dims <= 256, any float dtype, any strides).
//   1. delta[b, h, i] = rowsum(dout * out)            one warp per row
//   2. dK, dV per tile of 16 keys of one KV head: loops over every query row of the GQA
//      group that can see the tile (rows staged 8 at a time in shared memory), so the
//      group reduction needs no atomics and the result is deterministic
//   3. dQ per 8 rows (GQA heads packed as rows, as in the forward), K/V tiles of 32 keys
//      in shared memory
// With p = exp(s - lse) and ds = p (dp - delta), dp = dout . v:
//   dV += p dout,  dK += scale ds q,  dQ += scale ds k.
// Rows whose lse is -inf (no visible key in the forward) contribute nothing.
#include <cuda_runtime.h>

#include "kernels/cuda/flash_params.cuh"

namespace distattn::kernels::cuda {

namespace {

constexpr int kMaxDimPerLane = 8;  // head dims <= 256

__global__ void __launch_bounds__(128) bwd_delta_kernel(const BwdParams p) {
  const FwdParams& f = p.f;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total = static_cast<int64_t>(f.B) * f.Hq * f.Sq;
  if (row >= total) return;
  const int64_t i = row % f.Sq;
  const int h = static_cast<int>((row / f.Sq) % f.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(f.Sq) * f.Hq));
  const int64_t ob = b * f.o_s0 + i * f.o_s1 + h * f.o_s2;
  const int64_t db = b * p.do_s0 + i * p.do_s1 + h * p.do_s2;
  float acc = 0.f;
  for (int c = lane; c < f.Dv; c += 32)
    acc = fmaf(load_elt(f.out, ob + c, f.out_elt), load_elt(p.dout, db + c, p.dout_elt), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;  // packed [B, Hq, Sq]: row = (b * Hq + h) * Sq + i
}

constexpr int kKvKeysPerWarp = 4;
constexpr int kKvKeys = 4 * kKvKeysPerWarp;  // keys per block
constexpr int kKvRows = 8;                   // query rows staged per step

template <typename T>
__global__ void __launch_bounds__(128) bwd_dkdv_kernel(const BwdParams p) {
  const FwdParams& f = p.f;
  extern __shared__ float smem[];
  const int D = f.D, Dv = f.Dv, G = f.G;
  float* Ks = smem;                // [kKvKeys][D]
  float* Vs = Ks + kKvKeys * D;    // [kKvKeys][Dv]
  float* Qs = Vs + kKvKeys * Dv;   // [kKvRows][D]
  float* DOs = Qs + kKvRows * D;   // [kKvRows][Dv]
  float* rs = DOs + kKvRows * Dv;  // [kKvRows][2]: lse * log2(e), delta
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t bh = pair_index(blockIdx.z);
  if (bh >= static_cast<int64_t>(f.B) * f.Hkv) return;  // tail of the last z slice
  const int b = static_cast<int>(bh / f.Hkv), hkv = static_cast<int>(bh % f.Hkv);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kKvKeys;
  const int64_t n_last = (n0 + kKvKeys < f.Sk ? n0 + kKvKeys : f.Sk) - 1;
  const T* q = static_cast<const T*>(f.q);
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);

  for (int idx = tid; idx < kKvKeys * D; idx += 128) {
    const int j = idx / D, c = idx % D;
    const int64_t t = n0 + j;
    Ks[idx] = t <= n_last ? to_f32(k[b * f.k_s0 + t * f.k_s1 + hkv * f.k_s2 + c]) : 0.f;
  }
  for (int idx = tid; idx < kKvKeys * Dv; idx += 128) {
    const int j = idx / Dv, c = idx % Dv;
    const int64_t t = n0 + j;
    Vs[idx] = t <= n_last ? to_f32(v[b * f.v_s0 + t * f.v_s1 + hkv * f.v_s2 + c]) : 0.f;
  }

  // Query rows that can see any key of the tile.
  int64_t i_lo = f.mask.query_lo(f.k_offset + n0) - f.q_offset;
  int64_t i_hi = f.mask.query_hi(f.k_offset + n_last) - f.q_offset;
  i_lo = i_lo > 0 ? i_lo : 0;
  i_hi = i_hi < f.Sq - 1 ? i_hi : f.Sq - 1;

  float dk[kKvKeysPerWarp][kMaxDimPerLane], dv[kKvKeysPerWarp][kMaxDimPerLane];
#pragma unroll
  for (int jj = 0; jj < kKvKeysPerWarp; ++jj)
#pragma unroll
    for (int u = 0; u < kMaxDimPerLane; ++u) dk[jj][u] = dv[jj][u] = 0.f;

  const int64_t r_begin = i_lo * G, r_end = (i_hi + 1) * G;
  for (int64_t rb = r_begin; rb < r_end; rb += kKvRows) {
    __syncthreads();  // previous rows fully read (K/V writes visible on the first pass)
    for (int idx = tid; idx < kKvRows * D; idx += 128) {
      const int rr = idx / D, c = idx % D;
      const int64_t r = rb + rr;
      float val = 0.f;
      if (r < r_end) {
        const int h = hkv * G + static_cast<int>(r % G);
        val = to_f32(q[b * f.q_s0 + (r / G) * f.q_s1 + h * f.q_s2 + c]);
      }
      Qs[idx] = val;
    }
    for (int idx = tid; idx < kKvRows * Dv; idx += 128) {
      const int rr = idx / Dv, c = idx % Dv;
      const int64_t r = rb + rr;
      float val = 0.f;
      if (r < r_end) {
        const int h = hkv * G + static_cast<int>(r % G);
        val = load_elt(p.dout, b * p.do_s0 + (r / G) * p.do_s1 + h * p.do_s2 + c, p.dout_elt);
      }
      DOs[idx] = val;
    }
    if (tid < kKvRows) {
      const int64_t r = rb + tid;
      float l2 = -INFINITY, dl = 0.f;
      if (r < r_end) {
        const int64_t i = r / G;
        const int h = hkv * G + static_cast<int>(r % G);
        l2 = f.lse[b * f.l_s0 + h * f.l_s1 + i * f.l_s2] * kLog2e;
        dl = p.delta[(static_cast<int64_t>(b) * f.Hq + h) * f.Sq + i];
      }
      rs[2 * tid] = l2;
      rs[2 * tid + 1] = dl;
    }
    __syncthreads();
    for (int rr = 0; rr < kKvRows; ++rr) {
      const int64_t r = rb + rr;
      const float l2 = rs[2 * rr];
      if (r >= r_end || l2 == -INFINITY) continue;  // block-uniform
      const float delta = rs[2 * rr + 1];
      const int64_t qpos = f.q_offset + r / G;
      const float* qr = Qs + rr * D;
      const float* dor = DOs + rr * Dv;
#pragma unroll
      for (int jj = 0; jj < kKvKeysPerWarp; ++jj) {
        const int j = warp * kKvKeysPerWarp + jj;
        const int64_t t = n0 + j;
        if (t > n_last || !f.mask.visible(qpos, f.k_offset + t)) continue;  // warp-uniform
        float sdot = 0.f, pdot = 0.f;
        for (int c = lane; c < D; c += 32) sdot = fmaf(qr[c], Ks[j * D + c], sdot);
        for (int c = lane; c < Dv; c += 32) pdot = fmaf(dor[c], Vs[j * Dv + c], pdot);
        sdot = warp_sum(sdot);
        pdot = warp_sum(pdot);
        const float pr = exp2f(sdot * f.scale_log2 - l2);
        const float ds = pr * (pdot - delta);
#pragma unroll
        for (int u = 0; u < kMaxDimPerLane; ++u) {
          const int c = lane + 32 * u;
          if (c < Dv) dv[jj][u] = fmaf(pr, dor[c], dv[jj][u]);
          if (c < D) dk[jj][u] = fmaf(ds, qr[c], dk[jj][u]);
        }
      }
    }
  }

#pragma unroll
  for (int jj = 0; jj < kKvKeysPerWarp; ++jj) {
    const int64_t t = n0 + warp * kKvKeysPerWarp + jj;
    if (t > n_last) continue;
    const int64_t kb = b * p.dk_s0 + t * p.dk_s1 + hkv * p.dk_s2;
    const int64_t vb = b * p.dv_s0 + t * p.dv_s1 + hkv * p.dv_s2;
#pragma unroll
    for (int u = 0; u < kMaxDimPerLane; ++u) {
      const int c = lane + 32 * u;
      if (c < D) {
        float x = p.scale * dk[jj][u];
        if (p.accumulate) x += load_elt(p.dk, kb + c, p.dk_elt);
        store_elt(p.dk, kb + c, p.dk_elt, x);
      }
      if (c < Dv) {
        float x = dv[jj][u];
        if (p.accumulate) x += load_elt(p.dv, vb + c, p.dv_elt);
        store_elt(p.dv, vb + c, p.dv_elt, x);
      }
    }
  }
}

constexpr int kDqRows = 8;  // rows per block (2 per warp)
constexpr int kDqRowsPerWarp = 2;
constexpr int kDqKeys = 32;

template <typename T>
__global__ void __launch_bounds__(128) bwd_dq_kernel(const BwdParams p) {
  const FwdParams& f = p.f;
  extern __shared__ float smem[];
  const int D = f.D, Dv = f.Dv, G = f.G;
  float* Qs = smem;                    // [kDqRows][D]
  float* DOs = Qs + kDqRows * D;       // [kDqRows][Dv]
  float* Ks = DOs + kDqRows * Dv;      // [kDqKeys][D + 1]
  float* Vs = Ks + kDqKeys * (D + 1);  // [kDqKeys][Dv + 1]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t bh = pair_index(blockIdx.z);
  if (bh >= static_cast<int64_t>(f.B) * f.Hkv) return;  // tail of the last z slice
  const int b = static_cast<int>(bh / f.Hkv), hkv = static_cast<int>(bh % f.Hkv);
  const int64_t rows = static_cast<int64_t>(f.Sq) * G;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kDqRows;
  const int64_t r_end = r0 + kDqRows < rows ? r0 + kDqRows : rows;
  const T* q = static_cast<const T*>(f.q);
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);

  for (int idx = tid; idx < kDqRows * D; idx += 128) {
    const int rr = idx / D, c = idx % D;
    const int64_t r = r0 + rr;
    float val = 0.f;
    if (r < r_end) {
      const int h = hkv * G + static_cast<int>(r % G);
      val = to_f32(q[b * f.q_s0 + (r / G) * f.q_s1 + h * f.q_s2 + c]);
    }
    Qs[idx] = val;
  }
  for (int idx = tid; idx < kDqRows * Dv; idx += 128) {
    const int rr = idx / Dv, c = idx % Dv;
    const int64_t r = r0 + rr;
    float val = 0.f;
    if (r < r_end) {
      const int h = hkv * G + static_cast<int>(r % G);
      val = load_elt(p.dout, b * p.do_s0 + (r / G) * p.do_s1 + h * p.do_s2 + c, p.dout_elt);
    }
    DOs[idx] = val;
  }
  float l2[kDqRowsPerWarp], delta[kDqRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kDqRowsPerWarp; ++rr) {
    const int64_t r = r0 + warp * kDqRowsPerWarp + rr;
    l2[rr] = -INFINITY;
    delta[rr] = 0.f;
    if (r < r_end) {
      const int64_t i = r / G;
      const int h = hkv * G + static_cast<int>(r % G);
      l2[rr] = f.lse[b * f.l_s0 + h * f.l_s1 + i * f.l_s2] * kLog2e;
      delta[rr] = p.delta[(static_cast<int64_t>(b) * f.Hq + h) * f.Sq + i];
    }
  }

  int64_t lo = f.mask.key_lo(f.q_offset + r0 / G) - f.k_offset;
  int64_t hi = f.mask.key_hi(f.q_offset + (r_end - 1) / G) - f.k_offset;
  lo = lo > 0 ? lo : 0;
  hi = hi < f.Sk - 1 ? hi : f.Sk - 1;

  float dq[kDqRowsPerWarp][kMaxDimPerLane];
#pragma unroll
  for (int rr = 0; rr < kDqRowsPerWarp; ++rr)
#pragma unroll
    for (int u = 0; u < kMaxDimPerLane; ++u) dq[rr][u] = 0.f;

  for (int64_t n0 = lo; n0 <= hi; n0 += kDqKeys) {
    __syncthreads();
    for (int idx = tid; idx < kDqKeys * D; idx += 128) {
      const int j = idx / D, c = idx % D;
      const int64_t t = n0 + j;
      Ks[j * (D + 1) + c] = t <= hi ? to_f32(k[b * f.k_s0 + t * f.k_s1 + hkv * f.k_s2 + c]) : 0.f;
    }
    for (int idx = tid; idx < kDqKeys * Dv; idx += 128) {
      const int j = idx / Dv, c = idx % Dv;
      const int64_t t = n0 + j;
      Vs[j * (Dv + 1) + c] = t <= hi ? to_f32(v[b * f.v_s0 + t * f.v_s1 + hkv * f.v_s2 + c]) : 0.f;
    }
    __syncthreads();
    const int64_t t = n0 + lane;
#pragma unroll
    for (int rr = 0; rr < kDqRowsPerWarp; ++rr) {
      const int lr = warp * kDqRowsPerWarp + rr;
      const int64_t r = r0 + lr;
      if (r >= r_end || l2[rr] == -INFINITY) continue;  // warp-uniform
      const int64_t qpos = f.q_offset + r / G;
      float ds = 0.f;
      if (t <= hi && f.mask.visible(qpos, f.k_offset + t)) {
        const float* qr = Qs + lr * D;
        const float* kr = Ks + lane * (D + 1);
        const float* dor = DOs + lr * Dv;
        const float* vr = Vs + lane * (Dv + 1);
        float sdot = 0.f, pdot = 0.f;
        for (int c = 0; c < D; ++c) sdot = fmaf(qr[c], kr[c], sdot);
        for (int c = 0; c < Dv; ++c) pdot = fmaf(dor[c], vr[c], pdot);
        const float pr = exp2f(sdot * f.scale_log2 - l2[rr]);
        ds = pr * (pdot - delta[rr]);
      }
      for (int j = 0; j < kDqKeys; ++j) {
        const float dsj = __shfl_sync(0xffffffffu, ds, j);
        if (dsj == 0.f) continue;  // warp-uniform
        const float* kr = Ks + j * (D + 1);
#pragma unroll
        for (int u = 0; u < kMaxDimPerLane; ++u) {
          const int c = lane + 32 * u;
          if (c < D) dq[rr][u] = fmaf(dsj, kr[c], dq[rr][u]);
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kDqRowsPerWarp; ++rr) {
    const int64_t r = r0 + warp * kDqRowsPerWarp + rr;
    if (r >= r_end) continue;
    const int h = hkv * G + static_cast<int>(r % G);
    const int64_t base = b * p.dq_s0 + (r / G) * p.dq_s1 + h * p.dq_s2;
#pragma unroll
    for (int u = 0; u < kMaxDimPerLane; ++u) {
      const int c = lane + 32 * u;
      if (c < D) {
        float x = p.scale * dq[rr][u];
        if (p.accumulate) x += load_elt(p.dq, base + c, p.dq_elt);
        store_elt(p.dq, base + c, p.dq_elt, x);
      }
    }
  }
}

template <typename T>
void launch_typed(const BwdParams& p, cudaStream_t stream) {
  const FwdParams& f = p.f;
  const int64_t rows = static_cast<int64_t>(f.B) * f.Hq * f.Sq;
  if (rows == 0 && f.Sk == 0) return;
  // A zero-sized grid is a launch error: skip the kernels that have nothing to write
  // (Sq == 0: no delta, no dq; Sk == 0: no dk/dv).
  if (rows > 0) {
    bwd_delta_kernel<<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p);
    DISTATTN_CUDA_CHECK_LAUNCH("bwd_delta_kernel");
  }

  const int smem_kv = static_cast<int>(sizeof(float)) *
                      (kKvKeys * (f.D + f.Dv) + kKvRows * (f.D + f.Dv) + 2 * kKvRows);
  auto kv_kernel = bwd_dkdv_kernel<T>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kv_kernel), smem_kv);
  const PairGrid pairs = pair_grid(static_cast<int64_t>(f.B) * f.Hkv, 1, "attention backward");
  const dim3 kv_grid(static_cast<unsigned>((f.Sk + kKvKeys - 1) / kKvKeys), pairs.y, pairs.z);
  if (f.Sk > 0 && f.B * f.Hkv > 0) {
    kv_kernel<<<kv_grid, 128, smem_kv, stream>>>(p);
    DISTATTN_CUDA_CHECK_LAUNCH("bwd_dkdv_kernel");
  }

  const int smem_q = static_cast<int>(sizeof(float)) *
                     (kDqRows * (f.D + f.Dv) + kDqKeys * (f.D + 1) + kDqKeys * (f.Dv + 1));
  auto q_kernel = bwd_dq_kernel<T>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(q_kernel), smem_q);
  const int64_t qrows = static_cast<int64_t>(f.Sq) * f.G;
  const dim3 q_grid(static_cast<unsigned>((qrows + kDqRows - 1) / kDqRows), pairs.y, pairs.z);
  if (qrows > 0 && f.B * f.Hkv > 0) {
    q_kernel<<<q_grid, 128, smem_q, stream>>>(p);
    DISTATTN_CUDA_CHECK_LAUNCH("bwd_dq_kernel");
  }
}

}  // namespace

void launch_bwd_delta(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.f.B) * p.f.Hq * p.f.Sq;
  if (rows == 0) return;
  bwd_delta_kernel<<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p);
  DISTATTN_CUDA_CHECK_LAUNCH("bwd_delta_kernel");
}

void launch_flash_bwd_simt(const BwdParams& p, DType dtype, cudaStream_t stream) {
  DISTATTN_CHECK_STATUS(p.f.D <= 256 && p.f.Dv <= 256, Status::kUnsupported,
                        "CUDA attention backward supports head dims up to 256, got D = ", p.f.D,
                        ", Dv = ", p.f.Dv);
  switch (dtype) {
    case DType::kFloat32:
      launch_typed<float>(p, stream);
      break;
    case DType::kBFloat16:
      launch_typed<__nv_bfloat16>(p, stream);
      break;
    case DType::kFloat16:
      launch_typed<__half>(p, stream);
      break;
    default:
      DISTATTN_THROW(Status::kInternal, "flash_bwd_simt: unexpected dtype ", dtype_name(dtype));
  }
}

}  // namespace distattn::kernels::cuda
