// Tensor-core forward, head dim 192 (Dv 128), bf16 and fp16: one translation unit per
// head-dim family keeps the CUDA build parallel and small.
#include "kernels/cuda/flash_fwd_mma.cuh"

namespace distattn::kernels::cuda {

void launch_flash_fwd_mma_hdim192(const FwdParams& p, bool bf16, cudaStream_t stream) {
  mma::launch_fwd_mma<192, 128, 32>(p, bf16, stream);
}

}  // namespace distattn::kernels::cuda
