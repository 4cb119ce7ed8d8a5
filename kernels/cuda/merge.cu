// NaN-safe LSE merge of two fp32 partials over disjoint key sets (in place allowed):
//   lse = max + log(exp(a - max) + exp(b - max)),  out = exp(a - lse) o_a + exp(b - lse) o_b
// both -inf -> out = 0, lse = -inf. One warp per (b, s, h) row: the warp reads both lse
// values before any lane writes, so lse may alias lse_a or lse_b.
#include <cuda_runtime.h>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/cuda_common.cuh"

namespace distattn::kernels::cuda {

namespace {

struct MergeParams {
  const float* oa;
  const float* ob;
  float* o;
  const float* la;
  const float* lb;
  float* l;
  int64_t oa_s[3], ob_s[3], o_s[3];  // batch, seq, head strides
  int64_t la_s[3], lb_s[3], l_s[3];  // batch, head, seq strides
  int64_t B, S, H, Dv;
};

__global__ void __launch_bounds__(128) merge_kernel(const MergeParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.S * p.H) return;
  const int64_t h = row % p.H, s = (row / p.H) % p.S, b = row / (p.H * p.S);
  const float a = p.la[b * p.la_s[0] + h * p.la_s[1] + s * p.la_s[2]];
  const float c = p.lb[b * p.lb_s[0] + h * p.lb_s[1] + s * p.lb_s[2]];
  __syncwarp();
  const float mx = fmaxf(a, c);
  float wa = 0.f, wb = 0.f, lse = -INFINITY;
  if (mx != -INFINITY) {
    const float ea = expf(a - mx), eb = expf(c - mx);
    lse = mx + logf(ea + eb);
    wa = expf(a - lse);
    wb = expf(c - lse);
  }
  const float* oa = p.oa + b * p.oa_s[0] + s * p.oa_s[1] + h * p.oa_s[2];
  const float* ob = p.ob + b * p.ob_s[0] + s * p.ob_s[1] + h * p.ob_s[2];
  float* o = p.o + b * p.o_s[0] + s * p.o_s[1] + h * p.o_s[2];
  for (int64_t d = lane; d < p.Dv; d += 32) {
    // A zero weight never multiplies its partial: a -inf partial's out may hold anything.
    const float x = (wa != 0.f ? wa * oa[d] : 0.f) + (wb != 0.f ? wb * ob[d] : 0.f);
    o[d] = x;
  }
  if (lane == 0) p.l[b * p.l_s[0] + h * p.l_s[1] + s * p.l_s[2]] = lse;
}

}  // namespace

void merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
           const TensorView& lse_b, const TensorView& out, const TensorView& lse, Stream stream) {
  MergeParams p{};
  p.oa = out_a.data_as<const float>();
  p.ob = out_b.data_as<const float>();
  p.o = out.data_as<float>();
  p.la = lse_a.data_as<const float>();
  p.lb = lse_b.data_as<const float>();
  p.l = lse.data_as<float>();
  for (int d = 0; d < 3; ++d) {
    p.oa_s[d] = out_a.stride(d);
    p.ob_s[d] = out_b.stride(d);
    p.o_s[d] = out.stride(d);
    p.la_s[d] = lse_a.stride(d);
    p.lb_s[d] = lse_b.stride(d);
    p.l_s[d] = lse.stride(d);
  }
  p.B = out_a.size(0);
  p.S = out_a.size(1);
  p.H = out_a.size(2);
  p.Dv = out_a.size(3);
  const int64_t rows = p.B * p.S * p.H;
  if (rows == 0) return;
  DISTATTN_CHECK_STATUS((rows + 3) / 4 <= INT32_MAX, Status::kUnsupported,
                        "attention_merge: too many rows (", rows, ") for one launch");
  // Launch on the tensors' device whatever the caller has current (as every other op).
  DeviceGuard guard(out.device.index);
  merge_kernel<<<static_cast<unsigned>((rows + 3) / 4), 128, 0,
                 static_cast<cudaStream_t>(stream)>>>(p);
  DISTATTN_CUDA_CHECK_LAUNCH("merge_kernel");
}

