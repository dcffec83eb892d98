// The seed's bug class in each form the checks must see, planted one at a time (-D) into a
// model of meshrt's own buffer code, checked with the checks' defaults. Without a -D the model
// is meshrt's correct code and every check stays silent.
//
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 \
// RUN:   | FileCheck %s --allow-empty --check-prefix=CLEAN
// CLEAN-NOT: {{warning|error|note}}:
//
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DSEED \
// RUN:   | FileCheck %s --check-prefix=SEED --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DCALLEE_RETURN \
// RUN:   | FileCheck %s --check-prefix=CALLEE-RETURN --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DLOOP_SKIP \
// RUN:   | FileCheck %s --check-prefix=LOOP-SKIP --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DFILTER \
// RUN:   | FileCheck %s --check-prefix=FILTER --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DCONTINUE_FILTER \
// RUN:   | FileCheck %s --check-prefix=CONTINUE-FILTER --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DRELEASES_NOTHING \
// RUN:   | FileCheck %s --check-prefix=RELEASES-NOTHING --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DMOVE_ASSIGN_OVERWRITES \
// RUN:   | FileCheck %s --check-prefix=MOVE-ASSIGN --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DCLOSE_SKIPS \
// RUN:   | FileCheck %s --check-prefix=CLOSE-SKIPS --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DCLOSE_DEFERS_NOTHING \
// RUN:   | FileCheck %s --check-prefix=CLOSE-DEFERS --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DDESTRUCTOR_SKIPS \
// RUN:   | FileCheck %s --check-prefix=DESTRUCTOR --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DDEFAULTED_DESTRUCTOR \
// RUN:   | FileCheck %s --check-prefix=DEFAULTED --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DIMPLICIT_DESTRUCTOR \
// RUN:   | FileCheck %s --check-prefix=IMPLICIT --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DMUTUAL_TRUST \
// RUN:   | FileCheck %s --check-prefix=MUTUAL --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DSTATE_THROUGH_GET \
// RUN:   | FileCheck %s --check-prefix=STATE-GET --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DSTATE_THROUGH_REFERENCE \
// RUN:   | FileCheck %s --check-prefix=STATE-REF --implicit-check-not='{{warning|error}}:'
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' %s -- -std=c++20 -DSTATE_CONSTRUCT_AT \
// RUN:   | FileCheck %s --check-prefix=STATE-CONSTRUCT --implicit-check-not='{{warning|error}}:'

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <utility>
#include <vector>

namespace meshrt {
enum class FreeReason { destructor, move_assigned, explicit_deallocate, mesh_deallocate };
enum class DeviceBufferState { allocated, deallocated, device_closed };

namespace detail {
class BufferAllocation {
 public:
  // The state machine's entry point: trusted by name (ReleasePrimitives).
  void deallocate_slots(std::span<const std::uint32_t> slots, FreeReason reason) noexcept;
  DeviceBufferState state(std::uint32_t slot) const { return states_[slot].load(); }
  void audit(std::uint32_t slot);

 private:
  void mark_deallocated(std::uint32_t slot) { states_[slot].store(DeviceBufferState::deallocated); }
  void mark_device_closed(std::uint32_t slot) { states_[slot].store(DeviceBufferState::device_closed); }
  std::unique_ptr<std::atomic<DeviceBufferState>[]> states_;
};

class MeshMemory {
 public:
  void close();
  bool held_by_this_thread() const;
  void defer(std::function<void()> work);
};
}  // namespace detail

class DeviceBuffer {
 public:
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  ~DeviceBuffer();
  void deallocate() noexcept;

 private:
  friend class MeshBuffer;
  void deallocate_for(FreeReason reason) noexcept;
  std::shared_ptr<detail::BufferAllocation> allocation_;
  std::uint32_t slot_ = 0;
};

class MeshBuffer {
 public:
  MeshBuffer& operator=(MeshBuffer&& other) noexcept;
  ~MeshBuffer();
  void deallocate() noexcept;

