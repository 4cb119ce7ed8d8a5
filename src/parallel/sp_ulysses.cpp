// Ulysses (DeepSpeed) attention and the 2-D hybrid (Ulysses x zigzag ring), forward and
// backward.
//
// Ulysses over U ranks: one all-to-all turns every rank's (S/U tokens, all heads) into
// (S tokens, its heads), attention runs locally, and all-to-all brings (out, lse) back.
// Heads are split as evenly as possible (all_to_all_v when Hq % U != 0). A rank receives the
// KV heads its query heads use, so under GQA with Hkv < U a KV head is sent to every rank
// that needs it (replicated, never refused); in the backward pass the dK,dV contributions of
// a replicated head are summed by its owner (fp32).
//
// Hybrid (ring degree R x Ulysses degree U): the Ulysses all-to-all gathers, for this rank's
// heads, the tokens of its whole Ulysses group, which are exactly the ring rank's two zigzag
// chunks (each Ulysses rank holds the same sub-chunk of both chunks: "pieces"). The local
// attention is then a zigzag ring over the ring communicator.
#include "src/parallel/sp_detail.h"

namespace distattn::parallel::detail {

namespace {

struct Plan {
  int u_deg = 1, me = 0;
  int64_t b = 0, sl = 0, hq = 0, hkv = 0, d = 0, dv = 0, group = 1;
  int pieces = 1;
  int64_t pl = 0;  // tokens per piece
  int64_t sg = 0;  // tokens after the all-to-all
  std::vector<HeadRange> qh, kh;

