#pragma once
// Checks of every Communicator op on CUDA buffers against host-computed results, shared by
// test_nccl_collectives (NCCL backend) and test_mpi_device_buffers (MPI backend staging
// device memory). Data are small integers (a hash of rank and index), exact in fp32 and bf16
// and after summing over ranks, so every comparison is exact: max error must be 0.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/config.h"
#include "distattn/core/half.h"
#include "distattn/core/stream.h"
#include "distattn/core/tensor_view.h"
#include "distattn/runtime.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn::testing::device_comm {

using comm::Communicator;
using comm::ReduceOp;

// Integer in [-9, 8] from (rank, index, tag).
inline double value(int rank, size_t index, uint64_t tag) {
  const double v = test_value(tag, static_cast<uint64_t>(rank), index);  // [-1, 1)
  return std::floor(v * 8.5);
}

// A CUDA tensor of `n` elements of `dtype` holding `vals`.
inline Tensor to_gpu(const std::vector<double>& vals, DType dtype, Device dev) {
  Tensor d = Tensor::empty({static_cast<int64_t>(vals.size())}, DType::kFloat64);
  std::copy(vals.begin(), vals.end(), d.data_as<double>());
  Tensor h = Tensor::empty({static_cast<int64_t>(vals.size())}, dtype);
  convert_dtype_cpu(d.view(), h.view());
  return to_device(h.view(), dev);
}

// Same as to_gpu, but a sentinel (99) everywhere, so elements an op forgets show up.
inline Tensor sentinel_gpu(size_t n, DType dtype, Device dev) {
  return to_gpu(std::vector<double>(n, 99.0), dtype, dev);
}

inline std::vector<double> rank_values(int rank, size_t n, uint64_t tag, size_t offset = 0) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = value(rank, offset + i, tag);
  return v;
}

inline double reduce(ReduceOp op, double a, double b) {
  return op == ReduceOp::kSum ? a + b : op == ReduceOp::kMax ? std::max(a, b) : std::min(a, b);
}

// Exact comparison: every element must match; reports the first mismatch.
inline void expect_equal(const std::vector<double>& got, const std::vector<double>& want,
                         const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == want[i])) {
      if (bad++ == 0) first = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements differ; first at "
                     << first << ": got " << (first < got.size() ? got[first] : 0) << ", want "
                     << (first < want.size() ? want[first] : 0);
}

inline void check_all_reduce(Communicator& c, DType dt, Device dev, ReduceOp op, bool in_place) {
  const int n = c.size(), r = c.rank();
  const size_t count = 1000 + 3;  // not a multiple of anything NCCL likes
  const uint64_t tag = 11 + static_cast<uint64_t>(op);
  Tensor send = to_gpu(rank_values(r, count, tag), dt, dev);
  Tensor recv = in_place ? send : sentinel_gpu(count, dt, dev);
  c.all_reduce(send.data(), recv.data(), count, dt, op);
  std::vector<double> want(count);
  for (size_t i = 0; i < count; ++i) {
    double acc = value(0, i, tag);
    for (int q = 1; q < n; ++q) acc = reduce(op, acc, value(q, i, tag));
    want[i] = acc;
  }
  expect_equal(to_double_vector(recv.view()), want, "all_reduce");
}

inline void check_all_gather(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  const size_t count = 517;
  Tensor send = to_gpu(rank_values(r, count, 21), dt, dev);
  Tensor recv = sentinel_gpu(count * n, dt, dev);
  c.all_gather(send.data(), recv.data(), count, dt);
  std::vector<double> want;
  for (int q = 0; q < n; ++q) {
    auto v = rank_values(q, count, 21);
    want.insert(want.end(), v.begin(), v.end());
  }
  expect_equal(to_double_vector(recv.view()), want, "all_gather");
}

inline void check_reduce_scatter(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  const size_t count = 333;
  Tensor send = to_gpu(rank_values(r, count * n, 31), dt, dev);
  Tensor recv = sentinel_gpu(count, dt, dev);
  c.reduce_scatter(send.data(), recv.data(), count, dt, ReduceOp::kSum);
  std::vector<double> want(count, 0.0);
  for (size_t i = 0; i < count; ++i)
    for (int q = 0; q < n; ++q) want[i] += value(q, static_cast<size_t>(r) * count + i, 31);
  expect_equal(to_double_vector(recv.view()), want, "reduce_scatter");
}

