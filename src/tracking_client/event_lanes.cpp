module;
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include <gsl/gsl>

module meshrt.tracking_client;

import :event_lanes;

namespace meshrt::detail {

namespace {

// This thread's lanes, one per client it records into. On exit the thread retires them: the
// sender drains what they hold and frees them.
struct ThreadBinding {
  std::uint64_t client{};
  std::shared_ptr<Lane> lane;
};
struct ThreadLanes {
  std::vector<ThreadBinding> bindings;
  ThreadLanes() = default;
  ThreadLanes(const ThreadLanes&) = delete;
  ThreadLanes& operator=(const ThreadLanes&) = delete;
  ~ThreadLanes();
};
thread_local ThreadLanes this_thread_lanes;
// Trivially destructible, so it can be read after this_thread_lanes is gone (a thread_local that
// frees a buffer in its destructor after ours ran).
thread_local bool this_thread_exiting = false;
// The binding found last, so the common case (one client) costs no lookup. Trivially
// destructible for the same reason; client ids are never reused, so a stale entry never matches.
struct CachedBinding {
  std::uint64_t client{};
  Lane* lane{nullptr};
};
thread_local CachedBinding this_thread_last_binding;

ThreadLanes::~ThreadLanes() {
  this_thread_exiting = true;
  this_thread_last_binding = {};
  for (const ThreadBinding& binding : bindings) binding.lane->retired.store(true, std::memory_order_release);
}

std::atomic<std::uint64_t> next_lanes_id{1};

}  // namespace

// ---- ChunkPool ----

ChunkPool::~ChunkPool() = default;

Chunk* ChunkPool::reuse_or_allocate() {
  ++in_use_;
  if (idle_.empty()) {
    return std::make_unique<Chunk>().release();  // owned by a lane until given back
  }
  // The longest idle sits at the front; the most recent at the back is likelier still cached.
  Chunk* chunk = idle_.back().release();
  idle_.pop_back();
  return chunk;
}

Chunk* ChunkPool::take_first() {
  const std::scoped_lock lock(mutex_);
  if (closed_) return nullptr;
  ++lanes_;
  return reuse_or_allocate();
}

Chunk* ChunkPool::take_next() {
  std::unique_lock lock(mutex_);
  returned_.wait(lock, [&] { return closed_ || in_use_ < lanes_ + max_queued_; });
  if (closed_) return nullptr;
  return reuse_or_allocate();
}

void ChunkPool::give(Chunk* chunk) {
  Expects(chunk != nullptr);
  chunk->published.store(0, std::memory_order_relaxed);
  chunk->next.store(nullptr, std::memory_order_relaxed);
  std::unique_ptr<Chunk> owned(chunk);
  {
    const std::scoped_lock lock(mutex_);
    Expects(in_use_ > 0);
    --in_use_;
    // Beyond max_idle_ the chunk is freed below, outside the lock.
    if (idle_.size() < max_idle_) idle_.push_back(std::move(owned));
  }
  returned_.notify_one();
}

void ChunkPool::lane_closed() {
  {
    const std::scoped_lock lock(mutex_);
    Expects(lanes_ > 0);
    --lanes_;
  }
  returned_.notify_all();
}

void ChunkPool::close() {
  {
    const std::scoped_lock lock(mutex_);
    closed_ = true;
  }
  returned_.notify_all();
}

std::size_t ChunkPool::chunks_allocated() const {
  const std::scoped_lock lock(mutex_);
  return in_use_ + idle_.size();
}

// ---- EventLanes ----

std::uint64_t EventLanes::next_id() { return next_lanes_id.fetch_add(1, std::memory_order_relaxed); }

EventLanes::~EventLanes() {
  for (const std::shared_ptr<Lane>& lane : lanes_) {
    lane->orphaned.store(true, std::memory_order_release);
    // The chunks from head to tail are still the lane's; those before head went back to the pool.
    for (Chunk* chunk = lane->head; chunk != nullptr;) {
      std::unique_ptr<Chunk> owned(chunk);
      chunk = owned->next.load(std::memory_order_acquire);
    }
  }
}

LaneLease EventLanes::for_this_thread() {
  if (this_thread_exiting) {
    // This thread's own lanes are retired: it (and any other thread in teardown) writes to the
    // client's teardown lane, one at a time.
    std::unique_lock hold(teardown_mutex_);
    if (teardown_lane_ == nullptr) {
      Chunk* first = pool_.take_first();
      if (first == nullptr) return {};
      auto lane = std::make_shared<Lane>(first);
      teardown_lane_ = lane.get();
      const std::scoped_lock lock(mutex_);
      lanes_.push_back(std::move(lane));
    }
    return {teardown_lane_, std::move(hold)};
  }
  if (this_thread_last_binding.client == id_) return {this_thread_last_binding.lane, {}};
  for (const ThreadBinding& binding : this_thread_lanes.bindings) {
    if (binding.client == id_) {
      this_thread_last_binding = {id_, binding.lane.get()};
      return {binding.lane.get(), {}};
    }
  }
  std::unique_lock lock(mutex_);
  const auto room = [&] {
    return closed_ || std::ranges::count_if(lanes_, [](const auto& l) { return l->retired.load(std::memory_order_acquire); }) <=
                          static_cast<std::ptrdiff_t>(max_retired_lanes);
  };
  while (!room()) {
    if (wake_sender_) wake_sender_();
    reaped_.wait_for(lock, std::chrono::milliseconds(1));  // the wake-up may be missed: look again
  }
  Chunk* first = pool_.take_first();
  if (first == nullptr) return {};
  auto lane = std::make_shared<Lane>(first);
  lanes_.push_back(lane);
  lock.unlock();
  // Lanes of clients that are gone go now, so a thread that outlives many clients keeps none.
  std::erase_if(this_thread_lanes.bindings,
                [](const ThreadBinding& binding) { return binding.lane->orphaned.load(std::memory_order_acquire); });
  this_thread_lanes.bindings.push_back({id_, std::move(lane)});
  Lane* const mine = this_thread_lanes.bindings.back().lane.get();
  this_thread_last_binding = {id_, mine};
  return {mine, {}};
}

std::vector<Lane*> EventLanes::current() const {
  const std::scoped_lock lock(mutex_);
  std::vector<Lane*> lanes;
  lanes.reserve(lanes_.size());
  for (const auto& lane : lanes_) lanes.push_back(lane.get());
  return lanes;
}

void EventLanes::reap(Lane* lane) {
  Expects(lane != nullptr && lane->retired.load(std::memory_order_acquire));
  std::shared_ptr<Lane> reaped;
  {
    const std::scoped_lock lock(mutex_);
    const auto found = std::ranges::find_if(lanes_, [&](const auto& l) { return l.get() == lane; });
    Expects(found != lanes_.end());
    reaped = std::move(*found);
    lanes_.erase(found);
    queued_by_reaped_ += reaped->queued.load(std::memory_order_relaxed);
  }
  reaped_.notify_all();
  Expects(reaped->head == reaped->tail && reaped->head->next.load(std::memory_order_acquire) == nullptr);
  reaped->orphaned.store(true, std::memory_order_release);
  pool_.give(reaped->head);
  reaped->head = reaped->tail = nullptr;
  pool_.lane_closed();
}

void EventLanes::close() {
  {
    const std::scoped_lock lock(mutex_);
    closed_ = true;
    for (const auto& lane : lanes_) lane->orphaned.store(true, std::memory_order_release);
  }
  reaped_.notify_all();
  pool_.close();
}

std::uint64_t EventLanes::events_queued() const {
  const std::scoped_lock lock(mutex_);
  std::uint64_t queued = queued_by_reaped_;
  for (const auto& lane : lanes_) queued += lane->queued.load(std::memory_order_relaxed);
  return queued;
}

std::size_t EventLanes::lane_count() const {
  const std::scoped_lock lock(mutex_);
  return lanes_.size();
}

}  // namespace meshrt::detail
