#pragma once
// Internals shared by the sequence-parallel strategies (src/parallel/sp_*.cpp). Device-
// neutral: only ops::*, Communicator and core tensor/stream helpers; never mpi.h/nccl.h/CUDA.
//
// Streams (CUDA devices). A call has two streams: the COMPUTE stream (the caller's
// SpOptions::stream: kernels, copies, merges, zero fills) and the Tracker's COMM stream (every
// collective and send/recv). They are ordered only through events, never by host waits:
//   - before posting an op:  tr.comm_after_compute()  (comm waits for all compute so far:
//     the op's send buffers are written, and its receive buffers are no longer read by
//     earlier kernels), then post on tr.comm_stream();
//   - before using results:  tr.wait(h)  (compute waits for the op's completion event);
//   - at the end of a call:  tr.finish()  (the caller's stream waits for the comm stream, so
//     the caller may overwrite its inputs; then the host waits each op: the watchdog).
// Every temporary is allocated and filled on the compute stream (helpers below take it),
// and every handle is waited (tr.wait) before the buffers it touches are released.
// Releasing a device Tensor calls cudaFree, which waits for the device to go idle, so a
// temporary may be released while kernels that read it are still queued.
// On the CPU both streams are nullptr, comm_after_compute is a no-op and wait() is
// Handle::wait(): the behaviour of the CPU path is unchanged.
#include <chrono>
#include <cstdint>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/stream.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"
#include "distattn/parallel/sequence_parallel.h"

namespace distattn::parallel::detail {

// ---- tensor helpers (any strides, one device; ops::tensor_* enqueued on `stream`) ----
// `stream` is the compute stream (ignored on the CPU, where the work runs now).
// dst <- src elementwise; shapes equal; dtypes may differ (float types: converted).
void copy_view(const TensorView& dst, const TensorView& src, Stream stream);
// dst += src; dst fp32 or fp64, src any float dtype; shapes equal.
void add_view(const TensorView& dst, const TensorView& src, Stream stream);
void zero(const TensorView& t, Stream stream);  // any strides
// A packed copy of `t` on t's device (filled on `stream`), e.g. a send buffer of a strided
// input.
Tensor packed_copy(const TensorView& t, Stream stream);
// A packed zero tensor on `device`, zeroed on `stream`, stream-ordered (on CUDA,
// Tensor::zeros memsets on the legacy default stream and makes the host wait for it).
Tensor zeros_on(std::initializer_list<int64_t> shape, DType dtype, Device device, Stream stream);
// Where fp32 partials accumulate: `t` itself when it is fp32, else a packed fp32 scratch of
// t's shape owned by `holder` (the caller converts it into t at the end).
TensorView fp32_accumulator(const TensorView& t, Tensor& holder);

// ---- GQA head mapping ----
// Local query heads [q_begin, q_end) all use local KV head `kv`.
struct HeadSegment {
  int64_t q_begin = 0;
  int64_t q_end = 0;
  int64_t kv = 0;
};
// Segments for local query heads that are global heads [hq_begin, hq_end), local KV heads
// starting at global KV head kv_begin, with group size `group` = Hq/Hkv.
std::vector<HeadSegment> head_segments(int64_t hq_begin, int64_t hq_end, int64_t kv_begin,
                                       int64_t group);
// Whole-tensor mapping: hq local heads over hkv local heads with hq % hkv == 0.
std::vector<HeadSegment> uniform_segments(int64_t hq, int64_t hkv);

// ---- timing ----
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0);

// Per-call bookkeeping: compute time, exposed communication time, visible pairs; and, on
// CUDA devices, the call's communication stream and the handles still pending on the host.
class Tracker {
 public:
  // `device`: the device of the call's tensors (a comm stream is created for CUDA).
  Tracker(const SpOptions& opts, comm::Communicator* progress_comm, Device device);
  // Pending handles are destroyed (waited, errors swallowed) before the comm stream.
  ~Tracker() = default;
  Tracker(const Tracker&) = delete;
  Tracker& operator=(const Tracker&) = delete;

