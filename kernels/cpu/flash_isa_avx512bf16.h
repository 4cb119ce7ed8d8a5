#pragma once
// AVX512-BF16 policy for flash_impl.h: the AVX-512 policy plus bf16 dot-product tiles
// (vdpbf16ps) for the forward's two GEMMs and the backward's five when the inputs are bf16. Include
// only from
// *_avx512bf16.cpp files (built with the AVX-512 flags and -mavx512bf16); everything has
// internal linkage.
//
// A "word" is a pair of bf16 values packed in 32 bits (low half first): vdpbf16ps multiplies
// the pairs of two vectors lane by lane and adds both products to an fp32 accumulator
// (products are exact in fp32; the sum is rounded as an FMA chain would be). Operands:
//   scores  st[j][i] = c2 * sum_d K[j][d] Q[i][d]: A = K rows as stored (pairs along d),
//           B = the query block packed as words qp[d/2][i] (pack_q);
//   P V     o[i][e] += sum_j P[i][j] V[j][e]: A = P^T packed as words pp[j/2][i] (pack_p,
//           P rounded to bf16 as flash-attention does on GPUs when out is bf16; for fp32
//           outputs P = hi + lo, two passes, so that out keeps fp32 accuracy), B = the V
//           tile packed as words vp[j/2][e] (pack_v).
// The online-softmax statistics (m, l, lse) stay fp32 and come from the fp32 scores.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/flash_isa_avx512.h"
#include "kernels/cpu/transpose16.h"

namespace distattn::kernels::cpu {
namespace {

inline uint32_t load_word(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

inline __m512bh as_bh(__m512i x) {
  return reinterpret_cast<__m512bh>(x);
}

// C[MR x 16*NV] (+)= mul * sum_k2 A(m, k2) . B(k2, n) over K2 pairs. A(m, k2) is the word at
// a + m*ars + k2*ats (uint16 units; the two values are adjacent), B(k2, n) the word
// b[k2*ldb + n]. The last B/C vector is masked with `last`.
template <int MR, int NV>
inline void bf16_micro_kernel(int64_t K2, const uint16_t* a, int64_t ars, int64_t ats,
                              const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                              bool accumulate, float mul, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    const uint32_t* bk = b + k * ldb;
    __m512i bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV - 1; ++v) bv[v] = _mm512_loadu_si512(bk + 16 * v);
    bv[NV - 1] = _mm512_maskz_loadu_epi32(last, bk + 16 * (NV - 1));
    const uint16_t* ak = a + k * ats;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(load_word(ak + r * ars)));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], as_bh(av), as_bh(bv[v]));
    }
  }
  const __m512 vm = _mm512_set1_ps(mul);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 16 * v;
      const __mmask16 mk = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      __m512 x = _mm512_mul_ps(acc[r][v], vm);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mk, cp));
      _mm512_mask_storeu_ps(cp, mk, x);
    }
  }
}

struct Avx512Bf16Isa : Avx512Isa {
  static constexpr bool kBf16Dot = true;

