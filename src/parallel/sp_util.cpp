// Tensor helpers, GQA head segments and per-call bookkeeping shared by the strategies.
#include <algorithm>
#include <cstring>

#include "distattn/core/half.h"
#include "src/parallel/sp_detail.h"

namespace distattn::parallel::detail {

namespace {

void check_same_shape(const char* op, const TensorView& a, const TensorView& b) {
  bool ok = a.ndim == b.ndim;
  for (int d = 0; ok && d < a.ndim; ++d) ok = a.shape[d] == b.shape[d];
  DISTATTN_CHECK(ok, op, ": shapes ", a.shape_str(), " and ", b.shape_str(), " differ");
}

// Calls f(row_index_offset_a, row_index_offset_b) (element offsets) for every index of the
// leading ndim-1 dims; the last dim is the row.
template <typename F>
void for_each_row(const TensorView& a, const TensorView& b, F&& f) {
  const int nd = a.ndim;
  if (nd <= 1) {
    f(int64_t{0}, int64_t{0});
    return;
  }
  for (int d = 0; d < nd - 1; ++d)
    if (a.shape[d] == 0) return;
  std::array<int64_t, kMaxDims> idx{};
  int64_t oa = 0, ob = 0;
  while (true) {
    f(oa, ob);
    int d = nd - 2;
    for (; d >= 0; --d) {
      if (++idx[d] < a.shape[d]) {
        oa += a.strides[d];
        ob += b.strides[d];
        break;
      }
      oa -= (a.shape[d] - 1) * a.strides[d];
      ob -= (b.shape[d] - 1) * b.strides[d];
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

inline float load_f(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32:
      return static_cast<const float*>(p)[i];
    case DType::kFloat64:
      return static_cast<float>(static_cast<const double*>(p)[i]);
    case DType::kBFloat16:
      return bf16_t::to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat16:
      return fp16_t::to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      break;
  }
  DISTATTN_THROW(Status::kUnsupported, "sequence-parallel copy: dtype ", dtype_name(t),
                 " is not a float type (use fp32, fp64, bf16 or fp16)");
}

inline double load_d(const void* p, DType t, int64_t i) {
  if (t == DType::kFloat64) return static_cast<const double*>(p)[i];
  return static_cast<double>(load_f(p, t, i));
}

inline void store_f(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::kFloat32:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      return;
    case DType::kFloat64:
      static_cast<double*>(p)[i] = v;
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(p)[i] = bf16_t::from_float(static_cast<float>(v));
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(p)[i] = fp16_t::from_float(static_cast<float>(v));
      return;
    default:
      break;
  }
  DISTATTN_THROW(Status::kUnsupported, "sequence-parallel copy: dtype ", dtype_name(t),
                 " is not a float type (use fp32, fp64, bf16 or fp16)");
}

char* byte_ptr(const TensorView& t, int64_t elem_offset) {
  return static_cast<char*>(t.data) + elem_offset * static_cast<int64_t>(t.element_size());
}

void copy_cpu(const TensorView& dst, const TensorView& src) {
  const int64_t n = dst.ndim ? dst.size(-1) : 1;
  const int64_t sd = dst.ndim ? dst.stride(-1) : 1;
  const int64_t ss = src.ndim ? src.stride(-1) : 1;
  const bool raw = dst.dtype == src.dtype && (sd == 1 || n <= 1) && (ss == 1 || n <= 1);
  const size_t row_bytes = static_cast<size_t>(n) * dst.element_size();
  for_each_row(dst, src, [&](int64_t od, int64_t os) {
    if (raw) {
      std::memcpy(byte_ptr(dst, od), byte_ptr(src, os), row_bytes);
      return;
    }
    void* pd = byte_ptr(dst, od);
    const void* ps = byte_ptr(src, os);
    for (int64_t i = 0; i < n; ++i) store_f(pd, dst.dtype, i * sd, load_d(ps, src.dtype, i * ss));
  });
}

void add_cpu(const TensorView& dst, const TensorView& src) {
  const int64_t n = dst.ndim ? dst.size(-1) : 1;
  const int64_t sd = dst.ndim ? dst.stride(-1) : 1;
  const int64_t ss = src.ndim ? src.stride(-1) : 1;
  const bool fast = dst.dtype == DType::kFloat32 && src.dtype == DType::kFloat32;
  for_each_row(dst, src, [&](int64_t od, int64_t os) {
    if (fast) {
      float* pd = reinterpret_cast<float*>(byte_ptr(dst, od));
      const float* ps = reinterpret_cast<const float*>(byte_ptr(src, os));
      for (int64_t i = 0; i < n; ++i) pd[i * sd] += ps[i * ss];
      return;
    }
    void* pd = byte_ptr(dst, od);
    const void* ps = byte_ptr(src, os);
    for (int64_t i = 0; i < n; ++i)
      store_f(pd, dst.dtype, i * sd, load_d(pd, dst.dtype, i * sd) + load_d(ps, src.dtype, i * ss));
  });
}

// Non-CPU views: stage through packed host copies, write back row by row (needs the
// destination's last dim contiguous). Correct on any device; a device kernel would be
// faster and belongs with the CUDA kernels.
void write_back_rows(const TensorView& dst, const TensorView& host_packed) {
  DISTATTN_CHECK(dst.ndim == 0 || dst.size(-1) <= 1 || dst.stride(-1) == 1,
                 "sequence-parallel copy: destination ", dst.str(),
                 " must be contiguous in its last dim");
  const size_t row_bytes = static_cast<size_t>(dst.ndim ? dst.size(-1) : 1) * dst.element_size();
  for_each_row(dst, host_packed, [&](int64_t od, int64_t oh) {
    device_copy(byte_ptr(dst, od), dst.device, byte_ptr(host_packed, oh), Device::cpu(), row_bytes);
  });
}

}  // namespace

void copy_view(const TensorView& dst, const TensorView& src) {
  check_same_shape("copy", dst, src);
  if (dst.numel() == 0) return;
  if (dst.device.is_cpu() && src.device.is_cpu()) {
    copy_cpu(dst, src);
    return;
  }
  Tensor host = to_device(src, Device::cpu());
  if (host.dtype() != dst.dtype) {
    Tensor conv = Tensor::empty(std::span<const int64_t>(dst.shape.data(), dst.ndim), dst.dtype,
                                Device::cpu());
    convert_dtype_cpu(host.view(), conv.view());
    host = std::move(conv);
  }
  if (dst.device.is_cpu()) {
    copy_cpu(dst, host.view());
  } else {
    write_back_rows(dst, host.view());
  }
}

void add_view(const TensorView& dst, const TensorView& src) {
  check_same_shape("add", dst, src);
  DISTATTN_CHECK(dst.dtype == DType::kFloat32 || dst.dtype == DType::kFloat64,
                 "sequence-parallel accumulation needs an fp32 or fp64 destination, got ",
                 dst.str());
  if (dst.numel() == 0) return;
  if (dst.device.is_cpu() && src.device.is_cpu()) {
    add_cpu(dst, src);
    return;
  }
  Tensor hd = to_device(dst, Device::cpu());
  Tensor hs = to_device(src, Device::cpu());
  add_cpu(hd.view(), hs.view());
  if (dst.device.is_cpu()) {
    copy_cpu(dst, hd.view());
  } else {
    write_back_rows(dst, hd.view());
  }
}

TensorView fp32_accumulator(const TensorView& t, Tensor& holder) {
  if (t.dtype == DType::kFloat32) return t;
  holder =
      Tensor::empty(std::span<const int64_t>(t.shape.data(), t.ndim), DType::kFloat32, t.device);
  return holder.view();
}

void zero(const TensorView& t) {
  if (t.numel() == 0) return;
  if (t.is_contiguous()) {
    device_memset_zero(t.data, t.device, t.nbytes());
    return;
  }
  Tensor z =
      Tensor::zeros(std::span<const int64_t>(t.shape.data(), t.ndim), t.dtype, Device::cpu());
  if (t.device.is_cpu()) {
    copy_cpu(t, z.view());
  } else {
    write_back_rows(t, z.view());
  }
}

Tensor empty_like_shape(std::initializer_list<int64_t> shape, DType dtype, Device device) {
  return Tensor::empty(shape, dtype, device);
}

std::vector<HeadSegment> head_segments(int64_t hq_begin, int64_t hq_end, int64_t kv_begin,
                                       int64_t group) {
  std::vector<HeadSegment> segs;
  for (int64_t h = hq_begin; h < hq_end;) {
    const int64_t kv = h / group;
    const int64_t end = std::min(hq_end, (kv + 1) * group);
    segs.push_back({h - hq_begin, end - hq_begin, kv - kv_begin});
    h = end;
  }
  return segs;
}

std::vector<HeadSegment> uniform_segments(int64_t hq, int64_t hkv) {
  DISTATTN_CHECK(hkv > 0 && hq % hkv == 0, "query heads (", hq,
                 ") must be a multiple of KV heads (", hkv, ")");
  return head_segments(0, hq, 0, hq / hkv);
}

namespace {
// One kernel call covers the whole tensors when segment i is [i*g, (i+1)*g) -> KV head i and
// the tensors hold exactly those heads.
bool is_uniform(const std::vector<HeadSegment>& segs, int64_t hq, int64_t hkv) {
  if (segs.empty() || static_cast<int64_t>(segs.size()) != hkv) return false;
  const int64_t g = segs[0].q_end - segs[0].q_begin;
  if (g * hkv != hq) return false;
  for (size_t i = 0; i < segs.size(); ++i) {
    const auto& s = segs[i];
    if (s.kv != static_cast<int64_t>(i) || s.q_begin != static_cast<int64_t>(i) * g ||
        s.q_end != s.q_begin + g)
      return false;
  }
  return true;
}

void progress_hook(void* c) {
  static_cast<comm::Communicator*>(c)->progress();
}
}  // namespace

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double visible_pairs(int64_t sq, int64_t sk, int64_t q_offset, int64_t k_offset, bool causal) {
  if (!causal) return static_cast<double>(sq) * static_cast<double>(sk);
  double n = 0;
  for (int64_t i = 0; i < sq; ++i) {
    const int64_t c = std::clamp<int64_t>(q_offset + i - k_offset + 1, 0, sk);
    n += static_cast<double>(c);
  }
  return n;
}

Tracker::Tracker(const SpOptions& opts, comm::Communicator* progress_comm)
    : opts_(opts), progress_comm_(progress_comm), start_(Clock::now()) {}

ops::AttentionOptions Tracker::attn_options(int64_t q_offset, int64_t k_offset, bool causal) const {
  ops::AttentionOptions o;
  o.softmax_scale = opts_.softmax_scale;
  o.causal = causal;
  o.q_offset = q_offset;
  o.k_offset = k_offset;
  o.stream = opts_.stream;
  if (opts_.drive_progress && progress_comm_ != nullptr && progress_comm_->size() > 1) {
    o.progress = &progress_hook;
    o.progress_ctx = progress_comm_;
  }
  return o;
}

void Tracker::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView& lse, int64_t q_offset,
                      int64_t k_offset, bool causal, const std::vector<HeadSegment>& segs) {
  const auto o = attn_options(q_offset, k_offset, causal);
  // The softmax scale comes from the full head dim, whatever the slicing.
  const auto t0 = Clock::now();
  if (is_uniform(segs, q.size(2), k.size(2))) {
    ops::attention_forward(q, k, v, out, lse, o);
  } else {
    for (const auto& s : segs) {
      const int64_t n = s.q_end - s.q_begin;
      ops::attention_forward(q.slice(2, s.q_begin, n), k.slice(2, s.kv, 1), v.slice(2, s.kv, 1),
                             out.slice(2, s.q_begin, n), lse.slice(1, s.q_begin, n), o);
    }
  }
  compute_s_ += seconds_since(t0);
  pairs_ += static_cast<double>(q.size(0) * q.size(2)) *
            visible_pairs(q.size(1), k.size(1), q_offset, k_offset, causal);
}

void Tracker::backward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView& dout, const TensorView& lse,
                       const TensorView& dq, const TensorView& dk, const TensorView& dv,
                       int64_t q_offset, int64_t k_offset, bool causal, bool accumulate,
                       const std::vector<HeadSegment>& segs) {
  const auto o = attn_options(q_offset, k_offset, causal);
  ops::BackwardOptions b;
  b.accumulate = accumulate;
  const auto t0 = Clock::now();
  if (is_uniform(segs, q.size(2), k.size(2))) {
    ops::attention_backward(q, k, v, out, dout, lse, dq, dk, dv, o, b);
  } else {
    for (const auto& s : segs) {
      const int64_t n = s.q_end - s.q_begin;
      ops::attention_backward(q.slice(2, s.q_begin, n), k.slice(2, s.kv, 1), v.slice(2, s.kv, 1),
                              out.slice(2, s.q_begin, n), dout.slice(2, s.q_begin, n),
                              lse.slice(1, s.q_begin, n), dq.slice(2, s.q_begin, n),
                              dk.slice(2, s.kv, 1), dv.slice(2, s.kv, 1), o, b);
    }
  }
  compute_s_ += seconds_since(t0);
  pairs_ += static_cast<double>(q.size(0) * q.size(2)) *
            visible_pairs(q.size(1), k.size(1), q_offset, k_offset, causal);
}

void Tracker::merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                    const TensorView& lse_b) {
  const auto t0 = Clock::now();
  ops::attention_merge(out_a, lse_a, out_b, lse_b, out_a, lse_a, opts_.stream);
  compute_s_ += seconds_since(t0);
}

void Tracker::wait(comm::Handle& h) {
  if (!h.valid()) return;
  const auto t0 = Clock::now();
  h.wait();
  exposed_s_ += seconds_since(t0);
}

void Tracker::wait_all(std::vector<comm::Handle>& hs) {
  for (auto& h : hs) wait(h);
}

void Tracker::finish() {
  if (opts_.stats == nullptr) return;
  SpStats& s = *opts_.stats;
  s.total_s = seconds_since(start_);
  s.exposed_comm_s = exposed_s_;
  s.compute_s = compute_s_;
  s.steps = std::max(steps_, 1);
  s.visible_pairs = pairs_;
}

}  // namespace distattn::parallel::detail
