// Public entry points of sequence-parallel attention: validation (before any kernel or
// collective), dispatch to the strategy bodies, and the head-parallel strategy.
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
      DISTATTN_CHECK(d.sl % 2 == 0, op, "(", name,
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

}  // namespace

void sp_attention_forward(Strategy s, const SpGroup& g, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView& out, const TensorView& lse,
                          const SpOptions& opts) {
  const Dims d = validate_common("sp_attention_forward", s, g, q, k, v, out, lse, opts);
  // The ring axis (g.seq) carries the transfers that overlap compute.
  detail::Tracker tr(opts, g.seq, q.device);
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
