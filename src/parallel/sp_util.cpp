// Tensor helpers, GQA head segments and per-call bookkeeping shared by the strategies.
#include <algorithm>

#include "distattn/ops/elementwise.h"
#include "src/parallel/sp_detail.h"

namespace distattn::parallel::detail {

void copy_view(const TensorView& dst, const TensorView& src, Stream stream) {
  ops::tensor_copy(dst, src, stream);
}

void add_view(const TensorView& dst, const TensorView& src, Stream stream) {
  ops::tensor_add(dst, src, stream);
}

void zero(const TensorView& t, Stream stream) {
  ops::tensor_zero(t, stream);
}

TensorView view_at(const Tensor& buf, size_t offset, std::initializer_list<int64_t> shape) {
  return TensorView(static_cast<char*>(buf.data()) + offset * dtype_size(buf.dtype()), buf.dtype(),
                    buf.device(), shape);
}

Tensor packed_copy(const TensorView& t, Stream stream) {
  Tensor out = Tensor::empty(std::span<const int64_t>(t.shape.data(), t.ndim), t.dtype, t.device);
  ops::tensor_copy(out.view(), t, stream);
  return out;
}

Tensor zeros_on(std::initializer_list<int64_t> shape, DType dtype, Device device, Stream stream) {
  Tensor out = Tensor::empty(shape, dtype, device);
  ops::tensor_zero(out.view(), stream);
  return out;
}

TensorView fp32_accumulator(const TensorView& t, Tensor& holder) {
  if (t.dtype == DType::kFloat32) return t;
  holder =
      Tensor::empty(std::span<const int64_t>(t.shape.data(), t.ndim), DType::kFloat32, t.device);
  return holder.view();
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

Tracker::Tracker(const SpOptions& opts, comm::Communicator* progress_comm, Device device)
    : opts_(opts), progress_comm_(progress_comm), device_(device), start_(Clock::now()) {
  if (device_.is_cuda()) {
    comm_stream_ = OwnedStream(device_);
    compute_done_ = Event(device_);
    comm_done_ = Event(device_);
  }
}

void Tracker::comm_after_compute() {
  if (!device_.is_cuda()) return;
  compute_done_.record(opts_.stream);
  compute_done_.block(comm_stream_.get());
}

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

void Tracker::run_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const TensorView& lse,
                          const ops::AttentionOptions& o, const std::vector<HeadSegment>& segs) {
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
}

void Tracker::run_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView& dout, const TensorView& lse,
                           const TensorView& dq, const TensorView& dk, const TensorView& dv,
                           const ops::AttentionOptions& o, bool accumulate,
                           const std::vector<HeadSegment>& segs) {
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
}

void Tracker::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView& lse, int64_t q_offset,
                      int64_t k_offset, bool causal, const std::vector<HeadSegment>& segs) {
  // The softmax scale comes from the full head dim, whatever the slicing.
  run_forward(q, k, v, out, lse, attn_options(q_offset, k_offset, causal), segs);
  pairs_ += static_cast<double>(q.size(0) * q.size(2)) *
            visible_pairs(q.size(1), k.size(1), q_offset, k_offset, causal);
}

void Tracker::backward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView& dout, const TensorView& lse,
                       const TensorView& dq, const TensorView& dk, const TensorView& dv,
                       int64_t q_offset, int64_t k_offset, bool causal, bool accumulate,
                       const std::vector<HeadSegment>& segs) {
  run_backward(q, k, v, out, dout, lse, dq, dk, dv, attn_options(q_offset, k_offset, causal),
               accumulate, segs);
  pairs_ += static_cast<double>(q.size(0) * q.size(2)) *
            visible_pairs(q.size(1), k.size(1), q_offset, k_offset, causal);
}

ops::docmask::Mask Tracker::mask() const {
  return {opts_.causal, opts_.window_left, opts_.window_right, opts_.sink_tokens};
}

Pieces Tracker::pieces(const Runs& qr, const Runs& kr) const {
  Pieces ps;
  ops::docmask::pieces(qr, kr, mask(), ps);
  return ps;
}

ops::AttentionOptions Tracker::piece_options(const ops::docmask::Piece& x) const {
  ops::AttentionOptions o = attn_options(x.q_pos, x.k_pos, opts_.causal);
  if (x.window) {
    o.window_left = opts_.window_left;
    o.window_right = opts_.window_right;
  }
  return o;
}

