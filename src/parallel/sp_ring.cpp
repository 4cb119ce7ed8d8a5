// Ring attention (contiguous shards) and zigzag ring attention (2P chunks, rank r holds chunks
// r and 2P-1-r), forward and backward.
//
// Forward, P steps: at step i a rank holds the K,V block of rank src = (r - i) mod P. The
// exchange that brings step i+1's block is posted (igroup send to r+1 / recv from r-1) BEFORE
// step i's compute into the other half of a double buffer, and waited after it, so the
// transfer runs behind the kernel (the kernel drives MPI progress through the progress hook).
// Step 0 writes the fp32 accumulators directly; later steps write an fp32 partial that is
// merged with ops::attention_merge (NaN-safe LSE merge).
//
// Backward: K,V travel exactly as in the forward. Each K,V block is accompanied by an fp32
// dK,dV accumulator that collects every rank's contribution as it passes and arrives back at
// the block's owner after P hops (the last hop after the final step). A rank computes its
// contribution into a local fp32 buffer while the accumulator of the block is still in
// flight, then adds it and sends the accumulator on. dq accumulates locally in fp32.
// ops::attention_backward is called with the GLOBAL out/lse (the forward's merged results).
//
// Which blocks of a step are visible under the causal mask (derived from global positions;
// C = Sl/2 for zigzag):
//   ring   step 0: causal diagonal; src < r: all visible; src > r: fully masked (skipped).
//   zigzag step 0: q[0,C) x k[0,C) causal; q[C,2C) x k[0,2C) causal with local offsets (C, 0)
//                  (chunk r precedes chunk 2P-1-r, so this is exactly the global mask);
//          src < r: k chunk src precedes both query chunks, k chunk 2P-1-src follows both:
//                   all queries x first half of K,V, unmasked;
//          src > r: both k chunks follow q chunk r and precede q chunk 2P-1-r:
//                   second half of queries x all K,V, unmasked.
// Every zigzag step is C*2C visible pairs per head: the work is balanced.
#include <algorithm>

#include "src/parallel/sp_detail.h"

namespace distattn::parallel::detail {

namespace {

struct Block {
  int64_t q_begin, q_len, k_begin, k_len, q_off, k_off;
  bool causal;
};

std::vector<Block> step_blocks(bool zigzag, bool causal, int rank, int src, int step, int64_t sl) {
  if (!causal) return {{0, sl, 0, sl, 0, 0, false}};
  if (!zigzag) {
    if (step == 0) return {{0, sl, 0, sl, 0, 0, true}};
    if (src < rank) return {{0, sl, 0, sl, 0, 0, false}};
    return {};
  }
  const int64_t c = sl / 2;
  if (step == 0) return {{0, c, 0, c, 0, 0, true}, {c, c, 0, sl, c, 0, true}};
  if (src < rank) return {{0, sl, 0, c, 0, 0, false}};
  return {{c, c, 0, sl, 0, 0, false}};
}

TensorView rows(const TensorView& t, int64_t begin, int64_t len) {
  return t.slice(1, begin, len);
}
TensorView lse_rows(const TensorView& t, int64_t begin, int64_t len) {
  return t.slice(2, begin, len);
}

Tensor packed(std::initializer_list<int64_t> shape, DType dtype, Device dev) {
  return Tensor::empty(shape, dtype, dev);
}

// K,V of one step: either the caller's tensors (packed) or one of the double buffers.
struct KV {
  TensorView k, v;
};

// This rank's K,V packed for sending (sends need packed buffers: strided inputs are copied)
// plus the two receive buffers per tensor of the double-buffered ring; only for p > 1.
struct RingKv {
  Tensor own_k, own_v, bufs_k[2], bufs_v[2];
  KV cur;

