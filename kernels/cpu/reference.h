#pragma once
// Naive fp64 attention: the oracle every kernel and every strategy is tested against.
// Materializes the Sq x Sk score matrix: small sizes only. Accepts any float dtype and any
// strides (CPU or CUDA views; CUDA inputs are copied to the host), computes in fp64 with
// exactly the semantics of distattn/ops/attention.h, and returns packed fp64 CPU tensors.
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"

namespace distattn::kernels::cpu {

struct ReferenceForward {
  Tensor out;  // fp64 [B, Sq, Hq, Dv]
  Tensor lse;  // fp64 [B, Hq, Sq]  (-inf for fully masked rows)
};
ReferenceForward reference_attention_forward(const TensorView& q, const TensorView& k,
                                             const TensorView& v,
                                             const ops::AttentionOptions& opts = {});

struct ReferenceBackward {
  Tensor dq;      // fp64, q's shape
  Tensor dk;      // fp64, k's shape
  Tensor dv;      // fp64, v's shape
  Tensor dsinks;  // fp64 [Hq] (zeros without AttentionOptions::sinks)
};
ReferenceBackward reference_attention_backward(const TensorView& q, const TensorView& k,
                                               const TensorView& v, const TensorView& dout,
                                               const ops::AttentionOptions& opts = {});

}  // namespace distattn::kernels::cpu
