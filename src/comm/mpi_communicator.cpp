// MPI backend: nonblocking MPI-3 collectives on a duplicated communicator.
//
// Every op is posted as one or more MPI requests held by an MpiOpState; Handle::wait()
// polls them (MPI_Testall) under the watchdog. Messages longer than max_count() elements
// are chunked (reductions) or described by one derived datatype (data movement), so
// counts of 2^31 elements and more work with the int-count MPI-3 API. bf16/fp16 sums over
// more than 2 ranks move 16-bit data and accumulate in fp32 at the owner of each block (an
// all-to-all, then for all_reduce a second, point-to-point stage), rounding once; other
// bf16/fp16 reductions combine in fp32 per element on the 16-bit data (the same result).
#include "src/comm/mpi_communicator.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <iomanip>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "distattn/config.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"
#include "distattn/runtime.h"
#include "src/comm/keep_alive.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn::comm {

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS || len <= 0)
    return "MPI error code " + std::to_string(code);
  return std::string(buf, static_cast<size_t>(len)) + " (code " + std::to_string(code) + ")";
}

size_t mpi_max_count_from_env() {
  const char* v = std::getenv("DISTATTN_MPI_MAX_COUNT");
  if (v == nullptr || *v == '\0') return static_cast<size_t>(INT_MAX);
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  DISTATTN_CHECK(end != v && *end == '\0' && x >= 1 && x <= INT_MAX, "DISTATTN_MPI_MAX_COUNT='", v,
                 "' must be an integer in [1, ", INT_MAX, "]");
  return static_cast<size_t>(x);
}

namespace detail {

class MpiOpState;

// Ops still in flight on one communicator, so progress() can drive them.
struct MpiRegistry {
  std::mutex mu;
  std::vector<MpiOpState*> ops;
  // Ops of this communicator whose next stage is not posted yet. A stage is posted by a
  // poll of its own op, and the peers' ops wait for it: while any is pending, testing any op
  // polls them all, so that a rank waiting for op A still moves op B on (peers may wait for
  // B first).
  std::atomic<int> staged{0};
};

#if DISTATTN_WITH_CUDA
using Clock = std::chrono::steady_clock;

// `query` (cudaStreamQuery / cudaEventQuery on one object) until it leaves cudaErrorNotReady
// or `deadline` passed: the watchdog's bounded form of cudaStreamSynchronize /
// cudaEventSynchronize, so that a stream that never drains (a hung kernel, a collective of
// another library waiting for a peer) cannot block a rank forever. Returns the final status,
// or cudaErrorNotReady on timeout. Yields first (staging waits are usually short), then
// sleeps with backoff.
template <typename Query>
cudaError_t poll_cuda_until(Query&& query, Clock::time_point deadline) {
  int polls = 0;
  auto sleep = std::chrono::microseconds(10);
  for (;;) {
    const cudaError_t e = query();
    if (e != cudaErrorNotReady) return e;
    if (Clock::now() >= deadline) return cudaErrorNotReady;
    if (++polls <= 1000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(100));
    }
  }
}

cudaError_t wait_stream_until(cudaStream_t s, Clock::time_point deadline) {
  return poll_cuda_until([s] { return cudaStreamQuery(s); }, deadline);
}

// Pinned buffers that an asynchronous copy may still read or write after the watchdog gave up
// on it: they must never be reused or freed, so they are kept for the life of the process.
void park_forever(std::vector<std::shared_ptr<void>>& buffers) noexcept {
  if (buffers.empty()) return;
  try {
    static auto* parked = new std::vector<std::shared_ptr<void>>;  // never destroyed
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    for (auto& b : buffers) parked->push_back(std::move(b));
  } catch (...) {
    // Out of memory: leak the references instead (same effect).
    for (auto& b : buffers) new std::shared_ptr<void>(std::move(b));
  }
  buffers.clear();
}

// Pinned host buffers for staging device memory, reused across ops of one communicator.
// Buffers whose contents are still being copied to the device asynchronously (results of
// Handle::wait_on) are parked with an event recorded after those copies and come back to
// the free list once the event completed: checked at every acquire(), drained (the host
// waits, up to a deadline) by drain().
struct PinnedPool : std::enable_shared_from_this<PinnedPool> {
  struct Deferred {
    cudaEvent_t done = nullptr;
    std::vector<std::shared_ptr<void>> buffers;
  };

  std::mutex mu;
  std::multimap<size_t, void*> free_list;
  std::vector<Deferred> deferred;

  std::shared_ptr<void> acquire(size_t bytes) {
    reclaim(nullptr);
    void* p = nullptr;
    size_t cap = bytes;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free_list.lower_bound(bytes);
      if (it != free_list.end() && it->first <= 2 * bytes + 4096) {
        p = it->second;
        cap = it->first;
        free_list.erase(it);
      }
    }
    if (p == nullptr) {
      const cudaError_t e = cudaMallocHost(&p, bytes);
      if (e != cudaSuccess) (void)cudaGetLastError();
      DISTATTN_CHECK_STATUS(e == cudaSuccess, Status::kCudaError, "cudaMallocHost(", bytes,
                            ") for MPI staging failed: ", cudaGetErrorString(e));
    }
    auto self = shared_from_this();
    return std::shared_ptr<void>(p, [self, cap](void* q) {
      std::lock_guard<std::mutex> lock(self->mu);
      self->free_list.emplace(cap, q);
    });
  }

  // Keeps `buffers` out of the free list until `done` (owned from here on) has completed.
  void defer(cudaEvent_t done, std::vector<std::shared_ptr<void>> buffers) {
    std::lock_guard<std::mutex> lock(mu);
    deferred.push_back({done, std::move(buffers)});
  }

  // Returns the parked buffers whose event completed; with a `deadline` the host waits for
  // each event until then (a copy still pending after it keeps its buffers parked for good).
  // Never throws: a failed event query means the device is unusable, and the buffers are
  // then only released by a waiting reclaim.
  void reclaim(const Clock::time_point* deadline) noexcept {
    std::vector<Deferred> ready;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (deferred.empty()) return;
      for (auto it = deferred.begin(); it != deferred.end();) {
        const cudaEvent_t ev = it->done;
        const cudaError_t e = deadline != nullptr
                                  ? poll_cuda_until([ev] { return cudaEventQuery(ev); }, *deadline)
                                  : cudaEventQuery(ev);
        if (e != cudaSuccess && e != cudaErrorNotReady) (void)cudaGetLastError();
        if (e == cudaSuccess || (deadline != nullptr && e != cudaErrorNotReady)) {
          ready.push_back(std::move(*it));
          it = deferred.erase(it);
        } else {
          ++it;
        }
      }
    }
    // Outside the lock: releasing a buffer takes `mu` (its deleter refills the free list).
    for (Deferred& d : ready) (void)cudaEventDestroy(d.done);
  }

  // The host waits (until `deadline`) for every parked copy; their buffers return to the
  // free list. The communicator calls it on destruction: parked buffers hold the pool alive
  // (their deleters keep a reference), so the pool's own destructor could not run before;
  // buffers of a copy that outlives the deadline keep it alive for good (never freed under
  // a running DMA).
  void drain(Clock::time_point deadline) noexcept { reclaim(&deadline); }

  // Runs once no buffer is out (parked ones hold a reference), so nothing is in flight.
  ~PinnedPool() {
    for (auto& [cap, p] : free_list) cudaFreeHost(p);
  }
};
#else
struct PinnedPool {};
#endif

