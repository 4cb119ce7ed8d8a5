// AVX512-BF16 instantiation of the tiled online-softmax forward (flash_impl.h): bf16 q, k, v
// run their two GEMMs on vdpbf16ps tiles; other dtypes take the AVX-512 fp32 tiles.
#include "kernels/cpu/flash_isa_avx512bf16.h"

namespace distattn::kernels::cpu {

void flash_forward_avx512bf16(const FlashForwardParams& p) {
  forward_impl<Avx512Bf16Isa>(p);
}

}  // namespace distattn::kernels::cpu
