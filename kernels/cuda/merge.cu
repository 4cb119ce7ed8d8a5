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

}  // namespace distattn::kernels::cuda