inline void check_all_to_all(Communicator& c, DType dt, Device dev, bool in_place) {
  const int n = c.size(), r = c.rank();
  const size_t count = 129;
  Tensor send = to_gpu(rank_values(r, count * n, 41), dt, dev);
  Tensor recv = in_place ? send : sentinel_gpu(count * n, dt, dev);
  c.all_to_all(send.data(), recv.data(), count, dt);
  std::vector<double> want(count * n);
  for (int j = 0; j < n; ++j)
    for (size_t i = 0; i < count; ++i)
      want[static_cast<size_t>(j) * count + i] = value(j, static_cast<size_t>(r) * count + i, 41);
  expect_equal(to_double_vector(recv.view()), want,
               in_place ? "all_to_all (in place)" : "all_to_all");
}

// Uneven: rank s sends a2av_count(s, d) elements to rank d, at packed displacements.
inline size_t a2av_count(int src, int dst) {
  return static_cast<size_t>((src + 2 * dst) % 3) * 5 + 1;
}

inline void check_all_to_all_v(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  std::vector<size_t> sc(n), sd(n), rc(n), rd(n);
  size_t st = 0, rt = 0;
  for (int j = 0; j < n; ++j) {
    sc[j] = a2av_count(r, j);
    sd[j] = st;
    st += sc[j];
    rc[j] = a2av_count(j, r);
    rd[j] = rt;
    rt += rc[j];
  }
  Tensor send = to_gpu(rank_values(r, st, 51), dt, dev);
  Tensor recv = sentinel_gpu(rt, dt, dev);
  c.all_to_all_v(send.data(), sc, sd, recv.data(), rc, rd, dt);
  std::vector<double> want(rt);
  for (int j = 0; j < n; ++j) {
    // Rank j's block for r starts at the sum of j's counts for ranks before r.
    size_t off = 0;
    for (int k = 0; k < r; ++k) off += a2av_count(j, k);
    for (size_t i = 0; i < rc[j]; ++i) want[rd[j] + i] = value(j, off + i, 51);
  }
  expect_equal(to_double_vector(recv.view()), want, "all_to_all_v");
}

inline void check_broadcast(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  const size_t count = 777;
  for (int root = 0; root < n; ++root) {
    Tensor send = to_gpu(rank_values(r, count, 61), dt, dev);
    Tensor recv = sentinel_gpu(count, dt, dev);
    c.broadcast(send.data(), recv.data(), count, dt, root);
    expect_equal(to_double_vector(recv.view()), rank_values(root, count, 61), "broadcast");
  }
}

// Ring exchange in both directions in one group.
inline void check_group_send_recv(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  const int next = (r + 1) % n, prev = (r - 1 + n) % n;
  const size_t count = 300;
  Tensor to_next = to_gpu(rank_values(r, count, 71), dt, dev);
  Tensor to_prev = to_gpu(rank_values(r, count, 72), dt, dev);
  Tensor from_prev = sentinel_gpu(count, dt, dev);
  Tensor from_next = sentinel_gpu(count, dt, dev);
  const comm::P2POp ops[] = {comm::P2POp::recv(from_prev.data(), count, dt, prev),
                             comm::P2POp::recv(from_next.data(), count, dt, next),
                             comm::P2POp::send(to_next.data(), count, dt, next),
                             comm::P2POp::send(to_prev.data(), count, dt, prev)};
  c.group(ops);
  expect_equal(to_double_vector(from_prev.view()), rank_values(prev, count, 71), "recv from prev");
  expect_equal(to_double_vector(from_next.view()), rank_values(next, count, 72), "recv from next");
}

// Non-blocking form: test() eventually turns true and the result is then complete.
inline void check_nonblocking(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  const size_t count = 4096;
  Tensor send = to_gpu(rank_values(r, count, 81), dt, dev);
  Tensor recv = sentinel_gpu(count, dt, dev);
  comm::Handle h = c.iall_reduce(send.data(), recv.data(), count, dt, ReduceOp::kMax);
  ASSERT_TRUE(h.valid());
  h.wait();
  EXPECT_TRUE(h.test());
  std::vector<double> want(count);
  for (size_t i = 0; i < count; ++i) {
    double m = value(0, i, 81);
    for (int q = 1; q < n; ++q) m = std::max(m, value(q, i, 81));
    want[i] = m;
  }
  expect_equal(to_double_vector(recv.view()), want, "iall_reduce");
}

