// Validation and device dispatch of the local attention ops (distattn/ops/attention.h).
// Every entry point checks all of its tensors before any kernel runs, with messages that
// name the tensor and say what to change; the device switch lives only in this file so the
// CUDA kernels plug in at one place.
#include "distattn/ops/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "distattn/config.h"
#include "distattn/core/stream.h"
#include "distattn/ops/elementwise.h"
#include "kernels/cpu/attention_cpu.h"
#include "src/ops/doc_mask.h"
#if DISTATTN_WITH_CUDA
#include "kernels/cuda/attention_cuda.h"
#endif

namespace distattn::ops {

float AttentionOptions::scale_for(int64_t head_dim) const {
  if (softmax_scale.has_value()) {
    DISTATTN_CHECK(std::isfinite(*softmax_scale), "softmax_scale must be finite, got ",
                   *softmax_scale, " (leave it unset for 1/sqrt(head_dim))");
    return *softmax_scale;
  }
  DISTATTN_CHECK(head_dim > 0, "head_dim must be positive to derive the softmax scale, got ",
                 head_dim);
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

namespace {

bool is_storage_float(DType t) {
  return t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat16;
}

std::string shape_of(std::initializer_list<int64_t> s) {
  std::string o = "[";
  bool first = true;
  for (int64_t x : s) {
    o += (first ? "" : ", ") + std::to_string(x);
    first = false;
  }
  return o + "]";
}

void check_shape(const char* op, const char* name, const TensorView& t,
                 std::initializer_list<int64_t> want) {
  bool ok = t.ndim == static_cast<int>(want.size());
  if (ok) {
    int d = 0;
    for (int64_t w : want) ok = ok && t.shape[static_cast<size_t>(d++)] == w;
  }
  DISTATTN_CHECK(ok, op, ": ", name, " has shape ", t.shape_str(), " but must be ", shape_of(want));
}

void check_data(const char* op, const char* name, const TensorView& t) {
  DISTATTN_CHECK(t.numel() == 0 || t.data != nullptr, op, ": ", name, " has a null data pointer (",
                 t.str(), ")");
  for (int d = 0; d < t.ndim; ++d)
    DISTATTN_CHECK(t.shape[static_cast<size_t>(d)] == 1 || t.strides[static_cast<size_t>(d)] >= 0,
                   op, ": ", name, " has a negative stride in dim ", d,
                   "; pass a view with "
                   "non-negative strides");
}

void check_last_contiguous(const char* op, const char* name, const TensorView& t) {
  DISTATTN_CHECK(t.ndim == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name, " ", t.str(),
                 " must be contiguous in its last dim (stride 1, got ", t.stride(-1),
                 "); make a packed copy first");
}

void check_device(const char* op, const char* name, const TensorView& t, const Device& want) {
  DISTATTN_CHECK(t.device == want, op, ": ", name, " is on ", t.device.str(), " but q is on ",
                 want.str(), "; all tensors of one call must share a device");
}

// out-like tensors: q's dtype or fp32.
void check_result_dtype(const char* op, const char* name, const TensorView& t, DType qt) {
  DISTATTN_CHECK(t.dtype == qt || t.dtype == DType::kFloat32, op, ": ", name, " is ",
                 dtype_name(t.dtype), " but must be q's dtype (", dtype_name(qt), ") or fp32");
}

struct Dims {
  int64_t B, Sq, Sk, Hq, Hkv, D, Dv;
};

// paged: k/v are page pools [num_pages, page_size, heads_kv, dim] (no batch dim).
Dims check_qkv(const char* op, const TensorView& q, const TensorView& k, const TensorView& v,
               bool paged = false) {
  const char* kn = paged ? "k_pages" : "k";
  const char* vn = paged ? "v_pages" : "v";
  const char* lead = paged ? "[num_pages, page_size" : "[batch, seq_k";
  DISTATTN_CHECK(q.ndim == 4, op, ": q must be 4-D [batch, seq_q, heads_q, head_dim] (BSHD), got ",
                 q.str());
  DISTATTN_CHECK(k.ndim == 4, op, ": ", kn, " must be 4-D ", lead, ", heads_kv, head_dim], got ",
                 k.str());
  DISTATTN_CHECK(v.ndim == 4, op, ": ", vn, " must be 4-D ", lead, ", heads_kv, head_dim_v], got ",
                 v.str());
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  DISTATTN_CHECK(is_storage_float(q.dtype), op, ": q is ", dtype_name(q.dtype),
                 "; supported storage dtypes are fp32, bf16, fp16");
  DISTATTN_CHECK(k.dtype == q.dtype && v.dtype == q.dtype, op,
                 ": q, k, v must share one dtype, got q ", dtype_name(q.dtype), ", k ",
                 dtype_name(k.dtype), ", v ", dtype_name(v.dtype),
                 "; convert k and v to q's dtype");
  check_device(op, kn, k, q.device);
  check_device(op, vn, v, q.device);
  if (!paged) {
    DISTATTN_CHECK(k.size(0) == d.B, op, ": k batch ", k.size(0), " must equal q batch ", d.B);
    DISTATTN_CHECK(v.size(0) == d.B, op, ": v batch ", v.size(0), " must equal q batch ", d.B);
  } else {
    DISTATTN_CHECK(v.size(0) == k.size(0), op, ": v_pages has ", v.size(0),
                   " pages but k_pages has ", k.size(0));
  }
  DISTATTN_CHECK(v.size(1) == d.Sk, op, ": ", vn, " dim 1 (", v.size(1), ") must equal ", kn,
                 " dim 1 (", d.Sk, ")");
  DISTATTN_CHECK(v.size(2) == d.Hkv, op, ": ", vn, " has ", v.size(2), " KV heads but ", kn,
                 " has ", d.Hkv);
  DISTATTN_CHECK(k.size(3) == d.D, op, ": ", kn, " head_dim ", k.size(3), " must equal q head_dim ",
                 d.D);
  DISTATTN_CHECK(d.D > 0 && d.Dv > 0, op, ": head dims must be positive (q/k ", d.D, ", v ", d.Dv,
                 ")");
  DISTATTN_CHECK(d.Hkv > 0, op, ": ", kn, " must have at least one KV head, got ", k.shape_str());
  DISTATTN_CHECK(d.Hq % d.Hkv == 0, op, ": query heads (", d.Hq,
                 ") must be a multiple of KV heads (", d.Hkv,
                 ") for GQA/MQA; change heads_q or heads_kv");
  check_data(op, "q", q);
  check_data(op, kn, k);
  check_data(op, vn, v);
  check_last_contiguous(op, "q", q);
  check_last_contiguous(op, kn, k);
  check_last_contiguous(op, vn, v);
  return d;
}

void check_out_lse(const char* op, const Dims& d, const TensorView& q, const TensorView& out,
                   const TensorView& lse, const char* out_name = "out",
                   const char* lse_name = "lse") {
  check_shape(op, out_name, out, {d.B, d.Sq, d.Hq, d.Dv});
  check_shape(op, lse_name, lse, {d.B, d.Hq, d.Sq});
  check_result_dtype(op, out_name, out, q.dtype);
  DISTATTN_CHECK(lse.dtype == DType::kFloat32, op, ": ", lse_name, " must be fp32, got ",
                 dtype_name(lse.dtype));
  check_device(op, out_name, out, q.device);
  check_device(op, lse_name, lse, q.device);
  check_data(op, out_name, out);
  check_data(op, lse_name, lse);
  check_last_contiguous(op, out_name, out);
}

void check_options(const char* op, const AttentionOptions& o, int64_t head_dim) {
  (void)o.scale_for(head_dim);  // validates softmax_scale
  // Masks add and subtract positions, offsets and window widths: bounded by 2^60 each, every
  // such sum fits in int64 (found by fuzz/fuzz_attention: q_offset near 2^63 overflowed).
  constexpr int64_t kMaxPosition = int64_t{1} << 60;
  const auto in_range = [](int64_t v) { return v >= -kMaxPosition && v <= kMaxPosition; };
  DISTATTN_CHECK(in_range(o.q_offset) && in_range(o.k_offset), op, ": q_offset ", o.q_offset,
                 " / k_offset ", o.k_offset, " out of range: each must lie in [-2^60, 2^60] ",
                 "(global token positions)");
  DISTATTN_CHECK(o.window_left <= kMaxPosition && o.window_right <= kMaxPosition, op,
                 ": window_left ", o.window_left, " / window_right ", o.window_right,
                 " out of range: use at most 2^60, or a negative value for an unlimited side");
}

#if !DISTATTN_WITH_CUDA
[[noreturn]] void cuda_unsupported(const char* op) {
  DISTATTN_THROW(Status::kUnsupported, op,
                 ": CUDA tensors need a build with CUDA kernels (this one is CPU-only: "
                 "reconfigure with -DDISTATTN_CUDA=ON), or pass CPU tensors");
}
#endif

// Sk == 0 (or an empty query set): every row is fully masked -> out = 0, lse = -inf. The
// elementwise ops do both devices (any strides); on CUDA they are enqueued on the op's
// stream, so a degenerate call never synchronizes the host either.
void fill_fully_masked(const char* op, const TensorView& out, const TensorView& lse,
                       Stream stream) {
#if !DISTATTN_WITH_CUDA
  if (!out.device.is_cpu()) cuda_unsupported(op);
#endif
  tensor_zero(out, stream);
  tensor_fill(lse, -std::numeric_limits<double>::infinity(), stream);
}

void zero(const char* op, const TensorView& t, Stream stream) {
#if !DISTATTN_WITH_CUDA
  if (!t.device.is_cpu()) cuda_unsupported(op);
#endif
  tensor_zero(t, stream);
}

// Host copy of a small int32 tensor (page table, sequence lengths) on any device. For CUDA
// tensors the caller first waits for the op's stream (see attention_decode_paged).
Tensor host_ints(const char* op, const char* name, const TensorView& t) {
  if (t.device.is_cpu()) return to_device(t, Device::cpu());
  DISTATTN_CHECK(t.is_contiguous(), op, ": CUDA ", name, " must be a packed tensor, got ", t.str());
  return to_device(t, Device::cpu());
}

// ---- packed documents, sink tokens, learned sinks ----

bool has_doc_features(const AttentionOptions& o) {
  return !o.cu_seqlens.empty() || !o.cu_seqlens_k.empty() || o.sink_tokens > 0 ||
         o.sinks.data != nullptr;
}

void check_cu(const char* op, const char* name, std::span<const int32_t> cu, int64_t rows,
              const char* rows_name) {
  DISTATTN_CHECK(cu.size() >= 2, op, ": ", name, " must hold n_docs + 1 >= 2 offsets, got ",
                 cu.size());
  DISTATTN_CHECK(cu[0] == 0, op, ": ", name, "[0] must be 0, got ", cu[0]);
  for (size_t i = 1; i < cu.size(); ++i)
    DISTATTN_CHECK(cu[i] >= cu[i - 1], op, ": ", name, " must be non-decreasing, but ", name, "[",
                   i, "] = ", cu[i], " < ", name, "[", i - 1, "] = ", cu[i - 1]);
  DISTATTN_CHECK(cu.back() == rows, op, ": ", name, "[", cu.size() - 1, "] = ", cu.back(),
                 " must equal ", rows_name, " (", rows, ")");
}

void check_doc_features(const char* op, const AttentionOptions& o, const Dims& d,
                        const TensorView& q) {
  DISTATTN_CHECK(o.sink_tokens >= 0, op, ": sink_tokens must be >= 0, got ", o.sink_tokens);
  if (!o.cu_seqlens.empty() || !o.cu_seqlens_k.empty()) {
    DISTATTN_CHECK(!o.cu_seqlens.empty(), op,
                   ": cu_seqlens_k is set but cu_seqlens is empty; set both (or only "
                   "cu_seqlens for self-attention)");
    DISTATTN_CHECK(d.B == 1, op, ": packed documents (cu_seqlens) need batch 1 (THD layout), got ",
                   "batch ", d.B);
    DISTATTN_CHECK(o.q_offset == 0 && o.k_offset == 0, op,
                   ": q_offset/k_offset must be 0 with cu_seqlens (positions restart at 0 in each "
                   "document)");
    check_cu(op, "cu_seqlens", o.cu_seqlens, d.Sq, "seq_q");
    if (o.cu_seqlens_k.empty()) {
      DISTATTN_CHECK(d.Sq == d.Sk, op, ": cu_seqlens without cu_seqlens_k needs seq_q == seq_k, ",
                     "got ", d.Sq, " and ", d.Sk, "; pass cu_seqlens_k for cross shapes");
    } else {
      DISTATTN_CHECK(o.cu_seqlens_k.size() == o.cu_seqlens.size(), op, ": cu_seqlens_k has ",
                     o.cu_seqlens_k.size(), " offsets but cu_seqlens has ", o.cu_seqlens.size(),
                     " (one document count for both)");
      check_cu(op, "cu_seqlens_k", o.cu_seqlens_k, d.Sk, "seq_k");
    }
  }
  if (o.sinks.data != nullptr) {
    DISTATTN_CHECK(o.sinks.ndim == 1 && o.sinks.size(0) == d.Hq && o.sinks.dtype == DType::kFloat32,
                   op, ": sinks must be fp32 [heads_q = ", d.Hq, "], got ", o.sinks.str());
    check_device(op, "sinks", o.sinks, q.device);
  }
}

struct DocPlan {
  std::vector<docmask::Piece> pieces;
  int64_t max_q = 0;
};

DocPlan doc_plan(const AttentionOptions& o, const Dims& d) {
  std::vector<docmask::Run> qr, kr;
  if (o.cu_seqlens.empty()) {
    qr.push_back({0, d.Sq, 0, o.q_offset});
    kr.push_back({0, d.Sk, 0, o.k_offset});
  } else {
    const auto& cq = o.cu_seqlens;
    const auto& ck = o.cu_seqlens_k.empty() ? o.cu_seqlens : o.cu_seqlens_k;
    for (size_t i = 0; i + 1 < cq.size(); ++i) {
      const int64_t lq = cq[i + 1] - cq[i], lk = ck[i + 1] - ck[i];
      qr.push_back({cq[i], lq, static_cast<int64_t>(i), lk - lq});
      kr.push_back({ck[i], lk, static_cast<int64_t>(i), 0});
    }
  }
  docmask::Mask m{o.causal, o.window_left, o.window_right, o.sink_tokens};
  DocPlan p;
  docmask::pieces(qr, kr, m, p.pieces);
  for (const auto& x : p.pieces) p.max_q = std::max(p.max_q, x.q_len);
  return p;
}

// The plain kernel options of one piece (no documents, sinks or sink tokens).
AttentionOptions piece_options(const AttentionOptions& o, const docmask::Piece& x) {
  AttentionOptions po = o;
  po.cu_seqlens = {};
  po.cu_seqlens_k = {};
  po.sink_tokens = 0;
  po.sinks = TensorView();
  po.q_offset = x.q_pos;
  po.k_offset = x.k_pos;
  if (!x.window) po.window_left = po.window_right = -1;
  return po;
}

TensorView rows_of(const TensorView& t, int64_t b, int64_t n) {
  return t.slice(1, b, n);
}
TensorView lse_rows_of(const TensorView& t, int64_t b, int64_t n) {
  return t.slice(2, b, n);
}

void forward_docs(const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& out, const TensorView& lse, const AttentionOptions& o,
                  const Dims& d) {
  const DocPlan plan = doc_plan(o, d);
  Tensor acc_t;
  TensorView acc = out;
  if (out.dtype != DType::kFloat32) {
    acc_t = Tensor::empty({d.B, d.Sq, d.Hq, d.Dv}, DType::kFloat32, q.device);
    acc = acc_t.view();
  }
  tensor_zero(acc, o.stream);
  tensor_fill(lse, -std::numeric_limits<double>::infinity(), o.stream);
  Tensor po, pl;
  if (plan.max_q > 0) {
    po = Tensor::empty({d.B, plan.max_q, d.Hq, d.Dv}, DType::kFloat32, q.device);
    pl = Tensor::empty({d.B, d.Hq, plan.max_q}, DType::kFloat32, q.device);
  }
  std::vector<char> touched(static_cast<size_t>(d.Sq), 0);
  for (const auto& x : plan.pieces) {
    const AttentionOptions xo = piece_options(o, x);
    const TensorView qx = rows_of(q, x.q_row, x.q_len);
    const TensorView kx = rows_of(k, x.k_row, x.k_len);
    const TensorView vx = rows_of(v, x.k_row, x.k_len);
    bool fresh = true;
    for (int64_t i = x.q_row; i < x.q_row + x.q_len && fresh; ++i) fresh = !touched[i];
    std::fill(touched.begin() + x.q_row, touched.begin() + x.q_row + x.q_len, 1);
    const TensorView ao = rows_of(acc, x.q_row, x.q_len);
    const TensorView al = lse_rows_of(lse, x.q_row, x.q_len);
    if (fresh) {
      attention_forward(qx, kx, vx, ao, al, xo);
    } else {
      const TensorView px = rows_of(po.view(), 0, x.q_len);
      const TensorView lx = lse_rows_of(pl.view(), 0, x.q_len);
      attention_forward(qx, kx, vx, px, lx, xo);
      attention_merge(ao, al, px, lx, ao, al, o.stream);
    }
  }
  if (o.sinks.data != nullptr) attention_apply_sinks(acc, lse, o.sinks, o.stream);
  if (acc_t.defined()) tensor_copy(out, acc, o.stream);
}

void backward_docs(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& dout, const TensorView& lse,
                   const TensorView& dq, const TensorView& dk, const TensorView& dv,
                   const AttentionOptions& o, const BackwardOptions& bo, const Dims& d) {
  const DocPlan plan = doc_plan(o, d);
  // fp32 accumulators across pieces (a low-precision gradient is written once at the end).
  Tensor hold[3];
  const TensorView grads[3] = {dq, dk, dv};
  TensorView acc[3];
  for (int i = 0; i < 3; ++i) {
    const TensorView& g = grads[i];
    if (g.dtype == DType::kFloat32) {
      acc[i] = g;  // pieces add straight into the caller's fp32 gradient
      if (!bo.accumulate) tensor_zero(g, o.stream);
    } else {
      hold[i] =
          Tensor::empty(std::span<const int64_t>(g.shape.data(), 4), DType::kFloat32, g.device);
      acc[i] = hold[i].view();
      tensor_zero(acc[i], o.stream);
    }
  }
  BackwardOptions pb;
  pb.accumulate = true;
  for (const auto& x : plan.pieces) {
    const AttentionOptions xo = piece_options(o, x);
    attention_backward(rows_of(q, x.q_row, x.q_len), rows_of(k, x.k_row, x.k_len),
                       rows_of(v, x.k_row, x.k_len), rows_of(out, x.q_row, x.q_len),
                       rows_of(dout, x.q_row, x.q_len), lse_rows_of(lse, x.q_row, x.q_len),
                       rows_of(acc[0], x.q_row, x.q_len), rows_of(acc[1], x.k_row, x.k_len),
                       rows_of(acc[2], x.k_row, x.k_len), xo, pb);
  }
  for (int i = 0; i < 3; ++i) {
    if (!hold[i].defined()) continue;
    if (bo.accumulate)
      tensor_add(grads[i], acc[i], o.stream);
    else
      tensor_copy(grads[i], acc[i], o.stream);
  }
  if (o.sinks.data != nullptr)
    attention_sinks_backward(out, dout, lse, o.sinks, bo.dsinks, bo.accumulate, o.stream);
}

}  // namespace

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView& lse, const AttentionOptions& opts) {
  constexpr const char* op = "attention_forward";
  const Dims d = check_qkv(op, q, k, v);
  check_out_lse(op, d, q, out, lse);
  check_options(op, opts, d.D);
  check_doc_features(op, opts, d, q);
  if (d.B == 0 || d.Sq == 0 || d.Hq == 0) return;
  if (has_doc_features(opts)) {
#if !DISTATTN_WITH_CUDA
    if (q.device.is_cuda()) cuda_unsupported(op);
#endif
    return forward_docs(q, k, v, out, lse, opts, d);
  }
  if (d.Sk == 0) return fill_fully_masked(op, out, lse, opts.stream);
  if (q.device.is_cuda()) {
#if DISTATTN_WITH_CUDA
    return kernels::cuda::flash_forward(q, k, v, out, lse, opts);
#else
    cuda_unsupported(op);
#endif
  }
  kernels::cpu::flash_forward(q, k, v, out, lse, opts);
}

void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& dout, const TensorView& lse,
                        const TensorView& dq, const TensorView& dk, const TensorView& dv,
                        const AttentionOptions& opts, const BackwardOptions& bopts) {
  constexpr const char* op = "attention_backward";
  const Dims d = check_qkv(op, q, k, v);
  check_out_lse(op, d, q, out, lse);
  check_shape(op, "dout", dout, {d.B, d.Sq, d.Hq, d.Dv});
  check_result_dtype(op, "dout", dout, q.dtype);
  check_device(op, "dout", dout, q.device);
  check_data(op, "dout", dout);
  check_last_contiguous(op, "dout", dout);
  const struct {
    const char* name;
    const TensorView& t;
    const TensorView& like;
  } grads[] = {{"dq", dq, q}, {"dk", dk, k}, {"dv", dv, v}};
  for (const auto& g : grads) {
    check_shape(op, g.name, g.t, {g.like.size(0), g.like.size(1), g.like.size(2), g.like.size(3)});
    check_result_dtype(op, g.name, g.t, q.dtype);
    check_device(op, g.name, g.t, q.device);
    check_data(op, g.name, g.t);
    check_last_contiguous(op, g.name, g.t);
  }
  check_options(op, opts, d.D);
  check_doc_features(op, opts, d, q);
  if (opts.sinks.data != nullptr) {
    const TensorView& ds = bopts.dsinks;
    DISTATTN_CHECK(
        ds.data != nullptr && ds.ndim == 1 && ds.size(0) == d.Hq && ds.dtype == DType::kFloat32, op,
        ": with sinks set, BackwardOptions::dsinks must be fp32 [heads_q = ", d.Hq, "], got ",
        ds.str());
    check_device(op, "dsinks", ds, q.device);
  }
  if (d.B == 0) return;
  if (has_doc_features(opts) && d.Sq > 0 && d.Hq > 0) {
#if !DISTATTN_WITH_CUDA
    if (q.device.is_cuda()) cuda_unsupported(op);
#endif
    return backward_docs(q, k, v, out, dout, lse, dq, dk, dv, opts, bopts, d);
  }
  if (d.Sq == 0 || d.Sk == 0 || d.Hq == 0) {
    // No (query, key) pair: every gradient contribution is zero.
    if (!bopts.accumulate) {
      zero(op, dq, opts.stream);
      zero(op, dk, opts.stream);
      zero(op, dv, opts.stream);
    }
    return;
  }
  if (q.device.is_cuda()) {
#if DISTATTN_WITH_CUDA
    return kernels::cuda::flash_backward(q, k, v, out, dout, lse, dq, dk, dv, opts, bopts);
#else
    cuda_unsupported(op);
#endif
  }
  kernels::cpu::flash_backward(q, k, v, out, dout, lse, dq, dk, dv, opts, bopts);
}

