#pragma once
// The disaggregated prefill/decode engine and its colocated baseline (docs/SERVING.md).
//
// run_disaggregated: one job, the world split into a prefill group (world ranks [0, P)) and
// a decode group ([P, P + D)). Roles:
//   front         world rank 0 (the prefill leader): releases requests at their arrival
//                 times, announces each to the decode leader, runs the prefill group's
//                 schedule (one request at a time, in grant order) and collects the metrics.
//   prefill group exact causal prefill under its sharding; each layer's KV is packed per
//                 the transfer plan and posted (non-blocking) as soon as the layer's QKV
//                 projection is done, while later layers compute.
//   decode group  receiver-allocated pages: a request's pages are reserved on every decode
//                 rank (all-or-nothing) before the prefill may send; receives land in
//                 per-message buffers and are unpacked into the pages by the step loop, which
//                 polls and never blocks on a transfer; a request joins the running batch
//                 when its KV has arrived on every decode rank and its completion message
//                 (with the first token, produced by the prefill) has come.
// Every request ends in exactly one of completed / failed-with-reason on both sides, its
// pages released on both sides; every wait is bounded (the communicators' watchdog, the
// admission and KV timeouts below).
//
// run_colocated: the same P + D ranks as one head-parallel group (decode sharding heads for
// GQA, mla-tp for MLA), prefills interleaved into the decode loop with priority (a waiting
// request is prefilled before the next decode step, vLLM's default without chunked prefill),
// on the same arrivals.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/serving/handshake.h"
#include "distattn/serving/metrics.h"
#include "distattn/serving/model.h"
#include "distattn/serving/workload.h"

namespace distattn::serving {

// Injected faults (--fault, repeatable). Request ids are workload ids; ranks are group ranks
// unless stated.
struct Fault {
  enum class Kind {
    kRefuse,          // decode rank `rank` (default the last) reports no room for `request`:
                      // it waits past the admission timeout and is refused
    kDropCompletion,  // the prefill leader never sends `request`'s completion message
    kPrefillThrow,    // prefill rank `rank` throws in layer `layer` of `request`
    kHandshake,       // the decode side declares another value of handshake field `field`
    kExit,            // world rank `rank` exits (std::_Exit(3)) when `request` starts
    kHang,            // world rank `rank` stops (sleeps) when `request` starts
  };
  Kind kind = Kind::kRefuse;
  int64_t request = 0;
  int rank = -1;
  int64_t layer = 0;
  std::string field;
};
// "refuse:REQ[:RANK]", "drop-completion:REQ", "prefill-throw:REQ[:RANK[:LAYER]]",
// "handshake:FIELD", "exit:WORLD_RANK:REQ", "hang:WORLD_RANK:REQ". Throws naming the forms.
Fault parse_fault(const std::string& text);

struct EngineOptions {
  ModelConfig model;
  // Where weights, activations, pools and KV buffers live. CUDA: the groups' and the KV
  // channel's communicators are created with `backend` (kAuto: NCCL with one GPU per rank,
  // else MPI staging device buffers); control stays on the host world (MPI).
  Device device{};
  comm::Backend backend = comm::Backend::kAuto;
  PrefillLayout prefill;    // ranks = the prefill group's size
  DecodeSetup decode;       // layout.ranks = the decode group's size; page size
  int64_t kv_pages = 1024;  // pages per decode rank (colocated: per rank)
  int64_t max_batch = 32;   // requests decoded together at most
  // Granted requests whose KV has not arrived, at most (pages are reserved just ahead of the
  // prefill; the KV timeout then bounds a wait of about one prefill, not a whole queue).
  int64_t transfer_window = 2;
  double admission_timeout_s = 60;  // a request waiting for pages longer is refused
  double kv_timeout_s = 60;  // a granted request whose KV or completion is not in by then fails
  bool check = false;        // teacher-forced single-rank reference of every step
  std::vector<Fault> faults;
  bool verbose = false;  // state transitions on stderr (also DISTATTN_VERBOSE=1)
  bool progress = true;  // a progress line per second on world rank 0
};

// Throws naming the flag to change (P + D = world size, head divisibility, pages, ...).
void validate(const EngineOptions& opts, int world_size);

struct RunResult {
  RunMetrics metrics;                      // world rank 0 (others: partial)
  std::vector<RequestRecord> records;      // world rank 0: every request, by id
  std::vector<int64_t> kv_bytes_received;  // [D] per decode rank (ledger), world rank 0
  std::vector<int64_t> kv_bytes_sent;      // [P] per prefill rank (ledger), world rank 0
  int64_t prefill_failures_seen = 0;       // requests the prefill side recorded as failed
  int64_t decode_failures_seen = 0;        // requests the decode side recorded as failed
};

// A handshake mismatch: thrown on every rank before any KV byte moves; carries the KV
// channel's ledger (bytes sent and received, summed over the ranks) at that point.
class HandshakeError : public Error {
 public:
  HandshakeError(const std::string& what, int64_t kv_bytes)
      : Error(Status::kInvalidArgument, what), kv_bytes_(kv_bytes) {}
  int64_t kv_bytes() const { return kv_bytes_; }

 private:
  int64_t kv_bytes_;
};

// Collective over `world` (a host-memory communicator of P + D ranks). Throws HandshakeError
// when the two sides' handshakes differ.
RunResult run_disaggregated(comm::Communicator& world, const EngineOptions& opts,
                            const std::vector<Request>& workload, const WorkloadSpec& spec,
                            const Slo& slo);
RunResult run_colocated(comm::Communicator& world, const EngineOptions& opts,
                        const std::vector<Request>& workload, const WorkloadSpec& spec,
                        const Slo& slo);

// The handshake this process would send for `opts` on `role` (0 prefill, 1 decode),
// including the TPLA rotation id and mu from `reparams` (empty unless TPLA).
Handshake make_handshake(const EngineOptions& opts, int role,
                         const std::vector<parallel::TplaReparam>& reparams);

// The KV transfer alone, measured (no model compute): a request of `tokens` tokens whose
// per-layer KV (random values in the prefill sharding's layout) is packed, posted, received
// into reserved pages and unpacked `iters` times after `warmup` untimed runs, through the same
// plan, sender and receiver as run_disaggregated; then the same messages (the same parts, so
// the same message sizes) between the same rank pairs as plain Communicator send/recv from and
// into buffers allocated once (no packing), for the same-run ratio.
// Times are the max over ranks of each rank's barrier-to-barrier time. Collective over `world`.
struct TransferBenchResult {
  int64_t tokens = 0;
  int64_t bytes = 0;        // KV bytes per iteration (all decode ranks together)
  int64_t messages = 0;     // messages per iteration
  int64_t max_message = 0;  // largest message (bytes)
  double transfer_s = 0;    // engine transfer, mean per iteration
  double raw_s = 0;         // plain send/recv of the same messages
  double transfer_gbps() const { return transfer_s > 0 ? bytes / transfer_s / 1e9 : 0; }
  double raw_gbps() const { return raw_s > 0 ? bytes / raw_s / 1e9 : 0; }
};
TransferBenchResult bench_transfer(comm::Communicator& world, const EngineOptions& opts,
                                   int64_t tokens, int iters, int warmup);

}  // namespace distattn::serving
