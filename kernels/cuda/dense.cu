// CUDA bodies of the dense ops (distattn/ops/dense.h): cuBLAS for the matrix product, one
// small kernel for each of the rest.
#include <cublas_v2.h>

#include <cmath>
#include <map>
#include <vector>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/dense_cuda.h"

namespace distattn::kernels::cuda {

namespace {

#define DISTATTN_CUBLAS_CHECK(expr)                                                              \
  do {                                                                                           \
    const cublasStatus_t distattn_cublas_rc_ = (expr);                                           \
    if (distattn_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                            \
      throw ::distattn::Error(                                                                   \
          ::distattn::Status::kCudaError,                                                        \
          ::distattn::detail::concat(#expr, " failed: ", static_cast<int>(distattn_cublas_rc_)), \
          __FILE__, __LINE__);                                                                   \
  } while (0)

// One cuBLAS handle per device, per host thread (a handle is not thread safe); kept for
// the life of the thread.
cublasHandle_t handle_for(int device) {
  thread_local std::map<int, cublasHandle_t> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasHandle_t h = nullptr;
  DISTATTN_CUBLAS_CHECK(cublasCreate(&h));
  DISTATTN_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  handles.emplace(device, h);
  return h;
}

cudaStream_t as_stream(Stream s) {
  return static_cast<cudaStream_t>(s);
}

constexpr int kThreads = 256;

__global__ void rms_norm_kernel(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy,
                                int64_t n, float eps) {
  const int64_t i = blockIdx.x;
  const float* xi = x + i * ldx;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) ss += xi[j] * xi[j];
  __shared__ float part[kThreads / 32];
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
    v = warp_sum(v);
    if (threadIdx.x == 0) part[0] = v;
  }
  __syncthreads();
  const float inv = rsqrtf(part[0] / static_cast<float>(n) + eps);
  float* yi = y + i * ldy;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) yi[j] = xi[j] * inv * (w ? w[j] : 1.0f);
}

__global__ void rope_kernel(float* x, int64_t m, int64_t ldx, int64_t heads, int64_t ldh,
                            int64_t dim, const int64_t* pos, double theta) {
  const int64_t half = dim / 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= m * half) return;
  const int64_t i = idx / half, j = idx % half;
  const double freq = pow(theta, -2.0 * static_cast<double>(j) / static_cast<double>(dim));
  const double ang = static_cast<double>(pos[i]) * freq;
  double sn, cs;
  sincos(ang, &sn, &cs);
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + i * ldx + h * ldh;
    const double a = v[j], b = v[j + half];
    v[j] = static_cast<float>(a * cs - b * sn);
    v[j + half] = static_cast<float>(a * sn + b * cs);
  }
}

__global__ void silu_mul_kernel(const float* g, int64_t ldg, const float* u, int64_t ldu, float* o,
                                int64_t ldo, int64_t m, int64_t n) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= m * n) return;
  const int64_t i = idx / n, j = idx % n;
  const float gv = g[i * ldg + j];
  o[i * ldo + j] = gv / (1.0f + expf(-gv)) * u[i * ldu + j];
}

__global__ void embedding_kernel(const float* table, int64_t ldt, const int32_t* ids, int64_t n,
                                 float* out, int64_t ldo) {
  const int64_t i = blockIdx.x;
  const float* src = table + static_cast<int64_t>(ids[i]) * ldt;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) out[i * ldo + j] = src[j];
}

__global__ void argmax_kernel(const float* x, int64_t ldx, int64_t n, int32_t* out) {
  const int64_t i = blockIdx.x;
  const float* xi = x + i * ldx;
  float bv = -INFINITY;
  int64_t bj = -1;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = xi[j];
    if (!isnan(v) && (bj < 0 || v > bv)) {
      bv = v;
      bj = j;
    }
  }
  __shared__ float sv[kThreads];
  __shared__ int64_t sj[kThreads];
  sv[threadIdx.x] = bv;
  sj[threadIdx.x] = bj;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = sv[threadIdx.x + s];
      const int64_t oj = sj[threadIdx.x + s];
      // Larger value wins; ties go to the smaller index; -1 (no finite value) loses.
      const bool take = oj >= 0 && (sj[threadIdx.x] < 0 || ov > sv[threadIdx.x] ||
                                    (ov == sv[threadIdx.x] && oj < sj[threadIdx.x]));
      if (take) {
        sv[threadIdx.x] = ov;
        sj[threadIdx.x] = oj;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[i] = static_cast<int32_t>(sj[0] < 0 ? 0 : sj[0]);
}

