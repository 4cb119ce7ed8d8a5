#pragma once
// A 16 x 16 transpose of 32-bit words (floats or bf16 pairs), shared by the AMX GEMM driver
// (amx_gemm.h), the bf16 packing (flash_isa_avx512bf16.h, flash_isa_amx.h) and the MLA decode
// kernel (mla_decode_body.h): 64 register shuffles on AVX-512 units, a plain loop elsewhere
// (the tile-model test). Internal linkage: every instruction-set unit gets its own copy.
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
// GCC 12 flags the _mm512_undefined_* inside some intrinsics as maybe-uninitialized when they
// inline (as in flash_isa_avx512.h), or as uninitialized; the lanes are fully written.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#endif

namespace distattn::kernels::cpu {
namespace {

// dst[r*ldd + k] = the words src[k*lds + r] for r < 16, k < 16 (a 16 x 16 transpose).
inline void transpose16_words(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
#if defined(__AVX512F__)
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + s] holds, in 128-bit lane L, rows 4q..4q+3 of column 4L + s: a 4 x 4 transpose
  // of lanes per s puts column c = 4L + s together.
  for (int s = 0; s < 4; ++s) {
    const __m512i p = _mm512_shuffle_i32x4(r[s], r[4 + s], 0x88);
    const __m512i q = _mm512_shuffle_i32x4(r[s], r[4 + s], 0xDD);
    const __m512i u = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0x88);
    const __m512i v = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0xDD);
    _mm512_storeu_si512(dst + s * ldd, _mm512_shuffle_i32x4(p, u, 0x88));
    _mm512_storeu_si512(dst + (s + 8) * ldd, _mm512_shuffle_i32x4(p, u, 0xDD));
    _mm512_storeu_si512(dst + (s + 4) * ldd, _mm512_shuffle_i32x4(q, v, 0x88));
    _mm512_storeu_si512(dst + (s + 12) * ldd, _mm512_shuffle_i32x4(q, v, 0xDD));
  }
#else
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) std::memcpy(dst + r * ldd + k, src + k * lds + r, 4);
#endif
}

}  // namespace
}  // namespace distattn::kernels::cpu
