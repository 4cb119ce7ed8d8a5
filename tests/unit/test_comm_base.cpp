// The Communicator base class without MPI: a scripted fake backend checks validation,
// ledger formulas at 4 ranks, Handle semantics and the watchdog deterministically.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/tensor_view.h"

namespace distattn::comm {
namespace {

struct Script {
  int polls_to_complete = 1;  // < 0: never completes
  bool throw_on_test = false;
  int finished = 0;
  int started = 0;
  int aborts = 0;
  std::vector<std::string> log;
};

class FakeOp final : public PendingOp {
 public:
  explicit FakeOp(Script& s) : s_(s), left_(s.polls_to_complete) {}
  bool test() override {
    if (s_.throw_on_test) DISTATTN_THROW(Status::kMpiError, "fake backend failure");
    if (left_ < 0) return false;
    return --left_ <= 0;
  }
  void finish() override { ++s_.finished; }

 private:
  Script& s_;
  int left_;
};

class FakeComm final : public Communicator {
 public:
  FakeComm(Script& s, int rank, int size, bool host = true, bool device = false)
      : s_(s), rank_(rank), size_(size), host_(host), device_(device) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Backend backend() const override { return Backend::kMpi; }
  bool accepts_device_memory() const override { return device_; }
  bool accepts_host_memory() const override { return host_; }

 protected:
  std::unique_ptr<PendingOp> op(const char* name) {
    ++s_.started;
    s_.log.emplace_back(name);
    return std::make_unique<FakeOp>(s_);
  }
  std::unique_ptr<PendingOp> start_all_reduce(const void*, void*, size_t, DType, ReduceOp,
                                              Stream) override {
    return op("all_reduce");
  }
  std::unique_ptr<PendingOp> start_all_gather(const void*, void*, size_t, DType, Stream) override {
    return op("all_gather");
  }
  std::unique_ptr<PendingOp> start_reduce_scatter(const void*, void*, size_t, DType, ReduceOp,
                                                  Stream) override {
    return op("reduce_scatter");
  }
  std::unique_ptr<PendingOp> start_all_to_all_v(const void*, std::span<const size_t>,
                                                std::span<const size_t>, void*,
                                                std::span<const size_t>, std::span<const size_t>,
                                                DType, Stream) override {
    return op("all_to_all_v");
  }
  std::unique_ptr<PendingOp> start_all_to_all(const void*, void*, size_t, DType, Stream) override {
    return op("all_to_all");
  }
  std::unique_ptr<PendingOp> start_broadcast(const void*, void*, size_t, DType, int,
                                             Stream) override {
    return op("broadcast");
  }
  std::unique_ptr<PendingOp> start_group(std::span<const P2POp>, Stream) override {
    return op("group");
  }
  std::unique_ptr<PendingOp> start_barrier() override { return op("barrier"); }
  std::unique_ptr<Communicator> do_split(int color, int key) override {
    if (color == kNoColor) return nullptr;
    return std::make_unique<FakeComm>(s_, 0, 1, host_, device_);
  }
  void do_abort() noexcept override { ++s_.aborts; }

