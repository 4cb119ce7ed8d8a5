// Tensor-core backward, head dim 64, bf16 and fp16 (one translation unit per head dim).
#include "kernels/cuda/flash_bwd_mma.cuh"

namespace distattn::kernels::cuda {

void launch_flash_bwd_mma_hdim64(const BwdParams& p, bool bf16, cudaStream_t stream) {
  mma::launch_bwd_mma<64>(p, bf16, stream);
}

}  // namespace distattn::kernels::cuda
