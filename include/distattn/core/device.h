#pragma once
#include <string>
#include <string_view>

namespace distattn {

enum class DeviceType { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;  // CUDA ordinal; 0 for CPU

  static Device cpu() { return {DeviceType::kCPU, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::kCUDA, index}; }
  bool is_cpu() const { return type == DeviceType::kCPU; }
  bool is_cuda() const { return type == DeviceType::kCUDA; }
  bool operator==(const Device&) const = default;
  std::string str() const;  // "cpu", "cuda:0"
};

// Opaque stream handle: a cudaStream_t for CUDA work, ignored (nullptr) on the CPU.
using Stream = void*;

// "cpu" or "cuda" / "cuda:N". Throws distattn::Error naming the accepted forms.
Device parse_device(std::string_view name);

// Number of visible CUDA devices; 0 when built without CUDA or when no driver/GPU is present.
int cuda_device_count();
// True when the build includes CUDA code (see distattn/config.h).
bool built_with_cuda();

}  // namespace distattn