  // Rows of peer j's piece `p` inside a gathered [.., sg, ..] tensor (seq dim `dim`).
  TensorView peer_piece(const TensorView& t, int dim, int j, int p) const {
    return t.slice(dim, p * (u_deg * pl) + j * pl, pl);
  }
};

Plan make_plan(comm::Communicator& uc, bool hybrid, const TensorView& q, const TensorView& k,
               const TensorView& v) {
  Plan pl;
  pl.u_deg = uc.size();
  pl.me = uc.rank();
  pl.b = q.size(0);
  pl.sl = q.size(1);
  pl.hq = q.size(2);
  pl.d = q.size(3);
  pl.hkv = k.size(2);
  pl.dv = v.size(3);
  pl.group = pl.hq / pl.hkv;
  pl.pieces = hybrid ? 2 : 1;
  pl.pl = pl.sl / pl.pieces;
  pl.sg = pl.sl * pl.u_deg;
  for (int j = 0; j < pl.u_deg; ++j) {
    const HeadRange h = split_heads(pl.hq, pl.u_deg, j);
    pl.qh.push_back(h);
    pl.kh.push_back(kv_heads_of(h, pl.group));
  }
  return pl;
}

// One all-to-all of "part" tensors: part i of the block for peer j is a packed
// [B, rows, heads_i(j), dim_i] tensor. The send side takes peer j's heads of a local
// (sequence-sharded) tensor; the receive side gets my heads of peer j's tokens.
struct Exchange {
  std::vector<size_t> sc, sd, rc, rd;
  Tensor send, recv;
};

// Bytes (elements) per peer of parts with per-peer head counts.
Exchange make_exchange(const Plan& p, DType dtype, Device dev,
                       const std::vector<std::vector<int64_t>>& send_elems,
                       const std::vector<std::vector<int64_t>>& recv_elems) {
  Exchange e;
  size_t s = 0, r = 0;
  for (int j = 0; j < p.u_deg; ++j) {
    size_t cs = 0, cr = 0;
    for (int64_t x : send_elems[j]) cs += static_cast<size_t>(x);
    for (int64_t x : recv_elems[j]) cr += static_cast<size_t>(x);
    e.sd.push_back(s);
    e.sc.push_back(cs);
    e.rd.push_back(r);
    e.rc.push_back(cr);
    s += cs;
    r += cr;
  }
  e.send = Tensor::empty({static_cast<int64_t>(s)}, dtype, dev);
  e.recv = Tensor::empty({static_cast<int64_t>(r)}, dtype, dev);
  return e;
}

// Posts the exchange on the comm stream. The caller calls tr.comm_after_compute() first
// (the send buffer is packed on the compute stream).
comm::Handle start(comm::Communicator& uc, Exchange& e, Tracker& tr) {
  return uc.iall_to_all_v(e.send.data(), e.sc, e.sd, e.recv.data(), e.rc, e.rd, e.send.dtype(),
                          tr.comm_stream());
}

// A local BSHD tensor (tokens: my sl rows) -> send parts of heads `hr(j)` for every peer.
// Returns each peer's offset after the part.
void pack_seq_sharded(const Plan& p, const TensorView& local, const std::vector<HeadRange>& hr,
                      Exchange& e, std::vector<size_t>& at, Stream stream) {
  const int64_t dim = local.size(3);
  for (int j = 0; j < p.u_deg; ++j) {
    const TensorView dst = view_at(e.send, at[j], {p.b, p.sl, hr[j].size(), dim});
    copy_view(dst, local.slice(2, hr[j].begin, hr[j].size()), stream);
    at[j] += static_cast<size_t>(dst.numel());
  }
}

// Received parts (peer j's tokens x my heads) -> gathered [B, sg, h, dim].
void unpack_to_gathered(const Plan& p, const Exchange& e, std::vector<size_t>& at, int64_t heads,
                        const TensorView& gathered, Stream stream) {
  const int64_t dim = gathered.size(3);
  for (int j = 0; j < p.u_deg; ++j) {
    const TensorView src = view_at(e.recv, at[j], {p.b, p.sl, heads, dim});
    for (int q = 0; q < p.pieces; ++q)
      copy_view(p.peer_piece(gathered, 1, j, q), src.slice(1, q * p.pl, p.pl), stream);
    at[j] += static_cast<size_t>(src.numel());
  }
}

// lse [B, H, sl] local -> send parts [B, h_j, sl].
void pack_lse_seq_sharded(const Plan& p, const TensorView& lse, Exchange& e,
                          std::vector<size_t>& at, Stream stream) {
  for (int j = 0; j < p.u_deg; ++j) {
    const TensorView dst = view_at(e.send, at[j], {p.b, p.qh[j].size(), p.sl});
    copy_view(dst, lse.slice(1, p.qh[j].begin, p.qh[j].size()), stream);
    at[j] += static_cast<size_t>(dst.numel());
  }
}
void unpack_lse_to_gathered(const Plan& p, const Exchange& e, std::vector<size_t>& at,
                            const TensorView& lse_g, Stream stream) {
  const int64_t h = p.qh[p.me].size();
  for (int j = 0; j < p.u_deg; ++j) {
    const TensorView src = view_at(e.recv, at[j], {p.b, h, p.sl});
    for (int q = 0; q < p.pieces; ++q)
      copy_view(p.peer_piece(lse_g, 2, j, q), src.slice(2, q * p.pl, p.pl), stream);
    at[j] += static_cast<size_t>(src.numel());
  }
}

// Gathered [B, sg, h, dim] -> send parts (peer j's tokens, my heads).
void pack_gathered(const Plan& p, const TensorView& gathered, Exchange& e, std::vector<size_t>& at,
                   Stream stream) {
  const int64_t h = gathered.size(2), dim = gathered.size(3);
  for (int j = 0; j < p.u_deg; ++j) {
    const TensorView dst = view_at(e.send, at[j], {p.b, p.sl, h, dim});
    for (int q = 0; q < p.pieces; ++q)
      copy_view(dst.slice(1, q * p.pl, p.pl), p.peer_piece(gathered, 1, j, q), stream);
    at[j] += static_cast<size_t>(dst.numel());
  }
}
void pack_lse_gathered(const Plan& p, const TensorView& lse_g, Exchange& e, std::vector<size_t>& at,
                       Stream stream) {
  const int64_t h = lse_g.size(1);
  for (int j = 0; j < p.u_deg; ++j) {
    const TensorView dst = view_at(e.send, at[j], {p.b, h, p.sl});
    for (int q = 0; q < p.pieces; ++q)
      copy_view(dst.slice(2, q * p.pl, p.pl), p.peer_piece(lse_g, 2, j, q), stream);
    at[j] += static_cast<size_t>(dst.numel());
  }
}

std::vector<std::vector<int64_t>> parts(const Plan& p, bool mine_heads,
                                        std::initializer_list<std::pair<bool, int64_t>> items) {
  // items: (kv heads?, dim) per part; counts per peer (B * sl * heads * dim).
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(p.u_deg));
  for (int j = 0; j < p.u_deg; ++j) {
    const int who = mine_heads ? p.me : j;
    for (const auto& [kv, dim] : items) {
      const int64_t h = kv ? p.kh[who].size() : p.qh[who].size();
      out[j].push_back(p.b * p.sl * h * dim);
    }
  }
  return out;
}

}  // namespace

