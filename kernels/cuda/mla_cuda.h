#pragma once
// CUDA kernels behind distattn/ops/mla.h, mirroring kernels/cpu/mla_cpu.h. Arguments
// arrive validated by src/ops/mla.cpp (shapes consistent, CUDA tensors on one device,
// dtypes and contiguity as documented there). Work is queued on the given stream.
#include "distattn/core/tensor_view.h"
#include "distattn/ops/mla.h"

namespace distattn::kernels::cuda {

// In-place batched fast Walsh-Hadamard transform of the last dim of fp32 x (power of two,
// up to 2^20): rows up to 8192 wide run in shared memory (one block per row); wider rows
// transform 8192-wide chunks in shared memory, then run the remaining butterfly stages
// in global memory.
void hadamard_transform(const TensorView& x, float scale, Stream stream);

// MLA decode over a paged [latent | k_pe] cache (fp32 or bf16), one query token per
// sequence: split-KV over tokens, all heads of a block share each staged tile of tokens,
// then an LSE combine of the splits. Dl <= 512 and Dr <= 64 multiple-of-one widths.
// max_seq_len: the largest seq_lens entry (validated on the host by the dispatch layer).
void mla_decode(const TensorView& q_lat, const TensorView& q_pe, const ops::MlaPagedCache& cache,
                const TensorView& out, const TensorView& lse, const ops::MlaDecodeOptions& opts,
                int64_t max_seq_len);

constexpr int64_t kMlaMaxLatentDim = 512;
constexpr int64_t kMlaMaxRopeDim = 64;

}  // namespace distattn::kernels::cuda