// `bytes` from src to dst (both on `dev`), ordered on stream `s`; a plain copy on the CPU.
inline void copy_on_stream(void* dst, const void* src, size_t bytes, Device dev, Stream s) {
  if (dev.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if DISTATTN_WITH_CUDA
  const cudaError_t e =
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(s));
  if (e != cudaSuccess)
    DISTATTN_THROW(Status::kCudaError, "cudaMemcpyAsync D2D: ", cudaGetErrorString(e));
#else
  DISTATTN_THROW(Status::kUnsupported, "device copy in a build without CUDA");
#endif
}

// A send posted in the same group after a receive, with a large input that exists only in a
// non-blocking `producer` stream's order. The MPI backend stages the device send through a
// pinned buffer by a copy on that stream; the copy must land before MPI reads the buffer even
// though the receive was posted (and the host waited for the stream) first. A staging copy
// still in flight when MPI_Isend starts shows up as sentinels (99) or zeros on the peer.
inline void check_group_send_staged_after_recv(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  const int next = (r + 1) % n, prev = (r - 1 + n) % n;
  const size_t count = (size_t{1} << 22) + 5;  // 8-16 MiB: the D2H copy takes ~a millisecond
  const size_t bytes = count * dtype_size(dt);
  OwnedStream producer(dev);
  const Tensor src = to_gpu(rank_values(r, count, 111), dt, dev);
  Tensor to_next = sentinel_gpu(count, dt, dev);
  Tensor from_prev = sentinel_gpu(count, dt, dev);
  copy_on_stream(to_next.data(), src.data(), bytes, dev, producer.get());
  const comm::P2POp ops[] = {comm::P2POp::recv(from_prev.data(), count, dt, prev),
                             comm::P2POp::send(to_next.data(), count, dt, next)};
  c.group(ops, producer.get());
  stream_synchronize(dev, producer.get());
  expect_equal(to_double_vector(from_prev.view()), rank_values(prev, count, 111),
               "large send staged after a recv in one group");
}

