#pragma once
// The AMX-BF16 GEMM behind the flash kernels' bf16 tiles on AMX CPUs (flash_isa_amx.h),
// written against a tile backend `T` so that one driver runs on the hardware tiles
// (AmxHwTiles, the AMX intrinsics) and, in the tests, on a software model of the tile
// instructions: machines without AMX still check the blocking, the padding of partial tiles
// and the epilogue against the fp64 reference.
//
//   C[M x N] (+)= mul * sum_k2 A(m, k2) . B(k2, n)
// with Avx512Bf16Isa::gemm_bf16's operand layouts: A(m, k2) is the bf16 pair at
// a + m*ars + k2*ats (uint16 units), B(k2, n) the pair word b[k2*ldb + n], which is the
// layout (VNNI) a B tile takes as it is.
//
// Tiles (palette 1, every tile 16 rows x 64 bytes): 0-3 accumulate a 32 x 32 block of C as
// 2 x 2 blocks of 16 x 16 fp32, 4-5 hold two A blocks (16 rows x 16 pairs), 6-7 two B
// blocks (16 pair rows x 16 columns). A loads in place when its pairs are contiguous (ats ==
// 2) and M and K2 are multiples of 16, B when N and K2 are; otherwise the operand is packed
// once per call into a zero-padded scratch (A's word-transposed layout, ars == 2, as the
// P V and dS^T Q products pass it, is transposed 16 x 16 words at a time). C tiles load from
// and store to C in place when their whole 32 x 32 block lies inside C and mul is 1; other
// blocks go through a scratch and the scaled epilogue.
//
// The backend T provides: begin(const AmxTileConfig*) / end() around a call, zero_c()
// (tiles 0-3), load_c(c0, c1, c2, c3, stride) (tiles 0-3 from memory), load_ab(a0, sa0, a1,
// sa1, b0, sb0, b1, sb1) (tiles 4-7, strides in bytes), dp4() (C[2i + j] += A[i] . B[j]),
// store_c(c0, c1, c2, c3, stride).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/transpose16.h"

