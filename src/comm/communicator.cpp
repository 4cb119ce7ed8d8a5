// Communicator base class: argument validation, ledger accounting, NVTX ranges and the
// watchdog shared by every backend.
#include "distattn/comm/communicator.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <limits>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "distattn/config.h"
#include "distattn/core/tensor_view.h"
#include "distattn/runtime.h"
#include "src/comm/fault.h"
#include "src/comm/keep_alive.h"
#if DISTATTN_WITH_NVTX
#include <nvtx3/nvToolsExt.h>
#endif

namespace distattn::comm {

// ---- names ---------------------------------------------------------------------------------

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "unknown";
}

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::kAuto:
      return "auto";
    case Backend::kMpi:
      return "mpi";
    case Backend::kNccl:
      return "nccl";
  }
  return "unknown";
}

Backend parse_backend(std::string_view name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "mpi" || name == "MPI") return Backend::kMpi;
  if (name == "nccl" || name == "NCCL") return Backend::kNccl;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown communicator backend '", name,
                 "' (supported: auto, mpi, nccl)");
}

const char* op_kind_name(OpKind k) {
  switch (k) {
    case OpKind::kAllReduce:
      return "all_reduce";
    case OpKind::kAllGather:
      return "all_gather";
    case OpKind::kReduceScatter:
      return "reduce_scatter";
    case OpKind::kAllToAll:
      return "all_to_all";
    case OpKind::kAllToAllV:
      return "all_to_all_v";
    case OpKind::kBroadcast:
      return "broadcast";
    case OpKind::kSendRecv:
      return "send_recv";
    case OpKind::kBarrier:
      return "barrier";
    case OpKind::kCount:
      break;
  }
  return "unknown";
}

// ---- ledger --------------------------------------------------------------------------------

LedgerEntry Ledger::total() const {
  LedgerEntry t;
  for (const auto& e : entries_) {
    t.calls += e.calls;
    t.bytes_sent += e.bytes_sent;
    t.bytes_recv += e.bytes_recv;
    t.seconds += e.seconds;
  }
  return t;
}

std::string Ledger::summary() const {
  std::ostringstream os;
  for (int k = 0; k < static_cast<int>(OpKind::kCount); ++k) {
    const LedgerEntry& e = entries_[static_cast<size_t>(k)];
    if (e.calls == 0) continue;
    os << op_kind_name(static_cast<OpKind>(k)) << " calls=" << e.calls << " sent=" << e.bytes_sent
       << " recv=" << e.bytes_recv << " time_ms=" << std::fixed << std::setprecision(3)
       << e.seconds * 1e3 << '\n';
  }
  return os.str();
}

// ---- helpers -------------------------------------------------------------------------------

namespace {

std::string human_bytes(uint64_t b) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  std::ostringstream os;
  if (u == 0 || v == std::floor(v))
    os << static_cast<uint64_t>(v) << ' ' << units[u];
  else
    os << std::fixed << std::setprecision(1) << v << ' ' << units[u];
  return os.str();
}

// count*elt, or false when it does not fit in size_t.
bool checked_bytes(size_t count, size_t elt, size_t* out) {
  if (elt != 0 && count > std::numeric_limits<size_t>::max() / elt) return false;
  *out = count * elt;
  return true;
}

