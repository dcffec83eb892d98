// RUN: %clang_tidy --checks='-*,meshrt-deallocate-on-every-path' \
// RUN:   --config="{CheckOptions: {meshrt-deallocate-on-every-path.DeallocatingFunctions: 'deallocate;deallocate_unpinned', \
// RUN:     meshrt-deallocate-on-every-path.DeallocationCalls: 'release_all', meshrt-deallocate-on-every-path.ReleasePrimitives: ''}}" \
// RUN:   %s -- -std=c++20 | FileCheck %s --check-prefix=CHECK-MESSAGES --implicit-check-not='{{warning|error|note}}:'

// Buffers collected into a set in a loop and released in one call: only emptiness and
// ownership may keep an element out of the set, and the set must not be empty by construction.
#include <cstddef>
#include <span>
#include <vector>

struct Buffer {};
struct Slot {
  Buffer* buffer = nullptr;
  int owner = 0;
  bool pinned = false;
};
void release_all(std::span<Buffer* const> buffers);

struct SetOwner {
  std::vector<Slot> slots;
  int owner = 0;

  // Silent: the empty ones and another owner's are not this one's to release.
  void deallocate() {
    std::vector<Buffer*> mine;
    for (const Slot& slot : slots) {
      if (slot.buffer == nullptr) continue;
      if (slot.owner == owner) mine.push_back(slot.buffer);
    }
    release_all(mine);
  }

  void deallocate_unpinned() {
    std::vector<Buffer*> mine;
    for (const Slot& slot : slots) {
      if (slot.pinned) continue;
      mine.push_back(slot.buffer);
    }
    release_all(mine);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: 'SetOwner::deallocate_unpinned' releases only the buffers that pass a filter: the set given to this call leaves out those for which the condition fails; collect every buffer it owns (skip only empty ones, or ones another owner holds) [meshrt-deallocate-on-every-path]
    // CHECK-MESSAGES: :[[@LINE-5]]:11: note: this condition drops buffers from the set
  }
};

struct ArrayOwner {
  Slot slots[8];
  void deallocate() {
    Buffer* mine[8] = {};
    std::size_t count = 0;
    for (const Slot& slot : slots) {
      if (slot.buffer != nullptr && !slot.pinned) mine[count++] = slot.buffer;
    }
    release_all(std::span(mine, count));
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: 'ArrayOwner::deallocate' releases only the buffers that pass a filter
    // CHECK-MESSAGES: :[[@LINE-4]]:11: note: this condition drops buffers from the set
  }
};

// A set that is empty as written releases nothing, in each spelling.
struct EmptyOwner {
  Buffer* buffers[4] = {};
  void deallocate() { release_all({}); }
  // CHECK-MESSAGES: :[[@LINE-1]]:40: warning: 'EmptyOwner::deallocate' can reach its end without deallocating
  // CHECK-MESSAGES: :[[@LINE-2]]:23: note: this call is given an empty set of buffers: it releases nothing; pass it the buffers this function owns
  void deallocate_unpinned() { release_all(std::span(buffers, 0)); }
  // CHECK-MESSAGES: :[[@LINE-1]]:68: warning: 'EmptyOwner::deallocate_unpinned' can reach its end without deallocating
  // CHECK-MESSAGES: :[[@LINE-2]]:32: note: this call is given an empty set
};

struct WholeOwner {
  Buffer* buffers[4] = {};
  void deallocate() { release_all(std::span(buffers).first(4)); }  // silent: not empty
  void deallocate_unpinned() { release_all(std::span(buffers).first(0)); }
  // CHECK-MESSAGES: :[[@LINE-1]]:74: warning: 'WholeOwner::deallocate_unpinned' can reach its end without deallocating
  // CHECK-MESSAGES: :[[@LINE-2]]:32: note: this call is given an empty set
};
