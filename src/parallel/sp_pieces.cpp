// The generic strategy bodies: packed documents, sliding windows, sink tokens and learned
// sinks under ring/zigzag, all-gather, Ulysses and the hybrid (sp_attention.cpp routes a call
// here when SpOptions asks for any of them; the plain bodies stay as they are).
//
// Every block of keys a rank attends is described by runs (src/ops/doc_mask.h): which local
// rows hold which document positions. Tracker::pieces turns (query runs, key runs) into
// kernel calls that each see one document and one contiguous position range on both sides,
// trimmed to the visible rows; blocks with no piece cost nothing. Because every rank knows
// every rank's runs (they follow from the layout and the global cu_seqlens), blocks may have
// different lengths (packed documents split evenly need no padding), and the ring knows in
// advance the last step in which any rank still sees a key: later steps are not run, so a
// sliding window shrinks the ring's compute AND its bytes.
//
// Ring backward with an early stop: the dK,dV accumulator of a block travels with it as in
// the plain ring; after the last step it goes straight back to the block's owner (one send)
// instead of finishing the loop.
#include <algorithm>
#include <limits>

#include "distattn/ops/attention.h"
#include "distattn/ops/elementwise.h"
#include "src/parallel/sp_detail.h"

namespace distattn::parallel::detail {

namespace {

// A packed [B, rows, H, D] view at the start of `buf` (a buffer sized for the longest block).
TensorView head_rows(const Tensor& buf, int64_t b, int64_t rows) {
  const TensorView& v = buf.view();
  return TensorView(buf.data(), v.dtype, v.device, {b, rows, v.size(2), v.size(3)});
}

size_t elems(const TensorView& t) {
  return static_cast<size_t>(t.numel());
}

void init_result(const TensorView& acc, const TensorView& lse, Stream s) {
  ops::tensor_zero(acc, s);
  ops::tensor_fill(lse, -std::numeric_limits<double>::infinity(), s);
}

std::vector<int64_t> lengths(const std::vector<Runs>& maps) {
  std::vector<int64_t> l;
  for (const Runs& m : maps) l.push_back(runs_rows(m));
  return l;
}

// Gathered rank slots [P, B, maxL, H, D] <-> rows [B, P*maxL, H, D] (slot j at rows j*maxL).
void slots_to_rows(const TensorView& slots, const TensorView& flat, Stream s) {
  const int64_t p = slots.size(0), ml = slots.size(2);
  for (int64_t j = 0; j < p; ++j) {
    const TensorView slot =
        slots.slice(0, j, 1).reshape({slots.size(1), ml, slots.size(3), slots.size(4)});
    copy_view(flat.slice(1, j * ml, ml), slot, s);
  }
}
void rows_to_slots(const TensorView& flat, const TensorView& slots, Stream s) {
  const int64_t p = slots.size(0), ml = slots.size(2);
  for (int64_t j = 0; j < p; ++j) {
    const TensorView slot =
        slots.slice(0, j, 1).reshape({slots.size(1), ml, slots.size(3), slots.size(4)});
    copy_view(slot, flat.slice(1, j * ml, ml), s);
  }
}

// Rows [lo, hi) of a block (a hull: one contiguous range, possibly empty).
struct Hull {
  int64_t lo = 0, hi = 0;
  bool empty() const { return hi <= lo; }
  int64_t size() const { return empty() ? 0 : hi - lo; }
  void add(const Hull& o) {
    if (o.empty()) return;
    if (empty()) {
      *this = o;
      return;
    }
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
  }
};

// What the generic ring moves, computed identically on every rank from every block's runs.
// need[b][t]: the rows of block b (owned by ring rank b) that rank (b + t) % P attends (hull of
// its pieces' key rows). The ring runs steps 0..last, last = the largest t with any need.
// K,V: the rank at distance t receives kv_rows(b, t) = hull of need[b][t..last] (it relays
// to the later ones what they need; the closest needs the most under causal windows).
// dK,dV: the owner keeps its own contribution; the accumulator starts at distance 1 and after
// distance t holds acc_rows(b, t) = hull of need[b][1..t]; after `last` it goes home.
// With batch > 1 rows of a block are not contiguous in memory: hulls widen to whole blocks.
struct RingPlan {
  int p = 1, last = 0;
  std::vector<int64_t> len;
  std::vector<std::vector<Hull>> need;