// Backend state of one posted op: its requests and the buffers MPI reads/writes.
class MpiOpState final : public PendingOp {
 public:
  MpiOpState(std::shared_ptr<MpiRegistry> registry, std::shared_ptr<PinnedPool> pool, Stream stream,
             std::string context, std::chrono::milliseconds timeout)
      : registry_(std::move(registry)),
        pool_(std::move(pool)),
        stream_(stream),
        context_(std::move(context)),
        timeout_(timeout) {
    std::lock_guard<std::mutex> lock(registry_->mu);
    registry_->ops.push_back(this);
  }
  ~MpiOpState() override {
    if (next_stage) registry_->staged.fetch_sub(1, std::memory_order_relaxed);
    unregister();
  }

  // Never throws; records failure. True once every request completed.
  bool poll() noexcept {
    if (done_ || failed_rc_ != MPI_SUCCESS) return done_;
    int flag = 1;
    if (!reqs.empty()) {
      // Statuses only for ops with receives to check (send_recv groups).
      if (!recv_checks.empty()) statuses_.resize(reqs.size());
      MPI_Status* st = recv_checks.empty() ? MPI_STATUSES_IGNORE : statuses_.data();
      const int rc = MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &flag, st);
      if (rc != MPI_SUCCESS) {
        failed_rc_ = rc;
        if (rc == MPI_ERR_IN_STATUS && st != MPI_STATUSES_IGNORE) {
          for (const RecvCheck& c : recv_checks) {
            const int e = statuses_[c.index].MPI_ERROR;
            if (e != MPI_SUCCESS && e != MPI_ERR_PENDING) {
              failed_detail_ = "the receive from peer " + std::to_string(c.peer) +
                               " failed: " + mpi_error_string(e) +
                               " (the peer sent a message of another size than this rank posted)";
              break;
            }
          }
        }
        unregister();
        return false;
      }
      if (flag) check_received();
    }
    if (flag && next_stage) {
      // Every request of this stage completed: the next one posts its requests.
      auto stage = std::move(next_stage);
      next_stage = nullptr;
      registry_->staged.fetch_sub(1, std::memory_order_relaxed);
      reqs.clear();
      int rc = MPI_SUCCESS;
      try {
        rc = stage();
      } catch (const std::exception& e) {
        rc = MPI_ERR_OTHER;
        failed_detail_ = std::string("posting its next stage failed: ") + e.what();
      }
      if (rc != MPI_SUCCESS) {
        failed_rc_ = rc;
        unregister();
        return false;
      }
      flag = reqs.empty() && !next_stage ? 1 : 0;
    }
    if (flag) {
      done_ = true;
      unregister();
    }
    return done_;
  }

  bool test() override {
    if (registry_->staged.load(std::memory_order_relaxed) > 0) poll_staged();
    const bool done = poll();
    if (!failed_detail_.empty() && failed_rc_ == MPI_SUCCESS) failed_rc_ = MPI_ERR_COUNT;
    DISTATTN_CHECK_STATUS(failed_rc_ == MPI_SUCCESS, Status::kMpiError, context_, " failed: ",
                          failed_detail_.empty() ? mpi_error_string(failed_rc_) : failed_detail_);
    return done;
  }

  // A receive whose message must have exactly `bytes` bytes (a shorter one completes
  // without error in MPI: the ranks disagree on the size, which must not pass).
  struct RecvCheck {
    size_t index;  // into reqs
    MPI_Count bytes;
    int peer;
  };
  std::vector<RecvCheck> recv_checks;

  // Blocking semantics: after it returns the host sees the results in device memory too.
  // The copies run on the op's stream (not a plain cudaMemcpy, whose legacy default stream
  // would also wait for every blocking stream's compute), then the host waits for it, under
  // the watchdog (the stream may hold other work that never ends).
  void finish() override {
    for (auto& f : post) f();
#if DISTATTN_WITH_CUDA
    if (copy_back.empty()) return;
    const cudaStream_t s = static_cast<cudaStream_t>(stream_);
    enqueue_copy_back(s);
    const cudaError_t e = wait_stream_until(s, Clock::now() + timeout_);
    if (e == cudaErrorNotReady) {
      park_forever(pinned);  // the copies may still read them
      DISTATTN_THROW(Status::kTimeout, context_,
                     ": the copy of MPI results to the device did not complete within the "
                     "watchdog timeout (the stream it was queued on is stuck behind earlier "
                     "work; raise DISTATTN_COMM_TIMEOUT_S if it is only slow)");
    }
    if (e != cudaSuccess) (void)cudaGetLastError();
    DISTATTN_CHECK_STATUS(
        e == cudaSuccess, Status::kCudaError, context_,
        ": waiting for the copy of MPI results to the device failed: ", cudaGetErrorString(e));
#endif
  }

  // Stream-ordered: the copies are enqueued on `s` and the host does not wait; the staging
  // buffers are parked in the pool until an event recorded after the copies completed.
  void finish_on(Stream s) override {
    for (auto& f : post) f();
#if DISTATTN_WITH_CUDA
    if (copy_back.empty()) return;
    const cudaStream_t cs = static_cast<cudaStream_t>(s);
    enqueue_copy_back(cs);
    cudaEvent_t done = nullptr;
    cudaError_t e = cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
    if (e == cudaSuccess) {
      e = cudaEventRecord(done, cs);
      if (e != cudaSuccess) (void)cudaEventDestroy(done);
    }
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      // No event to park the buffers on: they may only be reused once the copies ran.
      settle(cs);
      DISTATTN_THROW(Status::kCudaError, context_,
                     ": recording the completion of the copy of MPI results to the device "
                     "failed: ",
                     cudaGetErrorString(e));
    }
    pool_->defer(done, std::move(pinned));
    pinned.clear();
#endif
  }

  // A staged result: `host` (pinned, in `pinned`) is copied to `device` after completion.
  struct CopyBack {
    const void* host;
    void* device;
    size_t bytes;
  };

  std::vector<MPI_Request> reqs;
  // An op in two stages: once every request in `reqs` completed, poll() clears `reqs` and
  // calls this, which does host work and posts the next requests into `reqs` (returns an
  // MPI error code; it may set another next_stage). Its messages must be point-to-point
  // with a tag of this op's own: the stages of ops in flight together start in any order.
  std::function<int()> next_stage;
  std::vector<std::function<void()>> post;  // host-side work after completion
  std::vector<CopyBack> copy_back;          // staged results to device, after `post`
  std::vector<std::unique_ptr<char[]>> scratch;
  std::vector<std::shared_ptr<void>> pinned;
  // Caller-owned host buffers MPI reads or writes (kept alive on abort: detail::retain_memory).
  std::vector<std::pair<const void*, size_t>> user_buffers;

 private:
  // Polls the other ops of the communicator that still have a stage to post.
  void poll_staged() noexcept {
    std::vector<MpiOpState*> ops;
    {
      std::lock_guard<std::mutex> lock(registry_->mu);
      for (MpiOpState* op : registry_->ops)
        if (op != this && op->next_stage) ops.push_back(op);
    }
    for (MpiOpState* op : ops) op->poll();
  }

  void unregister() noexcept {
    if (!registered_) return;
    registered_ = false;
    std::lock_guard<std::mutex> lock(registry_->mu);
    auto& v = registry_->ops;
    v.erase(std::remove(v.begin(), v.end(), this), v.end());
  }

