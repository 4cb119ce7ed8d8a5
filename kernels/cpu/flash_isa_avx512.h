#pragma once
// AVX-512 policy for flash_impl.h. Include only from *_avx512.cpp files (built with
// -mavx512f/bw/vl/dq -mfma); everything has internal linkage.
// GCC 12 flags the _mm512_undefined_ps() inside max/min/roundscale/scalef intrinsics as
// maybe-uninitialized when they inline; the lanes are fully written.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/flash_impl.h"

namespace distattn::kernels::cpu {
namespace {

// 2^x for x <= 0 (larger x are fine up to 127). The fraction f = x - round(x) in
// [-0.5, 0.5] goes through a degree-5 polynomial (a relative-error fit on Chebyshev nodes:
// 1.9e-7 in fp32 arithmetic, under 2 ulp), and scalef applies 2^round(x) without overflow.
// x <= -126 (and -inf) gives 0: results below 2^-126 would be subnormal, and on Intel cores
// every subnormal result costs a microcode assist (a causal forward, whose masked scores are
// -inf, ran 1.25x slower).
inline __m512 exp2_ps(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  x = _mm512_min_ps(x, _mm512_set1_ps(127.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3264722656458616e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6715129911899567e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507335811853409e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242426872253e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314700365066528e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// max(init, column block st[j*ld + 0..15] over rows j), lanes outside mk read as 0. Four
// running maxima: one would chain every row on the max latency.
inline __m512 column_max(const float* st, int64_t ld, int64_t rows, __mmask16 mk, __m512 init) {
  __m512 m0 = init, m1 = init, m2 = init, m3 = init;
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    m0 = _mm512_max_ps(m0, _mm512_maskz_loadu_ps(mk, st + j * ld));
    m1 = _mm512_max_ps(m1, _mm512_maskz_loadu_ps(mk, st + (j + 1) * ld));
    m2 = _mm512_max_ps(m2, _mm512_maskz_loadu_ps(mk, st + (j + 2) * ld));
    m3 = _mm512_max_ps(m3, _mm512_maskz_loadu_ps(mk, st + (j + 3) * ld));
  }
  for (; j < rows; ++j) m0 = _mm512_max_ps(m0, _mm512_maskz_loadu_ps(mk, st + j * ld));
  return _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3));
}

// The softmax's exponent shift for a running max mx: mx, or 0 in columns with no visible key
// so far (mx still -inf), which are exponentiated against 0.
inline __m512 softmax_shift(__m512 mx) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ), mx,
                              _mm512_setzero_ps());
}

// Register-blocked C[MR x 16*NV] (+)= A[MR x K] B[K x 16*NV]: MR broadcasts of A and NV
// loads of B feed MR*NV FMAs per k. The last B/C vector is masked with `last`.
template <int MR, int NV>
inline void micro_kernel(int64_t K, const float* a, int64_t ars, int64_t ats, const float* b,
                         int64_t ldb, float* c, int64_t ldc, bool accumulate, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* ar[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) ar[r] = a + r * ars;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV - 1; ++v) bv[v] = _mm512_loadu_ps(bk + 16 * v);
    bv[NV - 1] = _mm512_maskz_loadu_ps(last, bk + 16 * (NV - 1));
    const int64_t ao = k * ats;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ar[r][ao]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 16 * v;
      const __mmask16 mk = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      __m512 x = acc[r][v];
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mk, cp));
      _mm512_mask_storeu_ps(cp, mk, x);
    }
  }
}