void attention_merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                     const TensorView& lse_b, const TensorView& out, const TensorView& lse,
                     Stream stream) {
  constexpr const char* op = "attention_merge";
  DISTATTN_CHECK(out_a.ndim == 4, op, ": out_a must be 4-D [batch, seq_q, heads, head_dim_v], got ",
                 out_a.str());
  const int64_t B = out_a.size(0), Sq = out_a.size(1), H = out_a.size(2), Dv = out_a.size(3);
  const struct {
    const char* name;
    const TensorView& t;
    bool is_out;
  } all[] = {{"out_a", out_a, true},  {"lse_a", lse_a, false}, {"out_b", out_b, true},
             {"lse_b", lse_b, false}, {"out", out, true},      {"lse", lse, false}};
  for (const auto& x : all) {
    if (x.is_out) {
      check_shape(op, x.name, x.t, {B, Sq, H, Dv});
      check_last_contiguous(op, x.name, x.t);
    } else {
      check_shape(op, x.name, x.t, {B, H, Sq});
    }
    DISTATTN_CHECK(x.t.dtype == DType::kFloat32, op, ": ", x.name,
                   " must be fp32 (partials are "
                   "merged in fp32), got ",
                   dtype_name(x.t.dtype));
    DISTATTN_CHECK(x.t.device == out_a.device, op, ": ", x.name, " is on ", x.t.device.str(),
                   " but out_a is on ", out_a.device.str(), "; all tensors must share a device");
    check_data(op, x.name, x.t);
  }
  if (out.numel() == 0 && lse.numel() == 0) return;
  if (out_a.device.is_cuda()) {
#if DISTATTN_WITH_CUDA
    return kernels::cuda::merge(out_a, lse_a, out_b, lse_b, out, lse, stream);
#else
    cuda_unsupported(op);
#endif
  }
  (void)stream;  // CPU: synchronous
  kernels::cpu::merge(out_a, lse_a, out_b, lse_b, out, lse);
}

