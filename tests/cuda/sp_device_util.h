#pragma once
// Helpers of the device-generic strategy tests (test_sp_cuda, test_mla_cuda_sharding): one
// all-ranks "is there a GPU" decision, an MPI-backend world per device type, and a user-created
// non-blocking CUDA stream (a no-op on CPU ranks), so one test body runs on CPU ranks in CI and
// on GPU ranks where a GPU is at hand.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "distattn/comm/communicator.h"
#include "distattn/config.h"
#include "distattn/core/device.h"
#include "distattn/core/error.h"
#include "distattn/runtime.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn::testing::sp_device {

// MPI world on host memory: rebuild reductions and the skip decision (never the code under test).
inline comm::Communicator& host_world() {
  static std::unique_ptr<comm::Communicator> w =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  return *w;
}

// True on every rank iff `local` is true on every rank. Collective over the world.
inline bool all_ranks(bool local) {
  int32_t v = local ? 1 : 0;
  host_world().all_reduce(&v, &v, 1, DType::kInt32, comm::ReduceOp::kMin);
  return v == 1;
}

// Every rank has a CUDA build, a visible GPU and a CUDA device bound by runtime_init. Decided
// once, collectively: the first call must happen on every rank at the same point (gtest runs
// the same tests in the same order on every rank).
inline bool gpu_usable() {
  static const bool usable =
      all_ranks(built_with_cuda() && cuda_device_count() > 0 && runtime_info().device.is_cuda());
  return usable;
}

// The device a strategy runs on and its world communicator: the MPI backend for both (it
// stages device memory through the host; NCCL refuses two ranks on one GPU). The CUDA device
// is the runtime's binding, cuda(local_rank % device_count).
struct DeviceWorld {
  Device device;
  std::shared_ptr<comm::Communicator> comm;
};

// Collective on first use of each type (create_world duplicates the MPI world).
inline DeviceWorld& device_world(DeviceType type) {
  if (type == DeviceType::kCPU) {
    static DeviceWorld cpu{Device::cpu(), comm::create_world(comm::Backend::kMpi, Device::cpu())};
    return cpu;
  }
  DISTATTN_CHECK(gpu_usable(), "device_world(kCUDA) needs a GPU on every rank (check gpu_usable)");
  static DeviceWorld gpu{runtime_info().device,
                         comm::create_world(comm::Backend::kMpi, runtime_info().device)};
  return gpu;
}

// A user-created non-blocking stream on a CUDA device (it does not synchronize with the legacy
// default stream, so work the library leaves on another stream is not waited for by accident);
// nullptr on the CPU.
class UserStream {
 public:
  explicit UserStream([[maybe_unused]] Device device) {
#if DISTATTN_WITH_CUDA
    if (device.is_cuda()) {
      check(cudaSetDevice(device.index), "cudaSetDevice");
      cudaStream_t s = nullptr;
      check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      stream_ = s;
    }
#endif
  }
  ~UserStream() {
#if DISTATTN_WITH_CUDA
    if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
#endif
  }
  UserStream(const UserStream&) = delete;
  UserStream& operator=(const UserStream&) = delete;

  Stream get() const {
    return stream_;
  }
  // Holds the stream back: work enqueued on it after this starts `ms` milliseconds later (a
  // host function that sleeps; it calls no CUDA API, as host functions must not). Inputs
  // written behind it are late, so a consumer on another stream that is not ordered after
  // this stream (by an event or a host wait) reads their old contents. No-op on the CPU.
  void delay([[maybe_unused]] int ms) const {
#if DISTATTN_WITH_CUDA
    if (stream_ != nullptr) {
      static_assert(sizeof(void*) >= sizeof(intptr_t));
      auto sleep = [](void* arg) {
        std::this_thread::sleep_for(std::chrono::milliseconds(reinterpret_cast<intptr_t>(arg)));
      };
      check(cudaLaunchHostFunc(static_cast<cudaStream_t>(stream_), sleep,
                               reinterpret_cast<void*>(static_cast<intptr_t>(ms))),
            "cudaLaunchHostFunc");
    }
#endif
  }
  // Waits for everything enqueued on the stream (results are read only after this).
  void synchronize() const {
#if DISTATTN_WITH_CUDA
    if (stream_ != nullptr) {
      check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)), "cudaStreamSynchronize");
      check(cudaGetLastError(), "a kernel launch before cudaStreamSynchronize");
    }
#endif
  }

 private:
#if DISTATTN_WITH_CUDA
  static void check(cudaError_t e, const char* what) {
    DISTATTN_CHECK(e == cudaSuccess, what, " failed: ", cudaGetErrorString(e));
  }
#endif
  Stream stream_ = nullptr;
};

}  // namespace distattn::testing::sp_device
