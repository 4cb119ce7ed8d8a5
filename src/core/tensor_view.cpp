#include "distattn/core/tensor_view.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

#include "distattn/config.h"
#include "distattn/core/half.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn {

namespace {
void check_ndim(size_t n) {
  DISTATTN_CHECK(n <= static_cast<size_t>(kMaxDims), "tensor rank ", n, " exceeds the maximum ",
                 kMaxDims);
}
}  // namespace

TensorView::TensorView(void* d, DType t, Device dev, std::span<const int64_t> s)
    : data(d), dtype(t), device(dev), ndim(static_cast<int>(s.size())) {
  check_ndim(s.size());
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    DISTATTN_CHECK(s[i] >= 0, "negative extent ", s[i], " in dim ", i);
    shape[i] = s[i];
    strides[i] = stride;
    stride *= s[i];
  }
}

TensorView::TensorView(void* d, DType t, Device dev, std::span<const int64_t> s,
                       std::span<const int64_t> st)
    : data(d), dtype(t), device(dev), ndim(static_cast<int>(s.size())) {
  check_ndim(s.size());
  DISTATTN_CHECK(s.size() == st.size(), "shape has ", s.size(), " dims but strides have ",
                 st.size());
  for (int i = 0; i < ndim; ++i) {
    DISTATTN_CHECK(s[i] >= 0, "negative extent ", s[i], " in dim ", i);
    shape[i] = s[i];
    strides[i] = st[i];
  }
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != stride) return false;
    stride *= shape[i];
  }
  return true;
}

void* TensorView::element_ptr(std::span<const int64_t> index) const {
  DISTATTN_CHECK(static_cast<int>(index.size()) == ndim, "index has ", index.size(),
                 " dims, tensor has ", ndim);
  int64_t off = 0;
  for (int i = 0; i < ndim; ++i) off += index[i] * strides[i];
  return static_cast<char*>(data) + off * static_cast<int64_t>(element_size());
}

TensorView TensorView::slice(int dim, int64_t start, int64_t length) const {
  if (dim < 0) dim += ndim;
  DISTATTN_CHECK(dim >= 0 && dim < ndim, "slice dim ", dim, " out of range for ", str());
  DISTATTN_CHECK(start >= 0 && length >= 0 && start + length <= shape[dim], "slice [", start, ", ",
                 start + length, ") out of range for dim ", dim, " of ", str());
  TensorView v = *this;
  v.shape[dim] = length;
  v.data = static_cast<char*>(data) + start * strides[dim] * static_cast<int64_t>(element_size());
  return v;
}

TensorView TensorView::reshape(std::span<const int64_t> s) const {
  DISTATTN_CHECK(is_contiguous(), "reshape needs a contiguous tensor, got ", str());
  TensorView v(data, dtype, device, s);
  DISTATTN_CHECK(v.numel() == numel(), "reshape from ", shape_str(), " to ", v.shape_str(),
                 " changes the element count");
  return v;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

std::string TensorView::str() const {
  return std::string(dtype_name(dtype)) + shape_str() + " on " + device.str();
}

bool built_with_cuda() {
  return DISTATTN_WITH_CUDA != 0;
}

int cuda_device_count() {
#if DISTATTN_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

#if DISTATTN_WITH_CUDA
#define CORE_CUDA_CHECK(expr)                                                         \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      (void)cudaGetLastError();                                                       \
      DISTATTN_THROW(Status::kCudaError, #expr, " failed: ", cudaGetErrorString(e_)); \
    }                                                                                 \
  } while (0)
#endif

void* device_alloc(size_t bytes, Device device) {
  if (bytes == 0) bytes = 64;
  if (device.is_cpu()) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    DISTATTN_CHECK_STATUS(p != nullptr, Status::kInternal, "host allocation of ", bytes,
                          " bytes failed");
    return p;
  }
#if DISTATTN_WITH_CUDA
  void* p = nullptr;
  CORE_CUDA_CHECK(cudaSetDevice(device.index));
  CORE_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
#else
  DISTATTN_THROW(Status::kUnsupported,
                 "CUDA memory requested but distattn was built without CUDA "
                 "(rebuild with -DDISTATTN_CUDA=ON)");
#endif
}

void device_free(void* ptr, Device device) noexcept {
  if (ptr == nullptr) return;
  if (device.is_cpu()) {
    std::free(ptr);
    return;
  }
#if DISTATTN_WITH_CUDA
  cudaFree(ptr);
#endif
}

