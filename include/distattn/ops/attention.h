#pragma once
// Local (single-rank) attention operations, device-neutral: each call validates its
// tensors, then dispatches on the tensors' device to the CPU kernels (kernels/cpu) or the
// CUDA kernels (kernels/cuda). Strategies call only these.
//
// Layout (BSHD, last dim contiguous; sequence/head strides may be non-packed):
//   q    [B, Sq, Hq, D]        k [B, Sk, Hkv, D]      v [B, Sk, Hkv, Dv]
//   out  [B, Sq, Hq, Dv]       lse fp32 [B, Hq, Sq] (natural log; may be strided)
// Hq % Hkv == 0 (GQA/MQA: query head h uses KV head h / (Hq/Hkv)). D != Dv allowed.
// Storage dtypes fp32/bf16/fp16; q, k, v share one dtype; out, dq, dk, dv are q's dtype or
// fp32 (fp32 partials for cross-rank merging). Accumulation is always fp32.
// Masking uses global positions: query i sits at q_offset+i, key j at k_offset+j.
//   causal:  key visible iff k_pos <= q_pos
//   window:  key visible iff q_pos - window_left <= k_pos <= q_pos + window_right
//            (a negative bound means unlimited on that side)
// A query row with no visible key gets out = 0 and lse = -inf (never NaN).
//
// Packed documents, sink tokens and learned sinks (AttentionOptions below):
//   cu_seqlens  packed variable-length batch (flash-attn's THD convention, batch 1): rows
//               [cu[d], cu[d+1]) are document d; a query sees only keys of its own document
//               and positions restart at 0 in each document (keys at 0..Lk_d-1, queries at
//               Lk_d-Lq_d.. when cu_seqlens_k differs: bottom-right aligned, as decode).
//   sink_tokens the first n keys of each document stay visible to every query of that
//               document whatever the window (still subject to causality; StreamingLLM).
//               Without documents, with n > 0, every key at a position below n ignores the
//               window, including positions a negative k_offset puts below 0; n = 0: none.
//   sinks       a learned logit per query head (gpt-oss) joins the softmax denominator only:
//               lse = log(sum_j e^{s_ij} + e^{s_h}), out = sum_j e^{s_ij - lse} v_j; a row
//               with no visible key gets out = 0, lse = s_h. Backward returns dsinks
//               (dsink_h = -sum_i e^{s_h - lse_i} (dO_i . O_i)).
#include <cstdint>
#include <optional>
#include <span>

#include "distattn/core/tensor_view.h"

namespace distattn::ops {

struct AttentionOptions {
  std::optional<float> softmax_scale;  // unset: 1/sqrt(D)
  bool causal = false;
  int64_t q_offset = 0;
  int64_t k_offset = 0;
  int64_t window_left = -1;   // < 0: unlimited
  int64_t window_right = -1;  // < 0: unlimited
  // Packed documents: host int32 offsets [n_docs + 1], cu_seqlens[0] = 0, non-decreasing,
  // last = seq_q; needs batch 1 and q_offset = k_offset = 0. Empty: one document.
  std::span<const int32_t> cu_seqlens;
  // Key offsets when they differ from the queries' (cross/decode shapes): same document
  // count, last = seq_k. Empty: cu_seqlens.
  std::span<const int32_t> cu_seqlens_k;
  int64_t sink_tokens = 0;  // >= 0: key positions < sink_tokens ignore the window
  // Learned sink logits: fp32 [Hq] on q's device (data == nullptr: none).
  TensorView sinks;
  Stream stream = nullptr;  // CUDA stream for CUDA tensors
  // CPU kernels call progress(progress_ctx) every few tiles from one thread (never
  // concurrently). Strategies pass Communicator::progress here so that host-memory
  // transfers (MPI) advance while the kernel computes. nullptr: no calls.
  void (*progress)(void*) = nullptr;
  void* progress_ctx = nullptr;

  float scale_for(int64_t head_dim) const;
};

// out, lse <- attention(q, k, v).
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView& lse,
                       const AttentionOptions& opts = {});

struct BackwardOptions {
  // false: dq/dk/dv are overwritten. true: gradients are added to what dq/dk/dv hold
  // (ring backward accumulates contributions of several key blocks / query blocks).
  bool accumulate = false;
  // With AttentionOptions::sinks: fp32 [Hq] on q's device receives dsinks (overwritten, or
  // added when accumulate). Required when sinks are set.
  TensorView dsinks;
};