 private:
  Script& s_;
  int rank_, size_;
  bool host_, device_;
};

template <typename F>
Error expect_error(F&& f, Status status, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' lacks '" << needle << "'";
    return e;
  }
  ADD_FAILURE() << "expected an Error containing '" << needle << "'";
  return Error(Status::kSuccess, "");
}

TEST(CommBase, LedgerFormulasAtFourRanks) {
  Script s;
  FakeComm c(s, 1, 4);
  std::vector<float> a(4096), b(4096);
  c.all_reduce(a.data(), b.data(), 1000, DType::kFloat32, ReduceOp::kSum);    // 4000 B
  c.all_gather(a.data(), b.data(), 100, DType::kBFloat16);                    // 200 B/block
  c.reduce_scatter(a.data(), b.data(), 50, DType::kFloat64, ReduceOp::kMax);  // 400 B/block
  c.all_to_all(a.data(), b.data(), 10, DType::kInt32);                        // 40 B/block
  c.broadcast(a.data(), b.data(), 25, DType::kFloat32, 1);                    // root: 100 B
  c.broadcast(nullptr, b.data(), 25, DType::kFloat32, 3);                     // non-root
  const size_t sc[] = {1, 2, 3, 4}, sd[] = {0, 1, 3, 6}, rc[] = {5, 6, 7, 8}, rd[] = {0, 5, 11, 18};
  c.all_to_all_v(a.data(), sc, sd, b.data(), rc, rd, DType::kInt64);
  const P2POp ops[] = {P2POp::send(a.data(), 3, DType::kFloat32, 0),
                       P2POp::send(a.data(), 5, DType::kUInt8, 2),
                       P2POp::recv(b.data(), 7, DType::kFloat16, 3)};
  c.group(ops);
  c.send(a.data(), 2, DType::kFloat64, 3);
  c.barrier();

  const Ledger& l = c.ledger();
  EXPECT_EQ(l[OpKind::kAllReduce].bytes_sent, 2u * 3 * 4000 / 4);  // 6000
  EXPECT_EQ(l[OpKind::kAllReduce].bytes_recv, 6000u);
  EXPECT_EQ(l[OpKind::kAllGather].bytes_sent, 600u);
  EXPECT_EQ(l[OpKind::kAllGather].bytes_recv, 600u);
  EXPECT_EQ(l[OpKind::kReduceScatter].bytes_sent, 1200u);
  EXPECT_EQ(l[OpKind::kAllToAll].bytes_sent, 120u);
  EXPECT_EQ(l[OpKind::kAllToAll].bytes_recv, 120u);
  EXPECT_EQ(l[OpKind::kBroadcast].calls, 2u);
  EXPECT_EQ(l[OpKind::kBroadcast].bytes_sent, 300u);              // as root of 4
  EXPECT_EQ(l[OpKind::kBroadcast].bytes_recv, 100u);              // as receiver
  EXPECT_EQ(l[OpKind::kAllToAllV].bytes_sent, 8u * (1 + 3 + 4));  // not to self (rank 1)
  EXPECT_EQ(l[OpKind::kAllToAllV].bytes_recv, 8u * (5 + 7 + 8));
  EXPECT_EQ(l[OpKind::kSendRecv].calls, 2u);
  EXPECT_EQ(l[OpKind::kSendRecv].bytes_sent, 12u + 5 + 16);
  EXPECT_EQ(l[OpKind::kSendRecv].bytes_recv, 14u);
  EXPECT_EQ(l[OpKind::kBarrier].calls, 1u);
  EXPECT_EQ(l[OpKind::kBarrier].bytes_sent + l[OpKind::kBarrier].bytes_recv, 0u);
  EXPECT_EQ(l.total().calls, 10u);
  EXPECT_EQ(s.finished, 10);
  const std::string sum = l.summary();
  EXPECT_NE(sum.find("all_reduce calls=1 sent=6000 recv=6000 time_ms="), std::string::npos) << sum;
  EXPECT_NE(sum.find("broadcast calls=2 sent=300 recv=100"), std::string::npos) << sum;
  EXPECT_EQ(sum.find("reduce_scatter calls=0"), std::string::npos) << sum;
}

TEST(CommBase, HandleTestCompletesOnceAndFinishesOnce) {
  Script s;
  s.polls_to_complete = 3;
  FakeComm c(s, 0, 2);
  float x = 1, y = 0;
  Handle h = c.iall_reduce(&x, &y, 1, DType::kFloat32, ReduceOp::kSum);
  EXPECT_TRUE(h.valid());
  EXPECT_FALSE(h.test());
  EXPECT_FALSE(h.test());
  EXPECT_TRUE(h.test());
  EXPECT_TRUE(h.test());
  EXPECT_FALSE(h.valid());
  EXPECT_EQ(s.finished, 1);
  EXPECT_GT(c.ledger()[OpKind::kAllReduce].seconds, 0.0);
  // Moving a handle transfers the op; destroying an unfinished one waits for it.
  {
    Handle a = c.ibarrier();
    Handle b = std::move(a);
    EXPECT_FALSE(a.valid());
    EXPECT_TRUE(b.valid());
  }
  EXPECT_EQ(s.finished, 2);
  std::vector<Handle> hs;
  for (int i = 0; i < 3; ++i) hs.push_back(c.ibarrier());
  wait_all(hs);
  for (Handle& h2 : hs) EXPECT_FALSE(h2.valid());
  EXPECT_EQ(s.finished, 5);
}

TEST(CommBase, WatchdogAbortsAndNamesOpRankAndPeers) {
  Script s;
  s.polls_to_complete = -1;  // never completes
  FakeComm c(s, 1, 4);
  c.set_timeout(std::chrono::milliseconds(200));
  std::vector<float> buf(1 << 20);
  const auto t0 = std::chrono::steady_clock::now();
  expect_error(
      [&] { c.all_reduce(buf.data(), buf.data(), buf.size(), DType::kFloat32, ReduceOp::kSum); },
      Status::kTimeout,
      "all_reduce (4 MiB fp32) on rank 1 did not complete within 0.2 s; peers: all 4 ranks");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(secs, 0.2);
  EXPECT_LT(secs, 2.0);
  EXPECT_TRUE(c.aborted());
  EXPECT_EQ(s.aborts, 1);
  EXPECT_EQ(s.finished, 0);  // an abandoned op is never finished
  const int started = s.started;
  expect_error([&] { c.barrier(); }, Status::kRemoteError, "the communicator was aborted");
  expect_error([&] { c.split(0, 0); }, Status::kRemoteError, "aborted");
  EXPECT_EQ(s.started, started);  // rejected before the backend
  c.abort();
  EXPECT_EQ(s.aborts, 1);  // idempotent
}

TEST(CommBase, PendingHandlesOfAnAbortedCommunicatorFailFast) {
  Script s;
  s.polls_to_complete = -1;
  FakeComm c(s, 2, 4);
  c.set_timeout(std::chrono::milliseconds(100));
  int v = 0;
  Handle stuck = c.ibroadcast(&v, &v, 1, DType::kInt32, 0);
  Handle other = c.ibarrier();
  expect_error([&] { stuck.wait(); }, Status::kTimeout,
               "broadcast (4 B int32) on rank 2 did not complete within 0.1 s; peers: root 0");
  // The second handle fails at once instead of waiting out another timeout.
  const auto t0 = std::chrono::steady_clock::now();
  expect_error([&] { other.wait(); }, Status::kRemoteError,
               "barrier on rank 2 cannot complete: the communicator was aborted");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.09);
  EXPECT_FALSE(stuck.valid());
  EXPECT_FALSE(other.valid());
  // Destroying a never-finishing handle of an aborted communicator returns at once.
  { Handle h; }
}