std::string describe(const char* op, size_t bytes, DType dtype) {
  return std::string(op) + " (" + human_bytes(bytes) + " " + dtype_name(dtype) + ")";
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

std::string all_peers(int n) {
  return "all " + std::to_string(n) + " ranks of the communicator";
}

#if DISTATTN_WITH_NVTX
nvtxDomainHandle_t nvtx_domain() {
  static nvtxDomainHandle_t d = nvtxDomainCreateA("distattn");
  return d;
}
#endif

// NVTX push/pop range in the "distattn" domain; no-op without NVTX.
class ScopedRange {
 public:
  explicit ScopedRange(const char* name) {
#if DISTATTN_WITH_NVTX
    nvtxEventAttributes_t a{};
    a.version = NVTX_VERSION;
    a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    a.messageType = NVTX_MESSAGE_TYPE_ASCII;
    a.message.ascii = name;
    nvtxDomainRangePushEx(nvtx_domain(), &a);
#else
    (void)name;
#endif
  }
  ~ScopedRange() {
#if DISTATTN_WITH_NVTX
    nvtxDomainRangePop(nvtx_domain());
#endif
  }
  ScopedRange(const ScopedRange&) = delete;
  ScopedRange& operator=(const ScopedRange&) = delete;
};

// Opens an NVTX start/end range in the "distattn" domain (it may end on another call than
// the one that started it: nonblocking ops end in Handle::wait/test). 0 without NVTX.
uint64_t start_range(const char* name) {
#if DISTATTN_WITH_NVTX
  nvtxEventAttributes_t a{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = name;
  return nvtxDomainRangeStartEx(nvtx_domain(), &a);
#else
  (void)name;
  return 0;
#endif
}

void end_range_id(uint64_t id) noexcept {
#if DISTATTN_WITH_NVTX
  if (id != 0) nvtxDomainRangeEnd(nvtx_domain(), id);
#else
  (void)id;
#endif
}

}  // namespace

std::chrono::milliseconds default_timeout() {
  return watchdog_timeout_from_env();
}

namespace detail {
void keep_forever(std::shared_ptr<void> state) noexcept {
  static auto* kept = new std::vector<std::shared_ptr<void>>;  // never destroyed
  static std::mutex mu;
  try {
    std::lock_guard<std::mutex> lock(mu);
    kept->push_back(std::move(state));
  } catch (...) {
    new std::shared_ptr<void>(std::move(state));  // out of memory: leak it unrecorded
  }
}
}  // namespace detail

// ---- Handle --------------------------------------------------------------------------------

Handle::Handle(Communicator* comm, std::unique_ptr<PendingOp> op, std::string what,
               std::string peers, OpKind kind, std::chrono::steady_clock::time_point start,
               uint64_t nvtx_range)
    : comm_(comm),
      op_(std::move(op)),
      what_(std::move(what)),
      peers_(std::move(peers)),
      kind_(kind),
      start_(start),
      nvtx_range_(nvtx_range) {}

Handle::Handle(Handle&& o) noexcept
    : comm_(o.comm_),
      op_(std::move(o.op_)),
      what_(std::move(o.what_)),
      peers_(std::move(o.peers_)),
      kind_(o.kind_),
      start_(o.start_),
      nvtx_range_(o.nvtx_range_) {
  o.comm_ = nullptr;
  o.nvtx_range_ = 0;
}

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    if (op_) {
      try {
        wait();
      } catch (...) {
      }
    }
    comm_ = o.comm_;
    op_ = std::move(o.op_);
    what_ = std::move(o.what_);
    peers_ = std::move(o.peers_);
    kind_ = o.kind_;
    start_ = o.start_;
    end_range();
    nvtx_range_ = o.nvtx_range_;
    o.comm_ = nullptr;
    o.nvtx_range_ = 0;
  }
  return *this;
}

Handle::~Handle() {
  if (op_) {
    try {
      wait();
    } catch (...) {
      // Destructors never throw; the communicator is aborted when the wait failed.
    }
  }
  end_range();
}

void Handle::end_range() noexcept {
  end_range_id(nvtx_range_);
  nvtx_range_ = 0;
}

void Handle::complete(const Stream* on) {
  end_range();
  std::unique_ptr<PendingOp> op = std::move(op_);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  comm_->ledger_[kind_].seconds += secs;
  if (on != nullptr)
    op->finish_on(*on);
  else
    op->finish();
}

bool Handle::test() {
  return poll(nullptr);
}

bool Handle::poll(const Stream* on) {
  if (!op_) return true;
  if (comm_->aborted()) {
    // The backend may still own the buffers of this op: keep its state alive forever.
    detail::keep_forever(std::move(op_));
    end_range();
    DISTATTN_THROW(Status::kRemoteError, what_, " on rank ", comm_->rank(),
                   " cannot complete: the communicator was aborted (an earlier op timed out or "
                   "failed); create a new communicator");
  }
  bool done = false;
  try {
    done = op_->test();
  } catch (...) {
    comm_->abort();
    detail::keep_forever(std::move(op_));
    end_range();
    throw;
  }
  if (done) complete(on);
  return done;
}