  // Local attention over segments (one kernel call when the mapping is uniform).
  void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const TensorView& lse, int64_t q_offset, int64_t k_offset, bool causal,
               const std::vector<HeadSegment>& segs);
  void backward(const TensorView& q, const TensorView& k, const TensorView& v,
                const TensorView& out, const TensorView& dout, const TensorView& lse,
                const TensorView& dq, const TensorView& dk, const TensorView& dv, int64_t q_offset,
                int64_t k_offset, bool causal, bool accumulate,
                const std::vector<HeadSegment>& segs);
  void merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
             const TensorView& lse_b);
  // The stream every communication op of the call is posted on: a dedicated stream on CUDA
  // devices (so transfers run beside the kernels), the caller's stream on the CPU.
  Stream comm_stream() const { return device_.is_cuda() ? comm_stream_.get() : opts_.stream; }
  // The comm stream waits (on the device) for everything enqueued on the compute stream so
  // far. Call right before posting an op. No-op on the CPU.
  // MPI backend with device memory: the backend enqueues its staging copies on the comm
  // stream and the host waits for that stream before posting to MPI, so this makes the HOST
  // wait for the compute enqueued so far (ranks sharing one GPU serialize on it anyway);
  // NCCL: no host wait.
  void comm_after_compute();
  // Makes the op's results visible to the compute stream. CPU: Handle::wait(). CUDA:
  // Handle::wait_on(compute stream) (NCCL: device-side; MPI: host waits for the transfer,
  // then the staged copy back is enqueued on the compute stream); the handle is kept and
  // waited on the host in finish(). Host time blocked here counts as exposed communication.
  void wait(comm::Handle& h);
  void wait_all(std::vector<comm::Handle>& hs);
  // Runs a blocking collective, counting it as exposed.
  template <typename F>
  void blocking(F&& f) {
    const auto t0 = Clock::now();
    f();
    exposed_s_ += seconds_since(t0);
  }
  void step() { ++steps_; }
  // End of a call. CUDA: the compute (caller's) stream waits for the comm stream, then the
  // host waits every pending handle (watchdog; on NCCL this returns once the transfers are
  // done, while later kernels may still run). Then writes stats (when requested).
  void finish();

  ops::AttentionOptions attn_options(int64_t q_offset, int64_t k_offset, bool causal) const;
  // The compute stream: the caller's SpOptions::stream. Kernels and tensor helpers go here.
  Stream stream() const { return opts_.stream; }
  Device device() const { return device_; }

 private:
  const SpOptions& opts_;
  comm::Communicator* progress_comm_;
  Device device_;
  OwnedStream comm_stream_;  // CUDA only (get() nullptr on the CPU)
  // CUDA only: recorded on one stream and waited by the other, reused for every post (a
  // recorded event may be re-recorded at once: a wait already enqueued keeps the state it
  // captured), so ordering the streams creates no event per step.
  Event compute_done_;
  Event comm_done_;
  std::vector<comm::Handle> pending_;  // CUDA: waited on the device, not yet on the host
  Clock::time_point start_;
  double compute_s_ = 0;
  double exposed_s_ = 0;
  double pairs_ = 0;
  int steps_ = 0;
};

// Visible (query, key) pairs of a block: sq queries at q_offset.., sk keys at k_offset...
double visible_pairs(int64_t sq, int64_t sk, int64_t q_offset, int64_t k_offset, bool causal);

// ---- strategy bodies (validated arguments) ----
// Ring over `comm` (contiguous shards, or zigzag shards). `segs` maps local query heads to
// local KV heads (uniform_segments for whole tensors).
void ring_forward(comm::Communicator& comm, bool zigzag, const TensorView& q, const TensorView& k,
                  const TensorView& v, const TensorView& out, const TensorView& lse, bool causal,
                  const std::vector<HeadSegment>& segs, Tracker& tr);
void ring_backward(comm::Communicator& comm, bool zigzag, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& out, const TensorView& dout,
                   const TensorView& lse, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv, bool causal, const std::vector<HeadSegment>& segs,
                   Tracker& tr);
void allgather_forward(comm::Communicator& comm, const TensorView& q, const TensorView& k,
                       const TensorView& v, const TensorView& out, const TensorView& lse,
                       bool causal, Tracker& tr);
void allgather_backward(comm::Communicator& comm, const TensorView& q, const TensorView& k,
                        const TensorView& v, const TensorView& out, const TensorView& dout,
                        const TensorView& lse, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, bool causal, Tracker& tr);
// Ulysses over `ucomm`; when `ring` is set (hybrid) the local attention is a zigzag ring
// over it and each rank's tokens are 2 pieces (its sub-chunks of the ring rank's 2 chunks).
void ulysses_forward(comm::Communicator& ucomm, comm::Communicator* ring, const TensorView& q,
                     const TensorView& k, const TensorView& v, const TensorView& out,
                     const TensorView& lse, bool causal, Tracker& tr);
void ulysses_backward(comm::Communicator& ucomm, comm::Communicator* ring, const TensorView& q,
                      const TensorView& k, const TensorView& v, const TensorView& out,
                      const TensorView& dout, const TensorView& lse, const TensorView& dq,
                      const TensorView& dk, const TensorView& dv, bool causal, Tracker& tr);

}  // namespace distattn::parallel::detail