// Stream-ordered completion (Handle::wait_on): the inputs are written on a `producer` stream,
// sendrecv (ring), all_gather and all_reduce are posted on it, completed with
// wait_on(consumer) on another non-blocking stream, and the results are read by copies
// enqueued on `consumer` only (then the host waits for `consumer`). A backend that returned
// before its results were ordered before later work on `consumer` leaves sentinels (99) in
// the snapshots. On the CPU the streams are null and the same body checks the host path.
inline void check_wait_on(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  const int next = (r + 1) % n, prev = (r - 1 + n) % n;
  const size_t count = 2049;
  const size_t bytes = count * dtype_size(dt);
  OwnedStream producer(dev), consumer(dev);
  const Tensor src_ring = to_gpu(rank_values(r, count, 101), dt, dev);
  const Tensor src_reduce = to_gpu(rank_values(r, count, 102), dt, dev);
  Tensor to_next = sentinel_gpu(count, dt, dev);
  Tensor reduce_in = sentinel_gpu(count, dt, dev);
  Tensor from_prev = sentinel_gpu(count, dt, dev);
  Tensor gathered = sentinel_gpu(count * n, dt, dev);
  Tensor reduced = sentinel_gpu(count, dt, dev);
  Tensor snap_ring = sentinel_gpu(count, dt, dev);
  Tensor snap_gathered = sentinel_gpu(count * n, dt, dev);
  Tensor snap_reduced = sentinel_gpu(count, dt, dev);
  // The fills above are legacy-stream copies from pageable memory, which may still be in
  // flight when cudaMemcpy returns and which non-blocking streams do not wait for.
  stream_synchronize(dev, nullptr);
  // The ops' inputs exist only in `producer`'s stream order.
  copy_on_stream(to_next.data(), src_ring.data(), bytes, dev, producer.get());
  copy_on_stream(reduce_in.data(), src_reduce.data(), bytes, dev, producer.get());
  const comm::P2POp ring[] = {comm::P2POp::recv(from_prev.data(), count, dt, prev),
                              comm::P2POp::send(to_next.data(), count, dt, next)};
  comm::Handle hp = c.igroup(ring, producer.get());
  comm::Handle hg = c.iall_gather(to_next.data(), gathered.data(), count, dt, producer.get());
  comm::Handle hr =
      c.iall_reduce(reduce_in.data(), reduced.data(), count, dt, ReduceOp::kSum, producer.get());
  hp.wait_on(consumer.get());
  hg.wait_on(consumer.get());
  hr.wait_on(consumer.get());
  hr.wait_on(consumer.get());  // twice is allowed
  if (c.backend() == comm::Backend::kMpi) {
    // The MPI backend completes the op on the host; only the copies back are asynchronous.
    EXPECT_FALSE(hp.valid());
    EXPECT_FALSE(hg.valid());
    EXPECT_FALSE(hr.valid());
  }
  copy_on_stream(snap_ring.data(), from_prev.data(), bytes, dev, consumer.get());
  copy_on_stream(snap_gathered.data(), gathered.data(), bytes * n, dev, consumer.get());
  copy_on_stream(snap_reduced.data(), reduced.data(), bytes, dev, consumer.get());
  stream_synchronize(dev, consumer.get());

  expect_equal(to_double_vector(snap_ring.view()), rank_values(prev, count, 101),
               "wait_on: recv from prev");
  std::vector<double> want_gathered, want_reduced(count, 0.0);
  for (int q = 0; q < n; ++q) {
    const auto v = rank_values(q, count, 101);
    want_gathered.insert(want_gathered.end(), v.begin(), v.end());
    for (size_t i = 0; i < count; ++i) want_reduced[i] += value(q, i, 102);
  }
  expect_equal(to_double_vector(snap_gathered.view()), want_gathered, "wait_on: all_gather");
  expect_equal(to_double_vector(snap_reduced.view()), want_reduced, "wait_on: all_reduce");
  // NCCL handles stay pending on the host until waited (with the watchdog); wait() after
  // wait_on is allowed everywhere.
  hp.wait();
  hg.wait();
  hr.wait();
  EXPECT_FALSE(hp.valid());
  EXPECT_FALSE(hg.valid());
  EXPECT_FALSE(hr.valid());
  // The producer stream must still be usable (nothing was left waiting on it).
  stream_synchronize(dev, producer.get());
}

// Even and odd ranks form two groups; sums inside each group are exact.
inline void check_split(Communicator& c, DType dt, Device dev) {
  const int n = c.size(), r = c.rank();
  std::unique_ptr<Communicator> sub = c.split(r % 2, -r);  // reversed order inside a group
  ASSERT_NE(sub, nullptr);
  std::vector<int> members;
  for (int q = r % 2; q < n; q += 2) members.push_back(q);
  ASSERT_EQ(sub->size(), static_cast<int>(members.size()));
  // key = -rank: the highest old rank becomes rank 0.
  const int pos = static_cast<int>(std::find(members.begin(), members.end(), r) - members.begin());
  EXPECT_EQ(sub->rank(), static_cast<int>(members.size()) - 1 - pos);
  const size_t count = 64;
  Tensor send = to_gpu(rank_values(r, count, 91), dt, dev);
  Tensor recv = sentinel_gpu(count, dt, dev);
  sub->all_reduce(send.data(), recv.data(), count, dt, ReduceOp::kSum);
  std::vector<double> want(count, 0.0);
  for (int q : members)
    for (size_t i = 0; i < count; ++i) want[i] += value(q, i, 91);
  expect_equal(to_double_vector(recv.view()), want, "all_reduce on a split communicator");
  // A rank that joins no group gets nullptr.
  std::unique_ptr<Communicator> none = c.split(r == 0 ? Communicator::kNoColor : 0, r);
  EXPECT_EQ(none == nullptr, r == 0);
  if (none) EXPECT_EQ(none->size(), n - 1);
}

// True on every rank when `local` is true on every rank (skips must agree across ranks).
inline bool all_ranks(bool local) {
  int v = local ? 1 : 0, all = 0;
  MPI_Allreduce(&v, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

}  // namespace distattn::testing::device_comm
