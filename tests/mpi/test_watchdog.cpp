// The watchdog on real MPI traffic: a collective that a peer never joins turns into
// Error(kTimeout) within about the timeout, aborts the communicator, and leaves the job
// able to finish (the abandoned request's buffers stay alive until the peers catch up).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "distattn/comm/communicator.h"

namespace distattn::comm {
namespace {

Communicator& world() {
  static std::unique_ptr<Communicator> w = create_world(Backend::kMpi, Device::cpu());
  return *w;
}

constexpr size_t kCount = size_t{1} << 20;  // 4 MiB of fp32

TEST(Watchdog, CollectiveAPeerNeverJoinsTimesOutNamingOpAndRank) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  if (n < 2) GTEST_SKIP() << "needs a peer that does not join";
  std::unique_ptr<Communicator> c = w.split(0, me);
  ASSERT_NE(c, nullptr);
  c->set_timeout(std::chrono::milliseconds(1500));
  // Rank 0's buffer may still be written by MPI after the timeout: it must outlive the
  // abandoned request, so it is never freed.
  static auto* buf = new std::vector<float>(kCount, 1.0f);  // reachable: no leak report
  if (me == 0) {
    const auto t0 = std::chrono::steady_clock::now();
    try {
      c->all_reduce(buf->data(), buf->data(), kCount, DType::kFloat32, ReduceOp::kSum);
      ADD_FAILURE() << "all_reduce without peers returned";
    } catch (const Error& e) {
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_EQ(e.status(), Status::kTimeout) << e.what();
      const std::string m = e.what();
      EXPECT_NE(m.find("all_reduce (4 MiB fp32) on rank 0 did not complete within 1.5 s"),
                std::string::npos)
          << m;
      EXPECT_NE(m.find("peers: all " + std::to_string(n) + " ranks"), std::string::npos) << m;
      EXPECT_NE(m.find("the communicator was aborted"), std::string::npos) << m;
      EXPECT_GE(secs, 1.4);
      EXPECT_LT(secs, 10.0);
    }
    EXPECT_TRUE(c->aborted());
    try {
      c->barrier();
      ADD_FAILURE() << "an aborted communicator accepted a barrier";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::kRemoteError);
      EXPECT_NE(std::string(e.what()).find("aborted"), std::string::npos) << e.what();
    }
  }
  w.barrier();  // rank 0 has timed out
  if (me != 0) {
    // Joining late completes the collective that rank 0 abandoned: its contribution was
    // still there, so the sum covers all ranks.
    std::vector<float> mine(kCount, 1.0f);
    c->all_reduce(mine.data(), mine.data(), kCount, DType::kFloat32, ReduceOp::kSum);
    EXPECT_EQ(mine[0], static_cast<float>(n));
    EXPECT_EQ(mine[kCount - 1], static_cast<float>(n));
    EXPECT_FALSE(c->aborted());
  }
  w.barrier();
  c.reset();
  // The world communicator is unaffected.
  int v = 1, s = 0;
  w.all_reduce(&v, &s, 1, DType::kInt32, ReduceOp::kSum);
  EXPECT_EQ(s, n);
}

TEST(Watchdog, NonBlockingWaitTimesOutAndHandleTestReportsAbort) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  if (n < 2) GTEST_SKIP() << "needs a peer that does not join";
  std::unique_ptr<Communicator> c = w.split(0, me);
  c->set_timeout(std::chrono::milliseconds(800));
  if (me == 1) {
    Handle h = c->ibarrier();
    EXPECT_FALSE(h.test());  // rank 0 has not joined
    try {
      h.wait();
      ADD_FAILURE() << "barrier without rank 0 completed";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::kTimeout);
      EXPECT_NE(std::string(e.what()).find("barrier on rank 1 did not complete within 0.8 s"),
                std::string::npos)
          << e.what();
    }
    EXPECT_FALSE(h.valid());
    EXPECT_TRUE(c->aborted());
  }
  w.barrier();
  if (me != 1) c->barrier();  // completes the barrier rank 1 abandoned
  w.barrier();
}

TEST(Watchdog, LatePeerWithinTheTimeoutIsNotAnError) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  if (n < 2) GTEST_SKIP() << "needs 2 ranks";
  std::unique_ptr<Communicator> c = w.split(0, me);
  c->set_timeout(std::chrono::milliseconds(5000));
  if (me == n - 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::vector<int64_t> v(1000, me), s(1000);
  c->all_reduce(v.data(), s.data(), v.size(), DType::kInt64, ReduceOp::kMax);
  EXPECT_EQ(s[999], n - 1);
  EXPECT_FALSE(c->aborted());
  EXPECT_GE(c->ledger()[OpKind::kAllReduce].seconds, 0.0);
}

TEST(Watchdog, DefaultTimeoutComesFromTheEnvironment) {
  const char* old = std::getenv("DISTATTN_COMM_TIMEOUT_S");
  const std::string saved = old != nullptr ? old : "";
  setenv("DISTATTN_COMM_TIMEOUT_S", "2.5", 1);
  EXPECT_EQ(default_timeout(), std::chrono::milliseconds(2500));
  std::unique_ptr<Communicator> c = create_world(Backend::kMpi, Device::cpu());
  EXPECT_EQ(c->timeout(), std::chrono::milliseconds(2500));
  setenv("DISTATTN_COMM_TIMEOUT_S", "soon", 1);
  EXPECT_EQ(default_timeout(), std::chrono::milliseconds(300'000));
  unsetenv("DISTATTN_COMM_TIMEOUT_S");
  EXPECT_EQ(default_timeout(), std::chrono::milliseconds(300'000));
  if (old != nullptr) setenv("DISTATTN_COMM_TIMEOUT_S", saved.c_str(), 1);
}

}  // namespace
}  // namespace distattn::comm