void attention_apply_sinks(const TensorView& out, const TensorView& lse, const TensorView& sinks,
                           Stream stream) {
  constexpr const char* op = "attention_apply_sinks";
  DISTATTN_CHECK(out.ndim == 4 && out.dtype == DType::kFloat32, op,
                 ": out must be fp32 [batch, seq_q, heads, head_dim_v], got ", out.str());
  const int64_t B = out.size(0), Sq = out.size(1), H = out.size(2);
  check_shape(op, "lse", lse, {B, H, Sq});
  check_shape(op, "sinks", sinks, {H});
  DISTATTN_CHECK(lse.dtype == DType::kFloat32 && sinks.dtype == DType::kFloat32, op,
                 ": lse and sinks must be fp32, got ", dtype_name(lse.dtype), " and ",
                 dtype_name(sinks.dtype));
  check_device(op, "lse", lse, out.device);
  check_device(op, "sinks", sinks, out.device);
  check_data(op, "out", out);
  check_data(op, "lse", lse);
  check_data(op, "sinks", sinks);
  check_last_contiguous(op, "out", out);
  if (out.numel() == 0 && lse.numel() == 0) return;
  if (out.device.is_cuda()) {
#if DISTATTN_WITH_CUDA
    return kernels::cuda::apply_sinks(out, lse, sinks, stream);
#else
    cuda_unsupported(op);
#endif
  }
  (void)stream;
  kernels::cpu::apply_sinks(out, lse, sinks);
}

