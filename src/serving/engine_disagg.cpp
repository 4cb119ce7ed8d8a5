// The disaggregated prefill/decode engine (distattn/serving/engine.h: run_disaggregated).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <thread>

#include "distattn/core/error.h"
#include "distattn/ops/dense.h"
#include "distattn/ops/elementwise.h"
#include "src/serving/engine_internal.h"

namespace distattn::serving {

using namespace detail;

namespace {

// ---- prefill group commands (leader -> group) ------------------------------------------------

enum class Cmd : int64_t { kIdle = 0, kRun = 1, kStop = 2 };
struct PrefillCmd {
  int64_t cmd = 0;
  int64_t request = -1, input_len = 0, output_len = 0;
};

// ---- decode group events (leader -> group, once per step) ---------------------------------------

enum class Ev : int32_t {
  kAnnounce = 1,  // a = input_len, b = output_len, t = announce time
  kKvDone,        // a = first token, t = prefill end
  kPrefillFailed,
  kRefuse,   // a = failing rank (-1: too large)
  kTimeout,  // KV or completion did not arrive in time
  kNoMore,
  kExit,
};
struct Event {
  int32_t type = 0;
  int32_t pad = 0;
  int64_t request = -1;
  int64_t a = 0, b = 0;
  double t = 0;
};
constexpr int kMaxEvents = 62;
struct StepSync {
  int32_t count = 0;
  int32_t pad = 0;
  Event ev[kMaxEvents];
};

std::string ctrl_text(const CtrlMsg& m) {
  return std::string(m.text, strnlen(m.text, sizeof(m.text)));
}

// fp32 copies of U per layer, for rotating the latents a TPLA decode side expects.
std::vector<Tensor> rotation_matrices(const std::vector<parallel::TplaReparam>& rps) {
  std::vector<Tensor> out;
  for (const parallel::TplaReparam& rp : rps) {
    Tensor u = Tensor::empty({rp.latent, rp.latent}, DType::kFloat32);
    for (int64_t i = 0; i < rp.latent * rp.latent; ++i)
      u.data_as<float>()[i] = static_cast<float>(rp.u[static_cast<size_t>(i)]);
    out.push_back(std::move(u));
  }
  return out;
}

// ---- the prefill side ------------------------------------------------------------------------

struct PrefillResultOrError {
  bool ok = false;
  PrefillOutput out;
  std::string error;
};

class PrefillSide {
 public:
  // `group`: host control within the group; `model_group`: the model's collectives (device
  // memory on CUDA; the same communicator on CPU).
  PrefillSide(const EngineOptions& o, const WorkloadSpec& spec, const std::vector<Request>& wl,
              std::shared_ptr<comm::Communicator> group,
              std::shared_ptr<comm::Communicator> model_group, comm::Communicator& kv,
              comm::Communicator* ctrl, const std::vector<parallel::TplaReparam>& rps,
              int world_rank, const RunClock& clock)
      : o_(o),
        spec_(spec),
        wl_(wl),
        group_(std::move(group)),
        model_(o.model, o.prefill, std::move(model_group), group_, o.device),
        sender_(kv, o.prefill.ranks, o.device),
        rot_(rotation_matrices(rps)),
        world_rank_(world_rank),
        clock_(clock) {
    if (group_->rank() == 0)
      ch_ = std::make_unique<CtrlChannel>(*ctrl, o.prefill.ranks, "decode leader");
    records_.resize(wl.size());
    for (const Request& r : wl) {
      RequestRecord& rec = records_[static_cast<size_t>(r.id)];
      rec.id = r.id;
      rec.arrival_s = r.arrival_s;
      rec.input_len = r.input_len;
      rec.output_len = r.output_len;
      rec.completed = true;  // until a failure is recorded (the decode side's record decides)
    }
  }

  void run() {
    if (group_->rank() == 0)
      leader_loop();
    else
      follower_loop();
    sender_.wait_all();
  }

  std::vector<RequestRecord>& records() { return records_; }
  int64_t failures() const { return failures_; }
  int64_t buffers_in_use() const { return sender_.buffers_in_use(); }

 private:
  void fail(int64_t id, const std::string& why) {
    RequestRecord& rec = records_[static_cast<size_t>(id)];
    if (rec.completed) ++failures_;
    rec.completed = false;
    if (rec.reason.empty()) rec.reason = why;
    log_transition(o_, "prefill", id, "failed", why);
  }

  void broadcast(PrefillCmd& c) {
    if (group_->size() > 1) group_->broadcast(&c, &c, sizeof(c), DType::kUInt8, 0);
  }

