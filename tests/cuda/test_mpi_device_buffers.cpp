// MPI backend with CUDA buffers (staged through pinned host memory): every op x {fp32, bf16}
// against host-computed results. This is the path of several ranks on one GPU, which NCCL
// refuses. Skips (on every rank alike) without a GPU or without a CUDA build.
#include <gtest/gtest.h>

#include <memory>

#include "tests/cuda/device_collective_checks.h"

namespace distattn::testing::device_comm {
namespace {

class MpiDeviceBuffers : public ::testing::TestWithParam<DType> {
 protected:
  static void SetUpTestSuite() {
    const RuntimeInfo& info = runtime_info();
    usable_ = all_ranks(built_with_cuda() && info.cuda_devices > 0 && info.device.is_cuda());
    if (usable_) world_ = comm::create_world(comm::Backend::kMpi, info.device);
  }
  static void TearDownTestSuite() { world_.reset(); }
  void SetUp() override {
    if (!usable_) GTEST_SKIP() << "skipped: no GPU";
  }
  Communicator& c() { return *world_; }
  Device dev() { return runtime_info().device; }

  static inline bool usable_ = false;
  static inline std::unique_ptr<Communicator> world_;
};

TEST_P(MpiDeviceBuffers, AcceptsDeviceAndHostMemory) {
  EXPECT_EQ(c().backend(), comm::Backend::kMpi);
  EXPECT_TRUE(c().accepts_device_memory());
  EXPECT_TRUE(c().accepts_host_memory());
}
TEST_P(MpiDeviceBuffers, AllReduceSumMaxMinMatchHost) {
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
    check_all_reduce(c(), GetParam(), dev(), op, false);
    check_all_reduce(c(), GetParam(), dev(), op, true);
  }
}
TEST_P(MpiDeviceBuffers, AllGatherMatchesHost) {
  check_all_gather(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, ReduceScatterMatchesHost) {
  check_reduce_scatter(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, AllToAllMatchesHostAlsoInPlace) {
  check_all_to_all(c(), GetParam(), dev(), false);
  check_all_to_all(c(), GetParam(), dev(), true);
}
TEST_P(MpiDeviceBuffers, UnevenAllToAllMatchesHost) {
  check_all_to_all_v(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, BroadcastFromEveryRoot) {
  check_broadcast(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, GroupedSendRecvRingBothWays) {
  check_group_send_recv(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, LargeSendStagedAfterRecvInOneGroup) {
  check_group_send_staged_after_recv(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, NonBlockingAllReduceCompletes) {
  check_nonblocking(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, WaitOnOrdersResultsBeforeLaterWorkOnAnotherStream) {
  check_wait_on(c(), GetParam(), dev());
}
TEST_P(MpiDeviceBuffers, SplitByParityReducesWithinGroups) {
  check_split(c(), GetParam(), dev());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MpiDeviceBuffers,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace distattn::testing::device_comm

// Control: the same checks on host buffers. Runs everywhere (no GPU needed), so the checks
// themselves are exercised in CPU-only CI; a failure only in the device suite then points at
// the staging path.
namespace distattn::testing::device_comm {
namespace {

class MpiHostBuffersControl : public ::testing::TestWithParam<DType> {
 protected:
  static void SetUpTestSuite() { world_ = comm::create_world(comm::Backend::kMpi, Device::cpu()); }
  static void TearDownTestSuite() { world_.reset(); }
  Communicator& c() { return *world_; }
  static inline std::unique_ptr<Communicator> world_;
};

TEST_P(MpiHostBuffersControl, EveryOpMatchesHost) {
  const Device cpu = Device::cpu();
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
    check_all_reduce(c(), GetParam(), cpu, op, false);
    check_all_reduce(c(), GetParam(), cpu, op, true);
  }
  check_all_gather(c(), GetParam(), cpu);
  check_reduce_scatter(c(), GetParam(), cpu);
  check_all_to_all(c(), GetParam(), cpu, false);
  check_all_to_all(c(), GetParam(), cpu, true);
  check_all_to_all_v(c(), GetParam(), cpu);
  check_broadcast(c(), GetParam(), cpu);
  check_group_send_recv(c(), GetParam(), cpu);
  check_nonblocking(c(), GetParam(), cpu);
  check_wait_on(c(), GetParam(), cpu);
  check_split(c(), GetParam(), cpu);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MpiHostBuffersControl,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace distattn::testing::device_comm