void ulysses_forward(comm::Communicator& uc, comm::Communicator* ring, const TensorView& q,
                     const TensorView& k, const TensorView& v, const TensorView& out,
                     const TensorView& lse, bool causal, Tracker& tr) {
  const Plan p = make_plan(uc, ring != nullptr, q, k, v);
  const Device dev = q.device;
  const Stream cs = tr.stream();  // compute stream: packing, unpacking, kernels
  if (p.u_deg == 1) {             // nothing to exchange
    const auto segs = uniform_segments(p.hq, p.hkv);
    if (ring != nullptr) {
      ring_forward(*ring, /*zigzag=*/true, q, k, v, out, lse, causal, segs, tr);
    } else {
      tr.step();
      tr.forward(q, k, v, out, lse, 0, 0, causal, segs);
    }
    return;
  }
  const HeadRange mq = p.qh[p.me], mk = p.kh[p.me];
  // (S/U, all heads) -> (S, my heads): q, k, v in one exchange.
  Exchange x =
      make_exchange(p, q.dtype, dev, parts(p, false, {{false, p.d}, {true, p.d}, {true, p.dv}}),
                    parts(p, true, {{false, p.d}, {true, p.d}, {true, p.dv}}));
  {
    std::vector<size_t> at = x.sd;
    pack_seq_sharded(p, q, p.qh, x, at, cs);
    pack_seq_sharded(p, k, p.kh, x, at, cs);
    pack_seq_sharded(p, v, p.kh, x, at, cs);
  }
  tr.comm_after_compute();
  comm::Handle h = start(uc, x, tr);
  tr.wait(h);
  Tensor qg = Tensor::empty({p.b, p.sg, mq.size(), p.d}, q.dtype, dev);
  Tensor kg = Tensor::empty({p.b, p.sg, mk.size(), p.d}, k.dtype, dev);
  Tensor vg = Tensor::empty({p.b, p.sg, mk.size(), p.dv}, v.dtype, dev);
  {
    std::vector<size_t> at = x.rd;
    unpack_to_gathered(p, x, at, mq.size(), qg.view(), cs);
    unpack_to_gathered(p, x, at, mk.size(), kg.view(), cs);
    unpack_to_gathered(p, x, at, mk.size(), vg.view(), cs);
  }
  x = Exchange();
  const auto segs = head_segments(mq.begin, mq.end, mk.begin, p.group);
  Tensor og = Tensor::empty({p.b, p.sg, mq.size(), p.dv}, out.dtype, dev);
  Tensor lg = Tensor::empty({p.b, mq.size(), p.sg}, DType::kFloat32, dev);
  if (ring != nullptr) {
    ring_forward(*ring, /*zigzag=*/true, qg.view(), kg.view(), vg.view(), og.view(), lg.view(),
                 causal, segs, tr);
  } else {
    tr.step();
    tr.forward(qg.view(), kg.view(), vg.view(), og.view(), lg.view(), 0, 0, causal, segs);
  }
  qg = kg = vg = Tensor();
  // (S, my heads) -> (S/U, all heads): out and lse.
  Exchange xo = make_exchange(p, out.dtype, dev, parts(p, true, {{false, p.dv}}),
                              parts(p, false, {{false, p.dv}}));
  std::vector<std::vector<int64_t>> ls(static_cast<size_t>(p.u_deg)), lr = ls;
  for (int j = 0; j < p.u_deg; ++j) {
    ls[j] = {p.b * mq.size() * p.sl};
    lr[j] = {p.b * p.qh[j].size() * p.sl};
  }
  Exchange xl = make_exchange(p, DType::kFloat32, dev, ls, lr);
  {
    std::vector<size_t> at = xo.sd;
    pack_gathered(p, og.view(), xo, at, cs);
    std::vector<size_t> al = xl.sd;
    pack_lse_gathered(p, lg.view(), xl, al, cs);
  }
  tr.comm_after_compute();
  comm::Handle ho = start(uc, xo, tr);
  comm::Handle hl = start(uc, xl, tr);
  tr.wait(ho);
  tr.wait(hl);
  for (int j = 0; j < p.u_deg; ++j) {
    const HeadRange hj = p.qh[j];
    copy_view(out.slice(2, hj.begin, hj.size()),
              view_at(xo.recv, xo.rd[j], {p.b, p.sl, hj.size(), p.dv}), cs);
    copy_view(lse.slice(1, hj.begin, hj.size()), view_at(xl.recv, xl.rd[j], {p.b, hj.size(), p.sl}),
              cs);
  }
}