void Handle::wait() {
  wait_until_complete(nullptr);
}

void Handle::wait_on(Stream stream) {
  if (!op_) return;
  // On an aborted communicator, wait_until_complete() throws kRemoteError as test() does.
  if (!comm_->aborted()) {
    bool enqueued = false;
    try {
      enqueued = op_->enqueue_wait(stream);
    } catch (...) {
      // As a failed test(): the backend may still own the buffers of this op.
      comm_->abort();
      detail::keep_forever(std::move(op_));
      end_range();
      throw;
    }
    // Device-side wait: the op stays pending on the host (wait()/test()/~Handle complete it).
    if (enqueued) return;
  }
  wait_until_complete(&stream);
}

namespace {
// True when this process's ranks outnumber the cores, or Open MPI was asked to yield when
// idle (mpirun --mca mpi_yield_when_idle 1; launch/mpirun.sh and the tests pass it then).
bool polite_waits() {
  static const bool polite = [] {
    const char* y = std::getenv("OMPI_MCA_mpi_yield_when_idle");
    if (y != nullptr && (std::strcmp(y, "1") == 0 || std::strcmp(y, "true") == 0)) return true;
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    const unsigned cores = std::thread::hardware_concurrency();
    return local != nullptr && cores > 0 && std::atoi(local) > static_cast<int>(cores);
  }();
  return polite;
}
}  // namespace

void Handle::wait_until_complete(const Stream* on) {
  if (!op_) return;
  const auto timeout = comm_->timeout();
  // Measured from here, not from the post: an op posted before a long compute phase may
  // only progress (MPI) once someone polls it.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // Poll without sleeping for the first kSpin, as MPI_Wait does: Open MPI moves a large
  // shared-memory message only inside MPI calls on both sides, so a waiter asleep between
  // polls stalls its own transfer (a 16 MiB send_recv ran at ~0.6x of raw MPI_Sendrecv with
  // 20-200 us sleeps). When ranks outnumber cores (polite_waits), a long spin would take
  // the core from a peer that computes: the spin lasts kPoliteSpin, each poll yielding the
  // core to any runnable peer as Open MPI's mpi_yield_when_idle does (a 16 MiB send_recv
  // at 4 ranks on 2 cores ran at 0.89-0.97x of raw MPI_Sendrecv with 200 polls and then
  // sleeps). Past the spin, the peer is computing or gone: sleeps (20-200 us) until the
  // deadline.
  constexpr auto kSpin = std::chrono::milliseconds(100);
  constexpr auto kPoliteSpin = std::chrono::milliseconds(5);
  const auto spin_until = std::chrono::steady_clock::now() + (polite_waits() ? kPoliteSpin : kSpin);
  int polls = 0;
  auto sleep = std::chrono::microseconds(20);
  while (!poll(on)) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      comm_->abort();
      detail::keep_forever(std::move(op_));
      end_range();
      std::ostringstream os;
      os << what_ << " on rank " << comm_->rank() << " did not complete within "
         << format_seconds(timeout) << " s; peers: " << peers_
         << " (one of them never joined, failed or is stuck; raise DISTATTN_COMM_TIMEOUT_S if "
            "the op is only slow); the communicator was aborted";
      DISTATTN_THROW(Status::kTimeout, os.str());
    }
    if (now < spin_until) {
      std::this_thread::yield();
    } else if (++polls > 200) {
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(200));
    }
  }
}

void wait_all(std::span<Handle> handles) {
  for (Handle& h : handles) h.wait();
}

// ---- Communicator: validation and launch -----------------------------------------------------

Communicator::Communicator() : timeout_(default_timeout()) {
  fault::validate_fault_spec();
}
Communicator::~Communicator() = default;

void Communicator::check_usable(const char* op) const {
  DISTATTN_CHECK_STATUS(!aborted_, Status::kRemoteError, op, " on rank ", rank(),
                        ": the communicator was aborted (an earlier op timed out or failed); "
                        "create a new communicator");
}

