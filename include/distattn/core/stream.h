#pragma once
// Stream and event primitives for stream-ordered work on GPU ranks (compute/communication
// overlap without host syncs per step). On a CPU device every object here is empty and
// every call a no-op, so strategies can be written once for both devices.
//
// Compiles without CUDA installed: CUDA handles are carried as distattn::Stream (void*) and
// an opaque pointer.
#include "distattn/core/device.h"

namespace distattn {

// A CUDA stream created by distattn (cudaStreamNonBlocking, on `device`); for a CPU device an
// empty object whose get() is nullptr. Move-only; destroys the stream (after its work ends:
// cudaStreamDestroy lets enqueued work finish).
class OwnedStream {
 public:
  OwnedStream() = default;
  explicit OwnedStream(Device device);
  ~OwnedStream();
  OwnedStream(OwnedStream&& o) noexcept;
  OwnedStream& operator=(OwnedStream&& o) noexcept;
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;

  Stream get() const { return stream_; }  // nullptr on CPU
  Device device() const { return device_; }

 private:
  void reset() noexcept;
  Device device_ = Device::cpu();
  Stream stream_ = nullptr;
};

// A CUDA event (timing disabled) on `device`; for a CPU device every method is a no-op and
// query() is true. Move-only.
class Event {
 public:
  Event() = default;  // invalid: record/block throw, query() true, synchronize() no-op
  explicit Event(Device device);
  ~Event();
  Event(Event&& o) noexcept;
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  // cudaEventRecord on `s` (nullptr = the legacy default stream).
  void record(Stream s);
  // `s` waits on the device for the work captured by the last record(); the host does not
  // wait. Before any record() this is a no-op (as cudaStreamWaitEvent).
  void block(Stream s) const;
  // True when the work captured by the last record() finished (or nothing was recorded).
  bool query() const;
  // The host waits for the last record() (plain cudaEventSynchronize).
  void synchronize() const;
  bool valid() const { return valid_; }
  Device device() const { return device_; }

 private:
  void reset() noexcept;
  Device device_ = Device::cpu();
  void* event_ = nullptr;  // cudaEvent_t; nullptr for CPU and invalid events
  bool valid_ = false;
};

// `waiter` waits on the device for all work enqueued on `producer` so far (through a
// temporary event); the host does not wait. No-op on the CPU or when waiter == producer.
// Each call creates and destroys a CUDA event: code that orders two streams repeatedly (a
// per-step loop) should record() and block() one Event it keeps instead.
void stream_wait_stream(Device device, Stream waiter, Stream producer);

// The host waits for all work enqueued on `s` so far. No-op on the CPU.
void stream_synchronize(Device device, Stream s);

}  // namespace distattn
