// Public entry points of sequence-parallel attention: validation (before any kernel or
// collective), dispatch to the strategy bodies, and the head-parallel strategy.
#include <limits>

#include "distattn/ops/attention.h"
#include "distattn/ops/elementwise.h"
#include "distattn/parallel/sequence_parallel.h"
#include "src/parallel/sp_detail.h"

namespace distattn::parallel {

namespace {

struct Dims {
  int64_t b = 0, sl = 0, hq = 0, hkv = 0, d = 0, dv = 0;
};

bool storage_float(DType t) {
  return t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat16;
}

void check_tensor(const char* op, const char* name, const TensorView& t, int ndim,
                  const Device& dev) {
  DISTATTN_CHECK(t.ndim == ndim, op, ": ", name, " ", t.str(), " must have ", ndim, " dims");
  DISTATTN_CHECK(t.device == dev, op, ": ", name, " is on ", t.device.str(), " but q is on ",
                 dev.str(), "; all tensors of one call must share a device");
  DISTATTN_CHECK(t.numel() == 0 || t.data != nullptr, op, ": ", name, " has no data");
  DISTATTN_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name, " ", t.str(),
                 " must be contiguous in its last dim");
}

void check_shape4(const char* op, const char* name, const TensorView& t, int64_t b, int64_t s,
                  int64_t h, int64_t d) {
  DISTATTN_CHECK(t.size(0) == b && t.size(1) == s && t.size(2) == h && t.size(3) == d, op, ": ",
                 name, " has shape ", t.shape_str(), " but must be [", b, ", ", s, ", ", h, ", ", d,
                 "]");
}

void check_result_dtype(const char* op, const char* name, const TensorView& t, DType qt) {
  DISTATTN_CHECK(t.dtype == qt || t.dtype == DType::kFloat32, op, ": ", name, " is ",
                 dtype_name(t.dtype), " but must be q's dtype (", dtype_name(qt), ") or fp32");
}

Dims validate_common(const char* op, Strategy s, const SpGroup& g, const TensorView& q,
                     const TensorView& k, const TensorView& v, const TensorView& out,
                     const TensorView& lse, const SpOptions& opts) {
  const char* name = strategy_name(s);
  DISTATTN_CHECK(g.seq != nullptr, op, "(", name,
                 "): the SpGroup has no communicator (use "
                 "SpGroup::flat(comm) or SpGroup::from_mesh(mesh))");
  DISTATTN_CHECK(s != Strategy::kHybrid || g.ulysses != nullptr, op,
                 "(hybrid): the SpGroup has no Ulysses communicator; build it with "
                 "SpGroup::from_mesh over a mesh with 'ring' and 'ulysses' axes");
  const Device dev = q.device;
  check_tensor(op, "q", q, 4, dev);
  check_tensor(op, "k", k, 4, dev);
  check_tensor(op, "v", v, 4, dev);
  check_tensor(op, "out", out, 4, dev);
  check_tensor(op, "lse", lse, 3, dev);
  for (comm::Communicator* c : {g.seq, g.ulysses}) {
    if (c == nullptr) continue;
    DISTATTN_CHECK(dev.is_cpu() ? c->accepts_host_memory() : c->accepts_device_memory(), op, "(",
                   name, "): the ", comm::backend_name(c->backend()),
                   " communicator does not accept ", dev.str(),
                   " memory; create it for this device (comm::create_world(kAuto, device))");
  }
  DISTATTN_CHECK(storage_float(q.dtype), op, ": q is ", dtype_name(q.dtype),
                 "; use fp32, bf16 or fp16");
  DISTATTN_CHECK(k.dtype == q.dtype && v.dtype == q.dtype, op, ": q, k, v must share a dtype (q ",
                 dtype_name(q.dtype), ", k ", dtype_name(k.dtype), ", v ", dtype_name(v.dtype),
                 ")");
  check_result_dtype(op, "out", out, q.dtype);
  DISTATTN_CHECK(lse.dtype == DType::kFloat32, op, ": lse must be fp32, got ",
                 dtype_name(lse.dtype));
  Dims d;
  d.b = q.size(0);
  d.sl = q.size(1);
  d.hq = q.size(2);
  d.d = q.size(3);
  d.hkv = k.size(2);
  d.dv = v.size(3);
  DISTATTN_CHECK(d.b > 0 && d.sl > 0 && d.hq > 0 && d.d > 0 && d.hkv > 0 && d.dv > 0, op,
                 ": empty tensors (q ", q.shape_str(), ", k ", k.shape_str(), ", v ", v.shape_str(),
                 ")");
  check_shape4(op, "k", k, d.b, d.sl, d.hkv, d.d);
  check_shape4(op, "v", v, d.b, d.sl, d.hkv, d.dv);
  check_shape4(op, "out", out, d.b, d.sl, d.hq, d.dv);
  DISTATTN_CHECK(lse.size(0) == d.b && lse.size(1) == d.hq && lse.size(2) == d.sl, op,
                 ": lse has shape ", lse.shape_str(), " but must be [", d.b, ", ", d.hq, ", ", d.sl,
                 "]");

  const int p = g.seq->size();
  switch (s) {
    case Strategy::kHeads: {
      DISTATTN_CHECK(opts.heads_q > 0 && opts.heads_kv > 0, op,
                     "(heads): set SpOptions::heads_q and heads_kv to the GLOBAL head counts "
                     "(the local tensors hold this rank's subset)");
      SpShape sh;
      sh.seq = d.sl;
      sh.heads_q = opts.heads_q;
      sh.heads_kv = opts.heads_kv;
      sh.head_dim = d.d;
      const SpLayout l{s, p, 1};
      check_layout(l, sh);
      const HeadRange qr = local_query_heads(l, sh, g.seq->rank());
      const HeadRange kr = local_kv_heads(l, sh, g.seq->rank());
      DISTATTN_CHECK(d.hq == qr.size() && d.hkv == kr.size(), op, "(heads): rank ", g.seq->rank(),
                     " of ", p, " must hold query heads [", qr.begin, ", ", qr.end,
                     ") and KV heads [", kr.begin, ", ", kr.end, ") of ", opts.heads_q, "/",
                     opts.heads_kv, " (", qr.size(), " and ", kr.size(), " heads), got ", d.hq,
                     " and ", d.hkv, " (use parallel::shard)");
      break;
    }
    case Strategy::kRing:
      break;
    case Strategy::kZigzag:
    case Strategy::kAllGather:
    case Strategy::kHybrid:
      // Packed documents: chunks of each document, no even-length requirement.
      DISTATTN_CHECK(!opts.cu_seqlens.empty() || d.sl % 2 == 0, op, "(", name,
                     "): each rank holds two chunks, so the local "
                     "sequence length must be even (global length a multiple of 2*ranks), got ",
                     d.sl);
      break;
    case Strategy::kUlysses:
      break;
  }
  if (s != Strategy::kHeads) {
    DISTATTN_CHECK(d.hq % d.hkv == 0, op, ": query heads (", d.hq,
                   ") must be a multiple of KV heads (", d.hkv, ")");
  }
  if (s == Strategy::kUlysses || s == Strategy::kHybrid) {
    const int u = s == Strategy::kUlysses ? p : g.ulysses->size();
    DISTATTN_CHECK(d.hq >= u, op, "(", name, "): Ulysses over ", u,
                   " ranks needs at least one query head per rank, got ", d.hq,
                   " query heads (lower the Ulysses degree)");
  }
  return d;
}

std::vector<detail::HeadSegment> heads_segments(const SpGroup& g, const SpOptions& opts) {
  SpShape sh;
  sh.heads_q = opts.heads_q;
  sh.heads_kv = opts.heads_kv;
  const SpLayout l{Strategy::kHeads, g.seq->size(), 1};
  const HeadRange qr = local_query_heads(l, sh, g.seq->rank());
  const HeadRange kr = local_kv_heads(l, sh, g.seq->rank());
  return detail::head_segments(qr.begin, qr.end, kr.begin, opts.heads_q / opts.heads_kv);
}

// ---- the generic (piece) path: documents, windows, sink tokens, learned sinks ----

struct PieceSetup {
  SpLayout layout;
  SpShape shape;
  int me = 0;
  HeadRange qh;  // global query heads of the local tensors
};

PieceSetup piece_setup(const char* op, Strategy s, const SpGroup& g, const Dims& d,
                       const SpOptions& o, const Device& dev) {
  PieceSetup ps;
  ps.layout = g.layout(s);
  ps.me = g.layout_rank(s);
  ps.shape.batch = d.b;
  ps.shape.heads_q = s == Strategy::kHeads ? o.heads_q : d.hq;
  ps.shape.heads_kv = s == Strategy::kHeads ? o.heads_kv : d.hkv;
  ps.shape.head_dim = d.d;
  ps.shape.head_dim_v = d.dv;
  if (!o.cu_seqlens.empty()) {
    ps.shape.cu_seqlens.assign(o.cu_seqlens.begin(), o.cu_seqlens.end());
    ps.shape.min_split_chunk = o.min_split_chunk;
    ps.shape.seq = o.cu_seqlens.back();
  } else {
    ps.shape.seq = s == Strategy::kHeads ? d.sl : d.sl * ps.layout.ranks;
  }
  check_layout(ps.layout, ps.shape);
  const int64_t want = local_seq_len(ps.layout, ps.shape, ps.me);
  DISTATTN_CHECK(d.sl == want, op, "(", strategy_name(s), "): layout rank ", ps.me, " must hold ",
                 want, " local rows of the packed sequence (", ps.shape.seq, " tokens), got ", d.sl,
                 " (shard the packed tensors with parallel::shard and the same cu_seqlens)");
  DISTATTN_CHECK(o.sink_tokens >= 0, op, ": sink_tokens must be >= 0, got ", o.sink_tokens);
  constexpr int64_t kMax = int64_t{1} << 60;
  DISTATTN_CHECK(o.window_left <= kMax && o.window_right <= kMax, op,
                 ": window bounds must be at most 2^60 (negative: unlimited)");
  ps.qh = local_query_heads(ps.layout, ps.shape, ps.me);
  if (o.sinks.data != nullptr) {
    DISTATTN_CHECK(o.sinks.ndim == 1 && o.sinks.size(0) == ps.shape.heads_q &&
                       o.sinks.dtype == DType::kFloat32 && o.sinks.device == dev,
                   op, ": sinks must be fp32 [heads_q = ", ps.shape.heads_q, " (global)] on ",
                   dev.str(), ", got ", o.sinks.str());
  }
  return ps;
}

std::vector<detail::Runs> rank_maps(const PieceSetup& ps, int first, int count, int stride) {
  std::vector<detail::Runs> maps;
  for (int j = 0; j < count; ++j)
    maps.push_back(detail::local_runs(ps.layout, ps.shape, first + j * stride));
  return maps;
}

// group_maps[i][j]: Ulysses peer j of ring rank i (hybrid), or [0][j] for plain Ulysses.
std::vector<std::vector<detail::Runs>> group_maps(const PieceSetup& ps, Strategy s,
                                                  const SpGroup& g) {
  std::vector<std::vector<detail::Runs>> out;
  if (s == Strategy::kHybrid) {
    const int u = g.ulysses->size(), r = g.seq->size();
    for (int i = 0; i < r; ++i) out.push_back(rank_maps(ps, i * u, u, 1));
  } else {
    out.push_back(rank_maps(ps, 0, g.seq->size(), 1));
  }
  return out;
}

void forward_generic(Strategy s, const SpGroup& g, const TensorView& q, const TensorView& k,
                     const TensorView& v, const TensorView& out, const TensorView& lse,
                     const SpOptions& opts, const Dims& d, detail::Tracker& tr) {
  const PieceSetup ps = piece_setup("sp_attention_forward", s, g, d, opts, q.device);
  switch (s) {
    case Strategy::kHeads: {
      tr.step();
      const detail::Runs runs = detail::local_runs(ps.layout, ps.shape, ps.me);
      Tensor acc_t;
      const TensorView acc = detail::fp32_accumulator(out, acc_t);
      detail::zero(acc, tr.stream());
      ops::tensor_fill(lse, -std::numeric_limits<double>::infinity(), tr.stream());
      tr.forward_pieces(q, k, v, acc, lse, tr.pieces(runs, runs), heads_segments(g, opts), true);
      if (opts.sinks.data != nullptr)
        ops::attention_apply_sinks(acc, lse, opts.sinks.slice(0, ps.qh.begin, ps.qh.size()),
                                   tr.stream());
      if (acc_t.defined()) detail::copy_view(out, acc, tr.stream());
      break;
    }
    case Strategy::kRing:
    case Strategy::kZigzag:
      detail::ring_forward_pieces(*g.seq, rank_maps(ps, 0, g.seq->size(), 1), q, k, v, out, lse,
                                  detail::uniform_segments(d.hq, d.hkv), opts.sinks, tr);
      break;
    case Strategy::kAllGather:
      detail::allgather_forward_pieces(*g.seq, rank_maps(ps, 0, g.seq->size(), 1), q, k, v, out,
                                       lse, opts.sinks, tr);
      break;
    case Strategy::kUlysses:
      detail::ulysses_forward_pieces(*g.seq, nullptr, group_maps(ps, s, g), q, k, v, out, lse,
                                     opts.sinks, tr);
      break;
    case Strategy::kHybrid:
      detail::ulysses_forward_pieces(*g.ulysses, g.seq, group_maps(ps, s, g), q, k, v, out, lse,
                                     opts.sinks, tr);
      break;
  }
}

void backward_generic(Strategy s, const SpGroup& g, const TensorView& q, const TensorView& k,
                      const TensorView& v, const TensorView& out, const TensorView& dout,
                      const TensorView& lse, const TensorView& dq, const TensorView& dk,
                      const TensorView& dv, const SpOptions& opts, const Dims& d,
                      detail::Tracker& tr) {
  const char* op = "sp_attention_backward";
  const PieceSetup ps = piece_setup(op, s, g, d, opts, q.device);
  const bool sinks = opts.sinks.data != nullptr;
  if (sinks) {
    const TensorView& ds = opts.dsinks;
    DISTATTN_CHECK(ds.data != nullptr && ds.ndim == 1 && ds.size(0) == ps.shape.heads_q &&
                       ds.dtype == DType::kFloat32 && ds.device == q.device && ds.is_contiguous(),
                   op, ": with sinks set, SpOptions::dsinks must be a packed fp32 [heads_q = ",
                   ps.shape.heads_q, " (global)] tensor on ", q.device.str(), ", got ", ds.str());
  }
  switch (s) {
    case Strategy::kHeads: {
      tr.step();
      const detail::Runs runs = detail::local_runs(ps.layout, ps.shape, ps.me);
      Tensor hold[3];
      const TensorView grads[3] = {dq, dk, dv};
      TensorView acc[3];
      for (int i = 0; i < 3; ++i) {
        acc[i] = detail::fp32_accumulator(grads[i], hold[i]);
        detail::zero(acc[i], tr.stream());
      }
      tr.backward_pieces(q, k, v, out, dout, lse, acc[0], acc[1], acc[2], tr.pieces(runs, runs),
                         heads_segments(g, opts));
      for (int i = 0; i < 3; ++i)
        if (hold[i].defined()) detail::copy_view(grads[i], acc[i], tr.stream());
      break;
    }
    case Strategy::kRing:
    case Strategy::kZigzag:
      detail::ring_backward_pieces(*g.seq, rank_maps(ps, 0, g.seq->size(), 1), q, k, v, out, dout,
                                   lse, dq, dk, dv, detail::uniform_segments(d.hq, d.hkv), tr);
      break;
    case Strategy::kAllGather:
      detail::allgather_backward_pieces(*g.seq, rank_maps(ps, 0, g.seq->size(), 1), q, k, v, out,
                                        dout, lse, dq, dk, dv, tr);
      break;
    case Strategy::kUlysses:
      detail::ulysses_backward_pieces(*g.seq, nullptr, group_maps(ps, s, g), q, k, v, out, dout,
                                      lse, dq, dk, dv, tr);
      break;
    case Strategy::kHybrid:
      detail::ulysses_backward_pieces(*g.ulysses, g.seq, group_maps(ps, s, g), q, k, v, out, dout,
                                      lse, dq, dk, dv, tr);
      break;
  }
  if (sinks) {
    // Local rows' share of dsinks (all heads of the local rows; kHeads: the local heads), then
    // summed over the ranks so that every rank holds the complete gradient.
    const TensorView& ds = opts.dsinks;
    if (s == Strategy::kHeads) {
      detail::zero(ds, tr.stream());
      ops::attention_sinks_backward(out, dout, lse, opts.sinks.slice(0, ps.qh.begin, ps.qh.size()),
                                    ds.slice(0, ps.qh.begin, ps.qh.size()), false, tr.stream());
    } else {
      ops::attention_sinks_backward(out, dout, lse, opts.sinks, ds, false, tr.stream());
    }
    tr.blocking([&] {
      for (comm::Communicator* c : {g.seq, s == Strategy::kHybrid ? g.ulysses : nullptr}) {
        if (c == nullptr || c->size() == 1) continue;
        c->all_reduce(ds.data, ds.data, static_cast<size_t>(ds.numel()), DType::kFloat32,
                      comm::ReduceOp::kSum, tr.stream());
      }
    });
  }
}

}  // namespace

