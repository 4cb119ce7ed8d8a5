// create_world: picks and builds the world communicator for a backend and device.
#include <mpi.h>

#include "distattn/comm/communicator.h"
#include "distattn/config.h"
#include "distattn/runtime.h"
#include "src/comm/mpi_communicator.h"
#include "src/comm/nccl_factory.h"

namespace distattn::comm {

namespace {
// True when every rank of the job can have a GPU of its own (NCCL refuses shared GPUs).
bool every_rank_has_own_gpu() {
  const RuntimeInfo& info = runtime_info();
  int ok = info.cuda_devices > 0 && info.local_size <= info.cuda_devices ? 1 : 0;
  int all = 0;
  DISTATTN_MPI_CHECK(MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD),
                     "create_world(auto) on rank ", info.rank);
  return all == 1;
}
}  // namespace

std::unique_ptr<Communicator> create_world(Backend backend, Device device) {
  DISTATTN_CHECK(runtime_initialized(),
                 "create_world needs the runtime: call distattn::runtime_init(&argc, &argv) "
                 "first");
  switch (backend) {
    case Backend::kMpi:
      return MpiCommunicator::dup_world();
    case Backend::kNccl:
      DISTATTN_CHECK(device.is_cuda(), "the nccl backend needs a CUDA device, got ", device.str(),
                     "; use Backend::kMpi for host memory");
#if DISTATTN_WITH_NCCL
      return make_nccl_world(device);
#else
      DISTATTN_THROW(Status::kUnsupported,
                     "the nccl backend is not available: distattn was built without NCCL "
                     "(rebuild with CUDA and NCCL, or use the mpi backend)");
#endif
    case Backend::kAuto: {
      // Collective on every rank alike so that all choose the same backend.
      const bool gpus = every_rank_has_own_gpu();
#if DISTATTN_WITH_NCCL
      int want = device.is_cuda() ? 1 : 0, all = 0;
      DISTATTN_MPI_CHECK(MPI_Allreduce(&want, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD),
                         "create_world(auto)");
      if (all == 1 && gpus) return make_nccl_world(device);
#else
      (void)gpus;
#endif
      return MpiCommunicator::dup_world();
    }
  }
  DISTATTN_THROW(Status::kInvalidArgument, "unknown backend ", static_cast<int>(backend),
                 " (supported: auto, mpi, nccl)");
}

}  // namespace distattn::comm
