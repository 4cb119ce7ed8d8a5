// NCCL backend on CUDA buffers: every op x {fp32, bf16} against host-computed results.
// Skips (on every rank alike) without a GPU, or when ranks would share a GPU (NCCL refuses
// that; test_mpi_device_buffers covers that case with the MPI backend).
#include <gtest/gtest.h>

#include <memory>

#include "distattn/core/error.h"
#include "tests/cuda/device_collective_checks.h"

namespace distattn::testing::device_comm {
namespace {

class NcclCollectives : public ::testing::TestWithParam<DType> {
 protected:
  static void SetUpTestSuite() {
    const RuntimeInfo& info = runtime_info();
    const bool gpu = info.cuda_devices > 0 && info.device.is_cuda();
    usable_ = all_ranks(gpu && info.local_size <= info.cuda_devices);
    if (usable_) world_ = comm::create_world(comm::Backend::kNccl, info.device);
  }
  static void TearDownTestSuite() { world_.reset(); }
  void SetUp() override {
    if (!usable_)
      GTEST_SKIP() << "skipped: no GPU, or fewer GPUs than ranks on a node (NCCL needs one GPU "
                      "per rank)";
  }
  Communicator& c() { return *world_; }
  Device dev() { return runtime_info().device; }

  static inline bool usable_ = false;
  static inline std::unique_ptr<Communicator> world_;
};

TEST_P(NcclCollectives, IsNcclOnTheBoundGpu) {
  EXPECT_EQ(c().backend(), comm::Backend::kNccl);
  EXPECT_EQ(c().rank(), runtime_info().rank);
  EXPECT_EQ(c().size(), runtime_info().size);
  EXPECT_TRUE(c().accepts_device_memory());
  EXPECT_FALSE(c().accepts_host_memory());
}

TEST_P(NcclCollectives, AllReduceSumMaxMinMatchHost) {
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
    check_all_reduce(c(), GetParam(), dev(), op, /*in_place=*/false);
    check_all_reduce(c(), GetParam(), dev(), op, /*in_place=*/true);
  }
}
TEST_P(NcclCollectives, AllGatherMatchesHost) {
  check_all_gather(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, ReduceScatterMatchesHost) {
  check_reduce_scatter(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, AllToAllMatchesHostAlsoInPlace) {
  check_all_to_all(c(), GetParam(), dev(), false);
  check_all_to_all(c(), GetParam(), dev(), true);
}
TEST_P(NcclCollectives, UnevenAllToAllMatchesHost) {
  check_all_to_all_v(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, BroadcastFromEveryRoot) {
  check_broadcast(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, GroupedSendRecvRingBothWays) {
  check_group_send_recv(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, LargeSendStagedAfterRecvInOneGroup) {
  check_group_send_staged_after_recv(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, NonBlockingAllReduceCompletes) {
  check_nonblocking(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, WaitOnOrdersResultsBeforeLaterWorkOnAnotherStream) {
  check_wait_on(c(), GetParam(), dev());
}
TEST_P(NcclCollectives, SplitByParityReducesWithinGroups) {
  check_split(c(), GetParam(), dev());
}

TEST_P(NcclCollectives, RejectsHostBuffersBeforeCallingNccl) {
  std::vector<float> host(16, 1.0f);
  try {
    c().all_reduce(host.data(), host.data(), host.size(), DType::kFloat32, ReduceOp::kSum);
    ADD_FAILURE() << "host buffer accepted by the NCCL backend";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kInvalidArgument) << e.what();
  }
  // The communicator is still usable afterwards (nothing reached NCCL).
  c().barrier();
  EXPECT_FALSE(c().aborted());
}

TEST_P(NcclCollectives, LedgerCountsCallsAndBytes) {
  const auto before = c().ledger()[comm::OpKind::kAllGather];
  check_all_gather(c(), GetParam(), dev());
  const auto after = c().ledger()[comm::OpKind::kAllGather];
  EXPECT_EQ(after.calls, before.calls + 1);
  EXPECT_EQ(after.bytes_sent - before.bytes_sent,
            517u * dtype_size(GetParam()) * static_cast<uint64_t>(c().size() - 1));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, NcclCollectives,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// Abort ends the communicator: later ops throw kRemoteError instead of reaching NCCL.
TEST(NcclAbort, OpsAfterAbortThrowRemoteError) {
  const RuntimeInfo& info = runtime_info();
  const bool gpu = info.cuda_devices > 0 && info.device.is_cuda();
  if (!all_ranks(gpu && info.local_size <= info.cuda_devices))
    GTEST_SKIP() << "skipped: no GPU per rank";
  auto world = comm::create_world(comm::Backend::kNccl, info.device);
  world->abort();
  EXPECT_TRUE(world->aborted());
  try {
    world->barrier();
    ADD_FAILURE() << "barrier on an aborted communicator did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kRemoteError) << e.what();
  }
}

// Without a GPU per rank, asking for NCCL explicitly gives kUnsupported (or kInvalidArgument
// for a CPU device), never a hang.
TEST(NcclUnavailable, ExplicitNcclWithoutOwnGpuThrows) {
  const RuntimeInfo& info = runtime_info();
  const bool gpu = info.cuda_devices > 0 && info.device.is_cuda();
  if (all_ranks(gpu && info.local_size <= info.cuda_devices))
    GTEST_SKIP() << "every rank has its own GPU here";
  const Device want = gpu ? info.device : Device::cuda(0);
  try {
    auto c = comm::create_world(comm::Backend::kNccl, want);
    ADD_FAILURE() << "create_world(nccl) succeeded without a GPU per rank";
  } catch (const Error& e) {
    EXPECT_TRUE(e.status() == Status::kUnsupported || e.status() == Status::kInvalidArgument)
        << e.what();
  }
}

}  // namespace
}  // namespace distattn::testing::device_comm