TEST(CommBase, GroupTimeoutNamesThePeers) {
  Script s;
  s.polls_to_complete = -1;
  FakeComm c(s, 0, 4);
  c.set_timeout(std::chrono::milliseconds(50));
  float a[4] = {}, b[4] = {};
  const P2POp ops[] = {P2POp::send(a, 4, DType::kFloat32, 1), P2POp::recv(b, 4, DType::kFloat32, 3),
                       P2POp::recv(b, 1, DType::kFloat32, 1)};
  expect_error([&] { c.group(ops); }, Status::kTimeout,
               "send_recv (3 ops, sent 16 B, recv 20 B) on rank 0 did not complete within 0.05 s; "
               "peers: peers 1,3");
}

TEST(CommBase, BackendFailureAbortsAndPropagates) {
  Script s;
  s.polls_to_complete = 5;
  FakeComm c(s, 0, 2);
  int v = 0;
  Handle h = c.iall_gather(&v, &v, 0, DType::kInt32);
  s.throw_on_test = true;
  expect_error([&] { h.wait(); }, Status::kMpiError, "fake backend failure");
  EXPECT_TRUE(c.aborted());
  EXPECT_EQ(s.aborts, 1);
}

TEST(CommBase, MemoryKindIsCheckedAgainstTheBackend) {
  Script s;
  FakeComm device_only(s, 0, 2, /*host=*/false, /*device=*/true);
  float x[2] = {};
  expect_error([&] { device_only.all_reduce(x, x, 2, DType::kFloat32, ReduceOp::kSum); },
               Status::kInvalidArgument,
               "all_reduce: send buffer is host memory but the mpi communicator "
               "only accepts CUDA device memory");
  EXPECT_EQ(s.started, 0);
  // Zero-length buffers are never inspected.
  device_only.all_reduce(nullptr, nullptr, 0, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(s.started, 1);
}

TEST(CommBase, SplitValidatesColorAndInheritsTimeout) {
  Script s;
  FakeComm c(s, 0, 2);
  c.set_timeout(std::chrono::milliseconds(4321));
  EXPECT_EQ(c.split(Communicator::kNoColor, 0), nullptr);
  auto child = c.split(3, 0);
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->timeout(), std::chrono::milliseconds(4321));
  EXPECT_EQ(child->ledger().total().calls, 0u);
  expect_error([&] { c.split(-2, 0); }, Status::kInvalidArgument,
               "color -2 is invalid; use a non-negative color, or Communicator::kNoColor");
}

