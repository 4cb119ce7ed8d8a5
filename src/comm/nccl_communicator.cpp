// NCCL backend: one rank per GPU, unique id broadcast over MPI, nonblocking communicators
// (ncclCommInitRankConfig with blocking = 0) so that the watchdog's ncclCommAbort can always
// rescue a stuck op. Every op is enqueued on the caller's stream; completion is an event
// recorded after it, and NCCL's asynchronous error state is checked on every poll.
#include "src/comm/nccl_communicator.h"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <sstream>
#include <thread>
#include <vector>

#include "distattn/core/tensor_view.h"
#include "src/comm/nccl_factory.h"

namespace distattn::comm {

namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::kFloat32:
      return ncclFloat32;
    case DType::kFloat64:
      return ncclFloat64;
    case DType::kBFloat16:
      return ncclBfloat16;  // NCCL reduces bf16/fp16 natively
    case DType::kFloat16:
      return ncclFloat16;
    case DType::kInt32:
      return ncclInt32;
    case DType::kInt64:
      return ncclInt64;
    case DType::kUInt8:
      return ncclUint8;
  }
  DISTATTN_THROW(Status::kUnsupported, "dtype ", dtype_name(t), " has no NCCL equivalent");
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  DISTATTN_THROW(Status::kUnsupported, "reduction ", static_cast<int>(op),
                 " has no NCCL equivalent");
}

cudaStream_t cuda_stream(Stream s) {
  return static_cast<cudaStream_t>(s);
}

const char* byte_ptr(const void* p, size_t elements, DType t) {
  return static_cast<const char*>(p) + elements * dtype_size(t);
}
char* byte_ptr(void* p, size_t elements, DType t) {
  return static_cast<char*>(p) + elements * dtype_size(t);
}

// Makes `device` current for the scope (NCCL calls and event records need the comm's GPU).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) {
      DISTATTN_NCCL_CUDA_CHECK(cudaSetDevice(device), "selecting GPU ", device, " for NCCL");
    } else {
      prev_ = -1;  // nothing to restore
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// Polls briefly, then yields the core: waiting ranks may share cores with the peers they
// wait for.
void backoff(int& polls) {
  if (++polls > 100) std::this_thread::sleep_for(std::chrono::microseconds(50));
}

// Waits until NCCL leaves ncclInProgress on `comm`; returns the final state, or
// ncclInProgress when `deadline` passed first.
ncclResult_t poll_state(ncclComm_t comm, Clock::time_point deadline) {
  int polls = 0;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t rc = ncclCommGetAsyncError(comm, &state);
    if (rc != ncclSuccess) return rc;
    if (state != ncclInProgress) return state;
    if (Clock::now() >= deadline) return ncclInProgress;
    backoff(polls);
  }
}

std::string nccl_error_text(ncclComm_t comm, ncclResult_t rc) {
  std::string s = ncclGetErrorString(rc);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') s += std::string(" (") + last + ")";
  return s;
}

class NcclPendingOp final : public PendingOp {
 public:
  NcclPendingOp(NcclCommunicator* comm, cudaEvent_t event, cudaStream_t stream, int device,
                std::string what)
      : comm_(comm), event_(event), stream_(stream), device_(device), what_(std::move(what)) {}
  ~NcclPendingOp() override {
    if (event_ != nullptr) (void)cudaEventDestroy(event_);
  }
  NcclPendingOp(const NcclPendingOp&) = delete;
  NcclPendingOp& operator=(const NcclPendingOp&) = delete;

  bool test() override {
    comm_->check_async(what_);
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaSuccess) return true;
    if (e == cudaErrorNotReady) return false;
    (void)cudaGetLastError();
    DISTATTN_THROW(Status::kCudaError, what_, " on rank ", comm_->rank(),
                   ": waiting for the NCCL kernel failed: ", cudaGetErrorString(e));
  }

  // `s` waits on the device for the op's completion event; the host does not wait, and the
  // op stays pending until test() sees the event (under the watchdog).
  bool enqueue_wait(Stream s) override {
    comm_->check_async(what_);  // an op that already failed must not be waited on silently
    const cudaStream_t waiter = cuda_stream(s);
    if (waiter == stream_) return true;  // stream order already puts later work after it
    DeviceGuard guard(device_);
    const cudaError_t e = cudaStreamWaitEvent(waiter, event_, 0);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      DISTATTN_THROW(Status::kCudaError, what_, " on rank ", comm_->rank(),
                     ": making the consumer stream wait for the NCCL op failed: "
                     "cudaStreamWaitEvent: ",
                     cudaGetErrorString(e));
    }
    return true;
  }

 private:
  NcclCommunicator* comm_;
  cudaEvent_t event_;
  cudaStream_t stream_;  // the stream the op was enqueued on
  int device_;
  std::string what_;
};