  void leader_loop() {
    std::vector<const Request*> by_arrival;
    for (const Request& r : wl_) by_arrival.push_back(&r);
    std::stable_sort(by_arrival.begin(), by_arrival.end(), [](const Request* a, const Request* b) {
      return a->arrival_s < b->arrival_s;
    });
    size_t next = 0;
    bool no_more_sent = false, done = false;
    std::deque<int64_t> granted;
    double last_idle_cmd = -1, last_progress = 0;
    int64_t finished = 0;
    while (!done) {
      while (std::optional<CtrlMsg> m = ch_->poll(CtrlType::kDrained)) {
        const auto type = static_cast<CtrlType>(m->type);
        if (type == CtrlType::kGrant) {
          granted.push_back(m->request);
          log_transition(o_, "prefill", m->request, "granted");
        } else if (type == CtrlType::kRefuse) {
          fail(m->request, "refused by the decode side: " + ctrl_text(*m));
          ++finished;
        } else if (type == CtrlType::kDecodeFailed) {
          fail(m->request, "decode side: " + ctrl_text(*m));
        } else if (type == CtrlType::kDrained) {
          ch_->send(make_ctrl(CtrlType::kBye, -1), /*last=*/true);
          done = true;
          break;
        } else {
          DISTATTN_THROW(Status::kInternal, "prefill leader: unexpected control message ", m->type);
        }
      }
      if (done) break;
      const double now = clock_.now();
      while (next < by_arrival.size() && by_arrival[next]->arrival_s <= now) {
        const Request& r = *by_arrival[next++];
        ch_->send(make_ctrl(CtrlType::kAnnounce, r.id, r.input_len, r.output_len, now));
        log_transition(o_, "prefill", r.id, "announced");
      }
      if (next == by_arrival.size() && !no_more_sent) {
        ch_->send(make_ctrl(CtrlType::kNoMore, -1));
        no_more_sent = true;
      }
      if (!granted.empty()) {
        const int64_t id = granted.front();
        granted.pop_front();
        const Request& r = wl_[static_cast<size_t>(id)];
        PrefillCmd c{static_cast<int64_t>(Cmd::kRun), id, r.input_len, r.output_len};
        broadcast(c);
        RequestRecord& rec = records_[static_cast<size_t>(id)];
        rec.prefill_start_s = clock_.now();
        PrefillResultOrError res = prefill(r);
        rec.prefill_end_s = clock_.now();
        if (res.ok) {
          if (has_fault(o_, Fault::Kind::kDropCompletion, id, -1)) {
            log_transition(o_, "prefill", id, "fault: completion message dropped");
          } else {
            ch_->send(make_ctrl(CtrlType::kKvDone, id, res.out.first_token, 0, rec.prefill_end_s));
          }
          rec.tokens = {res.out.first_token};
          if (o_.check) rec.hidden = res.out.last_hidden;
          log_transition(o_, "prefill", id, "sent");
        } else {
          ch_->send(make_ctrl(CtrlType::kPrefillFailed, id, 0, 0, rec.prefill_end_s, res.error));
          fail(id, res.error);
        }
        ++finished;
      } else {
        sender_.poll();
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        if (group_->size() > 1 && clock_.now() - last_idle_cmd > 0.002) {
          PrefillCmd c{static_cast<int64_t>(Cmd::kIdle)};
          broadcast(c);
          last_idle_cmd = clock_.now();
        }
      }
      if (o_.progress && clock_.now() - last_progress >= 2.0) {
        last_progress = clock_.now();
        std::fprintf(
            stderr,
            "[distattn-serve] disagg t=%.1f s: %lld/%zu requests prefilled, %zu granted waiting\n",
            last_progress, static_cast<long long>(finished), wl_.size(), granted.size());
      }
    }
    PrefillCmd stop{static_cast<int64_t>(Cmd::kStop)};
    broadcast(stop);
    ch_->flush();
  }

  void follower_loop() {
    for (;;) {
      PrefillCmd c;
      broadcast(c);
      if (c.cmd == static_cast<int64_t>(Cmd::kStop)) return;
      if (c.cmd == static_cast<int64_t>(Cmd::kIdle)) {
        sender_.poll();
        continue;
      }
      const PrefillResultOrError res = prefill(wl_[static_cast<size_t>(c.request)]);
      (void)res;  // the leader reports the outcome (every rank of the group sees the same)
    }
  }

