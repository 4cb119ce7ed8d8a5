#pragma once
// Internal: the NCCL backend of distattn::comm::Communicator (compiled only with NCCL).
// Only src/comm includes nccl.h. Device buffers only; every op is enqueued on the caller's
// stream and completes when an event recorded after it fires.
#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "distattn/comm/communicator.h"
#include "distattn/core/error.h"

// DISTATTN_NCCL_CHECK(ncclXxx(...), "context", ...) throws Error(kNcclError) with NCCL's own
// message, the failed call and the context. ncclInProgress is not an error (nonblocking
// communicators return it while work is being enqueued); callers wait for it separately.
#define DISTATTN_NCCL_CHECK(expr, ...)                                                             \
  do {                                                                                             \
    const ncclResult_t distattn_nccl_rc_ = (expr);                                                 \
    if (distattn_nccl_rc_ != ncclSuccess && distattn_nccl_rc_ != ncclInProgress)                   \
      throw ::distattn::Error(::distattn::Status::kNcclError,                                      \
                              ::distattn::detail::concat(__VA_ARGS__, ": ", #expr, " failed: ",    \
                                                         ::ncclGetErrorString(distattn_nccl_rc_)), \
                              __FILE__, __LINE__);                                                 \
  } while (0)

// DISTATTN_NCCL_CUDA_CHECK(cudaXxx(...), "context", ...) throws Error(kCudaError) (the NCCL
// backend's own, so that it never clashes with a DISTATTN_CUDA_CHECK defined elsewhere).
#define DISTATTN_NCCL_CUDA_CHECK(expr, ...)                                                        \
  do {                                                                                             \
    const cudaError_t distattn_cuda_rc_ = (expr);                                                  \
    if (distattn_cuda_rc_ != cudaSuccess)                                                          \
      throw ::distattn::Error(::distattn::Status::kCudaError,                                      \
                              ::distattn::detail::concat(__VA_ARGS__, ": ", #expr, " failed: ",    \
                                                         ::cudaGetErrorString(distattn_cuda_rc_)), \
                              __FILE__, __LINE__);                                                 \
  } while (0)

namespace distattn::comm {

// Communicator over an ncclComm_t it owns (nonblocking config, so that ncclCommAbort can
// always rescue a stuck operation).
class NcclCommunicator final : public Communicator {
 public:
  // Takes ownership of an initialized `comm` bound to `device`.
  NcclCommunicator(ncclComm_t comm, Device device);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Backend backend() const override { return Backend::kNccl; }
  bool accepts_device_memory() const override { return true; }
  bool accepts_host_memory() const override { return false; }

  Device device() const { return device_; }
  ncclComm_t nccl_comm() const { return comm_; }
  // Throws Error(kNcclError) naming `what` when NCCL reported an asynchronous error.
  void check_async(const std::string& what);

 protected:
  std::unique_ptr<PendingOp> start_all_reduce(const void* send, void* recv, size_t count,
                                              DType dtype, ReduceOp op, Stream s) override;
  std::unique_ptr<PendingOp> start_all_gather(const void* send, void* recv, size_t send_count,
                                              DType dtype, Stream s) override;
  std::unique_ptr<PendingOp> start_reduce_scatter(const void* send, void* recv, size_t recv_count,
                                                  DType dtype, ReduceOp op, Stream s) override;
  std::unique_ptr<PendingOp> start_all_to_all_v(const void* send,
                                                std::span<const size_t> send_counts,
                                                std::span<const size_t> send_displs, void* recv,
                                                std::span<const size_t> recv_counts,
                                                std::span<const size_t> recv_displs, DType dtype,
                                                Stream s) override;
  std::unique_ptr<PendingOp> start_all_to_all(const void* send, void* recv, size_t count,
                                              DType dtype, Stream s) override;
  std::unique_ptr<PendingOp> start_broadcast(const void* send, void* recv, size_t count,
                                             DType dtype, int root, Stream s) override;
  std::unique_ptr<PendingOp> start_group(std::span<const P2POp> ops, Stream s) override;
  std::unique_ptr<PendingOp> start_barrier() override;
  std::unique_ptr<Communicator> do_split(int color, int key) override;
  void do_abort() noexcept override;

 private:
  // Waits (under the watchdog) until NCCL finished enqueuing the last call on this
  // nonblocking communicator.
  void wait_enqueued(const char* what);
  // Records an event after the enqueued work on `stream` and returns the pending op.
  std::unique_ptr<PendingOp> finish_enqueue(const char* what, cudaStream_t stream);

  ncclComm_t comm_ = nullptr;
  Device device_;
  int rank_ = 0;
  int size_ = 1;
  cudaStream_t internal_stream_ = nullptr;  // barrier
  int* barrier_buf_ = nullptr;              // one device int for the barrier's all_reduce
};

}  // namespace distattn::comm
