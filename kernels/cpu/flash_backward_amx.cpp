// AMX-BF16 instantiation of the FlashAttention-2 style backward (flash_impl.h): bf16 inputs
// run the five GEMMs on AMX tiles; other dtypes take the AVX-512 fp32 tiles.
#include "kernels/cpu/flash_isa_amx.h"

namespace distattn::kernels::cpu {

void flash_backward_amx(const FlashBackwardParams& p) {
  backward_impl<AmxIsa>(p);
}

}  // namespace distattn::kernels::cpu
