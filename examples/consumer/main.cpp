// Minimal distattn consumer: bootstrap the runtime, make the world communicator, all-reduce
// one vector and check it. Works at any rank count (mpirun -np N distattn-consumer) and
// standalone (one rank). Prints "OK" on rank 0 and exits 0 on success, 1 otherwise.
#include <cstdio>
#include <exception>
#include <vector>

#include "distattn/distattn.h"

int main(int argc, char** argv) {
  int rc = 1;
  try {
    const distattn::RuntimeInfo& info = distattn::runtime_init(&argc, &argv);
    auto world =
        distattn::comm::create_world(distattn::comm::Backend::kMpi, distattn::Device::cpu());
    const int n = world->size();
    const int r = world->rank();

    // Element i of rank r holds r + i; the sum over ranks is n*i + n*(n-1)/2 exactly.
    std::vector<float> v(1024);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(r) + static_cast<float>(i);
    world->all_reduce(v.data(), v.data(), v.size(), distattn::DType::kFloat32,
                      distattn::comm::ReduceOp::kSum);
    int bad = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      const double want = static_cast<double>(n) * static_cast<double>(i) + n * (n - 1) / 2.0;
      if (v[i] != static_cast<float>(want)) ++bad;
    }
    // Every rank must agree that the result was right.
    int bad_total = bad;
    world->all_reduce(&bad, &bad_total, 1, distattn::DType::kInt32, distattn::comm::ReduceOp::kSum);
    if (bad_total == 0) {
      if (info.rank == 0)
        std::printf("OK: distattn %s, all_reduce over %d rank(s)\n", DISTATTN_VERSION, n);
      rc = 0;
    } else if (info.rank == 0) {
      std::printf("FAILED: %d wrong elements\n", bad_total);
    }
    world.reset();
    distattn::runtime_finalize();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "distattn-consumer: %s\n", e.what());
    rc = 1;
  }
  return rc;
}
