// Fault injection (DISTATTN_FAULT): grammar and semantics in fault.h.
#include "src/comm/fault.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>

#include "distattn/core/error.h"
#include "distattn/core/tensor_view.h"
#include "distattn/runtime.h"
#include "src/comm/keep_alive.h"

namespace distattn::comm::fault {
namespace {

enum class Action { kDelay, kError, kExit, kHang, kDrop, kCorrupt };

struct Rule {
  Action action = Action::kDelay;
  std::string text;
  int rank = -1;  // -1: every rank
  int op = -1;    // OpKind, or -1: any
  long long at = 1;
  long long ms = -1;
  int code = 3;
  long long by = 1;
  int peer = -1;
  long long seen = 0;  // matching ops so far on this rank
};

constexpr const char* kGrammar =
    "DISTATTN_FAULT=ACTION[:KEY=VALUE,...][;...] with ACTION delay|error|exit|hang|drop|corrupt "
    "and KEY rank|op|at|ms|code|by|peer (see src/comm/fault.h, docs/RELIABILITY.md)";

[[noreturn]] void bad(const std::string& rule, const std::string& why) {
  DISTATTN_THROW(Status::kInvalidArgument, "DISTATTN_FAULT rule '", rule, "': ", why, "; expected ",
                 kGrammar);
}

long long parse_int(const std::string& rule, const std::string& key, const std::string& v,
                    long long lo, long long hi) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || end == v.c_str() || *end != '\0' || errno == ERANGE || x < lo || x > hi)
    bad(rule, key + "=" + v + " is not an integer in [" + std::to_string(lo) + ", " +
                  std::to_string(hi) + "]");
  return x;
}

int parse_op(const std::string& rule, const std::string& v) {
  if (v == "any") return -1;
  for (int k = 0; k < static_cast<int>(OpKind::kCount); ++k)
    if (v == op_kind_name(static_cast<OpKind>(k))) return k;
  bad(rule, "op=" + v +
                " is not an op (all_reduce, all_gather, reduce_scatter, all_to_all, "
                "all_to_all_v, broadcast, send_recv, barrier, any)");
}

Rule parse_rule(const std::string& text) {
  Rule r;
  r.text = text;
  const size_t colon = text.find(':');
  const std::string action = text.substr(0, colon);
  if (action == "delay")
    r.action = Action::kDelay;
  else if (action == "error")
    r.action = Action::kError;
  else if (action == "exit")
    r.action = Action::kExit;
  else if (action == "hang")
    r.action = Action::kHang;
  else if (action == "drop")
    r.action = Action::kDrop;
  else if (action == "corrupt")
    r.action = Action::kCorrupt;
  else
    bad(text, "unknown action '" + action + "' (use delay, error, exit, hang, drop or corrupt)");
  if (colon != std::string::npos) {
    std::stringstream ss(text.substr(colon + 1));
    std::string kv;
    while (std::getline(ss, kv, ',')) {
      const size_t eq = kv.find('=');
      if (eq == std::string::npos) bad(text, "'" + kv + "' is not KEY=VALUE");
      const std::string key = kv.substr(0, eq), v = kv.substr(eq + 1);
      if (key == "rank")
        r.rank = static_cast<int>(parse_int(text, key, v, 0, INT_MAX));
      else if (key == "op")
        r.op = parse_op(text, v);
      else if (key == "at")
        r.at = parse_int(text, key, v, 1, LLONG_MAX);
      else if (key == "ms")
        r.ms = parse_int(text, key, v, 0, 24LL * 3600 * 1000);
      else if (key == "code")
        r.code = static_cast<int>(parse_int(text, key, v, 0, 255));
      else if (key == "by")
        r.by = parse_int(text, key, v, -(1LL << 40), 1LL << 40);
      else if (key == "peer")
        r.peer = static_cast<int>(parse_int(text, key, v, 0, INT_MAX));
      else
        bad(text, "unknown key '" + key + "' (use rank, op, at, ms, code, by, peer)");
    }
  }
  if (r.action == Action::kDelay && r.ms < 0) bad(text, "delay needs ms=N");
  if (r.action == Action::kCorrupt && r.by == 0) bad(text, "corrupt needs by=N with N != 0");
  const bool p2p = r.action == Action::kDrop || r.action == Action::kCorrupt;
  if (p2p) {
    if (r.op != -1 && r.op != static_cast<int>(OpKind::kSendRecv))
      bad(text, action + " applies to send_recv ops only (omit op, or use op=send_recv)");
    r.op = static_cast<int>(OpKind::kSendRecv);
  } else if (r.peer != -1) {
    bad(text, "peer= applies to drop and corrupt only");
  }
  return r;
}

