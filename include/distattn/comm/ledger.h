#pragma once
// Per-communicator accounting of every op: calls, bytes this rank sent and received, time.
// Bytes are the logical payload the algorithm moves to/from *other* ranks:
//   send/recv (group)   the message sizes
//   all_gather          sent = recv = send_count*elt*(n-1)
//   reduce_scatter      sent = recv = recv_count*elt*(n-1)
//   all_to_all(_v)      bytes of the blocks addressed to / received from other ranks
//   all_reduce          sent = recv = 2*(n-1)/n * count*elt (ring reduce-scatter + all-gather)
//   broadcast           root: sent = count*elt*(n-1); others: recv = count*elt
//   barrier             0
// Time is wall-clock from start to observed completion (wait()/test() returning true).
#include <array>
#include <cstdint>
#include <string>

namespace distattn::comm {

enum class OpKind : int {
  kAllReduce = 0,
  kAllGather,
  kReduceScatter,
  kAllToAll,
  kAllToAllV,
  kBroadcast,
  kSendRecv,
  kBarrier,
  kCount
};
const char* op_kind_name(OpKind k);

struct LedgerEntry {
  uint64_t calls = 0;
  uint64_t bytes_sent = 0;
  uint64_t bytes_recv = 0;
  double seconds = 0.0;
};

class Ledger {
 public:
  const LedgerEntry& operator[](OpKind k) const { return entries_[static_cast<size_t>(k)]; }
  LedgerEntry& operator[](OpKind k) { return entries_[static_cast<size_t>(k)]; }
  LedgerEntry total() const;
  void reset() { entries_ = {}; }
  // One line per op kind with calls > 0: "all_reduce calls=3 sent=... recv=... time_ms=...".
  std::string summary() const;

 private:
  std::array<LedgerEntry, static_cast<size_t>(OpKind::kCount)> entries_{};
};

}  // namespace distattn::comm