namespace {
bool valid_dtype(DType t) {
  switch (t) {
    case DType::kFloat32:
    case DType::kFloat64:
    case DType::kBFloat16:
    case DType::kFloat16:
    case DType::kInt32:
    case DType::kInt64:
    case DType::kUInt8:
      return true;
  }
  return false;
}

void check_reduce_op(const char* op, ReduceOp r) {
  DISTATTN_CHECK(r == ReduceOp::kSum || r == ReduceOp::kMax || r == ReduceOp::kMin, op,
                 ": reduce op value ", static_cast<int>(r),
                 " is not a valid ReduceOp; use ReduceOp::kSum, kMax or kMin");
}
}  // namespace

void Communicator::check_buffer(const char* op, const char* name, const void* ptr, size_t count,
                                DType dtype) const {
  DISTATTN_CHECK(valid_dtype(dtype), op, ": ", name, " has dtype value ", static_cast<int>(dtype),
                 ", which is not a valid distattn::DType; use fp32, fp64, bf16, fp16, int32, "
                 "int64 or uint8");
  size_t bytes = 0;
  DISTATTN_CHECK(checked_bytes(count, dtype_size(dtype), &bytes), op, ": ", name, " of ", count,
                 " ", dtype_name(dtype),
                 " elements overflows the address space; pass a "
                 "smaller count");
  if (count == 0) return;
  DISTATTN_CHECK(ptr != nullptr, op, ": ", name, " is null but count is ", count,
                 "; pass a buffer of at least ", bytes, " bytes");
  const DeviceType where = pointer_device_type(ptr);
  if (where == DeviceType::kCUDA) {
    DISTATTN_CHECK(accepts_device_memory(), op, ": ", name, " is CUDA device memory but the ",
                   backend_name(backend()),
                   " communicator only accepts host memory here (build with CUDA, or copy to the "
                   "host first)");
  } else {
    DISTATTN_CHECK(accepts_host_memory(), op, ": ", name, " is host memory but the ",
                   backend_name(backend()),
                   " communicator only accepts CUDA device memory (copy it to the GPU, or use "
                   "the mpi backend)");
  }
}

Handle Communicator::launch(OpKind kind, std::string what, std::string peers, uint64_t bytes_sent,
                            uint64_t bytes_recv, const StartFn& start,
                            std::span<const P2POp> group_ops) {
  fault::Decision injected;
  std::vector<P2POp> rewritten;
  std::vector<std::shared_ptr<void>> keep;
  if (fault::fault_injection_enabled()) [[unlikely]] {
    injected = fault::on_op(kind, what);
    if (injected.drop || injected.corrupt_by != 0) {
      rewritten = fault::rewrite_group(group_ops, injected, keep);
      group_ops = rewritten;
    }
  }
  // A start/end range owned by the handle: it spans post to completion, not just the post.
  const uint64_t range = start_range(op_kind_name(kind));
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<PendingOp> op;
  try {
    op = start(group_ops);
  } catch (...) {
    end_range_id(range);
    throw;
  }
  if (op == nullptr) {
    end_range_id(range);
    DISTATTN_THROW(Status::kInternal, "backend returned no operation for ", what);
  }
  if (!keep.empty()) op = fault::owning_op(std::move(op), std::move(keep));
  if (injected.fail)
    op = fault::failing_op(std::move(op), backend(), what, rank(), injected.fail_rule);
  LedgerEntry& e = ledger_[kind];
  e.calls += 1;
  e.bytes_sent += bytes_sent;
  e.bytes_recv += bytes_recv;
  return Handle(this, std::move(op), std::move(what), std::move(peers), kind, t0, range);
}

namespace {
size_t elt_bytes(size_t count, DType dtype) {
  return count * dtype_size(dtype);
}

void check_count_product(const char* op, size_t count, int n, DType dtype) {
  size_t bytes = 0;
  DISTATTN_CHECK(count <= std::numeric_limits<size_t>::max() / static_cast<size_t>(n) &&
                     checked_bytes(count * static_cast<size_t>(n), dtype_size(dtype), &bytes),
                 op, ": ", n, " ranks x ", count,
                 " elements overflows the address space; pass a "
                 "smaller count");
}
}  // namespace

