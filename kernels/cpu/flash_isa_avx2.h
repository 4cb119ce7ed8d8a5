#pragma once
// AVX2+FMA policy for flash_impl.h, for x86-64 CPUs without AVX-512. Included only from
// flash_*_avx2.cpp, after `#pragma GCC target("avx2,fma,f16c")`; internal linkage only.
#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/flash_impl.h"

namespace distattn::kernels::cpu {
namespace {

// 2^x: clamp to [-127, 127], degree-7 polynomial on the fraction in [-0.5, 0.5] (as the
// AVX-512 version), 2^round(x) built in the exponent field. x < -127 (including -inf)
// gives exactly 0, so masked scores contribute nothing.
inline __m256 exp2_ps8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-127.f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(127.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5252733804059840e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381608e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Lane mask with the first n (1..8) lanes set.
inline __m256i lanes8(int64_t n) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - std::min<int64_t>(n, 8)));
}

// C[MR x 8*NV] (+)= A[MR x K] B[K x 8*NV]; MASKED: the last vector has `last` lanes.
template <int MR, int NV, bool MASKED>
inline void micro_kernel8(int64_t K, const float* a, int64_t ars, int64_t ats, const float* b,
                          int64_t ldb, float* c, int64_t ldc, bool accumulate, __m256i last) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  const float* ar[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ar[r] = a + r * ars;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (MASKED && v == NV - 1) ? _mm256_maskload_ps(bk + 8 * v, last)
                                      : _mm256_loadu_ps(bk + 8 * v);
    const int64_t ao = k * ats;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ar[r] + ao);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 8 * v;
      if (MASKED && v == NV - 1) {
        __m256 x = acc[r][v];
        if (accumulate) x = _mm256_add_ps(x, _mm256_maskload_ps(cp, last));
        _mm256_maskstore_ps(cp, last, x);
      } else {
        __m256 x = acc[r][v];
        if (accumulate) x = _mm256_add_ps(x, _mm256_loadu_ps(cp));
        _mm256_storeu_ps(cp, x);
      }
    }
  }
}

template <int NV, bool MASKED>
inline void micro_rows8(int64_t mr, int64_t K, const float* a, int64_t ars, int64_t ats,
                        const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
                        __m256i last) {
  switch (mr) {
    case 6:
      micro_kernel8<6, NV, MASKED>(K, a, ars, ats, b, ldb, c, ldc, accumulate, last);
      break;
    case 5:
      micro_kernel8<5, NV, MASKED>(K, a, ars, ats, b, ldb, c, ldc, accumulate, last);
      break;
    case 4:
      micro_kernel8<4, NV, MASKED>(K, a, ars, ats, b, ldb, c, ldc, accumulate, last);
      break;
    case 3:
      micro_kernel8<3, NV, MASKED>(K, a, ars, ats, b, ldb, c, ldc, accumulate, last);
      break;
    case 2:
      micro_kernel8<2, NV, MASKED>(K, a, ars, ats, b, ldb, c, ldc, accumulate, last);
      break;
    default:
      micro_kernel8<1, NV, MASKED>(K, a, ars, ats, b, ldb, c, ldc, accumulate, last);
      break;
  }
}

