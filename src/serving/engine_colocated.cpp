// The colocated baseline (distattn/serving/engine.h: run_colocated): every rank prefills and
// decodes, one head-parallel group, prefills scheduled before decode steps.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <thread>

#include "distattn/core/error.h"
#include "src/serving/engine_internal.h"

namespace distattn::serving {

using namespace detail;

namespace {

enum class CoCmd : int64_t { kIdle = 0, kPrefill, kDecode, kRefuse, kExit };
struct CoSync {
  int64_t cmd = 0;
  int64_t request = -1;
};

}  // namespace

RunResult run_colocated(comm::Communicator& world, const EngineOptions& opts,
                        const std::vector<Request>& workload, const WorkloadSpec& spec,
                        const Slo& slo) {
  const int w = world.size(), wr = world.rank();
  EngineOptions co = opts;
  co.prefill = PrefillLayout{PrefillSharding::kHeads, w, 1};
  co.decode.layout = DecodeLayout{
      opts.model.family == ModelFamily::kGqa ? DecodeSharding::kHeads : DecodeSharding::kMlaTp, w,
      0};
  co.faults.clear();
  DISTATTN_CHECK(co.kv_pages >= 1 && co.max_batch >= 1,
                 "colocated: --kv-pages and --max-batch "
                 "must be >= 1");
  for (size_t i = 0; i < workload.size(); ++i)
    DISTATTN_CHECK(workload[i].id == static_cast<int64_t>(i),
                   "run_colocated: request ids must be 0..N-1 in order");
  std::shared_ptr<comm::Communicator> group(world.split(0, wr));
  // GPU ranks: the models' collectives over device memory; control on the host world.
  std::shared_ptr<comm::Communicator> model_group = group;
  if (co.device.is_cuda())
    model_group = std::shared_ptr<comm::Communicator>(
        comm::create_world(co.backend, co.device)->split(0, wr));
  PrefillModel prefill(co.model, co.prefill, model_group, group, co.device);
  DecodeEngine eng(co, model_group, {});
  const KvGeometry g = co.model.geometry(co.decode.page_size);
  const bool leader = wr == 0;

  std::vector<DecodeRequest> reqs(workload.size());
  for (const Request& r : workload) {
    DecodeRequest& d = reqs[static_cast<size_t>(r.id)];
    d.id = r.id;
    d.input_len = r.input_len;
    d.output_len = r.output_len;
    d.record.id = r.id;
    d.record.arrival_s = r.arrival_s;
    d.record.input_len = r.input_len;
    d.record.output_len = r.output_len;
  }
  std::vector<const Request*> by_arrival;
  for (const Request& r : workload) by_arrival.push_back(&r);
  std::stable_sort(by_arrival.begin(), by_arrival.end(),
                   [](const Request* a, const Request* b) { return a->arrival_s < b->arrival_s; });
  size_t next = 0, done = 0;
  std::deque<int64_t> waiting;
  std::vector<DecodeRequest*> running;
  int64_t failures = 0;
  RunClock clock;
  world.barrier();
  clock.start();
  double last_progress = 0;

  auto emit = [&](DecodeRequest& r, int32_t token, const float* hidden) {
    ++r.emitted;
    if (!leader) return;
    r.record.token_times.push_back(clock.now());
    r.record.tokens.push_back(token);
    if (co.check && hidden != nullptr)
      r.record.hidden.insert(r.record.hidden.end(), hidden, hidden + co.model.hidden);
  };
  auto finish = [&](DecodeRequest& r, bool ok, const std::string& why) {
    if (!r.pages.empty()) eng.pool().release(r.pages);
    r.pages.clear();
    r.state = DecodeRequest::State::kDone;
    r.record.completed = ok;
    r.record.reason = why;
    if (!ok) ++failures;
    ++done;
    log_transition(co, "colocated", r.id, ok ? "completed" : "failed", why);
  };

  for (;;) {
    CoSync s;
    if (leader) {
      const double now = clock.now();
      while (next < by_arrival.size() && by_arrival[next]->arrival_s <= now)
        waiting.push_back(by_arrival[next++]->id);
      if (!waiting.empty() && static_cast<int64_t>(running.size()) < co.max_batch) {
        DecodeRequest& h = reqs[static_cast<size_t>(waiting.front())];
        const int64_t need = eng.pages_needed(h);
        if (need > eng.pool().num_pages()) {
          s = {static_cast<int64_t>(CoCmd::kRefuse), h.id};
        } else if (need <= eng.pool().free_pages()) {
          s = {static_cast<int64_t>(CoCmd::kPrefill), h.id};
        }
      }
      if (s.cmd == static_cast<int64_t>(CoCmd::kIdle)) {
        if (!running.empty())
          s.cmd = static_cast<int64_t>(CoCmd::kDecode);
        else if (next == by_arrival.size() && waiting.empty())
          s.cmd = static_cast<int64_t>(CoCmd::kExit);
      }
      if (s.cmd == static_cast<int64_t>(CoCmd::kPrefill) ||
          s.cmd == static_cast<int64_t>(CoCmd::kRefuse))
        waiting.pop_front();
    }
    if (w > 1) group->broadcast(&s, &s, sizeof(s), DType::kUInt8, 0);
    const auto cmd = static_cast<CoCmd>(s.cmd);
    if (cmd == CoCmd::kExit) break;
    if (cmd == CoCmd::kIdle) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      continue;
    }
    if (cmd == CoCmd::kRefuse) {
      finish(
          reqs[static_cast<size_t>(s.request)], false,
          ::distattn::detail::concat("needs more than the ", co.kv_pages, " pages of --kv-pages"));
      continue;
    }
    if (cmd == CoCmd::kPrefill) {
      DecodeRequest& r = reqs[static_cast<size_t>(s.request)];
      std::optional<std::vector<int32_t>> pages = eng.pool().allocate(eng.pages_needed(r));
      DISTATTN_CHECK_STATUS(pages.has_value(), Status::kInternal,
                            "colocated: ranks disagree about free pages");
      r.pages = std::move(*pages);
      r.record.prefill_start_s = clock.now();
      const std::vector<int32_t> tokens =
          prompt_tokens(spec.seed, r.id, r.input_len, co.model.vocab);
      const PrefillOutput out = prefill.run(tokens, [&](int64_t layer, const LayerKv& kv) {
        write_local_kv(g, layer, r.input_len, kv.view, eng.pool(), r.pages);
      });
      r.record.prefill_end_s = r.record.kv_ready_s = clock.now();
      r.length = r.input_len;
      r.last_token = out.first_token;
      emit(r, out.first_token, out.last_hidden.data());
      if (r.emitted >= r.output_len) {
        finish(r, true, "");
      } else {
        r.state = DecodeRequest::State::kRunning;
        running.push_back(&r);
      }
    } else {
      const DecodeOutput out = eng.step(running, {});
      std::vector<DecodeRequest*> still;
      for (size_t i = 0; i < running.size(); ++i) {
        DecodeRequest& r = *running[i];
        r.length += 1;
        r.last_token = out.next_tokens[i];
        emit(r, r.last_token, out.hidden.data() + i * co.model.hidden);
        if (r.emitted >= r.output_len)
          finish(r, true, "");
        else
          still.push_back(&r);
      }
      running = std::move(still);
    }
    if (leader && co.progress && clock.now() - last_progress >= 2.0) {
      last_progress = clock.now();
      std::fprintf(stderr,
                   "[distattn-serve] colocated t=%.1f s: %zu/%zu done, %zu running, %zu "
                   "waiting\n",
                   last_progress, done, reqs.size(), running.size(), waiting.size());
    }
  }
  world.barrier();

  RunResult res;
  if (leader)
    for (DecodeRequest& r : reqs) res.records.push_back(std::move(r.record));
  int64_t leaked = eng.pool().used_pages();
  world.all_reduce(&leaked, &leaked, 1, DType::kInt64, comm::ReduceOp::kSum);
  res.decode_failures_seen = res.prefill_failures_seen = leader ? failures : 0;
  RunMetrics& m = res.metrics;
  m.mode = "colocated";
  m.model = family_name(co.model.family);
  m.prefill_ranks = opts.prefill.ranks;
  m.decode_ranks = opts.decode.layout.ranks;
  m.prefill_sharding = prefill_sharding_name(co.prefill.sharding);
  m.decode_sharding = decode_sharding_name(co.decode.layout.sharding);
  m.rate = spec.rate;
  m.kv_pages_leaked = leaked;
  if (co.check) m.max_rel_err = check_records(world, co, spec, res.records);
  if (leader) compute_metrics(res.records, slo, m);
  return res;
}

}  // namespace distattn::serving