void sp_attention_forward(Strategy s, const SpGroup& g, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView& out, const TensorView& lse,
                          const SpOptions& opts) {
  const Dims d = validate_common("sp_attention_forward", s, g, q, k, v, out, lse, opts);
  // The ring axis (g.seq) carries the transfers that overlap compute.
  detail::Tracker tr(opts, g.seq, q.device);
  if (detail::uses_pieces(opts)) {
    forward_generic(s, g, q, k, v, out, lse, opts, d, tr);
    tr.finish();
    return;
  }
  switch (s) {
    case Strategy::kHeads:
      tr.step();
      tr.forward(q, k, v, out, lse, 0, 0, opts.causal, heads_segments(g, opts));
      break;
    case Strategy::kRing:
    case Strategy::kZigzag:
      detail::ring_forward(*g.seq, s == Strategy::kZigzag, q, k, v, out, lse, opts.causal,
                           detail::uniform_segments(d.hq, d.hkv), tr);
      break;
    case Strategy::kAllGather:
      detail::allgather_forward(*g.seq, q, k, v, out, lse, opts.causal, tr);
      break;
    case Strategy::kUlysses:
      detail::ulysses_forward(*g.seq, nullptr, q, k, v, out, lse, opts.causal, tr);
      break;
    case Strategy::kHybrid:
      detail::ulysses_forward(*g.ulysses, g.seq, q, k, v, out, lse, opts.causal, tr);
      break;
  }
  tr.finish();
}