 private:
  void deallocate_for(FreeReason reason) noexcept;
  std::shared_ptr<detail::BufferAllocation> allocation_;
  std::vector<DeviceBuffer> device_buffers_;
  bool sharded_ = false;
};

class MeshDevice {
 public:
  ~MeshDevice();
  void close();

 private:
  std::shared_ptr<detail::MeshMemory> memory_;
};

// Holds the record itself and has no deallocate(): its destructor is an entry point too.
class SystemBuffer {
 public:
#ifdef DEFAULTED_DESTRUCTOR
  ~SystemBuffer() = default;
  // DEFAULTED: :[[@LINE-1]]:3: warning: 'meshrt::SystemBuffer' holds a BufferAllocation directly but its destructor is written by the compiler: it drops the buffers without releasing them; define it, and release them there [meshrt-deallocate-on-every-path]
#else
  ~SystemBuffer();
#endif

 private:
  std::shared_ptr<detail::BufferAllocation> allocation_;
  bool pinned_ = false;
};

void detail::BufferAllocation::audit(std::uint32_t slot) {
#if defined(STATE_THROUGH_GET)
  states_.get()[slot].store(DeviceBufferState::deallocated);
  // STATE-GET: :[[@LINE-1]]:3: warning: buffer state 'states_' is written outside its transition functions
#elif defined(STATE_THROUGH_REFERENCE)
  auto& state = states_[slot];
  state.store(DeviceBufferState::deallocated);
  // STATE-REF: :[[@LINE-1]]:3: warning: buffer state 'states_' is written outside its transition functions
#elif defined(STATE_CONSTRUCT_AT)
  std::construct_at(states_.get() + slot, DeviceBufferState::deallocated);
  // STATE-CONSTRUCT: :[[@LINE-1]]:3: warning: buffer state 'states_' is written outside its transition functions
#else
  (void)state(slot);
#endif
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
#ifndef MOVE_ASSIGN_OVERWRITES
    deallocate_for(FreeReason::move_assigned);
#endif
    allocation_ = std::move(other.allocation_);
    slot_ = std::exchange(other.slot_, 0);
  }
  return *this;
  // MOVE-ASSIGN: :[[@LINE-1]]:3: warning: 'meshrt::DeviceBuffer::operator=' returns here without deallocating its per-device buffers
}

DeviceBuffer::~DeviceBuffer() { deallocate_for(FreeReason::destructor); }

void DeviceBuffer::deallocate() noexcept { deallocate_for(FreeReason::explicit_deallocate); }
// MUTUAL: :[[@LINE-1]]:93: warning: 'meshrt::DeviceBuffer::deallocate' can reach its end without deallocating

void DeviceBuffer::deallocate_for(FreeReason reason) noexcept {
#if defined(MUTUAL_TRUST)
  // Each trusts the other by name, and neither reaches the state machine.
  if (allocation_) deallocate();
  (void)reason;
  // MUTUAL: :[[@LINE+8]]:1: warning: 'meshrt::DeviceBuffer::deallocate_for' can reach its end without deallocating
#elif defined(RELEASES_NOTHING)
  if (allocation_) allocation_->deallocate_slots({}, reason);
  // RELEASES-NOTHING: :[[@LINE+5]]:1: warning: 'meshrt::DeviceBuffer::deallocate_for' can reach its end without deallocating
  // RELEASES-NOTHING: :[[@LINE-2]]:20: note: this call is given an empty set of buffers: it releases nothing
#else
  if (allocation_) allocation_->deallocate_slots(std::array{slot_}, reason);
#endif
}

MeshBuffer& MeshBuffer::operator=(MeshBuffer&& other) noexcept {
  if (this != &other) {
    deallocate_for(FreeReason::move_assigned);
    allocation_ = std::move(other.allocation_);
    device_buffers_ = std::move(other.device_buffers_);
  }
  return *this;
}

MeshBuffer::~MeshBuffer() { deallocate_for(FreeReason::destructor); }

// The seed: the mesh buffer gives up early, and no device buffer is freed.
void MeshBuffer::deallocate() noexcept {
#ifdef SEED
  if (sharded_) return;
  // SEED: :[[@LINE-1]]:17: warning: 'meshrt::MeshBuffer::deallocate' returns here without deallocating its per-device buffers
#endif
  deallocate_for(FreeReason::mesh_deallocate);
}