TEST(CommBase, InvalidEnumValuesAreRejectedBeforeTheBackend) {
  Script s;
  FakeComm c(s, 1, 4);
  float x[8] = {};
  const auto bad_dtype = static_cast<DType>(99);
  const auto bad_op = static_cast<ReduceOp>(7);
  expect_error([&] { c.all_reduce(x, x, 2, bad_dtype, ReduceOp::kSum); }, Status::kInvalidArgument,
               "all_reduce: send buffer has dtype value 99, which is not a valid distattn::DType");
  // Zero counts do not skip the dtype check.
  expect_error([&] { c.all_gather(nullptr, nullptr, 0, bad_dtype); }, Status::kInvalidArgument,
               "not a valid distattn::DType");
  expect_error([&] { c.send(x, 1, bad_dtype, 2); }, Status::kInvalidArgument,
               "send_recv: send buffer has dtype value 99");
  expect_error([&] { c.all_reduce(x, x, 2, DType::kFloat32, bad_op); }, Status::kInvalidArgument,
               "all_reduce: reduce op value 7 is not a valid ReduceOp; use ReduceOp::kSum, kMax "
               "or kMin");
  expect_error([&] { c.reduce_scatter(x, x, 2, DType::kFloat32, bad_op); },
               Status::kInvalidArgument, "reduce_scatter: reduce op value 7 is not a valid");
  EXPECT_EQ(s.started, 0);
  EXPECT_FALSE(c.aborted());
}

TEST(CommBase, AllToAllVRejectsOverlappingReceiveRegions) {
  Script s;
  FakeComm c(s, 0, 4);
  std::vector<float> send(8), recv(16);
  const std::vector<size_t> counts = {2, 2, 2, 2}, sdispl = {0, 2, 4, 6};
  const std::vector<size_t> overlap = {0, 2, 3, 6};
  expect_error(
      [&] {
        c.all_to_all_v(send.data(), counts, sdispl, recv.data(), counts, overlap, DType::kFloat32);
      },
      Status::kInvalidArgument,
      "all_to_all_v: receive regions overlap: peer 1 writes elements [2, 4) and peer 2 writes "
      "[3, 5)");
  const std::vector<size_t> same = {4, 4, 8, 12};
  expect_error(
      [&] {
        c.all_to_all_v(send.data(), counts, sdispl, recv.data(), counts, same, DType::kFloat32);
      },
      Status::kInvalidArgument, "receive regions overlap");
  EXPECT_EQ(s.started, 0);
  // Disjoint in any order, and empty regions anywhere, are fine.
  const std::vector<size_t> reversed = {6, 4, 2, 0};
  c.all_to_all_v(send.data(), counts, sdispl, recv.data(), counts, reversed, DType::kFloat32);
  const std::vector<size_t> some_empty = {2, 0, 2, 0}, empty_displ = {0, 1, 2, 1};
  c.all_to_all_v(send.data(), counts, sdispl, recv.data(), some_empty, empty_displ,
                 DType::kFloat32);
  EXPECT_EQ(s.started, 2);
}

