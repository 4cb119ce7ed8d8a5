#pragma once
// distattn::comm::Communicator — NCCL-shaped collectives over MPI (host memory, or CUDA
// memory staged through pinned host buffers) and NCCL (CUDA memory, stream-ordered).
//
// Conventions (as NCCL): counts are in elements of `dtype`; an op is in place when the
// send and receive pointers are equal (for all_gather: send == recv + rank*count; for
// reduce_scatter: recv == send + rank*recv_count). Every op:
//   1. validates its arguments and throws distattn::Error (kInvalidArgument) before the
//      backend is called;
//   2. is counted in the communicator's Ledger (calls, bytes sent/received, time);
//   3. runs inside an NVTX range of domain "distattn" (when built with NVTX);
//   4. never waits forever: a blocking op, or Handle::wait(), that does not complete within
//      the watchdog timeout (DISTATTN_COMM_TIMEOUT_S, default 300 s) aborts the
//      communicator and throws Error(kTimeout) naming the op, the rank and the peer(s).
// Blocking ops are `iop(...)` followed by `wait()`.
// Streams: the NCCL backend enqueues on `stream` (a cudaStream_t; nullptr = legacy default
// stream) and a blocking op returns once the work is enqueued AND complete on the stream;
// the MPI backend ignores streams for host memory; device memory is staged by copies
// enqueued on `stream` (after the data's producers), the host waits for `stream` once
// before MPI is posted, and results are copied back on `stream` (wait()) or on the stream
// given to Handle::wait_on; only a null `stream` puts them on the legacy default stream.
// Those host waits for `stream` are bounded by the watchdog too (Error(kTimeout); staging
// buffers a stuck copy may still touch are never reused). All of an op's device buffers are
// staged before its first MPI post, so MPI never reads a staging buffer before its copy landed.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "distattn/comm/ledger.h"
#include "distattn/core/device.h"
#include "distattn/core/dtype.h"
#include "distattn/core/error.h"

namespace distattn {
struct TensorView;
}  // namespace distattn

namespace distattn::comm {

enum class ReduceOp { kSum, kMax, kMin };
const char* reduce_op_name(ReduceOp op);

enum class Backend { kAuto, kMpi, kNccl };
const char* backend_name(Backend b);
Backend parse_backend(std::string_view name);  // "auto" | "mpi" | "nccl"

// One point-to-point operation of a group. All ops of a group are posted together, so any
// posting order across peers is deadlock-free.
struct P2POp {
  enum class Kind { kSend, kRecv };
  Kind kind = Kind::kSend;
  void* buffer = nullptr;  // const for sends
  size_t count = 0;
  DType dtype = DType::kFloat32;
  int peer = -1;

  static P2POp send(const void* buf, size_t count, DType dtype, int peer) {
    return {Kind::kSend, const_cast<void*>(buf), count, dtype, peer};
  }
  static P2POp recv(void* buf, size_t count, DType dtype, int peer) {
    return {Kind::kRecv, buf, count, dtype, peer};
  }
};

// Backend-side state of one in-flight operation.
class PendingOp {
 public:
  virtual ~PendingOp() = default;
  // Non-blocking completion check; throws on a backend error.
  virtual bool test() = 0;
  // Called once after test() returned true (e.g. copy staged results back, convert bf16).
  virtual void finish() {}
  // Stream-ordered completion (Handle::wait_on). Return true when the backend made `s` wait
  // for this op on the device without the host (the op then stays pending on the host);
  // false to have the host wait and then call finish_on(s).
  virtual bool enqueue_wait(Stream s) { return false; }
  // Like finish(), but results staged for device memory may be copied back asynchronously
  // on `s` (work enqueued on `s` afterwards sees them).
  virtual void finish_on(Stream s) { finish(); }
};

class Communicator;

// Handle of a non-blocking op. Move-only. Destroying an unfinished handle waits for it
// (with the watchdog), swallowing errors: destructors never throw.
class Handle {
 public:
  Handle() = default;
  // `nvtx_range`: id of an NVTX start/end range (domain "distattn") opened when the op was
  // posted; the handle ends it when the op completes, fails, times out or is abandoned, so
  // the range covers the op and not just its launch. 0 = none.
  Handle(Communicator* comm, std::unique_ptr<PendingOp> op, std::string what, std::string peers,
         OpKind kind, std::chrono::steady_clock::time_point start, uint64_t nvtx_range = 0);
  Handle(Handle&&) noexcept;
  Handle& operator=(Handle&&) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle();

