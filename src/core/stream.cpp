// OwnedStream, Event and the stream helpers (see distattn/core/stream.h). Built with and
// without CUDA: without it, CUDA devices are rejected with kUnsupported and CPU objects are
// no-ops.
#include "distattn/core/stream.h"

#include <utility>

#include "distattn/config.h"
#include "distattn/core/error.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn {

namespace {

#if DISTATTN_WITH_CUDA
#define STREAM_CUDA_CHECK(expr, ...)                               \
  do {                                                             \
    const cudaError_t e_ = (expr);                                 \
    if (e_ != cudaSuccess) {                                       \
      (void)cudaGetLastError();                                    \
      DISTATTN_THROW(Status::kCudaError, __VA_ARGS__, ": ", #expr, \
                     " failed: ", cudaGetErrorString(e_));         \
    }                                                              \
  } while (0)

cudaStream_t cuda(Stream s) {
  return static_cast<cudaStream_t>(s);
}
cudaEvent_t cuda_event(void* e) {
  return static_cast<cudaEvent_t>(e);
}

// Makes `index` the current device for the scope: streams and events belong to the device
// current at creation, and nullptr means the current device's legacy default stream.
class CurrentDevice {
 public:
  CurrentDevice(int index, const char* what) {
    int prev = -1;
    STREAM_CUDA_CHECK(cudaGetDevice(&prev), what);
    if (prev != index) {
      STREAM_CUDA_CHECK(cudaSetDevice(index), what, " on cuda:", index);
      prev_ = prev;
    }
  }
  ~CurrentDevice() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int prev_ = -1;
};
#endif

void check_cuda_device(Device device, const char* what) {
  DISTATTN_CHECK(device.index >= 0, what, ": CUDA device index ", device.index,
                 " is negative; use cuda:0 .. cuda:N-1");
#if !DISTATTN_WITH_CUDA
  DISTATTN_THROW(Status::kUnsupported, what, " on ", device.str(),
                 ": distattn was built without CUDA (rebuild with -DDISTATTN_CUDA=ON, or use the "
                 "cpu device)");
#endif
}

}  // namespace

// ---- OwnedStream ---------------------------------------------------------------------------

OwnedStream::OwnedStream(Device device) : device_(device) {
  if (device.is_cpu()) return;
  check_cuda_device(device, "OwnedStream");
#if DISTATTN_WITH_CUDA
  CurrentDevice guard(device.index, "OwnedStream");
  cudaStream_t s = nullptr;
  STREAM_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "OwnedStream on ",
                    device.str());
  stream_ = s;
#endif
}

OwnedStream::~OwnedStream() {
  reset();
}

OwnedStream::OwnedStream(OwnedStream&& o) noexcept
    : device_(o.device_), stream_(std::exchange(o.stream_, nullptr)) {}

OwnedStream& OwnedStream::operator=(OwnedStream&& o) noexcept {
  if (this != &o) {
    reset();
    device_ = o.device_;
    stream_ = std::exchange(o.stream_, nullptr);
  }
  return *this;
}

void OwnedStream::reset() noexcept {
#if DISTATTN_WITH_CUDA
  // cudaStreamDestroy returns at once; work already enqueued still runs to completion.
  if (stream_ != nullptr) (void)cudaStreamDestroy(cuda(stream_));
#endif
  stream_ = nullptr;
}

// ---- Event ---------------------------------------------------------------------------------

Event::Event(Device device) : device_(device), valid_(true) {
  if (device.is_cpu()) return;
  check_cuda_device(device, "Event");
#if DISTATTN_WITH_CUDA
  CurrentDevice guard(device.index, "Event");
  cudaEvent_t e = nullptr;
  STREAM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "Event on ",
                    device.str());
  event_ = e;
#endif
}

Event::~Event() {
  reset();
}

Event::Event(Event&& o) noexcept
    : device_(o.device_),
      event_(std::exchange(o.event_, nullptr)),
      valid_(std::exchange(o.valid_, false)) {}

Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    reset();
    device_ = o.device_;
    event_ = std::exchange(o.event_, nullptr);
    valid_ = std::exchange(o.valid_, false);
  }
  return *this;
}

void Event::reset() noexcept {
#if DISTATTN_WITH_CUDA
  // Legal while recorded work is pending: the runtime releases it once that work is done.
  if (event_ != nullptr) (void)cudaEventDestroy(cuda_event(event_));
#endif
  event_ = nullptr;
  valid_ = false;
}

void Event::record(Stream s) {
  DISTATTN_CHECK(valid_,
                 "Event::record on a default-constructed (or moved-from) Event; create "
                 "it with Event(device) first");
  if (event_ == nullptr) return;  // CPU
#if DISTATTN_WITH_CUDA
  CurrentDevice guard(device_.index, "Event::record");
  STREAM_CUDA_CHECK(cudaEventRecord(cuda_event(event_), cuda(s)), "Event::record on ",
                    device_.str());
#endif
}

void Event::block(Stream s) const {
  DISTATTN_CHECK(valid_,
                 "Event::block on a default-constructed (or moved-from) Event; create "
                 "it with Event(device) and record() it first");
  if (event_ == nullptr) return;  // CPU
#if DISTATTN_WITH_CUDA
  CurrentDevice guard(device_.index, "Event::block");
  STREAM_CUDA_CHECK(cudaStreamWaitEvent(cuda(s), cuda_event(event_), 0), "Event::block on ",
                    device_.str());
#endif
}

bool Event::query() const {
  if (event_ == nullptr) return true;
#if DISTATTN_WITH_CUDA
  const cudaError_t e = cudaEventQuery(cuda_event(event_));
  if (e == cudaSuccess) return true;
  if (e == cudaErrorNotReady) return false;  // not an error (and not recorded as one)
  (void)cudaGetLastError();
  DISTATTN_THROW(Status::kCudaError, "Event::query on ", device_.str(),
                 ": cudaEventQuery failed: ", cudaGetErrorString(e));
#else
  return true;
#endif
}

void Event::synchronize() const {
  if (event_ == nullptr) return;
#if DISTATTN_WITH_CUDA
  STREAM_CUDA_CHECK(cudaEventSynchronize(cuda_event(event_)), "Event::synchronize on ",
                    device_.str());
#endif
}

// ---- free functions ------------------------------------------------------------------------

void stream_wait_stream(Device device, Stream waiter, Stream producer) {
  if (device.is_cpu() || waiter == producer) return;
  check_cuda_device(device, "stream_wait_stream");
#if DISTATTN_WITH_CUDA
  CurrentDevice guard(device.index, "stream_wait_stream");
  cudaEvent_t e = nullptr;
  STREAM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "stream_wait_stream on ",
                    device.str());
  cudaError_t rc = cudaEventRecord(e, cuda(producer));
  if (rc == cudaSuccess) rc = cudaStreamWaitEvent(cuda(waiter), e, 0);
  // The wait captured the event's state at this point; destroying it now is safe.
  (void)cudaEventDestroy(e);
  STREAM_CUDA_CHECK(rc, "stream_wait_stream on ", device.str());
#endif
}

void stream_synchronize(Device device, Stream s) {
  if (device.is_cpu()) return;
  check_cuda_device(device, "stream_synchronize");
#if DISTATTN_WITH_CUDA
  CurrentDevice guard(device.index, "stream_synchronize");
  STREAM_CUDA_CHECK(cudaStreamSynchronize(cuda(s)), "stream_synchronize on ", device.str());
#endif
}

}  // namespace distattn
