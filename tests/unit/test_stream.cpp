// OwnedStream / Event / stream_wait_stream: CPU objects are empty no-ops; on a GPU, work
// ordered through an event or stream_wait_stream is seen by the waiting stream (checked with
// copies only, no kernels: memset on one stream, copy out on another).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "distattn/config.h"
#include "distattn/core/error.h"
#include "distattn/core/stream.h"
#include "tests/cuda/cuda_test_util.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn {
namespace {

TEST(Stream, CpuStreamIsEmptyAndNull) {
  OwnedStream s(Device::cpu());
  EXPECT_EQ(s.get(), nullptr);
  EXPECT_TRUE(s.device().is_cpu());
  OwnedStream d;
  EXPECT_EQ(d.get(), nullptr);
  OwnedStream moved(std::move(s));
  EXPECT_EQ(moved.get(), nullptr);
  EXPECT_NO_THROW(stream_synchronize(Device::cpu(), nullptr));
  EXPECT_NO_THROW(stream_wait_stream(Device::cpu(), nullptr, nullptr));
}

TEST(Stream, CpuEventMethodsAreNoOps) {
  Event e(Device::cpu());
  EXPECT_TRUE(e.valid());
  EXPECT_TRUE(e.query());
  EXPECT_NO_THROW(e.record(nullptr));
  EXPECT_NO_THROW(e.block(nullptr));
  EXPECT_TRUE(e.query());
  EXPECT_NO_THROW(e.synchronize());
  Event moved(std::move(e));
  EXPECT_TRUE(moved.valid());
  EXPECT_FALSE(e.valid());  // NOLINT(bugprone-use-after-move): moved-from is invalid
}

TEST(Stream, InvalidEventThrowsOnRecordAndBlock) {
  Event e;
  EXPECT_FALSE(e.valid());
  EXPECT_TRUE(e.query());
  EXPECT_NO_THROW(e.synchronize());
  try {
    e.record(nullptr);
    FAIL() << "record on an invalid Event did not throw";
  } catch (const Error& err) {
    EXPECT_EQ(err.status(), Status::kInvalidArgument);
    EXPECT_NE(err.message().find("Event(device)"), std::string::npos) << err.message();
  }
  EXPECT_THROW(e.block(nullptr), Error);
}

TEST(Stream, CudaObjectsWithoutCudaBuildAreUnsupported) {
  if (built_with_cuda()) GTEST_SKIP() << "CUDA build: covered by the GPU tests";
  try {
    OwnedStream s(Device::cuda(0));
    FAIL() << "OwnedStream(cuda:0) in a CPU-only build did not throw";
  } catch (const Error& err) {
    EXPECT_EQ(err.status(), Status::kUnsupported);
  }
  EXPECT_THROW(Event(Device::cuda(0)), Error);
  EXPECT_THROW(stream_synchronize(Device::cuda(0), nullptr), Error);
  // Same stream: nothing to order, so no device is touched.
  EXPECT_NO_THROW(stream_wait_stream(Device::cuda(0), nullptr, nullptr));
}

#if DISTATTN_WITH_CUDA
// 64 MiB: the memset takes long enough (tens of microseconds) that an unordered copy on
// another stream would very likely read the old bytes.
constexpr size_t kBytes = size_t{64} << 20;

struct DeviceBytes {
  explicit DeviceBytes(size_t n) {
    EXPECT_EQ(cudaMalloc(&p, n), cudaSuccess);
    EXPECT_EQ(cudaMemset(p, 0, n), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  ~DeviceBytes() { cudaFree(p); }
  void* p = nullptr;
};
struct PinnedBytes {
  explicit PinnedBytes(size_t n) { EXPECT_EQ(cudaMallocHost(&p, n), cudaSuccess); }
  ~PinnedBytes() { cudaFreeHost(p); }
  unsigned char* bytes() { return static_cast<unsigned char*>(p); }
  void* p = nullptr;
};

// How many of the n bytes at h differ from v.
size_t count_not_equal(const unsigned char* h, size_t n, unsigned char v) {
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += h[i] != v;
  return bad;
}

TEST(StreamCuda, OwnedStreamIsNonBlockingOnItsDevice) {
  DISTATTN_SKIP_WITHOUT_GPU();
  OwnedStream s(testing::gpu());
  ASSERT_NE(s.get(), nullptr);
  EXPECT_EQ(s.device(), testing::gpu());
  unsigned int flags = 0;
  ASSERT_EQ(cudaStreamGetFlags(static_cast<cudaStream_t>(s.get()), &flags), cudaSuccess);
  EXPECT_EQ(flags & cudaStreamNonBlocking, cudaStreamNonBlocking);
  Stream raw = s.get();
  OwnedStream t(std::move(s));
  EXPECT_EQ(t.get(), raw);
  EXPECT_EQ(s.get(), nullptr);  // NOLINT(bugprone-use-after-move)
}

TEST(StreamCuda, EventBlockOrdersCopyAfterMemsetOnAnotherStream) {
  DISTATTN_SKIP_WITHOUT_GPU();
  const Device dev = testing::gpu();
  OwnedStream a(dev), b(dev);
  DeviceBytes d(kBytes);
  PinnedBytes h(kBytes);
  Event done(dev);
  for (int round = 1; round <= 3; ++round) {
    const auto v = static_cast<unsigned char>(0x40 + round);
    ASSERT_EQ(cudaMemsetAsync(d.p, v, kBytes, static_cast<cudaStream_t>(a.get())), cudaSuccess);
    done.record(a.get());
    done.block(b.get());
    ASSERT_EQ(cudaMemcpyAsync(h.p, d.p, kBytes, cudaMemcpyDeviceToHost,
                              static_cast<cudaStream_t>(b.get())),
              cudaSuccess);
    stream_synchronize(dev, b.get());
    EXPECT_TRUE(done.query());
    EXPECT_EQ(count_not_equal(h.bytes(), kBytes, v), 0u) << "round " << round;
  }
  done.synchronize();
  EXPECT_TRUE(done.query());
}

TEST(StreamCuda, StreamWaitStreamOrdersCopyAfterMemset) {
  DISTATTN_SKIP_WITHOUT_GPU();
  const Device dev = testing::gpu();
  OwnedStream a(dev), b(dev);
  DeviceBytes d(kBytes);
  PinnedBytes h(kBytes);
  for (int round = 1; round <= 3; ++round) {
    const auto v = static_cast<unsigned char>(0x70 + round);
    ASSERT_EQ(cudaMemsetAsync(d.p, v, kBytes, static_cast<cudaStream_t>(a.get())), cudaSuccess);
    stream_wait_stream(dev, b.get(), a.get());
    ASSERT_EQ(cudaMemcpyAsync(h.p, d.p, kBytes, cudaMemcpyDeviceToHost,
                              static_cast<cudaStream_t>(b.get())),
              cudaSuccess);
    stream_synchronize(dev, b.get());
    EXPECT_EQ(count_not_equal(h.bytes(), kBytes, v), 0u) << "round " << round;
  }
  // Same stream: a no-op that must not fail.
  EXPECT_NO_THROW(stream_wait_stream(dev, a.get(), a.get()));
}

TEST(StreamCuda, EventQueryIsFalseWhileWorkIsPendingThenTrue) {
  DISTATTN_SKIP_WITHOUT_GPU();
  const Device dev = testing::gpu();
  OwnedStream a(dev), b(dev);
  Event gate(dev), after(dev);
  // Stream a waits for b, which is busy with a chain of large copies, so `after` on a stays
  // pending for a measurable time.
  DeviceBytes d(kBytes), e(kBytes);
  for (int i = 0; i < 16; ++i)
    ASSERT_EQ(cudaMemcpyAsync(e.p, d.p, kBytes, cudaMemcpyDeviceToDevice,
                              static_cast<cudaStream_t>(b.get())),
              cudaSuccess);
  gate.record(b.get());
  gate.block(a.get());
  after.record(a.get());
  // 16 x 64 MiB device copies take about a millisecond even on an H200; the host got here in
  // microseconds.
  EXPECT_FALSE(after.query());
  after.synchronize();
  EXPECT_TRUE(after.query());
  EXPECT_TRUE(gate.query());
}
#endif

}  // namespace
}  // namespace distattn