void attention_sinks_backward(const TensorView& out, const TensorView& dout, const TensorView& lse,
                              const TensorView& sinks, const TensorView& dsinks, bool accumulate,
                              Stream stream) {
  constexpr const char* op = "attention_sinks_backward";
  DISTATTN_CHECK(out.ndim == 4, op, ": out must be 4-D [batch, seq_q, heads, head_dim_v], got ",
                 out.str());
  const int64_t B = out.size(0), Sq = out.size(1), H = out.size(2), Dv = out.size(3);
  check_shape(op, "dout", dout, {B, Sq, H, Dv});
  check_shape(op, "lse", lse, {B, H, Sq});
  check_shape(op, "sinks", sinks, {H});
  check_shape(op, "dsinks", dsinks, {H});
  DISTATTN_CHECK(is_storage_float(out.dtype) && is_storage_float(dout.dtype), op,
                 ": out and dout must be fp32, bf16 or fp16, got ", dtype_name(out.dtype), " and ",
                 dtype_name(dout.dtype));
  DISTATTN_CHECK(lse.dtype == DType::kFloat32 && sinks.dtype == DType::kFloat32 &&
                     dsinks.dtype == DType::kFloat32,
                 op, ": lse, sinks and dsinks must be fp32");
  for (const auto* t : {&dout, &lse, &sinks, &dsinks}) check_device(op, "argument", *t, out.device);
  check_data(op, "out", out);
  check_data(op, "dout", dout);
  check_data(op, "lse", lse);
  check_data(op, "sinks", sinks);
  check_data(op, "dsinks", dsinks);
  check_last_contiguous(op, "out", out);
  check_last_contiguous(op, "dout", dout);
  if (H == 0) return;
  if (out.device.is_cuda()) {
#if DISTATTN_WITH_CUDA
    return kernels::cuda::sinks_backward(out, dout, lse, sinks, dsinks, accumulate, stream);
#else
    cuda_unsupported(op);
#endif
  }
  (void)stream;
  kernels::cpu::sinks_backward(out, dout, lse, sinks, dsinks, accumulate);
}