// ncclGroupStart/End around `body`; the group is closed even when `body` throws.
template <typename Body>
void nccl_group(const char* what, int rank, Body&& body) {
  DISTATTN_NCCL_CHECK(ncclGroupStart(), what, " on rank ", rank);
  try {
    body();
  } catch (...) {
    (void)ncclGroupEnd();
    throw;
  }
  DISTATTN_NCCL_CHECK(ncclGroupEnd(), what, " on rank ", rank);
}

// ---- bootstrap over MPI (under a deadline: nothing waits forever) ----------------------------

void mpi_wait(MPI_Request* req, Clock::time_point deadline, const char* what) {
  int polls = 0;
  for (;;) {
    int done = 0;
    const int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS)
      DISTATTN_THROW(Status::kMpiError, "NCCL bootstrap: ", what, " failed (MPI error ", rc, ")");
    if (done) return;
    if (Clock::now() >= deadline)
      DISTATTN_THROW(Status::kTimeout, "NCCL bootstrap: ", what,
                     " did not complete within the watchdog timeout; some rank never called "
                     "create_world (raise DISTATTN_COMM_TIMEOUT_S if it is only slow)");
    backoff(polls);
  }
}

// What each rank tells the others before NCCL is touched.
struct RankGpu {
  int ok = 0;  // 1 when this rank could query its GPU
  int device = -1;
  int pci_domain = -1;
  int pci_bus = -1;
  int pci_dev = -1;
  unsigned char uuid[16] = {};
  char host[64] = {};
  char error[128] = {};  // why ok == 0
};

std::string pci_id(const RankGpu& g) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%04x:%02x:%02x.0", g.pci_domain, g.pci_bus, g.pci_dev);
  return buf;
}

RankGpu describe_gpu(Device device) {
  RankGpu g;
  g.device = device.index;
  gethostname(g.host, sizeof(g.host) - 1);
  cudaDeviceProp prop{};
  const cudaError_t e = cudaGetDeviceProperties(&prop, device.index);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    std::snprintf(g.error, sizeof(g.error), "cudaGetDeviceProperties(%d): %s", device.index,
                  cudaGetErrorString(e));
    return g;
  }
  g.ok = 1;
  g.pci_domain = prop.pciDomainID;
  g.pci_bus = prop.pciBusID;
  g.pci_dev = prop.pciDeviceID;
  std::memcpy(g.uuid, prop.uuid.bytes, sizeof(g.uuid));
  return g;
}

}  // namespace

// ---- NcclCommunicator ---------------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(ncclComm_t comm, Device device) : comm_(comm), device_(device) {
  DeviceGuard guard(device_.index);
  DISTATTN_NCCL_CHECK(ncclCommUserRank(comm_, &rank_), "NCCL communicator setup");
  DISTATTN_NCCL_CHECK(ncclCommCount(comm_, &size_), "NCCL communicator setup");
  DISTATTN_NCCL_CUDA_CHECK(cudaStreamCreateWithFlags(&internal_stream_, cudaStreamNonBlocking),
                           "NCCL communicator setup on rank ", rank_);
  DISTATTN_NCCL_CUDA_CHECK(cudaMalloc(&barrier_buf_, sizeof(int)),
                           "NCCL communicator setup on rank ", rank_);
  // On the stream the barrier's all_reduce runs on: a legacy-stream cudaMemset would not be
  // ordered before work on this non-blocking stream.
  DISTATTN_NCCL_CUDA_CHECK(cudaMemsetAsync(barrier_buf_, 0, sizeof(int), internal_stream_),
                           "NCCL communicator setup");
}

NcclCommunicator::~NcclCommunicator() {
  try {
    DeviceGuard guard(device_.index);
    if (comm_ != nullptr) {
      // Finalize flushes outstanding work and waits for global quiescence; bounded by the
      // watchdog timeout, after which the communicator is aborted instead.
      ncclResult_t rc = ncclCommFinalize(comm_);
      if (rc == ncclSuccess || rc == ncclInProgress)
        rc = poll_state(comm_, Clock::now() + timeout());
      if (rc == ncclSuccess) {
        (void)ncclCommDestroy(comm_);
      } else {
        (void)ncclCommAbort(comm_);
      }
      comm_ = nullptr;
    }
  } catch (...) {
    // Destructors never throw.
  }
  if (barrier_buf_ != nullptr) (void)cudaFree(barrier_buf_);
  if (internal_stream_ != nullptr) (void)cudaStreamDestroy(internal_stream_);
}