  PrefillResultOrError prefill(const Request& r) {
    maybe_die(o_, world_rank_, r.id);
    const int me = group_->rank();
    const std::vector<int32_t> tokens =
        prompt_tokens(spec_.seed, r.id, r.input_len, o_.model.vocab);
    const KvGeometry g = o_.model.geometry(o_.decode.page_size);
    const TransferPlan plan = make_transfer_plan(g, o_.prefill, o_.decode.layout, r.input_len);
    int64_t layers_sent = 0;
    const bool rotate =
        g.family == ModelFamily::kMla && o_.decode.layout.sharding == DecodeSharding::kTpla;
    // The token block this rank sends (MLA: token range `me` of P).
    int64_t tb = r.input_len, te = 0;
    for (const TransferSegment& s : plan.segments)
      if (s.src == me && s.layer == 0) {
        tb = std::min(tb, s.block.token_begin);
        te = std::max(te, s.block.token_end);
      }
    KvSink sink = [&](int64_t layer, const LayerKv& kv) {
      if (rotate && te > tb) {
        // c_hat = c U for the rows this rank sends; k_pe unchanged.
        const TensorView& k = kv.view.k;
        Tensor rows = Tensor::empty({k.size(0), g.latent + g.rope}, DType::kFloat32);
        const int64_t n = te - tb;
        ops::matmul(k.slice(0, tb, n).slice(1, 0, g.latent), rot_[static_cast<size_t>(layer)],
                    rows.view().slice(0, tb, n).slice(1, 0, g.latent));
        ops::tensor_copy(rows.view().slice(0, tb, n).slice(1, g.latent, g.rope),
                         k.slice(0, tb, n).slice(1, g.latent, g.rope));
        sender_.send_layer(plan, me, layer, r.id, LayerKv{{rows, TensorView{}}, rows, Tensor()});
      } else {
        sender_.send_layer(plan, me, layer, r.id, kv);
      }
      layers_sent = layer + 1;
    };
    PrefillHooks hooks;
    hooks.progress = [&] {
      sender_.poll();
      if (ch_) ch_->heartbeat();
    };
    hooks.before_layer = [&](int64_t layer) {
      for (const Fault& f : o_.faults)
        if (f.kind == Fault::Kind::kPrefillThrow && f.request == r.id && f.rank == me &&
            f.layer == layer)
          DISTATTN_THROW(Status::kInternal, "injected fault (prefill-throw) in request ", r.id);
    };
    PrefillResultOrError res;
    try {
      res.out = model_.run(tokens, sink, hooks);
      res.ok = true;
    } catch (const RequestFailure& e) {
      // Every rank of the group is here (the failure was agreed on): complete the message
      // sequence of the granted transfer with fillers so the channel stays in order.
      for (int64_t l = layers_sent; l < g.layers; ++l) sender_.send_fillers(plan, me, l, r.id);
      res.error = e.message();
    }
    return res;
  }

  const EngineOptions& o_;
  const WorkloadSpec& spec_;
  const std::vector<Request>& wl_;
  std::shared_ptr<comm::Communicator> group_;
  PrefillModel model_;
  KvSender sender_;
  std::vector<Tensor> rot_;
  int world_rank_;
  const RunClock& clock_;
  std::unique_ptr<CtrlChannel> ch_;
  std::vector<RequestRecord> records_;
  int64_t failures_ = 0;
};

// ---- the decode side -------------------------------------------------------------------------

class DecodeSide {
 public:
  DecodeSide(const EngineOptions& o, std::shared_ptr<comm::Communicator> group,
             std::shared_ptr<comm::Communicator> model_group, comm::Communicator& kv,
             comm::Communicator* ctrl, std::vector<parallel::TplaReparam> rps, int world_rank,
             const RunClock& clock, size_t n_requests)
      : o_(o),
        group_(group),
        kv_(kv),
        eng_(o, std::move(model_group), std::move(rps)),
        world_rank_(world_rank),
        clock_(clock) {
    if (group_->rank() == 0) ch_ = std::make_unique<CtrlChannel>(*ctrl, 0, "prefill leader");
    records_.resize(n_requests);
  }

