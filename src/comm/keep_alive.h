#pragma once
// Internal: state a backend may still use after an abort (in-flight ops whose requests MPI
// cannot cancel, the buffers they read) is handed here instead of being freed: it lives for
// the rest of the process, reachable from a global, so leak checkers see no leak and nothing
// is reused under a late write.
#include <memory>

namespace distattn::comm::detail {

void keep_forever(std::shared_ptr<void> state) noexcept;

template <typename T>
void keep_forever(std::unique_ptr<T> state) noexcept {
  if (!state) return;
  try {
    keep_forever(std::shared_ptr<void>(std::move(state)));
  } catch (...) {
    (void)state.release();  // out of memory while recording: leak it unrecorded instead
  }
}

}  // namespace distattn::comm::detail
