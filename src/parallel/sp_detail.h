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
#include "src/ops/doc_mask.h"

namespace distattn::parallel::detail {

// ---- tensor helpers (any strides, one device; ops::tensor_* enqueued on `stream`) ----
// `stream` is the compute stream (ignored on the CPU, where the work runs now).
// dst <- src elementwise; shapes equal; dtypes may differ (float types: converted).
void copy_view(const TensorView& dst, const TensorView& src, Stream stream);
// dst += src; dst fp32 or fp64, src any float dtype; shapes equal.
void add_view(const TensorView& dst, const TensorView& src, Stream stream);
void zero(const TensorView& t, Stream stream);  // any strides
// A packed view of `shape` starting `offset` elements into `buf` (a flat exchange buffer).
TensorView view_at(const Tensor& buf, size_t offset, std::initializer_list<int64_t> shape);
// A packed copy of `t` on t's device (filled on `stream`), e.g. a send buffer of a strided
// input.
Tensor packed_copy(const TensorView& t, Stream stream);
// A packed zero tensor on `device`, zeroed on `stream`, stream-ordered (on CUDA,
// Tensor::zeros memsets on the legacy default stream and makes the host wait for it).
Tensor zeros_on(std::initializer_list<int64_t> shape, DType dtype, Device device, Stream stream);
// Where fp32 partials accumulate: `t` itself when it is fp32, else a packed fp32 scratch of
// t's shape owned by `holder` (the caller converts it into t at the end).
TensorView fp32_accumulator(const TensorView& t, Tensor& holder);

// ---- packed documents, windows, sinks ----
using Runs = std::vector<ops::docmask::Run>;
using Pieces = std::vector<ops::docmask::Piece>;
// A global token range of a rank's local rows: rows [begin, begin+len) of the packed
// sequence, document `doc`, document positions from `pos`.
struct TokenRange {
  int64_t begin = 0, len = 0, doc = 0, pos = 0;
};
std::vector<TokenRange> token_ranges(const SpLayout& l, const SpShape& sh, int rank);
// The same as runs over the rank's LOCAL rows (row 0 = its first local row).
Runs local_runs(const SpLayout& l, const SpShape& sh, int rank);
// Rows a runs list covers (max row + len).
int64_t runs_rows(const Runs& runs);
// Runs shifted by `rows` (a block placed at row offset `rows` of a bigger tensor).
Runs shifted(const Runs& runs, int64_t rows);
// True when the call needs the piece-decomposed (generic) path: documents, window, sink
// tokens or learned sinks.
bool uses_pieces(const SpOptions& o);

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
// The KV heads that query heads `q` (non-empty) use, with `group` = Hq/Hkv query heads per
// KV head.
inline HeadRange kv_heads_of(HeadRange q, int64_t group) {
  return {q.begin / group, (q.end - 1) / group + 1};
}
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

  // Generic (piece) path. The call's mask (causal, window, sink tokens).
  ops::docmask::Mask mask() const;
  // Pieces of query rows `qr` x key rows `kr` under the call's mask.
  Pieces pieces(const Runs& qr, const Runs& kr) const;
  // Attends every piece into fp32 accumulators acc/acc_lse (rows with no piece keep what
  // they hold: initialize with out = 0, lse = -inf). fresh: acc holds no result yet, so the
  // first piece of each query row writes directly instead of merging.
  void forward_pieces(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& acc, const TensorView& acc_lse, const Pieces& ps,
                      const std::vector<HeadSegment>& segs, bool fresh);
  // Adds every piece's dq/dk/dv (fp32 accumulators) given the final out/lse.
  void backward_pieces(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView& dout, const TensorView& lse,
                       const TensorView& dq, const TensorView& dk, const TensorView& dv,
                       const Pieces& ps, const std::vector<HeadSegment>& segs);
  // The compute stream: the caller's SpOptions::stream. Kernels and tensor helpers go here.
  Stream stream() const { return opts_.stream; }
  Device device() const { return device_; }

 private:
  void run_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse, const ops::AttentionOptions& o,
                   const std::vector<HeadSegment>& segs);
  void run_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& dq, const TensorView& dk, const TensorView& dv,
                    const ops::AttentionOptions& o, bool accumulate,
                    const std::vector<HeadSegment>& segs);
  ops::AttentionOptions piece_options(const ops::docmask::Piece& x) const;
  Tensor scratch_out_, scratch_lse_;  // forward_pieces partials (grown on demand)

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

// ---- generic (piece) strategy bodies: documents, windows, sink tokens, learned sinks ----
// `sinks`: learned sink logits of the LOCAL query heads (data == nullptr: none); applied to
// the final result of each local query row.
// Ring over `comm`; maps[j] = runs of ring rank j's block (its local rows), so blocks may
// have different lengths. Steps after the last one in which any rank sees a key are not run.
void ring_forward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                         const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView& lse,
                         const std::vector<HeadSegment>& segs, const TensorView& sinks,
                         Tracker& tr);
void ring_backward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                          const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const TensorView& dout, const TensorView& lse,
                          const TensorView& dq, const TensorView& dk, const TensorView& dv,
                          const std::vector<HeadSegment>& segs, Tracker& tr);
void allgather_forward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                              const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView& out, const TensorView& lse, const TensorView& sinks,
                              Tracker& tr);
void allgather_backward_pieces(comm::Communicator& comm, const std::vector<Runs>& maps,
                               const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView& dout, const TensorView& lse,
                               const TensorView& dq, const TensorView& dk, const TensorView& dv,
                               Tracker& tr);
// Ulysses over `uc` (maps[j]: runs of Ulysses peer j's local rows); hybrid when `ring` is set
// (ring_maps[i][j]: runs of peer j of ring rank i's Ulysses group).
void ulysses_forward_pieces(comm::Communicator& uc, comm::Communicator* ring,
                            const std::vector<std::vector<Runs>>& group_maps, const TensorView& q,
                            const TensorView& k, const TensorView& v, const TensorView& out,
                            const TensorView& lse, const TensorView& sinks_all, Tracker& tr);
void ulysses_backward_pieces(comm::Communicator& uc, comm::Communicator* ring,
                             const std::vector<std::vector<Runs>>& group_maps, const TensorView& q,
                             const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& dout, const TensorView& lse, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, Tracker& tr);

}  // namespace distattn::parallel::detail