struct Plan {
  std::mutex mu;
  std::vector<Rule> rules;
  std::string error;  // parse error, rethrown by validate_fault_spec()
};

const char* spec() {
  static const char* s = [] {
    const char* v = std::getenv("DISTATTN_FAULT");
    return v != nullptr && *v != '\0' ? v : nullptr;
  }();
  return s;
}

Plan& plan() {
  static Plan* p = [] {
    auto* pl = new Plan;  // never destroyed: ops may run during static destruction
    const char* s = spec();
    if (s == nullptr) return pl;
    try {
      std::stringstream ss(s);
      std::string rule;
      while (std::getline(ss, rule, ';'))
        if (!rule.empty()) pl->rules.push_back(parse_rule(rule));
      if (pl->rules.empty()) bad(s, "no rule");
    } catch (const Error& e) {
      pl->error = e.message();
      pl->rules.clear();
    }
    return pl;
  }();
  return *p;
}

int world_rank() {
  return runtime_initialized() ? runtime_info().rank : error_rank();
}

void say(const std::string& msg) {
  std::fprintf(stderr, "[distattn] DISTATTN_FAULT: %s\n", msg.c_str());
  std::fflush(stderr);
}

class FailingOp final : public PendingOp {
 public:
  FailingOp(std::unique_ptr<PendingOp> inner, Status status, std::string message)
      : inner_(std::move(inner)), status_(status), message_(std::move(message)) {}
  ~FailingOp() override {
    // The inner op may still own buffers MPI or NCCL writes: as for any failed op, keep it.
    detail::keep_forever(std::move(inner_));
  }
  bool test() override { DISTATTN_THROW(status_, message_); }

 private:
  std::unique_ptr<PendingOp> inner_;
  Status status_;
  std::string message_;
};

class OwningOp final : public PendingOp {
 public:
  OwningOp(std::unique_ptr<PendingOp> inner, std::vector<std::shared_ptr<void>> keep)
      : inner_(std::move(inner)), keep_(std::move(keep)) {}
  ~OwningOp() override {
    // Destroyed unfinished only when the op was abandoned: the backend may still read the
    // resized send buffers, so they are never freed.
    if (!finished_) {
      for (auto& k : keep_) detail::keep_forever(std::move(k));
      detail::keep_forever(std::move(inner_));
    }
  }
  bool test() override { return inner_->test(); }
  void finish() override {
    inner_->finish();
    finished_ = true;
  }
  bool enqueue_wait(Stream s) override { return inner_->enqueue_wait(s); }
  void finish_on(Stream s) override {
    inner_->finish_on(s);
    finished_ = true;
  }

 private:
  std::unique_ptr<PendingOp> inner_;
  std::vector<std::shared_ptr<void>> keep_;
  bool finished_ = false;
};

}  // namespace

bool fault_injection_enabled() noexcept {
  static const bool on = spec() != nullptr;
  return on;
}

void validate_fault_spec() {
  if (!fault_injection_enabled()) return;
  Plan& p = plan();
  if (!p.error.empty()) DISTATTN_THROW(Status::kInvalidArgument, p.error);
}

