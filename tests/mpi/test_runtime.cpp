// Runtime bootstrap: rank/size agree with the world communicator, local ranks agree with
// hostnames, GPU binding only when GPUs exist, repeated init is harmless.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/runtime.h"

namespace distattn {
namespace {

TEST(Runtime, InfoMatchesTheWorldAndTheNode) {
  ASSERT_TRUE(runtime_initialized());
  const RuntimeInfo& info = runtime_info();
  auto world = comm::create_world(comm::Backend::kMpi, Device::cpu());
  EXPECT_EQ(info.rank, world->rank());
  EXPECT_EQ(info.size, world->size());
  EXPECT_EQ(error_rank(), info.rank);
  EXPECT_GE(info.local_rank, 0);
  EXPECT_LT(info.local_rank, info.local_size);
  EXPECT_FALSE(info.hostname.empty());
  // Ranks sharing this rank's hostname are exactly its node (local_size of them), and
  // local ranks on a node are 0..local_size-1.
  constexpr size_t kLen = 256;
  std::vector<char> mine(kLen, 0), all(kLen * info.size, 0);
  std::strncpy(mine.data(), info.hostname.c_str(), kLen - 1);
  world->all_gather(mine.data(), all.data(), kLen, DType::kUInt8);
  std::vector<int> local(info.size, -1), locals(info.size);
  int same = 0;
  for (int r = 0; r < info.size; ++r) same += std::strcmp(&all[r * kLen], mine.data()) == 0;
  EXPECT_EQ(same, info.local_size);
  world->all_gather(&info.local_rank, locals.data(), 1, DType::kInt32);
  std::vector<bool> seen(info.local_size, false);
  for (int r = 0; r < info.size; ++r) {
    if (std::strcmp(&all[r * kLen], mine.data()) != 0) continue;
    ASSERT_GE(locals[r], 0);
    ASSERT_LT(locals[r], info.local_size);
    EXPECT_FALSE(seen[locals[r]]) << "local rank " << locals[r] << " appears twice";
    seen[locals[r]] = true;
  }
  if (info.cuda_devices == 0) {
    EXPECT_TRUE(info.device.is_cpu());
  } else {
    EXPECT_EQ(info.device, Device::cuda(info.local_rank % info.cuda_devices));
  }
  EXPECT_EQ(info.cuda_devices, cuda_device_count());
}

TEST(Runtime, SecondInitReturnsTheSameInfo) {
  const RuntimeInfo& a = runtime_info();
  const RuntimeInfo& b = runtime_init(nullptr, nullptr, {.use_gpu = false, .verbose = true});
  EXPECT_EQ(&a, &b);
  EXPECT_EQ(b.rank, a.rank);
}

}  // namespace
}  // namespace distattn
