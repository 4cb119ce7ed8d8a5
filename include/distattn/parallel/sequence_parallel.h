#pragma once
// Sequence- and head-parallel exact attention across ranks (context parallelism).
//
// Every strategy is written once against ops::* (local kernels of the tensors' device) and
// comm::Communicator, so the same code runs on CPU ranks over MPI and on GPU ranks over
// NCCL. A trainer calls sp_attention_forward/backward with its LOCAL shards; what "local"
// means depends on the strategy (S = global sequence, P = ranks, C = chunk length):
//
//   kHeads     head parallel. Rank r holds query heads [qh.begin, qh.end) of the FULL sequence
//              (query_heads()) and the KV heads those queries use (kv_heads(); KV heads are
//              replicated when Hkv < P). q [B, S, hq_r, D], k/v [B, S, hkv_r, D/Dv].
//              No communication. Heads are split as evenly as possible (first ranks get the
//              extra head when Hq % P != 0). dk/dv of a replicated KV head are this rank's
//              contribution only: sum them over the ranks that share the head
//              (unshard_into(..., accumulate=true) then an all-reduce does it).
//   kRing      contiguous sequence shards: rank r holds tokens [r*S/P, (r+1)*S/P), all heads.
//              K,V travel the ring in P-1 steps (next step's exchange posted before this
//              step's compute), fp32 partials merged with ops::attention_merge. Causal work is
//              unbalanced (rank P-1 does P times rank 0's work): use kZigzag for causal.
//   kZigzag    the sequence is cut into 2P chunks of C = S/(2P) tokens; rank r holds chunk r
//              followed by chunk 2P-1-r (local rows [0,C) and [C,2C)). Same ring as kRing,
//              balanced causal work. Needs S % (2P) == 0.
//   kUlysses   contiguous sequence shards as kRing (all heads). All-to-all to (S, Hq/P heads),
//              local attention, all-to-all back. Uneven head splits when Hq % P != 0; KV heads
//              replicated when Hkv < P (never refused).
//   kAllGather zigzag layout as kZigzag (so causal work is balanced, as in Llama 3 training):
//              all-gather K,V, local attention with global offsets; backward reduce-scatters
//              dK,dV. Needs S % (2P) == 0.
//   kHybrid    2-D: ring degree R x Ulysses degree U (P = R*U, Ulysses innermost = adjacent
//              ranks, as DeviceMesh({{"ring",R},{"ulysses",U}})). Layout rank l = r*U + u.
//              The sequence is cut into 2R chunks (zigzag over the ring); ring rank r owns
//              chunks r and 2R-1-r; Ulysses rank u holds sub-chunk u (C/U tokens) of each:
//              local rows [0, C/U) from chunk r, [C/U, 2C/U) from chunk 2R-1-r, all heads.
//              Needs S % (2*R*U) == 0.
//
// token_positions() returns the global position of each local row (for RoPE); shard() and
// unshard_into() convert between full tensors and a rank's local shard in any layout.
//
// Packed documents (SpShape::cu_seqlens / SpOptions::cu_seqlens, batch 1), sliding windows,
// sink tokens and learned sinks work under every strategy, forward and backward. Layout of a
// packed batch (no padding; local lengths may differ between ranks by a few tokens):
//   kHeads            the whole packed sequence;
//   kRing, kUlysses   the packed sequence cut into P contiguous shards of floor(T*r/P)..;
//   kZigzag, kAllGather  every document of at least 2P*min_split_chunk tokens (default 128
//                     per chunk) cut into 2P chunks as evenly as possible (sizes differ by
//                     at most one); rank r holds chunks r and 2P-1-r of it. Shorter documents
//                     stay whole on one rank, longest first to the rank with the least work
//                     (L^2) so far: per-rank visible pairs of a long-tail batch stay within 5%
//                     (measured in docs/PERFORMANCE.md) and no kernel call sees a sliver.
//                     Local rows: the split documents' chunks (document order), then the
//                     whole documents (document order);
//   kHybrid           the same over the R ring ranks (2R chunks), each chunk or whole
//                     document cut into U pieces: rank (r, u) holds piece u of each.
// Without documents the layouts are exactly those above. With any of these features the
// strategies decompose each block into per-document pieces (see src/ops/doc_mask.h); blocks
// with no visible pair are skipped, and kRing stops its ring after the last step in which
// any rank still sees a key (window: compute and bytes shrink with the window).
//
// Typical use in a trainer (zigzag over all ranks; hybrid: build a DeviceMesh with axes
// {{"ring", R}, {"ulysses", U}} and pass SpGroup::from_mesh(mesh)):
//   auto world = comm::create_world(comm::Backend::kAuto, device);
//   const SpGroup group = SpGroup::flat(*world);
//   const SpLayout layout = group.layout(Strategy::kZigzag);
//   const int me = group.layout_rank(Strategy::kZigzag);
//   auto pos = token_positions(layout, global_seq, me);  // RoPE angles for local rows
//   SpOptions o; o.causal = true;
//   sp_attention_forward(Strategy::kZigzag, group, q, k, v, out, lse, o);
//   sp_attention_backward(Strategy::kZigzag, group, q, k, v, out, dout, lse, dq, dk, dv, o);
//
// GPU ranks (tensors on a CUDA device; the communicator must accept device memory).
// Kernels, copies and merges run on SpOptions::stream (the COMPUTE stream; nullptr = legacy
// default stream). Each call creates a non-blocking COMM stream and posts every collective
// and send/recv on it; the two streams are ordered by events only:
//   - before an op is posted the comm stream waits for the compute enqueued so far (its send
//     buffers are written; its receive buffers are no longer read by earlier kernels);
//   - before its result is used the compute stream waits for the op (Handle::wait_on);
//   - at the end of the call the compute stream waits for the comm stream, and the host
//     waits each op once (the watchdog still bounds every op).
// So the ring's exchange for step i+1 runs beside step i's kernels, and work the caller
// enqueues on its stream after the call is ordered after the call's results and after the
// last transfer reading its k, v. When the call returns the GPU may still be computing:
// synchronize the stream before reading results on the host.
//   NCCL (one rank per GPU): no host waits between ring steps; the host blocks at the end,
//     until the call's last transfers are done (and in cudaFree, see below: all-gather and
//     Ulysses release temporaries between their phases).
//   MPI backend with device memory (several ranks sharing one GPU, or no NCCL): the backend
//     stages device buffers through pinned host memory, so posting an op synchronizes the
//     comm stream (the host waits for the compute enqueued before it) and waiting copies the
//     received data back on the compute stream. The transfer itself still overlaps the next
//     step's kernels; ranks sharing a GPU time-slice its compute anyway.
// SpStats on CUDA: compute_s is host time to ENQUEUE the kernels, exposed_comm_s the time
// the host was blocked on communication (MPI staging waits; ~0 on NCCL, whose waits happen
// on the device), total_s the host time from entry to return. Time calls with the stream
// synchronized, as distattn-bench sp does.
// Device temporaries are allocated per call (cudaMalloc) and released at its end with
// cudaFree, which waits for the whole device to go idle: a call that allocated any (every
// strategy but heads when P > 1) in practice returns only once its kernels are done, so the
// host cannot enqueue the next layer's work behind it (a stream-ordered allocator would lift
// that; results must still be read only after synchronizing the stream).
//
// Tensors (BSHD, last dim contiguous, as distattn/ops/attention.h):
//   q, out, dout, dq  [B, Sl, Hl, D/Dv]     k, v, dk, dv  [B, Sl, Hkvl, D/Dv]
//   lse               fp32 [B, Hl, Sl]      (natural log, global over all keys)
// where Sl, Hl, Hkvl are the local extents above. Storage fp32/bf16/fp16; out/dq/dk/dv are
// q's dtype or fp32; every partial that crosses ranks or steps is fp32.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/core/tensor_view.h"

