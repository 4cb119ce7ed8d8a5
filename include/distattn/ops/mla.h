#pragma once
// Local (single-rank) MLA operations, device-neutral: validation here, kernels in
// kernels/cpu (CUDA versions come with the CUDA backend). The MLA sharding strategies
// (distattn/parallel/mla.h) call only these and the attention ops.
//
// MLA decode with weight absorption (DeepSeek-V2/V3, see docs/MLA.md): every query head
// attends one shared cache of rows [latent c (Dl) | k_pe (Dr)]; the value is the latent
// part itself. For one decode token of batch b and head h:
//   s[h,t] = scale * (mu * q_lat[h] . c_t + q_pe[h] . k_pe_t)      (t < seq_lens[b])
//   out[h] = sum_t softmax(s[h,:])_t * c_t                          (Dl wide)
//   lse[h] = log sum_t exp(s[h,t])                                  (natural log)
// mu (latent_logit_scale) is TPLA's per-shard logit scale; 1 for exact MLA.
#include <cstdint>

#include "distattn/core/tensor_view.h"

namespace distattn::ops {

// In-place fast Walsh-Hadamard transform of every row of x.
//   x: fp32 [rows, d] (or any ndim >= 1; the last dim is transformed), last dim contiguous,
//      d a power of two (1 .. 2^20); other strides arbitrary.
// Each row becomes scale * H_d row, H_d the Sylvester-ordered +-1 Hadamard matrix
// (H[i][j] = (-1)^popcount(i & j)), so H_d H_d = d I: scale = 1/sqrt(d) gives an orthonormal,
// self-inverse transform. O(d log d) per row; rows run in parallel.
void hadamard_transform(const TensorView& x, float scale = 1.0f, Stream stream = nullptr);

// Paged MLA latent cache: one page holds `page_size` consecutive tokens of one sequence.
//   pages      [num_pages, page_size, Dl + Dr] fp32 or bf16, last dim contiguous:
//              the first Dl values of a row are the (normalized, possibly rotated and
//              sliced) latent c, the last Dr are k_pe (RoPE already applied).
//   page_table int32 [B, max_pages_per_seq]: page ids of each sequence, in token order
//   seq_lens   int32 [B]: valid tokens of each sequence (token i sits in page
//              page_table[b, i / page_size], row i % page_size)
struct MlaPagedCache {
  TensorView pages;
  TensorView page_table;
  TensorView seq_lens;
  int64_t latent_dim = 0;  // Dl; Dr = pages.size(2) - Dl
  int64_t page_size() const { return pages.ndim == 3 ? pages.size(1) : 0; }
  int64_t rope_dim() const { return pages.ndim == 3 ? pages.size(2) - latent_dim : 0; }
};

struct MlaDecodeOptions {
  float softmax_scale = 0.0f;       // required, > 0 (MLA: 1/sqrt(qk_nope + qk_rope) x YaRN)
  float latent_logit_scale = 1.0f;  // mu: scales only the latent part of the logit
  int num_splits = 0;               // key chunks per sequence processed in parallel; 0 = choose
  Stream stream = nullptr;          // CUDA stream for CUDA tensors
};

// out, lse <- MLA decode of one query token per sequence over the paged cache.
//   q_lat fp32 [B, H, Dl]   absorbed latent query (q_nope[h] W_UK[h], slice of this shard)
//   q_pe  fp32 [B, H, Dr]   RoPE query (Dr may be 0)
//   out   fp32 [B, H, Dl]   latent-space output (apply W_UV afterwards)
//   lse   fp32 [B, H]       -inf (and out = 0) for an empty sequence, never NaN
// Each of q_lat, q_pe, out needs a contiguous last dim; lse may be strided.
void mla_decode(const TensorView& q_lat, const TensorView& q_pe, const MlaPagedCache& cache,
                const TensorView& out, const TensorView& lse, const MlaDecodeOptions& opts);

// Work model of one mla_decode call (REFERENCE.md section 4): FLOPs 2*H*Sk*(Dl+Dr+Dl) and
// cache bytes read Sk*(Dl+Dr)*elt, summed over the batch.
double mla_decode_flops(int64_t heads, int64_t total_tokens, int64_t latent_dim, int64_t rope_dim);
double mla_decode_bytes(int64_t total_tokens, int64_t latent_dim, int64_t rope_dim,
                        DType cache_dtype);

}  // namespace distattn::ops
