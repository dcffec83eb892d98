// RUN: %clang_tidy --checks='-*,meshrt-state-transition' \
// RUN:   --config="{CheckOptions: {meshrt-state-transition.StateMembers: 'MeshBuffer::state_;Allocation::states_', \
// RUN:     meshrt-state-transition.TransitionFunctions: 'MeshBuffer::mark_deallocated;Allocation::mark_device_closed'}}" \
// RUN:   %s -- -std=c++20 | FileCheck %s --check-prefix=CHECK-MESSAGES --implicit-check-not='{{warning|error}}:'

#include "seed.h"

// The seed, in the shape of the runtime we learn from: with the device alive, deallocate()
// marks the mesh buffer deallocated and returns, so no device buffer is ever deallocated.
void MeshBuffer::deallocate() {
  auto mesh_device = mesh_device_.lock();
  if (mesh_device) {
    state_ = DeallocatedState{};
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'state_' is written outside its transition functions; change it only through MeshBuffer::mark_deallocated() or Allocation::mark_device_closed(), so that every change emits its event [meshrt-state-transition]
    return;
  }
  for (auto& buffer : buffers_) buffer->deallocate();
  state_ = DeallocatedState{};
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: buffer state 'state_' is written outside
}

// The transition function itself may write the state, also from a lambda inside it.
void MeshBuffer::mark_deallocated() {
  for (auto& buffer : buffers_) buffer->deallocate();
  auto finish = [this] { state_ = DeallocatedState{}; };
  finish();
}

// A constructor sets the initial state of its own object.
MeshBuffer::MeshBuffer() { state_ = OwnedState{}; }

// Reading the state is always fine.
bool MeshBuffer::is_allocated() const { return std::holds_alternative<OwnedState>(state_); }

void Allocation::mark_device_closed(int slot) { states_[slot].store(State::device_closed); }

void Allocation::sneaky(int slot) {
  states_[slot].store(State::deallocated);
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: buffer state 'states_' is written outside
  for (auto& state : states_) (void)state.load();
  for (int i = 0; i < 4; ++i) {
    states_[i].exchange(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
  }
  auto later = [this] { states_[0] = State::device_closed; };
  // CHECK-MESSAGES: :[[@LINE-1]]:25: warning: buffer state 'states_' is written outside
  later();
}

#define FORGET_BUFFER(b) (b).state_.emplace<DeallocatedState>()
void forget(MeshBuffer& buffer) {
  FORGET_BUFFER(buffer);
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: buffer state 'state_' is written outside
}

void drop(Buffer& buffer) {
  buffer.mark_as_deallocated();
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'mark_as_deallocated' sets a buffer's state outside its transition functions; call MeshBuffer::mark_deallocated() or Allocation::mark_device_closed() instead, so that the change emits its event [meshrt-state-transition]
}