void attention_decode(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView& lse, const AttentionOptions& opts,
                      const DecodeOptions& dopts) {
  constexpr const char* op = "attention_decode";
  const Dims d = check_qkv(op, q, k, v);
  check_out_lse(op, d, q, out, lse);
  check_options(op, opts, d.D);
  DISTATTN_CHECK(d.Sq <= 16, op,
                 ": decode takes at most 16 queries per sequence, got seq_q = ", d.Sq,
                 "; use attention_forward for prefill");
  DISTATTN_CHECK(dopts.num_splits >= 0, op, ": num_splits must be >= 0 (0 = choose), got ",
                 dopts.num_splits);
  check_doc_features(op, opts, d, q);
  if (d.B == 0 || d.Sq == 0 || d.Hq == 0) return;
  if (has_doc_features(opts)) {
    // Packed documents, sink tokens and learned sinks: the forward's piece decomposition
    // (exact; a few queries per document make these small kernel calls).
#if !DISTATTN_WITH_CUDA
    if (q.device.is_cuda()) cuda_unsupported(op);
#endif
    return forward_docs(q, k, v, out, lse, opts, d);
  }
  if (d.Sk == 0) return fill_fully_masked(op, out, lse, opts.stream);
  if (q.device.is_cuda()) {
#if DISTATTN_WITH_CUDA
    return kernels::cuda::decode(q, k, v, out, lse, opts, dopts);
#else
    cuda_unsupported(op);
#endif
  }
  kernels::cpu::decode(q, k, v, out, lse, opts, dopts);
}