void NcclCommunicator::check_async(const std::string& what) {
  if (comm_ == nullptr) return;  // aborted: Handle reports that itself
  ncclResult_t state = ncclSuccess;
  ncclResult_t rc = ncclCommGetAsyncError(comm_, &state);
  if (rc == ncclSuccess) rc = state;
  if (rc == ncclSuccess || rc == ncclInProgress) return;
  const std::string text = nccl_error_text(comm_, rc);
  abort();  // an NCCL communicator with an async error can only be aborted
  DISTATTN_THROW(Status::kNcclError, what, " on rank ", rank_, " failed asynchronously: ", text,
                 "; the communicator was aborted");
}

void NcclCommunicator::wait_enqueued(const char* what) {
  const ncclResult_t st = poll_state(comm_, Clock::now() + timeout());
  if (st == ncclSuccess) return;
  if (st == ncclInProgress) {
    abort();
    DISTATTN_THROW(Status::kTimeout, what, " on rank ", rank_,
                   ": NCCL did not finish enqueuing within the watchdog timeout; the "
                   "communicator was aborted");
  }
  const std::string text = nccl_error_text(comm_, st);
  abort();
  DISTATTN_THROW(Status::kNcclError, what, " on rank ", rank_, " failed: ", text,
                 "; the communicator was aborted");
}

std::unique_ptr<PendingOp> NcclCommunicator::finish_enqueue(const char* what, cudaStream_t stream) {
  wait_enqueued(what);
  cudaEvent_t ev = nullptr;
  DISTATTN_NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), what, " on rank ",
                           rank_);
  const cudaError_t e = cudaEventRecord(ev, stream);
  if (e != cudaSuccess) {
    (void)cudaEventDestroy(ev);
    DISTATTN_THROW(Status::kCudaError, what, " on rank ", rank_,
                   ": cudaEventRecord failed: ", cudaGetErrorString(e));
  }
  return std::make_unique<NcclPendingOp>(this, ev, stream, device_.index, what);
}

std::unique_ptr<PendingOp> NcclCommunicator::start_all_reduce(const void* send, void* recv,
                                                              size_t count, DType dtype,
                                                              ReduceOp op, Stream s) {
  DeviceGuard guard(device_.index);
  DISTATTN_NCCL_CHECK(
      ncclAllReduce(send, recv, count, nccl_type(dtype), nccl_op(op), comm_, cuda_stream(s)),
      "all_reduce on rank ", rank_);
  return finish_enqueue("all_reduce", cuda_stream(s));
}

std::unique_ptr<PendingOp> NcclCommunicator::start_all_gather(const void* send, void* recv,
                                                              size_t send_count, DType dtype,
                                                              Stream s) {
  DeviceGuard guard(device_.index);
  DISTATTN_NCCL_CHECK(
      ncclAllGather(send, recv, send_count, nccl_type(dtype), comm_, cuda_stream(s)),
      "all_gather on rank ", rank_);
  return finish_enqueue("all_gather", cuda_stream(s));
}

std::unique_ptr<PendingOp> NcclCommunicator::start_reduce_scatter(const void* send, void* recv,
                                                                  size_t recv_count, DType dtype,
                                                                  ReduceOp op, Stream s) {
  DeviceGuard guard(device_.index);
  DISTATTN_NCCL_CHECK(ncclReduceScatter(send, recv, recv_count, nccl_type(dtype), nccl_op(op),
                                        comm_, cuda_stream(s)),
                      "reduce_scatter on rank ", rank_);
  return finish_enqueue("reduce_scatter", cuda_stream(s));
}

