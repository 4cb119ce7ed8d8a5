// Host side of the CUDA attention ops: fills the kernels' parameter structs from validated
// views and picks a kernel (tensor cores where the dtype, head dims and alignment allow).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/flash_params.cuh"

namespace distattn::kernels::cuda {

namespace {

cudaStream_t to_stream(Stream s) {
  return static_cast<cudaStream_t>(s);
}

int to_int(int64_t x, const char* what) {
  DISTATTN_CHECK_STATUS(x <= INT32_MAX, Status::kUnsupported, "CUDA attention: ", what, " = ", x,
                        " exceeds 2^31 - 1");
  return static_cast<int>(x);
}

// Every row of t (last dim) starts on a 16-byte boundary and spans whole 16-byte chunks.
bool rows_vec16(const TensorView& t) {
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0 || t.size(-1) % vec != 0) return false;
  for (int d = 0; d < t.ndim - 1; ++d)
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  return true;
}

FwdParams make_params(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView& lse,
                      const ops::AttentionOptions& opts) {
  FwdParams p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.lse = lse.data_as<float>();
  p.q_s0 = q.stride(0), p.q_s1 = q.stride(1), p.q_s2 = q.stride(2);
  p.k_s0 = k.stride(0), p.k_s1 = k.stride(1), p.k_s2 = k.stride(2);
  p.v_s0 = v.stride(0), p.v_s1 = v.stride(1), p.v_s2 = v.stride(2);
  p.o_s0 = out.stride(0), p.o_s1 = out.stride(1), p.o_s2 = out.stride(2);
  p.l_s0 = lse.stride(0), p.l_s1 = lse.stride(1), p.l_s2 = lse.stride(2);
  p.B = to_int(q.size(0), "batch");
  p.Sq = to_int(q.size(1), "seq_q");
  p.Hq = to_int(q.size(2), "heads_q");
  p.Hkv = to_int(k.size(2), "heads_kv");
  p.G = p.Hkv > 0 ? p.Hq / p.Hkv : 1;
  p.D = to_int(q.size(3), "head_dim");
  p.Dv = to_int(v.size(3), "head_dim_v");
  p.Sk = k.size(1);
  p.scale_log2 = opts.scale_for(q.size(3)) * kLog2e;
  p.mask = Mask{opts.causal, opts.window_left, opts.window_right};
  p.q_offset = opts.q_offset;
  p.k_offset = opts.k_offset;
  p.out_elt = elt_of(out.dtype);
  p.kv_vec16 = rows_vec16(k) && rows_vec16(v);
  return p;
}

bool aligned16(const TensorView& t) {
  // Rows of 16-bit elements start on 16-byte boundaries: pointer and the batch, seq and
  // head strides (elements) multiples of 8.
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

using MmaLauncher = void (*)(const FwdParams&, bool, cudaStream_t);

MmaLauncher mma_launcher(const TensorView& q, const TensorView& k, const TensorView& v) {
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16) return nullptr;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v)) return nullptr;
  const int64_t D = q.size(3), Dv = v.size(3);
  if (D == 64 && Dv == 64) return launch_flash_fwd_mma_hdim64;
  if (D == 128 && Dv == 128) return launch_flash_fwd_mma_hdim128;
  if (D == 192 && Dv == 128) return launch_flash_fwd_mma_hdim192;
  return nullptr;
}

using BwdMmaLauncher = void (*)(const BwdParams&, bool, cudaStream_t);

// DISTATTN_CUDA_BACKWARD=simt forces the CUDA-core backward (read once).
bool backward_forced_simt() {
  static const bool forced = [] {
    const char* v = std::getenv("DISTATTN_CUDA_BACKWARD");
    return v != nullptr && std::string_view(v) == "simt";
  }();
  return forced;
}

BwdMmaLauncher bwd_mma_launcher(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& dout) {
  if (backward_forced_simt()) return nullptr;
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16) return nullptr;
  if (dout.dtype != q.dtype) return nullptr;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(dout)) return nullptr;
  const int64_t D = q.size(3), Dv = v.size(3);
  if (D != Dv) return nullptr;
  if (D == 64) return launch_flash_bwd_mma_hdim64;
  if (D == 128) return launch_flash_bwd_mma_hdim128;
  return nullptr;
}