// dq, dk, dv from (q, k, v, out, dout, lse). `out` and `lse` are the forward's results over
// the FULL key set (for ring: the merged global out/lse), so a call on one key block yields
// exactly that block's contribution. dk/dv are summed over the query heads of a KV group.
// dout has out's shape; dq has q's shape, dk k's, dv v's.
void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& dout, const TensorView& lse,
                        const TensorView& dq, const TensorView& dk, const TensorView& dv,
                        const AttentionOptions& opts = {}, const BackwardOptions& bopts = {});

// (out, lse) <- merge((out_a, lse_a), (out_b, lse_b)) over disjoint key sets.
// out/lse may alias out_a/lse_a (in place). out_* fp32 [B, Sq, H, Dv]; lse_* fp32 [B, H, Sq].
// NaN-safe: both -inf gives out = 0, lse = -inf.
void attention_merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                     const TensorView& lse_b, const TensorView& out, const TensorView& lse,
                     Stream stream = nullptr);

// Learned sinks on a finished attention result (after every merge): out fp32 [B, Sq, H, Dv]
// and lse fp32 [B, H, Sq] are updated in place to include e^{sinks[h]} in each row's
// denominator. Strategies call it once per query row, after the last merge.
void attention_apply_sinks(const TensorView& out, const TensorView& lse, const TensorView& sinks,
                           Stream stream = nullptr);
// dsinks[h] (+)= -sum_{b,i} e^{sinks[h] - lse[b,h,i]} (dout[b,i,h] . out[b,i,h]) over the rows
// given (out, dout any float dtype, [B, Sq, H, Dv]; lse fp32 [B, H, Sq], the final lse with
// the sink included). dsinks fp32 [H].
void attention_sinks_backward(const TensorView& out, const TensorView& dout, const TensorView& lse,
                              const TensorView& sinks, const TensorView& dsinks, bool accumulate,
                              Stream stream = nullptr);

// Paged KV cache: pages of `page_size` tokens.
//   k_pages [num_pages, page_size, Hkv, D], v_pages [num_pages, page_size, Hkv, Dv]
//   page_table int32 [B, max_pages_per_seq] (page ids), seq_lens int32 [B] (valid tokens)
struct PagedKV {
  TensorView k_pages;
  TensorView v_pages;
  TensorView page_table;
  TensorView seq_lens;
  int64_t page_size() const { return k_pages.ndim > 1 ? k_pages.size(1) : 0; }
};

struct DecodeOptions {
  int num_splits = 0;  // key-chunks processed in parallel and merged; 0 = choose
};

// Decode: few queries (Sq <= 16) over a long contiguous cache k/v [B, Sk, Hkv, D/Dv],
// flash-decoding (split-KV then merge). Same semantics as attention_forward (causal with
// offsets: the queries usually sit at the end, q_offset = Sk - Sq).
void attention_decode(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView& lse,
                      const AttentionOptions& opts = {}, const DecodeOptions& dopts = {});
// Decode over a paged cache; batch b attends the first seq_lens[b] tokens of its pages.
// Positions are per sequence: key t of sequence b sits at t, and its seq_q queries are the
// last seq_q positions (query i at seq_lens[b] - seq_q + i), which is what causal/window
// masks use. opts.q_offset and opts.k_offset must be 0. Equals attention_decode over the
// contiguous cache with q_offset = seq_lens[b] - seq_q when all lengths are equal.
void attention_decode_paged(const TensorView& q, const PagedKV& cache, const TensorView& out,
                            const TensorView& lse, const AttentionOptions& opts = {},
                            const DecodeOptions& dopts = {});

// FLOPs as REFERENCE.md counts them (4*B*Hq*Sq*Sk*D forward, halved for causal Sq == Sk;
// backward 2.5x forward), counting only visible pairs when causal with offsets.
// Causal here places the queries at the end of the keys (q_offset = seq_k - seq_q), and
// counts the exact visible pairs (S*(S+1)/2 for Sq == Sk == S).
double attention_forward_flops(int64_t batch, int64_t heads_q, int64_t seq_q, int64_t seq_k,
                               int64_t head_dim, bool causal);
// General form: 2*B*Hq*(D + Dv) per visible (query, key) pair under opts' mask (causal,
// window, q_offset, k_offset), counted exactly.
double attention_forward_flops(int64_t batch, int64_t heads_q, int64_t seq_q, int64_t seq_k,
                               int64_t head_dim, int64_t head_dim_v, const AttentionOptions& opts);

}  // namespace distattn::ops
