// AVX-512 instantiation of the tiled online-softmax forward (flash_impl.h).
#include "kernels/cpu/flash_isa_avx512.h"

namespace distattn::kernels::cpu {

void flash_forward_avx512(const FlashForwardParams& p) {
  forward_impl<Avx512Isa>(p);
}

}  // namespace distattn::kernels::cpu
