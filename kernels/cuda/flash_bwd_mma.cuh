#pragma once
// Tensor-core attention backward (bf16/fp16, D == Dv in {64, 128}), included by one
// translation unit per head dim (flash_bwd_hdim*.cu). Two kernels, both deterministic:
//
//   dK/dV: one block per 64 keys of one KV head (4 warps x 16 keys); loops over the query
//          heads of the GQA group and their 32-row query tiles that can see the keys:
//            S^T  = K Q^T              (warp: 16 keys x 32 rows)
//            P^T  = exp2(S^T scale log2e - lse log2e), 0 where masked
//            dV  += P^T dO
//            dP^T = V dO^T
//            dS^T = P^T (dP^T - delta)
//            dK  += dS^T Q             (scale applied once at the end)
//   dQ:    one block per 64 query rows of one head (4 warps x 16 rows), like the forward:
//            S = Q K^T, P, dP = dO V^T, dS = P (dP - delta), dQ += dS K
//
// Fragment choreography as in flash_fwd_mma.cuh: an accumulator C of m16n8k16 is the A
// operand of the next product after packing to 16 bits; a row-major [n][k] tile is a B
// operand through ldmatrix, a row-major [k][n] tile through ldmatrix.trans.
#include "kernels/cuda/flash_fwd_mma.cuh"

