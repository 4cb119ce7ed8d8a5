// Process bootstrap: MPI init, rank/size/local rank, hostname, GPU binding.
#include "distattn/runtime.h"

#include <mpi.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>

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
  if (opts.verbose) {
    std::printf("[distattn] rank %d/%d local %d/%d host %s device %s (cuda devices: %d)\n",
                info.rank, info.size, info.local_rank, info.local_size, info.hostname.c_str(),
                info.device.str().c_str(), info.cuda_devices);
    std::fflush(stdout);
  }
  s.info = std::move(info);
  s.initialized = true;
  return s.info;
}

void runtime_finalize() {
  RuntimeState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.initialized) return;
  s.initialized = false;
  s.finalized = true;
  int done = 0;
  MPI_Finalized(&done);
  if (s.we_initialized_mpi && !done) MPI_Finalize();
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

}  // namespace distattn
