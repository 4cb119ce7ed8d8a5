#pragma once
// CPU implementations behind distattn/ops/attention.h. Arguments arrive validated by the
// dispatch layer (src/ops/attention.cpp): shapes consistent, CPU tensors, last dim
// contiguous, dtypes as documented there. Same semantics as the ops header.
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"

namespace distattn::kernels::cpu {

// Tiled online-softmax forward (never materializes Sq x Sk); multithreaded over
// batch x heads x query blocks; AVX-512 when the CPU has it (chosen at run time),
// portable otherwise.
void flash_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse, const ops::AttentionOptions& opts);

void flash_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& dq, const TensorView& dk, const TensorView& dv,
                    const ops::AttentionOptions& opts, const ops::BackwardOptions& bopts);

void merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
           const TensorView& lse_b, const TensorView& out, const TensorView& lse);

// Learned sinks (ops::attention_apply_sinks / attention_sinks_backward).
void apply_sinks(const TensorView& out, const TensorView& lse, const TensorView& sinks);
void sinks_backward(const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& sinks, const TensorView& dsinks, bool accumulate);

void decode(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
            const TensorView& lse, const ops::AttentionOptions& opts,
            const ops::DecodeOptions& dopts);

void decode_paged(const TensorView& q, const ops::PagedKV& cache, const TensorView& out,
                  const TensorView& lse, const ops::AttentionOptions& opts,
                  const ops::DecodeOptions& dopts);

}  // namespace distattn::kernels::cpu
