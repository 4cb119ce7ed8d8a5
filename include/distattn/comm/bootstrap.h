#pragma once
// Communicators that do not come from distattn's own MPI world (create_world):
//   - an MPI communicator the application already has (mpi4py, or a C/Fortran code), given
//     by its Fortran handle (MPI_Comm_c2f; mpi4py: comm.py2f()), so public headers never
//     include mpi.h;
//   - an NCCL communicator for ranks started without MPI (torchrun): the launcher's own
//     channel (a torch.distributed process group) carries the unique id from rank 0 to the
//     others, then every rank calls create_nccl_communicator with the same bytes.
// Lifecycle (as NCCL's): nccl_unique_id on one rank -> send the bytes to every rank ->
// create_nccl_communicator on every rank (collective) -> use -> destroy (abort on error).
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/device.h"

namespace distattn::comm {

// Size of an NCCL unique id (sizeof(ncclUniqueId)).
inline constexpr size_t kNcclUniqueIdBytes = 128;

// A duplicate of the MPI communicator with Fortran handle `fortran_handle` (collective over
// it; MPI_Comm_idup under the watchdog). MPI must be initialized (by runtime_init, or by
// the application: the communicator then outlives neither MPI_Finalize nor its owner's use).
std::unique_ptr<Communicator> create_mpi_communicator(int64_t fortran_handle);

// A fresh NCCL unique id (kNcclUniqueIdBytes bytes). Throws Error(kUnsupported) when built
// without NCCL. Needs no GPU and no MPI.
std::vector<uint8_t> nccl_unique_id();

// Rank `rank` of a `size`-rank NCCL communicator on CUDA `device`, from the id every rank
// received (collective over the `size` ranks; initialization polled under the watchdog).
// Throws Error(kInvalidArgument) for a bad id length, rank or device, Error(kUnsupported)
// when built without NCCL, Error(kNcclError/kTimeout) when NCCL init fails or never ends.
std::unique_ptr<Communicator> create_nccl_communicator(std::span<const uint8_t> id, int rank,
                                                       int size, Device device);

}  // namespace distattn::comm
