#pragma once
// Internal: the MPI backend of distattn::comm::Communicator. Only src/comm includes mpi.h.
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "distattn/comm/communicator.h"
#include "distattn/core/error.h"

namespace distattn::comm {

std::string mpi_error_string(int code);

}  // namespace distattn::comm

// DISTATTN_MPI_CHECK(MPI_Xxx(...), "context", ...) throws Error(kMpiError) with MPI's own
// message, the failed call and the context (op, rank) when the call does not succeed.
#define DISTATTN_MPI_CHECK(expr, ...)                                                       \
  do {                                                                                      \
    const int distattn_mpi_rc_ = (expr);                                                    \
    if (distattn_mpi_rc_ != MPI_SUCCESS)                                                    \
      throw ::distattn::Error(                                                              \
          ::distattn::Status::kMpiError,                                                    \
          ::distattn::detail::concat(__VA_ARGS__, ": ", #expr, " failed: ",                 \
                                     ::distattn::comm::mpi_error_string(distattn_mpi_rc_)), \
          __FILE__, __LINE__);                                                              \
  } while (0)

namespace distattn::comm {

namespace detail {
struct MpiRegistry;
struct PinnedPool;
}  // namespace detail

// Communicator over an MPI communicator it owns (a duplicate, so its traffic never mixes
// with the application's). Host memory always; CUDA memory when built with CUDA, staged
// through pinned host buffers.
class MpiCommunicator final : public Communicator {
 public:
  // Duplicates MPI_COMM_WORLD (MPI_Comm_idup, under the watchdog).
  static std::unique_ptr<MpiCommunicator> dup_world();
  // Duplicates `comm` (collective over it; MPI_Comm_idup under the watchdog). `what` names
  // the caller in errors.
  static std::unique_ptr<MpiCommunicator> dup(MPI_Comm comm, const char* what);
  // Takes ownership of `comm` (freed on destruction); sets MPI_ERRORS_RETURN on it.
  MpiCommunicator(MPI_Comm comm, size_t max_count);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Backend backend() const override { return Backend::kMpi; }
  bool accepts_device_memory() const override;
  bool accepts_host_memory() const override { return true; }
  void progress() override;

  MPI_Comm mpi_comm() const { return comm_; }
  // Largest element count passed to one MPI call; larger messages are chunked or described
  // by a derived datatype (DISTATTN_MPI_MAX_COUNT, default INT_MAX; lowered in tests).
  size_t max_count() const { return max_count_; }

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
  friend class MpiOpBuilder;
  // Waits for a raw request (setup calls like idup/ibarrier) under the watchdog.
  void wait_setup(MPI_Request* req, const char* what);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  size_t max_count_;
  uint32_t staged_seq_ = 0;  // staged 16-bit sums posted so far (their second-stage tags)
  std::shared_ptr<detail::MpiRegistry> registry_;
  std::shared_ptr<detail::PinnedPool> pinned_;
};

// DISTATTN_MPI_MAX_COUNT, else INT_MAX.
size_t mpi_max_count_from_env();

namespace detail {
// Process-wide record of MPI requests that an abort or a watchdog timeout left behind.
// MPI cannot cancel them (collectives never), and MPI_Finalize with requests that never
// complete may block forever, so the first abandon registers a finalize hook (runtime.h)
// through which runtime_finalize() asks settle_abandoned_mpi_requests() and calls
// MPI_Abort instead of MPI_Finalize when some are still pending.
void abandon_mpi_requests(std::span<const MPI_Request> reqs, const std::string& why);
// Drives the abandoned requests (MPI_Testall) until all completed or `deadline` passed.
// Returns how many are still pending; `why` gets the first reason recorded.
size_t settle_abandoned_mpi_requests(std::chrono::steady_clock::time_point deadline,
                                     std::string* why);
}  // namespace detail

}  // namespace distattn::comm
