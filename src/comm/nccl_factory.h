#pragma once
// Internal: entry point of the NCCL backend (src/comm/nccl_communicator.cpp, compiled only
// when DISTATTN_WITH_NCCL). create_world() calls it for Backend::kNccl and for kAuto when
// every rank has its own GPU.
#include <memory>

#include "distattn/comm/communicator.h"
#include "distattn/core/device.h"

namespace distattn::comm {

// Builds the world NCCL communicator (unique id broadcast over MPI) on `device`.
// Throws Error(kUnsupported) when two ranks would share one GPU.
std::unique_ptr<Communicator> make_nccl_world(Device device);

}  // namespace distattn::comm