void device_copy(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  if (bytes == 0) return;
  if (dd.is_cpu() && sd.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if DISTATTN_WITH_CUDA
  // cudaMemcpy is not fully synchronous: from pageable host memory to the device it may
  // return once the data sits in a driver staging buffer, before the DMA lands, and a
  // device-to-device copy returns at once. It runs on the legacy default stream, which
  // non-blocking streams (distattn's, most users') do not wait for, so a kernel enqueued
  // there next could read stale bytes. Waiting for the legacy stream after the copy makes
  // every direction complete on return. Readers beware of the other direction too: the copy
  // does not wait for work on non-blocking streams that produces `src` (synchronize that
  // stream first).
  CORE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  CORE_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
#else
  DISTATTN_THROW(Status::kUnsupported, "CUDA copy requested but distattn was built without CUDA");
#endif
}

void device_memset_zero(void* ptr, Device device, size_t bytes) {
  if (bytes == 0) return;
  if (device.is_cpu()) {
    std::memset(ptr, 0, bytes);
    return;
  }
#if DISTATTN_WITH_CUDA
  // cudaMemset on device memory is asynchronous to the host and runs on the legacy default
  // stream, which non-blocking streams do not wait for: without the wait, a Tensor::zeros
  // followed by a kernel on such a stream could read the old contents. The memset is issued
  // with the buffer's device current (the legacy stream is per device), and the host waits
  // for it, so the zeros are in place for every stream on return.
  int prev = -1;
  CORE_CUDA_CHECK(cudaGetDevice(&prev));
  if (prev != device.index) CORE_CUDA_CHECK(cudaSetDevice(device.index));
  cudaError_t rc = cudaMemset(ptr, 0, bytes);
  if (rc == cudaSuccess) rc = cudaStreamSynchronize(cudaStreamLegacy);
  if (prev != device.index) (void)cudaSetDevice(prev);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();
    DISTATTN_THROW(
        Status::kCudaError, "zeroing ", bytes, " bytes on ", device.str(),
        " (cudaMemset + cudaStreamSynchronize(cudaStreamLegacy)) failed: ", cudaGetErrorString(rc));
  }
#else
  DISTATTN_THROW(Status::kUnsupported, "CUDA memset requested but distattn was built without CUDA");
#endif
}

DeviceType pointer_device_type(const void* ptr) {
#if DISTATTN_WITH_CUDA
  if (ptr == nullptr) return DeviceType::kCPU;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    (void)cudaGetLastError();
    return DeviceType::kCPU;
  }
  return (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged)
             ? DeviceType::kCUDA
             : DeviceType::kCPU;
#else
  (void)ptr;
  return DeviceType::kCPU;
#endif
}

namespace {
struct MemoryCounter {
  std::atomic<int64_t> current{0};
  std::atomic<int64_t> peak{0};
  void add(int64_t n) {
    const int64_t now = current.fetch_add(n) + n;
    int64_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }
};
MemoryCounter& counter(DeviceType t) {
  static MemoryCounter counters[2];
  return counters[t == DeviceType::kCPU ? 0 : 1];
}
}  // namespace

MemoryStats memory_stats(DeviceType type) {
  return {counter(type).current.load(), counter(type).peak.load()};
}
void reset_peak_memory(DeviceType type) {
  counter(type).peak.store(counter(type).current.load());
}

namespace {
struct RetainedMemory {
  std::atomic<bool> any{false};
  std::mutex mu;
  std::vector<std::pair<uintptr_t, size_t>> ranges;
  std::vector<std::pair<void*, Device>> kept;  // reachable, so leak checkers see no leak
};
RetainedMemory& retained() {
  static auto* r = new RetainedMemory;  // never destroyed: Tensors may die at exit
  return *r;
}
}  // namespace

namespace detail {
void retain_memory(const void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) return;
  RetainedMemory& r = retained();
  std::lock_guard<std::mutex> lock(r.mu);
  r.ranges.emplace_back(reinterpret_cast<uintptr_t>(ptr), bytes);
  r.any.store(true, std::memory_order_release);
}

bool memory_retained(const void* ptr, size_t bytes) noexcept {
  RetainedMemory& r = retained();
  if (!r.any.load(std::memory_order_acquire)) return false;
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(r.mu);
  for (const auto& [b, n] : r.ranges)
    if (a < b + n && b < a + std::max<size_t>(bytes, 1)) return true;
  return false;
}
}  // namespace detail

