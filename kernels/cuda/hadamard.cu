// Batched fast Walsh-Hadamard transform (Sylvester order) of the last dim of fp32 rows.
// Rows up to kSmemWidth run entirely in shared memory, one block per row. Wider rows
// first transform each kSmemWidth-wide chunk in shared memory (the butterflies with
// stride < kSmemWidth never leave a chunk), then run one global-memory pass per remaining
// stride; the scale is applied in the last pass.
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mla_cuda.h"

namespace distattn::kernels::cuda {

namespace {

constexpr int64_t kSmemWidth = 8192;  // fp32: 32 KiB of shared memory
constexpr int kThreads = 512;
constexpr int kMaxLead = kMaxDims - 1;

struct RowMap {
  int nlead;
  int64_t size[kMaxLead];
  int64_t stride[kMaxLead];
  __device__ int64_t offset(int64_t row) const {
    // Fully unrolled so that size/stride stay in registers (no local-memory copy).
    int64_t off = 0;
#pragma unroll
    for (int d = kMaxLead - 1; d >= 0; --d) {
      if (d < nlead) {
        off += (row % size[d]) * stride[d];
        row /= size[d];
      }
    }
    return off;
  }
};

// grid.x = rows * (d / width): one block per chunk of `width` (<= kSmemWidth) values.
__global__ void __launch_bounds__(kThreads)
    fwht_smem_kernel(float* x, RowMap map, int64_t d, int width, float scale) {
  extern __shared__ float buf[];
  const int64_t chunks = d / width;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / chunks;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) % chunks;
  float* base = x + map.offset(row) + chunk * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) buf[i] = base[i];
  __syncthreads();
  for (int h = 1; h < width; h <<= 1) {
    for (int idx = threadIdx.x; idx < width / 2; idx += blockDim.x) {
      const int i = (idx / h) * 2 * h + idx % h;
      const float a = buf[i], b = buf[i + h];
      buf[i] = a + b;
      buf[i + h] = a - b;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < width; i += blockDim.x) base[i] = buf[i] * scale;
}

// One butterfly stage of stride h over every row: thread per (row, pair).
__global__ void __launch_bounds__(256)
    fwht_stage_kernel(float* x, RowMap map, int64_t rows, int64_t d, int64_t h, float scale) {
  const int64_t pairs = d / 2;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gid >= rows * pairs) return;
  const int64_t row = gid / pairs, idx = gid % pairs;
  const int64_t i = (idx / h) * 2 * h + idx % h;
  float* base = x + map.offset(row);
  const float a = base[i], b = base[i + h];
  base[i] = (a + b) * scale;
  base[i + h] = (a - b) * scale;
}

}  // namespace

void hadamard_transform(const TensorView& x, float scale, Stream stream_handle) {
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  if (rows == 0) return;
  DISTATTN_CHECK_STATUS(x.ndim - 1 <= kMaxLead, Status::kUnsupported,
                        "hadamard_transform: at most ", kMaxLead, " leading dims on CUDA");
  DeviceGuard guard(x.device.index);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  RowMap map{};
  map.nlead = x.ndim - 1;
  for (int i = 0; i < map.nlead; ++i) {
    map.size[i] = x.size(i);
    map.stride[i] = x.stride(i);
  }
  float* data = x.data_as<float>();
  const int width = static_cast<int>(d < kSmemWidth ? d : kSmemWidth);
  const bool wide = d > kSmemWidth;
  const int64_t blocks = rows * (d / width);
  DISTATTN_CHECK_STATUS(blocks <= INT32_MAX, Status::kUnsupported,
                        "hadamard_transform: too many rows for one launch (", rows, ")");
  const int threads = width / 2 >= kThreads ? kThreads : (width / 2 > 32 ? width / 2 : 32);
  const int smem = width * static_cast<int>(sizeof(float));
  fwht_smem_kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(data, map, d, width,
                                                                             wide ? 1.0f : scale);
  DISTATTN_CUDA_CHECK_LAUNCH("fwht_smem_kernel");
  if (!wide) return;
  const int64_t work = rows * (d / 2);
  DISTATTN_CHECK_STATUS((work + 255) / 256 <= INT32_MAX, Status::kUnsupported,
                        "hadamard_transform: too many rows for one launch (", rows, ")");
  for (int64_t h = kSmemWidth; h < d; h <<= 1) {
    const float s = (h << 1) == d ? scale : 1.0f;
    fwht_stage_kernel<<<static_cast<unsigned>((work + 255) / 256), 256, 0, stream>>>(data, map,
                                                                                     rows, d, h, s);
    DISTATTN_CUDA_CHECK_LAUNCH("fwht_stage_kernel");
  }
}

}  // namespace distattn::kernels::cuda