  Hull kv_rows(int b, int t) const {
    Hull h;
    for (int u = t; u <= last; ++u) h.add(need[b][u]);
    return h;
  }
  Hull acc_rows(int b, int t) const {
    Hull h;
    for (int u = 1; u <= t; ++u) h.add(need[b][u]);
    return h;
  }
};

RingPlan make_ring_plan(const std::vector<Runs>& maps, const Tracker& tr, int64_t batch) {
  RingPlan pl;
  pl.p = static_cast<int>(maps.size());
  pl.len = lengths(maps);
  pl.need.assign(static_cast<size_t>(pl.p), std::vector<Hull>(static_cast<size_t>(pl.p)));
  for (int b = 0; b < pl.p; ++b)
    for (int t = 0; t < pl.p; ++t) {
      Hull h;
      for (const auto& x : tr.pieces(maps[(b + t) % pl.p], maps[b]))
        h.add({x.k_row, x.k_row + x.k_len});
      if (batch > 1 && !h.empty()) h = {0, pl.len[b]};
      pl.need[b][t] = h;
      if (t > 0 && !h.empty()) pl.last = std::max(pl.last, t);
    }
  return pl;
}

// Rows [h.lo, h.hi) of a [B, L, H, D] view as (pointer, element count) for a transfer.
void* row_ptr(const TensorView& t, int64_t row) {
  return static_cast<char*>(t.data) + row * t.stride(1) * static_cast<int64_t>(t.element_size());
}
size_t row_elems(const TensorView& t, const Hull& h) {
  return static_cast<size_t>(h.size() * t.size(0) * t.size(2) * t.size(3));
}

void add_send(std::vector<comm::P2POp>& ops, const TensorView& t, const Hull& h, int peer) {
  if (!h.empty())
    ops.push_back(comm::P2POp::send(row_ptr(t, h.lo), row_elems(t, h), t.dtype, peer));
}
void add_recv(std::vector<comm::P2POp>& ops, const TensorView& t, const Hull& h, int peer) {
  if (!h.empty())
    ops.push_back(comm::P2POp::recv(row_ptr(t, h.lo), row_elems(t, h), t.dtype, peer));
}

comm::Handle post(comm::Communicator& comm, const std::vector<comm::P2POp>& ops, Tracker& tr) {
  if (ops.empty()) return {};
  tr.comm_after_compute();
  return comm.igroup(ops, tr.comm_stream());
}

// The K,V a rank sends on the ring (its own, packed when strided) and the two receive
// buffers of the double-buffered ring, sized for the longest block; only when `ring`.
// Received rows land at their block's own row offsets (rows outside the hull stay unset and
// are never read: no piece covers them).
struct RingKvBuffers {
  Tensor own_k, own_v, buf_k[2], buf_v[2];
  TensorView k, v;  // the block held now

  RingKvBuffers(const TensorView& k_in, const TensorView& v_in, int64_t max_len, bool ring,
                Stream s)
      : k(k_in), v(v_in) {
    if (!ring) return;
    if (!k_in.is_contiguous()) {
      own_k = packed_copy(k_in, s);
      k = own_k;
    }
    if (!v_in.is_contiguous()) {
      own_v = packed_copy(v_in, s);
      v = own_v;
    }
    const int64_t b = k_in.size(0);
    for (int i = 0; i < 2; ++i) {
      buf_k[i] = Tensor::empty({b, max_len, k_in.size(2), k_in.size(3)}, k_in.dtype, k_in.device);
      buf_v[i] = Tensor::empty({b, max_len, v_in.size(2), v_in.size(3)}, v_in.dtype, v_in.device);
    }
  }
};

// Posts this step's K,V exchange: send the rows of the block held that the next ranks need,
// receive those of the next block (src - 1) into slot step % 2.
comm::Handle post_kv_exchange(comm::Communicator& comm, const RingPlan& pl, RingKvBuffers& kv,
                              int step, int src, TensorView& nk, TensorView& nv, Tracker& tr) {
  const int p = comm.size(), r = comm.rank();
  const int nsrc = (src + p - 1) % p;
  const int64_t b = kv.k.size(0);
  nk = head_rows(kv.buf_k[step % 2], b, pl.len[nsrc]);
  nv = head_rows(kv.buf_v[step % 2], b, pl.len[nsrc]);
  const Hull send = pl.kv_rows(src, step + 1), recv = pl.kv_rows(nsrc, step + 1);
  std::vector<comm::P2POp> ops;
  add_send(ops, kv.k, send, (r + 1) % p);
  add_send(ops, kv.v, send, (r + 1) % p);
  add_recv(ops, nk, recv, (r + p - 1) % p);
  add_recv(ops, nv, recv, (r + p - 1) % p);
  return post(comm, ops, tr);
}

}  // namespace

void ring_forward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                         const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView& lse,
                         const std::vector<HeadSegment>& segs, const TensorView& sinks,
                         Tracker& tr) {
  const int p = comm.size(), r = comm.rank();
  const Stream cs = tr.stream();
  const RingPlan pl = make_ring_plan(maps, tr, q.size(0));
  const int64_t max_len = *std::max_element(pl.len.begin(), pl.len.end());

  Tensor acc_t;
  const TensorView acc = fp32_accumulator(out, acc_t);
  init_result(acc, lse, cs);
  RingKvBuffers kv(k, v, max_len, pl.last > 0, cs);
  for (int step = 0; step <= pl.last; ++step) {
    tr.step();
    const int src = (r - step + p) % p;
    comm::Handle h;
    TensorView nk, nv;
    if (step < pl.last) h = post_kv_exchange(comm, pl, kv, step, src, nk, nv, tr);
    tr.forward_pieces(q, kv.k, kv.v, acc, lse, tr.pieces(maps[r], maps[src]), segs,
                      /*fresh=*/step == 0);
    if (step < pl.last) {
      tr.wait(h);
      kv.k = nk;
      kv.v = nv;
    }
  }
  if (sinks.data != nullptr) ops::attention_apply_sinks(acc, lse, sinks, cs);
  if (acc_t.defined()) copy_view(out, acc, cs);
}