#if DISTATTN_WITH_CUDA
  void enqueue_copy_back(cudaStream_t s) {
    for (const CopyBack& c : copy_back) {
      const cudaError_t e = cudaMemcpyAsync(c.device, c.host, c.bytes, cudaMemcpyHostToDevice, s);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        // Copies already enqueued still read the staging buffers, which return to the pool
        // when this state dies: let them finish first.
        settle(s);
        DISTATTN_THROW(Status::kCudaError, context_,
                       ": copying an MPI result to the device failed: cudaMemcpyAsync: ",
                       cudaGetErrorString(e));
      }
    }
  }
  // Lets the copies already enqueued on `s` finish before the staging buffers can return to
  // the pool (bounded: buffers of copies still pending at the deadline are parked for good).
  void settle(cudaStream_t s) noexcept {
    const cudaError_t e = wait_stream_until(s, Clock::now() + timeout_);
    if (e == cudaErrorNotReady) {
      park_forever(pinned);
    } else if (e != cudaSuccess) {
      (void)cudaGetLastError();
    }
  }
#endif

  std::shared_ptr<MpiRegistry> registry_;
  std::shared_ptr<PinnedPool> pool_;
  Stream stream_;  // the op's stream: device inputs were staged on it
  std::string context_;
  // Statuses of completed receives; a mismatch is reported by test() as a failure.
  void check_received() noexcept {
    for (const RecvCheck& c : recv_checks) {
      MPI_Count got = -1;
      if (MPI_Get_elements_x(&statuses_[c.index], MPI_BYTE, &got) != MPI_SUCCESS) got = -1;
      if (got != c.bytes) {
        failed_detail_ = "the message from peer " + std::to_string(c.peer) + " has " +
                         std::to_string(static_cast<long long>(got)) +
                         " bytes but this rank posted a receive of " +
                         std::to_string(static_cast<long long>(c.bytes)) +
                         " (the ranks disagree on the message size)";
        return;
      }
    }
  }

  std::chrono::milliseconds timeout_;
  std::vector<MPI_Status> statuses_;
  std::string failed_detail_;
  bool registered_ = true;
  bool done_ = false;
  int failed_rc_ = MPI_SUCCESS;
};

namespace {
struct AbandonedRequests {
  std::mutex mu;
  std::vector<MPI_Request> reqs;
  std::string why;
};
AbandonedRequests& abandoned() {
  static auto* a = new AbandonedRequests;  // never destroyed: used from runtime_finalize
  return *a;
}
}  // namespace

void abandon_mpi_requests(std::span<const MPI_Request> reqs, const std::string& why) {
  // runtime_finalize (core, below comm) learns of abandoned requests through a hook that
  // is registered the first time there are some.
  static std::once_flag hooked;
  std::call_once(hooked, [] {
    distattn::detail::add_finalize_hook(
        [](std::chrono::steady_clock::time_point deadline, std::string* reason) {
          const size_t pending = settle_abandoned_mpi_requests(deadline, reason);
          if (pending > 0 && reason != nullptr)
            *reason = "MPI request(s) abandoned by a communicator abort: " + *reason;
          return pending;
        });
  });
  AbandonedRequests& a = abandoned();
  std::lock_guard<std::mutex> lock(a.mu);
  for (MPI_Request r : reqs)
    if (r != MPI_REQUEST_NULL) a.reqs.push_back(r);
  if (a.why.empty()) a.why = why;
}

size_t settle_abandoned_mpi_requests(std::chrono::steady_clock::time_point deadline,
                                     std::string* why) {
  AbandonedRequests& a = abandoned();
  std::lock_guard<std::mutex> lock(a.mu);
  if (why != nullptr) *why = a.why;
  auto sleep = std::chrono::microseconds(20);
  for (;;) {
    // MPI_Test frees and nulls a completed request; a failed one counts as settled (its
    // error was already reported, or its owner is gone).
    size_t pending = 0;
    for (MPI_Request& r : a.reqs) {
      if (r == MPI_REQUEST_NULL) continue;
      int flag = 0;
      if (MPI_Test(&r, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) r = MPI_REQUEST_NULL;
      if (!flag && r != MPI_REQUEST_NULL) ++pending;
    }
    if (pending == 0) {
      a.reqs.clear();
      return 0;
    }
    if (std::chrono::steady_clock::now() >= deadline) return pending;
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::microseconds(500));
  }
}

}  // namespace detail

namespace {

using detail::MpiOpState;

constexpr int kP2PTag = 0x5d1;
constexpr int kAllToAllVTag = 0x5d2;
// all_gather over 2 ranks (one exchange): ops in flight together match in posting order.
constexpr int kAllGatherTag = 0x5d3;
constexpr size_t kAllGatherExchangeBytes = size_t{256} << 10;

// memcpy in 256 KiB pieces: one large memcpy takes glibc's non-temporal path, which measured
// 25-28 GB/s for 8 MiB against 40-43 GB/s in pieces that stay below its threshold (AMD EPYC
// Zen 5; Open MPI's own datatype copy, e.g. MPI_Allgather's local block, runs in pieces too).
void copy_bytes(void* dst, const void* src, size_t bytes) {
  constexpr size_t kPiece = size_t{256} << 10;
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  for (size_t off = 0; off < bytes; off += kPiece)
    std::memcpy(d + off, s + off, std::min(kPiece, bytes - off));
}

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::kFloat32:
      return MPI_FLOAT;
    case DType::kFloat64:
      return MPI_DOUBLE;
    case DType::kBFloat16:
      return MPI_UINT16_T;  // moved as bits; reduced through fp32
    case DType::kFloat16:
      return MPI_UINT16_T;
    case DType::kInt32:
      return MPI_INT32_T;
    case DType::kInt64:
      return MPI_INT64_T;
    case DType::kUInt8:
      return MPI_UINT8_T;
  }
  DISTATTN_THROW(Status::kInternal, "unhandled dtype ", static_cast<int>(t));
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  DISTATTN_THROW(Status::kInvalidArgument, "unknown reduce op ", static_cast<int>(op),
                 " (supported: sum, max, min)");
}

bool is_half(DType t) {
  return t == DType::kBFloat16 || t == DType::kFloat16;
}

// Reductions of 16-bit floats can travel in their own format: each combine widens both
// operands to fp32 and rounds the result once. That equals fp32 accumulation whenever every
// element is combined once (a sum over 2 ranks) or the combine never rounds (max, min), and
// moves half the bytes. A sum over more ranks would round at every step (losing ~log2(n)
// bits), so it is widened to fp32 for the whole reduction instead.
bool half_on_wire(ReduceOp op, int ranks) {
  return op != ReduceOp::kSum || ranks <= 2;
}

template <typename Half, int kOp>
void half_combine(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    // in (x) combined into inout (y) as Open MPI combines floats for MPI_SUM/MAX/MIN
    // (out = out > in ? out : in), so even NaNs end where the widened fp32 reduction puts them.
    const float x = Half::to_float(a[i]), y = Half::to_float(b[i]);
    b[i] = Half::from_float(kOp == 0 ? y + x : kOp == 1 ? (y > x ? y : x) : (y < x ? y : x));
  }
}