void check_head_dims(const char* op, int64_t D, int64_t Dv) {
  DISTATTN_CHECK_STATUS(D <= kMaxHeadDim && Dv <= kMaxHeadDim, Status::kUnsupported, op,
                        ": CUDA kernels take head dims up to ", kMaxHeadDim, ", got D = ", D,
                        ", Dv = ", Dv, "; split the head dim or use CPU tensors");
}

// Split-KV forward (decode): num_splits chunks of the keys, then an LSE combine.
void split_kv_forward(FwdParams p, DType dtype, bool paged, int64_t max_keys, int requested,
                      cudaStream_t stream) {
  if (p.B == 0 || p.Sq == 0 || p.Hq == 0) return;
  int64_t splits = requested;
  if (splits <= 0) {
    // About four blocks per SM (the CUDA-core kernel fits five at D = 128: 40 KB of shared
    // memory each), so enough loads are in flight to stream the cache at memory bandwidth
    // (two per SM gave B 8 x 8 KV heads at 256K keys only 5 splits of 52K keys each, on
    // 320 blocks); chunks of at least 256 keys.
    const int64_t blocks = (static_cast<int64_t>(p.Sq) * p.G + 15) / 16 * p.B * p.Hkv;
    const int64_t want = (4 * device_sm_count() + blocks - 1) / std::max<int64_t>(blocks, 1);
    splits = std::min<int64_t>(want, max_keys / 256);
  }
  splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, std::min<int64_t>(max_keys, 1024)));
  const int64_t split_keys = std::max<int64_t>(1, (max_keys + splits - 1) / splits);
  splits = std::max<int64_t>(1, (max_keys + split_keys - 1) / split_keys);
  if (splits == 1) {
    launch_flash_fwd_simt(p, dtype, paged, stream);
    return;
  }
  p.num_splits = static_cast<int>(splits);
  p.split_keys = split_keys;
  const size_t rows = static_cast<size_t>(p.B) * p.Sq * p.Hq;
  Workspace ws(static_cast<size_t>(splits) * rows * (static_cast<size_t>(p.Dv) + 1) * sizeof(float),
               stream);
  p.ws_out = ws.as<float>();
  p.ws_lse = p.ws_out + static_cast<size_t>(splits) * rows * static_cast<size_t>(p.Dv);
  launch_flash_fwd_simt(p, dtype, paged, stream);
  launch_combine_splits(p, stream);
}

}  // namespace

bool flash_forward_uses_tensor_cores(const TensorView& q, const TensorView& k,
                                     const TensorView& v) {
  return mma_launcher(q, k, v) != nullptr;
}

void flash_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse,
                   const ops::AttentionOptions& opts) {
  check_head_dims("attention_forward", q.size(3), v.size(3));
  if (q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0) return;
  DeviceGuard guard(q.device.index);
  const FwdParams p = make_params(q, k, v, out, lse, opts);
  if (MmaLauncher launch = mma_launcher(q, k, v)) {
    launch(p, q.dtype == DType::kBFloat16, to_stream(opts.stream));
    return;
  }
  launch_flash_fwd_simt(p, q.dtype, /*paged=*/false, to_stream(opts.stream));
}

void flash_forward_simt(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse,
                        const ops::AttentionOptions& opts) {
  check_head_dims("attention_forward", q.size(3), v.size(3));
  if (q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0) return;
  DeviceGuard guard(q.device.index);
  launch_flash_fwd_simt(make_params(q, k, v, out, lse, opts), q.dtype, false,
                        to_stream(opts.stream));
}