std::unique_ptr<PendingOp> NcclCommunicator::start_all_to_all(const void* send, void* recv,
                                                              size_t count, DType dtype, Stream s) {
  DeviceGuard guard(device_.index);
  const cudaStream_t stream = cuda_stream(s);
  const size_t block_bytes = count * dtype_size(dtype);
  const size_t total = block_bytes * static_cast<size_t>(size_);
  // In place, a block could be overwritten by a peer before it was sent: send from a
  // stream-ordered copy instead.
  void* scratch = nullptr;
  if (send == recv && total > 0) {
    DISTATTN_NCCL_CUDA_CHECK(cudaMallocAsync(&scratch, total, stream),
                             "in-place all_to_all on rank ", rank_, " (scratch of ", total,
                             " bytes)");
    DISTATTN_NCCL_CUDA_CHECK(
        cudaMemcpyAsync(scratch, send, total, cudaMemcpyDeviceToDevice, stream),
        "in-place all_to_all on rank ", rank_);
    send = scratch;
  }
  try {
    if (block_bytes > 0) {
      DISTATTN_NCCL_CUDA_CHECK(cudaMemcpyAsync(byte_ptr(recv, count * rank_, dtype),
                                               byte_ptr(send, count * rank_, dtype), block_bytes,
                                               cudaMemcpyDeviceToDevice, stream),
                               "all_to_all (own block) on rank ", rank_);
      nccl_group("all_to_all", rank_, [&] {
        const ncclDataType_t t = nccl_type(dtype);
        for (int j = 0; j < size_; ++j) {
          if (j == rank_) continue;
          const size_t off = count * static_cast<size_t>(j);
          DISTATTN_NCCL_CHECK(ncclSend(byte_ptr(send, off, dtype), count, t, j, comm_, stream),
                              "all_to_all send to rank ", j, " on rank ", rank_);
          DISTATTN_NCCL_CHECK(ncclRecv(byte_ptr(recv, off, dtype), count, t, j, comm_, stream),
                              "all_to_all recv from rank ", j, " on rank ", rank_);
        }
      });
    }
    auto op = finish_enqueue("all_to_all", stream);
    if (scratch != nullptr) (void)cudaFreeAsync(scratch, stream);
    return op;
  } catch (...) {
    if (scratch != nullptr && !aborted()) (void)cudaFreeAsync(scratch, stream);
    throw;
  }
}

std::unique_ptr<PendingOp> NcclCommunicator::start_all_to_all_v(
    const void* send, std::span<const size_t> send_counts, std::span<const size_t> send_displs,
    void* recv, std::span<const size_t> recv_counts, std::span<const size_t> recv_displs,
    DType dtype, Stream s) {
  DeviceGuard guard(device_.index);
  const cudaStream_t stream = cuda_stream(s);
  const size_t me = static_cast<size_t>(rank_);
  DISTATTN_CHECK(send_counts[me] == recv_counts[me], "all_to_all_v on rank ", rank_,
                 ": this rank sends ", send_counts[me], " elements to itself but expects ",
                 recv_counts[me], "; make send_counts[rank] equal recv_counts[rank]");
  if (send_counts[me] > 0) {
    DISTATTN_NCCL_CUDA_CHECK(
        cudaMemcpyAsync(byte_ptr(recv, recv_displs[me], dtype),
                        byte_ptr(send, send_displs[me], dtype), send_counts[me] * dtype_size(dtype),
                        cudaMemcpyDeviceToDevice, stream),
        "all_to_all_v (own block) on rank ", rank_);
  }
  nccl_group("all_to_all_v", rank_, [&] {
    const ncclDataType_t t = nccl_type(dtype);
    for (int j = 0; j < size_; ++j) {
      const size_t uj = static_cast<size_t>(j);
      if (j == rank_) continue;
      // Zero-sized blocks are skipped on both sides (the peer's count for us is zero too).
      if (send_counts[uj] > 0)
        DISTATTN_NCCL_CHECK(
            ncclSend(byte_ptr(send, send_displs[uj], dtype), send_counts[uj], t, j, comm_, stream),
            "all_to_all_v send to rank ", j, " on rank ", rank_);
      if (recv_counts[uj] > 0)
        DISTATTN_NCCL_CHECK(
            ncclRecv(byte_ptr(recv, recv_displs[uj], dtype), recv_counts[uj], t, j, comm_, stream),
            "all_to_all_v recv from rank ", j, " on rank ", rank_);
    }
  });
  return finish_enqueue("all_to_all_v", stream);
}

std::unique_ptr<PendingOp> NcclCommunicator::start_broadcast(const void* send, void* recv,
                                                             size_t count, DType dtype, int root,
                                                             Stream s) {
  DeviceGuard guard(device_.index);
  DISTATTN_NCCL_CHECK(
      ncclBroadcast(send, recv, count, nccl_type(dtype), root, comm_, cuda_stream(s)),
      "broadcast from root ", root, " on rank ", rank_);
  return finish_enqueue("broadcast", cuda_stream(s));
}

