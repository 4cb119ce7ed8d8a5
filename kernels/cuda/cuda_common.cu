// Host helpers shared by the CUDA kernels (see cuda_common.cuh).
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "kernels/cuda/cuda_common.cuh"

namespace distattn::kernels::cuda {

int device_sm_count() {
  // Per device ordinal: a process may switch devices between calls.
  static std::mutex mu;
  static std::unordered_map<int, int> cache;
  int dev = 0;
  DISTATTN_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int sms = 0;
  DISTATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cache[dev] = sms;
  return sms;
}

void set_max_dynamic_smem(const void* kernel, int bytes) {
  // cudaFuncSetAttribute is cheap but not free; the attribute is per device, so remember
  // the largest size set for each (device, kernel).
  static std::mutex mu;
  static std::unordered_map<const void*, std::unordered_map<int, int>> done;
  int dev = 0;
  DISTATTN_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  int& have = done[kernel][dev];
  if (bytes <= have || bytes <= 48 * 1024) return;
  int optin = 0;
  DISTATTN_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  DISTATTN_CHECK_STATUS(bytes <= optin, Status::kUnsupported, "CUDA kernel needs ", bytes,
                        " bytes of shared memory per block but this device allows ", optin,
                        "; use smaller head dims");
  DISTATTN_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  have = bytes;
}

DeviceGuard::DeviceGuard(int index) {
  int current = 0;
  DISTATTN_CUDA_CHECK(cudaGetDevice(&current));
  if (current != index) {
    DISTATTN_CUDA_CHECK(cudaSetDevice(index));
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}

namespace {

// The stream-ordered pool's release threshold defaults to 0: every stream/event/device
// synchronization hands freed workspace back to the OS, so in a loop that synchronizes
// per call (benchmarks, decode steps) each call's cudaMallocAsync maps fresh memory.
// Keep up to this much cached per device (only raised, never lowered: a threshold the
// application set stays).
constexpr uint64_t kPoolKeepBytes = 64ull << 20;

void keep_pool_warm() {
  static std::mutex mu;
  static std::unordered_set<int> done;
  int dev = 0;
  DISTATTN_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(dev) != 0) return;
  cudaMemPool_t pool = nullptr;
  DISTATTN_CUDA_CHECK(cudaDeviceGetMemPool(&pool, dev));
  uint64_t have = 0;
  DISTATTN_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &have));
  if (have < kPoolKeepBytes) {
    uint64_t want = kPoolKeepBytes;
    DISTATTN_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &want));
  }
  done.insert(dev);
}

}  // namespace

Workspace::Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
  if (bytes == 0) return;
  keep_pool_warm();
  DISTATTN_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
}

Workspace::~Workspace() {
  // Destructors never throw: a failed free is reported by the next CUDA call.
  if (ptr_ != nullptr) (void)cudaFreeAsync(ptr_, stream_);
}

}  // namespace distattn::kernels::cuda