struct Avx2Isa {
  static constexpr int64_t kFwdBlockQ = 64;
  static constexpr int64_t kFwdBlockK = 128;
  static constexpr int64_t kBwdBlockQ = 64;
  static constexpr int64_t kBwdBlockK = 64;
  static constexpr int64_t kMr = 6;  // 6 x 2 ymm accumulators + 2 B vectors + 1 broadcast

  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t ats,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    if (K == 0) {
      if (!accumulate)
        for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, 0.f);
      return;
    }
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      const int64_t nn = std::min<int64_t>(16, N - n0);
      const bool two = nn > 8;
      const int64_t tail = nn - (two ? 8 : 0);
      const bool masked = tail != 8;
      const __m256i last = lanes8(tail);
      for (int64_t m0 = 0; m0 < M; m0 += kMr) {
        const int64_t mr = std::min<int64_t>(kMr, M - m0);
        const float* am = a + m0 * ars;
        const float* bn = b + n0;
        float* cm = c + m0 * ldc + n0;
        if (two) {
          if (masked)
            micro_rows8<2, true>(mr, K, am, ars, ats, bn, ldb, cm, ldc, accumulate, last);
          else
            micro_rows8<2, false>(mr, K, am, ars, ats, bn, ldb, cm, ldc, accumulate, last);
        } else {
          if (masked)
            micro_rows8<1, true>(mr, K, am, ars, ats, bn, ldb, cm, ldc, accumulate, last);
          else
            micro_rows8<1, false>(mr, K, am, ars, ats, bn, ldb, cm, ldc, accumulate, last);
        }
      }
    }
  }

  // Brings `rows` rows of `row_bytes` bytes, `ld_bytes` apart, into the cache: the forward's
  // next K or V tile. Its rows are short strided streams that the hardware prefetchers pick up
  // late, so a tile read from L3 or DRAM would stall on every line. An asm statement: with
  // __builtin_prefetch, GCC 12 -O3 compiled the whole loop away in flash_forward_avx2.cpp.
  static void prefetch_rows(const char* base, int64_t ld_bytes, int64_t rows, int64_t row_bytes) {
    prefetch_rows_t0(base, ld_bytes, rows, row_bytes);
  }

  // Lane i is query i; rows j are keys (see PortableIsa::softmax_columns). Full groups of 8
  // queries use plain loads and stores: AVX2's masked store is slow on AMD.
  template <bool FULL>
  static void softmax_lanes(float* st, int64_t ld, int64_t rows, int64_t n, float* m, float* l,
                            float* alpha) {
    const __m256 ninf = _mm256_set1_ps(kNegInf);
    const __m256i mk = lanes8(n);
    auto load = [&](const float* x) {
      return FULL ? _mm256_loadu_ps(x)
                  : _mm256_blendv_ps(ninf, _mm256_maskload_ps(x, mk), _mm256_castsi256_ps(mk));
    };
    auto store = [&](float* x, __m256 v) {
      if (FULL)
        _mm256_storeu_ps(x, v);
      else
        _mm256_maskstore_ps(x, mk, v);
    };
    const __m256 m_old = load(m);
    __m256 mx = m_old;
    for (int64_t j = 0; j < rows; ++j) mx = _mm256_max_ps(mx, load(st + j * ld));
    const __m256 mu = _mm256_andnot_ps(_mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ), mx);
    const __m256 al = exp2_ps8(_mm256_sub_ps(m_old, mu));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < rows; ++j) {
      float* r = st + j * ld;
      const __m256 e = exp2_ps8(_mm256_sub_ps(load(r), mu));
      store(r, e);
      sum = _mm256_add_ps(sum, e);
    }
    store(l, _mm256_fmadd_ps(load(l), al, sum));
    store(m, mx);
    store(alpha, al);
  }

  static void softmax_columns(float* st, int64_t ld, int64_t rows, int64_t cols, float* m, float* l,
                              float* alpha) {
    int64_t i0 = 0;
    for (; i0 + 8 <= cols; i0 += 8)
      softmax_lanes<true>(st + i0, ld, rows, 8, m + i0, l + i0, alpha + i0);
    if (i0 < cols) softmax_lanes<false>(st + i0, ld, rows, cols - i0, m + i0, l + i0, alpha + i0);
  }

  static void probs_rows(float* s, int64_t ld, int64_t rows, int64_t cols, float c2,
                         const float* lse2) {
    const __m256 vc = _mm256_set1_ps(c2);
    for (int64_t i = 0; i < rows; ++i) {
      float* r = s + i * ld;
      const __m256 sub = _mm256_set1_ps(lse2[i]);
      int64_t j0 = 0;
      for (; j0 + 8 <= cols; j0 += 8)
        _mm256_storeu_ps(r + j0, exp2_ps8(_mm256_fmsub_ps(_mm256_loadu_ps(r + j0), vc, sub)));
      if (j0 < cols) {
        const __m256i mk = lanes8(cols - j0);
        const __m256 x = _mm256_fmsub_ps(_mm256_maskload_ps(r + j0, mk), vc, sub);
        _mm256_maskstore_ps(r + j0, mk, exp2_ps8(x));
      }
    }
  }
};

}  // namespace
}  // namespace distattn::kernels::cpu
