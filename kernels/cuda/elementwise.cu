// Strided copy / add / fill on CUDA tensors (kernels/cuda/elementwise_cuda.h).
//
// The host first coalesces the shape (size-1 dims dropped, neighbours merged where both
// tensors are contiguous across them), so a packed tensor is one dim and a BSHD slice is a
// few. Same-dtype copies and zero fills of one dim (packed) or two dims with contiguous rows
// go to the copy/memset engines (cudaMemcpyAsync, cudaMemcpy2DAsync, cudaMemsetAsync,
// cudaMemset2DAsync). Everything else runs a grid-stride kernel (copy: raw moves when the
// dtypes match, else converting; add; fill by element size): thread i unravels
// linear index i over the coalesced shape and reads/writes at its strides (elements, 64-bit
// offsets). Indices are 32-bit when numel < 2^31 (integer division is the kernel's main cost)
// and 64-bit otherwise, so tensors of more than 2^31 elements work.
#include <cuda_runtime.h>

#include <array>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/elementwise_cuda.h"
#include "kernels/cuda/elementwise_index.h"

namespace distattn::kernels::cuda {

namespace {

using elementwise::coalesce;
using elementwise::is_packed;
using elementwise::is_pitched;
using elementwise::Layout;
using elementwise::unravel;

constexpr int kThreads = 256;
// Device-to-device 2-D copies and 2-D memsets only for rows of at least this many bytes.
constexpr int64_t kMinPitchedRowBytes = 512;

// Loads in the arithmetic type (float, or double for fp64) and rounding stores: a 16-bit
// destination of a double value rounds through float, as the CPU path does.
__device__ __forceinline__ float load_c(float x) {
  return x;
}
__device__ __forceinline__ double load_c(double x) {
  return x;
}
__device__ __forceinline__ float load_c(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float load_c(__half x) {
  return __half2float(x);
}

// NaN becomes the CPU's pattern (distattn/core/half.h: bf16 keeps the sign and top payload
// bits, quieted; fp16 is sign | 0x7e00) rather than the hardware's canonical 0x7fff, so that
// converting copies agree with the CPU path bit for bit on NaN too.
template <typename D, typename C>
__device__ __forceinline__ D store_c(C v) {
  if constexpr (std::is_same_v<D, double>) {
    return static_cast<double>(v);
  } else if constexpr (std::is_same_v<D, float>) {
    return static_cast<float>(v);
  } else if constexpr (std::is_same_v<D, __nv_bfloat16>) {
    const float f = static_cast<float>(v);
    if (isnan(f))
      return __ushort_as_bfloat16(static_cast<unsigned short>((__float_as_uint(f) >> 16) | 0x40u));
    return __float2bfloat16_rn(f);
  } else {
    const float f = static_cast<float>(v);
    if (isnan(f))
      return __ushort_as_half(
          static_cast<unsigned short>(((__float_as_uint(f) >> 16) & 0x8000u) | 0x7e00u));
    return __float2half_rn(f);
  }
}

template <typename D, typename S>
using ComputeT =
    std::conditional_t<std::is_same_v<D, double> || std::is_same_v<S, double>, double, float>;

template <typename D, typename S, typename Idx>
__global__ void __launch_bounds__(kThreads)
    copy_kernel(const Layout l, D* __restrict__ dst, const S* __restrict__ src) {
  using C = ComputeT<D, S>;
  const Idx n = static_cast<Idx>(l.numel);
  const Idx step = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx i = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += step) {
    int64_t od, os;
    unravel(l, i, od, os);
    dst[od] = store_c<D>(static_cast<C>(load_c(src[os])));
  }
}

// No __restrict__: dst and src may be the same tensor (x += x).
template <typename D, typename S, typename Idx>
__global__ void __launch_bounds__(kThreads) add_kernel(const Layout l, D* dst, const S* src) {
  using C = ComputeT<D, S>;
  const Idx n = static_cast<Idx>(l.numel);
  const Idx step = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx i = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += step) {
    int64_t od, os;
    unravel(l, i, od, os);
    dst[od] = store_c<D>(static_cast<C>(load_c(dst[od])) + static_cast<C>(load_c(src[os])));
  }
}

// Same-dtype strided copy: raw element moves (bit exact, NaN payloads included).
template <typename T, typename Idx>
__global__ void __launch_bounds__(kThreads)
    move_kernel(const Layout l, T* __restrict__ dst, const T* __restrict__ src) {
  const Idx n = static_cast<Idx>(l.numel);
  const Idx step = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx i = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += step) {
    int64_t od, os;
    unravel(l, i, od, os);
    dst[od] = src[os];
  }
}