namespace {

struct SinkParams {
  float* o;
  float* l;
  const float* sinks;
  int64_t o_s[3], l_s[3], sink_s;
  int64_t B, S, H, Dv;
};

// One warp per (b, s, h) row: lse' = logaddexp(lse, sink), out *= exp(lse - lse').
__global__ void __launch_bounds__(128) apply_sinks_kernel(const SinkParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.S * p.H) return;
  const int64_t h = row % p.H, s = (row / p.H) % p.S, b = row / (p.H * p.S);
  float* lp = p.l + b * p.l_s[0] + h * p.l_s[1] + s * p.l_s[2];
  const float l = *lp;
  const float sk = p.sinks[h * p.sink_s];
  __syncwarp();
  float w = 0.f, nl = sk;
  if (l != -INFINITY) {
    const float mx = fmaxf(l, sk);
    nl = mx + logf(expf(l - mx) + expf(sk - mx));
    w = expf(l - nl);
  }
  float* o = p.o + b * p.o_s[0] + s * p.o_s[1] + h * p.o_s[2];
  for (int64_t d = lane; d < p.Dv; d += 32) o[d] = w != 0.f ? o[d] * w : 0.f;
  if (lane == 0) *lp = nl;
}

struct SinkGradParams {
  const void* o;
  const void* g;
  const float* l;
  const float* sinks;
  float* ds;
  Elt ot, gt;
  int64_t o_s[3], g_s[3], l_s[3], sink_s, ds_s;
  int64_t B, S, H, Dv;
  bool accumulate;
};

// One block per head: the block reduces -sum_rows e^{s - lse} (dO . O) in fp32.
__global__ void __launch_bounds__(256) sinks_backward_kernel(const SinkGradParams p) {
  const int64_t h = blockIdx.x;
  const float sk = p.sinks[h * p.sink_s];
  float acc = 0.f;
  for (int64_t r = threadIdx.x; r < p.B * p.S; r += blockDim.x) {
    const int64_t b = r / p.S, s = r % p.S;
    const float l = p.l[b * p.l_s[0] + h * p.l_s[1] + s * p.l_s[2]];
    const int64_t oo = b * p.o_s[0] + s * p.o_s[1] + h * p.o_s[2];
    const int64_t go = b * p.g_s[0] + s * p.g_s[1] + h * p.g_s[2];
    float dot = 0.f;
    for (int64_t d = 0; d < p.Dv; ++d)
      dot += load_elt(p.o, oo + d, p.ot) * load_elt(p.g, go + d, p.gt);
    if (dot != 0.f) acc += expf(sk - l) * dot;
  }
  __shared__ float red[256];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float* d = p.ds + h * p.ds_s;
    *d = (p.accumulate ? *d : 0.f) - red[0];
  }
}

}  // namespace

void apply_sinks(const TensorView& out, const TensorView& lse, const TensorView& sinks,
                 Stream stream) {
  SinkParams p{};
  p.o = out.data_as<float>();
  p.l = lse.data_as<float>();
  p.sinks = sinks.data_as<const float>();
  for (int d = 0; d < 3; ++d) {
    p.o_s[d] = out.stride(d);
    p.l_s[d] = lse.stride(d);
  }
  p.sink_s = sinks.stride(0);
  p.B = out.size(0);
  p.S = out.size(1);
  p.H = out.size(2);
  p.Dv = out.size(3);
  const int64_t rows = p.B * p.S * p.H;
  if (rows == 0) return;
  DISTATTN_CHECK_STATUS((rows + 3) / 4 <= INT32_MAX, Status::kUnsupported,
                        "attention_apply_sinks: too many rows (", rows, ") for one launch");
  DeviceGuard guard(out.device.index);
  apply_sinks_kernel<<<static_cast<unsigned>((rows + 3) / 4), 128, 0,
                       static_cast<cudaStream_t>(stream)>>>(p);
  DISTATTN_CUDA_CHECK_LAUNCH("apply_sinks_kernel");
}

void sinks_backward(const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& sinks, const TensorView& dsinks, bool accumulate,
                    Stream stream) {
  SinkGradParams p{};
  p.o = out.data;
  p.g = dout.data;
  p.l = lse.data_as<const float>();
  p.sinks = sinks.data_as<const float>();
  p.ds = dsinks.data_as<float>();
  p.ot = elt_of(out.dtype);
  p.gt = elt_of(dout.dtype);
  for (int d = 0; d < 3; ++d) {
    p.o_s[d] = out.stride(d);
    p.g_s[d] = dout.stride(d);
    p.l_s[d] = lse.stride(d);
  }
  p.sink_s = sinks.stride(0);
  p.ds_s = dsinks.stride(0);
  p.B = out.size(0);
  p.S = out.size(1);
  p.H = out.size(2);
  p.Dv = out.size(3);
  p.accumulate = accumulate;
  if (p.H == 0) return;
  DeviceGuard guard(out.device.index);
  sinks_backward_kernel<<<static_cast<unsigned>(p.H), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      p);
  DISTATTN_CUDA_CHECK_LAUNCH("sinks_backward_kernel");
}

}  // namespace distattn::kernels::cuda
