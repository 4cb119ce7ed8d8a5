#pragma once
// Process bootstrap: MPI init, rank/size/local rank, GPU binding. Public headers never
// include mpi.h; only src/comm knows MPI.
#include <chrono>
#include <cstddef>
#include <functional>
#include <string>

#include "distattn/core/device.h"

namespace distattn {

struct RuntimeInfo {
  int rank = 0;
  int size = 1;
  int local_rank = 0;  // rank among processes on this node (MPI_Comm_split_type SHARED)
  int local_size = 1;
  std::string hostname;
  int cuda_devices = 0;  // visible CUDA devices on this node
  Device device{};       // bound device: cuda(local_rank % cuda_devices) when requested
};

struct RuntimeOptions {
  bool use_gpu = false;  // bind a GPU (cudaSetDevice(local_rank % count)) when one exists
  bool verbose = false;  // print one placement line per rank (also: DISTATTN_VERBOSE=1)
};

// Initializes MPI (MPI_THREAD_MULTIPLE when available, else FUNNELED) once. Safe to call
// again (returns the same info). Reads SLURM/Open MPI env vars only when MPI cannot tell.
const RuntimeInfo& runtime_init(int* argc, char*** argv, const RuntimeOptions& opts = {});
// Finalizes MPI if runtime_init initialized it. Idempotent.
void runtime_finalize();
bool runtime_initialized();
const RuntimeInfo& runtime_info();  // throws if not initialized
// Ends the whole job with `code` (MPI_Abort), for unrecoverable errors.
[[noreturn]] void runtime_abort(int code, const std::string& why);

// The watchdog timeout as DISTATTN_COMM_TIMEOUT_S gives it (seconds, may be fractional),
// else 300 s. comm::default_timeout() returns the same value; runtime_finalize() bounds its
// own waits by twice that (a peer still in a collective times out, reports and joins first).
std::chrono::milliseconds watchdog_timeout_from_env();

namespace detail {
// Work a layer above core (the MPI backend) must finish before MPI_Finalize: called by
// runtime_finalize() once every rank reached it, with the deadline it must meet. Returns
// how many items are still pending (then the job is ended with MPI_Abort instead of an
// MPI_Finalize that could block forever) and, in `why`, what they are. Hooks are kept for
// the life of the process; registering is thread-safe.
using FinalizeHook =
    std::function<size_t(std::chrono::steady_clock::time_point deadline, std::string* why)>;
void add_finalize_hook(FinalizeHook hook);
}  // namespace detail

}  // namespace distattn