void sp_attention_backward(Strategy s, const SpGroup& g, const TensorView& q, const TensorView& k,
                           const TensorView& v, const TensorView& out, const TensorView& dout,
                           const TensorView& lse, const TensorView& dq, const TensorView& dk,
                           const TensorView& dv, const SpOptions& opts) {
  const char* op = "sp_attention_backward";
  const Dims d = validate_common(op, s, g, q, k, v, out, lse, opts);
  const Device dev = q.device;
  check_tensor(op, "dout", dout, 4, dev);
  check_tensor(op, "dq", dq, 4, dev);
  check_tensor(op, "dk", dk, 4, dev);
  check_tensor(op, "dv", dv, 4, dev);
  check_shape4(op, "dout", dout, d.b, d.sl, d.hq, d.dv);
  check_shape4(op, "dq", dq, d.b, d.sl, d.hq, d.d);
  check_shape4(op, "dk", dk, d.b, d.sl, d.hkv, d.d);
  check_shape4(op, "dv", dv, d.b, d.sl, d.hkv, d.dv);
  check_result_dtype(op, "dout", dout, q.dtype);
  check_result_dtype(op, "dq", dq, q.dtype);
  check_result_dtype(op, "dk", dk, q.dtype);
  check_result_dtype(op, "dv", dv, q.dtype);
  detail::Tracker tr(opts, g.seq, q.device);
  if (detail::uses_pieces(opts)) {
    backward_generic(s, g, q, k, v, out, dout, lse, dq, dk, dv, opts, d, tr);
    tr.finish();
    return;
  }
  switch (s) {
    case Strategy::kHeads:
      tr.step();
      tr.backward(q, k, v, out, dout, lse, dq, dk, dv, 0, 0, opts.causal, /*accumulate=*/false,
                  heads_segments(g, opts));
      break;
    case Strategy::kRing:
    case Strategy::kZigzag:
      detail::ring_backward(*g.seq, s == Strategy::kZigzag, q, k, v, out, dout, lse, dq, dk, dv,
                            opts.causal, detail::uniform_segments(d.hq, d.hkv), tr);
      break;
    case Strategy::kAllGather:
      detail::allgather_backward(*g.seq, q, k, v, out, dout, lse, dq, dk, dv, opts.causal, tr);
      break;
    case Strategy::kUlysses:
      detail::ulysses_backward(*g.seq, nullptr, q, k, v, out, dout, lse, dq, dk, dv, opts.causal,
                               tr);
      break;
    case Strategy::kHybrid:
      detail::ulysses_backward(*g.ulysses, g.seq, q, k, v, out, dout, lse, dq, dk, dv, opts.causal,
                               tr);
      break;
  }
  tr.finish();
}

}  // namespace distattn::parallel
