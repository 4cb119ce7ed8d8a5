#pragma once
// Internals shared by the sequence-parallel strategies (src/parallel/sp_*.cpp). Device-
// neutral: only ops::*, Communicator and core tensor helpers; never mpi.h/nccl.h/CUDA.
#include <chrono>
#include <cstdint>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"
#include "distattn/parallel/sequence_parallel.h"

namespace distattn::parallel::detail {

// ---- tensor helpers (any strides, any device; CPU loops, other devices row by row) ----
// dst <- src elementwise; shapes equal; dtypes may differ (float types: converted).
void copy_view(const TensorView& dst, const TensorView& src);
// dst += src; dst fp32 or fp64, src any float dtype; shapes equal.
void add_view(const TensorView& dst, const TensorView& src);
void zero(const TensorView& t);  // any strides
// Where fp32 partials accumulate: `t` itself when it is fp32, else a packed fp32 scratch of
// t's shape owned by `holder` (the caller converts it into t at the end).
TensorView fp32_accumulator(const TensorView& t, Tensor& holder);
Tensor empty_like_shape(std::initializer_list<int64_t> shape, DType dtype, Device device);

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

// Per-call bookkeeping: compute time, exposed communication time, visible pairs.
class Tracker {
 public:
  explicit Tracker(const SpOptions& opts, comm::Communicator* progress_comm);
  ~Tracker() = default;

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
  // Waits, counting the blocked time as exposed communication.
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
  // Writes stats (when requested).
  void finish();

  ops::AttentionOptions attn_options(int64_t q_offset, int64_t k_offset, bool causal) const;
  // The caller's stream: communication is enqueued on it too, so on CUDA devices a transfer
  // is ordered after the kernel that produced its buffer (a separate communication stream
  // for GPU overlap belongs with the CUDA backend).
  Stream stream() const { return opts_.stream; }

 private:
  const SpOptions& opts_;
  comm::Communicator* progress_comm_;
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