  void run() {
    const bool leader = group_->rank() == 0;
    bool exit = false, no_more = false, drained_sent = false;
    double last_progress = 0;
    while (!exit) {
      // 1. The leader gathers this step's events.
      StepSync sync;
      if (leader) gather_events(sync, no_more, drained_sent);
      // 2. Every rank applies the same events.
      if (group_->size() > 1) group_->broadcast(&sync, &sync, sizeof(sync), DType::kUInt8, 0);
      bool changed = sync.count > 0;
      for (int i = 0; i < sync.count; ++i) {
        const Event& e = sync.ev[i];
        if (static_cast<Ev>(e.type) == Ev::kExit) exit = true;
        if (static_cast<Ev>(e.type) == Ev::kNoMore) no_more = true;
        apply(e);
      }
      // 3. Admission of the head of the queue (all-or-nothing over the ranks) and the
      //    arrival of transfers, agreed on in one all-reduce.
      // At most --transfer-window granted requests wait for their prefill and KV at a time:
      // pages are reserved just ahead of the prefill, not for the whole queue.
      DecodeRequest* head =
          waiting_.empty() || window_full() ? nullptr : reqs_.at(waiting_.front()).get();
      if (head != nullptr && head->pages.empty()) {
        const bool refuse = has_fault(o_, Fault::Kind::kRefuse, head->id, -1) &&
                            refusing_rank(head->id) == eng_.rank();
        if (!refuse) {
          std::optional<std::vector<int32_t>> pages =
              eng_.pool().allocate(eng_.pages_needed(*head));
          if (pages) head->pages = std::move(*pages);
        }
      }
      std::vector<int32_t> flags;
      flags.push_back(
          head == nullptr
              ? 0
              : (head->pages.empty() && eng_.pages_needed(*head) > 0 ? eng_.rank() : INT32_MAX));
      for (int64_t id : transferring_) {
        DecodeRequest& r = *reqs_.at(id);
        flags.push_back(!r.receiver || r.receiver->poll(eng_.pool(), r.pages) ? 1 : 0);
      }
      if (group_->size() > 1)
        group_->all_reduce(flags.data(), flags.data(), flags.size(), DType::kInt32,
                           comm::ReduceOp::kMin);
      // Arrivals first: the flags list the transfers in flight before this step's grant.
      changed |= arrivals(flags);
      if (head != nullptr) changed |= admit(*head, flags[0]);
      // 4. Join, decode, finish.
      while (!ready_.empty() && static_cast<int64_t>(running_.size()) < o_.max_batch) {
        DecodeRequest& r = *reqs_.at(ready_.front());
        ready_.pop_front();
        r.state = DecodeRequest::State::kRunning;
        running_.push_back(&r);
        changed = true;
      }
      if (!running_.empty()) {
        step();
        changed = true;
      }
      if (leader && o_.progress && clock_.now() - last_progress >= 2.0) {
        last_progress = clock_.now();
        std::fprintf(stderr,
                     "[distattn-serve] decode t=%.1f s: %lld done, %zu running, %zu ready, %zu "
                     "transferring, %zu waiting, %lld/%lld pages free\n",
                     last_progress, static_cast<long long>(done_), running_.size(), ready_.size(),
                     transferring_.size(), waiting_.size(),
                     static_cast<long long>(eng_.pool().free_pages()),
                     static_cast<long long>(eng_.pool().num_pages()));
      }
      if (!changed) std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (ch_) ch_->flush();
  }

  std::vector<RequestRecord>& records() { return records_; }
  int64_t failures() const { return failures_; }
  int64_t pages_in_use() const { return eng_.pool().used_pages(); }

 private:
  bool window_full() const {
    return static_cast<int64_t>(transferring_.size()) >= o_.transfer_window;
  }

  int refusing_rank(int64_t id) const {
    for (const Fault& f : o_.faults)
      if (f.kind == Fault::Kind::kRefuse && f.request == id)
        return f.rank >= 0 ? f.rank : o_.decode.layout.ranks - 1;
    return -1;
  }

  void push(StepSync& s, Ev type, int64_t request, int64_t a = 0, int64_t b = 0, double t = 0) {
    DISTATTN_CHECK_STATUS(s.count < kMaxEvents, Status::kInternal, "decode: too many events");
    Event& e = s.ev[s.count++];
    e.type = static_cast<int32_t>(type);
    e.request = request;
    e.a = a;
    e.b = b;
    e.t = t;
  }

  // Leader: control messages and timers become this step's events.
  void gather_events(StepSync& s, bool no_more, bool& drained_sent) {
    const double now = clock_.now();
    // Leave room for the timer events below.
    while (s.count < kMaxEvents - 8) {
      std::optional<CtrlMsg> m = ch_->poll(CtrlType::kBye);
      if (!m) break;
      switch (static_cast<CtrlType>(m->type)) {
        case CtrlType::kAnnounce: {
          // A request that can never fit is refused at once (the pool has kv_pages pages).
          int64_t worst = 0;
          DecodeRequest probe;
          probe.input_len = m->a;
          probe.output_len = m->b;
          for (int r = 0; r < o_.decode.layout.ranks; ++r)
            worst = std::max(worst, decode_pages_needed(o_.model.geometry(o_.decode.page_size),
                                                        o_.decode.layout, r, m->a + m->b));
          push(s, Ev::kAnnounce, m->request, m->a, m->b, now);
          if (worst > o_.kv_pages) {
            reasons_[m->request] = ::distattn::detail::concat(
                "needs ", worst, " pages per decode rank but --kv-pages is ", o_.kv_pages);
            push(s, Ev::kRefuse, m->request, -1);
          }
          break;
        }
        case CtrlType::kKvDone:
          push(s, Ev::kKvDone, m->request, m->a, 0, m->t);
          break;
        case CtrlType::kPrefillFailed:
          reasons_[m->request] = ctrl_text(*m);
          push(s, Ev::kPrefillFailed, m->request);
          break;
        case CtrlType::kNoMore:
          push(s, Ev::kNoMore, -1);
          break;
        case CtrlType::kBye:
          push(s, Ev::kExit, -1);
          break;
        default:
          DISTATTN_THROW(Status::kInternal, "decode leader: unexpected control message ", m->type);
      }
    }
    // Timers: the admission wait of the queue's head, the KV wait of granted requests.
    if (!waiting_.empty()) {
      // The admission wait counts from when the request reached the head of the queue (the
      // requests behind a blocked head are not the ones without room).
      const DecodeRequest& h = *reqs_.at(waiting_.front());
      if (h.id != head_id_ || window_full()) {
        // A new head, or one held back by the transfer window (not by missing pages).
        head_id_ = h.id;
        head_since_ = now;
      }
      if (now - head_since_ > o_.admission_timeout_s && !refused_sent_.count(h.id)) {
        refused_sent_.insert(h.id);
        reasons_[h.id] = ::distattn::detail::concat("no room for ", h.input_len + h.output_len,
                                                    " tokens within ", o_.admission_timeout_s * 1e3,
                                                    " ms (decode rank ", h.failing_rank,
                                                    " could not reserve its pages)");
        push(s, Ev::kRefuse, h.id, h.failing_rank);
      }
    }
    for (int64_t id : transferring_) {
      const DecodeRequest& r = *reqs_.at(id);
      // The completion or the KV itself (a receive still open) not in by the deadline.
      if ((!r.completion || r.receiver) && !r.prefill_failed && !r.timed_out &&
          now - r.t_grant > o_.kv_timeout_s && !timeout_sent_.count(id) &&
          s.count < kMaxEvents - 1) {
        timeout_sent_.insert(id);
        reasons_[id] =
            ::distattn::detail::concat("the KV transfer or its completion message did not ",
                                       "arrive within ", o_.kv_timeout_s * 1e3, " ms");
        push(s, Ev::kTimeout, id);
      }
    }
    if (no_more && !drained_sent && reqs_.size() == done_ && s.count == 0) {
      ch_->send(make_ctrl(CtrlType::kDrained, -1), /*last=*/true);
      drained_sent = true;
    }
  }

  void apply(const Event& e) {
    const Ev type = static_cast<Ev>(e.type);
    if (type == Ev::kNoMore || type == Ev::kExit) return;
    if (type == Ev::kAnnounce) {
      auto r = std::make_unique<DecodeRequest>();
      r->id = e.request;
      r->input_len = e.a;
      r->output_len = e.b;
      r->t_announce = e.t;
      r->record.id = e.request;
      r->record.input_len = e.a;
      r->record.output_len = e.b;
      waiting_.push_back(e.request);
      reqs_[e.request] = std::move(r);
      log_transition(o_, "decode", e.request, "waiting for pages");
      return;
    }
    DecodeRequest& r = *reqs_.at(e.request);
    switch (type) {
      case Ev::kKvDone:
        r.completion = true;
        r.last_token = static_cast<int32_t>(e.a);
        r.record.prefill_end_s = e.t;
        break;
      case Ev::kPrefillFailed:
        r.prefill_failed = true;
        break;
      case Ev::kTimeout:
        r.timed_out = true;
        break;
      case Ev::kRefuse: {
        // Only a waiting request can be refused.
        if (r.state != DecodeRequest::State::kWaiting) break;
        waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r.id));
        if (!r.pages.empty()) eng_.pool().release(r.pages);
        r.pages.clear();
        finish(r, false, reason(r.id));
        if (group_->rank() == 0)
          ch_->send(make_ctrl(CtrlType::kRefuse, r.id, 0, 0, 0, reason(r.id)));
        break;
      }
      default:
        break;
    }
  }

