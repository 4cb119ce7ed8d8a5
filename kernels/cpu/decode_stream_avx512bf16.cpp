// AVX512-BF16 instantiation of the streaming decode tiles (decode_stream_avx512.h): bf16
// caches take their scores from vdpbf16ps.
#include "kernels/cpu/decode_stream_avx512.h"

namespace distattn::kernels::cpu {

void decode_stream_avx512bf16(const FlashForwardParams& p) {
  decode_stream_dispatch<true>(p);
}

}  // namespace distattn::kernels::cpu