// Bit-pattern fill by element size (zero and tensor_fill of any float dtype).
template <typename T, typename Idx>
__global__ void __launch_bounds__(kThreads)
    fill_kernel(const Layout l, T* __restrict__ dst, const T bits) {
  const Idx n = static_cast<Idx>(l.numel);
  const Idx step = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx i = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += step) {
    int64_t od, os;
    unravel(l, i, od, os);
    dst[od] = bits;
  }
}

// Enough blocks to fill the device a few times over; the grid-stride loop does the rest.
unsigned grid_for(int64_t numel) {
  const int64_t want = (numel + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(device_sm_count()) * 8;
  return static_cast<unsigned>(want < cap ? want : cap);
}

template <typename F>
void with_float_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat64:
      return f(double{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat16:
      return f(__half{});
    default:
      break;
  }
  DISTATTN_THROW(Status::kInternal, "CUDA elementwise: unexpected dtype ", dtype_name(t));
}

template <typename D, typename S>
void launch_copy(const Layout& l, void* dst, const void* src, cudaStream_t s) {
  const unsigned grid = grid_for(l.numel);
  if (l.numel <= INT32_MAX) {
    copy_kernel<D, S, uint32_t>
        <<<grid, kThreads, 0, s>>>(l, static_cast<D*>(dst), static_cast<const S*>(src));
  } else {
    copy_kernel<D, S, uint64_t>
        <<<grid, kThreads, 0, s>>>(l, static_cast<D*>(dst), static_cast<const S*>(src));
  }
  DISTATTN_CUDA_CHECK_LAUNCH("copy_kernel");
}

template <typename D, typename S>
void launch_add(const Layout& l, void* dst, const void* src, cudaStream_t s) {
  const unsigned grid = grid_for(l.numel);
  if (l.numel <= INT32_MAX) {
    add_kernel<D, S, uint32_t>
        <<<grid, kThreads, 0, s>>>(l, static_cast<D*>(dst), static_cast<const S*>(src));
  } else {
    add_kernel<D, S, uint64_t>
        <<<grid, kThreads, 0, s>>>(l, static_cast<D*>(dst), static_cast<const S*>(src));
  }
  DISTATTN_CUDA_CHECK_LAUNCH("add_kernel");
}

template <typename T>
void launch_move(const Layout& l, void* dst, const void* src, cudaStream_t s) {
  const unsigned grid = grid_for(l.numel);
  if (l.numel <= INT32_MAX) {
    move_kernel<T, uint32_t>
        <<<grid, kThreads, 0, s>>>(l, static_cast<T*>(dst), static_cast<const T*>(src));
  } else {
    move_kernel<T, uint64_t>
        <<<grid, kThreads, 0, s>>>(l, static_cast<T*>(dst), static_cast<const T*>(src));
  }
  DISTATTN_CUDA_CHECK_LAUNCH("move_kernel");
}

template <typename T>
void launch_fill(const Layout& l, void* dst, T bits, cudaStream_t s) {
  const unsigned grid = grid_for(l.numel);
  if (l.numel <= INT32_MAX) {
    fill_kernel<T, uint32_t><<<grid, kThreads, 0, s>>>(l, static_cast<T*>(dst), bits);
  } else {
    fill_kernel<T, uint64_t><<<grid, kThreads, 0, s>>>(l, static_cast<T*>(dst), bits);
  }
  DISTATTN_CUDA_CHECK_LAUNCH("fill_kernel");
}

// Element-sized bit pattern on every element of `t` (device already current).
void fill_bits(const TensorView& t, uint64_t bits, cudaStream_t s) {
  const Layout l = coalesce(t, t);
  const size_t es = t.element_size();
  if (bits == 0 && is_packed(l)) {
    DISTATTN_CUDA_CHECK(cudaMemsetAsync(t.data, 0, static_cast<size_t>(l.numel) * es, s));
    return;
  }
  if (bits == 0 && is_pitched(l, es, es, kMinPitchedRowBytes)) {
    DISTATTN_CUDA_CHECK(cudaMemset2DAsync(t.data, static_cast<size_t>(l.sa[0]) * es, 0,
                                          static_cast<size_t>(l.shape[1]) * es,
                                          static_cast<size_t>(l.shape[0]), s));
    return;
  }
  switch (es) {
    case 1:
      return launch_fill<uint8_t>(l, t.data, static_cast<uint8_t>(bits), s);
    case 2:
      return launch_fill<uint16_t>(l, t.data, static_cast<uint16_t>(bits), s);
    case 4:
      return launch_fill<uint32_t>(l, t.data, static_cast<uint32_t>(bits), s);
    case 8:
      return launch_fill<uint64_t>(l, t.data, bits, s);
    default:
      DISTATTN_THROW(Status::kInternal, "CUDA elementwise: unexpected element size ", es);
  }
}

cudaStream_t as_stream(Stream s) {
  return static_cast<cudaStream_t>(s);
}

}  // namespace