namespace distattn::parallel {

enum class Strategy { kHeads, kRing, kZigzag, kUlysses, kAllGather, kHybrid };

// "heads", "ring", "zigzag", "ulysses", "allgather", "hybrid".
const char* strategy_name(Strategy s);
// Accepts the names above; throws distattn::Error listing them.
Strategy parse_strategy(std::string_view name);
// All strategies, in the order above.
std::span<const Strategy> all_strategies();

// How a problem is laid out over ranks. `ulysses` is the Ulysses degree of kHybrid (ring
// degree = ranks / ulysses); other strategies ignore it.
struct SpLayout {
  Strategy strategy = Strategy::kRing;
  int ranks = 1;
  int ulysses = 1;

  int ring_degree() const { return strategy == Strategy::kHybrid ? ranks / ulysses : ranks; }
  int ulysses_degree() const { return strategy == Strategy::kHybrid ? ulysses : 1; }
};

// Global problem extents (full tensors). head_dim_v = 0 means head_dim.
struct SpShape {
  int64_t batch = 1;
  int64_t seq = 0;
  int64_t heads_q = 1;
  int64_t heads_kv = 1;
  int64_t head_dim = 64;
  int64_t head_dim_v = 0;
  // Packed documents over the global sequence (flash-attn's cu_seqlens: n_docs + 1 offsets,
  // first 0, last == seq; batch 1). Empty: one document. See "Packed documents" above.
  std::vector<int32_t> cu_seqlens;
  // Packed zigzag/all-gather/hybrid: documents of at least 2*P*min_split_chunk tokens (2*R*..
  // for hybrid) are split into zigzag chunks, shorter ones stay whole on one rank (assigned
  // for balance). 1 splits every document. Must equal SpOptions::min_split_chunk.
  int64_t min_split_chunk = 128;
  int64_t dim_v() const { return head_dim_v > 0 ? head_dim_v : head_dim; }
};

// Throws Error(kInvalidArgument) naming the needed multiple (e.g. "zigzag over 4 ranks needs
// the sequence length to be a multiple of 8 (2*ranks); got 100. Causal attention: pad it at the
// END to 104 and discard the padded query rows ...") or the bad head counts. End padding is
// exact only for causal attention (padded keys follow every real query); there is no key-length
// option for non-causal attention.
void check_layout(const SpLayout& layout, const SpShape& shape);

// Local sequence length of every rank (same for all ranks; one document).
int64_t local_seq_len(const SpLayout& layout, int64_t global_seq);
// Local sequence length of `rank` (packed documents: ranks may differ by a few tokens).
int64_t local_seq_len(const SpLayout& layout, const SpShape& shape, int rank);

// Global token positions of rank `rank`'s local rows, in local row order.
std::vector<int64_t> token_positions(Strategy strategy, int64_t global_seq, int ranks, int rank);
std::vector<int64_t> token_positions(const SpLayout& layout, int64_t global_seq, int rank);
// Packed documents: the DOCUMENT-relative position of each local row (RoPE restarts at 0 in
// each document), and the document index of each local row.
std::vector<int64_t> token_positions(const SpLayout& layout, std::span<const int32_t> cu_seqlens,
                                     int rank, int64_t min_split_chunk = 128);
std::vector<int32_t> token_documents(const SpLayout& layout, std::span<const int32_t> cu_seqlens,
                                     int rank, int64_t min_split_chunk = 128);

struct HeadRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};
// Query heads [begin, end) of rank `rank` in a balanced split of `heads` over `parts`.
HeadRange split_heads(int64_t heads, int parts, int rank);
// Query heads a rank holds in its local tensors: kHeads: its split; others: all heads.
HeadRange local_query_heads(const SpLayout& layout, const SpShape& shape, int rank);
// KV heads a rank holds: kHeads: the KV heads used by its query heads (contiguous);
// others: all KV heads.
HeadRange local_kv_heads(const SpLayout& layout, const SpShape& shape, int rank);

