// AVX-512 build of the MLA decode kernel body (compiled with -mavx512f... by CMake; chosen
// at run time by mla_decode.cpp only when the CPU has AVX-512).
#include "kernels/cpu/mla_decode_body.h"

namespace distattn::kernels::cpu::detail {
void mla_decode_run_avx512(const MlaDecodeParams& p) {
  mla_decode_run(p);
}
}  // namespace distattn::kernels::cpu::detail
