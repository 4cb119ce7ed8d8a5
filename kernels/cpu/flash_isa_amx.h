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
  static void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t ars,
                        int64_t ats, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                        bool accumulate, float mul) {
    amx_gemm_bf16<AmxHwTiles>(M, N, K2, a, ars, ats, b, ldb, c, ldc, accumulate, mul);
  }
};

}  // namespace
}  // namespace distattn::kernels::cpu