Handle Communicator::iall_reduce(const void* send, void* recv, size_t count, DType dtype,
                                 ReduceOp op, Stream stream) {
  constexpr const char* kOp = "all_reduce";
  check_usable(kOp);
  check_reduce_op(kOp, op);
  check_buffer(kOp, "send buffer", send, count, dtype);
  check_buffer(kOp, "recv buffer", recv, count, dtype);
  const int n = size();
  const uint64_t bytes = elt_bytes(count, dtype);
  const uint64_t moved = n > 1 ? 2 * static_cast<uint64_t>(n - 1) * bytes / n : 0;
  return launch(OpKind::kAllReduce, describe(kOp, bytes, dtype), all_peers(n), moved, moved,
                [&](std::span<const P2POp>) {
                  return start_all_reduce(send, recv, count, dtype, op, stream);
                });
}

Handle Communicator::iall_gather(const void* send, void* recv, size_t send_count, DType dtype,
                                 Stream stream) {
  constexpr const char* kOp = "all_gather";
  check_usable(kOp);
  const int n = size();
  check_count_product(kOp, send_count, n, dtype);
  check_buffer(kOp, "send buffer", send, send_count, dtype);
  check_buffer(kOp, "recv buffer", recv, send_count * n, dtype);
  const uint64_t moved = elt_bytes(send_count, dtype) * static_cast<uint64_t>(n - 1);
  return launch(OpKind::kAllGather, describe(kOp, elt_bytes(send_count, dtype), dtype),
                all_peers(n), moved, moved, [&](std::span<const P2POp>) {
                  return start_all_gather(send, recv, send_count, dtype, stream);
                });
}

Handle Communicator::ireduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                     ReduceOp op, Stream stream) {
  constexpr const char* kOp = "reduce_scatter";
  check_usable(kOp);
  check_reduce_op(kOp, op);
  const int n = size();
  check_count_product(kOp, recv_count, n, dtype);
  check_buffer(kOp, "send buffer", send, recv_count * n, dtype);
  check_buffer(kOp, "recv buffer", recv, recv_count, dtype);
  const uint64_t moved = elt_bytes(recv_count, dtype) * static_cast<uint64_t>(n - 1);
  return launch(OpKind::kReduceScatter, describe(kOp, elt_bytes(recv_count, dtype), dtype),
                all_peers(n), moved, moved, [&](std::span<const P2POp>) {
                  return start_reduce_scatter(send, recv, recv_count, dtype, op, stream);
                });
}

Handle Communicator::iall_to_all(const void* send, void* recv, size_t count, DType dtype,
                                 Stream stream) {
  constexpr const char* kOp = "all_to_all";
  check_usable(kOp);
  const int n = size();
  check_count_product(kOp, count, n, dtype);
  check_buffer(kOp, "send buffer", send, count * n, dtype);
  check_buffer(kOp, "recv buffer", recv, count * n, dtype);
  const uint64_t moved = elt_bytes(count, dtype) * static_cast<uint64_t>(n - 1);
  return launch(OpKind::kAllToAll, describe(kOp, elt_bytes(count, dtype) * n, dtype), all_peers(n),
                moved, moved, [&](std::span<const P2POp>) {
                  return start_all_to_all(send, recv, count, dtype, stream);
                });
}

