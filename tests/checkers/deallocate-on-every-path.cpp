// RUN: %clang_tidy --checks='-*,meshrt-deallocate-on-every-path' \
// RUN:   --config="{CheckOptions: {meshrt-deallocate-on-every-path.DeallocationCalls: 'Buffer::deallocate;MeshBuffer::mark_deallocated', meshrt-deallocate-on-every-path.ReleasePrimitives: ''}}" \
// RUN:   %s -- -std=c++20 | FileCheck %s --check-prefix=CHECK-MESSAGES --implicit-check-not='{{warning|error|note}}:'

#include "seed.h"

#include <functional>

// The seed: with the mesh device alive, deallocate() returns before any device buffer is deallocated.
void MeshBuffer::deallocate() {
  auto mesh_device = mesh_device_.lock();
  if (mesh_device) {
    state_ = DeallocatedState{};
    return;
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: 'MeshBuffer::deallocate' returns here without deallocating its per-device buffers: no call to Buffer::deallocate() or MeshBuffer::mark_deallocated() on this path; deallocate them on every path before returning [meshrt-deallocate-on-every-path]
  }
  for (auto& buffer : buffers_) buffer->deallocate();
  state_ = DeallocatedState{};
}

// A destructor of a class with deallocate() that forgets to deallocate.
MeshBuffer::~MeshBuffer() {
  if (!is_allocated()) return;
  // CHECK-MESSAGES: :[[@LINE-1]]:24: warning: 'MeshBuffer::~MeshBuffer' returns here without deallocating
  state_ = DeallocatedState{};
}
// CHECK-MESSAGES: :[[@LINE-1]]:1: warning: 'MeshBuffer::~MeshBuffer' can reach its end without deallocating its per-device buffers: no call to Buffer::deallocate() or MeshBuffer::mark_deallocated() on this path [meshrt-deallocate-on-every-path]

struct Good {
  std::vector<std::shared_ptr<Buffer>> buffers;
  bool alive = false;
  // Every path deallocates: both branches, or through the one call before the branch.
  void deallocate() {
    if (alive) {
      for (auto& b : buffers) b->deallocate();
    } else {
      for (auto& b : buffers) b->deallocate();
    }
  }
  ~Good() { deallocate_all(); }
  void deallocate_all() {
    for (auto& b : buffers) {
      if (b) b->deallocate();  // skipping an empty slot is still releasing the loop
    }
  }
};

struct LoopEscape {
  std::vector<std::shared_ptr<Buffer>> buffers;
  bool closed = false;
  void deallocate() {
    for (auto& b : buffers) {
      if (closed) return;
      // CHECK-MESSAGES: :[[@LINE-1]]:19: warning: 'LoopEscape::deallocate' returns here without deallocating
      b->deallocate();
    }
  }
};

struct LambdaNeverCalled {
  std::shared_ptr<Buffer> buffer;
  void deallocate() {
    auto later = [this] { buffer->deallocate(); };
    (void)later;
  }
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'LambdaNeverCalled::deallocate' can reach its end without deallocating
};

#define RETURN_IF(condition) \
  if (condition) return
struct MacroExit {
  std::shared_ptr<Buffer> buffer;
  bool closed = false;
  void deallocate() {
    RETURN_IF(closed);
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: 'MacroExit::deallocate' returns here without deallocating
    buffer->deallocate();
  }
};

struct HalfIf {
  std::shared_ptr<Buffer> buffer;
  bool owned = false;
  void deallocate() {
    if (owned) buffer->deallocate();
  }
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'HalfIf::deallocate' can reach its end without deallocating
};

struct Throws {
  std::shared_ptr<Buffer> buffer;
  void deallocate() {
    if (!buffer) throw 1;  // an exception is not a silent early exit
    buffer->deallocate();
  }
};

// Not a deallocating function: not checked.
struct Unrelated {
  void close() {}
};

// A release loop whose body can move on past the release skips some buffers: the warning names
// the way out, and a note the statement that skips.
struct LoopContinue {
  std::vector<std::shared_ptr<Buffer>> buffers;
  bool keep_cached = false;
  void deallocate() {
    for (auto& b : buffers) {
      if (keep_cached) continue;
      b->deallocate();
    }
  }
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'LoopContinue::deallocate' can reach its end without deallocating
  // CHECK-MESSAGES: :[[@LINE-5]]:24: note: this 'continue' moves on without deallocating the buffer in hand (or the ones after it); release each element on every path through the loop, and skip only empty ones
};

struct LoopBreak {
  std::vector<std::shared_ptr<Buffer>> buffers;
  bool closed = false;
  void deallocate() {
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      if (closed) break;
      buffers[i]->deallocate();
    }
  }
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'LoopBreak::deallocate' can reach its end without deallocating
  // CHECK-MESSAGES: :[[@LINE-5]]:19: note: this 'break' leaves the loop without deallocating
};

// A filter in the body: the buffers it drops are never released.
struct LoopFilter {
  std::vector<std::shared_ptr<Buffer>> buffers;
  int owner = 0;
  static int owner_of(const Buffer&);
  void deallocate() {
    for (auto& b : buffers) {
      if (owner_of(*b) == owner) b->deallocate();
    }
  }
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'LoopFilter::deallocate' can reach its end without deallocating
  // CHECK-MESSAGES: :[[@LINE-4]]:7: note: this branch lets the loop move on without deallocating
};