// The MPI_Op for a 16-bit float reduction (created once per process, never freed: MPI frees
// user ops at MPI_Finalize).
MPI_Op half_op(DType t, ReduceOp op) {
  static MPI_Op ops[6] = {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL,
                          MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL};
  static std::once_flag once;
  static int rc = MPI_SUCCESS;
  std::call_once(once, [] {
    MPI_User_function* const fns[6] = {half_combine<bf16_t, 0>, half_combine<bf16_t, 1>,
                                       half_combine<bf16_t, 2>, half_combine<fp16_t, 0>,
                                       half_combine<fp16_t, 1>, half_combine<fp16_t, 2>};
    for (int i = 0; i < 6 && rc == MPI_SUCCESS; ++i) rc = MPI_Op_create(fns[i], 1, &ops[i]);
  });
  DISTATTN_MPI_CHECK(rc, "creating the 16-bit float reduction ops");
  const int k = op == ReduceOp::kSum ? 0 : op == ReduceOp::kMax ? 1 : 2;
  return ops[(t == DType::kBFloat16 ? 0 : 3) + k];
}

void widen(const void* src, float* dst, size_t n, DType t) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (t == DType::kBFloat16) {
    for (size_t i = 0; i < n; ++i) dst[i] = bf16_t::to_float(s[i]);
  } else {
    for (size_t i = 0; i < n; ++i) dst[i] = fp16_t::to_float(s[i]);
  }
}

void narrow(const float* src, void* dst, size_t n, DType t) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (t == DType::kBFloat16) {
    for (size_t i = 0; i < n; ++i) d[i] = bf16_t::from_float(src[i]);
  } else {
    for (size_t i = 0; i < n; ++i) d[i] = fp16_t::from_float(src[i]);
  }
}

// dst = the fp32 sum of `parts` 16-bit blocks of n elements each (src block j at j*n),
// added in block order, rounded once.
void sum_half_blocks(const uint16_t* src, size_t parts, size_t n, float* acc, void* dst, DType t) {
  widen(src, acc, n, t);
  for (size_t j = 1; j < parts; ++j) {
    const uint16_t* s = src + j * n;
    if (t == DType::kBFloat16) {
      for (size_t i = 0; i < n; ++i) acc[i] += bf16_t::to_float(s[i]);
    } else {
      for (size_t i = 0; i < n; ++i) acc[i] += fp16_t::to_float(s[i]);
    }
  }
  narrow(acc, dst, n, t);
}

// The staged 16-bit sum (over more than 2 ranks) moves 16-bit data and accumulates in fp32:
// an all-to-all hands rank r block r of every rank's input, r adds them in fp32 and rounds
// once (reduce_scatter ends here); all_reduce then sends each reduced block to every peer.
// Same bytes as a ring of 16-bit data, half those of widening to fp32, and the fp32 result.
// Messages past max_count() elements keep the widened path (chunked).
bool half_sum_staged(DType t, ReduceOp op, int ranks, size_t per_rank_count, size_t max_count) {
  return is_half(t) && op == ReduceOp::kSum && ranks > 2 && per_rank_count <= max_count &&
         per_rank_count * static_cast<size_t>(ranks) <= static_cast<size_t>(INT_MAX);
}

// Tags of the staged sums' second stage: one per op in flight (a window of kStagedTags),
// apart from the send_recv tags, so that stages posted in any order still match.
constexpr int kStagedTagBase = 0x1000;
constexpr uint32_t kStagedTags = 0x4000;

const char* cptr(const void* p, size_t off) {
  return static_cast<const char*>(p) + off;
}
char* mptr(void* p, size_t off) {
  return static_cast<char*>(p) + off;
}

bool overlaps(const void* a, size_t an, const void* b, size_t bn) {
  if (an == 0 || bn == 0) return false;
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + bn && y < x + an;
}

// Polls a setup request (idup, the barrier before split) with the watchdog's backoff.
// Returns false on timeout (the request is then abandoned).
bool wait_request(MPI_Request* req, std::chrono::milliseconds timeout, const std::string& ctx) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int polls = 0;
  auto sleep = std::chrono::microseconds(20);
  for (;;) {
    int flag = 0;
    DISTATTN_MPI_CHECK(MPI_Test(req, &flag, MPI_STATUS_IGNORE), ctx);
    if (flag) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    if (++polls > 200) {
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(200));
    }
  }
}

// "3.0" for whole seconds and more, "0.25" below: the timeout as the user set it.
std::string format_seconds(std::chrono::milliseconds t) {
  const double s = std::chrono::duration<double>(t).count();
  std::ostringstream os;
  if (s >= 1.0)
    os << std::fixed << std::setprecision(1) << s;
  else
    os << std::setprecision(3) << s;
  return os.str();
}

std::string timeout_message(const std::string& what, int rank, int size,
                            std::chrono::milliseconds t, bool aborted) {
  std::ostringstream os;
  os << what << " on rank " << rank << " did not complete within " << format_seconds(t)
     << " s; peers: all " << size
     << " ranks of the communicator (one of them never joined, failed or is stuck; "
     << "raise DISTATTN_COMM_TIMEOUT_S if it is only slow)";
  if (aborted) os << "; the communicator was aborted";
  return os.str();
}

}  // namespace

// Collects the requests, scratch and staging buffers of one op while it is being posted.
class MpiOpBuilder {
 public:
  MpiOpBuilder(MpiCommunicator& comm, const char* op, Stream stream)
      : comm_(comm),
        op_(op),
        stream_(stream),
        uncaught_(std::uncaught_exceptions()),
        state_(std::make_unique<MpiOpState>(comm.registry_, comm.pinned_, stream, context(comm, op),
                                            comm.timeout())) {}

  ~MpiOpBuilder() {
    for (MPI_Datatype& t : types_) MPI_Type_free(&t);
#if DISTATTN_WITH_CUDA
    // Failed while posting with staging copies in flight: they write pinned buffers that
    // return to the pool with the state, so let them land first (under the watchdog; after
    // a timeout, or when host_ready() already timed out, the buffers are parked for good).
    if (state_ && staged_ && !synced_ && std::uncaught_exceptions() > uncaught_) {
      const cudaError_t e = stalled_
                                ? cudaErrorNotReady
                                : detail::wait_stream_until(static_cast<cudaStream_t>(stream_),
                                                            detail::Clock::now() + comm_.timeout());
      if (e == cudaErrorNotReady) {
        detail::park_forever(state_->pinned);
      } else if (e != cudaSuccess) {
        (void)cudaGetLastError();
      }
    }
#endif
    if (state_ && std::uncaught_exceptions() > uncaught_ && !state_->reqs.empty()) {
      // Some requests were posted before the failure: MPI may still use their buffers,
      // and the ranks no longer agree on the op sequence. Abandon both.
      comm_.abort();
      detail::keep_forever(std::move(state_));
    }
  }

  std::string ctx() const {
    return context(comm_, op_);
  }
  MpiOpState& st() {
    return *state_;
  }
  MPI_Comm mpi() const {
    return comm_.comm_;
  }
  std::unique_ptr<PendingOp> done() {
    return std::move(state_);
  }

  // Called for every MPI post (as its request argument, so before MPI sees any buffer):
  // staged inputs must have landed on the host.
  MPI_Request* req() {
    host_ready();
    state_->reqs.push_back(MPI_REQUEST_NULL);
    return &state_->reqs.back();
  }

