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
// blocks (16 pair rows x 16 columns). Full blocks load straight from the operands (A only
// when its pairs are contiguous, ats == 2); partial ones are copied into zero-padded scratch.
//
// The backend T provides: begin(const AmxTileConfig*) / end() around a call, zero_c()
// (tiles 0-3), load_ab(a0, sa0, a1, sa1, b0, sb0, b1, sb1) (tiles 4-7, strides in bytes),
// dp4() (C[2i + j] += A[i] . B[j]), store_c(c0, c1, c2, c3, stride).
#include <algorithm>
#include <cstdint>
#include <cstring>

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

template <class T>
void amx_gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t ars, int64_t ats,
                   const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
                   float mul) {
  constexpr int64_t kT = 16;
  alignas(64) uint32_t abuf[2][kT * kT];
  alignas(64) uint32_t bbuf[2][kT * kT];
  alignas(64) float cbuf[4][kT * kT];
  const AmxTileConfig cfg = amx_gemm_tile_config();
  T::begin(&cfg);
  for (int64_t m0 = 0; m0 < M; m0 += 2 * kT)
    for (int64_t n0 = 0; n0 < N; n0 += 2 * kT) {
      T::zero_c();
      for (int64_t k0 = 0; k0 < K2; k0 += kT) {
        const int64_t kk = std::min(kT, K2 - k0);
        const void* ap[2];
        int64_t as[2];
        for (int h = 0; h < 2; ++h) {
          const int64_t r0 = m0 + kT * h;
          const int64_t rr = std::clamp<int64_t>(M - r0, 0, kT);
          if (rr == kT && kk == kT && ats == 2) {
            ap[h] = a + r0 * ars + k0 * ats;
            as[h] = ars * 2;
            continue;
          }
          for (int64_t r = 0; r < kT; ++r)
            for (int64_t k = 0; k < kT; ++k)
              abuf[h][r * kT + k] =
                  r < rr && k < kk ? amx_load_word(a + (r0 + r) * ars + (k0 + k) * ats) : 0u;
          ap[h] = abuf[h];
          as[h] = kT * 4;
        }
        const void* bp[2];
        int64_t bs[2];
        for (int h = 0; h < 2; ++h) {
          const int64_t c0 = n0 + kT * h;
          const int64_t nn = std::clamp<int64_t>(N - c0, 0, kT);
          if (nn == kT && kk == kT) {
            bp[h] = b + k0 * ldb + c0;
            bs[h] = ldb * 4;
            continue;
          }
          for (int64_t k = 0; k < kT; ++k)
            for (int64_t n = 0; n < kT; ++n)
              bbuf[h][k * kT + n] = k < kk && n < nn ? b[(k0 + k) * ldb + c0 + n] : 0u;
          bp[h] = bbuf[h];
          bs[h] = kT * 4;
        }
        T::load_ab(ap[0], as[0], ap[1], as[1], bp[0], bs[0], bp[1], bs[1]);
        T::dp4();
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
