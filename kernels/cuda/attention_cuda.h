#pragma once
// CUDA implementations behind distattn/ops/attention.h, mirroring kernels/cpu/attention_cpu.h.
// Arguments arrive validated by the dispatch layer (src/ops/attention.cpp): shapes
// consistent, all tensors on one CUDA device, last dim contiguous, dtypes as documented
// there. Same semantics as the ops header. Work is queued on opts.stream (the `stream`
// argument for merge) and never synchronizes the host, except decode_paged/mla callers
// that validate page tables (done in the dispatch layer, not here).
//
// Kernels:
//   * forward, bf16/fp16, head dims (D, Dv) in {(64, 64), (128, 128), (192, 128)} with
//     16-byte aligned rows: FlashAttention-2 style on tensor cores (mma.sync m16n8k16,
//     fp32 accumulate, online softmax in registers);
//   * every other forward (fp32, other head dims <= 256, unaligned strides): a CUDA-core
//     kernel with the same semantics (GQA heads of one KV head packed as rows);
//   * backward: delta = rowsum(dout * out), then dK/dV per key tile (summed over the GQA
//     group, no atomics: deterministic) and dQ per query tile; tensor cores for bf16/fp16
//     with D == Dv in {64, 128} and aligned rows, CUDA cores otherwise (head dims <= 256);
//   * decode: split-KV over contiguous or paged caches, then an LSE combine;
//   * merge: NaN-safe LSE merge of fp32 partials (in place allowed).
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"

namespace distattn::kernels::cuda {

// Largest head dim (D and Dv) the CUDA kernels take.
constexpr int64_t kMaxHeadDim = 256;

void flash_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse, const ops::AttentionOptions& opts);

void flash_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& dq, const TensorView& dk, const TensorView& dv,
                    const ops::AttentionOptions& opts, const ops::BackwardOptions& bopts);

void merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
           const TensorView& lse_b, const TensorView& out, const TensorView& lse, Stream stream);

void apply_sinks(const TensorView& out, const TensorView& lse, const TensorView& sinks,
                 Stream stream);
void sinks_backward(const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& sinks, const TensorView& dsinks, bool accumulate,
                    Stream stream);

void decode(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
            const TensorView& lse, const ops::AttentionOptions& opts,
            const ops::DecodeOptions& dopts);

// max_seq_len: the largest seq_lens entry (known to the dispatch layer, which validated
// the page table on the host); sizes the split-KV grid.
void decode_paged(const TensorView& q, const ops::PagedKV& cache, const TensorView& out,
                  const TensorView& lse, const ops::AttentionOptions& opts,
                  const ops::DecodeOptions& dopts, int64_t max_seq_len);

// Variants for tests and benchmarks: force the CUDA-core forward even where the tensor-core
// kernel applies, and report whether the tensor-core kernel takes this call.
void flash_forward_simt(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse,
                        const ops::AttentionOptions& opts);
bool flash_forward_uses_tensor_cores(const TensorView& q, const TensorView& k, const TensorView& v);
// The same for the backward (the tensor-core backward needs D == Dv in {64, 128}, bf16 or
// fp16, dout in q's dtype, 16-byte aligned rows; DISTATTN_CUDA_BACKWARD=simt in the
// environment forces the CUDA-core backward everywhere).
void flash_backward_simt(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView& dout, const TensorView& lse,
                         const TensorView& dq, const TensorView& dk, const TensorView& dv,
                         const ops::AttentionOptions& opts, const ops::BackwardOptions& bopts);
bool flash_backward_uses_tensor_cores(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& dout);

}  // namespace distattn::kernels::cuda
