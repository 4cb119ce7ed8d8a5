#pragma once
// Internal pieces of the serving engines (src/serving/engine*.cpp): the control channel
// between the two leaders, the KV sender and receiver, the decode-side request state and
// batch builder shared by the disaggregated and colocated engines, and the run clock.
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/stream.h"
#include "distattn/serving/engine.h"
#include "distattn/serving/kv_pool.h"
#include "distattn/serving/model.h"
#include "distattn/serving/transfer.h"

namespace distattn::serving::detail {

// Seconds since the run's common start (every rank takes it right after one barrier).
class RunClock {
 public:
  void start() { t0_ = std::chrono::steady_clock::now(); }
  double now() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

// ---- control messages between the prefill leader and the decode leader --------------------

enum class CtrlType : int32_t {
  kAnnounce = 1,   // P->D: request (a = input_len, b = output_len)
  kGrant,          // D->P: pages reserved on every decode rank, receives posted
  kRefuse,         // D->P: no pages within the admission timeout / request too large (text)
  kKvDone,         // P->D: every KV message posted (a = first token, t = prefill end)
  kPrefillFailed,  // P->D: the prefill failed (text); filler messages complete the transfer
  kDecodeFailed,   // D->P: a granted request failed on the decode side (text)
  kNoMore,         // P->D: no more announcements
  kDrained,        // D->P: every request ended; send kBye
  kBye,            // P->D: the last control message
  kHeartbeat,      // both ways while a side has nothing else to say (liveness)
};

struct CtrlMsg {
  uint32_t magic = 0x43544C31u;  // "CTL1"
  int32_t type = 0;
  int64_t request = -1;
  int64_t a = 0, b = 0;
  double t = 0;
  char text[216] = {};
};
static_assert(sizeof(CtrlMsg) == 256);
CtrlMsg make_ctrl(CtrlType type, int64_t request, int64_t a = 0, int64_t b = 0, double t = 0,
                  const std::string& text = "");

// One leader's end of the control channel: one receive always posted (until the peer's last
// message: kDrained for the prefill leader, kBye for the decode leader), sends kept until
// complete. Liveness: heartbeat() sends a kHeartbeat when nothing was sent for a while, and
// poll() throws Error(kTimeout) when nothing arrived for the communicator's watchdog timeout,
// so a peer that died or hangs ends the job instead of leaving this leader polling forever.
class CtrlChannel {
 public:
  CtrlChannel(comm::Communicator& comm, int peer, const char* peer_name);
  ~CtrlChannel();
  // `last`: this is this side's final message; nothing (no heartbeat either) follows it.
  void send(const CtrlMsg& m, bool last = false);
  // The next message, if one has arrived (heartbeats are consumed here). After `last`
  // arrives no receive is re-posted.
  std::optional<CtrlMsg> poll(CtrlType last);
  void heartbeat();
  void flush();  // waits (watchdog) for the sends
  bool receiving() const { return receiving_; }

 private:
  void post();
  comm::Communicator& comm_;
  int peer_;
  std::string peer_name_;
  std::chrono::steady_clock::time_point last_sent_, last_received_;
  bool closed_ = false;
  struct Out {
    comm::Handle handle;
    std::unique_ptr<CtrlMsg> msg;
  };
  std::deque<Out> out_;
  std::unique_ptr<CtrlMsg> in_;
  comm::Handle recv_;
  bool receiving_ = false;
};

// ---- KV messages ----------------------------------------------------------------------------

// Reused staging buffers (pack and landing buffers): a fresh allocation per message would
// fault its pages in on every transfer. Buffers are kept by power-of-two capacity, up to
// `max_bytes` in all.
class BufferCache {
 public:
  explicit BufferCache(Device device = Device::cpu(), int64_t max_bytes = int64_t{256} << 20)
      : device_(device), max_bytes_(max_bytes) {}
  Tensor get(int64_t bytes);  // on the cache's device
  void put(Tensor t);
  // The first `bytes` bytes of a buffer from get().
  static TensorView bytes(const Tensor& t, int64_t bytes);

 private:
  Device device_;
  int64_t max_bytes_, cached_ = 0;
  std::vector<std::vector<Tensor>> by_class_;
};

// Prefill side: posted KV messages, kept (with their staging buffers and the tensors they are
// sent from: the prefill side's "pages") until MPI/NCCL is done with them.
// On CUDA the sends run on a stream of their own, ordered after the compute (default stream)
// that produced their data, so a transfer never holds up the model's kernels.
class KvSender {
 public:
  KvSender(comm::Communicator& kv, int decode_world_offset, Device device = Device::cpu());
  // Posts every message of `layer` from this prefill rank (`src`) of `plan`; parts that are
  // one run of `kv` go as they are, the others are packed (transfer.h).
  void send_layer(const TransferPlan& plan, int src, int64_t layer, int64_t request,
                  const LayerKv& kv);
  // Filler messages for `layer` (headers marked as fillers), keeping the channel in order
  // when a request failed after its grant.
  void send_fillers(const TransferPlan& plan, int src, int64_t layer, int64_t request);
  void poll();
  void wait_all();
  int64_t buffers_in_use() const { return static_cast<int64_t>(out_.size()); }