void Tracker::forward_pieces(const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& acc, const TensorView& acc_lse, const Pieces& ps,
                             const std::vector<HeadSegment>& segs, bool fresh) {
  if (ps.empty()) return;
  int64_t max_q = 0;
  for (const auto& x : ps) max_q = std::max(max_q, x.q_len);
  const int64_t b = q.size(0), hq = q.size(2), dv = v.size(3);
  if (!scratch_out_.defined() || scratch_out_.view().size(1) < max_q ||
      scratch_out_.view().size(2) != hq || scratch_out_.view().size(3) != dv ||
      scratch_out_.view().size(0) != b) {
    scratch_out_ = Tensor::empty({b, max_q, hq, dv}, DType::kFloat32, device_);
    scratch_lse_ = Tensor::empty({b, hq, max_q}, DType::kFloat32, device_);
  }
  const int64_t rows = q.size(1);
  std::vector<char> touched(fresh ? static_cast<size_t>(rows) : 0, 0);
  for (const auto& x : ps) {
    bool direct = fresh;
    if (fresh) {
      for (int64_t i = x.q_row; i < x.q_row + x.q_len && direct; ++i) direct = !touched[i];
      std::fill(touched.begin() + x.q_row, touched.begin() + x.q_row + x.q_len, 1);
    }
    const TensorView qx = q.slice(1, x.q_row, x.q_len);
    const TensorView kx = k.slice(1, x.k_row, x.k_len);
    const TensorView vx = v.slice(1, x.k_row, x.k_len);
    const TensorView ao = acc.slice(1, x.q_row, x.q_len);
    const TensorView al = acc_lse.slice(2, x.q_row, x.q_len);
    if (direct) {
      run_forward(qx, kx, vx, ao, al, piece_options(x), segs);
    } else {
      const TensorView po = scratch_out_.view().slice(1, 0, x.q_len);
      const TensorView pl = scratch_lse_.view().slice(2, 0, x.q_len);
      run_forward(qx, kx, vx, po, pl, piece_options(x), segs);
      merge(ao, al, po, pl);
    }
    pairs_ += static_cast<double>(b * hq) * x.pairs;
  }
}

void Tracker::backward_pieces(const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView& out, const TensorView& dout, const TensorView& lse,
                              const TensorView& dq, const TensorView& dk, const TensorView& dv,
                              const Pieces& ps, const std::vector<HeadSegment>& segs) {
  for (const auto& x : ps) {
    run_backward(q.slice(1, x.q_row, x.q_len), k.slice(1, x.k_row, x.k_len),
                 v.slice(1, x.k_row, x.k_len), out.slice(1, x.q_row, x.q_len),
                 dout.slice(1, x.q_row, x.q_len), lse.slice(2, x.q_row, x.q_len),
                 dq.slice(1, x.q_row, x.q_len), dk.slice(1, x.k_row, x.k_len),
                 dv.slice(1, x.k_row, x.k_len), piece_options(x), /*accumulate=*/true, segs);
    pairs_ += static_cast<double>(q.size(0) * q.size(2)) * x.pairs;
  }
}

Runs shifted(const Runs& runs, int64_t rows) {
  Runs out = runs;
  for (auto& r : out) r.row += rows;
  return out;
}

bool uses_pieces(const SpOptions& o) {
  return !o.cu_seqlens.empty() || o.window_left >= 0 || o.window_right >= 0 || o.sink_tokens > 0 ||
         o.sinks.data != nullptr;
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
  if (device_.is_cuda()) {
    h.wait_on(opts_.stream);
    exposed_s_ += seconds_since(t0);
    // NCCL: still pending on the host; finish() waits it (the watchdog's chance).
    if (h.valid()) pending_.push_back(std::move(h));
    return;
  }
  h.wait();
  exposed_s_ += seconds_since(t0);
}

void Tracker::wait_all(std::vector<comm::Handle>& hs) {
  for (auto& h : hs) wait(h);
}

void Tracker::finish() {
  if (device_.is_cuda()) {
    // The caller's stream is ordered after every transfer of the call (sends read the
    // caller's k, v until they complete), without a host wait.
    comm_done_.record(comm_stream_.get());
    comm_done_.block(opts_.stream);
    // Host completion of the ops the compute stream already waits for on the device. Not
    // counted as exposed: by now it mostly waits for the kernels the transfers overlapped.
    for (auto& h : pending_) h.wait();
    pending_.clear();
  }
  if (opts_.stats == nullptr) return;
  SpStats& s = *opts_.stats;
  s.total_s = seconds_since(start_);
  s.exposed_comm_s = exposed_s_;
  s.compute_s = compute_s_;
  s.steps = std::max(steps_, 1);
  s.visible_pairs = pairs_;
}

}  // namespace distattn::parallel::detail