Decision on_op(OpKind kind, const std::string& what) {
  Decision d;
  Plan& p = plan();
  if (!p.error.empty()) DISTATTN_THROW(Status::kInvalidArgument, p.error);
  const int me = world_rank();
  long long delay_ms = 0;
  const Rule* terminal = nullptr;  // exit or hang: performed after the lock is released
  long long terminal_at = 0;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (Rule& r : p.rules) {
      if (r.rank != -1 && r.rank != me) continue;
      if (r.op != -1 && r.op != static_cast<int>(kind)) continue;
      if (++r.seen != r.at) continue;
      switch (r.action) {
        case Action::kDelay:
          delay_ms += r.ms;
          break;
        case Action::kError:
          d.fail = true;
          d.fail_rule = r.text;
          break;
        case Action::kExit:
        case Action::kHang:
          if (terminal == nullptr) {
            terminal = &r;
            terminal_at = r.seen;
          }
          break;
        case Action::kDrop:
          d.drop = true;
          d.drop_peer = r.peer;
          d.p2p_rule = r.text;
          break;
        case Action::kCorrupt:
          d.corrupt_by = r.by;
          d.corrupt_peer = r.peer;
          d.p2p_rule = r.text;
          break;
      }
    }
  }
  if (terminal != nullptr) {
    const std::string where = "rank " + std::to_string(me) + " at its op #" +
                              std::to_string(terminal_at) + " (" + what + ", rule '" +
                              terminal->text + "')";
    if (terminal->action == Action::kExit) {
      say(where + " exits with code " + std::to_string(terminal->code));
      std::_Exit(terminal->code);
    }
    say(where + " hangs");
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  }
  if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
  return d;
}

std::vector<P2POp> rewrite_group(std::span<const P2POp> ops, const Decision& d,
                                 std::vector<std::shared_ptr<void>>& keep) {
  std::vector<P2POp> out;
  out.reserve(ops.size());
  for (const P2POp& op : ops) {
    if (op.kind != P2POp::Kind::kSend) {
      out.push_back(op);
      continue;
    }
    if (d.drop && (d.drop_peer == -1 || d.drop_peer == op.peer)) {
      say("rank " + std::to_string(world_rank()) + " drops a send of " + std::to_string(op.count) +
          " elements to peer " + std::to_string(op.peer) + " (rule '" + d.p2p_rule + "')");
      continue;
    }
    if (d.corrupt_by != 0 && (d.corrupt_peer == -1 || d.corrupt_peer == op.peer)) {
      const long long n = static_cast<long long>(op.count) + d.corrupt_by;
      const size_t count = n > 0 ? static_cast<size_t>(n) : 0;
      P2POp changed = op;
      changed.count = count;
      if (count > op.count) {
        // A longer message needs a buffer that holds it: the original data, then zeros.
        const size_t elt = dtype_size(op.dtype), bytes = count * elt;
        const bool on_device = pointer_device_type(op.buffer) == DeviceType::kCUDA;
        const Device dev = on_device ? runtime_info().device : Device::cpu();
        void* buf = device_alloc(bytes, dev);
        keep.emplace_back(buf, [dev](void* q) { device_free(q, dev); });
        std::vector<unsigned char> zeros(bytes - op.count * elt, 0);
        device_copy(buf, dev, op.buffer, on_device ? dev : Device::cpu(), op.count * elt);
        device_copy(static_cast<char*>(buf) + op.count * elt, dev, zeros.data(), Device::cpu(),
                    zeros.size());
        changed.buffer = buf;
      }
      say("rank " + std::to_string(world_rank()) + " sends " + std::to_string(count) +
          " elements instead of " + std::to_string(op.count) + " to peer " +
          std::to_string(op.peer) + " (rule '" + d.p2p_rule + "')");
      out.push_back(changed);
      continue;
    }
    out.push_back(op);
  }
  return out;
}

std::unique_ptr<PendingOp> failing_op(std::unique_ptr<PendingOp> op, Backend backend,
                                      const std::string& what, int rank, const std::string& rule) {
  const Status st = backend == Backend::kNccl ? Status::kNcclError : Status::kMpiError;
  std::ostringstream os;
  os << what << " on rank " << rank << " failed: injected " << backend_name(backend)
     << " backend error (DISTATTN_FAULT rule '" << rule << "')";
  return std::make_unique<FailingOp>(std::move(op), st, os.str());
}

std::unique_ptr<PendingOp> owning_op(std::unique_ptr<PendingOp> op,
                                     std::vector<std::shared_ptr<void>> keep) {
  if (keep.empty()) return op;
  return std::make_unique<OwningOp>(std::move(op), std::move(keep));
}

}  // namespace distattn::comm::fault