Handle Communicator::iall_to_all_v(const void* send, std::span<const size_t> send_counts,
                                   std::span<const size_t> send_displs, void* recv,
                                   std::span<const size_t> recv_counts,
                                   std::span<const size_t> recv_displs, DType dtype,
                                   Stream stream) {
  constexpr const char* kOp = "all_to_all_v";
  check_usable(kOp);
  const int n = size();
  const size_t un = static_cast<size_t>(n);
  DISTATTN_CHECK(send_counts.size() == un && send_displs.size() == un && recv_counts.size() == un &&
                     recv_displs.size() == un,
                 kOp, ": counts and displacements need one entry per rank (", n,
                 "), got send_counts=", send_counts.size(), " send_displs=", send_displs.size(),
                 " recv_counts=", recv_counts.size(), " recv_displs=", recv_displs.size());
  size_t send_extent = 0, recv_extent = 0;
  uint64_t sent = 0, recvd = 0;
  const int me = rank();
  for (size_t j = 0; j < un; ++j) {
    DISTATTN_CHECK(send_displs[j] <= std::numeric_limits<size_t>::max() - send_counts[j] &&
                       recv_displs[j] <= std::numeric_limits<size_t>::max() - recv_counts[j],
                   kOp, ": displacement + count overflows for peer ", j);
    if (send_counts[j] > 0) send_extent = std::max(send_extent, send_displs[j] + send_counts[j]);
    if (recv_counts[j] > 0) recv_extent = std::max(recv_extent, recv_displs[j] + recv_counts[j]);
    if (static_cast<int>(j) != me) {
      sent += elt_bytes(send_counts[j], dtype);
      recvd += elt_bytes(recv_counts[j], dtype);
    }
  }
  check_buffer(kOp, "send buffer", send, send_extent, dtype);
  check_buffer(kOp, "recv buffer", recv, recv_extent, dtype);
  DISTATTN_CHECK(send == nullptr || send != recv || send_extent == 0 || recv_extent == 0, kOp,
                 ": in-place all_to_all_v is not supported; pass distinct send and recv buffers");
  {
    // Two peers writing the same receive elements would race (the result depends on
    // arrival order): every peer needs a disjoint part of recv.
    std::vector<size_t> order;
    for (size_t j = 0; j < un; ++j)
      if (recv_counts[j] > 0) order.push_back(j);
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return recv_displs[a] < recv_displs[b]; });
    for (size_t i = 1; i < order.size(); ++i) {
      const size_t a = order[i - 1], b = order[i];
      DISTATTN_CHECK(recv_displs[a] + recv_counts[a] <= recv_displs[b], kOp,
                     ": receive regions overlap: peer ", a, " writes elements [", recv_displs[a],
                     ", ", recv_displs[a] + recv_counts[a], ") and peer ", b, " writes [",
                     recv_displs[b], ", ", recv_displs[b] + recv_counts[b],
                     "); give each peer a disjoint range of recv (recv_displs[j] >= "
                     "recv_displs[j-1] + recv_counts[j-1])");
    }
  }
  return launch(OpKind::kAllToAllV, describe(kOp, sent + recvd, dtype), all_peers(n), sent, recvd,
                [&](std::span<const P2POp>) {
                  return start_all_to_all_v(send, send_counts, send_displs, recv, recv_counts,
                                            recv_displs, dtype, stream);
                });
}

Handle Communicator::ibroadcast(const void* send, void* recv, size_t count, DType dtype, int root,
                                Stream stream) {
  constexpr const char* kOp = "broadcast";
  check_usable(kOp);
  const int n = size();
  DISTATTN_CHECK(root >= 0 && root < n, kOp, ": root ", root,
                 " is out of range for a "
                 "communicator of ",
                 n, " ranks (use 0..", n - 1, ")");
  if (rank() == root) check_buffer(kOp, "send buffer", send, count, dtype);
  check_buffer(kOp, "recv buffer", recv, count, dtype);
  const uint64_t bytes = elt_bytes(count, dtype);
  const bool is_root = rank() == root;
  const uint64_t sent = is_root ? bytes * static_cast<uint64_t>(n - 1) : 0;
  const uint64_t recvd = is_root ? 0 : bytes;
  return launch(OpKind::kBroadcast, describe(kOp, bytes, dtype),
                "root " + std::to_string(root) + " and " + all_peers(n), sent, recvd,
                [&](std::span<const P2POp>) {
                  return start_broadcast(send, recv, count, dtype, root, stream);
                });
}

Handle Communicator::igroup(std::span<const P2POp> ops, Stream stream) {
  constexpr const char* kOp = "send_recv";
  check_usable(kOp);
  const int n = size();
  uint64_t sent = 0, recvd = 0;
  std::vector<int> peers;
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& p = ops[i];
    const bool is_send = p.kind == P2POp::Kind::kSend;
    DISTATTN_CHECK(p.peer >= 0 && p.peer < n, kOp, ": op ", i, " (", is_send ? "send" : "recv",
                   ") names peer ", p.peer, " but the communicator has ", n, " ranks (use 0..",
                   n - 1, ")");
    check_buffer(kOp, is_send ? "send buffer" : "recv buffer", p.buffer, p.count, p.dtype);
    (is_send ? sent : recvd) += elt_bytes(p.count, p.dtype);
    if (std::find(peers.begin(), peers.end(), p.peer) == peers.end()) peers.push_back(p.peer);
  }
  std::ostringstream ps;
  ps << (peers.size() == 1 ? "peer " : "peers ");
  for (size_t i = 0; i < peers.size(); ++i) ps << (i ? "," : "") << peers[i];
  if (peers.empty()) ps << "none";
  std::ostringstream what;
  what << kOp << " (" << ops.size() << " ops, sent " << human_bytes(sent) << ", recv "
       << human_bytes(recvd) << ")";
  return launch(
      OpKind::kSendRecv, what.str(), ps.str(), sent, recvd,
      [&](std::span<const P2POp> group_ops) { return start_group(group_ops, stream); }, ops);
}

