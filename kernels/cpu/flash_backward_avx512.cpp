// AVX-512 instantiation of the FlashAttention-2 style backward (flash_impl.h).
#include "kernels/cpu/flash_isa_avx512.h"

namespace distattn::kernels::cpu {

void flash_backward_avx512(const FlashBackwardParams& p) {
  backward_impl<Avx512Isa>(p);
}

}  // namespace distattn::kernels::cpu