  void* scratch(size_t bytes) {
    state_->scratch.push_back(std::make_unique_for_overwrite<char[]>(std::max<size_t>(bytes, 1)));
    return state_->scratch.back().get();
  }
  float* scratch_floats(size_t n) {
    return static_cast<float*>(scratch(n * sizeof(float)));
  }

  // The host waits (once per op) for the op's stream: the producers of device inputs run on
  // it, and the staging copies were enqueued behind them. Every host read of a staged
  // buffer outside MPI (widening, local copies) must call it first; req() does for MPI.
  // The wait is bounded by the watchdog: a stream that does not drain in time aborts the
  // communicator (peers wait for this rank's post) and throws Error(kTimeout).
  void host_ready() {
#if DISTATTN_WITH_CUDA
    if (staged_ && !synced_) {
      const cudaError_t e = detail::wait_stream_until(static_cast<cudaStream_t>(stream_),
                                                      detail::Clock::now() + comm_.timeout());
      if (e == cudaErrorNotReady) {
        stalled_ = true;
        comm_.abort();
        DISTATTN_THROW(Status::kTimeout, ctx(),
                       ": the stream the op was posted on did not reach the staging copies of "
                       "its device buffers within the watchdog timeout (earlier work on it is "
                       "stuck, or raise DISTATTN_COMM_TIMEOUT_S if it is only slow); the "
                       "communicator was aborted");
      }
      cuda_check(e, "waiting for the stream (cudaStreamQuery)");
      synced_ = true;
    }
#endif
  }

  // Host address MPI may read for an input buffer (device data is staged: the copy is
  // enqueued on the op's stream and lands by host_ready()).
  const void* in(const void* p, size_t bytes) {
#if DISTATTN_WITH_CUDA
    if (bytes > 0 && is_device(p)) {
      void* h = pinned(bytes);
      stage_in(h, p, bytes);
      return h;
    }
#endif
    if (bytes > 0) state_->user_buffers.emplace_back(p, bytes);
    return p;
  }
  // Host address MPI may write for an output buffer (copied to the device in finish()).
  void* out(void* p, size_t bytes) {
    return stage_out(p, bytes, false);
  }
  // Both: the current contents are read (in place) and the result written back.
  void* inout(void* p, size_t bytes) {
    return stage_out(p, bytes, true);
  }

  // An (int count, datatype) pair that MPI can express for `count` elements.
  struct Count {
    int n;
    MPI_Datatype type;
  };
  Count express(size_t count, DType dtype) {
    const MPI_Datatype base = mpi_type(dtype);
    const size_t c = comm_.max_count_;
    if (count <= c) return {static_cast<int>(count), base};
    const size_t q = count / c, r = count % c, elt = dtype_size(dtype);
    DISTATTN_CHECK_STATUS(q <= static_cast<size_t>(INT_MAX), Status::kUnsupported, ctx(), ": ",
                          count, " elements cannot be described to MPI (max ", c, " x ", INT_MAX,
                          ")");
    MPI_Datatype chunk = MPI_DATATYPE_NULL, body = MPI_DATATYPE_NULL, whole = MPI_DATATYPE_NULL;
    DISTATTN_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(c), base, &chunk), ctx());
    DISTATTN_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(q), chunk, &body), ctx());
    MPI_Type_free(&chunk);
    MPI_Datatype joined = body;
    if (r > 0) {
      MPI_Datatype tail = MPI_DATATYPE_NULL;
      DISTATTN_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(r), base, &tail), ctx());
      int lens[2] = {1, 1};
      MPI_Aint displs[2] = {0, static_cast<MPI_Aint>(q * c * elt)};
      MPI_Datatype parts[2] = {body, tail};
      DISTATTN_MPI_CHECK(MPI_Type_create_struct(2, lens, displs, parts, &joined), ctx());
      MPI_Type_free(&tail);
      MPI_Type_free(&body);
    }
    // The extent must be exactly count*elt so that block j of a collective starts at j*count.
    DISTATTN_MPI_CHECK(
        MPI_Type_create_resized(joined, 0, static_cast<MPI_Aint>(count * elt), &whole), ctx());
    MPI_Type_free(&joined);
    DISTATTN_MPI_CHECK(MPI_Type_commit(&whole), ctx());
    types_.push_back(whole);  // freed once posted; MPI keeps it alive for pending ops
    return {1, whole};
  }

 private:
  static std::string context(const MpiCommunicator& c, const char* op) {
    return std::string(op) + " on rank " + std::to_string(c.rank()) + " of " +
           std::to_string(c.size()) + " (mpi backend)";
  }

  void* stage_out(void* p, size_t bytes, bool read_first) {
#if DISTATTN_WITH_CUDA
    if (bytes > 0 && is_device(p)) {
      void* h = pinned(bytes);
      if (read_first) stage_in(h, p, bytes);
      state_->copy_back.push_back({h, p, bytes});
      return h;
    }
#endif
    (void)read_first;
    if (bytes > 0) state_->user_buffers.emplace_back(p, bytes);
    return p;
  }

#if DISTATTN_WITH_CUDA
  // A device buffer makes the op wait for its stream before MPI is posted (host_ready):
  // for inputs, their producers; for outputs, earlier readers of the old contents.
  // Every new device buffer re-arms that wait: a staging copy enqueued after an earlier
  // host_ready() (e.g. a send staged after a receive was posted) must land before MPI reads
  // its pinned buffer too.
  bool is_device(const void* p) {
    if (p == nullptr || pointer_device_type(p) != DeviceType::kCUDA) return false;
    staged_ = true;
    synced_ = false;
    return true;
  }
  // Device -> pinned host on the op's stream: stream-ordered after the data's producers, and
  // never on the legacy default stream (which would also wait for every blocking stream's
  // compute and so kill overlap).
  void stage_in(void* h, const void* p, size_t bytes) {
    cuda_check(
        cudaMemcpyAsync(h, p, bytes, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream_)),
        "cudaMemcpyAsync D2H");
  }
  void* pinned(size_t bytes) {
    state_->pinned.push_back(comm_.pinned_->acquire(bytes));
    return state_->pinned.back().get();
  }
  void cuda_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) (void)cudaGetLastError();
    DISTATTN_CHECK_STATUS(e == cudaSuccess, Status::kCudaError, ctx(), ": ", what,
                          " while staging device memory: ", cudaGetErrorString(e));
  }
  bool staged_ = false;   // some buffer of this op is device memory
  bool synced_ = false;   // the host waited for the op's stream
  bool stalled_ = false;  // that wait timed out: staging copies may still be in flight
#endif

  MpiCommunicator& comm_;
  const char* op_;
  Stream stream_;
  int uncaught_;
  std::unique_ptr<MpiOpState> state_;
  std::vector<MPI_Datatype> types_;
};

// ---- MpiCommunicator ---------------------------------------------------------------------------

MpiCommunicator::MpiCommunicator(MPI_Comm comm, size_t max_count)
    : comm_(comm),
      max_count_(std::clamp<size_t>(max_count, 1, static_cast<size_t>(INT_MAX))),
      registry_(std::make_shared<detail::MpiRegistry>()),
      pinned_(std::make_shared<detail::PinnedPool>()) {
  DISTATTN_CHECK(comm != MPI_COMM_NULL, "MpiCommunicator needs a valid MPI communicator");
  DISTATTN_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "mpi communicator");
  DISTATTN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_), "mpi communicator");
  DISTATTN_MPI_CHECK(MPI_Comm_size(comm_, &size_), "mpi communicator");
}