// Skipping only empty elements releases everything that exists: silent, in each spelling.
struct LoopSkipsEmpty {
  std::vector<std::shared_ptr<Buffer>> buffers;
  std::vector<Buffer*> raw;
  void deallocate() {
    for (auto& b : buffers) {
      if (!b) continue;
      b->deallocate();
    }
    for (std::size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == nullptr) continue;
      raw[i]->deallocate();
    }
    for (Buffer* b : raw) {
      if (b != nullptr) b->deallocate();
    }
  }
};

// Nested loops that release every element of every inner list are fine.
struct NestedRelease {
  std::vector<std::vector<std::shared_ptr<Buffer>>> groups;
  void deallocate() {
    for (auto& group : groups) {
      for (auto& b : group) b->deallocate();
    }
  }
};

// A guard on the object's own handle: on its empty side there is nothing to release.
struct OwnGuard {
  std::shared_ptr<Buffer> buffer;
  Buffer* raw = nullptr;
  void deallocate() {
    if (!buffer) return;
    buffer->deallocate();
    if (raw != nullptr) raw->deallocate();
  }
};

// The same guard the wrong way round returns while it still owns the buffer.
struct InvertedGuard {
  std::shared_ptr<Buffer> buffer;
  void deallocate() {
    if (buffer) return;
    // CHECK-MESSAGES: :[[@LINE-1]]:17: warning: 'InvertedGuard::deallocate' returns here without deallocating
    buffer->deallocate();
  }
};

// A guard on something other than the object's own handle is a skip (the seed's shape).
struct ForeignGuard {
  std::shared_ptr<Buffer> buffer;
  std::weak_ptr<MeshDevice> device;
  void deallocate() {
    if (!device.lock()) return;
    // CHECK-MESSAGES: :[[@LINE-1]]:25: warning: 'ForeignGuard::deallocate' returns here without deallocating
    buffer->deallocate();
  }
};

// Move assignment: a self-move keeps what it owns; any other path must release first.
struct MovableOwner {
  std::shared_ptr<Buffer> buffer;
  void deallocate() { buffer->deallocate(); }
  MovableOwner& operator=(MovableOwner&& other) noexcept {
    if (this != &other) {
      deallocate();
      buffer = std::move(other.buffer);
    }
    return *this;
  }
};

struct ForgetfulOwner {
  std::shared_ptr<Buffer> buffer;
  void deallocate() { buffer->deallocate(); }
  ForgetfulOwner& operator=(ForgetfulOwner&& other) noexcept {
    buffer = std::move(other.buffer);
    return *this;
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: 'ForgetfulOwner::operator=' returns here without deallocating
  }
};

// A release handed over as a lambda counts when the lambda releases on every path.
struct Deferred {
  std::shared_ptr<Buffer> buffer;
  void defer(std::function<void()> work);
  void deallocate() {
    defer([b = buffer] { b->deallocate(); });
  }
};
struct DeferredSkip {
  std::shared_ptr<Buffer> buffer;
  bool cached = false;
  void defer(std::function<void()> work);
  void deallocate() {
    defer([this] {
      if (cached) return;
      buffer->deallocate();
    });
  }
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'DeferredSkip::deallocate' can reach its end without deallocating
};


// Ways out that are not silent, and guards that are not skips.
[[noreturn]] void fail_fast();
struct Asserts {
  std::unique_ptr<Buffer> buffer;
  void deallocate() {
    if (buffer == nullptr) return;  // a smart pointer compared with nullptr: owns nothing
    if (!buffer) fail_fast();       // does not return: no silent exit
    buffer->deallocate();
  }
};

// A flag is not a handle: returning on it skips the release.
struct FlagGuard {
  std::shared_ptr<Buffer> buffer;
  std::atomic<bool> open{true};
  void deallocate() {
    if (!open) return;
    // CHECK-MESSAGES: :[[@LINE-1]]:16: warning: 'FlagGuard::deallocate' returns here without deallocating
    buffer->deallocate();
  }
};

// A loop may skip empty elements however the test is written, but not on a lookup.
Buffer* lookup(const std::shared_ptr<Buffer>& b);
struct LoopLookup {
  std::vector<std::shared_ptr<Buffer>> buffers;
  void deallocate() {
    for (auto& b : buffers) {
      if (b != nullptr && lookup(b) == nullptr) continue;
      b->deallocate();
    }
  }
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: 'LoopLookup::deallocate' can reach its end without deallocating
  // CHECK-MESSAGES: :[[@LINE-5]]:49: note: this 'continue' moves on without deallocating
};

// Releasing the other side of a move is not releasing what this object held.
struct WrongSideMove {
  std::shared_ptr<Buffer> buffer;
  void deallocate() { buffer->deallocate(); }
  WrongSideMove& operator=(WrongSideMove&& other) noexcept {
    if (this != &other) {
      other.deallocate();
      buffer = std::move(other.buffer);
    }
    return *this;
    // CHECK-MESSAGES: :[[@LINE-1]]:5: warning: 'WrongSideMove::operator=' returns here without deallocating
  }
};