void ring_backward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                          const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const TensorView& dout, const TensorView& lse,
                          const TensorView& dq, const TensorView& dk, const TensorView& dv_out,
                          const std::vector<HeadSegment>& segs, Tracker& tr) {
  const int p = comm.size(), r = comm.rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  const Device dev = q.device;
  const Stream cs = tr.stream();
  const int64_t b = q.size(0), hkv = k.size(2), d = k.size(3), dv = v.size(3);
  const RingPlan pl = make_ring_plan(maps, tr, b);
  const int64_t max_len = *std::max_element(pl.len.begin(), pl.len.end());
  const int last = pl.last;

  Tensor dq_t;
  const TensorView dq_acc = fp32_accumulator(dq, dq_t);
  zero(dq_acc, cs);
  // The own block's dK,dV (kept here: the caller's dk/dv when fp32), the travelling
  // accumulators and this rank's share.
  Tensor own_k_t, own_v_t;
  const TensorView own_k = fp32_accumulator(dk, own_k_t);
  const TensorView own_v = fp32_accumulator(dv_out, own_v_t);
  zero(own_k, cs);
  zero(own_v, cs);
  Tensor trav_k[2], trav_v[2], mine_k, mine_v;
  if (last > 0) {
    for (int i = 0; i < 2; ++i) {
      trav_k[i] = Tensor::empty({b, max_len, hkv, d}, DType::kFloat32, dev);
      trav_v[i] = Tensor::empty({b, max_len, hkv, dv}, DType::kFloat32, dev);
    }
    mine_k = Tensor::empty({b, max_len, hkv, d}, DType::kFloat32, dev);
    mine_v = Tensor::empty({b, max_len, hkv, dv}, DType::kFloat32, dev);
  }
  RingKvBuffers kv(k, v, max_len, last > 0, cs);
  // The caller's K,V: the own block's deferred pieces read them after the ring moved on.
  const TensorView own_kv_k = kv.k, own_kv_v = kv.v;
  Pieces own_now, own_later;
  comm::Handle dkv;
  for (int step = 0; step <= last; ++step) {
    tr.step();
    const int src = (r - step + p) % p;
    comm::Handle h;
    TensorView nk, nv;
    if (step < last) h = post_kv_exchange(comm, pl, kv, step, src, nk, nv, tr);
    const Pieces ps = tr.pieces(maps[r], maps[src]);
    if (step == 0) {
      // The own block: half of its work now (while the first K,V transfer runs), the rest
      // after the last accumulator is posted (while it travels home). Its dK,dV stay here.
      double total = 0, run = 0;
      for (const auto& x : ps) total += x.pairs;
      for (const auto& x : ps) {
        if (last > 0 && run >= 0.5 * total) {
          own_later.push_back(x);
        } else {
          own_now.push_back(x);
        }
        run += x.pairs;
      }
      tr.backward_pieces(q, kv.k, kv.v, out, dout, lse, dq_acc, own_k, own_v, own_now, segs);
    } else {
      const int slot = step % 2;
      const TensorView gk = head_rows(mine_k, b, pl.len[src]);
      const TensorView gv = head_rows(mine_v, b, pl.len[src]);
      const Hull now = pl.acc_rows(src, step), before = pl.acc_rows(src, step - 1);
      if (!now.empty()) {
        zero(gk.slice(1, now.lo, now.size()), cs);
        zero(gv.slice(1, now.lo, now.size()), cs);
      }
      tr.backward_pieces(q, kv.k, kv.v, out, dout, lse, dq_acc, gk, gv, ps, segs);
      const TensorView tk = head_rows(trav_k[slot], b, pl.len[src]);
      const TensorView tv = head_rows(trav_v[slot], b, pl.len[src]);
      tr.wait(dkv);  // trav[slot] holds the arriving accumulator rows `before`
      // Rows new to the accumulator start at zero (they were not received), then add.
      const Hull gaps[2] = {{now.lo, before.empty() ? now.hi : before.lo},
                            {before.empty() ? now.hi : before.hi, now.hi}};
      for (const Hull& g : gaps) {
        if (g.empty()) continue;
        zero(tk.slice(1, g.lo, g.size()), cs);
        zero(tv.slice(1, g.lo, g.size()), cs);
      }
      if (!now.empty()) {
        add_view(tk.slice(1, now.lo, now.size()), gk.slice(1, now.lo, now.size()), cs);
        add_view(tv.slice(1, now.lo, now.size()), gv.slice(1, now.lo, now.size()), cs);
      }
      // On to the next rank, or home after the last step; receive the next accumulator (or,
      // after the last step, this rank's own block's, from the rank `last` ahead).
      const bool final_step = step == last;
      const int dest = final_step ? src : next;
      const int from = final_step ? (r + last) % p : prev;
      const int rblock = final_step ? r : (src + p - 1) % p;
      const Hull rrows = final_step ? pl.acc_rows(r, last) : pl.acc_rows(rblock, step);
      const TensorView rk = head_rows(trav_k[1 - slot], b, pl.len[rblock]);
      const TensorView rv = head_rows(trav_v[1 - slot], b, pl.len[rblock]);
      std::vector<comm::P2POp> ops;
      add_send(ops, tk, now, dest);
      add_send(ops, tv, now, dest);
      add_recv(ops, rk, rrows, from);
      add_recv(ops, rv, rrows, from);
      dkv = post(comm, ops, tr);
    }
    if (step < last) {
      tr.wait(h);
      kv.k = nk;
      kv.v = nv;
    }
  }
  if (last > 0) {
    tr.backward_pieces(q, own_kv_k, own_kv_v, out, dout, lse, dq_acc, own_k, own_v, own_later,
                       segs);
    // Step 1 received nothing (the accumulator starts there): the first receive, posted at
    // step 1, is the one for step 2 or home.
    tr.wait(dkv);
    const Hull home = pl.acc_rows(r, last);
    const int slot = (last + 1) % 2;
    if (!home.empty()) {
      add_view(own_k.slice(1, home.lo, home.size()),
               head_rows(trav_k[slot], b, pl.len[r]).slice(1, home.lo, home.size()), cs);
      add_view(own_v.slice(1, home.lo, home.size()),
               head_rows(trav_v[slot], b, pl.len[r]).slice(1, home.lo, home.size()), cs);
    }
  }
  if (own_k_t.defined()) copy_view(dk, own_k, cs);
  if (own_v_t.defined()) copy_view(dv_out, own_v, cs);
  if (dq_t.defined()) copy_view(dq, dq_acc, cs);
}

