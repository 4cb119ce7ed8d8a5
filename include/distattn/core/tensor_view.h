#pragma once
// TensorView: a non-owning view (pointer, dtype, device, shape, strides in elements).
// Tensor: an owning buffer (host or CUDA) that hands out views; for tools, tests and
// strategies' scratch space.
#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "distattn/core/device.h"
#include "distattn/core/dtype.h"
#include "distattn/core/error.h"

namespace distattn {

constexpr int kMaxDims = 6;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in elements

  TensorView() = default;
  // Packed row-major view.
  TensorView(void* data, DType dtype, Device device, std::span<const int64_t> shape);
  TensorView(void* data, DType dtype, Device device, std::initializer_list<int64_t> shape)
      : TensorView(data, dtype, device, std::span<const int64_t>(shape.begin(), shape.size())) {}
  // Explicit strides (elements).
  TensorView(void* data, DType dtype, Device device, std::span<const int64_t> shape,
             std::span<const int64_t> strides);

  int64_t size(int dim) const { return shape[static_cast<size_t>(dim < 0 ? dim + ndim : dim)]; }
  int64_t stride(int dim) const { return strides[static_cast<size_t>(dim < 0 ? dim + ndim : dim)]; }
  int64_t numel() const;
  size_t element_size() const { return dtype_size(dtype); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * element_size(); }
  bool is_contiguous() const;  // packed row-major
  bool empty() const { return numel() == 0; }

  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data);
  }
  // Pointer to element at multi-index (in elements of dtype).
  void* element_ptr(std::span<const int64_t> index) const;

  // Sub-range [start, start+length) along dim; same strides.
  TensorView slice(int dim, int64_t start, int64_t length) const;
  // Same data, new packed shape; requires is_contiguous().
  TensorView reshape(std::span<const int64_t> new_shape) const;
  TensorView reshape(std::initializer_list<int64_t> s) const {
    return reshape(std::span<const int64_t>(s.begin(), s.size()));
  }

  std::string shape_str() const;  // "[2, 128, 8, 64]"
  std::string str() const;        // "bf16[2, 128, 8, 64] on cpu"
};

// Owning buffer. Host memory is 64-byte aligned; CUDA memory comes from cudaMalloc.
class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(std::span<const int64_t> shape, DType dtype, Device device = Device::cpu());
  static Tensor empty(std::initializer_list<int64_t> shape, DType dtype,
                      Device device = Device::cpu()) {
    return empty(std::span<const int64_t>(shape.begin(), shape.size()), dtype, device);
  }
  static Tensor zeros(std::span<const int64_t> shape, DType dtype, Device device = Device::cpu());
  static Tensor zeros(std::initializer_list<int64_t> shape, DType dtype,
                      Device device = Device::cpu()) {
    return zeros(std::span<const int64_t>(shape.begin(), shape.size()), dtype, device);
  }

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  void* data() const { return view_.data; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(view_.data);
  }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return view_.nbytes(); }
  DType dtype() const { return view_.dtype; }
  Device device() const { return view_.device; }
  bool defined() const { return static_cast<bool>(buffer_); }

 private:
  std::shared_ptr<void> buffer_;
  TensorView view_;
};

// Bytes held by live Tensor buffers, per device type (all devices of a type together).
// Peak is the high-water mark since the last reset; strategies' memory tests assert on it.
struct MemoryStats {
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
};
MemoryStats memory_stats(DeviceType type);
void reset_peak_memory(DeviceType type);  // peak := current

// Raw allocation on a device (host: 64-byte aligned). Free with device_free.
void* device_alloc(size_t bytes, Device device);
void device_free(void* ptr, Device device) noexcept;
// Copies between any two devices (host<->CUDA through cudaMemcpy). Synchronous.
void device_copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes);
void device_memset_zero(void* ptr, Device device, size_t bytes);
// Copy of a view into a packed tensor on `device` (strided views are gathered).
Tensor to_device(const TensorView& src, Device device);
// Elementwise dtype conversion of packed views of equal shape on the CPU (any float types).
void convert_dtype_cpu(const TensorView& src, const TensorView& dst);
// Where a pointer lives: kCUDA for device/managed memory, kCPU otherwise (always kCPU
// without CUDA).
DeviceType pointer_device_type(const void* ptr);

namespace detail {
// Memory a communication backend may still write after an abort (the buffers of requests
// MPI cannot cancel). A Tensor whose storage overlaps it is never freed: its storage is kept
// for the life of the process instead, so an op abandoned by the watchdog cannot write into
// memory that was reused (a strategy unwinding after a timeout frees its receive buffers).
// Thread-safe; free of cost (one relaxed load per Tensor free) while nothing is retained.
void retain_memory(const void* ptr, size_t bytes);
bool memory_retained(const void* ptr, size_t bytes) noexcept;
}  // namespace detail

}  // namespace distattn