Handle Communicator::ibarrier() {
  check_usable("barrier");
  return launch(OpKind::kBarrier, "barrier", all_peers(size()), 0, 0,
                [&](std::span<const P2POp>) { return start_barrier(); });
}

// ---- blocking forms ----------------------------------------------------------------------------

void Communicator::all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                              Stream stream) {
  iall_reduce(send, recv, count, dtype, op, stream).wait();
}
void Communicator::all_gather(const void* send, void* recv, size_t send_count, DType dtype,
                              Stream stream) {
  iall_gather(send, recv, send_count, dtype, stream).wait();
}
void Communicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                  ReduceOp op, Stream stream) {
  ireduce_scatter(send, recv, recv_count, dtype, op, stream).wait();
}
void Communicator::all_to_all(const void* send, void* recv, size_t count, DType dtype,
                              Stream stream) {
  iall_to_all(send, recv, count, dtype, stream).wait();
}
void Communicator::all_to_all_v(const void* send, std::span<const size_t> send_counts,
                                std::span<const size_t> send_displs, void* recv,
                                std::span<const size_t> recv_counts,
                                std::span<const size_t> recv_displs, DType dtype, Stream stream) {
  iall_to_all_v(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype, stream)
      .wait();
}
void Communicator::broadcast(const void* send, void* recv, size_t count, DType dtype, int root,
                             Stream stream) {
  ibroadcast(send, recv, count, dtype, root, stream).wait();
}
void Communicator::group(std::span<const P2POp> ops, Stream stream) {
  igroup(ops, stream).wait();
}
void Communicator::send(const void* buf, size_t count, DType dtype, int peer, Stream stream) {
  const P2POp op = P2POp::send(buf, count, dtype, peer);
  igroup(std::span<const P2POp>(&op, 1), stream).wait();
}
void Communicator::recv(void* buf, size_t count, DType dtype, int peer, Stream stream) {
  const P2POp op = P2POp::recv(buf, count, dtype, peer);
  igroup(std::span<const P2POp>(&op, 1), stream).wait();
}
void Communicator::barrier() {
  ibarrier().wait();
}

// ---- TensorView forms
// ----------------------------------------------------------------------------

size_t Communicator::check_tensor(const char* op, const char* name, const TensorView& t) const {
  DISTATTN_CHECK(t.is_contiguous(), op, ": ", name, " tensor ", t.str(),
                 " is not contiguous; pass a packed row-major tensor (copy it first)");
  if (t.device.is_cuda()) {
    DISTATTN_CHECK(accepts_device_memory(), op, ": ", name, " tensor is on ", t.device.str(),
                   " but the ", backend_name(backend()),
                   " communicator only accepts host memory here (build with CUDA, or copy it "
                   "to the host first)");
  } else {
    DISTATTN_CHECK(accepts_host_memory(), op, ": ", name, " tensor is on ", t.device.str(),
                   " but the ", backend_name(backend()),
                   " communicator only accepts CUDA device memory (copy it to the GPU, or use "
                   "the mpi backend)");
  }
  return static_cast<size_t>(t.numel());
}

namespace {
void check_same_dtype(const char* op, const TensorView& send, const TensorView& recv) {
  DISTATTN_CHECK(send.dtype == recv.dtype, op, ": mismatched dtype: send tensor is ",
                 dtype_name(send.dtype), " but recv tensor is ", dtype_name(recv.dtype),
                 "; both must have the same dtype (convert one first)");
}
}  // namespace