  // Packing copies are enqueued on `stream` (the compute stream).
  RingKv(const TensorView& k, const TensorView& v, int p, Stream stream) : cur{k, v} {
    if (p <= 1) return;
    const Device dev = k.device;
    if (!k.is_contiguous()) {
      own_k = packed_copy(k, stream);
      cur.k = own_k.view();
    }
    if (!v.is_contiguous()) {
      own_v = packed_copy(v, stream);
      cur.v = own_v.view();
    }
    for (int i = 0; i < 2; ++i) {
      bufs_k[i] = packed({k.size(0), k.size(1), k.size(2), k.size(3)}, k.dtype, dev);
      bufs_v[i] = packed({v.size(0), v.size(1), v.size(2), v.size(3)}, v.dtype, dev);
    }
  }
  // Receive buffers of `step` (alternating).
  KV recv_buffers(int step) const { return {bufs_k[step % 2].view(), bufs_v[step % 2].view()}; }
};

std::vector<comm::P2POp> kv_exchange(const KV& send, const KV& recv, int next, int prev) {
  return {comm::P2POp::send(send.k.data, static_cast<size_t>(send.k.numel()), send.k.dtype, next),
          comm::P2POp::send(send.v.data, static_cast<size_t>(send.v.numel()), send.v.dtype, next),
          comm::P2POp::recv(recv.k.data, static_cast<size_t>(recv.k.numel()), recv.k.dtype, prev),
          comm::P2POp::recv(recv.v.data, static_cast<size_t>(recv.v.numel()), recv.v.dtype, prev)};
}

}  // namespace

void ring_forward(comm::Communicator& comm, bool zigzag, const TensorView& q, const TensorView& k,
                  const TensorView& v, const TensorView& out, const TensorView& lse, bool causal,
                  const std::vector<HeadSegment>& segs, Tracker& tr) {
  const int p = comm.size();
  const int r = comm.rank();
  const int next = (r + 1) % p;
  const int prev = (r + p - 1) % p;
  const Device dev = q.device;
  const int64_t b = q.size(0), sl = q.size(1), hq = q.size(2), dv = v.size(3);

  // Accumulators: the caller's out when it is fp32, else an fp32 buffer converted at the end.
  Tensor out_acc_t;
  const TensorView out_acc = fp32_accumulator(out, out_acc_t);
  RingKv ring_kv(k, v, p, tr.stream());
  KV& cur = ring_kv.cur;
  Tensor part_out, part_lse;
  if (p > 1) {
    part_out = packed({b, sl, hq, dv}, DType::kFloat32, dev);
    part_lse = packed({b, hq, sl}, DType::kFloat32, dev);
  }

  for (int step = 0; step < p; ++step) {
    tr.step();
    const int src = (r - step + p) % p;
    comm::Handle h;
    KV nxt{};
    if (step + 1 < p) {
      // nxt was last read by step-1's kernels and cur written by step-1's transfer (same
      // comm stream): comm_after_compute covers the first, stream order the second.
      nxt = ring_kv.recv_buffers(step);
      const auto ops = kv_exchange(cur, nxt, next, prev);
      tr.comm_after_compute();
      h = comm.igroup(ops, tr.comm_stream());
    }
    for (const Block& blk : step_blocks(zigzag, causal, r, src, step, sl)) {
      const TensorView qb = rows(q, blk.q_begin, blk.q_len);
      const TensorView kb = rows(cur.k, blk.k_begin, blk.k_len);
      const TensorView vb = rows(cur.v, blk.k_begin, blk.k_len);
      if (step == 0) {
        // Step-0 blocks cover every query row exactly once.
        tr.forward(qb, kb, vb, rows(out_acc, blk.q_begin, blk.q_len),
                   lse_rows(lse, blk.q_begin, blk.q_len), blk.q_off, blk.k_off, blk.causal, segs);
      } else {
        const TensorView po = rows(part_out.view(), blk.q_begin, blk.q_len);
        const TensorView pl = lse_rows(part_lse.view(), blk.q_begin, blk.q_len);
        tr.forward(qb, kb, vb, po, pl, blk.q_off, blk.k_off, blk.causal, segs);
        tr.merge(rows(out_acc, blk.q_begin, blk.q_len), lse_rows(lse, blk.q_begin, blk.q_len), po,
                 pl);
      }
    }
    if (step + 1 < p) {
      tr.wait(h);
      cur = nxt;
    }
  }
  if (out_acc_t.defined()) copy_view(out, out_acc, tr.stream());
}

void ring_backward(comm::Communicator& comm, bool zigzag, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& out, const TensorView& dout,
                   const TensorView& lse, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv_out, bool causal, const std::vector<HeadSegment>& segs,
                   Tracker& tr) {
  const int p = comm.size();
  const int r = comm.rank();
  const int next = (r + 1) % p;
  const int prev = (r + p - 1) % p;
  const Device dev = q.device;
  const int64_t b = q.size(0), sl = q.size(1), d = q.size(3);
  const int64_t hkv = k.size(2), dv = v.size(3);

  Tensor dq_acc_t;
  const TensorView dq_acc = fp32_accumulator(dq, dq_acc_t);
  zero(dq_acc, tr.stream());

  // dK,dV accumulators that travel with the blocks (fp32), and this rank's contribution.
  Tensor trav_k[2], trav_v[2], mine_k, mine_v;
  for (int i = 0; i < (p > 1 ? 2 : 1); ++i) {
    trav_k[i] = packed({b, sl, hkv, d}, DType::kFloat32, dev);
    trav_v[i] = packed({b, sl, hkv, dv}, DType::kFloat32, dev);
  }
  RingKv ring_kv(k, v, p, tr.stream());
  KV& cur = ring_kv.cur;
  if (p > 1) {
    mine_k = packed({b, sl, hkv, d}, DType::kFloat32, dev);
    mine_v = packed({b, sl, hkv, dv}, DType::kFloat32, dev);
  }

  comm::Handle dkv_handle;  // previous step's accumulator send + next accumulator recv
  for (int step = 0; step < p; ++step) {
    tr.step();
    const int src = (r - step + p) % p;
    comm::Handle h;
    KV nxt{};
    if (step + 1 < p) {
      nxt = ring_kv.recv_buffers(step);
      const auto ops = kv_exchange(cur, nxt, next, prev);
      tr.comm_after_compute();
      h = comm.igroup(ops, tr.comm_stream());
    }
    // Step 0 computes straight into the accumulator that starts travelling; later steps into
    // `mine`, added once the travelling accumulator has arrived.
    const TensorView gk = step == 0 ? trav_k[0].view() : mine_k.view();
    const TensorView gv = step == 0 ? trav_v[0].view() : mine_v.view();
    zero(gk, tr.stream());
    zero(gv, tr.stream());
    const auto blocks = step_blocks(zigzag, causal, r, src, step, sl);
    for (const Block& blk : blocks) {
      tr.backward(rows(q, blk.q_begin, blk.q_len), rows(cur.k, blk.k_begin, blk.k_len),
                  rows(cur.v, blk.k_begin, blk.k_len), rows(out, blk.q_begin, blk.q_len),
                  rows(dout, blk.q_begin, blk.q_len), lse_rows(lse, blk.q_begin, blk.q_len),
                  rows(dq_acc, blk.q_begin, blk.q_len), rows(gk, blk.k_begin, blk.k_len),
                  rows(gv, blk.k_begin, blk.k_len), blk.q_off, blk.k_off, blk.causal,
                  /*accumulate=*/true, segs);
    }
    if (p > 1) {
      const int cur_slot = step % 2;
      if (step > 0) {
        tr.wait(dkv_handle);  // trav[cur_slot] now holds the arriving accumulator
        if (!blocks.empty()) {
          add_view(trav_k[cur_slot].view(), gk, tr.stream());
          add_view(trav_v[cur_slot].view(), gv, tr.stream());
        }
      }
      const int other = 1 - cur_slot;
      const std::vector<comm::P2POp> ops = {
          comm::P2POp::send(trav_k[cur_slot].data(), static_cast<size_t>(trav_k[cur_slot].numel()),
                            DType::kFloat32, next),
          comm::P2POp::send(trav_v[cur_slot].data(), static_cast<size_t>(trav_v[cur_slot].numel()),
                            DType::kFloat32, next),
          comm::P2POp::recv(trav_k[other].data(), static_cast<size_t>(trav_k[other].numel()),
                            DType::kFloat32, prev),
          comm::P2POp::recv(trav_v[other].data(), static_cast<size_t>(trav_v[other].numel()),
                            DType::kFloat32, prev)};
      // trav[cur_slot] was written by this step's kernels and add (compute stream);
      // trav[other] was last sent by the previous accumulator op, earlier on the comm stream.
      tr.comm_after_compute();
      dkv_handle = comm.igroup(ops, tr.comm_stream());
    }
    if (step + 1 < p) {
      tr.wait(h);
      cur = nxt;
    }
  }
  // The own block's accumulator: home after the last hop (or computed here when P == 1).
  const int home = p > 1 ? p % 2 : 0;
  tr.wait(dkv_handle);
  copy_view(dk, trav_k[home].view(), tr.stream());
  copy_view(dv_out, trav_v[home].view(), tr.stream());
  if (dq_acc_t.defined()) copy_view(dq, dq_acc, tr.stream());
}

}  // namespace distattn::parallel::detail