  // The admission decision for the queue's head (flag = INT32_MAX: every rank has its pages).
  bool admit(DecodeRequest& r, int32_t flag) {
    if (r.state != DecodeRequest::State::kWaiting) return false;
    if (flag != INT32_MAX) {
      // Someone had no room: give back what this rank reserved and wait.
      if (!r.pages.empty()) eng_.pool().release(r.pages);
      r.pages.clear();
      r.failing_rank = flag;
      return false;
    }
    waiting_.pop_front();
    r.state = DecodeRequest::State::kTransferring;
    r.t_grant = clock_.now();
    r.plan = std::make_shared<TransferPlan>(make_transfer_plan(
        o_.model.geometry(o_.decode.page_size), o_.prefill, o_.decode.layout, r.input_len));
    r.receiver = std::make_unique<KvReceiver>(kv_, r.plan, eng_.rank(), r.id, eng_.pool(), r.pages,
                                              eng_.staging, eng_.transfer_stream());
    // The transfer holds its own reference until every message is in.
    eng_.pool().retain(r.pages);
    transferring_.push_back(r.id);
    r.length = r.input_len;
    r.emitted = 0;
    if (group_->rank() == 0) ch_->send(make_ctrl(CtrlType::kGrant, r.id));
    log_transition(o_, "decode", r.id, "granted", std::to_string(r.pages.size()) + " pages");
    return true;
  }

