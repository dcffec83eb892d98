module;
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <thread>
#include <utility>
#include <vector>

#include <gsl/gsl>

module meshrt.tracking;

import :read_sections;

namespace meshrt::detail {

namespace {

// Every live thread's slot; a thread that exits folds its high water into exited_high_water.
struct Registry {
  std::mutex mutex;
  std::vector<std::shared_ptr<ReaderSlot>> slots;
  std::atomic<std::uint64_t> exited_high_water{0};
};

// The slot of this thread, once it has one; plain, so a fork handler can read it and a read
// finds it without the guard of a thread_local that has a destructor.
thread_local ReaderSlot* this_thread_slot_address = nullptr;

// Whether readers announce with a plain store (writers fence with membarrier) or an exchange.
// Decided once, when the registry is made, before any thread has a slot; a fork's child may
// turn it off while it is the only thread.
std::atomic<bool> asymmetric_fence{false};
// Forks this process has been the child of (counted by the registry's handler).
std::atomic<std::uint64_t> forks{0};

bool register_membarrier() {
  return ::syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
}

// Every thread of the process passes a full barrier: what a reader stored before it is visible
// after it, and what a reader loads after it sees what this thread stored before the call.
bool heavy_fence() {
  if (!asymmetric_fence.load(std::memory_order_relaxed)) {
    std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with the readers' exchange
    return true;
  }
  return ::syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0;
}

void lock_for_fork();
void unlock_in_parent();
void keep_only_this_thread_in_child();

Registry& registry() {
  static Registry* const instance = [] {
    auto* created = new Registry();  // NOLINT(cppcoreguidelines-owning-memory): lives to the end, past every thread's exit
    asymmetric_fence.store(register_membarrier(), std::memory_order_relaxed);
    ::pthread_atfork(lock_for_fork, unlock_in_parent, keep_only_this_thread_in_child);
    return created;
  }();
  return *instance;
}

void lock_for_fork() { registry().mutex.lock(); }
void unlock_in_parent() { registry().mutex.unlock(); }

// A fork's child has one thread: the others' slots (some perhaps inside a read at the fork
// instant) would make a writer wait for reads that will never end.
void keep_only_this_thread_in_child() {
  Registry& r = registry();
  std::uint64_t high = r.exited_high_water.load(std::memory_order_relaxed);
  for (const auto& slot : r.slots) high = std::max(high, slot->high_water.load(std::memory_order_relaxed));
  r.exited_high_water.store(high, std::memory_order_relaxed);
  std::erase_if(r.slots, [](const auto& slot) { return slot.get() != this_thread_slot_address; });
  forks.fetch_add(1, std::memory_order_relaxed);
  // The registration is the process's; a child whose kernel does not carry it over falls back
  // to exchanges, which is safe now that it has one thread and that thread is not reading.
  if (asymmetric_fence.load(std::memory_order_relaxed) && !register_membarrier()) {
    asymmetric_fence.store(false, std::memory_order_relaxed);
  }
  r.mutex.unlock();
}

void raise(std::atomic<std::uint64_t>& value, std::uint64_t to) {
  std::uint64_t seen = value.load(std::memory_order_relaxed);
  while (seen < to && !value.compare_exchange_weak(seen, to, std::memory_order_seq_cst)) {
  }
}

std::shared_ptr<ReaderSlot> enroll() {
  auto slot = std::make_shared<ReaderSlot>();
  Registry& r = registry();
  const std::scoped_lock lock(r.mutex);
  r.slots.push_back(slot);
  return slot;
}

void withdraw(const std::shared_ptr<ReaderSlot>& slot) {
  Registry& r = registry();
  raise(r.exited_high_water, slot->high_water.load(std::memory_order_acquire));
  const std::scoped_lock lock(r.mutex);
  std::erase(r.slots, slot);
}

struct ThreadSlot {
  std::shared_ptr<ReaderSlot> slot = enroll();
  ThreadSlot() { this_thread_slot_address = slot.get(); }
  ThreadSlot(const ThreadSlot&) = delete;
  ThreadSlot& operator=(const ThreadSlot&) = delete;
  ~ThreadSlot();
};
thread_local ThreadSlot this_thread_slot;
// Trivially destructible, so they can be read while (and after) this thread's slot is torn down.
thread_local bool this_thread_slot_gone = false;
thread_local int this_thread_read_depth = 0;
// The slot the outermost read of this thread announced in (its own, or a temporary one in
// teardown), for the nested reads inside it.
thread_local ReaderSlot* this_thread_reading_slot = nullptr;

ThreadSlot::~ThreadSlot() {
  this_thread_slot_gone = true;
  this_thread_slot_address = nullptr;
  withdraw(slot);
}

}  // namespace

ReadSection::ReadSection(std::uint64_t allocated_end) {
  if (this_thread_read_depth++ > 0) {
    // Already announced; only the high water may need raising (a callback that allocates).
    if (allocated_end > 0 && this_thread_reading_slot != nullptr) raise(this_thread_reading_slot->high_water, allocated_end);
    return;
  }
  outermost_ = true;
  slot_ = this_thread_slot_address;
  if (slot_ == nullptr) {
    // First read of this thread (the slot is made now), or one in its teardown: a thread being
    // torn down gets a slot for this read only.
    temporary_ = this_thread_slot_gone;
    if (temporary_) {
      temporary_slot_ = enroll();
      slot_ = temporary_slot_.get();
    } else {
      slot_ = this_thread_slot.slot.get();
    }
  }
  if (allocated_end > slot_->high_water.load(std::memory_order_relaxed)) {
    slot_->high_water.store(allocated_end, std::memory_order_relaxed);
  }
  this_thread_reading_slot = slot_;
  begun_ = slot_->state.load(std::memory_order_relaxed) + 1U;  // idle is even: begun is odd
  // Ordered before the list load that follows, against a writer's publish-fence-scan: by the
  // writer's membarrier, or by the exchange where there is none.
  if (asymmetric_fence.load(std::memory_order_relaxed)) {
    slot_->state.store(begun_, std::memory_order_relaxed);
    std::atomic_signal_fence(std::memory_order_seq_cst);  // the compiler keeps the order too
  } else {
    slot_->state.exchange(begun_, std::memory_order_seq_cst);
  }
}

ReadSection::~ReadSection() {
  --this_thread_read_depth;
  if (!outermost_) return;
  this_thread_reading_slot = nullptr;
  slot_->state.store(begun_ + 1U, std::memory_order_release);  // even: not reading
  if (temporary_) withdraw(temporary_slot_);
}

bool inside_read_section() { return this_thread_read_depth > 0; }

std::uint64_t forks_seen() {
  (void)registry();  // its fork handler counts from now on
  return forks.load(std::memory_order_relaxed);
}

bool wait_for_read_sections() {
  Expects(!inside_read_section());
  std::vector<std::pair<std::shared_ptr<ReaderSlot>, std::uint64_t>> reading;
  if (!heavy_fence()) return false;
  {
    Registry& r = registry();
    const std::scoped_lock lock(r.mutex);
    for (const auto& slot : r.slots) {
      const std::uint64_t state = slot->state.load(std::memory_order_seq_cst);
      if ((state & 1U) != 0) reading.emplace_back(slot, state);
    }
  }
  for (const auto& [slot, state] : reading) {
    // Reads are short (a processor is quick by contract): yield until this one is over.
    while (slot->state.load(std::memory_order_acquire) == state) std::this_thread::yield();
  }
  return true;
}

std::uint64_t announced_high_water() {
  Registry& r = registry();
  // A failed fence leaves a narrow window (an Alloc recorded at this instant may be missed or
  // shown): the view's rule bends, nothing is freed early.
  (void)heavy_fence();
  const std::scoped_lock lock(r.mutex);
  std::uint64_t high = r.exited_high_water.load(std::memory_order_seq_cst);
  for (const auto& slot : r.slots) {
    (void)slot->state.load(std::memory_order_seq_cst);  // pairs with the reader's exchange
    high = std::max(high, slot->high_water.load(std::memory_order_seq_cst));
  }
  return high;
}

}  // namespace meshrt::detail