void tensor_copy(const TensorView& dst, const TensorView& src, Stream stream) {
  if (dst.numel() == 0) return;
  if (dst.data == src.data && dst.dtype == src.dtype && dst.strides == src.strides) return;
  DeviceGuard guard(dst.device.index);
  const cudaStream_t s = as_stream(stream);
  const Layout l = coalesce(dst, src);
  if (dst.dtype == src.dtype) {
    const size_t es = dst.element_size();
    if (is_packed(l)) {
      DISTATTN_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, static_cast<size_t>(l.numel) * es,
                                          cudaMemcpyDeviceToDevice, s));
      return;
    }
    if (is_pitched(l, es, es, kMinPitchedRowBytes)) {
      DISTATTN_CUDA_CHECK(
          cudaMemcpy2DAsync(dst.data, static_cast<size_t>(l.sa[0]) * es, src.data,
                            static_cast<size_t>(l.sb[0]) * es, static_cast<size_t>(l.shape[1]) * es,
                            static_cast<size_t>(l.shape[0]), cudaMemcpyDeviceToDevice, s));
      return;
    }
    switch (es) {
      case 2:
        return launch_move<uint16_t>(l, dst.data, src.data, s);
      case 4:
        return launch_move<uint32_t>(l, dst.data, src.data, s);
      case 8:
        return launch_move<uint64_t>(l, dst.data, src.data, s);
      default:
        DISTATTN_THROW(Status::kInternal, "CUDA tensor_copy: unexpected element size ", es);
    }
  }
  with_float_type(dst.dtype, [&](auto d) {
    with_float_type(src.dtype, [&](auto sv) {
      launch_copy<decltype(d), decltype(sv)>(l, dst.data, src.data, s);
    });
  });
}

void tensor_add(const TensorView& dst, const TensorView& src, Stream stream) {
  if (dst.numel() == 0) return;
  DeviceGuard guard(dst.device.index);
  const cudaStream_t s = as_stream(stream);
  const Layout l = coalesce(dst, src);
  with_float_type(src.dtype, [&](auto sv) {
    using S = decltype(sv);
    if (dst.dtype == DType::kFloat32) {
      launch_add<float, S>(l, dst.data, src.data, s);
    } else if (dst.dtype == DType::kFloat64) {
      launch_add<double, S>(l, dst.data, src.data, s);
    } else {
      DISTATTN_THROW(Status::kInternal, "CUDA tensor_add: dst must be fp32 or fp64, got ",
                     dtype_name(dst.dtype));
    }
  });
}

void tensor_zero(const TensorView& t, Stream stream) {
  if (t.numel() == 0) return;
  DeviceGuard guard(t.device.index);
  fill_bits(t, 0, as_stream(stream));
}