void attention_decode_paged(const TensorView& q, const PagedKV& cache, const TensorView& out,
                            const TensorView& lse, const AttentionOptions& opts,
                            const DecodeOptions& dopts) {
  constexpr const char* op = "attention_decode_paged";
  const TensorView& kp = cache.k_pages;
  const TensorView& vp = cache.v_pages;
  const Dims d = check_qkv(op, q, kp, vp, /*paged=*/true);
  const int64_t B = d.B, Sq = d.Sq, Hq = d.Hq, D = d.D, Dv = d.Dv, Hkv = d.Hkv;
  const int64_t P = kp.size(0), ps = kp.size(1);
  DISTATTN_CHECK(ps > 0, op, ": page_size (k_pages dim 1) must be positive, got ", ps);
  const Dims full{B, Sq, 0, Hq, Hkv, D, Dv};
  check_out_lse(op, full, q, out, lse);
  check_options(op, opts, D);
  const TensorView& pt = cache.page_table;
  const TensorView& sl = cache.seq_lens;
  DISTATTN_CHECK(pt.ndim == 2 && pt.size(0) == B, op,
                 ": page_table must be 2-D [batch, max_pages_per_seq] with batch ", B, ", got ",
                 pt.str());
  DISTATTN_CHECK(sl.ndim == 1 && sl.size(0) == B, op, ": seq_lens must be 1-D [batch] with batch ",
                 B, ", got ", sl.str());
  DISTATTN_CHECK(pt.dtype == DType::kInt32, op, ": page_table must be int32, got ",
                 dtype_name(pt.dtype));
  DISTATTN_CHECK(sl.dtype == DType::kInt32, op, ": seq_lens must be int32, got ",
                 dtype_name(sl.dtype));
  check_device(op, "page_table", pt, q.device);
  check_device(op, "seq_lens", sl, q.device);
  check_data(op, "page_table", pt);
  check_data(op, "seq_lens", sl);
  DISTATTN_CHECK(Sq <= 16, op, ": decode takes at most 16 queries per sequence, got seq_q = ", Sq,
                 "; use attention_forward for prefill");
  DISTATTN_CHECK(dopts.num_splits >= 0, op, ": num_splits must be >= 0 (0 = choose), got ",
                 dopts.num_splits);
  DISTATTN_CHECK(opts.q_offset == 0 && opts.k_offset == 0, op,
                 ": q_offset/k_offset must be 0 for a paged cache (positions are per sequence: "
                 "keys at 0..seq_lens[b]-1, queries are the last seq_q positions)");
  DISTATTN_CHECK(!has_doc_features(opts), op,
                 ": cu_seqlens, sink_tokens and sinks are not taken by the paged decode (each "
                 "sequence of the batch already is one document); use attention_decode over a "
                 "contiguous cache");
#if !DISTATTN_WITH_CUDA
  if (q.device.is_cuda()) cuda_unsupported(op);
#endif
  // Check every sequence length and every page id used (host copies for CUDA tensors).
  // The page table and lengths may have been written on the op's stream just before the
  // call; the host copies (cudaMemcpy on the legacy default stream) do not wait for a
  // non-blocking stream, so the host waits for it first.
  if (pt.device.is_cuda()) stream_synchronize(pt.device, opts.stream);
  const Tensor pt_host = host_ints(op, "page_table", pt);
  const Tensor sl_host = host_ints(op, "seq_lens", sl);
  const int64_t max_pages = pt.size(1);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = sl_host.data_as<const int32_t>()[b];
    max_len = std::max(max_len, len);
    DISTATTN_CHECK(len >= 0 && len <= max_pages * ps, op, ": seq_lens[", b, "] = ", len,
                   " must lie in [0, max_pages_per_seq * page_size = ", max_pages * ps, "]");
    const int64_t used = (len + ps - 1) / ps;
    for (int64_t p = 0; p < used; ++p) {
      const int64_t id = pt_host.data_as<const int32_t>()[b * max_pages + p];
      DISTATTN_CHECK(id >= 0 && id < P, op, ": page_table[", b, ", ", p, "] = ", id,
                     " is not a page id in [0, ", P, ")");
    }
  }
  if (B == 0 || Sq == 0 || Hq == 0) return;
  if (q.device.is_cuda()) {
#if DISTATTN_WITH_CUDA
    return kernels::cuda::decode_paged(q, cache, out, lse, opts, dopts, max_len);
#endif
  }
  kernels::cpu::decode_paged(q, cache, out, lse, opts, dopts);
}

