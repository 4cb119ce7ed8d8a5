#pragma once
// Internal: fault injection into Communicator ops, for reliability tests. Compiled in, off
// unless DISTATTN_FAULT is set; when it is unset every op pays one predictable branch on a
// process-wide flag (fault_injection_enabled()).
//
// DISTATTN_FAULT = RULE[;RULE...]      RULE = ACTION[:KEY=VALUE[,KEY=VALUE...]]
//   ACTION   delay    sleep `ms` milliseconds, then run the op normally
//            error    run the op, then make its completion fail with the backend's error
//                     status (kMpiError / kNcclError), as a failing MPI or NCCL call does
//            exit     the process exits at once (std::_Exit(code)), as a crashed rank does
//            hang     the process sleeps forever inside the op, as a stuck rank does
//            drop     send_recv only: the sends of the op (to `peer`, or all) are never
//                     posted, but the op completes locally as if they had been
//            corrupt  send_recv only: the sends of the op (to `peer`, or all) carry `by`
//                     elements more (or fewer, by < 0) than the receiver posted
//   KEY      rank=R   the world rank it applies to (default: every rank)
//            op=NAME  all_reduce | all_gather | reduce_scatter | all_to_all | all_to_all_v |
//                     broadcast | send_recv | barrier | any (default any; drop and corrupt
//                     always count send_recv ops only)
//            at=K     the K-th op (1-based) on that rank that matches `op` (default 1); the
//                     rule fires once
//            ms=N     delay: milliseconds (required)
//            code=N   exit: exit code (default 3)
//            by=N     corrupt: element count change of each send (default 1; not 0)
//            peer=P   drop/corrupt: only sends to this rank of the op's communicator
// Ops of every communicator of the process count (blocking and non-blocking alike; split
// does not). A malformed DISTATTN_FAULT makes the first communicator throw
// Error(kInvalidArgument) saying what to change.
// Example: DISTATTN_FAULT='delay:rank=1,op=all_reduce,at=3,ms=500;exit:rank=0,at=10'
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/comm/ledger.h"

namespace distattn::comm::fault {

// True when DISTATTN_FAULT is set (read once per process).
bool fault_injection_enabled() noexcept;

// Parses DISTATTN_FAULT now (throws Error(kInvalidArgument) when it is malformed).
void validate_fault_spec();

// What the rules that fire at one op ask for.
struct Decision {
  bool fail = false;      // error: completion fails
  std::string fail_rule;  // the rule's text, for the message
  bool drop = false;      // drop: sends to drop_peer (or all when -1) are not posted
  int drop_peer = -1;
  long long corrupt_by = 0;  // corrupt: added to the counts of sends to corrupt_peer
  int corrupt_peer = -1;
  std::string p2p_rule;  // drop/corrupt rule text
};

// Called once per op before the backend starts it (only when enabled). Counts the op for
// every rule, performs delay / exit / hang itself, and returns what the caller must do.
Decision on_op(OpKind kind, const std::string& what);

// Rewrites the sends of a send_recv group as `d` asks (drop or resize). Resized sends read
// from buffers owned by `keep` (host memory; device buffers through device_alloc), which must
// live until the op completed.
std::vector<P2POp> rewrite_group(std::span<const P2POp> ops, const Decision& d,
                                 std::vector<std::shared_ptr<void>>& keep);

// Wraps `op` so that its first test() throws Error(status) naming the op, the rank and the rule.
std::unique_ptr<PendingOp> failing_op(std::unique_ptr<PendingOp> op, Backend backend,
                                      const std::string& what, int rank, const std::string& rule);

// Keeps `keep` alive as long as `op`.
std::unique_ptr<PendingOp> owning_op(std::unique_ptr<PendingOp> op,
                                     std::vector<std::shared_ptr<void>> keep);

}  // namespace distattn::comm::fault