// Calls f.template operator()<MR, NV>(m0, n0, last) for each block of a C[M x N]: blocks of
// up to 6 rows and 64 columns (NV vectors of 16; the last one masked with `last`), so that
// every micro-kernel shape is a template instance.
template <class F>
inline void for_each_block(int64_t M, int64_t N, F&& f) {
  const auto rows = [&]<int NV>(int64_t mr, int64_t m0, int64_t n0, __mmask16 last) {
    switch (mr) {
      case 6:
        return f.template operator()<6, NV>(m0, n0, last);
      case 5:
        return f.template operator()<5, NV>(m0, n0, last);
      case 4:
        return f.template operator()<4, NV>(m0, n0, last);
      case 3:
        return f.template operator()<3, NV>(m0, n0, last);
      case 2:
        return f.template operator()<2, NV>(m0, n0, last);
      default:
        return f.template operator()<1, NV>(m0, n0, last);
    }
  };
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nn = std::min<int64_t>(64, N - n0);
    const int64_t nv = (nn + 15) / 16;
    const __mmask16 last = tail_mask(nn - 16 * (nv - 1));
    for (int64_t m0 = 0, mr = 0; m0 < M; m0 += mr) {
      // Blocks of 6 rows; 7-11 left over split into two near-equal blocks (8 = 4 + 4, not
      // 6 + 2: a 2-row block is load-bound).
      const int64_t rem = M - m0;
      mr = rem >= 12 || rem == 6 ? 6 : rem > 6 ? (rem + 1) / 2 : rem;
      switch (nv) {
        case 4:
          rows.template operator()<4>(mr, m0, n0, last);
          break;
        case 3:
          rows.template operator()<3>(mr, m0, n0, last);
          break;
        case 2:
          rows.template operator()<2>(mr, m0, n0, last);
          break;
        default:
          rows.template operator()<1>(mr, m0, n0, last);
          break;
      }
    }
  }
}

struct Avx512Isa {
  static constexpr int64_t kFwdBlockQ = 128;
  static constexpr int64_t kFwdBlockK = 128;
  static constexpr int64_t kBwdBlockQ = 64;
  static constexpr int64_t kBwdBlockK = 64;

  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t ats,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    if (K == 0) {
      if (!accumulate)
        for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, 0.f);
      return;
    }
    for_each_block(M, N, [&]<int MR, int NV>(int64_t m0, int64_t n0, __mmask16 last) {
      micro_kernel<MR, NV>(K, a + m0 * ars, ars, ats, b + n0, ldb, c + m0 * ldc + n0, ldc,
                           accumulate, last);
    });
  }

  // Lane i of each vector is query i; rows j are keys.
  static void softmax_columns(float* st, int64_t ld, int64_t rows, int64_t cols, float* m, float* l,
                              float* alpha) {
    const __m512 ninf = _mm512_set1_ps(kNegInf);
    for (int64_t i0 = 0; i0 < cols; i0 += 16) {
      const __mmask16 mk = tail_mask(cols - i0);
      const __m512 m_old = _mm512_mask_loadu_ps(ninf, mk, m + i0);
      const __m512 mx = column_max(st + i0, ld, rows, mk, m_old);
      const __m512 mu = softmax_shift(mx);
      const __m512 al = exp2_ps(_mm512_sub_ps(m_old, mu));
      __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 1 < rows; j += 2) {
        float* r0 = st + j * ld + i0;
        float* r1 = r0 + ld;
        const __m512 e0 = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, r0), mu));
        const __m512 e1 = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, r1), mu));
        _mm512_mask_storeu_ps(r0, mk, e0);
        _mm512_mask_storeu_ps(r1, mk, e1);
        sum0 = _mm512_add_ps(sum0, e0);
        sum1 = _mm512_add_ps(sum1, e1);
      }
      for (; j < rows; ++j) {
        float* r0 = st + j * ld + i0;
        const __m512 e0 = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, r0), mu));
        _mm512_mask_storeu_ps(r0, mk, e0);
        sum0 = _mm512_add_ps(sum0, e0);
      }
      const __m512 l_old = _mm512_maskz_loadu_ps(mk, l + i0);
      _mm512_mask_storeu_ps(l + i0, mk, _mm512_fmadd_ps(l_old, al, _mm512_add_ps(sum0, sum1)));
      _mm512_mask_storeu_ps(m + i0, mk, mx);
      _mm512_mask_storeu_ps(alpha + i0, mk, al);
    }
  }

  static void probs_rows(float* s, int64_t ld, int64_t rows, int64_t cols, float c2,
                         const float* lse2) {
    const __m512 vc = _mm512_set1_ps(c2);
    for (int64_t i = 0; i < rows; ++i) {
      float* r = s + i * ld;
      const __m512 sub = _mm512_set1_ps(lse2[i]);
      for (int64_t j0 = 0; j0 < cols; j0 += 16) {
        const __mmask16 mk = tail_mask(cols - j0);
        const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, r + j0), vc, sub);
        _mm512_mask_storeu_ps(r + j0, mk, exp2_ps(x));
      }
    }
  }
};

}  // namespace
}  // namespace distattn::kernels::cpu
