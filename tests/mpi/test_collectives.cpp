#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "distattn/comm/communicator.h"

using namespace distattn;
using namespace distattn::comm;

TEST(Collectives, AllReduceSumFp32) {
  auto world = create_world(Backend::kMpi, Device::cpu());
  std::vector<float> a(1000), b(1000);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i + world->rank());
  world->all_reduce(a.data(), b.data(), a.size(), DType::kFloat32, ReduceOp::kSum);
  const int n = world->size();
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(b[i], static_cast<float>(n * i + n * (n - 1) / 2));
}
