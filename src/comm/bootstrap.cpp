// Communicators from an application's MPI communicator or from an NCCL id exchanged by the
// caller (distattn/comm/bootstrap.h).
#include "distattn/comm/bootstrap.h"

#include <mpi.h>

#include <string>

#include "distattn/config.h"
#include "distattn/core/error.h"
#include "src/comm/mpi_communicator.h"
#include "src/comm/nccl_factory.h"

namespace distattn::comm {

std::unique_ptr<Communicator> create_mpi_communicator(int64_t fortran_handle) {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  DISTATTN_CHECK(init && !fin,
                 "create_mpi_communicator: MPI is not initialized (or already finalized); "
                 "initialize it first (distattn::runtime_init, or import mpi4py's MPI)");
  const MPI_Comm comm = MPI_Comm_f2c(static_cast<MPI_Fint>(fortran_handle));
  DISTATTN_CHECK(comm != MPI_COMM_NULL,
                 "create_mpi_communicator: the handle is MPI_COMM_NULL (a rank that is not "
                 "part of the communicator); pass a valid communicator");
  return MpiCommunicator::dup(comm, "create_mpi_communicator");
}

std::vector<uint8_t> nccl_unique_id() {
#if DISTATTN_WITH_NCCL
  std::vector<uint8_t> id = make_nccl_unique_id();
  DISTATTN_CHECK_STATUS(id.size() == kNcclUniqueIdBytes, Status::kInternal, "ncclUniqueId has ",
                        id.size(), " bytes, expected ", kNcclUniqueIdBytes);
  return id;
#else
  DISTATTN_THROW(Status::kUnsupported,
                 "nccl_unique_id: distattn was built without NCCL (rebuild with CUDA and NCCL, "
                 "or use an MPI communicator)");
#endif
}

std::unique_ptr<Communicator> create_nccl_communicator(std::span<const uint8_t> id, int rank,
                                                       int size, Device device) {
  DISTATTN_CHECK(size >= 1 && rank >= 0 && rank < size, "create_nccl_communicator: rank ", rank,
                 " is not in [0, ", size, ")");
  DISTATTN_CHECK(id.size() == kNcclUniqueIdBytes,
                 "create_nccl_communicator: the NCCL unique id has ", id.size(),
                 " bytes but must have ", kNcclUniqueIdBytes,
                 " (pass the bytes nccl_unique_id() returned on rank 0, unchanged)");
  DISTATTN_CHECK(device.is_cuda(), "create_nccl_communicator: NCCL needs a CUDA device, got ",
                 device.str(), "; use an MPI communicator for CPU tensors");
#if DISTATTN_WITH_NCCL
  const int visible = cuda_device_count();
  DISTATTN_CHECK(device.index >= 0 && device.index < visible,
                 "create_nccl_communicator: ", device.str(), " requested but ", visible,
                 " CUDA device(s) are visible on this rank; bind each rank to a GPU it can see "
                 "(torchrun: device = LOCAL_RANK)");
  return make_nccl_communicator(id, rank, size, device);
#else
  DISTATTN_THROW(Status::kUnsupported,
                 "create_nccl_communicator: distattn was built without NCCL (rebuild with CUDA "
                 "and NCCL, or use an MPI communicator)");
#endif
}

}  // namespace distattn::comm
