// RUN: %clang_tidy --checks='-*,meshrt-state-transition' \
// RUN:   --config="{CheckOptions: {meshrt-state-transition.StateMembers: 'MeshBuffer::state_;Allocation::states_;Record::states_;Record::fixed_;Record::plain_', \
// RUN:     meshrt-state-transition.TransitionFunctions: 'MeshBuffer::mark_deallocated;Allocation::mark_device_closed;Record::mark_deallocated'}}" \
// RUN:   %s -- -std=c++20 | FileCheck %s --check-prefix=CHECK-MESSAGES --implicit-check-not='{{warning|error}}:'

#include "seed.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <span>

// The seed, in the shape of the runtime we learn from: with the device alive, deallocate()
// marks the mesh buffer deallocated and returns, so no device buffer is ever deallocated.
void MeshBuffer::deallocate() {
  auto mesh_device = mesh_device_.lock();
  if (mesh_device) {
    state_ = DeallocatedState{};
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'state_' is written outside its transition functions; change it only through MeshBuffer::mark_deallocated(), Allocation::mark_device_closed() or Record::mark_deallocated(), so that every change emits its event [meshrt-state-transition]
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
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'mark_as_deallocated' sets a buffer's state outside its transition functions; call MeshBuffer::mark_deallocated(), Allocation::mark_device_closed() or Record::mark_deallocated() instead, so that the change emits its event [meshrt-state-transition]
}

// The record in meshrt's own shape: the states behind a unique_ptr to an array of atomics. Every
// spelling of a write is one, wherever the reference or pointer to the state was taken.
class Record {
 public:
  void mark_deallocated(int slot) { states_[slot].store(State::deallocated); }
  State state(int slot) const { return states_[slot].load(); }
  void through_get(int slot) {
    states_.get()[slot].store(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
  }
  void through_reference(int slot) {
    auto& state = states_[slot];
    state.store(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
    // CHECK-MESSAGES: :[[@LINE-3]]:19: note: the state is reached here
  }
  void through_pointer(int slot) {
    std::atomic<State>* state = &states_[slot];
    state->store(State::device_closed);
  }
  // CHECK-MESSAGES: :[[@LINE-3]]:33: warning: buffer state 'states_' is written outside
  void through_atomic_ref(State* plain) {
    std::atomic_ref<State>(plain[0]).store(State::deallocated);  // not the state: silent
  }
  void through_construct_at(int slot) {
    std::construct_at(states_.get() + slot, State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
  }
  void through_fill() {
    std::ranges::fill(fixed_, State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'fixed_' is written outside
    for (auto& state : fixed_) state.store(State::allocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:32: warning: buffer state 'fixed_' is written outside
  }
  void atomic_ref_on_plain() {
    std::atomic_ref<State>(plain_[0]).store(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'plain_' is written outside
  }
  void through_arrow() {
    states_.get()->store(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
  }
  void through_kept_pointer(int slot) {
    auto* state = states_.get() + slot;
    state->store(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
    // CHECK-MESSAGES: :[[@LINE-3]]:19: note: the state is reached here
  }
  void through_span(int slot) {
    std::span<std::atomic<State>>(states_.get(), 4)[slot].store(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
  }
  void through_const_reference_to_owner(int slot) {
    const auto& all = states_;
    all[slot].store(State::deallocated);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: buffer state 'states_' is written outside
    // CHECK-MESSAGES: :[[@LINE-3]]:23: note: the state is reached here
  }
  // Reads, in the same spellings, stay silent.
  int reads(int slot) const {
    const auto& state = states_[slot];
    const std::atomic<State>* pointer = states_.get() + slot;
    int allocated = 0;
    for (const auto& s : fixed_) allocated += s.load() == State::allocated ? 1 : 0;
    for (auto& s : fixed_) allocated += s.load() == State::allocated ? 1 : 0;
    const auto& all = states_;
    const std::atomic<State>* kept = states_.get();
    allocated += all[slot].load() == kept->load() ? 1 : 0;
    return allocated + (state.load() == pointer->load() ? 1 : 0) + (plain_[0] == State::allocated ? 1 : 0);
  }

 private:
  std::unique_ptr<std::atomic<State>[]> states_;
  std::atomic<State> fixed_[4];
  State plain_[4];
};
