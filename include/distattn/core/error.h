#pragma once
// distattn::Error and the DISTATTN_CHECK family. Every public entry point validates its
// input with these before any kernel or collective runs.
#include <sstream>
#include <stdexcept>
#include <string>

namespace distattn {

enum class Status {
  kSuccess = 0,
  kInvalidArgument,  // caller passed something wrong: the message says what to change
  kUnsupported,      // valid request this build/device cannot do: the message lists what can
  kTimeout,          // watchdog fired: names op, rank, peer(s)
  kRemoteError,      // another rank failed or the communicator was aborted
  kCudaError,
  kNcclError,
  kMpiError,
  kIoError,
  kInternal,
};

const char* status_name(Status s);

// Rank recorded in every Error; set once by runtime init (-1 until then).
void set_error_rank(int rank);
int error_rank();

class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& message, const char* file = nullptr, int line = 0);
  Status status() const noexcept { return status_; }
  int rank() const noexcept { return rank_; }
  // The message without the "[distattn <status> rank r file:line]" prefix.
  const std::string& message() const noexcept { return message_; }

 private:
  Status status_;
  int rank_;
  std::string message_;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace distattn

// DISTATTN_CHECK(cond, "what", value, "to change") — message parts are streamed.
#define DISTATTN_CHECK(cond, ...)                                                           \
  do {                                                                                      \
    if (!(cond))                                                                            \
      throw ::distattn::Error(::distattn::Status::kInvalidArgument,                         \
                              ::distattn::detail::concat(__VA_ARGS__), __FILE__, __LINE__); \
  } while (0)

#define DISTATTN_CHECK_STATUS(cond, status, ...)                                           \
  do {                                                                                     \
    if (!(cond))                                                                           \
      throw ::distattn::Error((status), ::distattn::detail::concat(__VA_ARGS__), __FILE__, \
                              __LINE__);                                                   \
  } while (0)

#define DISTATTN_THROW(status, ...) \
  throw ::distattn::Error((status), ::distattn::detail::concat(__VA_ARGS__), __FILE__, __LINE__)
