// AVX512-BF16 instantiation of the FlashAttention-2 style backward (flash_impl.h): bf16
// inputs run the five GEMMs on vdpbf16ps tiles; other dtypes take the AVX-512 fp32 tiles.
#include "kernels/cpu/flash_isa_avx512bf16.h"

namespace distattn::kernels::cpu {

void flash_backward_avx512bf16(const FlashBackwardParams& p) {
  backward_impl<Avx512Bf16Isa>(p);
}

}  // namespace distattn::kernels::cpu
