// With no options at all, the checks know meshrt's own types: the state machine's record, its
// transitions, the handles and their factories.
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 \
// RUN:   | FileCheck %s --check-prefix=CHECK-MESSAGES --implicit-check-not='{{warning|error}}:'

#include <atomic>
#include <memory>

namespace meshrt {
enum class DeviceBufferState { allocated, deallocated, device_closed };
namespace detail {
class BufferAllocation {
 public:
  static std::shared_ptr<BufferAllocation> allocate() { return std::make_shared<BufferAllocation>(); }
  // The record's own entry point: its guard return is fine (nothing left to deallocate).
  void deallocate_slots(int slot) {
    if (states_[slot] != DeviceBufferState::allocated) return;
    mark_deallocated(slot);
  }
  void shortcut(int slot) {
    states_[slot].store(DeviceBufferState::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside its transition functions; change it only through BufferAllocation::mark_deallocated() or BufferAllocation::mark_device_closed(), so that every change emits its event [meshrt-state-transition]
  }

 private:
  void mark_deallocated(int slot) { states_[slot].store(DeviceBufferState::deallocated); }
  void mark_device_closed(int slot) { states_[slot].store(DeviceBufferState::device_closed); }
  std::atomic<DeviceBufferState> states_[8];
};
}  // namespace detail

class MeshBuffer {
 public:
  static MeshBuffer create() { return MeshBuffer(); }
  void deallocate() {
    if (closed_) return;
    // CHECK-MESSAGES: :[[@LINE-1]]:18: warning: 'meshrt::MeshBuffer::deallocate' returns here without deallocating its per-device buffers: no call to MeshBuffer::deallocate_for(), DeviceBuffer::deallocate_for(), MeshBuffer::deallocate(), DeviceBuffer::deallocate(), MeshDevice::close(), BufferAllocation::deallocate_slots() or MeshMemory::close() on this path; deallocate them on every path before returning [meshrt-deallocate-on-every-path]
    deallocate_for();
  }
  ~MeshBuffer() { deallocate_for(); }

 private:
  // Checked in its turn: it gives the record's slot back whenever it owns one.
  void deallocate_for() {
    if (allocation_) allocation_->deallocate_slots(0);
  }
  std::shared_ptr<detail::BufferAllocation> allocation_;
  bool closed_ = false;
};

void misuse() {
  auto* raw = new MeshBuffer(MeshBuffer::create());
  // CHECK-MESSAGES: :[[@LINE-1]]:15: warning: raw 'new' of buffer type 'MeshBuffer': a buffer must be owned by its RAII handle from the start; create it with DeviceBuffer::create(), MeshBuffer::create() or BufferAllocation::allocate() [meshrt-ownership-escape]
  delete raw;
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: raw 'delete' of buffer type 'MeshBuffer'
}
}  // namespace meshrt