namespace {
// Exact number of visible (query, key) pairs under the mask of `o`.
double visible_pairs(int64_t seq_q, int64_t seq_k, const AttentionOptions& o) {
  double pairs = 0;
  for (int64_t i = 0; i < seq_q; ++i) {
    const int64_t qpos = o.q_offset + i;
    int64_t lo = o.k_offset, hi = o.k_offset + seq_k - 1;
    if (o.causal) hi = std::min(hi, qpos);
    if (o.window_left >= 0) lo = std::max(lo, qpos - o.window_left);
    if (o.window_right >= 0) hi = std::min(hi, qpos + o.window_right);
    if (hi >= lo) pairs += static_cast<double>(hi - lo + 1);
  }
  return pairs;
}
}  // namespace

double attention_forward_flops(int64_t batch, int64_t heads_q, int64_t seq_q, int64_t seq_k,
                               int64_t head_dim, bool causal) {
  DISTATTN_CHECK(batch >= 0 && heads_q >= 0 && seq_q >= 0 && seq_k >= 0 && head_dim >= 0,
                 "attention_forward_flops: sizes must be non-negative");
  if (!causal)
    return 4.0 * static_cast<double>(batch) * static_cast<double>(heads_q) *
           static_cast<double>(seq_q) * static_cast<double>(seq_k) * static_cast<double>(head_dim);
  AttentionOptions o;
  o.causal = true;
  o.q_offset = seq_k - seq_q;  // queries are the last seq_q positions (prefill: Sq == Sk)
  return attention_forward_flops(batch, heads_q, seq_q, seq_k, head_dim, head_dim, o);
}

double attention_forward_flops(int64_t batch, int64_t heads_q, int64_t seq_q, int64_t seq_k,
                               int64_t head_dim, int64_t head_dim_v, const AttentionOptions& opts) {
  DISTATTN_CHECK(
      batch >= 0 && heads_q >= 0 && seq_q >= 0 && seq_k >= 0 && head_dim >= 0 && head_dim_v >= 0,
      "attention_forward_flops: sizes must be non-negative");
  // Q K^T: 2*D per pair; P V: 2*Dv per pair.
  return 2.0 * static_cast<double>(batch) * static_cast<double>(heads_q) *
         visible_pairs(seq_q, seq_k, opts) * static_cast<double>(head_dim + head_dim_v);
}

}  // namespace distattn::ops
