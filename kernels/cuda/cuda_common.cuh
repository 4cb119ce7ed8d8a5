#pragma once
// Internal helpers of the CUDA kernels (kernels/cuda only; never included by public
// headers): error checks, dtype loads/stores, the attention mask, warp reductions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "distattn/core/dtype.h"
#include "distattn/core/error.h"

// DISTATTN_CUDA_CHECK(cudaXxx(...)) throws Error(kCudaError) with CUDA's own message.
#define DISTATTN_CUDA_CHECK(expr)                                                                  \
  do {                                                                                             \
    const cudaError_t distattn_cuda_rc_ = (expr);                                                  \
    if (distattn_cuda_rc_ != cudaSuccess)                                                          \
      throw ::distattn::Error(                                                                     \
          ::distattn::Status::kCudaError,                                                          \
          ::distattn::detail::concat(#expr, " failed: ", ::cudaGetErrorString(distattn_cuda_rc_)), \
          __FILE__, __LINE__);                                                                     \
  } while (0)

// After every <<<...>>>: launch-configuration errors surface here, named by kernel.
#define DISTATTN_CUDA_CHECK_LAUNCH(name)                                                           \
  do {                                                                                             \
    const cudaError_t distattn_cuda_rc_ = cudaGetLastError();                                      \
    if (distattn_cuda_rc_ != cudaSuccess)                                                          \
      throw ::distattn::Error(::distattn::Status::kCudaError,                                      \
                              ::distattn::detail::concat("launch of ", name, " failed: ",          \
                                                         ::cudaGetErrorString(distattn_cuda_rc_)), \
                              __FILE__, __LINE__);                                                 \
  } while (0)

namespace distattn::kernels::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Runtime dtype codes for tensors whose dtype varies independently of the template type
// (out, dout, gradients: q's dtype or fp32).
enum class Elt : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline Elt elt_of(DType t) {
  switch (t) {
    case DType::kFloat32:
      return Elt::kF32;
    case DType::kBFloat16:
      return Elt::kBF16;
    case DType::kFloat16:
      return Elt::kF16;
    default:
      DISTATTN_THROW(Status::kInternal, "CUDA kernels: unexpected dtype ", dtype_name(t));
  }
}

__device__ __forceinline__ float to_f32(float x) {
  return x;
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_f32(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

__device__ __forceinline__ float load_elt(const void* p, int64_t i, Elt t) {
  switch (t) {
    case Elt::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case Elt::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_elt(void* p, int64_t i, Elt t, float v) {
  switch (t) {
    case Elt::kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    case Elt::kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The mask of distattn/ops/attention.h on global positions.
struct Mask {
  bool causal;
  int64_t window_left;   // < 0: unlimited
  int64_t window_right;  // < 0: unlimited
  __host__ __device__ bool visible(int64_t qpos, int64_t kpos) const {
    if (causal && kpos > qpos) return false;
    if (window_left >= 0 && kpos < qpos - window_left) return false;
    if (window_right >= 0 && kpos > qpos + window_right) return false;
    return true;
  }
  // Every query in [qlo, qhi] sees every key in [klo, khi] (the extreme pairs decide each
  // constraint): such a tile needs no per-element mask.
  __host__ __device__ bool all_visible(int64_t qlo, int64_t qhi, int64_t klo, int64_t khi) const {
    if (causal && khi > qlo) return false;
    if (window_left >= 0 && klo < qhi - window_left) return false;
    if (window_right >= 0 && khi > qlo + window_right) return false;
    return true;
  }
  // Visible key positions of queries in [qpos_lo, qpos_hi] lie in [lo, hi] (a superset).
  __host__ __device__ int64_t key_lo(int64_t qpos_lo) const {
    return window_left >= 0 ? qpos_lo - window_left : INT64_MIN / 4;
  }
  __host__ __device__ int64_t key_hi(int64_t qpos_hi) const {
    int64_t hi = INT64_MAX / 4;
    if (causal) hi = qpos_hi;
    if (window_right >= 0) hi = hi < qpos_hi + window_right ? hi : qpos_hi + window_right;
    return hi;
  }
  // Queries that can see keys in [kpos_lo, kpos_hi] have positions in [lo, hi] (a superset).
  __host__ __device__ int64_t query_lo(int64_t kpos_lo) const {
    int64_t lo = INT64_MIN / 4;
    if (causal) lo = kpos_lo;
    if (window_right >= 0) lo = lo > kpos_lo - window_right ? lo : kpos_lo - window_right;
    return lo;
  }
  __host__ __device__ int64_t query_hi(int64_t kpos_hi) const {
    return window_left >= 0 ? kpos_hi + window_left : INT64_MAX / 4;
  }
};

// Independent (batch, head) pairs of a launch spread over grid y and z: gridDim.y and
// gridDim.z are limited to 65535, so a plain y = B * H fails (cudaErrorInvalidConfiguration)
// from 65536 pairs on (e.g. 2048 sequences x 32 heads). y = min(pairs, 65535) and z slices
// of y pairs each; a block's pair is z_slice * gridDim.y + blockIdx.y, and blocks of the
// last slice past `pairs` return at once. `z_per_slice` further z entries per slice (the
// split-KV kernels put their splits there too) must keep z <= 65535.
constexpr int64_t kMaxGridYZ = 65535;
struct PairGrid {
  unsigned y = 1, z = 1;
};
inline PairGrid pair_grid(int64_t pairs, int64_t z_per_slice, const char* kernel) {
  const int64_t y = pairs < kMaxGridYZ ? (pairs > 0 ? pairs : 1) : kMaxGridYZ;
  // No pairs: one slice of blocks that return at once (a zero-sized grid is a launch error).
  const int64_t slices = pairs > 0 ? (pairs + y - 1) / y : 1;
  DISTATTN_CHECK_STATUS(slices * z_per_slice <= kMaxGridYZ, Status::kUnsupported, kernel, ": ",
                        pairs, " (batch, head) pairs x ", z_per_slice,
                        " splits exceed one launch's grid; split the batch into several calls");
  return PairGrid{static_cast<unsigned>(y), static_cast<unsigned>(slices * z_per_slice)};
}
#ifdef __CUDACC__
// This block's pair (see pair_grid); z_slice = blockIdx.z / z_per_slice.
__device__ __forceinline__ int64_t pair_index(unsigned z_slice) {
  return static_cast<int64_t>(z_slice) * gridDim.y + blockIdx.y;
}
#endif

// Number of SMs of the current device (cached per device ordinal).
int device_sm_count();

// Raises a kernel's dynamic shared memory limit once per (kernel, size) need.
void set_max_dynamic_smem(const void* kernel, int bytes);

// Makes `index` the current device for the guard's lifetime (kernels launch on the
// tensors' device, whatever the caller had current).
class DeviceGuard {
 public:
  explicit DeviceGuard(int index);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Scratch memory on `stream` (stream-ordered allocator), freed by the destructor on the
// same stream: callers never synchronize for their workspace.
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace distattn::kernels::cuda