enum class ShardRole {
  kQuery,     // q, out, dout, dq   [B, S, Hq, D]
  kKeyValue,  // k, v, dk, dv       [B, S, Hkv, D]
  kLse,       // lse                fp32 [B, Hq, S]
};

// This rank's shard of a full tensor (packed copy on the full tensor's device).
Tensor shard(const SpLayout& layout, const SpShape& shape, int rank, ShardRole role,
             const TensorView& full);
// Writes (accumulate=false) or adds (accumulate=true, dtypes fp32/fp64) a rank's local shard
// into its place in `full`. Summing every rank's accumulate=true contribution into a zeroed
// full tensor rebuilds it, including head-parallel dk/dv of replicated KV heads.
void unshard_into(const SpLayout& layout, const SpShape& shape, int rank, ShardRole role,
                  const TensorView& local, const TensorView& full, bool accumulate = false);

// The communicators a strategy runs over. 1-D strategies use `seq` only; kHybrid uses
// `seq` as the ring axis and `ulysses` as the Ulysses axis.
struct SpGroup {
  comm::Communicator* seq = nullptr;
  comm::Communicator* ulysses = nullptr;

  static SpGroup flat(comm::Communicator& c) { return {&c, nullptr}; }
  // Axes named `ring_axis` and `ulysses_axis` of a mesh (the mesh must outlive the group).
  static SpGroup from_mesh(const comm::DeviceMesh& mesh, const std::string& ring_axis = "ring",
                           const std::string& ulysses_axis = "ulysses");
  // The layout these communicators give a strategy, and this rank's layout rank.
  SpLayout layout(Strategy strategy) const;
  int layout_rank(Strategy strategy) const;
};

