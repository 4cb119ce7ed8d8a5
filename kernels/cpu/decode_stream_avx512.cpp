// AVX-512 instantiation of the streaming decode tiles (decode_stream_avx512.h).
#include "kernels/cpu/decode_stream_avx512.h"

namespace distattn::kernels::cpu {

void decode_stream_avx512(const FlashForwardParams& p) {
  decode_stream_dispatch<false>(p);
}

}  // namespace distattn::kernels::cpu