namespace distattn::kernels::cuda::mma {

template <int kD>
struct BwdTraits {
  static constexpr int kThreads = 128;
  static constexpr int kStride = kD + 8;  // padded smem rows (16 bytes)
  // dK/dV kernel
  static constexpr int kKvKeys = 64;
  static constexpr int kKvRows = 32;
  static constexpr int kKvSmemBytes =
      (2 * kKvKeys + 2 * kKvRows) * kStride * 2 + 2 * kKvRows * static_cast<int>(sizeof(float));
  // dQ kernel
  static constexpr int kQRows = 64;
  static constexpr int kQKeys = 64;
  static constexpr int kQSmemBytes = (2 * kQRows + 2 * kQKeys) * kStride * 2;
  static_assert(kD % 16 == 0, "head dim must be a multiple of 16");
};

// Rows [row0, row0 + rows) of a [*, kD] global tile (row stride `stride`) into shared
// memory (row stride kD + 8), zero-filled at and past `limit`.
template <typename T, int kD>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t stride, int64_t row0,
                                          int rows, int64_t limit, int tid, int threads) {
  constexpr int kChunks = kD / 8;
  for (int idx = tid; idx < rows * kChunks; idx += threads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool valid = row0 + r < limit;
    cp_async16(smem + r * (kD + 8) + c, valid ? g + (row0 + r) * stride + c : g, valid);
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(128) flash_bwd_dkdv_mma_kernel(const BwdParams p) {
  using Tr = BwdTraits<kD>;
  constexpr int BN = Tr::kKvKeys, BM = Tr::kKvRows, S = Tr::kStride;
  const FwdParams& f = p.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BN * S;
  T* Qs = Vs + BN * S;
  T* DOs = Qs + BM * S;
  float* lse_s = reinterpret_cast<float*>(DOs + BM * S);  // [BM] lse * log2(e); +inf: skip
  float* delta_s = lse_s + BM;                            // [BM]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t bh = pair_index(blockIdx.z);
  if (bh >= static_cast<int64_t>(f.B) * f.Hkv) return;  // tail of the last z slice
  const int b = static_cast<int>(bh / f.Hkv), hkv = static_cast<int>(bh % f.Hkv);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t n_last = (n0 + BN < f.Sk ? n0 + BN : f.Sk) - 1;
  const T* kg = static_cast<const T*>(f.k) + b * f.k_s0 + hkv * f.k_s2;
  const T* vg = static_cast<const T*>(f.v) + b * f.v_s0 + hkv * f.v_s2;
  load_tile<T, kD>(Ks, kg, f.k_s1, n0, BN, f.Sk, tid, 128);
  load_tile<T, kD>(Vs, vg, f.v_s1, n0, BN, f.Sk, tid, 128);
  cp_async_commit();

  int64_t i_lo = f.mask.query_lo(f.k_offset + n0) - f.q_offset;
  int64_t i_hi = f.mask.query_hi(f.k_offset + n_last) - f.q_offset;
  i_lo = i_lo > 0 ? i_lo : 0;
  i_hi = i_hi < f.Sq - 1 ? i_hi : f.Sq - 1;
  const bool any_mask = f.mask.causal || f.mask.window_left >= 0 || f.mask.window_right >= 0;

  float dk[kD / 8][4], dv[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const int64_t key0 = n0 + warp * 16 + lane / 4;  // this thread's keys: key0, key0 + 8

  for (int g = 0; g < f.G; ++g) {
    const int h = hkv * f.G + g;
    const T* qg = static_cast<const T*>(f.q) + b * f.q_s0 + h * f.q_s2;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_s0 + h * p.do_s2;
    for (int64_t m0 = (i_lo / BM) * BM; m0 <= i_hi; m0 += BM) {
      __syncthreads();  // every warp is done with the previous Q/dO tile
      load_tile<T, kD>(Qs, qg, f.q_s1, m0, BM, f.Sq, tid, 128);
      load_tile<T, kD>(DOs, dog, p.do_s1, m0, BM, f.Sq, tid, 128);
      cp_async_commit();
      if (tid < BM) {
        const int64_t r = m0 + tid;
        float l2 = INFINITY, dl = 0.f;
        if (r < f.Sq) {
          const float l = f.lse[b * f.l_s0 + h * f.l_s1 + r * f.l_s2];
          // A row with no visible key (lse -inf) contributes nothing: exp2(s - inf) = 0.
          l2 = l == -INFINITY ? INFINITY : l * kLog2e;
          dl = p.delta[(static_cast<int64_t>(b) * f.Hq + h) * f.Sq + r];
        }
        lse_s[tid] = l2;
        delta_s[tid] = dl;
      }
      cp_async_wait0();
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T: warp's 16 keys x BM rows.
      float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
      for (int i = 0; i < BM / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t ka[4], va[4];
        ldmatrix_x4(ka, Ks + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
        ldmatrix_x4(va, Vs + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int nb2 = 0; nb2 < BM / 16; ++nb2) {
          uint32_t qb[4], db[4];
          const int off =
              (nb2 * 16 + (lane / 16) * 8 + lane % 8) * S + kk * 16 + ((lane / 8) % 2) * 8;
          ldmatrix_x4(qb, Qs + off);
          ldmatrix_x4(db, DOs + off);
          mma_16816<T>(st[2 * nb2], ka, qb[0], qb[1]);
          mma_16816<T>(st[2 * nb2 + 1], ka, qb[2], qb[3]);
          mma_16816<T>(dpt[2 * nb2], va, db[0], db[1]);
          mma_16816<T>(dpt[2 * nb2 + 1], va, db[2], db[3]);
        }
      }

      // P^T and dS^T = P^T (dP^T - delta); rows are the accumulator columns. Only tiles
      // on the mask's edges need the per-element test (see flash_fwd_mma.cuh).
      const bool edge = any_mask && !f.mask.all_visible(f.q_offset + m0, f.q_offset + m0 + BM - 1,
                                                        f.k_offset + n0, f.k_offset + n_last);
#pragma unroll
      for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int lrow = nb * 8 + 2 * (lane % 4) + (e & 1);
          const int64_t key = key0 + (e >= 2 ? 8 : 0);
          const int64_t row = m0 + lrow;
          bool vis = key <= n_last;
          if (edge) vis = vis && f.mask.visible(f.q_offset + row, f.k_offset + key);
          const float pr = vis ? exp2f(st[nb][e] * f.scale_log2 - lse_s[lrow]) : 0.f;
          st[nb][e] = pr;
          dpt[nb][e] = pr * (dpt[nb][e] - delta_s[lrow]);
        }
      }

      // dV += P^T dO and dK += dS^T Q (k = the BM rows).
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        uint32_t pa[4], sa[4];
        pa[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
        pa[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
        pa[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        pa[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        sa[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
        sa[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
        sa[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        sa[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
        for (int db2 = 0; db2 < kD / 16; ++db2) {
          const int off =
              (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * S + db2 * 16 + (lane / 16) * 8;
          uint32_t of[4], qf[4];
          ldmatrix_x4_trans(of, DOs + off);
          ldmatrix_x4_trans(qf, Qs + off);
          mma_16816<T>(dv[2 * db2], pa, of[0], of[1]);
          mma_16816<T>(dv[2 * db2 + 1], pa, of[2], of[3]);
          mma_16816<T>(dk[2 * db2], sa, qf[0], qf[1]);
          mma_16816<T>(dk[2 * db2 + 1], sa, qf[2], qf[3]);
        }
      }
    }
  }

  cp_async_wait0();  // no copy may be in flight at exit (when no query tile was visited)
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t key = key0 + 8 * hr;
    if (key > n_last) continue;
    const int64_t kb = b * p.dk_s0 + key * p.dk_s1 + hkv * p.dk_s2;
    const int64_t vb = b * p.dv_s0 + key * p.dv_s1 + hkv * p.dv_s2;
#pragma unroll
    for (int db = 0; db < kD / 8; ++db) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = db * 8 + 2 * (lane % 4) + e;
        float xk = p.scale * dk[db][2 * hr + e];
        float xv = dv[db][2 * hr + e];
        if (p.accumulate) {
          xk += load_elt(p.dk, kb + c, p.dk_elt);
          xv += load_elt(p.dv, vb + c, p.dv_elt);
        }
        store_elt(p.dk, kb + c, p.dk_elt, xk);
        store_elt(p.dv, vb + c, p.dv_elt, xv);
      }
    }
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(128) flash_bwd_dq_mma_kernel(const BwdParams p) {
  using Tr = BwdTraits<kD>;
  constexpr int BM = Tr::kQRows, BN = Tr::kQKeys, S = Tr::kStride;
  const FwdParams& f = p.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* DOs = Qs + BM * S;
  T* Ks = DOs + BM * S;
  T* Vs = Ks + BN * S;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Last query tiles first: under a causal mask they see the most keys, so the longest
  // blocks start in the first wave instead of trailing the grid.
  const int m0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t bh = pair_index(blockIdx.z);
  if (bh >= static_cast<int64_t>(f.B) * f.Hq) return;  // tail of the last z slice
  const int b = static_cast<int>(bh / f.Hq), h = static_cast<int>(bh % f.Hq);
  const int hkv = h / f.G;
  const T* qg = static_cast<const T*>(f.q) + b * f.q_s0 + h * f.q_s2;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_s0 + h * p.do_s2;
  const T* kg = static_cast<const T*>(f.k) + b * f.k_s0 + hkv * f.k_s2;
  const T* vg = static_cast<const T*>(f.v) + b * f.v_s0 + hkv * f.v_s2;
  load_tile<T, kD>(Qs, qg, f.q_s1, m0, BM, f.Sq, tid, 128);
  load_tile<T, kD>(DOs, dog, p.do_s1, m0, BM, f.Sq, tid, 128);
  cp_async_commit();

  const int row0 = m0 + warp * 16 + lane / 4;  // this thread's rows: row0, row0 + 8
  float l2[2], dl[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    l2[hr] = INFINITY;
    dl[hr] = 0.f;
    if (row < f.Sq) {
      const float l = f.lse[b * f.l_s0 + h * f.l_s1 + row * f.l_s2];
      l2[hr] = l == -INFINITY ? INFINITY : l * kLog2e;
      dl[hr] = p.delta[(static_cast<int64_t>(b) * f.Hq + h) * f.Sq + row];
    }
  }
  const int m_last = (m0 + BM < f.Sq ? m0 + BM : f.Sq) - 1;
  int64_t lo = f.mask.key_lo(f.q_offset + m0) - f.k_offset;
  int64_t hi = f.mask.key_hi(f.q_offset + m_last) - f.k_offset;
  lo = lo > 0 ? lo : 0;
  hi = hi < f.Sk - 1 ? hi : f.Sk - 1;
  const bool any_mask = f.mask.causal || f.mask.window_left >= 0 || f.mask.window_right >= 0;

  float dq[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int64_t n0 = (lo / BN) * BN; n0 <= hi; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile<T, kD>(Ks, kg, f.k_s1, n0, BN, f.Sk, tid, 128);
    load_tile<T, kD>(Vs, vg, f.v_s1, n0, BN, f.Sk, tid, 128);
    cp_async_commit();
    cp_async_wait0();  // (also the Q/dO tile on the first pass)
    __syncthreads();

    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t qa[4], da[4];
      ldmatrix_x4(qa, Qs + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
      ldmatrix_x4(da, DOs + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
        uint32_t kb[4], vb[4];
        const int off =
            (nb2 * 16 + (lane / 16) * 8 + lane % 8) * S + kk * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(kb, Ks + off);
        ldmatrix_x4(vb, Vs + off);
        mma_16816<T>(s[2 * nb2], qa, kb[0], kb[1]);
        mma_16816<T>(s[2 * nb2 + 1], qa, kb[2], kb[3]);
        mma_16816<T>(dp[2 * nb2], da, vb[0], vb[1]);
        mma_16816<T>(dp[2 * nb2 + 1], da, vb[2], vb[3]);
      }
    }

    // dS = P (dP - delta), P = exp2(s scale log2e - lse log2e), 0 where masked (tested per
    // element on the mask's edge tiles only).
    const bool edge = any_mask && !f.mask.all_visible(f.q_offset + m0, f.q_offset + m_last,
                                                      f.k_offset + n0, f.k_offset + n0 + BN - 1);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hr = e >= 2 ? 1 : 0;
        const int64_t key = n0 + nb * 8 + 2 * (lane % 4) + (e & 1);
        bool vis = key < f.Sk;
        if (edge) vis = vis && f.mask.visible(f.q_offset + row0 + 8 * hr, f.k_offset + key);
        const float pr = vis ? exp2f(s[nb][e] * f.scale_log2 - l2[hr]) : 0.f;
        s[nb][e] = pr * (dp[nb][e] - dl[hr]);
      }
    }

    // dQ += dS K (k = keys): K as a row-major [key][d] tile through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t sa[4];
      sa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      sa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      sa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      sa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int db2 = 0; db2 < kD / 16; ++db2) {
        uint32_t kf[4];
        ldmatrix_x4_trans(
            kf, Ks + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * S + db2 * 16 + (lane / 16) * 8);
        mma_16816<T>(dq[2 * db2], sa, kf[0], kf[1]);
        mma_16816<T>(dq[2 * db2 + 1], sa, kf[2], kf[3]);
      }
    }
  }

  cp_async_wait0();  // no copy may be in flight at exit (when no key tile was visited)
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    if (row >= f.Sq) continue;
    const int64_t base = b * p.dq_s0 + row * p.dq_s1 + h * p.dq_s2;
#pragma unroll
    for (int db = 0; db < kD / 8; ++db) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = db * 8 + 2 * (lane % 4) + e;
        float x = p.scale * dq[db][2 * hr + e];
        if (p.accumulate) x += load_elt(p.dq, base + c, p.dq_elt);
        store_elt(p.dq, base + c, p.dq_elt, x);
      }
    }
  }
}

template <typename T, int kD>
void launch_bwd_mma_typed(const BwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<kD>;
  const FwdParams& f = p.f;
  if (f.Sk > 0) {
    auto kernel = flash_bwd_dkdv_mma_kernel<T, kD>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), Tr::kKvSmemBytes);
    const PairGrid pg =
        pair_grid(static_cast<int64_t>(f.B) * f.Hkv, 1, "attention backward dK/dV (tensor cores)");
    const dim3 grid(static_cast<unsigned>((f.Sk + Tr::kKvKeys - 1) / Tr::kKvKeys), pg.y, pg.z);
    kernel<<<grid, Tr::kThreads, Tr::kKvSmemBytes, stream>>>(p);
    DISTATTN_CUDA_CHECK_LAUNCH("flash_bwd_dkdv_mma_kernel");
  }
  if (f.Sq > 0) {
    auto kernel = flash_bwd_dq_mma_kernel<T, kD>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), Tr::kQSmemBytes);
    const PairGrid pg =
        pair_grid(static_cast<int64_t>(f.B) * f.Hq, 1, "attention backward dQ (tensor cores)");
    const dim3 grid(static_cast<unsigned>((f.Sq + Tr::kQRows - 1) / Tr::kQRows), pg.y, pg.z);
    kernel<<<grid, Tr::kThreads, Tr::kQSmemBytes, stream>>>(p);
    DISTATTN_CUDA_CHECK_LAUNCH("flash_bwd_dq_mma_kernel");
  }
}

template <int kD>
void launch_bwd_mma(const BwdParams& p, bool bf16, cudaStream_t stream) {
  if (bf16)
    launch_bwd_mma_typed<__nv_bfloat16, kD>(p, stream);
  else
    launch_bwd_mma_typed<__half, kD>(p, stream);
}

}  // namespace distattn::kernels::cuda::mma
