// Process bootstrap: MPI init, rank/size/local rank, hostname, GPU binding.
#include "distattn/runtime.h"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "distattn/config.h"
#include "distattn/core/error.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn {
namespace {

struct RuntimeState {
  std::mutex mu;
  RuntimeInfo info;
  bool initialized = false;
  bool we_initialized_mpi = false;
  bool finalized = false;
};

RuntimeState& state() {
  static RuntimeState s;
  return s;
}

struct FinalizeHooks {
  std::mutex mu;
  std::vector<detail::FinalizeHook> hooks;
};
FinalizeHooks& finalize_hooks() {
  static auto* h = new FinalizeHooks;  // never destroyed: used from runtime_finalize
  return *h;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || x < 0 || x > INT_MAX) return fallback;
  return static_cast<int>(x);
}

// Local rank/size from the launcher, used only if MPI_Comm_split_type fails.
void local_from_env(RuntimeInfo& info) {
  info.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", env_int("SLURM_LOCALID", 0));
  info.local_size =
      env_int("OMPI_COMM_WORLD_LOCAL_SIZE", env_int("SLURM_NTASKS_PER_NODE", info.size));
}

// DISTATTN_VERBOSE: set and not "0"/"false"/"no"/"off" turns on the placement summary.
// Read once, by runtime_init.
bool env_verbose() {
  const char* v = std::getenv("DISTATTN_VERBOSE");
  if (v == nullptr || *v == '\0') return false;
  const std::string s(v);
  return s != "0" && s != "false" && s != "no" && s != "off" && s != "FALSE" && s != "OFF";
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) == 0 && buf[0] != '\0') return buf;
  char mpi_buf[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  if (MPI_Get_processor_name(mpi_buf, &len) == MPI_SUCCESS && len > 0)
    return {mpi_buf, size_t(len)};
  return "unknown-host";
}

}  // namespace

const RuntimeInfo& runtime_init(int* argc, char*** argv, const RuntimeOptions& opts) {
  RuntimeState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.initialized) return s.info;
  DISTATTN_CHECK_STATUS(!s.finalized, Status::kInternal,
                        "runtime_init called after runtime_finalize: MPI cannot be "
                        "re-initialized in one process; initialize once at program start");

  int mpi_ready = 0;
  MPI_Initialized(&mpi_ready);
  if (!mpi_ready) {
    // Open MPI 4.x libnbc picks a binomial MPI_Iallreduce below 4 ranks (and in place)
    // whatever the message size: at 16 MiB on 2 ranks that ran at ~0.75x of the blocking
    // MPI_Allreduce. At 2 and 3 ranks ring needs no more steps than binomial at any size
    // and moves half (2/3) the data, so ask for it unless the user chose an algorithm.
    // From 4 ranks on, libnbc already uses ring for large out-of-place messages and ring
    // would add steps to small ones, so the default stays. Other MPIs ignore the variable.
    if (std::getenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm") == nullptr) {
      const int world = env_int("OMPI_COMM_WORLD_SIZE", env_int("PMIX_SIZE", 0));
      if (world == 2 || world == 3) setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", 0);
    }
    // MULTIPLE lets progress threads and strategies drive MPI concurrently; an MPI build
    // that cannot give it still works for the single-threaded call pattern (FUNNELED).
    int provided = MPI_THREAD_SINGLE;
    const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    DISTATTN_CHECK_STATUS(rc == MPI_SUCCESS, Status::kMpiError, "MPI_Init_thread failed (rc ", rc,
                          "); launch with mpirun/srun");
    if (provided < MPI_THREAD_FUNNELED) {
      std::fprintf(stderr,
                   "[distattn] warning: MPI provides thread level %d (< FUNNELED); call distattn "
                   "only from the main thread\n",
                   provided);
    }
    s.we_initialized_mpi = true;
  }

  RuntimeInfo info;
  MPI_Comm_rank(MPI_COMM_WORLD, &info.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &info.size);
  set_error_rank(info.rank);

  MPI_Comm node = MPI_COMM_NULL;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, info.rank, MPI_INFO_NULL, &node) ==
          MPI_SUCCESS &&
      node != MPI_COMM_NULL) {
    MPI_Comm_rank(node, &info.local_rank);
    MPI_Comm_size(node, &info.local_size);
    MPI_Comm_free(&node);
  } else {
    local_from_env(info);
  }
  info.hostname = host_name();
  info.cuda_devices = cuda_device_count();
  info.device = Device::cpu();
#if DISTATTN_WITH_CUDA
  if (opts.use_gpu && info.cuda_devices > 0) {
    const int dev = info.local_rank % info.cuda_devices;
    const cudaError_t e = cudaSetDevice(dev);
    DISTATTN_CHECK_STATUS(e == cudaSuccess, Status::kCudaError, "cudaSetDevice(", dev,
                          ") failed on rank ", info.rank, ": ", cudaGetErrorString(e));
    info.device = Device::cuda(dev);
  }
