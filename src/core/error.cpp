#include "distattn/core/error.h"

#include <atomic>

namespace distattn {
namespace {
std::atomic<int> g_rank{-1};

std::string format(Status status, int rank, const std::string& message, const char* file,
                   int line) {
  std::ostringstream os;
  os << "[distattn " << status_name(status);
  if (rank >= 0) os << " rank " << rank;
  if (file != nullptr) {
    std::string f(file);
    const auto pos = f.rfind('/');
    os << ' ' << (pos == std::string::npos ? f : f.substr(pos + 1)) << ':' << line;
  }
  os << "] " << message;
  return os.str();
}
}  // namespace

const char* status_name(Status s) {
  switch (s) {
    case Status::kSuccess:
      return "success";
    case Status::kInvalidArgument:
      return "invalid argument";
    case Status::kUnsupported:
      return "unsupported";
    case Status::kTimeout:
      return "timeout";
    case Status::kRemoteError:
      return "remote error";
    case Status::kCudaError:
      return "CUDA error";
    case Status::kNcclError:
      return "NCCL error";
    case Status::kMpiError:
      return "MPI error";
    case Status::kIoError:
      return "I/O error";
    case Status::kInternal:
      return "internal error";
  }
  return "unknown";
}

void set_error_rank(int rank) {
  g_rank.store(rank);
}
int error_rank() {
  return g_rank.load();
}

Error::Error(Status status, const std::string& message, const char* file, int line)
    : std::runtime_error(format(status, g_rank.load(), message, file, line)),
      status_(status),
      rank_(g_rank.load()),
      message_(message) {}

}  // namespace distattn
