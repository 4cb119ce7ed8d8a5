#pragma once
// Tensor-core attention forward (FlashAttention-2 style), included by one translation unit
// per head-dim family (flash_fwd_hdim*.cu). One block = 64 query rows of one (batch, head),
// 4 warps x 16 rows. Per key tile of kBlockN keys:
//   S = Q K^T         mma.sync m16n8k16 (Q fragments held in registers, K via ldmatrix)
//   scale, mask       -inf outside the causal/window mask and past the last key
//   online softmax    row max over the quad, p = exp2(s - m), rescale O and l by
//                     exp2(m_old - m_new)
//   O += P V          P re-packed from the S accumulators as A fragments, V via
//                     ldmatrix.trans
// Shared memory rows are padded by 8 elements (16 bytes) so ldmatrix is conflict-free;
// tiles arrive by cp.async with zero fill past the sequence end (so padding rows are
// finite and masked), K and V in separate groups so that V_j loads during Q K_j^T and
// K_{j+1} during P V_j. Requires 16-byte aligned rows (checked by the dispatcher).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/cuda/flash_params.cuh"

namespace distattn::kernels::cuda::mma {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait0() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// c (16x8 fp32) += a (16x16, row) * b (16x8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two fp32 -> one 32-bit register of two 16-bit values (lo in the low half: lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <int kD, int kDv, int kBlockN>
struct FwdTraits {
  static constexpr int kBlockM = 64;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kQStride = kD + 8;
  static constexpr int kKStride = kD + 8;
  static constexpr int kVStride = kDv + 8;
  static constexpr int kSmemElems = kBlockM * kQStride + kBlockN * kKStride + kBlockN * kVStride;
  static_assert(kD % 16 == 0 && kDv % 16 == 0, "head dims must be multiples of 16");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of 16");
};

template <typename T, int kD, int kDv, int kBlockN>
__global__ void __launch_bounds__(FwdTraits<kD, kDv, kBlockN>::kThreads)
    flash_fwd_mma_kernel(const FwdParams p) {
  using Tr = FwdTraits<kD, kDv, kBlockN>;
  constexpr int kBM = Tr::kBlockM, QS = Tr::kQStride, KS = Tr::kKStride, VS = Tr::kVStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kBM * QS;
  T* Vs = Ks + kBlockN * KS;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Last query tiles first: under a causal mask they see the most keys, so the longest
  // blocks start in the first wave instead of trailing the grid.
  const int m0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kBM;
  const int64_t bh = pair_index(blockIdx.z);
  if (bh >= static_cast<int64_t>(p.B) * p.Hq) return;  // tail of the last z slice
  const int b = static_cast<int>(bh / p.Hq), h = static_cast<int>(bh % p.Hq);
  const int hkv = h / p.G;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_s0 + h * p.q_s2;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_s0 + hkv * p.k_s2;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_s0 + hkv * p.v_s2;

  // Q tile -> shared -> registers (A fragments), once.
  constexpr int kQChunks = kD / 8;
  for (int idx = tid; idx < kBM * kQChunks; idx += Tr::kThreads) {
    const int r = idx / kQChunks, c = (idx % kQChunks) * 8;
    const bool valid = m0 + r < p.Sq;
    cp_async16(Qs + r * QS + c, valid ? qg + (m0 + r) * p.q_s1 + c : qg, valid);
  }
  cp_async_commit();
  cp_async_wait0();
  __syncthreads();
  uint32_t qf[kD / 16][4];
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    ldmatrix_x4(qf[kk], Qs + (warp * 16 + lane % 16) * QS + kk * 16 + (lane / 16) * 8);

  // Keys any row of this block can see.
  const int m_last = (m0 + kBM < p.Sq ? m0 + kBM : p.Sq) - 1;
  int64_t lo = p.mask.key_lo(p.q_offset + m0) - p.k_offset;
  int64_t hi = p.mask.key_hi(p.q_offset + m_last) - p.k_offset;
  lo = lo > 0 ? lo : 0;
  hi = hi < p.Sk - 1 ? hi : p.Sk - 1;
  const int64_t n_begin = (lo / kBlockN) * kBlockN;
  const bool any_mask = p.mask.causal || p.mask.window_left >= 0 || p.mask.window_right >= 0;

  float o[kDv / 8][4];
#pragma unroll
  for (int i = 0; i < kDv / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};
  float l_r[2] = {0.f, 0.f};
  const int row0 = m0 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8

  // K and V tiles arrive in separate cp.async groups so that each load overlaps compute:
  // V_j loads during S = Q K_j^T, K_{j+1} loads during O += P V_j.
  constexpr int kKChunks = kD / 8, kVChunks = kDv / 8;
  auto load_k = [&](int64_t n0) {
    for (int idx = tid; idx < kBlockN * kKChunks; idx += Tr::kThreads) {
      const int r = idx / kKChunks, c = (idx % kKChunks) * 8;
      const bool valid = n0 + r < p.Sk;
      cp_async16(Ks + r * KS + c, valid ? kg + (n0 + r) * p.k_s1 + c : kg, valid);
    }
    cp_async_commit();
  };
  auto load_v = [&](int64_t n0) {
    for (int idx = tid; idx < kBlockN * kVChunks; idx += Tr::kThreads) {
      const int r = idx / kVChunks, c = (idx % kVChunks) * 8;
      const bool valid = n0 + r < p.Sk;
      cp_async16(Vs + r * VS + c, valid ? vg + (n0 + r) * p.v_s1 + c : vg, valid);
    }
    cp_async_commit();
  };
  if (n_begin <= hi) load_k(n_begin);

  for (int64_t n0 = n_begin; n0 <= hi; n0 += kBlockN) {
    cp_async_wait0();  // K_j landed (the only pending group)
    __syncthreads();   // ... for every thread; and every warp is done with V_{j-1}
    load_v(n0);
    // S = Q K^T for this warp's 16 rows x kBlockN keys.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
      for (int nb2 = 0; nb2 < kBlockN / 16; ++nb2) {
        uint32_t kf[4];
        ldmatrix_x4(
            kf, Ks + (nb2 * 16 + (lane / 16) * 8 + lane % 8) * KS + kk * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * nb2], qf[kk], kf[0], kf[1]);
        mma_16816<T>(s[2 * nb2 + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Scale into base 2, mask. Under a mask only the tiles on its edges (the causal
    // diagonal, the window borders) need the per-element test: a tile every row of the
    // block sees entirely skips it (most tiles of a long causal sequence).
    const bool edge =
        n0 + kBlockN > p.Sk ||
        (any_mask && !p.mask.all_visible(p.q_offset + m0, p.q_offset + m_last, p.k_offset + n0,
                                         p.k_offset + n0 + kBlockN - 1));
#pragma unroll
    for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nb][e] * p.scale_log2;
        if (edge) {
          const int64_t key = n0 + nb * 8 + 2 * (lane % 4) + (e & 1);
          const int row = row0 + (e >= 2 ? 8 : 0);
          if (key >= p.Sk || !p.mask.visible(p.q_offset + row, p.k_offset + key)) x = -INFINITY;
        }
        s[nb][e] = x;
      }
    }

    // Online softmax: rows row0 (elements 0, 1) and row0 + 8 (elements 2, 3); a row's
    // values are spread over the 4 threads of a quad.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kBlockN / 8; ++nb)
        mx = fmaxf(mx, fmaxf(s[nb][2 * hr], s[nb][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_r[hr], mx);
      // Nothing visible yet: subtract 0 so exp2(-inf - base) = 0, never NaN.
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_r[hr] - base);
      m_r[hr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kBlockN / 8; ++nb) {
        s[nb][2 * hr] = exp2f(s[nb][2 * hr] - base);
        s[nb][2 * hr + 1] = exp2f(s[nb][2 * hr + 1] - base);
        sum += s[nb][2 * hr] + s[nb][2 * hr + 1];
      }
      l_r[hr] = l_r[hr] * alpha + sum;  // per-thread partial; quad-reduced at the end
#pragma unroll
      for (int db = 0; db < kDv / 8; ++db) {
        o[db][2 * hr] *= alpha;
        o[db][2 * hr + 1] *= alpha;
      }
    }

    cp_async_wait0();  // V_j landed
    __syncthreads();   // ... for every thread; and every warp is done reading K_j
    if (n0 + kBlockN <= hi) load_k(n0 + kBlockN);

      // O += P V: the S accumulators of n-blocks 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int db2 = 0; db2 < kDv / 16; ++db2) {
        uint32_t vf[4];
        ldmatrix_x4_trans(
            vf, Vs + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * VS + db2 * 16 + (lane / 16) * 8);
        mma_16816<T>(o[2 * db2], pa, vf[0], vf[1]);
        mma_16816<T>(o[2 * db2 + 1], pa, vf[2], vf[3]);
      }
    }
  }

  // Epilogue: normalize, write O (q's dtype or fp32) and lse (natural log).
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = l_r[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = row0 + 8 * hr;
    if (row >= p.Sq) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t o_base = b * p.o_s0 + row * p.o_s1 + h * p.o_s2;
#pragma unroll
    for (int db = 0; db < kDv / 8; ++db) {
      const int c = db * 8 + 2 * (lane % 4);
      store_elt(p.out, o_base + c, p.out_elt, o[db][2 * hr] * inv);
      store_elt(p.out, o_base + c + 1, p.out_elt, o[db][2 * hr + 1] * inv);
    }
    if (lane % 4 == 0)
      p.lse[b * p.l_s0 + h * p.l_s1 + row * p.l_s2] =
          l > 0.f ? (m_r[hr] + log2f(l)) * kLn2 : -INFINITY;
  }
}

template <int kD, int kDv, int kBlockN>
void launch_fwd_mma(const FwdParams& p, bool bf16, cudaStream_t stream) {
  using Tr = FwdTraits<kD, kDv, kBlockN>;
  const int smem = Tr::kSmemElems * 2;
  const PairGrid pg =
      pair_grid(static_cast<int64_t>(p.B) * p.Hq, 1, "attention forward (tensor cores)");
  const dim3 grid(static_cast<unsigned>((p.Sq + Tr::kBlockM - 1) / Tr::kBlockM), pg.y, pg.z);
  if (bf16) {
    auto kernel = flash_fwd_mma_kernel<__nv_bfloat16, kD, kDv, kBlockN>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  } else {
    auto kernel = flash_fwd_mma_kernel<__half, kD, kDv, kBlockN>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  }
  DISTATTN_CUDA_CHECK_LAUNCH("flash_fwd_mma_kernel");
}

}  // namespace distattn::kernels::cuda::mma