  bool arrivals(const std::vector<int32_t>& flags) {
    bool changed = false;
    std::vector<int64_t> still;
    for (size_t i = 0; i < transferring_.size(); ++i) {
      DecodeRequest& r = *reqs_.at(transferring_[i]);
      const bool all_in = flags[i + 1] == 1;
      // Timed out with KV messages still open: the KV channel lost a message (a prefill rank
      // died or a message was dropped). Later messages would land in the wrong receives, so
      // this is the job's failure, not the request's (every decode rank sees the same flags).
      DISTATTN_CHECK_STATUS(!(r.timed_out && r.receiver && !all_in), Status::kTimeout,
                            "serving: the KV of request ", r.id, " did not reach every decode ",
                            "rank within ", o_.kv_timeout_s * 1e3, " ms of its grant: the KV ",
                            "channel lost a message; ending the job");
      if (all_in && r.receiver) {
        // Every write into the pages is done: the transfer's reference goes.
        eng_.pool().release(r.pages);
        r.record.kv_ready_s = clock_.now();
        r.receiver.reset();
        changed = true;
      }
      if (r.receiver == nullptr && (r.prefill_failed || r.timed_out)) {
        eng_.pool().release(r.pages);
        r.pages.clear();
        finish(r, false, reason(r.id));
        if (group_->rank() == 0 && r.timed_out)
          ch_->send(make_ctrl(CtrlType::kDecodeFailed, r.id, 0, 0, 0, reason(r.id)));
        changed = true;
        continue;
      }
      if (r.receiver == nullptr && r.completion) {
        r.state = DecodeRequest::State::kReady;
        // The first token (from the prefill) reaches the client now.
        emit(r, r.last_token, nullptr);
        if (r.emitted >= r.output_len) {
          eng_.pool().release(r.pages);
          r.pages.clear();
          finish(r, true, "");
        } else {
          ready_.push_back(r.id);
        }
        changed = true;
        continue;
      }
      still.push_back(r.id);
    }
    transferring_ = std::move(still);
    return changed;
  }

  void emit(DecodeRequest& r, int32_t token, const float* hidden) {
    ++r.emitted;
    if (group_->rank() != 0) return;
    r.record.token_times.push_back(clock_.now());
    r.record.tokens.push_back(token);
    if (o_.check && hidden != nullptr)
      r.record.hidden.insert(r.record.hidden.end(), hidden, hidden + o_.model.hidden);
  }

  void step() {
    for (DecodeRequest* r : running_) maybe_die(o_, world_rank_, r->id);
    const DecodeOutput out = eng_.step(running_, [&] {
      for (int64_t id : transferring_) {
        DecodeRequest& r = *reqs_.at(id);
        if (r.receiver) r.receiver->poll(eng_.pool(), r.pages);
      }
    });
    std::vector<DecodeRequest*> still;
    for (size_t i = 0; i < running_.size(); ++i) {
      DecodeRequest& r = *running_[i];
      r.length += 1;
      r.last_token = out.next_tokens[i];
      emit(r, r.last_token, out.hidden.data() + i * o_.model.hidden);
      if (r.emitted >= r.output_len) {
        eng_.pool().release(r.pages);
        r.pages.clear();
        finish(r, true, "");
      } else {
        still.push_back(&r);
      }
    }
    running_ = std::move(still);
  }

  void finish(DecodeRequest& r, bool ok, const std::string& why) {
    r.state = DecodeRequest::State::kDone;
    ++done_;
    if (!ok) ++failures_;
    log_transition(o_, "decode", r.id, ok ? "completed" : "failed", why);
    if (group_->rank() != 0) return;
    RequestRecord rec = std::move(r.record);
    rec.completed = ok;
    rec.reason = why;
    records_[static_cast<size_t>(r.id)] = std::move(rec);
  }

  std::string reason(int64_t id) const {
    auto it = reasons_.find(id);
    return it != reasons_.end() ? it->second : "failed on the decode side";
  }