namespace distattn::kernels::cpu {
namespace {

// The 64-byte block LDTILECFG reads.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64, "LDTILECFG reads 64 bytes");

// Tiles 0-7 as 16 rows x 64 bytes.
inline AmxTileConfig amx_gemm_tile_config() {
  AmxTileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}

inline uint32_t amx_load_word(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

inline int64_t amx_round16(int64_t n) {
  return (n + 15) / 16 * 16;
}

// Scratch of the packed operands: one per thread, grown to the largest call and kept.
inline uint32_t* amx_scratch(int which, int64_t words) {
  thread_local std::vector<uint32_t> buf[2];
  std::vector<uint32_t>& v = buf[which];
  if (static_cast<int64_t>(v.size()) < words) v.resize(static_cast<size_t>(words));
  return v.data();
}

// A as M16 x K16 words, row-major with row stride K16, zero-padded (M16, K16: M, K2 rounded
// up to 16).
inline void amx_pack_a(int64_t M, int64_t K2, const uint16_t* a, int64_t ars, int64_t ats,
                       uint32_t* out) {
  const int64_t M16 = amx_round16(M), K16 = amx_round16(K2);
  if (ars == 2 && M16 == M && K16 == K2 && ats % 2 == 0) {
    // Words laid out [k2][m] (pairs along m packed as in pack_p): transpose 16 x 16 blocks.
    const auto* w = reinterpret_cast<const uint32_t*>(a);
    const int64_t ldw = ats / 2;
    for (int64_t k0 = 0; k0 < K2; k0 += 16)
      for (int64_t m0 = 0; m0 < M; m0 += 16)
        transpose16_words(w + k0 * ldw + m0, ldw, out + m0 * K16 + k0, K16);
    return;
  }
  for (int64_t m = 0; m < M16; ++m)
    for (int64_t k = 0; k < K16; ++k)
      out[m * K16 + k] = m < M && k < K2 ? amx_load_word(a + m * ars + k * ats) : 0u;
}

template <class T>
void amx_gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t ars, int64_t ats,
                   const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
                   float mul) {
  constexpr int64_t kT = 16;
  if (M <= 0 || N <= 0) return;
  if (K2 <= 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, 0.f);
    return;
  }
  const int64_t M16 = amx_round16(M), N16 = amx_round16(N), K16 = amx_round16(K2);
  // A and B as loaded: in place, or packed (row strides in bytes).
  const uint16_t* ap = a;
  int64_t a_row_bytes = ars * 2;
  if (ats != 2 || M16 != M || K16 != K2) {
    uint32_t* pa = amx_scratch(0, M16 * K16);
    amx_pack_a(M, K2, a, ars, ats, pa);
    ap = reinterpret_cast<const uint16_t*>(pa);
    a_row_bytes = K16 * 4;
  }
  const uint32_t* bp = b;
  int64_t b_row_bytes = ldb * 4;
  if (N16 != N || K16 != K2) {
    uint32_t* pb = amx_scratch(1, K16 * N16);
    for (int64_t k = 0; k < K16; ++k)
      for (int64_t n = 0; n < N16; ++n) pb[k * N16 + n] = k < K2 && n < N ? b[k * ldb + n] : 0u;
    bp = pb;
    b_row_bytes = N16 * 4;
  }
  const auto a_at = [&](int64_t r0, int64_t k0) {
    return reinterpret_cast<const char*>(ap) + r0 * a_row_bytes + k0 * 4;
  };
  const auto b_at = [&](int64_t k0, int64_t c0) {
    return reinterpret_cast<const char*>(bp) + k0 * b_row_bytes + c0 * 4;
  };
  // Rows past M16 / columns past N16 of a 32 x 32 block read the zero block.
  alignas(64) static const char zeros[kT * kT * 4] = {};
  alignas(64) float cbuf[4][kT * kT];
  const AmxTileConfig cfg = amx_gemm_tile_config();
  const bool in_place = mul == 1.f;
  T::begin(&cfg);
  for (int64_t m0 = 0; m0 < M16; m0 += 2 * kT)
    for (int64_t n0 = 0; n0 < N16; n0 += 2 * kT) {
      const bool m1 = m0 + kT < M16, n1 = n0 + kT < N16;
      // C in place: every 16 x 16 block of the 32 x 32 one inside C, and no scale.
      const bool direct = in_place && m0 + 2 * kT <= M && n0 + 2 * kT <= N;
      float* const cd = c + m0 * ldc + n0;
      if (direct && accumulate)
        T::load_c(cd, cd + kT, cd + kT * ldc, cd + kT * ldc + kT, ldc * 4);
      else
        T::zero_c();
      for (int64_t k0 = 0; k0 < K16; k0 += kT) {
        T::load_ab(a_at(m0, k0), a_row_bytes, m1 ? a_at(m0 + kT, k0) : zeros, m1 ? a_row_bytes : 64,
                   b_at(k0, n0), b_row_bytes, n1 ? b_at(k0, n0 + kT) : zeros,
                   n1 ? b_row_bytes : 64);
        T::dp4();
      }
      if (direct) {
        T::store_c(cd, cd + kT, cd + kT * ldc, cd + kT * ldc + kT, ldc * 4);
        continue;
      }
      T::store_c(cbuf[0], cbuf[1], cbuf[2], cbuf[3], kT * 4);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
          const int64_t r0 = m0 + kT * i, c0 = n0 + kT * j;
          const int64_t rr = std::clamp<int64_t>(M - r0, 0, kT);
          const int64_t nn = std::clamp<int64_t>(N - c0, 0, kT);
          const float* src = cbuf[2 * i + j];
          for (int64_t r = 0; r < rr; ++r) {
            float* dst = c + (r0 + r) * ldc + c0;
            const float* s = src + r * kT;
            if (accumulate) {
              for (int64_t n = 0; n < nn; ++n) dst[n] += mul * s[n];
            } else {
              for (int64_t n = 0; n < nn; ++n) dst[n] = mul * s[n];
            }
          }
        }
    }
  T::end();
}

}  // namespace
}  // namespace distattn::kernels::cpu