std::unique_ptr<PendingOp> NcclCommunicator::start_group(std::span<const P2POp> ops, Stream s) {
  DeviceGuard guard(device_.index);
  const cudaStream_t stream = cuda_stream(s);
  if (!ops.empty()) {
    nccl_group("send_recv", rank_, [&] {
      for (const P2POp& p : ops) {
        if (p.count == 0) continue;
        const ncclDataType_t t = nccl_type(p.dtype);
        if (p.kind == P2POp::Kind::kSend) {
          DISTATTN_NCCL_CHECK(ncclSend(p.buffer, p.count, t, p.peer, comm_, stream),
                              "send to rank ", p.peer, " on rank ", rank_);
        } else {
          DISTATTN_NCCL_CHECK(ncclRecv(p.buffer, p.count, t, p.peer, comm_, stream),
                              "recv from rank ", p.peer, " on rank ", rank_);
        }
      }
    });
  }
  return finish_enqueue("send_recv", stream);
}

std::unique_ptr<PendingOp> NcclCommunicator::start_barrier() {
  // NCCL has no barrier: an all_reduce of one int completes only after every rank joined.
  DeviceGuard guard(device_.index);
  DISTATTN_NCCL_CHECK(
      ncclAllReduce(barrier_buf_, barrier_buf_, 1, ncclInt32, ncclSum, comm_, internal_stream_),
      "barrier on rank ", rank_);
  return finish_enqueue("barrier", internal_stream_);
}

std::unique_ptr<Communicator> NcclCommunicator::do_split(int color, int key) {
  DeviceGuard guard(device_.index);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t child = nullptr;
  DISTATTN_NCCL_CHECK(
      ncclCommSplit(comm_, color == kNoColor ? NCCL_SPLIT_NOCOLOR : color, key, &child, &config),
      "split(color ", color, ", key ", key, ") on rank ", rank_);
  wait_enqueued("split");
  if (child == nullptr) return nullptr;
  const ncclResult_t st = poll_state(child, Clock::now() + timeout());
  if (st != ncclSuccess) {
    const std::string text = st == ncclInProgress ? "did not finish within the watchdog timeout"
                                                  : nccl_error_text(child, st);
    (void)ncclCommAbort(child);
    DISTATTN_THROW(st == ncclInProgress ? Status::kTimeout : Status::kNcclError, "split(color ",
                   color, ", key ", key, ") on rank ", rank_, ": the new communicator ", text);
  }
  try {
    return std::make_unique<NcclCommunicator>(child, device_);
  } catch (...) {
    (void)ncclCommAbort(child);
    throw;
  }
}

void NcclCommunicator::do_abort() noexcept {
  if (comm_ == nullptr) return;
  int prev = -1;
  if (cudaGetDevice(&prev) == cudaSuccess && prev != device_.index)
    (void)cudaSetDevice(device_.index);
  (void)ncclCommAbort(comm_);
  comm_ = nullptr;
  if (prev >= 0 && prev != device_.index) (void)cudaSetDevice(prev);
}

// ---- world bootstrap
// ------------------------------------------------------------------------------

namespace {
// Nonblocking init of one rank, polled until `deadline` (then aborted: Error(kTimeout)).
std::unique_ptr<Communicator> init_nccl_rank(const ncclUniqueId& id, int rank, int size,
                                             Device device, Clock::time_point deadline) {
  DeviceGuard guard(device.index);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  DISTATTN_NCCL_CHECK(ncclCommInitRankConfig(&comm, size, id, rank, &config), "NCCL init of rank ",
                      rank, " of ", size);
  const ncclResult_t st = poll_state(comm, deadline);
  if (st != ncclSuccess) {
    const std::string text = st == ncclInProgress
                                 ? std::string("did not finish within the watchdog timeout")
                                 : nccl_error_text(comm, st);
    (void)ncclCommAbort(comm);
    DISTATTN_THROW(st == ncclInProgress ? Status::kTimeout : Status::kNcclError,
                   "NCCL init of rank ", rank, " of ", size, " on GPU ", device.index, ": ", text);
  }
  try {
    return std::make_unique<NcclCommunicator>(comm, device);
  } catch (...) {
    (void)ncclCommAbort(comm);
    throw;
  }
}
}  // namespace