  // C[M x N] (+)= mul * A . B over K2 word pairs (layouts as bf16_micro_kernel).
  static void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t ars,
                        int64_t ats, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                        bool accumulate, float mul) {
    for_each_block(M, N, [&]<int MR, int NV>(int64_t m0, int64_t n0, __mmask16 last) {
      bf16_micro_kernel<MR, NV>(K2, a + m0 * ars, ars, ats, b + n0, ldb, c + m0 * ldc + n0, ldc,
                                accumulate, mul, last);
    });
  }

  // qp[d2*ld + i] = (q_i[2*d2], q_i[2*d2+1]) for i < rows, d2 < D/2 (D even); columns
  // [rows, ld) are zero. q_i = q + i*ss.
  static void pack_q(const uint16_t* q, int64_t ss, int64_t rows, int64_t D, uint32_t* qp,
                     int64_t ld) {
    const int64_t D2 = D / 2;
    // Whole 16 x 16 blocks of words (rows whose stride is a whole number of words) as
    // register transposes; the rest word by word.
    const int64_t i16 = ss % 2 == 0 ? rows / 16 * 16 : 0, d16 = D2 / 16 * 16;
    for (int64_t i0 = 0; i0 < i16; i0 += 16)
      for (int64_t d0 = 0; d0 < d16; d0 += 16)
        transpose16_words(reinterpret_cast<const uint32_t*>(q + i0 * ss) + d0, ss / 2,
                          qp + d0 * ld + i0, ld);
    for (int64_t i = 0; i < rows; ++i) {
      const uint16_t* r = q + i * ss;
      for (int64_t d2 = i < i16 ? d16 : 0; d2 < D2; ++d2) qp[d2 * ld + i] = load_word(r + 2 * d2);
    }
    if (rows < ld)
      for (int64_t d2 = 0; d2 < D2; ++d2) std::memset(qp + d2 * ld + rows, 0, (ld - rows) * 4);
  }

  // vp[j2*Dv + e] = (v_{2*j2}[e], v_{2*j2+1}[e]) for j2 < ceil(rows/2); a missing odd row is
  // zero. v_j = v + j*ss.
  static void pack_v(const uint16_t* v, int64_t ss, int64_t rows, int64_t Dv, uint32_t* vp) {
    for (int64_t j = 0; j < rows; j += 2) {
      const uint16_t* r0 = v + j * ss;
      const uint16_t* r1 = j + 1 < rows ? r0 + ss : nullptr;
      uint32_t* out = vp + (j / 2) * Dv;
      for (int64_t e = 0; e < Dv; e += 16) {
        const __mmask16 mk = tail_mask(Dv - e);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, r0 + e));
        const __m512i hi = r1 != nullptr
                               ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, r1 + e))
                               : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(out + e, mk, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }

  // pp[j2*ld + i] = (bf16(st[2*j2][i]), bf16(st[2*j2+1][i])) for i < cols, j2 <
  // ceil(rows/2) (st rows have stride ld); a missing odd row is zero. With `lo`, also the
  // rounding residues lo[j2*ld + i] = bf16(st - hi): hi + lo carries P to ~2^-17 relative,
  // enough for fp32 outputs, at the cost of a second P V pass.
  static void pack_p(const float* st, int64_t ld, int64_t rows, int64_t cols, uint32_t* pp,
                     uint32_t* lo) {
    const auto split = [](__m512 x, __m512i& hi_w, __m512i& lo_w) {
      const __m512i h = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
      hi_w = h;
      const __m512 r = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
      lo_w = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r)));
    };
    for (int64_t j = 0; j < rows; j += 2) {
      const float* r0 = st + j * ld;
      const bool two = j + 1 < rows;
      const int64_t at = (j / 2) * ld;
      for (int64_t i = 0; i < cols; i += 16) {
        const __mmask16 mk = tail_mask(cols - i);
        __m512i h0, l0, h1 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
        split(_mm512_maskz_loadu_ps(mk, r0 + i), h0, l0);
        if (two) split(_mm512_maskz_loadu_ps(mk, r0 + ld + i), h1, l1);
        _mm512_mask_storeu_epi32(pp + at + i, mk, _mm512_or_si512(h0, _mm512_slli_epi32(h1, 16)));
        if (lo != nullptr)
          _mm512_mask_storeu_epi32(lo + at + i, mk, _mm512_or_si512(l0, _mm512_slli_epi32(l1, 16)));
      }
    }
  }

  // w[i*ldw + j2] = (bf16(s[i][2*j2]), bf16(s[i][2*j2+1])) for i < rows, j2 < ceil(cols/2)
  // (s rows have stride ld; a missing odd column is zero): pairs along a row, the A operand
  // of a product over s's columns. With `lo`, also the rounding residues, as pack_p.
  static void pack_rows(const float* s, int64_t ld, int64_t rows, int64_t cols, uint32_t* w,
                        uint32_t* lo, int64_t ldw) {
    const auto mask_of = [](int64_t n) {
      return n <= 0 ? static_cast<__mmask16>(0) : tail_mask(n);
    };
    const auto widen = [](__m256i h) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    };
    for (int64_t i = 0; i < rows; ++i) {
      const float* r = s + i * ld;
      for (int64_t j = 0; j < cols; j += 32) {
        const __m512 a = _mm512_maskz_loadu_ps(mask_of(cols - j), r + j);
        const __m512 b = _mm512_maskz_loadu_ps(mask_of(cols - j - 16), r + j + 16);
        const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
        const __mmask16 wm = mask_of((std::min<int64_t>(32, cols - j) + 1) / 2);
        _mm512_mask_storeu_epi32(w + i * ldw + j / 2, wm, h);
        if (lo != nullptr) {
          const __m512 ra = _mm512_sub_ps(a, widen(_mm512_castsi512_si256(h)));
          const __m512 rb = _mm512_sub_ps(b, widen(_mm512_extracti64x4_epi64(h, 1)));
          _mm512_mask_storeu_epi32(lo + i * ldw + j / 2, wm,
                                   reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(rb, ra)));
        }
      }
    }
  }
};

}  // namespace
}  // namespace distattn::kernels::cpu