  // Blocks until complete or the watchdog fires (then aborts the communicator and throws
  // Error(kTimeout)).
  void wait();
  // True once complete (the result is then usable). Never blocks.
  bool test();
  // Stream-ordered completion: after it returns, work enqueued on `stream` sees the op's
  // results; the host may not yet (synchronize `stream` first).
  //   NCCL: `stream` waits on the op's completion event without blocking the host; the
  //     handle stays valid (pending on the host) until wait()/test()/destruction completes
  //     it with the watchdog, so keep it and wait() it later (e.g. at the end of a call).
  //   MPI: the host waits for the transfer (with the watchdog), then results staged for
  //     device memory are copied back on `stream` asynchronously; the handle is complete.
  //   Host memory: the same as wait().
  // Calling it twice, or wait() after it, is allowed. Ledger time and the NVTX range end
  // when the op completes on the host, as for wait().
  void wait_on(Stream stream);
  bool valid() const { return op_ != nullptr; }

 private:
  // `on`: the stream of wait_on (finish_on), or nullptr for finish().
  void complete(const Stream* on);
  bool poll(const Stream* on);
  void wait_until_complete(const Stream* on);
  void end_range() noexcept;
  Communicator* comm_ = nullptr;
  std::unique_ptr<PendingOp> op_;
  std::string what_;
  std::string peers_;
  OpKind kind_ = OpKind::kBarrier;
  std::chrono::steady_clock::time_point start_{};
  uint64_t nvtx_range_ = 0;
};

// Waits for all handles (each with the watchdog).
void wait_all(std::span<Handle> handles);

class Communicator {
 public:
  static constexpr int kNoColor = -1;

  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual Backend backend() const = 0;
  // Where this communicator's buffers may live: kCPU (MPI on host memory),
  // kCUDA (NCCL; or MPI when it accepts device memory by staging).
  virtual bool accepts_device_memory() const = 0;
  virtual bool accepts_host_memory() const = 0;

