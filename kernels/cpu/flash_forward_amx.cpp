// AMX-BF16 instantiation of the tiled online-softmax forward (flash_impl.h): bf16 q, k, v
// run their two GEMMs on AMX tiles; other dtypes take the AVX-512 fp32 tiles.
#include "kernels/cpu/flash_isa_amx.h"

namespace distattn::kernels::cpu {

void flash_forward_amx(const FlashForwardParams& p) {
  forward_impl<AmxIsa>(p);
}

}  // namespace distattn::kernels::cpu
