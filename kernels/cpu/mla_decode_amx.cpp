// AMX build of the MLA decode kernel body (compiled with the AMX flags by CMake; chosen at
// run time by mla_decode.cpp when the CPU kernel level is amx): bf16 pages run the tile
// task (mla_decode_task_amx), fp32 pages the AVX-512 one.
#include "kernels/cpu/mla_decode_body.h"

namespace distattn::kernels::cpu::detail {
void mla_decode_run_amx(const MlaDecodeParams& p) {
  mla_decode_run(p);
}
}  // namespace distattn::kernels::cpu::detail