  // ---- collectives (blocking) ----
  void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                  Stream stream = nullptr);
  // recv holds size()*send_count elements, rank r's block at r*send_count.
  void all_gather(const void* send, void* recv, size_t send_count, DType dtype,
                  Stream stream = nullptr);
  // send holds size()*recv_count elements; rank r receives the reduction of block r.
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype, ReduceOp op,
                      Stream stream = nullptr);
  // send and recv hold size()*count elements; block j of send goes to rank j.
  void all_to_all(const void* send, void* recv, size_t count, DType dtype, Stream stream = nullptr);
  // Uneven: counts and displacements (elements) per peer, as MPI_Alltoallv. Not in place.
  void all_to_all_v(const void* send, std::span<const size_t> send_counts,
                    std::span<const size_t> send_displs, void* recv,
                    std::span<const size_t> recv_counts, std::span<const size_t> recv_displs,
                    DType dtype, Stream stream = nullptr);
  void broadcast(const void* send, void* recv, size_t count, DType dtype, int root,
                 Stream stream = nullptr);
  // Batched send/recv, all posted together (ncclGroupStart/End; MPI_Isend/Irecv + wait).
  void group(std::span<const P2POp> ops, Stream stream = nullptr);
  void send(const void* buf, size_t count, DType dtype, int peer, Stream stream = nullptr);
  void recv(void* buf, size_t count, DType dtype, int peer, Stream stream = nullptr);
  void barrier();

  // ---- TensorView forms (blocking) ----
  // Counts come from numel(). Both tensors must have the same dtype ("mismatched dtype"
  // otherwise), be packed row-major (is_contiguous) and live on a device this communicator
  // accepts; sizes must agree as stated per op. Checked before the backend is called.
  // recv.numel() == send.numel().
  void all_reduce(const TensorView& send, const TensorView& recv, ReduceOp op,
                  Stream stream = nullptr);
  // recv.numel() == size() * send.numel().
  void all_gather(const TensorView& send, const TensorView& recv, Stream stream = nullptr);
  // send.numel() == size() * recv.numel().
  void reduce_scatter(const TensorView& send, const TensorView& recv, ReduceOp op,
                      Stream stream = nullptr);
  // send.numel() == recv.numel(), a multiple of size(); block j (numel/size elements) of
  // send goes to rank j.
  void all_to_all(const TensorView& send, const TensorView& recv, Stream stream = nullptr);
  // send.numel() == recv.numel(); send is only read on root (others may pass recv).
  void broadcast(const TensorView& send, const TensorView& recv, int root, Stream stream = nullptr);
  void send(const TensorView& buf, int peer, Stream stream = nullptr);
  void recv(const TensorView& buf, int peer, Stream stream = nullptr);

  // ---- non-blocking forms ----
  Handle iall_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                     Stream stream = nullptr);
  Handle iall_gather(const void* send, void* recv, size_t send_count, DType dtype,
                     Stream stream = nullptr);
  Handle ireduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype, ReduceOp op,
                         Stream stream = nullptr);
  Handle iall_to_all(const void* send, void* recv, size_t count, DType dtype,
                     Stream stream = nullptr);
  Handle iall_to_all_v(const void* send, std::span<const size_t> send_counts,
                       std::span<const size_t> send_displs, void* recv,
                       std::span<const size_t> recv_counts, std::span<const size_t> recv_displs,
                       DType dtype, Stream stream = nullptr);
  Handle ibroadcast(const void* send, void* recv, size_t count, DType dtype, int root,
                    Stream stream = nullptr);
  Handle igroup(std::span<const P2POp> ops, Stream stream = nullptr);
  Handle ibarrier();

  // Ranks with the same color form a new communicator, ordered by (key, old rank).
  // kNoColor: this rank joins none and gets nullptr. Collective over this communicator.
  std::unique_ptr<Communicator> split(int color, int key);

  // Marks the communicator unusable and tells the backend (ncclCommAbort; MPI requests are
  // abandoned). Later ops throw Error(kRemoteError). Idempotent, never throws.
  void abort() noexcept;
  bool aborted() const noexcept { return aborted_; }

  Ledger& ledger() { return ledger_; }
  const Ledger& ledger() const { return ledger_; }

  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }

  // Drive backend progress (MPI_Test on outstanding work); cheap; strategies may call it
  // between compute tiles so that host-memory transfers advance while kernels run.
  virtual void progress() {}

 protected:
  Communicator();
  // Backend hooks. Arguments were validated; each returns the in-flight operation.
  // Byte accounting (sent/received) is done by the base class.
  virtual std::unique_ptr<PendingOp> start_all_reduce(const void* send, void* recv, size_t count,
                                                      DType dtype, ReduceOp op, Stream s) = 0;
  virtual std::unique_ptr<PendingOp> start_all_gather(const void* send, void* recv,
                                                      size_t send_count, DType dtype, Stream s) = 0;
  virtual std::unique_ptr<PendingOp> start_reduce_scatter(const void* send, void* recv,
                                                          size_t recv_count, DType dtype,
                                                          ReduceOp op, Stream s) = 0;
  virtual std::unique_ptr<PendingOp> start_all_to_all_v(
      const void* send, std::span<const size_t> send_counts, std::span<const size_t> send_displs,
      void* recv, std::span<const size_t> recv_counts, std::span<const size_t> recv_displs,
      DType dtype, Stream s) = 0;
  virtual std::unique_ptr<PendingOp> start_all_to_all(const void* send, void* recv, size_t count,
                                                      DType dtype, Stream s) = 0;
  virtual std::unique_ptr<PendingOp> start_broadcast(const void* send, void* recv, size_t count,
                                                     DType dtype, int root, Stream s) = 0;
  virtual std::unique_ptr<PendingOp> start_group(std::span<const P2POp> ops, Stream s) = 0;
  virtual std::unique_ptr<PendingOp> start_barrier() = 0;
  virtual std::unique_ptr<Communicator> do_split(int color, int key) = 0;
  virtual void do_abort() noexcept = 0;

  // Called by backends to copy the timeout to children created by split().
  void inherit_settings(const Communicator& parent) { timeout_ = parent.timeout_; }

 private:
  friend class Handle;
  void check_usable(const char* op) const;
  void check_buffer(const char* op, const char* name, const void* ptr, size_t count,
                    DType dtype) const;
  // Contiguous, on an accepted device; returns numel().
  size_t check_tensor(const char* op, const char* name, const TensorView& t) const;
  // Starts an op through the backend; `group_ops` are a send_recv group's ops (passed to
  // `start`, after fault injection may have rewritten them; empty for collectives).
  using StartFn = std::function<std::unique_ptr<PendingOp>(std::span<const P2POp> group_ops)>;
  Handle launch(OpKind kind, std::string what, std::string peers, uint64_t bytes_sent,
                uint64_t bytes_recv, const StartFn& start, std::span<const P2POp> group_ops = {});

  Ledger ledger_;
  std::chrono::milliseconds timeout_;
  bool aborted_ = false;
};

// Default watchdog timeout: DISTATTN_COMM_TIMEOUT_S (seconds, may be fractional), else 300.
std::chrono::milliseconds default_timeout();

// The world communicator for this process (runtime must be initialized, see runtime.h).
//   kMpi  — MPI_COMM_WORLD duplicate; accepts host memory, and CUDA memory when built with
//           CUDA (staged through pinned host buffers).
//   kNccl — one rank per GPU; unique id broadcast over MPI. Throws Error(kUnsupported) when
//           built without NCCL or when two ranks share a GPU (NCCL refuses that).
//   kAuto — kNccl when `device` is CUDA, NCCL is built in and every rank has its own GPU;
//           kMpi otherwise.
std::unique_ptr<Communicator> create_world(Backend backend, Device device);

}  // namespace distattn::comm
