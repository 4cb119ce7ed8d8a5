// A rank that never joins a collective and never exits must not hang the job: rank 1
// sleeps (600 s, far beyond the ctest timeout) while rank 0 runs an all_reduce with a
// short watchdog, catches the timeout and shuts down normally. runtime_finalize() must
// then end the job with MPI_Abort (non-zero exit) instead of blocking in MPI_Finalize.
// Run by tests/watchdog_never_joins.sh (expects: non-zero exit, not a timeout, and the
// watchdog's message); not a gtest binary on purpose.
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/runtime.h"

int main(int argc, char** argv) {
  using namespace distattn;
  const RuntimeInfo& info = runtime_init(&argc, &argv);
  if (info.size < 2) {
    std::fprintf(stderr, "watchdog_never_joins needs at least 2 ranks\n");
    runtime_finalize();
    return 2;
  }
  std::unique_ptr<comm::Communicator> world =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  if (info.rank == 1) {
    std::this_thread::sleep_for(std::chrono::seconds(600));
    return 0;
  }
  // Never freed: MPI may still write into it after the abandoned all_reduce.
  auto* buf = new std::vector<float>(1024, 1.0f);
  try {
    world->all_reduce(buf->data(), buf->data(), buf->size(), DType::kFloat32, comm::ReduceOp::kSum);
    std::printf("rank %d: all_reduce completed without rank 1\n", info.rank);
  } catch (const Error& e) {
    std::printf("rank %d caught: %s\n", info.rank, e.what());
  }
  std::fflush(stdout);
  world.reset();
  runtime_finalize();  // must not return normally: MPI_Abort
  std::printf("rank %d: runtime_finalize returned (the job would hang on rank 1)\n", info.rank);
  return 0;
}