namespace {

enum class BwdPath { kAuto, kSimt };

void run_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& out, const TensorView& dout, const TensorView& lse,
                  const TensorView& dq, const TensorView& dk, const TensorView& dv,
                  const ops::AttentionOptions& opts, const ops::BackwardOptions& bopts,
                  BwdPath path) {
  check_head_dims("attention_backward", q.size(3), v.size(3));
  if (q.size(0) == 0) return;
  DeviceGuard guard(q.device.index);
  const cudaStream_t stream = to_stream(opts.stream);
  BwdParams p;
  p.f = make_params(q, k, v, out, lse, opts);
  p.dout = dout.data;
  p.dout_elt = elt_of(dout.dtype);
  p.do_s0 = dout.stride(0), p.do_s1 = dout.stride(1), p.do_s2 = dout.stride(2);
  p.dq = dq.data;
  p.dk = dk.data;
  p.dv = dv.data;
  p.dq_elt = elt_of(dq.dtype);
  p.dk_elt = elt_of(dk.dtype);
  p.dv_elt = elt_of(dv.dtype);
  p.dq_s0 = dq.stride(0), p.dq_s1 = dq.stride(1), p.dq_s2 = dq.stride(2);
  p.dk_s0 = dk.stride(0), p.dk_s1 = dk.stride(1), p.dk_s2 = dk.stride(2);
  p.dv_s0 = dv.stride(0), p.dv_s1 = dv.stride(1), p.dv_s2 = dv.stride(2);
  p.scale = opts.scale_for(q.size(3));
  p.accumulate = bopts.accumulate;
  const size_t rows = static_cast<size_t>(p.f.B) * p.f.Hq * p.f.Sq;
  Workspace ws(rows * sizeof(float), stream);
  p.delta = ws.as<float>();
  const BwdMmaLauncher mma = path == BwdPath::kAuto ? bwd_mma_launcher(q, k, v, dout) : nullptr;
  if (mma != nullptr) {
    launch_bwd_delta(p, stream);
    mma(p, q.dtype == DType::kBFloat16, stream);
    return;
  }
  launch_flash_bwd_simt(p, q.dtype, stream);
}

}  // namespace

void flash_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& dq, const TensorView& dk, const TensorView& dv,
                    const ops::AttentionOptions& opts, const ops::BackwardOptions& bopts) {
  run_backward(q, k, v, out, dout, lse, dq, dk, dv, opts, bopts, BwdPath::kAuto);
}

void flash_backward_simt(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView& dout, const TensorView& lse,
                         const TensorView& dq, const TensorView& dk, const TensorView& dv,
                         const ops::AttentionOptions& opts, const ops::BackwardOptions& bopts) {
  run_backward(q, k, v, out, dout, lse, dq, dk, dv, opts, bopts, BwdPath::kSimt);
}

bool flash_backward_uses_tensor_cores(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& dout) {
  return bwd_mma_launcher(q, k, v, dout) != nullptr;
}

void decode(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
            const TensorView& lse, const ops::AttentionOptions& opts,
            const ops::DecodeOptions& dopts) {
  check_head_dims("attention_decode", q.size(3), v.size(3));
  DeviceGuard guard(q.device.index);
  split_kv_forward(make_params(q, k, v, out, lse, opts), q.dtype, /*paged=*/false, k.size(1),
                   dopts.num_splits, to_stream(opts.stream));
}

void decode_paged(const TensorView& q, const ops::PagedKV& cache, const TensorView& out,
                  const TensorView& lse, const ops::AttentionOptions& opts,
                  const ops::DecodeOptions& dopts, int64_t max_seq_len) {
  check_head_dims("attention_decode_paged", q.size(3), cache.v_pages.size(3));
  DeviceGuard guard(q.device.index);
  // make_params reads k/v as [pages, page_size, Hkv, D]: stride 0 is the page stride.
  FwdParams p = make_params(q, cache.k_pages, cache.v_pages, out, lse, opts);
  p.Sk = max_seq_len;
  p.page_table = cache.page_table.data_as<const int32_t>();
  p.pt_s0 = cache.page_table.stride(0);
  p.pt_s1 = cache.page_table.stride(1);
  p.seq_lens = cache.seq_lens.data_as<const int32_t>();
  p.sl_s0 = cache.seq_lens.stride(0);
  p.page_size = cache.page_size();
  split_kv_forward(p, q.dtype, /*paged=*/true, std::max<int64_t>(max_seq_len, 1), dopts.num_splits,
                   to_stream(opts.stream));
}

}  // namespace distattn::kernels::cuda