 private:
  struct Out {
    comm::Handle handle;
    std::vector<Tensor> buffers;  // staging buffers, back to the cache when done
    Tensor keep_k, keep_v;        // the tensors sent from directly
  };
  void post(int dst, Out o, const std::vector<comm::P2POp>& ops);
  comm::Communicator& kv_;
  int offset_;
  Device device_;
  OwnedStream stream_;
  BufferCache cache_;
  std::deque<Out> out_;
};

// Decode side: the receives of one request (posted at grant). Parts land in the request's pages
// directly where they are one run of them, else in staging buffers unpacked on completion.
class KvReceiver {
 public:
  // `stream`: where the receives run on CUDA (the decode rank's transfer stream); the default
  // stream waits for it before unpacking and before the pages are read.
  KvReceiver(comm::Communicator& kv, std::shared_ptr<const TransferPlan> plan, int dst,
             int64_t request, KvPool& pool, std::span<const int32_t> pages, BufferCache& cache,
             Stream stream = nullptr);
  // Tests the receives; checks headers and unpacks what completed. True when every message is
  // in. Fillers are accepted and discarded.
  bool poll(KvPool& pool, std::span<const int32_t> pages);
  bool done() const { return pending_ == 0; }
  bool saw_filler() const { return filler_; }

 private:
  struct In {
    comm::Handle handle;
    std::vector<size_t> segs;
    std::vector<MessagePart> parts;
    std::vector<Tensor> staging;  // per part: a buffer, or undefined when received in place
    bool done = false;
  };
  std::shared_ptr<const TransferPlan> plan_;
  int64_t request_;
  BufferCache& cache_;
  Stream stream_;
  Device device_;
  std::vector<In> in_;
  size_t pending_ = 0;
  bool filler_ = false;
};

// ---- decode-side requests and the batch step --------------------------------------------

struct DecodeRequest {
  int64_t id = 0, input_len = 0, output_len = 0;
  enum class State { kWaiting, kTransferring, kReady, kRunning, kDone } state = State::kWaiting;
  double t_announce = 0, t_grant = 0;
  std::vector<int32_t> pages;  // this rank's pages (the request's reference)
  std::shared_ptr<const TransferPlan> plan;
  std::unique_ptr<KvReceiver> receiver;  // holds a second page reference while in flight
  bool completion = false, prefill_failed = false, timed_out = false;
  int32_t last_token = 0;
  int64_t length = 0;     // tokens whose KV is cached (globally)
  int64_t emitted = 0;    // output tokens emitted (the first comes from the prefill)
  int failing_rank = -1;  // admission: lowest decode rank that had no room
  // Leader-side record.
  RequestRecord record;
};

// The decode group's batch builder and stepper (disaggregated decode group, or colocated world).
class DecodeEngine {
 public:
  // `group`: the decode group's communicator for the model (device memory on CUDA).
  DecodeEngine(const EngineOptions& opts, std::shared_ptr<comm::Communicator> group,
               std::vector<parallel::TplaReparam> reparams);
  Stream transfer_stream() const { return transfer_stream_.get(); }
  KvPool& pool() { return *pool_; }
  const KvPool& pool() const { return *pool_; }
  DecodeModel& model() { return *model_; }
  const DecodeLayout& layout() const { return layout_; }
  int rank() const { return rank_; }
  // Pages this rank needs for a request (prompt + output tokens).
  int64_t pages_needed(const DecodeRequest& r) const;
  // One step over `running` (collective). Returns each request's new token and hidden.
  DecodeOutput step(const std::vector<DecodeRequest*>& running,
                    const std::function<void()>& progress);

 private:
  const EngineOptions& opts_;
  std::shared_ptr<comm::Communicator> group_;
  DecodeLayout layout_;
  KvGeometry geometry_;
  int rank_ = 0;
  std::unique_ptr<DecodeModel> model_;
  std::unique_ptr<KvPool> pool_;
  OwnedStream transfer_stream_;  // CUDA: the KV receives

 public:
  BufferCache staging;  // landing buffers of the parts that cannot be received in place
};

// ---- shared helpers -----------------------------------------------------------------------

bool has_fault(const EngineOptions& o, Fault::Kind k, int64_t request, int rank);
// kExit / kHang for this world rank at `request`.
void maybe_die(const EngineOptions& o, int world_rank, int64_t request);
bool verbose(const EngineOptions& o);
void log_transition(const EngineOptions& o, const char* side, int64_t request, const char* what,
                    const std::string& detail = "");

// Teacher-forced check of every completed record (distributed over the world's ranks);
// returns the worst relative error (NaN when no request completed). Collective.
double check_records(comm::Communicator& world, const EngineOptions& opts, const WorkloadSpec& spec,
                     std::vector<RequestRecord>& records);
// Serialization of records between ranks (id, status, reason, times, tokens, hidden).
std::vector<uint8_t> pack_records(const std::vector<RequestRecord>& records);
std::vector<RequestRecord> unpack_records(std::span<const uint8_t> bytes);

}  // namespace distattn::serving::detail