// Where the time of one call went (this rank). exposed_comm_s is time spent blocked waiting
// for communication (Handle::wait and blocking collectives), i.e. NOT hidden behind compute.
struct SpStats {
  double total_s = 0;
  double exposed_comm_s = 0;
  double compute_s = 0;  // time inside ops::* calls
  int steps = 0;         // ring steps (or 1)
  // Query-key pairs this rank's kernel calls attended (visible pairs only, per batch and
  // query head summed over both): the measured work balance.
  double visible_pairs = 0;
};

struct SpOptions {
  std::optional<float> softmax_scale;  // unset: 1/sqrt(D)
  bool causal = false;
  // CUDA: the compute stream (see "GPU ranks" above); the call's results are ordered on it.
  Stream stream = nullptr;
  // Pass Communicator::progress to the CPU kernels so host-memory (MPI) transfers advance
  // while they compute. Turn off only to measure what overlap is worth.
  bool drive_progress = true;
  // kHeads only: global head counts (the local tensors hold a subset).
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  // Packed documents: the GLOBAL cu_seqlens (same on every rank, as SpShape::cu_seqlens);
  // local tensors are shard()s of the packed sequence. Empty: one document.
  std::span<const int32_t> cu_seqlens;
  int64_t min_split_chunk = 128;  // as SpShape::min_split_chunk (the shards' layout)
  // Sliding window over document positions (< 0: unlimited side), sink tokens (the first
  // n keys of each document ignore the window) and learned sink logits (fp32 [heads_q
  // GLOBAL] on the tensors' device; data == nullptr: none). See distattn/ops/attention.h.
  int64_t window_left = -1;
  int64_t window_right = -1;
  int64_t sink_tokens = 0;
  TensorView sinks;
  // Backward with sinks: fp32 [heads_q GLOBAL] receives dsinks, complete (summed over every
  // rank's queries) on every rank.
  TensorView dsinks;
  // Filled when set (overwritten, not accumulated).
  SpStats* stats = nullptr;
};

// out, lse <- exact attention of the local queries over ALL keys of the global sequence.
void sp_attention_forward(Strategy strategy, const SpGroup& group, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out,
                          const TensorView& lse, const SpOptions& opts = {});

// dq, dk, dv for the local shards, given the forward's local out and (global) lse.
// dk/dv are complete (summed over every rank's queries) except for kHeads' replicated heads.
void sp_attention_backward(Strategy strategy, const SpGroup& group, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& out,
                           const TensorView& dout, const TensorView& lse, const TensorView& dq,
                           const TensorView& dk, const TensorView& dv, const SpOptions& opts = {});

// A packed batch for benchmarks and tests: document lengths drawn from a long-tail law
// (Pareto, shape 1.1, minimum 16 tokens: many short documents, a few very long ones), from a
// 64-bit seed, the last one cut so that they sum to exactly `total` tokens.
std::vector<int64_t> longtail_document_lengths(int64_t total, uint64_t seed);
// cu_seqlens of document lengths (0, l0, l0+l1, ...). Throws past 2^31-1 tokens.
std::vector<int32_t> cu_seqlens_of(std::span<const int64_t> lengths);

// Attention FLOPs (4*B*H*Sq*Sk*D per visible pair count, REFERENCE.md) this rank computes
// in the forward pass of `layout`, counting only visible (unmasked) query-key pairs. Used to
// check load balance; heads strategy counts its own heads.
double rank_forward_flops(const SpLayout& layout, const SpShape& shape, int rank, bool causal);
// Visible (query, key) pairs per batch and head that rank `rank` attends in the forward pass
// under the mask of `opts` (causal, window, sink tokens; documents from shape.cu_seqlens):
// the modelled work balance (SpStats::visible_pairs is the measured one, times B*H).
double rank_visible_pairs(const SpLayout& layout, const SpShape& shape, int rank,
                          const SpOptions& opts);

}  // namespace distattn::parallel