unsigned blocks_for(int64_t work) {
  return static_cast<unsigned>((work + kThreads - 1) / kThreads);
}

}  // namespace

void sgemm(int device, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float* c, int64_t ldc, bool accumulate, bool transpose_b, Stream stream) {
  DeviceGuard guard(device);
  cublasHandle_t h = handle_for(device);
  DISTATTN_CUBLAS_CHECK(cublasSetStream(h, as_stream(stream)));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  // Row-major C = A op(B) is column-major C^T = op(B)^T A^T: swap the operands.
  DISTATTN_CUBLAS_CHECK(cublasSgemm(h, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                                    static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                                    &alpha, b, static_cast<int>(ldb), a, static_cast<int>(lda),
                                    &beta, c, static_cast<int>(ldc)));
}

void rms_norm(int device, const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy,
              int64_t m, int64_t n, float eps, Stream stream) {
  DeviceGuard guard(device);
  rms_norm_kernel<<<static_cast<unsigned>(m), kThreads, 0, as_stream(stream)>>>(x, ldx, weight, y,
                                                                                ldy, n, eps);
  DISTATTN_CUDA_CHECK_LAUNCH("rms_norm_kernel");
}

void rope(int device, float* x, int64_t m, int64_t ldx, int64_t heads, int64_t ldh, int64_t dim,
          const int64_t* host_positions, double theta, Stream stream) {
  DeviceGuard guard(device);
  Workspace pos(static_cast<size_t>(m) * sizeof(int64_t), as_stream(stream));
  DISTATTN_CUDA_CHECK(cudaMemcpyAsync(pos.as<int64_t>(), host_positions,
                                      static_cast<size_t>(m) * sizeof(int64_t),
                                      cudaMemcpyHostToDevice, as_stream(stream)));
  rope_kernel<<<blocks_for(m * (dim / 2)), kThreads, 0, as_stream(stream)>>>(
      x, m, ldx, heads, ldh, dim, pos.as<int64_t>(), theta);
  DISTATTN_CUDA_CHECK_LAUNCH("rope_kernel");
  // Pageable host memory: the copy above has left the host buffer before it returned.
}

void silu_mul(int device, const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out,
              int64_t ldo, int64_t m, int64_t n, Stream stream) {
  DeviceGuard guard(device);
  silu_mul_kernel<<<blocks_for(m * n), kThreads, 0, as_stream(stream)>>>(gate, ldg, up, ldu, out,
                                                                         ldo, m, n);
  DISTATTN_CUDA_CHECK_LAUNCH("silu_mul_kernel");
}

void embedding(int device, const float* table, int64_t ldt, const int32_t* host_ids, int64_t m,
               int64_t n, float* out, int64_t ldo, Stream stream) {
  DeviceGuard guard(device);
  Workspace ids(static_cast<size_t>(m) * sizeof(int32_t), as_stream(stream));
  DISTATTN_CUDA_CHECK(cudaMemcpyAsync(ids.as<int32_t>(), host_ids,
                                      static_cast<size_t>(m) * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, as_stream(stream)));
  embedding_kernel<<<static_cast<unsigned>(m), kThreads, 0, as_stream(stream)>>>(
      table, ldt, ids.as<int32_t>(), n, out, ldo);
  DISTATTN_CUDA_CHECK_LAUNCH("embedding_kernel");
}

void argmax_rows(int device, const float* x, int64_t ldx, int64_t m, int64_t n, int32_t* host_out,
                 Stream stream) {
  DeviceGuard guard(device);
  Workspace out(static_cast<size_t>(m) * sizeof(int32_t), as_stream(stream));
  argmax_kernel<<<static_cast<unsigned>(m), kThreads, 0, as_stream(stream)>>>(x, ldx, n,
                                                                              out.as<int32_t>());
  DISTATTN_CUDA_CHECK_LAUNCH("argmax_kernel");
  DISTATTN_CUDA_CHECK(cudaMemcpyAsync(host_out, out.as<int32_t>(),
                                      static_cast<size_t>(m) * sizeof(int32_t),
                                      cudaMemcpyDeviceToHost, as_stream(stream)));
  DISTATTN_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
}

}  // namespace distattn::kernels::cuda
