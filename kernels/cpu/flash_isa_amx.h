#pragma once
// AMX-BF16 policy for flash_impl.h: the AVX512-BF16 policy with its bf16 GEMM on AMX tiles
// (tdpbf16ps, amx_gemm.h), so the forward's two GEMMs and the backward's five run there when
// the inputs are bf16; packing, online softmax, fp32 statistics and every other dtype stay
// as in the AVX512-BF16 policy. Include only from *_amx.cpp files (built with the AVX-512
// flags plus -mavx512bf16 -mamx-tile -mamx-bf16); everything has internal linkage. The
// process must have been granted the tile state (cpu_kernel_isa_available(kAmx) asks Linux
// for it) before these run.
#include <immintrin.h>

#include "kernels/cpu/amx_gemm.h"
#include "kernels/cpu/flash_isa_avx512bf16.h"

namespace distattn::kernels::cpu {
namespace {

// The hardware tiles for amx_gemm_bf16 (tile numbers are immediates).
struct AmxHwTiles {
  static void begin(const AmxTileConfig* cfg) { _tile_loadconfig(cfg); }
  static void end() { _tile_release(); }
  static void zero_c() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  static void load_c(const float* c0, const float* c1, const float* c2, const float* c3,
                     int64_t stride) {
    _tile_loadd(0, c0, stride);
    _tile_loadd(1, c1, stride);
    _tile_loadd(2, c2, stride);
    _tile_loadd(3, c3, stride);
  }
  static void load_ab(const void* a0, int64_t sa0, const void* a1, int64_t sa1, const void* b0,
                      int64_t sb0, const void* b1, int64_t sb1) {
    _tile_loadd(4, a0, sa0);
    _tile_loadd(5, a1, sa1);
    _tile_loadd(6, b0, sb0);
    _tile_loadd(7, b1, sb1);
  }
  static void dp4() {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  static void store_c(float* c0, float* c1, float* c2, float* c3, int64_t stride) {
    _tile_stored(0, c0, stride);
    _tile_stored(1, c1, stride);
    _tile_stored(2, c2, stride);
    _tile_stored(3, c3, stride);
  }
};

struct AmxIsa : Avx512Bf16Isa {
  // 512 queries per forward item (each K/V tile is loaded, and on the bf16 tiles packed,
  // once for more queries: at S 4K, D 128, 1.1x over 128 on bf16 tiles, 1.1x on fp32 ones).
  static constexpr int64_t kFwdBlockQ = 512;
  // 128 x 128 backward blocks (AVX-512's are 64 x 64): Q, dO and dQ are streamed once per
  // key block, half as often; at S 4K, D 128: bf16 1.25x, fp32 1.1x.
  static constexpr int64_t kBwdBlockQ = 128;
  static constexpr int64_t kBwdBlockK = 128;
  // softmax_columns and pack_p in one pass, writing P in the layout an A tile loads in place
  // (flash_impl.h, kSoftmaxPacksRows): the scores st[j][i] (keys j in rows, queries i in
  // columns, not yet scaled) become P = exp2(scale * st - m_new) with the running m, l and
  // alpha updated as softmax_columns does (l sums the fp32 P), and
  //   pw[i*ldw + j2] = (bf16(P[i][2*j2]), bf16(P[i][2*j2+1])) for j2 < round16(ceil(rows/2)),
  // zero past the last key; with pw_lo also the rounding residues (as pack_p). Rows i of pw
  // past `cols` up to the next multiple of 16 are written with don't-care values. scale > 0
  // (masked scores are -inf before scaling).
  static void softmax_pack_rows(const float* st, int64_t ld, int64_t rows, int64_t cols,
                                float scale, float* m, float* l, float* alpha, uint32_t* pw,
                                uint32_t* pw_lo, int64_t ldw) {
    const __m512 ninf = _mm512_set1_ps(kNegInf);
    const __m512 vs = _mm512_set1_ps(scale);
    const int64_t groups = ((rows + 1) / 2 + 15) / 16;
    alignas(64) uint32_t hbuf[16 * 16];
    alignas(64) uint32_t lbuf[16 * 16];
    // 16-bit element 2i of a word vector from lane i of the first float vector, 2i + 1 from
    // lane i of the second (cvtne2ps_pbh puts the second's 16 lanes after the first's).
    alignas(64) static const uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                         21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                         11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_load_si512(kInterleave);
    const __m512i hi_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const auto words = [&](__m512 e0, __m512 e1) {
      return _mm512_permutexvar_epi16(interleave,
                                      reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
    };
    for (int64_t i0 = 0; i0 < cols; i0 += 16) {
      const __mmask16 mk = tail_mask(cols - i0);
      const __m512 m_old = _mm512_mask_loadu_ps(ninf, mk, m + i0);
      // max(scale * s) = scale * max(s) for scale > 0.
      const __m512 mx =
          _mm512_max_ps(m_old, _mm512_mul_ps(column_max(st + i0, ld, rows, mk, ninf), vs));
      const __m512 mu = softmax_shift(mx);
      const __m512 al = exp2_ps(_mm512_sub_ps(m_old, mu));
      __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t t = 0; t < 16; ++t) {
          const int64_t j = 2 * (16 * g + t);
          __m512 e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
          if (j < rows)
            e0 = exp2_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, st + j * ld + i0), vs, mu));
          if (j + 1 < rows)
            e1 =
                exp2_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, st + (j + 1) * ld + i0), vs, mu));
          sum0 = _mm512_add_ps(sum0, e0);
          sum1 = _mm512_add_ps(sum1, e1);
          const __m512i w = words(e0, e1);
          _mm512_store_si512(hbuf + 16 * t, w);
          if (pw_lo != nullptr) {
            // Residues against the rounded values: e0's is the low half, e1's the high one.
            const __m512 r0 = _mm512_sub_ps(e0, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
            const __m512 r1 = _mm512_sub_ps(e1, _mm512_castsi512_ps(_mm512_and_si512(w, hi_half)));
            _mm512_store_si512(lbuf + 16 * t, words(r0, r1));
          }
        }
        transpose16_words(hbuf, 16, pw + i0 * ldw + 16 * g, ldw);
        if (pw_lo != nullptr) transpose16_words(lbuf, 16, pw_lo + i0 * ldw + 16 * g, ldw);
      }
      const __m512 l_old = _mm512_maskz_loadu_ps(mk, l + i0);
      _mm512_mask_storeu_ps(l + i0, mk, _mm512_fmadd_ps(l_old, al, _mm512_add_ps(sum0, sum1)));
      _mm512_mask_storeu_ps(m + i0, mk, mx);
      _mm512_mask_storeu_ps(alpha + i0, mk, al);
    }
  }

  static void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t ars,
                        int64_t ats, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                        bool accumulate, float mul) {
    amx_gemm_bf16<AmxHwTiles>(M, N, K2, a, ars, ats, b, ldb, c, ldc, accumulate, mul);
  }
};

}  // namespace
}  // namespace distattn::kernels::cpu