Tensor Tensor::empty(std::span<const int64_t> shape, DType dtype, Device device) {
  Tensor t;
  TensorView probe(nullptr, dtype, device, shape);
  const int64_t bytes = static_cast<int64_t>(probe.nbytes());
  void* p = device_alloc(probe.nbytes(), device);
  counter(device.type).add(bytes);
  t.buffer_ = std::shared_ptr<void>(p, [device, bytes](void* q) {
    counter(device.type).add(-bytes);
    if (detail::memory_retained(q, static_cast<size_t>(bytes))) {
      RetainedMemory& r = retained();
      std::lock_guard<std::mutex> lock(r.mu);
      try {
        r.kept.emplace_back(q, device);
      } catch (...) {
        // Out of memory: the storage leaks unrecorded, which is what it must do anyway.
      }
      return;
    }
    device_free(q, device);
  });
  t.view_ = TensorView(p, dtype, device, shape);
  return t;
}

Tensor Tensor::zeros(std::span<const int64_t> shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  device_memset_zero(t.data(), device, t.nbytes());
  return t;
}

namespace {
double load_as_double(const void* p, DType t) {
  switch (t) {
    case DType::kFloat32:
      return *static_cast<const float*>(p);
    case DType::kFloat64:
      return *static_cast<const double*>(p);
    case DType::kBFloat16:
      return bf16_t::to_float(*static_cast<const uint16_t*>(p));
    case DType::kFloat16:
      return fp16_t::to_float(*static_cast<const uint16_t*>(p));
    case DType::kInt32:
      return *static_cast<const int32_t*>(p);
    case DType::kInt64:
      return static_cast<double>(*static_cast<const int64_t*>(p));
    case DType::kUInt8:
      return *static_cast<const uint8_t*>(p);
  }
  return 0;
}
void store_from_double(void* p, DType t, double v) {
  switch (t) {
    case DType::kFloat32:
      *static_cast<float*>(p) = static_cast<float>(v);
      break;
    case DType::kFloat64:
      *static_cast<double*>(p) = v;
      break;
    case DType::kBFloat16:
      *static_cast<uint16_t*>(p) = bf16_t::from_float(static_cast<float>(v));
      break;
    case DType::kFloat16:
      *static_cast<uint16_t*>(p) = fp16_t::from_float(static_cast<float>(v));
      break;
    case DType::kInt32:
      *static_cast<int32_t*>(p) = static_cast<int32_t>(v);
      break;
    case DType::kInt64:
      *static_cast<int64_t*>(p) = static_cast<int64_t>(v);
      break;
    case DType::kUInt8:
      *static_cast<uint8_t*>(p) = static_cast<uint8_t>(v);
      break;
  }
}
}  // namespace

void convert_dtype_cpu(const TensorView& src, const TensorView& dst) {
  DISTATTN_CHECK(src.device.is_cpu() && dst.device.is_cpu(), "convert_dtype_cpu needs CPU tensors");
  DISTATTN_CHECK(src.is_contiguous() && dst.is_contiguous(),
                 "convert_dtype_cpu needs packed tensors");
  DISTATTN_CHECK(src.numel() == dst.numel(), "convert_dtype_cpu: ", src.str(), " vs ", dst.str(),
                 " differ in element count");
  const int64_t n = src.numel();
  const size_t se = src.element_size(), de = dst.element_size();
  const char* s = static_cast<const char*>(src.data);
  char* d = static_cast<char*>(dst.data);
  if (src.dtype == dst.dtype) {
    std::memmove(d, s, static_cast<size_t>(n) * se);
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    store_from_double(d + i * de, dst.dtype, load_as_double(s + i * se, src.dtype));
}

Tensor to_device(const TensorView& src, Device device) {
  Tensor out =
      Tensor::empty(std::span<const int64_t>(src.shape.data(), src.ndim), src.dtype, device);
  if (src.is_contiguous()) {
    device_copy(out.data(), device, src.data, src.device, src.nbytes());
    return out;
  }
  DISTATTN_CHECK(src.device.is_cpu(), "to_device: strided copies need a CPU source, got ",
                 src.str());
  Tensor host =
      device.is_cpu()
          ? out
          : Tensor::empty(std::span<const int64_t>(src.shape.data(), src.ndim), src.dtype);
  const size_t es = src.element_size();
  std::array<int64_t, kMaxDims> idx{};
  const int64_t n = src.numel();
  char* dst = static_cast<char*>(host.data());
  for (int64_t lin = 0; lin < n; ++lin) {
    std::memcpy(dst + lin * static_cast<int64_t>(es),
                src.element_ptr(std::span<const int64_t>(idx.data(), src.ndim)), es);
    for (int d = src.ndim - 1; d >= 0; --d) {
      if (++idx[d] < src.shape[d]) break;
      idx[d] = 0;
    }
  }
  if (!device.is_cpu()) device_copy(out.data(), device, host.data(), Device::cpu(), src.nbytes());
  return out;
}

}  // namespace distattn
