#pragma once
// CPU kernels behind distattn/ops/mla.h. Arguments arrive validated by src/ops/mla.cpp
// (shapes consistent, CPU tensors, dtypes and contiguity as documented there).
#include "distattn/core/tensor_view.h"
#include "distattn/ops/mla.h"

namespace distattn::kernels::cpu {

// In-place batched fast Walsh-Hadamard transform of the last dim of fp32 x (power of two).
void hadamard_transform(const TensorView& x, float scale);

// MLA decode over a paged [latent | k_pe] cache; one query token per sequence. Tiles of 64
// tokens (gathered across pages, converted to fp32), all heads of a sequence share each
// tile (the cache is one KV head), split-KV across threads, LSE merge of the splits.
// Uses the AVX-512 build of the same code when the CPU has AVX-512, and the AMX build (bf16
// pages on tiles, see mla_decode_body.h) when the CPU kernel level is amx (flash_cpu.h).
void mla_decode(const TensorView& q_lat, const TensorView& q_pe, const ops::MlaPagedCache& cache,
                const TensorView& out, const TensorView& lse, const ops::MlaDecodeOptions& opts);

// Each build, for tests and benchmarks (avx512 and amx throw kUnsupported when unavailable).
void mla_decode_portable(const TensorView& q_lat, const TensorView& q_pe,
                         const ops::MlaPagedCache& cache, const TensorView& out,
                         const TensorView& lse, const ops::MlaDecodeOptions& opts);
void mla_decode_avx512(const TensorView& q_lat, const TensorView& q_pe,
                       const ops::MlaPagedCache& cache, const TensorView& out,
                       const TensorView& lse, const ops::MlaDecodeOptions& opts);
bool mla_decode_avx512_available();
void mla_decode_amx(const TensorView& q_lat, const TensorView& q_pe,
                    const ops::MlaPagedCache& cache, const TensorView& out, const TensorView& lse,
                    const ops::MlaDecodeOptions& opts);
bool mla_decode_amx_available();

}  // namespace distattn::kernels::cpu