namespace {

// The all-gather of this rank's K,V padded to the longest block: slots [P, B, maxL, H, D].
struct PaddedGather {
  Tensor send_k, send_v, kg, vg;
  comm::Handle hk, hv;
};

void start_padded_gather(comm::Communicator& comm, const TensorView& k, const TensorView& v,
                         int64_t max_len, Tracker& tr, PaddedGather& g) {
  const int64_t p = comm.size(), b = k.size(0);
  const Stream cs = tr.stream();
  g.send_k = Tensor::empty({b, max_len, k.size(2), k.size(3)}, k.dtype, k.device);
  g.send_v = Tensor::empty({b, max_len, v.size(2), v.size(3)}, v.dtype, v.device);
  // Rows past this rank's length are padding: never read (no run covers them).
  if (max_len > k.size(1)) {
    zero(g.send_k.view().slice(1, k.size(1), max_len - k.size(1)), cs);
    zero(g.send_v.view().slice(1, v.size(1), max_len - v.size(1)), cs);
  }
  copy_view(g.send_k.view().slice(1, 0, k.size(1)), k, cs);
  copy_view(g.send_v.view().slice(1, 0, v.size(1)), v, cs);
  g.kg = Tensor::empty({p, b, max_len, k.size(2), k.size(3)}, k.dtype, k.device);
  g.vg = Tensor::empty({p, b, max_len, v.size(2), v.size(3)}, v.dtype, v.device);
  tr.comm_after_compute();
  g.hk = comm.iall_gather(g.send_k.data(), g.kg.data(), static_cast<size_t>(g.send_k.numel()),
                          k.dtype, tr.comm_stream());
  g.hv = comm.iall_gather(g.send_v.data(), g.vg.data(), static_cast<size_t>(g.send_v.numel()),
                          v.dtype, tr.comm_stream());
}

// Runs of every OTHER rank's block inside the gathered rows [B, P*maxL].
Runs others_runs(const std::vector<Runs>& maps, int me, int64_t max_len) {
  Runs out;
  for (size_t j = 0; j < maps.size(); ++j) {
    if (static_cast<int>(j) == me) continue;
    for (const auto& x : shifted(maps[j], static_cast<int64_t>(j) * max_len)) out.push_back(x);
  }
  return out;
}

// Gathered slots -> [B, P*maxL, H, D] rows (a view when B == 1, else a copy).
TensorView gathered_rows(const Tensor& slots, Tensor& holder, Stream s) {
  const TensorView& g = slots.view();
  const int64_t p = g.size(0), b = g.size(1), ml = g.size(2);
  if (b == 1) return TensorView(slots.data(), g.dtype, g.device, {1, p * ml, g.size(3), g.size(4)});
  holder = Tensor::empty({b, p * ml, g.size(3), g.size(4)}, g.dtype, g.device);
  slots_to_rows(g, holder.view(), s);
  return holder.view();
}

}  // namespace

void allgather_forward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                              const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView& out, const TensorView& lse, const TensorView& sinks,
                              Tracker& tr) {
  const int p = comm.size(), r = comm.rank();
  const Stream cs = tr.stream();
  const std::vector<int64_t> len = lengths(maps);
  const int64_t max_len = *std::max_element(len.begin(), len.end());
  const auto segs = uniform_segments(q.size(2), k.size(2));
  tr.step();
  Tensor acc_t;
  const TensorView acc = fp32_accumulator(out, acc_t);
  init_result(acc, lse, cs);
  PaddedGather g;
  if (p > 1) start_padded_gather(comm, k, v, max_len, tr, g);
  // The rank's own keys while the gather runs.
  tr.forward_pieces(q, k, v, acc, lse, tr.pieces(maps[r], maps[r]), segs, /*fresh=*/true);
  if (p > 1) {
    tr.wait(g.hk);
    tr.wait(g.hv);
    Tensor hk, hv;
    const TensorView kf = gathered_rows(g.kg, hk, cs);
    const TensorView vf = gathered_rows(g.vg, hv, cs);
    tr.forward_pieces(q, kf, vf, acc, lse, tr.pieces(maps[r], others_runs(maps, r, max_len)), segs,
                      /*fresh=*/false);
  }
  if (sinks.data != nullptr) ops::attention_apply_sinks(acc, lse, sinks, cs);
  if (acc_t.defined()) copy_view(out, acc, cs);
}

