// All-gather-KV attention (Llama 3 style context parallelism) in the zigzag layout: rank r
// holds chunks r and 2P-1-r of 2P, so causal work is balanced.
//
// Forward: both all-gathers are posted, the rank's own chunks are attended while they run
// (the same blocks as zigzag step 0), then every other visible key range is attended from
// the gathered K,V (reordered into global order) and merged in fp32. Every key in those
// ranges precedes the query chunk under the causal mask, so they are unmasked calls.
// Backward: the same blocks; dK,dV of the whole sequence are accumulated in fp32 and
// reduce-scattered back to the owners (in zigzag order).
// Memory is O(S) per rank for the gathered K,V: the price of the strategy.
#include <algorithm>

#include "src/parallel/sp_detail.h"

namespace distattn::parallel::detail {

namespace {

struct Range {
  int64_t begin, len;
};

// [0, limit) without the rank's own chunks (which phase 1 covered).
std::vector<Range> rest_ranges(int64_t limit, const Range own[2]) {
  std::vector<Range> out;
  int64_t at = 0;
  Range sorted[2] = {own[0], own[1]};
  if (sorted[1].begin < sorted[0].begin) std::swap(sorted[0], sorted[1]);
  for (const Range& o : sorted) {
    const int64_t end = std::min(o.begin, limit);
    if (end > at) out.push_back({at, end - at});
    at = std::max(at, o.begin + o.len);
  }
  if (limit > at) out.push_back({at, limit - at});
  return out;
}

struct QBlock {
  int64_t q_begin, q_len;
  std::vector<Range> keys;  // global key ranges, all fully visible
};

// The phase-2 work of rank r (P ranks, chunk c).
std::vector<QBlock> phase2(bool causal, int p, int r, int64_t c) {
  const int64_t s = 2 * p * c;
  const Range own[2] = {{r * c, c}, {(2 * p - 1 - r) * c, c}};
  if (!causal) return {{0, 2 * c, rest_ranges(s, own)}};
  return {{0, c, rest_ranges(own[0].begin, own)}, {c, c, rest_ranges(own[1].begin, own)}};
}

struct Block {
  int64_t q_begin, q_len, k_begin, k_len, q_off, k_off;
  bool causal;
};

// Phase 1: the rank's own chunks (as zigzag step 0).
std::vector<Block> phase1(bool causal, int64_t sl) {
  const int64_t c = sl / 2;
  if (!causal) return {{0, sl, 0, sl, 0, 0, false}};
  return {{0, c, 0, c, 0, 0, true}, {c, c, 0, sl, c, 0, true}};
}

TensorView rows(const TensorView& t, int64_t b, int64_t n) {
  return t.slice(1, b, n);
}
TensorView lrows(const TensorView& t, int64_t b, int64_t n) {
  return t.slice(2, b, n);
}

// Gathered [P, B, 2c, H, D] (rank order) -> [B, 2Pc, H, D] (global order).
void to_global(const TensorView& gathered, const TensorView& global, int p, int64_t c,
               Stream stream) {
  for (int j = 0; j < p; ++j) {
    const TensorView slot = gathered.slice(0, j, 1).reshape(
        {gathered.size(1), gathered.size(2), gathered.size(3), gathered.size(4)});
    copy_view(rows(global, j * c, c), rows(slot, 0, c), stream);
    copy_view(rows(global, (2 * p - 1 - j) * c, c), rows(slot, c, c), stream);
  }
}

// Global [B, 2Pc, H, D] -> rank order [P, B, 2c, H, D].
void to_rank_order(const TensorView& global, const TensorView& ranked, int p, int64_t c,
                   Stream stream) {
  for (int j = 0; j < p; ++j) {
    const TensorView slot = ranked.slice(0, j, 1).reshape(
        {ranked.size(1), ranked.size(2), ranked.size(3), ranked.size(4)});
    copy_view(rows(slot, 0, c), rows(global, j * c, c), stream);
    copy_view(rows(slot, c, c), rows(global, (2 * p - 1 - j) * c, c), stream);
  }
}

TensorView packed_or_copy(const TensorView& t, Tensor& holder, Stream stream) {
  if (t.is_contiguous()) return t;
  holder = packed_copy(t, stream);
  return holder.view();
}

// The all-gather of this rank's K,V in flight: kg/vg [p, B, Sl, Hkv, D/Dv] fill as hk/hv
// complete; kp_t/vp_t keep packed copies of strided inputs alive until then.
struct KvGather {
  Tensor kg, vg, kp_t, vp_t;
  comm::Handle hk, hv;
};

void start_kv_gather(comm::Communicator& comm, const TensorView& k, const TensorView& v,
                     Tracker& tr, KvGather& g) {
  const int64_t p = comm.size();
  const TensorView kp = packed_or_copy(k, g.kp_t, tr.stream());
  const TensorView vp = packed_or_copy(v, g.vp_t, tr.stream());
  g.kg = Tensor::empty({p, k.size(0), k.size(1), k.size(2), k.size(3)}, k.dtype, k.device);
  g.vg = Tensor::empty({p, v.size(0), v.size(1), v.size(2), v.size(3)}, v.dtype, v.device);
  // The caller's k, v (and the packing copies) are written on the compute stream.
  tr.comm_after_compute();
  g.hk = comm.iall_gather(kp.data, g.kg.data(), static_cast<size_t>(kp.numel()), k.dtype,
                          tr.comm_stream());
  g.hv = comm.iall_gather(vp.data, g.vg.data(), static_cast<size_t>(vp.numel()), v.dtype,
                          tr.comm_stream());
}

}  // namespace

void allgather_forward(comm::Communicator& comm, const TensorView& q, const TensorView& k,
                       const TensorView& v, const TensorView& out, const TensorView& lse,
                       bool causal, Tracker& tr) {
  const int p = comm.size(), r = comm.rank();
  const Device dev = q.device;
  const int64_t b = q.size(0), sl = q.size(1), hq = q.size(2), hkv = k.size(2), d = k.size(3),
                dv = v.size(3), c = sl / 2, s = sl * p;
  const auto segs = uniform_segments(hq, hkv);
  tr.step();

  Tensor acc_t;
  const TensorView acc = fp32_accumulator(out, acc_t);
  KvGather gather;
  Tensor& kg = gather.kg;
  Tensor& vg = gather.vg;
  comm::Handle& hk = gather.hk;
  comm::Handle& hv = gather.hv;
  if (p > 1) start_kv_gather(comm, k, v, tr, gather);
  for (const Block& bl : phase1(causal, sl))
    tr.forward(rows(q, bl.q_begin, bl.q_len), rows(k, bl.k_begin, bl.k_len),
               rows(v, bl.k_begin, bl.k_len), rows(acc, bl.q_begin, bl.q_len),
               lrows(lse, bl.q_begin, bl.q_len), bl.q_off, bl.k_off, bl.causal, segs);
  if (p > 1) {
    tr.wait(hk);
    tr.wait(hv);
    Tensor kf = Tensor::empty({b, s, hkv, d}, k.dtype, dev);
    Tensor vf = Tensor::empty({b, s, hkv, dv}, v.dtype, dev);
    to_global(kg.view(), kf.view(), p, c, tr.stream());
    to_global(vg.view(), vf.view(), p, c, tr.stream());
    kg = Tensor();
    vg = Tensor();
    Tensor po = Tensor::empty({b, sl, hq, dv}, DType::kFloat32, dev);
    Tensor pl = Tensor::empty({b, hq, sl}, DType::kFloat32, dev);
    for (const QBlock& qb : phase2(causal, p, r, c)) {
      for (const Range& kr : qb.keys) {
        const TensorView o = rows(po.view(), qb.q_begin, qb.q_len);
        const TensorView l = lrows(pl.view(), qb.q_begin, qb.q_len);
        tr.forward(rows(q, qb.q_begin, qb.q_len), rows(kf.view(), kr.begin, kr.len),
                   rows(vf.view(), kr.begin, kr.len), o, l, 0, 0, false, segs);
        tr.merge(rows(acc, qb.q_begin, qb.q_len), lrows(lse, qb.q_begin, qb.q_len), o, l);
      }
    }
  }
  if (acc_t.defined()) copy_view(out, acc, tr.stream());
}

void allgather_backward(comm::Communicator& comm, const TensorView& q, const TensorView& k,
                        const TensorView& v, const TensorView& out, const TensorView& dout,
                        const TensorView& lse, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv_out, bool causal, Tracker& tr) {
  const int p = comm.size(), r = comm.rank();
  const Device dev = q.device;
  const int64_t b = q.size(0), sl = q.size(1), hq = q.size(2), hkv = k.size(2), d = k.size(3),
                dv = v.size(3), c = sl / 2, s = sl * p;
  const auto segs = uniform_segments(hq, hkv);
  tr.step();

  Tensor dq_t;
  const TensorView dq_acc = fp32_accumulator(dq, dq_t);
  zero(dq_acc, tr.stream());
  Tensor dk_own = zeros_on({b, sl, hkv, d}, DType::kFloat32, dev, tr.stream());
  Tensor dv_own = zeros_on({b, sl, hkv, dv}, DType::kFloat32, dev, tr.stream());

  KvGather gather;
  Tensor& kg = gather.kg;
  Tensor& vg = gather.vg;
  comm::Handle& hk = gather.hk;
  comm::Handle& hv = gather.hv;
  if (p > 1) start_kv_gather(comm, k, v, tr, gather);
  for (const Block& bl : phase1(causal, sl))
    tr.backward(rows(q, bl.q_begin, bl.q_len), rows(k, bl.k_begin, bl.k_len),
                rows(v, bl.k_begin, bl.k_len), rows(out, bl.q_begin, bl.q_len),
                rows(dout, bl.q_begin, bl.q_len), lrows(lse, bl.q_begin, bl.q_len),
                rows(dq_acc, bl.q_begin, bl.q_len), rows(dk_own.view(), bl.k_begin, bl.k_len),
                rows(dv_own.view(), bl.k_begin, bl.k_len), bl.q_off, bl.k_off, bl.causal,
                /*accumulate=*/true, segs);
  if (p == 1) {
    copy_view(dk, dk_own.view(), tr.stream());
    copy_view(dv_out, dv_own.view(), tr.stream());
    if (dq_t.defined()) copy_view(dq, dq_acc, tr.stream());
    return;
  }
  tr.wait(hk);
  tr.wait(hv);
  Tensor kf = Tensor::empty({b, s, hkv, d}, k.dtype, dev);
  Tensor vf = Tensor::empty({b, s, hkv, dv}, v.dtype, dev);
  to_global(kg.view(), kf.view(), p, c, tr.stream());
  to_global(vg.view(), vf.view(), p, c, tr.stream());
  kg = Tensor();
  vg = Tensor();
  Tensor dkf = zeros_on({b, s, hkv, d}, DType::kFloat32, dev, tr.stream());
  Tensor dvf = zeros_on({b, s, hkv, dv}, DType::kFloat32, dev, tr.stream());
  for (const QBlock& qb : phase2(causal, p, r, c)) {
    for (const Range& kr : qb.keys) {
      tr.backward(rows(q, qb.q_begin, qb.q_len), rows(kf.view(), kr.begin, kr.len),
                  rows(vf.view(), kr.begin, kr.len), rows(out, qb.q_begin, qb.q_len),
                  rows(dout, qb.q_begin, qb.q_len), lrows(lse, qb.q_begin, qb.q_len),
                  rows(dq_acc, qb.q_begin, qb.q_len), rows(dkf.view(), kr.begin, kr.len),
                  rows(dvf.view(), kr.begin, kr.len), 0, 0, false, /*accumulate=*/true, segs);
    }
  }
  kf = Tensor();
  vf = Tensor();
  // Own contribution into its global place, then reduce-scatter in rank (zigzag) order.
  const Stream cs = tr.stream();
  add_view(rows(dkf.view(), r * c, c), rows(dk_own.view(), 0, c), cs);
  add_view(rows(dkf.view(), (2 * p - 1 - r) * c, c), rows(dk_own.view(), c, c), cs);
  add_view(rows(dvf.view(), r * c, c), rows(dv_own.view(), 0, c), cs);
  add_view(rows(dvf.view(), (2 * p - 1 - r) * c, c), rows(dv_own.view(), c, c), cs);
  Tensor rk = Tensor::empty({p, b, sl, hkv, d}, DType::kFloat32, dev);
  Tensor rv = Tensor::empty({p, b, sl, hkv, dv}, DType::kFloat32, dev);
  to_rank_order(dkf.view(), rk.view(), p, c, cs);
  to_rank_order(dvf.view(), rv.view(), p, c, cs);
  dkf = Tensor();
  dvf = Tensor();
  // dk_own/dv_own are free now (the adds above, on the compute stream, were their last
  // readers): receive the reduced blocks into them. rk/rv were filled on the compute stream.
  tr.comm_after_compute();
  comm::Handle rsk =
      comm.ireduce_scatter(rk.data(), dk_own.data(), static_cast<size_t>(b * sl * hkv * d),
                           DType::kFloat32, comm::ReduceOp::kSum, tr.comm_stream());
  comm::Handle rsv =
      comm.ireduce_scatter(rv.data(), dv_own.data(), static_cast<size_t>(b * sl * hkv * dv),
                           DType::kFloat32, comm::ReduceOp::kSum, tr.comm_stream());
  tr.wait(rsk);
  tr.wait(rsv);
  copy_view(dk, dk_own.view(), cs);
  copy_view(dv_out, dv_own.view(), cs);
  if (dq_t.defined()) copy_view(dq, dq_acc, cs);
}

}  // namespace distattn::parallel::detail