#endif
  if (opts.verbose || env_verbose()) {
    std::printf("[distattn] rank %d/%d local %d/%d host %s device %s (cuda devices: %d)\n",
                info.rank, info.size, info.local_rank, info.local_size, info.hostname.c_str(),
                info.device.str().c_str(), info.cuda_devices);
    std::fflush(stdout);
  }
  s.info = std::move(info);
  s.initialized = true;
  return s.info;
}

namespace {

// MPI_Finalize blocks until every rank reaches it (and, with requests that never complete,
// possibly forever). Everything before it is bounded: a barrier over the world (a peer
// stuck elsewhere), then the requests an abort left behind (a peer that never joined a
// collective). When either does not finish, the job is ended with MPI_Abort so that it
// exits non-zero instead of hanging. Returns only when MPI_Finalize is safe.
//
// The barrier waits two watchdog timeouts, not one: a peer may be blocked in a collective
// that this rank left by an error at the same moment; its watchdog fires one timeout later,
// it reports its own error and comes here. Aborting after one timeout would race that
// report (and kill the peer while it prints it).
void bounded_finalize_or_abort(int rank, int size) {
  const auto timeout = 2 * watchdog_timeout_from_env();
  char secs[32];
  std::snprintf(secs, sizeof(secs), "%.1f", std::chrono::duration<double>(timeout).count());
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  MPI_Request req = MPI_REQUEST_NULL;
  if (size > 1 && MPI_Ibarrier(MPI_COMM_WORLD, &req) == MPI_SUCCESS) {
    auto sleep = std::chrono::microseconds(20);
    for (int polls = 0;; ++polls) {
      int flag = 0;
      if (MPI_Test(&req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || flag) break;
      if (std::chrono::steady_clock::now() >= deadline) {
        runtime_abort(1, "runtime_finalize: not every one of the " + std::to_string(size) +
                             " ranks reached runtime_finalize within " + secs +
                             " s (twice DISTATTN_COMM_TIMEOUT_S); a rank is stuck or died, so "
                             "MPI_Finalize would block forever");
      }
      if (polls > 200) {
        std::this_thread::sleep_for(sleep);
        sleep = std::min(sleep * 2, std::chrono::microseconds(500));
      }
    }
  }
  // Every rank is here: work a higher layer left behind (MPI requests abandoned by a
  // communicator abort, whose late-but-alive peer is here now) completes now.
  std::vector<detail::FinalizeHook> hooks;
  {
    FinalizeHooks& h = finalize_hooks();
    std::lock_guard<std::mutex> lock(h.mu);
    hooks = h.hooks;
  }
  for (const detail::FinalizeHook& hook : hooks) {
    std::string why;
    const size_t pending =
        hook(std::max(deadline, std::chrono::steady_clock::now() + std::chrono::seconds(1)), &why);
    if (pending > 0) {
      runtime_abort(1, "runtime_finalize on rank " + std::to_string(rank) + ": " +
                           std::to_string(pending) + " item(s) never completed (" + why +
                           "); MPI cannot recover from that and MPI_Finalize could block "
                           "forever, so the job is aborted");
    }
  }
}

}  // namespace

void runtime_finalize() {
  RuntimeState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.initialized) return;
  s.initialized = false;
  s.finalized = true;
  int done = 0;
  MPI_Finalized(&done);
  if (s.we_initialized_mpi && !done) {
    bounded_finalize_or_abort(s.info.rank, s.info.size);
    MPI_Finalize();
  }
}

bool runtime_initialized() {
  RuntimeState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.initialized;
}

const RuntimeInfo& runtime_info() {
  RuntimeState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  DISTATTN_CHECK_STATUS(s.initialized, Status::kInvalidArgument,
                        "distattn runtime is not initialized: call distattn::runtime_init(&argc, "
                        "&argv) at program start");
  return s.info;
}

void runtime_abort(int code, const std::string& why) {
  std::fprintf(stderr, "[distattn] rank %d aborting the job (code %d): %s\n", error_rank(), code,
               why.c_str());
  std::fflush(stderr);
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code == 0 ? 1 : code);
}

std::chrono::milliseconds watchdog_timeout_from_env() {
  const char* v = std::getenv("DISTATTN_COMM_TIMEOUT_S");
  if (v != nullptr && *v != '\0') {
    char* end = nullptr;
    const double s = std::strtod(v, &end);
    if (end != v && *end == '\0' && s > 0 && std::isfinite(s))
      return std::chrono::milliseconds(static_cast<int64_t>(std::ceil(s * 1000.0)));
    std::fprintf(stderr,
                 "[distattn] ignoring DISTATTN_COMM_TIMEOUT_S='%s' (want positive seconds); "
                 "using 300\n",
                 v);
  }
  return std::chrono::milliseconds(300'000);
}

namespace detail {
void add_finalize_hook(FinalizeHook hook) {
  FinalizeHooks& h = finalize_hooks();
  std::lock_guard<std::mutex> lock(h.mu);
  h.hooks.push_back(std::move(hook));
}
}  // namespace detail

}  // namespace distattn
