// AVX2+FMA instantiation of the flash backward (flash_impl.h) for x86-64 CPUs without AVX-512.
// CMake gives this file no special flags: the target pragma below enables AVX2 for the code
// that follows. Standard headers come first so their code keeps the baseline target.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>

#include "distattn/core/half.h"
#include "kernels/cpu/flash_cpu.h"

#if DISTATTN_FLASH_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "kernels/cpu/flash_isa_avx2.h"

namespace distattn::kernels::cpu {

void flash_backward_avx2(const FlashBackwardParams& p) {
  backward_impl<Avx2Isa>(p);
}

}  // namespace distattn::kernels::cpu
#pragma GCC pop_options
#endif