void tensor_fill_bits(const TensorView& t, uint64_t bits, Stream stream) {
  if (t.numel() == 0) return;
  DeviceGuard guard(t.device.index);
  fill_bits(t, bits, as_stream(stream));
}

void copy_from_host(const TensorView& dst, const TensorView& host, Stream stream) {
  if (dst.numel() == 0) return;
  DISTATTN_CHECK(host.device.is_cpu() && host.is_contiguous(),
                 "copy_from_host: host must be a packed CPU tensor, got ", host.str());
  DeviceGuard guard(dst.device.index);
  const cudaStream_t s = as_stream(stream);
  const Layout l = coalesce(dst, host);
  const size_t es = host.element_size();
  if (dst.dtype == host.dtype && is_packed(l)) {
    DISTATTN_CUDA_CHECK(cudaMemcpyAsync(dst.data, host.data, static_cast<size_t>(l.numel) * es,
                                        cudaMemcpyHostToDevice, s));
  } else if (dst.dtype == host.dtype && is_pitched(l, es, es)) {
    DISTATTN_CUDA_CHECK(
        cudaMemcpy2DAsync(dst.data, static_cast<size_t>(l.sa[0]) * es, host.data,
                          static_cast<size_t>(l.sb[0]) * es, static_cast<size_t>(l.shape[1]) * es,
                          static_cast<size_t>(l.shape[0]), cudaMemcpyHostToDevice, s));
  } else {
    // Upload packed, then convert/scatter on the device.
    Workspace staged(host.nbytes(), s);
    DISTATTN_CUDA_CHECK(
        cudaMemcpyAsync(staged.as<void>(), host.data, host.nbytes(), cudaMemcpyHostToDevice, s));
    const TensorView dev(staged.as<void>(), host.dtype, dst.device,
                         std::span<const int64_t>(host.shape.data(), host.ndim));
    tensor_copy(dst, dev, stream);
    DISTATTN_CUDA_CHECK(cudaStreamSynchronize(s));
    return;
  }
  // The host buffer belongs to the caller, who may free it on return.
  DISTATTN_CUDA_CHECK(cudaStreamSynchronize(s));
}

void copy_to_host(const TensorView& host, const TensorView& src, Stream stream) {
  if (src.numel() == 0) return;
  DISTATTN_CHECK(host.device.is_cpu() && host.is_contiguous() && host.dtype == src.dtype,
                 "copy_to_host: host must be a packed CPU tensor of src's dtype, got ", host.str(),
                 " for ", src.str());
  DeviceGuard guard(src.device.index);
  const cudaStream_t s = as_stream(stream);
  const Layout l = coalesce(host, src);
  const size_t es = src.element_size();
  if (is_packed(l)) {
    DISTATTN_CUDA_CHECK(cudaMemcpyAsync(host.data, src.data, static_cast<size_t>(l.numel) * es,
                                        cudaMemcpyDeviceToHost, s));
  } else if (is_pitched(l, es, es)) {
    DISTATTN_CUDA_CHECK(
        cudaMemcpy2DAsync(host.data, static_cast<size_t>(l.sa[0]) * es, src.data,
                          static_cast<size_t>(l.sb[0]) * es, static_cast<size_t>(l.shape[1]) * es,
                          static_cast<size_t>(l.shape[0]), cudaMemcpyDeviceToHost, s));
  } else {
    // Gather packed on the device, then download.
    Workspace staged(host.nbytes(), s);
    const TensorView dev(staged.as<void>(), src.dtype, src.device,
                         std::span<const int64_t>(src.shape.data(), src.ndim));
    tensor_copy(dev, src, stream);
    DISTATTN_CUDA_CHECK(
        cudaMemcpyAsync(host.data, staged.as<void>(), host.nbytes(), cudaMemcpyDeviceToHost, s));
    DISTATTN_CUDA_CHECK(cudaStreamSynchronize(s));
    return;
  }
  DISTATTN_CUDA_CHECK(cudaStreamSynchronize(s));
}

}  // namespace distattn::kernels::cuda