TEST(CommBase, TensorFormsCheckDtypeLayoutSizesAndDevice) {
  Script s;
  FakeComm c(s, 0, 4);
  std::vector<float> a(48), b(48);
  std::vector<uint16_t> h(48);
  const Device cpu = Device::cpu();
  TensorView t12(a.data(), DType::kFloat32, cpu, {3, 4});
  TensorView r12(b.data(), DType::kFloat32, cpu, {12});
  TensorView bf12(h.data(), DType::kBFloat16, cpu, {12});
  expect_error([&] { c.all_reduce(t12, bf12, ReduceOp::kSum); }, Status::kInvalidArgument,
               "all_reduce: mismatched dtype: send tensor is fp32 but recv tensor is bf16");
  expect_error([&] { c.all_gather(bf12, r12); }, Status::kInvalidArgument,
               "all_gather: mismatched dtype");
  // Every other column of a 3x8 buffer: strided.
  const int64_t shape[] = {3, 4}, strides[] = {8, 2};
  TensorView strided(a.data(), DType::kFloat32, cpu, shape, strides);
  expect_error([&] { c.all_reduce(strided, r12, ReduceOp::kSum); }, Status::kInvalidArgument,
               "all_reduce: send tensor fp32[3, 4] on cpu is not contiguous");
  expect_error([&] { c.send(strided, 1); }, Status::kInvalidArgument, "is not contiguous");
  TensorView r11(b.data(), DType::kFloat32, cpu, {11});
  expect_error([&] { c.all_reduce(t12, r11, ReduceOp::kSum); }, Status::kInvalidArgument,
               "send tensor has 12 elements but recv tensor has 11");
  TensorView s3(a.data(), DType::kFloat32, cpu, {3});
  expect_error([&] { c.all_gather(s3, r11); }, Status::kInvalidArgument,
               "all_gather: recv tensor has 11 elements but must hold size() x send = 4 x 3");
  expect_error(
      [&] {
        c.reduce_scatter(TensorView(a.data(), DType::kFloat32, cpu, {10}), s3, ReduceOp::kSum);
      },
      Status::kInvalidArgument,
      "reduce_scatter: send tensor has 10 elements but must hold size() x recv = 4 x 3");
  TensorView s10(a.data(), DType::kFloat32, cpu, {10});
  TensorView r10(b.data(), DType::kFloat32, cpu, {10});
  expect_error([&] { c.all_to_all(s10, r10); }, Status::kInvalidArgument,
               "a multiple of size() = 4; got send 10, recv 10");
  expect_error([&] { c.broadcast(t12, r11, 0); }, Status::kInvalidArgument,
               "broadcast: send tensor has 12 elements but recv tensor has 11");
  TensorView on_gpu(b.data(), DType::kFloat32, Device::cuda(0), {12});
  expect_error([&] { c.all_reduce(t12, on_gpu, ReduceOp::kSum); }, Status::kInvalidArgument,
               "all_reduce: recv tensor is on cuda:0 but the mpi communicator only accepts host "
               "memory");
  expect_error([&] { c.recv(on_gpu, 1); }, Status::kInvalidArgument,
               "recv: recv tensor is on "
               "cuda:0");
  EXPECT_EQ(s.started, 0);

  // Consistent tensors reach the backend with counts from numel().
  TensorView r48(b.data(), DType::kFloat32, cpu, {4, 12});
  c.all_reduce(t12, r12, ReduceOp::kMax);
  c.all_gather(t12, r48);
  c.reduce_scatter(r48, t12, ReduceOp::kSum);
  c.all_to_all(t12, r12);
  c.broadcast(t12, t12, 0);
  c.send(t12, 3);
  c.recv(r12, 1);
  EXPECT_EQ(s.started, 7);
  EXPECT_EQ(c.ledger()[OpKind::kAllGather].bytes_sent, 3u * 12 * 4);  // (n-1) x block
  EXPECT_EQ(c.ledger()[OpKind::kSendRecv].bytes_sent, 12u * 4);
  EXPECT_EQ(c.ledger()[OpKind::kSendRecv].bytes_recv, 12u * 4);
}

TEST(CommBase, Names) {
  EXPECT_STREQ(op_kind_name(OpKind::kAllToAllV), "all_to_all_v");
  EXPECT_STREQ(op_kind_name(OpKind::kSendRecv), "send_recv");
  EXPECT_STREQ(reduce_op_name(ReduceOp::kMax), "max");
  EXPECT_STREQ(backend_name(Backend::kNccl), "nccl");
  EXPECT_EQ(parse_backend("MPI"), Backend::kMpi);
}

TEST(CommBase, DefaultTimeoutParsesFractionalSeconds) {
  const char* old = std::getenv("DISTATTN_COMM_TIMEOUT_S");
  const std::string saved = old != nullptr ? old : "";
  setenv("DISTATTN_COMM_TIMEOUT_S", "0.25", 1);
  EXPECT_EQ(default_timeout(), std::chrono::milliseconds(250));
  Script s;
  FakeComm c(s, 0, 1);
  EXPECT_EQ(c.timeout(), std::chrono::milliseconds(250));
  setenv("DISTATTN_COMM_TIMEOUT_S", "-3", 1);
  EXPECT_EQ(default_timeout(), std::chrono::milliseconds(300'000));
  unsetenv("DISTATTN_COMM_TIMEOUT_S");
  if (old != nullptr) setenv("DISTATTN_COMM_TIMEOUT_S", saved.c_str(), 1);
}

}  // namespace
}  // namespace distattn::comm