void allgather_backward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                               const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView& dout, const TensorView& lse,
                               const TensorView& dq, const TensorView& dk, const TensorView& dv_out,
                               Tracker& tr) {
  const int p = comm.size(), r = comm.rank();
  const Device dev = q.device;
  const Stream cs = tr.stream();
  const std::vector<int64_t> len = lengths(maps);
  const int64_t max_len = *std::max_element(len.begin(), len.end());
  const int64_t b = q.size(0), hkv = k.size(2), d = k.size(3), dv = v.size(3);
  const auto segs = uniform_segments(q.size(2), hkv);
  tr.step();
  Tensor dq_t;
  const TensorView dq_acc = fp32_accumulator(dq, dq_t);
  zero(dq_acc, cs);
  // Own keys' gradients land in rows [0, len[r]) of this rank's slot of the full buffers.
  Tensor dkf = zeros_on({p, b, max_len, hkv, d}, DType::kFloat32, dev, cs);
  Tensor dvf = zeros_on({p, b, max_len, hkv, dv}, DType::kFloat32, dev, cs);
  Tensor dk_own = zeros_on({b, len[r], hkv, d}, DType::kFloat32, dev, cs);
  Tensor dv_own = zeros_on({b, len[r], hkv, dv}, DType::kFloat32, dev, cs);
  PaddedGather g;
  if (p > 1) start_padded_gather(comm, k, v, max_len, tr, g);
  tr.backward_pieces(q, k, v, out, dout, lse, dq_acc, dk_own.view(), dv_own.view(),
                     tr.pieces(maps[r], maps[r]), segs);
  if (p == 1) {
    copy_view(dk, dk_own.view(), cs);
    copy_view(dv_out, dv_own.view(), cs);
    if (dq_t.defined()) copy_view(dq, dq_acc, cs);
    return;
  }
  tr.wait(g.hk);
  tr.wait(g.hv);
  Tensor hk, hv, hdk, hdv;
  const TensorView kf = gathered_rows(g.kg, hk, cs);
  const TensorView vf = gathered_rows(g.vg, hv, cs);
  // Gradient rows in the same [B, P*maxL] order (a view of the slots when B == 1).
  TensorView dkr, dvr;
  if (b == 1) {
    dkr = TensorView(dkf.data(), DType::kFloat32, dev, {1, p * max_len, hkv, d});
    dvr = TensorView(dvf.data(), DType::kFloat32, dev, {1, p * max_len, hkv, dv});
  } else {
    hdk = zeros_on({b, p * max_len, hkv, d}, DType::kFloat32, dev, cs);
    hdv = zeros_on({b, p * max_len, hkv, dv}, DType::kFloat32, dev, cs);
    dkr = hdk.view();
    dvr = hdv.view();
  }
  tr.backward_pieces(q, kf, vf, out, dout, lse, dq_acc, dkr, dvr,
                     tr.pieces(maps[r], others_runs(maps, r, max_len)), segs);
  add_view(dkr.slice(1, r * max_len, len[r]), dk_own.view(), cs);
  add_view(dvr.slice(1, r * max_len, len[r]), dv_own.view(), cs);
  if (b != 1) {
    rows_to_slots(dkr, dkf.view(), cs);
    rows_to_slots(dvr, dvf.view(), cs);
  }
  Tensor red_k = Tensor::empty({b, max_len, hkv, d}, DType::kFloat32, dev);
  Tensor red_v = Tensor::empty({b, max_len, hkv, dv}, DType::kFloat32, dev);
  tr.comm_after_compute();
  comm::Handle rk =
      comm.ireduce_scatter(dkf.data(), red_k.data(), static_cast<size_t>(red_k.numel()),
                           DType::kFloat32, comm::ReduceOp::kSum, tr.comm_stream());
  comm::Handle rv =
      comm.ireduce_scatter(dvf.data(), red_v.data(), static_cast<size_t>(red_v.numel()),
                           DType::kFloat32, comm::ReduceOp::kSum, tr.comm_stream());
  tr.wait(rk);
  tr.wait(rv);
  copy_view(dk, red_k.view().slice(1, 0, len[r]), cs);
  copy_view(dv_out, red_v.view().slice(1, 0, len[r]), cs);
  if (dq_t.defined()) copy_view(dq, dq_acc, cs);
}

// ---- Ulysses / hybrid ----