std::unique_ptr<Communicator> make_nccl_world(Device device) {
  DISTATTN_CHECK(device.is_cuda(), "the NCCL backend needs a CUDA device, got ", device.str(),
                 "; use the mpi backend for CPU buffers");
  int mpi_up = 0;
  MPI_Initialized(&mpi_up);
  DISTATTN_CHECK_STATUS(mpi_up != 0, Status::kInvalidArgument,
                        "the NCCL backend bootstraps over MPI: call distattn::runtime_init first");
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const auto timeout = default_timeout();
  const auto deadline = Clock::now() + timeout;

  // 1. Every rank reports its GPU before NCCL runs, so that every rank reaches the same
  //    verdict (and throws the same error) instead of some of them hanging in NCCL.
  RankGpu mine;
  const int visible = cuda_device_count();
  if (device.index < 0 || device.index >= visible) {
    std::snprintf(mine.error, sizeof(mine.error), "GPU %d requested but %d visible", device.index,
                  visible);
    gethostname(mine.host, sizeof(mine.host) - 1);
  } else {
    mine = describe_gpu(device);
  }
  std::vector<RankGpu> all(static_cast<size_t>(size));
  MPI_Request req = MPI_REQUEST_NULL;
  MPI_Iallgather(&mine, sizeof(RankGpu), MPI_BYTE, all.data(), sizeof(RankGpu), MPI_BYTE,
                 MPI_COMM_WORLD, &req);
  mpi_wait(&req, deadline, "exchanging GPU identities");
  for (int r = 0; r < size; ++r) {
    const RankGpu& g = all[static_cast<size_t>(r)];
    DISTATTN_CHECK_STATUS(g.ok, Status::kUnsupported, "NCCL backend: rank ", r, " on ", g.host,
                          " cannot use its GPU: ", g.error,
                          "; fix the GPU binding or use the MPI backend (--backend mpi)");
  }
  for (int a = 0; a < size; ++a) {
    for (int b = a + 1; b < size; ++b) {
      const RankGpu& ga = all[static_cast<size_t>(a)];
      const RankGpu& gb = all[static_cast<size_t>(b)];
      DISTATTN_CHECK_STATUS(
          std::memcmp(ga.uuid, gb.uuid, sizeof(ga.uuid)) != 0, Status::kUnsupported,
          "NCCL backend: ranks ", a, " and ", b, " share one GPU (", ga.host, " ", pci_id(ga),
          "); NCCL refuses two ranks of one communicator on one GPU. Launch one "
          "rank per GPU, or use the MPI backend (--backend mpi / Backend::kMpi), which stages "
          "device buffers through the host");
    }
  }

  // 2. Rank 0 creates the unique id and broadcasts it (with its success flag, so a failure
  //    there cannot leave the others waiting).
  struct IdMsg {
    int rc = 0;
    ncclUniqueId id{};
  } msg;
  if (rank == 0) msg.rc = static_cast<int>(ncclGetUniqueId(&msg.id));
  req = MPI_REQUEST_NULL;
  MPI_Ibcast(&msg, sizeof(msg), MPI_BYTE, 0, MPI_COMM_WORLD, &req);
  mpi_wait(&req, deadline, "broadcasting the NCCL unique id");
  DISTATTN_CHECK_STATUS(msg.rc == ncclSuccess, Status::kNcclError,
                        "NCCL backend: ncclGetUniqueId failed on rank 0: ",
                        ncclGetErrorString(static_cast<ncclResult_t>(msg.rc)));

  // 3. Nonblocking init, polled under the watchdog.
  return init_nccl_rank(msg.id, rank, size, device, deadline);
}

std::vector<uint8_t> make_nccl_unique_id() {
  ncclUniqueId id{};
  DISTATTN_NCCL_CHECK(ncclGetUniqueId(&id), "nccl_unique_id");
  const auto* p = reinterpret_cast<const uint8_t*>(&id);
  return {p, p + sizeof(id)};
}

std::unique_ptr<Communicator> make_nccl_communicator(std::span<const uint8_t> id, int rank,
                                                     int size, Device device) {
  ncclUniqueId uid{};
  DISTATTN_CHECK(id.size() == sizeof(uid), "create_nccl_communicator: the NCCL unique id has ",
                 id.size(), " bytes but must have ", sizeof(uid));
  std::memcpy(&uid, id.data(), sizeof(uid));
  return init_nccl_rank(uid, rank, size, device, Clock::now() + default_timeout());
}

}  // namespace distattn::comm
