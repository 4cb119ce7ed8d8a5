#pragma once
// Decode with the KV cache split by sequence over the ranks of a communicator (decode-CP, as
// Helix, vLLM DCP and SGLang DCP do): each rank attends the pages it holds, the fp32 partials
// (out, lse) are all-gathered, and every rank merges them in rank order with the NaN-safe
// ops::attention_merge, so the result is exact and identical on every rank. Which pages a
// rank holds is the caller's choice (the serving layer deals them round-robin: page p of a
// sequence on rank p % ranks). MLA's form is decode_cp_attention (distattn/parallel/mla.h).
#include "distattn/comm/communicator.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"

namespace distattn::parallel {

// out, lse <- attention of q over the union of every rank's pages.
//   q    [B, Sq, Hq, D] in the cache's dtype (all query heads on every rank)
//   cache this rank's pages (ops::PagedKV; seq_lens = tokens held here, may be 0)
//   out  fp32 [B, Sq, Hq, Dv] packed     lse fp32 [B, Hq, Sq] packed
// opts as ops::attention_decode_paged (q_offset/k_offset 0). Decode queries sit after every
// cached key, so pass causal = false unless the queries are several new tokens.
void paged_decode_cp_attention(comm::Communicator& cp, const TensorView& q,
                               const ops::PagedKV& cache, const TensorView& out,
                               const TensorView& lse, const ops::AttentionOptions& opts = {});

// In place: (out, lse), this rank's partial over its keys, becomes the merge of every rank's
// partial (all-gather over cp, merged in rank order). out fp32 [B, S, H, Dv] packed,
// lse fp32 [B, H, S] packed, on a device cp accepts.
void merge_partials_across(comm::Communicator& cp, const TensorView& out, const TensorView& lse,
                           Stream stream = nullptr);

}  // namespace distattn::parallel