MpiCommunicator::~MpiCommunicator() {
#if DISTATTN_WITH_CUDA
  // Staging buffers parked behind asynchronous copies (wait_on) keep the pool alive; wait
  // for those copies so the pool can be freed with the communicator.
  if (pinned_) pinned_->drain(detail::Clock::now() + timeout());
#endif
  int finalized = 0;
  MPI_Finalized(&finalized);
  // Freeing is legal with abandoned requests pending: MPI frees it once they complete.
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::dup_world() {
  int init = 0;
  MPI_Initialized(&init);
  DISTATTN_CHECK(init,
                 "MPI is not initialized: call distattn::runtime_init(&argc, &argv) "
                 "before creating a communicator");
  return dup(MPI_COMM_WORLD, "create_world(mpi)");
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::dup(MPI_Comm comm, const char* what) {
  const size_t max_count = mpi_max_count_from_env();
  int rank = 0, size = 1;
  DISTATTN_MPI_CHECK(MPI_Comm_rank(comm, &rank), what);
  MPI_Comm_size(comm, &size);
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  DISTATTN_MPI_CHECK(MPI_Comm_idup(comm, &dup, &req), what, " on rank ", rank);
  const auto timeout = default_timeout();
  if (!wait_request(&req, timeout, what)) {
    detail::abandon_mpi_requests(std::span<const MPI_Request>(&req, 1),
                                 std::string(what) + " timed out on rank " + std::to_string(rank));
    DISTATTN_THROW(Status::kTimeout, timeout_message(std::string(what) + " (MPI_Comm_idup)", rank,
                                                     size, timeout, false));
  }
  return std::make_unique<MpiCommunicator>(dup, max_count);
}

bool MpiCommunicator::accepts_device_memory() const {
  return DISTATTN_WITH_CUDA != 0;
}

void MpiCommunicator::progress() {
  if (aborted()) return;
  std::vector<MpiOpState*> ops;
  {
    std::lock_guard<std::mutex> lock(registry_->mu);
    ops = registry_->ops;
  }
  for (MpiOpState* op : ops) op->poll();  // failures surface in the owner's test()/wait()
}

void MpiCommunicator::wait_setup(MPI_Request* req, const char* what) {
  if (wait_request(req, timeout(), std::string(what) + " on rank " + std::to_string(rank_))) return;
  detail::abandon_mpi_requests(std::span<const MPI_Request>(req, 1),
                               std::string(what) + " timed out on rank " + std::to_string(rank_));
  abort();
  DISTATTN_THROW(Status::kTimeout, timeout_message(what, rank_, size_, timeout(), true));
}

void MpiCommunicator::do_abort() noexcept {
  // In-flight requests cannot be cancelled portably (collectives never): their owners
  // leak them on purpose, so progress() must stop touching them. They are handed to the
  // process-wide record so that runtime_finalize() knows whether MPI can still finalize.
  std::lock_guard<std::mutex> lock(registry_->mu);
  std::vector<MPI_Request> pending;
  for (MpiOpState* op : registry_->ops) {
    bool in_flight = false;
    for (MPI_Request r : op->reqs) {
      if (r != MPI_REQUEST_NULL) {
        pending.push_back(r);
        in_flight = true;
      }
    }
    // MPI may still write the caller's buffers of these requests: Tensor storage there must
    // never be freed and reused (a strategy unwinding from the timeout frees its buffers).
    if (in_flight) {
      try {
        for (const auto& [p, n] : op->user_buffers) distattn::detail::retain_memory(p, n);
      } catch (...) {
      }
    }
  }
  if (!pending.empty()) {
    try {
      detail::abandon_mpi_requests(
          pending, "a communicator of " + std::to_string(size_) + " ranks was aborted on rank " +
                       std::to_string(rank_) + " with " + std::to_string(pending.size()) +
                       " MPI request(s) in flight");
    } catch (...) {
      // Out of memory while recording: finalize will at worst block like plain MPI.
    }
  }
  registry_->ops.clear();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_all_reduce(const void* send, void* recv,
                                                             size_t count, DType dtype, ReduceOp op,
                                                             Stream s) {
  MpiOpBuilder b(*this, "all_reduce", s);
  if (count == 0) return b.done();
  if (half_sum_staged(dtype, op, size_, count, max_count_)) {
    const size_t n = static_cast<size_t>(size_), r = static_cast<size_t>(rank_);
    const auto lo = [count, n](size_t j) { return count * j / n; };
    const size_t mine = lo(r + 1) - lo(r);
    const bool in_place = send == recv;
    void* hr = in_place ? b.inout(recv, count * 2) : b.out(recv, count * 2);
    const void* hs = in_place ? hr : b.in(send, count * 2);
    // The count arrays must stay untouched until the all-to-all completes: op scratch.
    int* cnt = static_cast<int*>(b.scratch(4 * n * sizeof(int)));
    for (size_t j = 0; j < n; ++j) {
      cnt[j] = static_cast<int>(lo(j + 1) - lo(j));  // send counts
      cnt[n + j] = static_cast<int>(lo(j));          // send displacements
      cnt[2 * n + j] = static_cast<int>(mine);       // receive counts
      cnt[3 * n + j] = static_cast<int>(j * mine);   // receive displacements
    }
    auto* parts = static_cast<uint16_t*>(b.scratch(n * mine * 2));
    float* acc = b.scratch_floats(mine);
    DISTATTN_MPI_CHECK(MPI_Ialltoallv(hs, cnt, cnt + n, MPI_UINT16_T, parts, cnt + 2 * n,
                                      cnt + 3 * n, MPI_UINT16_T, comm_, b.req()),
                       b.ctx());
    const int tag = kStagedTagBase + static_cast<int>(staged_seq_++ % kStagedTags);
    MpiOpState& st = b.st();
    st.next_stage = [&st, hr, parts, acc, cnt, n, r, mine, dtype, tag, comm = comm_]() -> int {
      auto* out = static_cast<uint16_t*>(hr);
      sum_half_blocks(parts, n, mine, acc, out + cnt[n + r], dtype);
      for (size_t j = 0; j < n; ++j) {
        if (j == r) continue;
        const int peer = static_cast<int>(j);
        if (mine > 0) {
          st.reqs.push_back(MPI_REQUEST_NULL);
          const int rc = MPI_Isend(out + cnt[n + r], static_cast<int>(mine), MPI_UINT16_T, peer,
                                   tag, comm, &st.reqs.back());
          if (rc != MPI_SUCCESS) return rc;
        }
        if (cnt[j] > 0) {
          st.reqs.push_back(MPI_REQUEST_NULL);
          const int rc =
              MPI_Irecv(out + cnt[n + j], cnt[j], MPI_UINT16_T, peer, tag, comm, &st.reqs.back());
          if (rc != MPI_SUCCESS) return rc;
        }
      }
      return MPI_SUCCESS;
    };
    registry_->staged.fetch_add(1, std::memory_order_relaxed);
    return b.done();
  }
  const bool widen_fp32 = is_half(dtype) && !half_on_wire(op, size_);
  const MPI_Op mop = is_half(dtype) && !widen_fp32 ? half_op(dtype, op) : mpi_op(op);
  const size_t elt = dtype_size(dtype), bytes = count * elt;
  const bool in_place = send == recv;
  void* hr = in_place ? b.inout(recv, bytes) : b.out(recv, bytes);
  const void* hs = in_place ? hr : b.in(send, bytes);
  void* target = hr;
  MPI_Datatype type = mpi_type(dtype);
  size_t tsize = elt;
  bool mpi_in_place = in_place;
  if (widen_fp32) {
    // Accumulate in fp32 and round once: pairwise bf16 rounding loses ~log2(n) bits.
    float* acc = b.scratch_floats(count);
    b.host_ready();
    widen(hs, acc, count, dtype);
    b.st().post.push_back([acc, hr, count, dtype] { narrow(acc, hr, count, dtype); });
    target = acc;
    type = MPI_FLOAT;
    tsize = sizeof(float);
    mpi_in_place = true;
  }
  for (size_t off = 0; off < count; off += max_count_) {
    const int len = static_cast<int>(std::min(max_count_, count - off));
    const void* sb = mpi_in_place ? MPI_IN_PLACE : cptr(hs, off * tsize);
    DISTATTN_MPI_CHECK(
        MPI_Iallreduce(sb, mptr(target, off * tsize), len, type, mop, comm_, b.req()), b.ctx());
  }
  return b.done();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_all_gather(const void* send, void* recv,
                                                             size_t send_count, DType dtype,
                                                             Stream s) {
  MpiOpBuilder b(*this, "all_gather", s);
  if (send_count == 0) return b.done();
  const size_t block = send_count * dtype_size(dtype);
  const size_t total = block * static_cast<size_t>(size_);
  const bool in_place = send == cptr(recv, block * static_cast<size_t>(rank_));
  void* hr = in_place ? b.inout(recv, total) : b.out(recv, total);
  const auto c = b.express(send_count, dtype);
  if (size_ == 2 && block >= kAllGatherExchangeBytes) {
    // Two ranks, large blocks: one exchange, the algorithm of Open MPI's own two-process
    // MPI_Allgather, with this rank's block copied into place while the peer's arrives.
    // MPI_Iallgather (libnbc's linear schedule) measured 0.90-1.15x of MPI_Allgather at
    // 16 MiB from one run to the next. Small blocks keep MPI_Iallgather.
    const int peer = 1 - rank_;
    void* own_slot = mptr(hr, block * static_cast<size_t>(rank_));
    const void* own = in_place ? own_slot : b.in(send, block);
    DISTATTN_MPI_CHECK(MPI_Irecv(mptr(hr, block * static_cast<size_t>(peer)), c.n, c.type, peer,
                                 kAllGatherTag, comm_, b.req()),
                       b.ctx(), " (recv from ", peer, ")");
    b.st().recv_checks.push_back({b.st().reqs.size() - 1, static_cast<MPI_Count>(block), peer});
    DISTATTN_MPI_CHECK(MPI_Isend(own, c.n, c.type, peer, kAllGatherTag, comm_, b.req()), b.ctx(),
                       " (send to ", peer, ")");
    if (!in_place) copy_bytes(own_slot, own, block);
    return b.done();
  }
  const void* hs = in_place ? MPI_IN_PLACE : b.in(send, block);
  DISTATTN_MPI_CHECK(MPI_Iallgather(hs, c.n, c.type, hr, c.n, c.type, comm_, b.req()), b.ctx());
  return b.done();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_reduce_scatter(const void* send, void* recv,
                                                                 size_t recv_count, DType dtype,
                                                                 ReduceOp op, Stream s) {
  MpiOpBuilder b(*this, "reduce_scatter", s);
  if (recv_count == 0) return b.done();
  const bool staged = half_sum_staged(dtype, op, size_, recv_count, max_count_);
  const bool widen_fp32 = !staged && is_half(dtype) && !half_on_wire(op, size_);
  const MPI_Op mop = is_half(dtype) && !widen_fp32 ? half_op(dtype, op) : mpi_op(op);
  const size_t n = static_cast<size_t>(size_);
  const size_t elt = dtype_size(dtype), block = recv_count * elt, total = block * n;
  const void* hs = b.in(send, total);
  void* hr = b.out(recv, block);
  if (staged) {
    // Block r of every rank's input comes here (16-bit); summed in fp32 once all arrived.
    auto* parts = static_cast<uint16_t*>(b.scratch(total));
    float* acc = b.scratch_floats(recv_count);
    DISTATTN_MPI_CHECK(MPI_Ialltoall(hs, static_cast<int>(recv_count), MPI_UINT16_T, parts,
                                     static_cast<int>(recv_count), MPI_UINT16_T, comm_, b.req()),
                       b.ctx());
    b.st().post.push_back([parts, acc, hr, n, recv_count, dtype] {
      sum_half_blocks(parts, n, recv_count, acc, hr, dtype);
    });
    return b.done();
  }
  const void* src = hs;
  void* dst = hr;
  MPI_Datatype type = mpi_type(dtype);
  size_t tsize = elt;
  if (widen_fp32) {
    float* acc = b.scratch_floats(recv_count * n);
    b.host_ready();
    widen(hs, acc, recv_count * n, dtype);
    float* racc = b.scratch_floats(recv_count);
    b.st().post.push_back([racc, hr, recv_count, dtype] { narrow(racc, hr, recv_count, dtype); });
    src = acc;
    dst = racc;
    type = MPI_FLOAT;
    tsize = sizeof(float);
  } else if (overlaps(hs, total, hr, block)) {
    // In place (recv == send + rank*recv_count): MPI forbids aliased buffers, and its own
    // MPI_IN_PLACE form would overwrite block 0 of send; go through scratch instead.
    void* tmp = b.scratch(block);
    b.st().post.push_back([tmp, hr, block] { std::memcpy(hr, tmp, block); });
    dst = tmp;
  }
  if (recv_count <= max_count_) {
    DISTATTN_MPI_CHECK(MPI_Ireduce_scatter_block(src, dst, static_cast<int>(recv_count), type, mop,
                                                 comm_, b.req()),
                       b.ctx());
  } else {
    // Too long for one call: reduce each chunk of each block to its owner.
    for (int r = 0; r < size_; ++r) {
      for (size_t off = 0; off < recv_count; off += max_count_) {
        const int len = static_cast<int>(std::min(max_count_, recv_count - off));
        const size_t soff = (static_cast<size_t>(r) * recv_count + off) * tsize;
        void* rb = r == rank_ ? mptr(dst, off * tsize) : nullptr;
        DISTATTN_MPI_CHECK(MPI_Ireduce(cptr(src, soff), rb, len, type, mop, r, comm_, b.req()),
                           b.ctx());
      }
    }
  }
  return b.done();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_all_to_all(const void* send, void* recv,
                                                             size_t count, DType dtype, Stream s) {
  MpiOpBuilder b(*this, "all_to_all", s);
  if (count == 0) return b.done();
  const size_t total = count * dtype_size(dtype) * static_cast<size_t>(size_);
  const bool in_place = send == recv;
  void* hr = in_place ? b.inout(recv, total) : b.out(recv, total);
  const void* hs = nullptr;
  if (in_place) {
    // Nonblocking in-place alltoall is not supported by every MPI: send from a copy.
    void* tmp = b.scratch(total);
    b.host_ready();
    std::memcpy(tmp, hr, total);
    hs = tmp;
  } else {
    hs = b.in(send, total);
  }
  const auto c = b.express(count, dtype);
  DISTATTN_MPI_CHECK(MPI_Ialltoall(hs, c.n, c.type, hr, c.n, c.type, comm_, b.req()), b.ctx());
  return b.done();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_all_to_all_v(
    const void* send, std::span<const size_t> send_counts, std::span<const size_t> send_displs,
    void* recv, std::span<const size_t> recv_counts, std::span<const size_t> recv_displs,
    DType dtype, Stream s) {
  MpiOpBuilder b(*this, "all_to_all_v", s);
  const size_t elt = dtype_size(dtype);
  const size_t n = static_cast<size_t>(size_);
  size_t send_extent = 0, recv_extent = 0;
  bool fits = true;
  for (size_t j = 0; j < n; ++j) {
    if (send_counts[j] > 0) send_extent = std::max(send_extent, send_displs[j] + send_counts[j]);
    if (recv_counts[j] > 0) recv_extent = std::max(recv_extent, recv_displs[j] + recv_counts[j]);
    fits = fits && send_counts[j] <= max_count_ && recv_counts[j] <= max_count_ &&
           send_displs[j] <= max_count_ && recv_displs[j] <= max_count_;
  }
  const void* hs = b.in(send, send_extent * elt);
  void* hr = b.out(recv, recv_extent * elt);
  if (fits) {
    std::vector<int> sc(n), sd(n), rc(n), rd(n);
    for (size_t j = 0; j < n; ++j) {
      sc[j] = static_cast<int>(send_counts[j]);
      sd[j] = static_cast<int>(send_displs[j]);
      rc[j] = static_cast<int>(recv_counts[j]);
      rd[j] = static_cast<int>(recv_displs[j]);
    }
    const MPI_Datatype t = mpi_type(dtype);
    // MPI rejects null buffers even when every count is zero.
    static char dummy = 0;
    const void* sb = hs != nullptr ? hs : &dummy;
    void* rb = hr != nullptr ? hr : &dummy;
    DISTATTN_MPI_CHECK(
        MPI_Ialltoallv(sb, sc.data(), sd.data(), t, rb, rc.data(), rd.data(), t, comm_, b.req()),
        b.ctx());
  } else {
    // Counts or displacements beyond one int: point-to-point with derived datatypes, on a
    // tag of its own so that it never matches the user's send/recv.
    for (size_t j = 0; j < n; ++j) {
      if (recv_counts[j] == 0) continue;
      const auto c = b.express(recv_counts[j], dtype);
      DISTATTN_MPI_CHECK(MPI_Irecv(mptr(hr, recv_displs[j] * elt), c.n, c.type, static_cast<int>(j),
                                   kAllToAllVTag, comm_, b.req()),
                         b.ctx());
    }
    for (size_t j = 0; j < n; ++j) {
      if (send_counts[j] == 0) continue;
      const auto c = b.express(send_counts[j], dtype);
      DISTATTN_MPI_CHECK(MPI_Isend(cptr(hs, send_displs[j] * elt), c.n, c.type, static_cast<int>(j),
                                   kAllToAllVTag, comm_, b.req()),
                         b.ctx());
    }
  }
  return b.done();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_broadcast(const void* send, void* recv,
                                                            size_t count, DType dtype, int root,
                                                            Stream s) {
  MpiOpBuilder b(*this, "broadcast", s);
  if (count == 0) return b.done();
  const size_t bytes = count * dtype_size(dtype);
  void* hr = nullptr;
  if (rank_ == root) {
    const void* hs = b.in(send, bytes);
    hr = b.out(recv, bytes);
    const char* s0 = static_cast<const char*>(hs);
    const char* r0 = static_cast<const char*>(hr);
    if (hr != hs && (r0 + bytes <= s0 || s0 + bytes <= r0)) {
      // Broadcast straight from the send buffer and make root's own copy while the peers
      // pull the data: the copy leaves the critical path (~20% of a 16 MB broadcast).
      const auto c = b.express(count, dtype);
      DISTATTN_MPI_CHECK(MPI_Ibcast(const_cast<void*>(hs), c.n, c.type, root, comm_, b.req()),
                         b.ctx());
      copy_bytes(hr, hs, bytes);
      return b.done();
    }
    b.host_ready();
    if (hr != hs) std::memmove(hr, hs, bytes);
  } else {
    hr = b.out(recv, bytes);
  }
  const auto c = b.express(count, dtype);
  DISTATTN_MPI_CHECK(MPI_Ibcast(hr, c.n, c.type, root, comm_, b.req()), b.ctx());
  return b.done();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_group(std::span<const P2POp> ops, Stream s) {
  MpiOpBuilder b(*this, "send_recv", s);
  // Every buffer is staged before the first post, so the host waits for the op's stream
  // once (at the first req()) and not once per device buffer.
  std::vector<void*> host(ops.size(), nullptr);
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& p = ops[i];
    if (p.count == 0) continue;
    const size_t bytes = p.count * dtype_size(p.dtype);
    host[i] = p.kind == P2POp::Kind::kRecv ? b.out(p.buffer, bytes)
                                           : const_cast<void*>(b.in(p.buffer, bytes));
  }
  // Receives first so that eager sends land in posted buffers; the order among the
  // messages to one peer is kept, which is what matches them (same tag).
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& p = ops[i];
    if (p.kind != P2POp::Kind::kRecv || p.count == 0) continue;
    const auto c = b.express(p.count, p.dtype);
    DISTATTN_MPI_CHECK(MPI_Irecv(host[i], c.n, c.type, p.peer, kP2PTag, comm_, b.req()), b.ctx(),
                       " (recv from ", p.peer, ")");
    b.st().recv_checks.push_back(
        {b.st().reqs.size() - 1, static_cast<MPI_Count>(p.count * dtype_size(p.dtype)), p.peer});
  }
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& p = ops[i];
    if (p.kind != P2POp::Kind::kSend || p.count == 0) continue;
    const auto c = b.express(p.count, p.dtype);
    DISTATTN_MPI_CHECK(MPI_Isend(host[i], c.n, c.type, p.peer, kP2PTag, comm_, b.req()), b.ctx(),
                       " (send to ", p.peer, ")");
  }
  return b.done();
}

std::unique_ptr<PendingOp> MpiCommunicator::start_barrier() {
  MpiOpBuilder b(*this, "barrier", nullptr);
  DISTATTN_MPI_CHECK(MPI_Ibarrier(comm_, b.req()), b.ctx());
  return b.done();
}

std::unique_ptr<Communicator> MpiCommunicator::do_split(int color, int key) {
  // MPI_Comm_split blocks and has no nonblocking form: make sure every rank has arrived
  // (under the watchdog) before entering it, so a missing rank becomes a timeout.
  MPI_Request req = MPI_REQUEST_NULL;
  DISTATTN_MPI_CHECK(MPI_Ibarrier(comm_, &req), "split on rank ", rank_);
  wait_setup(&req, "split");
  MPI_Comm child = MPI_COMM_NULL;
  DISTATTN_MPI_CHECK(MPI_Comm_split(comm_, color == kNoColor ? MPI_UNDEFINED : color, key, &child),
                     "split(color=", color, ", key=", key, ") on rank ", rank_);
  if (child == MPI_COMM_NULL) return nullptr;
  return std::make_unique<MpiCommunicator>(child, max_count_);
}

}  // namespace distattn::comm