  const EngineOptions& o_;
  std::shared_ptr<comm::Communicator> group_;
  comm::Communicator& kv_;
  DecodeEngine eng_;
  int world_rank_;
  const RunClock& clock_;
  std::unique_ptr<CtrlChannel> ch_;
  std::map<int64_t, std::unique_ptr<DecodeRequest>> reqs_;
  std::deque<int64_t> waiting_, ready_;
  std::vector<int64_t> transferring_;
  std::vector<DecodeRequest*> running_;
  size_t done_ = 0;
  int64_t failures_ = 0;
  std::map<int64_t, std::string> reasons_;  // leader
  std::set<int64_t> refused_sent_, timeout_sent_;
  int64_t head_id_ = -1;  // leader: the queue's head and since when it has been the head
  double head_since_ = 0;
  std::vector<RequestRecord> records_;
};

}  // namespace

RunResult run_disaggregated(comm::Communicator& world, const EngineOptions& opts,
                            const std::vector<Request>& workload, const WorkloadSpec& spec,
                            const Slo& slo) {
  validate(opts, world.size());
  const int P = opts.prefill.ranks, D = opts.decode.layout.ranks;
  const int wr = world.rank();
  const bool prefill = wr < P;
  for (size_t i = 0; i < workload.size(); ++i)
    DISTATTN_CHECK(workload[i].id == static_cast<int64_t>(i),
                   "run_disaggregated: request ids must "
                   "be 0..N-1 in order");
  // Communicators: the two groups, the control channel and the KV channel (separate
  // communicators, so a posted control receive never matches a KV message).
  std::shared_ptr<comm::Communicator> group(world.split(prefill ? 0 : 1, wr));
  std::unique_ptr<comm::Communicator> ctrl = world.split(0, wr);
  std::shared_ptr<comm::Communicator> self(world.split(wr, 0));
  // GPU ranks: the model's collectives and the KV channel over device memory (NCCL, or MPI
  // staging); CPU ranks: the host world serves for both.
  std::unique_ptr<comm::Communicator> device_world;
  if (opts.device.is_cuda()) device_world = comm::create_world(opts.backend, opts.device);
  comm::Communicator& data_world = device_world ? *device_world : world;
  std::shared_ptr<comm::Communicator> model_group =
      device_world ? std::shared_ptr<comm::Communicator>(data_world.split(prefill ? 0 : 1, wr))
                   : group;
  std::unique_ptr<comm::Communicator> kv = data_world.split(0, wr);

  // TPLA: each side derives the rotation and mu from the seed on its own; the handshake
  // checks that they agree.
  std::vector<parallel::TplaReparam> reparams;
  if (opts.model.family == ModelFamily::kMla &&
      opts.decode.layout.sharding == DecodeSharding::kTpla)
    reparams = make_tpla_reparams(opts.model, opts.decode, self);

  // Handshake between the leaders (world ranks 0 and P), before any KV byte moves.
  {
    const Handshake mine = make_handshake(opts, prefill ? 0 : 1, reparams);
    std::vector<char> verdict(1024, 0);
    if (wr == 0 || wr == P) {
      const std::vector<uint8_t> out = mine.serialize();
      std::vector<uint8_t> in(out.size());
      const int peer = wr == 0 ? P : 0;
      const comm::P2POp ops[] = {comm::P2POp::send(out.data(), out.size(), DType::kUInt8, peer),
                                 comm::P2POp::recv(in.data(), in.size(), DType::kUInt8, peer)};
      ctrl->group(ops);
      const Handshake theirs = Handshake::parse(in);
      const auto mm = prefill ? compare_handshakes(mine, theirs) : compare_handshakes(theirs, mine);
      if (!mm.empty()) {
        const std::string msg = describe_mismatches(mm);
        std::strncpy(verdict.data(), msg.c_str(), verdict.size() - 1);
      }
    }
    if (group->size() > 1)
      group->broadcast(verdict.data(), verdict.data(), verdict.size(), DType::kUInt8, 0);
    if (verdict[0] != 0) {
      const comm::LedgerEntry e = kv->ledger().total();
      int64_t kv_bytes = static_cast<int64_t>(e.bytes_sent + e.bytes_recv);
      world.all_reduce(&kv_bytes, &kv_bytes, 1, DType::kInt64, comm::ReduceOp::kSum);
      throw HandshakeError(verdict.data(), kv_bytes);
    }
  }

  RunClock clock;
  std::unique_ptr<PrefillSide> ps;
  std::unique_ptr<DecodeSide> ds;
  if (prefill)
    ps = std::make_unique<PrefillSide>(opts, spec, workload, group, model_group, *kv, ctrl.get(),
                                       reparams, wr, clock);
  else
    ds = std::make_unique<DecodeSide>(opts, group, model_group, *kv, ctrl.get(), reparams, wr,
                                      clock, workload.size());
  world.barrier();
  clock.start();
  if (ps) ps->run();
  if (ds) ds->run();
  world.barrier();

  // Merge the records on world rank 0: the decode leader's (tokens, times) with the
  // front's (arrivals, prefill times, prefill-side failures).
  RunResult res;
  int64_t failures[2] = {ps ? ps->failures() : 0, ds ? ds->failures() : 0};
  if (wr != 0 && wr != P) failures[0] = failures[1] = 0;  // counted once, by the leaders
  world.all_reduce(failures, failures, 2, DType::kInt64, comm::ReduceOp::kSum);
  res.prefill_failures_seen = failures[0];
  res.decode_failures_seen = failures[1];
  if (wr == P) {
    const std::vector<uint8_t> bytes = pack_records(ds->records());
    int64_t n = static_cast<int64_t>(bytes.size());
    ctrl->send(&n, 1, DType::kInt64, 0);
    ctrl->send(bytes.data(), bytes.size(), DType::kUInt8, 0);
  }
  if (wr == 0) {
    int64_t n = 0;
    ctrl->recv(&n, 1, DType::kInt64, P);
    std::vector<uint8_t> bytes(static_cast<size_t>(n));
    ctrl->recv(bytes.data(), bytes.size(), DType::kUInt8, P);
    std::vector<RequestRecord> dec = unpack_records(bytes);
    res.records = std::move(ps->records());
    for (RequestRecord& d : dec) {
      if (d.id < 0 || d.id >= static_cast<int64_t>(res.records.size())) continue;
      RequestRecord& r = res.records[static_cast<size_t>(d.id)];
      const bool prefill_ok = r.completed;
      const std::string prefill_reason = r.reason;
      const std::vector<float> first_hidden = r.hidden;
      r.token_times = std::move(d.token_times);
      r.tokens = std::move(d.tokens);
      r.kv_ready_s = d.kv_ready_s;
      r.completed = prefill_ok && d.completed;
      r.reason = !prefill_reason.empty() ? prefill_reason : d.reason;
      // Hidden states: the prefill's (first token), then the decode steps'.
      r.hidden = first_hidden;
      r.hidden.insert(r.hidden.end(), d.hidden.begin(), d.hidden.end());
    }
  }
  // KV bytes per rank (ledger of the KV channel), pages and buffers still held.
  std::vector<int64_t> bytes(static_cast<size_t>(2 * world.size()));
  const comm::LedgerEntry kvt = kv->ledger().total();
  const int64_t mine[2] = {static_cast<int64_t>(kvt.bytes_sent),
                           static_cast<int64_t>(kvt.bytes_recv)};
  world.all_gather(mine, bytes.data(), 2, DType::kInt64);
  int64_t leaked = ps ? ps->buffers_in_use() : ds->pages_in_use();
  world.all_reduce(&leaked, &leaked, 1, DType::kInt64, comm::ReduceOp::kSum);
  RunMetrics& m = res.metrics;
  m.mode = "disagg";
  m.model = family_name(opts.model.family);
  m.prefill_ranks = P;
  m.decode_ranks = D;
  m.prefill_sharding = prefill_sharding_name(opts.prefill.sharding);
  m.decode_sharding = decode_sharding_name(opts.decode.layout.sharding);
  m.rate = spec.rate;
  m.kv_pages_leaked = leaked;
  for (int r = 0; r < P; ++r) res.kv_bytes_sent.push_back(bytes[static_cast<size_t>(2 * r)]);
  for (int r = P; r < P + D; ++r)
    res.kv_bytes_received.push_back(bytes[static_cast<size_t>(2 * r + 1)]);
  if (opts.check) m.max_rel_err = check_records(world, opts, spec, res.records);
  if (wr == 0) {
    compute_metrics(res.records, slo, m);
    double window = 0, exposed = 0;
    int64_t n = 0;
    for (const RequestRecord& r : res.records) {
      if (std::isnan(r.kv_ready_s) || std::isnan(r.prefill_start_s)) continue;
      window += r.kv_ready_s - r.prefill_start_s;
      exposed += std::max(0.0, r.kv_ready_s - r.prefill_end_s);
      ++n;
    }
    for (int64_t b : res.kv_bytes_received) m.kv_transfer_bytes += b;
    m.kv_transfer_s = window;
    m.kv_transfer_gbps = window > 0 ? static_cast<double>(m.kv_transfer_bytes) / window / 1e9 : 0;
    m.kv_exposed_ms = n > 0 ? exposed / static_cast<double>(n) * 1e3 : 0;
  }
  return res;
}

}  // namespace distattn::serving