void Communicator::all_reduce(const TensorView& send, const TensorView& recv, ReduceOp op,
                              Stream stream) {
  constexpr const char* kOp = "all_reduce";
  check_same_dtype(kOp, send, recv);
  const size_t ns = check_tensor(kOp, "send", send), nr = check_tensor(kOp, "recv", recv);
  DISTATTN_CHECK(ns == nr, kOp, ": send tensor has ", ns, " elements but recv tensor has ", nr,
                 "; they must be equal");
  all_reduce(send.data, recv.data, ns, send.dtype, op, stream);
}

void Communicator::all_gather(const TensorView& send, const TensorView& recv, Stream stream) {
  constexpr const char* kOp = "all_gather";
  check_same_dtype(kOp, send, recv);
  const size_t ns = check_tensor(kOp, "send", send), nr = check_tensor(kOp, "recv", recv);
  const size_t n = static_cast<size_t>(size());
  DISTATTN_CHECK(ns <= std::numeric_limits<size_t>::max() / n && nr == ns * n, kOp,
                 ": recv tensor has ", nr, " elements but must hold size() x send = ", n, " x ", ns,
                 " elements");
  all_gather(send.data, recv.data, ns, send.dtype, stream);
}

void Communicator::reduce_scatter(const TensorView& send, const TensorView& recv, ReduceOp op,
                                  Stream stream) {
  constexpr const char* kOp = "reduce_scatter";
  check_same_dtype(kOp, send, recv);
  const size_t ns = check_tensor(kOp, "send", send), nr = check_tensor(kOp, "recv", recv);
  const size_t n = static_cast<size_t>(size());
  DISTATTN_CHECK(nr <= std::numeric_limits<size_t>::max() / n && ns == nr * n, kOp,
                 ": send tensor has ", ns, " elements but must hold size() x recv = ", n, " x ", nr,
                 " elements");
  reduce_scatter(send.data, recv.data, nr, send.dtype, op, stream);
}

void Communicator::all_to_all(const TensorView& send, const TensorView& recv, Stream stream) {
  constexpr const char* kOp = "all_to_all";
  check_same_dtype(kOp, send, recv);
  const size_t ns = check_tensor(kOp, "send", send), nr = check_tensor(kOp, "recv", recv);
  const size_t n = static_cast<size_t>(size());
  DISTATTN_CHECK(ns == nr && ns % n == 0, kOp,
                 ": send and recv tensors must have the same "
                 "element count, a multiple of size() = ",
                 n, "; got send ", ns, ", recv ", nr);
  all_to_all(send.data, recv.data, ns / n, send.dtype, stream);
}

void Communicator::broadcast(const TensorView& send, const TensorView& recv, int root,
                             Stream stream) {
  constexpr const char* kOp = "broadcast";
  check_same_dtype(kOp, send, recv);
  const size_t ns = check_tensor(kOp, "send", send), nr = check_tensor(kOp, "recv", recv);
  DISTATTN_CHECK(ns == nr, kOp, ": send tensor has ", ns, " elements but recv tensor has ", nr,
                 "; they must be equal (non-root ranks may pass recv as send)");
  broadcast(send.data, recv.data, nr, recv.dtype, root, stream);
}

void Communicator::send(const TensorView& buf, int peer, Stream stream) {
  const size_t n = check_tensor("send", "send", buf);
  send(buf.data, n, buf.dtype, peer, stream);
}

void Communicator::recv(const TensorView& buf, int peer, Stream stream) {
  const size_t n = check_tensor("recv", "recv", buf);
  recv(buf.data, n, buf.dtype, peer, stream);
}

// ---- split / abort -----------------------------------------------------------------------------

std::unique_ptr<Communicator> Communicator::split(int color, int key) {
  check_usable("split");
  DISTATTN_CHECK(color >= 0 || color == kNoColor, "split: color ", color,
                 " is invalid; use a non-negative color, or Communicator::kNoColor to join no "
                 "group");
  ScopedRange range("split");
  std::unique_ptr<Communicator> child = do_split(color, key);
  if (child) child->timeout_ = timeout_;
  return child;
}

void Communicator::abort() noexcept {
  if (aborted_) return;
  aborted_ = true;
  do_abort();
}

}  // namespace distattn::comm