namespace {

struct UPlan {
  int u = 1, me = 0;
  int64_t b = 0, hq = 0, hkv = 0, d = 0, dv = 0, group = 1;
  std::vector<int64_t> len, off;  // per peer: local rows, row offset in the gathered tensor
  int64_t sg = 0;                 // gathered rows
  std::vector<HeadRange> qh, kh;
};

UPlan make_uplan(comm::Communicator& uc, const std::vector<Runs>& peers, const TensorView& q,
                 const TensorView& k, const TensorView& v) {
  UPlan p;
  p.u = uc.size();
  p.me = uc.rank();
  p.b = q.size(0);
  p.hq = q.size(2);
  p.d = q.size(3);
  p.hkv = k.size(2);
  p.dv = v.size(3);
  p.group = p.hq / p.hkv;
  for (int j = 0; j < p.u; ++j) {
    p.off.push_back(p.sg);
    p.len.push_back(runs_rows(peers[j]));
    p.sg += p.len.back();
    const HeadRange h = split_heads(p.hq, p.u, j);
    p.qh.push_back(h);
    p.kh.push_back(kv_heads_of(h, p.group));
  }
  return p;
}

Runs gathered_runs(const std::vector<Runs>& peers) {
  Runs out;
  int64_t at = 0;
  for (const Runs& m : peers) {
    for (const auto& x : shifted(m, at)) out.push_back(x);
    at += runs_rows(m);
  }
  return out;
}

// One all-to-all with per-peer element counts; parts are packed in order per peer.
struct UEx {
  std::vector<size_t> sc, sd, rc, rd;
  Tensor send, recv;
};

// Item of an exchange: a per-peer-shaped tensor part. to_peers: my rows x peer j's heads
// (send) / peer j's rows x my heads (recv); else the reverse.
struct Item {
  bool kv;      // heads from kh (else qh)
  int64_t dim;  // last dim; 0: an lse part [B, h, rows]
};

int64_t item_elems(const UPlan& p, const Item& it, int64_t rows, int who) {
  const int64_t h = it.kv ? p.kh[who].size() : p.qh[who].size();
  return p.b * rows * h * (it.dim == 0 ? 1 : it.dim);
}

UEx make_uex(const UPlan& p, DType dtype, Device dev, const std::vector<Item>& items,
             bool to_heads) {
  UEx e;
  size_t s = 0, r = 0;
  for (int j = 0; j < p.u; ++j) {
    size_t cs = 0, cr = 0;
    for (const Item& it : items) {
      if (to_heads) {  // send my rows x j's heads; recv j's rows x my heads
        cs += static_cast<size_t>(item_elems(p, it, p.len[p.me], j));
        cr += static_cast<size_t>(item_elems(p, it, p.len[j], p.me));
      } else {  // send j's rows x my heads; recv my rows x j's heads
        cs += static_cast<size_t>(item_elems(p, it, p.len[j], p.me));
        cr += static_cast<size_t>(item_elems(p, it, p.len[p.me], j));
      }
    }
    e.sd.push_back(s);
    e.sc.push_back(cs);
    e.rd.push_back(r);
    e.rc.push_back(cr);
    s += cs;
    r += cr;
  }
  e.send = Tensor::empty({static_cast<int64_t>(std::max<size_t>(s, 1))}, dtype, dev);
  e.recv = Tensor::empty({static_cast<int64_t>(std::max<size_t>(r, 1))}, dtype, dev);
  return e;
}

comm::Handle post(comm::Communicator& uc, UEx& e, Tracker& tr) {
  return uc.iall_to_all_v(e.send.data(), e.sc, e.sd, e.recv.data(), e.rc, e.rd, e.send.dtype(),
                          tr.comm_stream());
}

// Sequence-sharded local BSHD tensor -> send parts (my rows, heads of each peer).
void pack_local(const UPlan& p, const TensorView& t, bool kv, UEx& e, std::vector<size_t>& pos,
                Stream s) {
  for (int j = 0; j < p.u; ++j) {
    const HeadRange h = kv ? p.kh[j] : p.qh[j];
    const TensorView dst = view_at(e.send, pos[j], {p.b, p.len[p.me], h.size(), t.size(3)});
    copy_view(dst, t.slice(2, h.begin, h.size()), s);
    pos[j] += elems(dst);
  }
}
void pack_local_lse(const UPlan& p, const TensorView& lse, UEx& e, std::vector<size_t>& pos,
                    Stream s) {
  for (int j = 0; j < p.u; ++j) {
    const TensorView dst = view_at(e.send, pos[j], {p.b, p.qh[j].size(), p.len[p.me]});
    copy_view(dst, lse.slice(1, p.qh[j].begin, p.qh[j].size()), s);
    pos[j] += elems(dst);
  }
}
// Received parts (peer rows, my heads) -> gathered [B, sg, h, dim].
void unpack_gathered(const UPlan& p, const UEx& e, std::vector<size_t>& pos, const TensorView& g,
                     Stream s) {
  for (int j = 0; j < p.u; ++j) {
    const TensorView src = view_at(e.recv, pos[j], {p.b, p.len[j], g.size(2), g.size(3)});
    copy_view(g.slice(1, p.off[j], p.len[j]), src, s);
    pos[j] += elems(src);
  }
}
void unpack_gathered_lse(const UPlan& p, const UEx& e, std::vector<size_t>& pos,
                         const TensorView& lg, Stream s) {
  for (int j = 0; j < p.u; ++j) {
    const TensorView src = view_at(e.recv, pos[j], {p.b, lg.size(1), p.len[j]});
    copy_view(lg.slice(2, p.off[j], p.len[j]), src, s);
    pos[j] += elems(src);
  }
}
// Gathered [B, sg, h, dim] -> send parts (peer rows, my heads).
void pack_gathered(const UPlan& p, const TensorView& g, UEx& e, std::vector<size_t>& pos,
                   Stream s) {
  for (int j = 0; j < p.u; ++j) {
    const TensorView dst = view_at(e.send, pos[j], {p.b, p.len[j], g.size(2), g.size(3)});
    copy_view(dst, g.slice(1, p.off[j], p.len[j]), s);
    pos[j] += elems(dst);
  }
}
void pack_gathered_lse(const UPlan& p, const TensorView& lg, UEx& e, std::vector<size_t>& pos,
                       Stream s) {
  for (int j = 0; j < p.u; ++j) {
    const TensorView dst = view_at(e.send, pos[j], {p.b, lg.size(1), p.len[j]});
    copy_view(dst, lg.slice(2, p.off[j], p.len[j]), s);
    pos[j] += elems(dst);
  }
}

}  // namespace

