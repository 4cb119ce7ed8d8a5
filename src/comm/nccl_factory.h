#pragma once
// Internal: entry points of the NCCL backend (src/comm/nccl_communicator.cpp, compiled only
// when DISTATTN_WITH_NCCL). create_world() calls make_nccl_world for Backend::kNccl and for
// kAuto when every rank has its own GPU; comm/bootstrap.h calls the id-based pair.
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/device.h"

namespace distattn::comm {

// Builds the world NCCL communicator (unique id broadcast over MPI) on `device`.
// Throws Error(kUnsupported) when two ranks would share one GPU.
std::unique_ptr<Communicator> make_nccl_world(Device device);

// The bytes of a fresh ncclUniqueId (comm/bootstrap.h: nccl_unique_id).
std::vector<uint8_t> make_nccl_unique_id();
// One rank of a `size`-rank NCCL communicator from an id exchanged by the caller
// (comm/bootstrap.h: create_nccl_communicator; arguments validated there).
std::unique_ptr<Communicator> make_nccl_communicator(std::span<const uint8_t> id, int rank,
                                                     int size, Device device);

}  // namespace distattn::comm
