// GoogleTest main for every distattn test binary: all ranks run all tests; non-root ranks
// print only failures; the exit code is the max over ranks, so a failure anywhere fails
// the run.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "distattn/comm/communicator.h"
#include "distattn/runtime.h"

namespace {
class FailuresOnlyListener : public ::testing::EmptyTestEventListener {
 public:
  explicit FailuresOnlyListener(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed()) {
      std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                   r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
    }
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};
}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const auto& info = distattn::runtime_init(&argc, &argv, {.use_gpu = true});
  if (info.rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailuresOnlyListener(info.rank));
  }
  int local = RUN_ALL_TESTS();
  int global = local;
  // Reduced under the watchdog: a rank stuck in (or crashed out of) a test must not leave
  // the others waiting here forever.
  MPI_Request req = MPI_REQUEST_NULL;
  MPI_Iallreduce(&local, &global, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD, &req);
  const auto timeout = distattn::comm::default_timeout();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (int flag = 0;;) {
    MPI_Test(&req, &flag, MPI_STATUS_IGNORE);
    if (flag) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      distattn::runtime_abort(
          local != 0 ? local : 1,
          "the exit-code reduction over " + std::to_string(info.size) + " ranks did not " +
              "complete within DISTATTN_COMM_TIMEOUT_S (" +
              std::to_string(std::chrono::duration_cast<std::chrono::seconds>(timeout).count()) +
              " s): a rank is stuck in a test or died");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  if (info.rank == 0 && info.size > 1)
    std::printf("[distattn] %d ranks: %s\n", info.size,
                global == 0 ? "all passed" : "FAILED on some rank");
  distattn::runtime_finalize();
  return global;
}