void ulysses_forward_pieces(comm::Communicator& uc, comm::Communicator* ring,
                            const std::vector<std::vector<Runs>>& group_maps, const TensorView& q,
                            const TensorView& k, const TensorView& v, const TensorView& out,
                            const TensorView& lse, const TensorView& sinks_all, Tracker& tr) {
  const int my_group = ring != nullptr ? ring->rank() : 0;
  const UPlan p = make_uplan(uc, group_maps[my_group], q, k, v);
  const Device dev = q.device;
  const Stream cs = tr.stream();
  const HeadRange mq = p.qh[p.me], mk = p.kh[p.me];
  const TensorView my_sinks =
      sinks_all.data != nullptr ? sinks_all.slice(0, mq.begin, mq.size()) : TensorView();
  std::vector<Tensor> keep;
  TensorView qg = q, kg = k, vg = v;
  if (p.u > 1) {
    UEx x = make_uex(p, q.dtype, dev, {{false, p.d}, {true, p.d}, {true, p.dv}}, true);
    std::vector<size_t> pos = x.sd;
    pack_local(p, q, false, x, pos, cs);
    pack_local(p, k, true, x, pos, cs);
    pack_local(p, v, true, x, pos, cs);
    tr.comm_after_compute();
    comm::Handle h = post(uc, x, tr);
    tr.wait(h);
    keep.push_back(Tensor::empty({p.b, p.sg, mq.size(), p.d}, q.dtype, dev));
    keep.push_back(Tensor::empty({p.b, p.sg, mk.size(), p.d}, k.dtype, dev));
    keep.push_back(Tensor::empty({p.b, p.sg, mk.size(), p.dv}, v.dtype, dev));
    qg = keep[0].view();
    kg = keep[1].view();
    vg = keep[2].view();
    pos = x.rd;
    unpack_gathered(p, x, pos, qg, cs);
    unpack_gathered(p, x, pos, kg, cs);
    unpack_gathered(p, x, pos, vg, cs);
  }
  const auto segs = head_segments(mq.begin, mq.end, mk.begin, p.group);
  Tensor og = Tensor::empty({p.b, p.sg, mq.size(), p.dv}, DType::kFloat32, dev);
  Tensor lg_t;
  TensorView lg = lse;
  if (p.u > 1) {
    lg_t = Tensor::empty({p.b, mq.size(), p.sg}, DType::kFloat32, dev);
    lg = lg_t.view();
  }
  if (ring != nullptr) {
    std::vector<Runs> ring_maps;
    for (const auto& g : group_maps) ring_maps.push_back(gathered_runs(g));
    ring_forward_pieces(*ring, ring_maps, qg, kg, vg, og.view(), lg, segs, my_sinks, tr);
  } else {
    tr.step();
    const Runs gm = gathered_runs(group_maps[0]);
    init_result(og.view(), lg, cs);
    tr.forward_pieces(qg, kg, vg, og.view(), lg, tr.pieces(gm, gm), segs, /*fresh=*/true);
    if (my_sinks.data != nullptr) ops::attention_apply_sinks(og.view(), lg, my_sinks, cs);
  }
  keep.clear();
  if (p.u == 1) {
    copy_view(out, og.view(), cs);
    return;
  }
  UEx xo = make_uex(p, DType::kFloat32, dev, {{false, p.dv}}, false);
  UEx xl = make_uex(p, DType::kFloat32, dev, {{false, 0}}, false);
  std::vector<size_t> po = xo.sd, pl = xl.sd;
  pack_gathered(p, og.view(), xo, po, cs);
  pack_gathered_lse(p, lg, xl, pl, cs);
  tr.comm_after_compute();
  comm::Handle ho = post(uc, xo, tr);
  comm::Handle hl = post(uc, xl, tr);
  tr.wait(ho);
  tr.wait(hl);
  const int64_t sl = p.len[p.me];
  for (int j = 0; j < p.u; ++j) {
    const HeadRange hj = p.qh[j];
    copy_view(out.slice(2, hj.begin, hj.size()),
              view_at(xo.recv, xo.rd[j], {p.b, sl, hj.size(), p.dv}), cs);
    copy_view(lse.slice(1, hj.begin, hj.size()), view_at(xl.recv, xl.rd[j], {p.b, hj.size(), sl}),
              cs);
  }
}