void MeshBuffer::deallocate_for(FreeReason reason) noexcept {
  if (!allocation_) return;  // owns nothing: silent
#ifdef CALLEE_RETURN
  // The early return one level down, in the function deallocate() trusts by name.
  if (sharded_) return;
  // CALLEE-RETURN: :[[@LINE-1]]:17: warning: 'meshrt::MeshBuffer::deallocate_for' returns here without deallocating
#endif
#ifdef LOOP_SKIP
  for (DeviceBuffer& device_buffer : device_buffers_) {
    if (device_buffer.slot_ == 0) continue;
    device_buffer.deallocate();
  }
  // LOOP-SKIP: :[[@LINE+2]]:1: warning: 'meshrt::MeshBuffer::deallocate_for' can reach its end without deallocating
  // LOOP-SKIP: :[[@LINE-4]]:35: note: this 'continue' moves on without deallocating the buffer in hand
}
#else
  std::array<std::uint32_t, 64> slots{};
  std::size_t count = 0;
  for (const DeviceBuffer& device_buffer : device_buffers_) {
#if defined(FILTER)
    if (device_buffer.allocation_ == allocation_ && device_buffer.slot_ != 0) slots.at(count++) = device_buffer.slot_;
#elif defined(CONTINUE_FILTER)
    if (device_buffer.slot_ % 2 == 1) continue;
    if (device_buffer.allocation_ == allocation_) slots.at(count++) = device_buffer.slot_;
#else
    // Another owner's handle (one moved out of this mesh buffer) is not ours to release.
    if (device_buffer.allocation_ == allocation_) slots.at(count++) = device_buffer.slot_;
#endif
  }
  allocation_->deallocate_slots(std::span(slots.data(), count), reason);
  // FILTER: :[[@LINE-1]]:3: warning: 'meshrt::MeshBuffer::deallocate_for' releases only the buffers that pass a filter
  // FILTER: :[[@LINE-11]]:9: note: this condition drops buffers from the set
  // CONTINUE-FILTER: :[[@LINE-3]]:3: warning: 'meshrt::MeshBuffer::deallocate_for' releases only the buffers that pass a filter
  // CONTINUE-FILTER: :[[@LINE-11]]:9: note: this condition drops buffers from the set
}
#endif

MeshDevice::~MeshDevice() { close(); }

void MeshDevice::close() {
  if (!memory_) return;
  if (memory_->held_by_this_thread()) {
#ifdef CLOSE_DEFERS_NOTHING
    memory_->defer([] {});
#else
    memory_->defer([memory = memory_] { memory->close(); });  // a deferred release counts
#endif
    return;
    // CLOSE-DEFERS: :[[@LINE-1]]:5: warning: 'meshrt::MeshDevice::close' returns here without deallocating
  }
#ifdef CLOSE_SKIPS
  if (memory_.use_count() > 1) return;
  // CLOSE-SKIPS: :[[@LINE-1]]:32: warning: 'meshrt::MeshDevice::close' returns here without deallocating
#endif
  memory_->close();
}

#ifdef IMPLICIT_DESTRUCTOR
// Holds the record and has no destructor at all.
class Scratch {
  // IMPLICIT: :[[@LINE-1]]:7: warning: 'meshrt::Scratch' holds a BufferAllocation directly but its destructor is written by the compiler
  std::shared_ptr<detail::BufferAllocation> allocation_;
};
#endif

#ifndef DEFAULTED_DESTRUCTOR
SystemBuffer::~SystemBuffer() {
#ifdef DESTRUCTOR_SKIPS
  if (pinned_) return;
  // DESTRUCTOR: :[[@LINE-1]]:16: warning: 'meshrt::SystemBuffer::~SystemBuffer' returns here without deallocating
#endif
  if (allocation_) allocation_->deallocate_slots(std::array<std::uint32_t, 1>{0}, FreeReason::destructor);
}
#endif

}  // namespace meshrt