void ulysses_backward(comm::Communicator& uc, comm::Communicator* ring, const TensorView& q,
                      const TensorView& k, const TensorView& v, const TensorView& out,
                      const TensorView& dout, const TensorView& lse, const TensorView& dq,
                      const TensorView& dk, const TensorView& dv, bool causal, Tracker& tr) {
  const Plan p = make_plan(uc, ring != nullptr, q, k, v);
  const Device dev = q.device;
  const Stream cs = tr.stream();  // compute stream: packing, unpacking, kernels
  if (p.u_deg == 1) {
    const auto segs = uniform_segments(p.hq, p.hkv);
    if (ring != nullptr) {
      ring_backward(*ring, /*zigzag=*/true, q, k, v, out, dout, lse, dq, dk, dv, causal, segs, tr);
    } else {
      tr.step();
      tr.backward(q, k, v, out, dout, lse, dq, dk, dv, 0, 0, causal, false, segs);
    }
    return;
  }
  const HeadRange mq = p.qh[p.me], mk = p.kh[p.me];
  Exchange x =
      make_exchange(p, q.dtype, dev, parts(p, false, {{false, p.d}, {true, p.d}, {true, p.dv}}),
                    parts(p, true, {{false, p.d}, {true, p.d}, {true, p.dv}}));
  Exchange xo = make_exchange(p, out.dtype, dev, parts(p, false, {{false, p.dv}}),
                              parts(p, true, {{false, p.dv}}));
  Exchange xd = make_exchange(p, dout.dtype, dev, parts(p, false, {{false, p.dv}}),
                              parts(p, true, {{false, p.dv}}));
  std::vector<std::vector<int64_t>> ls(static_cast<size_t>(p.u_deg)), lr = ls;
  for (int j = 0; j < p.u_deg; ++j) {
    ls[j] = {p.b * p.qh[j].size() * p.sl};
    lr[j] = {p.b * mq.size() * p.sl};
  }
  Exchange xl = make_exchange(p, DType::kFloat32, dev, ls, lr);
  {
    std::vector<size_t> at = x.sd;
    pack_seq_sharded(p, q, p.qh, x, at, cs);
    pack_seq_sharded(p, k, p.kh, x, at, cs);
    pack_seq_sharded(p, v, p.kh, x, at, cs);
    std::vector<size_t> ao = xo.sd, ad = xd.sd, al = xl.sd;
    pack_seq_sharded(p, out, p.qh, xo, ao, cs);
    pack_seq_sharded(p, dout, p.qh, xd, ad, cs);
    pack_lse_seq_sharded(p, lse, xl, al, cs);
  }
  std::vector<comm::Handle> hs;
  tr.comm_after_compute();
  hs.push_back(start(uc, x, tr));
  hs.push_back(start(uc, xo, tr));
  hs.push_back(start(uc, xd, tr));
  hs.push_back(start(uc, xl, tr));
  tr.wait_all(hs);
  Tensor qg = Tensor::empty({p.b, p.sg, mq.size(), p.d}, q.dtype, dev);
  Tensor kg = Tensor::empty({p.b, p.sg, mk.size(), p.d}, k.dtype, dev);
  Tensor vg = Tensor::empty({p.b, p.sg, mk.size(), p.dv}, v.dtype, dev);
  Tensor og = Tensor::empty({p.b, p.sg, mq.size(), p.dv}, out.dtype, dev);
  Tensor dg = Tensor::empty({p.b, p.sg, mq.size(), p.dv}, dout.dtype, dev);
  Tensor lg = Tensor::empty({p.b, mq.size(), p.sg}, DType::kFloat32, dev);
  {
    std::vector<size_t> at = x.rd, ao = xo.rd, ad = xd.rd, al = xl.rd;
    unpack_to_gathered(p, x, at, mq.size(), qg.view(), cs);
    unpack_to_gathered(p, x, at, mk.size(), kg.view(), cs);
    unpack_to_gathered(p, x, at, mk.size(), vg.view(), cs);
    unpack_to_gathered(p, xo, ao, mq.size(), og.view(), cs);
    unpack_to_gathered(p, xd, ad, mq.size(), dg.view(), cs);
    unpack_lse_to_gathered(p, xl, al, lg.view(), cs);
  }
  x = xo = xd = xl = Exchange();
  const auto segs = head_segments(mq.begin, mq.end, mk.begin, p.group);
  Tensor dqg = Tensor::empty({p.b, p.sg, mq.size(), p.d}, DType::kFloat32, dev);
  Tensor dkg = Tensor::empty({p.b, p.sg, mk.size(), p.d}, DType::kFloat32, dev);
  Tensor dvg = Tensor::empty({p.b, p.sg, mk.size(), p.dv}, DType::kFloat32, dev);
  if (ring != nullptr) {
    ring_backward(*ring, /*zigzag=*/true, qg.view(), kg.view(), vg.view(), og.view(), dg.view(),
                  lg.view(), dqg.view(), dkg.view(), dvg.view(), causal, segs, tr);
  } else {
    tr.step();
    tr.backward(qg.view(), kg.view(), vg.view(), og.view(), dg.view(), lg.view(), dqg.view(),
                dkg.view(), dvg.view(), 0, 0, causal, /*accumulate=*/false, segs);
  }
  qg = kg = vg = og = dg = lg = Tensor();
  // (S, my heads) -> (S/U, all heads), fp32: dq, and dK,dV contributions to be summed.
  Exchange xg = make_exchange(p, DType::kFloat32, dev,
                              parts(p, true, {{false, p.d}, {true, p.d}, {true, p.dv}}),
                              parts(p, false, {{false, p.d}, {true, p.d}, {true, p.dv}}));
  {
    std::vector<size_t> at = xg.sd;
    pack_gathered(p, dqg.view(), xg, at, cs);
    pack_gathered(p, dkg.view(), xg, at, cs);
    pack_gathered(p, dvg.view(), xg, at, cs);
  }
  dqg = dkg = dvg = Tensor();
  tr.comm_after_compute();
  comm::Handle hg = start(uc, xg, tr);
  tr.wait(hg);
  Tensor dk_acc = zeros_on({p.b, p.sl, p.hkv, p.d}, DType::kFloat32, dev, cs);
  Tensor dv_acc = zeros_on({p.b, p.sl, p.hkv, p.dv}, DType::kFloat32, dev, cs);
  for (int j = 0; j < p.u_deg; ++j) {
    const HeadRange hq = p.qh[j], hk = p.kh[j];
    size_t at = xg.rd[j];
    const TensorView gq = view_at(xg.recv, at, {p.b, p.sl, hq.size(), p.d});
    at += static_cast<size_t>(gq.numel());
    const TensorView gk = view_at(xg.recv, at, {p.b, p.sl, hk.size(), p.d});
    at += static_cast<size_t>(gk.numel());
    const TensorView gv = view_at(xg.recv, at, {p.b, p.sl, hk.size(), p.dv});
    copy_view(dq.slice(2, hq.begin, hq.size()), gq, cs);
    add_view(dk_acc.view().slice(2, hk.begin, hk.size()), gk, cs);
    add_view(dv_acc.view().slice(2, hk.begin, hk.size()), gv, cs);
  }
  copy_view(dk, dk_acc.view(), cs);
  copy_view(dv, dv_acc.view(), cs);
}

}  // namespace distattn::parallel::detail