void ulysses_backward_pieces(comm::Communicator& uc, comm::Communicator* ring,
                             const std::vector<std::vector<Runs>>& group_maps, const TensorView& q,
                             const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& dout, const TensorView& lse, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, Tracker& tr) {
  const int my_group = ring != nullptr ? ring->rank() : 0;
  const UPlan p = make_uplan(uc, group_maps[my_group], q, k, v);
  const Device dev = q.device;
  const Stream cs = tr.stream();
  const HeadRange mq = p.qh[p.me], mk = p.kh[p.me];
  std::vector<Tensor> keep;
  TensorView qg = q, kg = k, vg = v, og = out, dg = dout, lg = lse;
  if (p.u > 1) {
    UEx x = make_uex(p, q.dtype, dev, {{false, p.d}, {true, p.d}, {true, p.dv}}, true);
    UEx xo = make_uex(p, out.dtype, dev, {{false, p.dv}}, true);
    UEx xd = make_uex(p, dout.dtype, dev, {{false, p.dv}}, true);
    UEx xl = make_uex(p, DType::kFloat32, dev, {{false, 0}}, true);
    std::vector<size_t> pos = x.sd, po = xo.sd, pd = xd.sd, pl = xl.sd;
    pack_local(p, q, false, x, pos, cs);
    pack_local(p, k, true, x, pos, cs);
    pack_local(p, v, true, x, pos, cs);
    pack_local(p, out, false, xo, po, cs);
    pack_local(p, dout, false, xd, pd, cs);
    pack_local_lse(p, lse, xl, pl, cs);
    std::vector<comm::Handle> hs;
    tr.comm_after_compute();
    hs.push_back(post(uc, x, tr));
    hs.push_back(post(uc, xo, tr));
    hs.push_back(post(uc, xd, tr));
    hs.push_back(post(uc, xl, tr));
    tr.wait_all(hs);
    keep.push_back(Tensor::empty({p.b, p.sg, mq.size(), p.d}, q.dtype, dev));
    keep.push_back(Tensor::empty({p.b, p.sg, mk.size(), p.d}, k.dtype, dev));
    keep.push_back(Tensor::empty({p.b, p.sg, mk.size(), p.dv}, v.dtype, dev));
    keep.push_back(Tensor::empty({p.b, p.sg, mq.size(), p.dv}, out.dtype, dev));
    keep.push_back(Tensor::empty({p.b, p.sg, mq.size(), p.dv}, dout.dtype, dev));
    keep.push_back(Tensor::empty({p.b, mq.size(), p.sg}, DType::kFloat32, dev));
    qg = keep[0].view();
    kg = keep[1].view();
    vg = keep[2].view();
    og = keep[3].view();
    dg = keep[4].view();
    lg = keep[5].view();
    pos = x.rd;
    po = xo.rd;
    pd = xd.rd;
    pl = xl.rd;
    unpack_gathered(p, x, pos, qg, cs);
    unpack_gathered(p, x, pos, kg, cs);
    unpack_gathered(p, x, pos, vg, cs);
    unpack_gathered(p, xo, po, og, cs);
    unpack_gathered(p, xd, pd, dg, cs);
    unpack_gathered_lse(p, xl, pl, lg, cs);
  }
  const auto segs = head_segments(mq.begin, mq.end, mk.begin, p.group);
  Tensor dqg = zeros_on({p.b, p.sg, mq.size(), p.d}, DType::kFloat32, dev, cs);
  Tensor dkg = zeros_on({p.b, p.sg, mk.size(), p.d}, DType::kFloat32, dev, cs);
  Tensor dvg = zeros_on({p.b, p.sg, mk.size(), p.dv}, DType::kFloat32, dev, cs);
  if (ring != nullptr) {
    std::vector<Runs> ring_maps;
    for (const auto& g : group_maps) ring_maps.push_back(gathered_runs(g));
    ring_backward_pieces(*ring, ring_maps, qg, kg, vg, og, dg, lg, dqg.view(), dkg.view(),
                         dvg.view(), segs, tr);
  } else {
    tr.step();
    const Runs gm = gathered_runs(group_maps[0]);
    tr.backward_pieces(qg, kg, vg, og, dg, lg, dqg.view(), dkg.view(), dvg.view(),
                       tr.pieces(gm, gm), segs);
  }
  keep.clear();
  if (p.u == 1) {
    copy_view(dq, dqg.view(), cs);
    copy_view(dk, dkg.view(), cs);
    copy_view(dv, dvg.view(), cs);
    return;
  }
  UEx xg = make_uex(p, DType::kFloat32, dev, {{false, p.d}, {true, p.d}, {true, p.dv}}, false);
  std::vector<size_t> pos = xg.sd;
  pack_gathered(p, dqg.view(), xg, pos, cs);
  pack_gathered(p, dkg.view(), xg, pos, cs);
  pack_gathered(p, dvg.view(), xg, pos, cs);
  tr.comm_after_compute();
  comm::Handle hg = post(uc, xg, tr);
  tr.wait(hg);
  const int64_t sl = p.len[p.me];
  Tensor dk_acc = zeros_on({p.b, sl, p.hkv, p.d}, DType::kFloat32, dev, cs);
  Tensor dv_acc = zeros_on({p.b, sl, p.hkv, p.dv}, DType::kFloat32, dev, cs);
  for (int j = 0; j < p.u; ++j) {
    const HeadRange hq = p.qh[j], hk = p.kh[j];
    size_t o = xg.rd[j];
    const TensorView gq = view_at(xg.recv, o, {p.b, sl, hq.size(), p.d});
    o += elems(gq);
    const TensorView gk = view_at(xg.recv, o, {p.b, sl, hk.size(), p.d});
    o += elems(gk);
    const TensorView gv = view_at(xg.recv, o, {p.b, sl, hk.size(), p.dv});
    copy_view(dq.slice(2, hq.begin, hq.size()), gq, cs);
    add_view(dk_acc.view().slice(2, hk.begin, hk.size()), gk, cs);
    add_view(dv_acc.view().slice(2, hk.begin, hk.size()), gv, cs);
  }
  copy_view(dk, dk_acc.view(), cs);
  copy_view(dv, dv_acc.view(), cs);
}

}  // namespace distattn::parallel::detail
