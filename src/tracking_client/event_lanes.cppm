// The tracking client's per-thread event lanes and the pool of chunks they are made of.
//
// Each application thread that records through a client gets its own lane: a single-producer,
// single-consumer queue of fixed chunks, written without a lock and read by the client's sender
// thread. A lane is returned when its thread exits (the sender drains it, then frees it), so the
// memory recording takes is bounded by the threads alive now, not by every thread that ever
// recorded (ADR 0012).
module;
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

module meshrt.tracking_client:event_lanes;

import meshrt.core;
import meshrt.tracking;

namespace meshrt::detail {

// Events travel in fixed chunks, linked one after the other, written by one application thread
// and read by the sender. After a warm-up, recording writes only into memory already mapped.
struct Chunk {
  static constexpr std::size_t capacity = 1024;  // 64 KiB of events
  // Left unwritten when a chunk is made (no 64 KiB memset on the recording thread): a slot is
  // written with record() before `published` covers it, and read only below `published`.
  Chunk() {}  // NOLINT(modernize-use-equals-default): `= default` is deleted (the union member has initialisers)
  void record(std::size_t at, const AllocationEvent& event, std::uint32_t stack) {
    std::construct_at(&events[at], LaneEvent{event, stack});
  }
  // An event and the id of the call stack that made it (0: none; only Allocs carry one).
  struct LaneEvent {
    AllocationEvent event;
    std::uint32_t stack;
  };
  union {
    std::array<LaneEvent, capacity> events;
  };
  std::atomic<std::size_t> published{0};  // events[0, published) are written and visible
  std::atomic<Chunk*> next{nullptr};      // set once this chunk is full
};

// Chunks for every lane of one client. Each live lane always gets its first chunk at once (a new
// thread never waits, however many threads are alive); the chunks queued beyond those are
// bounded, so a thread recording faster than the sender applies (tens of millions of events a
// second) waits for the sender to give one back rather than grow without end. The sender never
// waits on the server to give chunks back (it drops encoded bytes instead), so that wait is
// bounded by the sender's CPU time, whatever the server does.
class ChunkPool {
 public:
  static constexpr std::size_t default_max_queued = 256;  // 16 MiB of events queued beyond one per lane
  static constexpr std::size_t default_max_idle = 16;     // chunks kept for reuse; the rest are freed

  explicit ChunkPool(std::size_t max_queued = default_max_queued, std::size_t max_idle = default_max_idle)
      : max_queued_(max_queued), max_idle_(max_idle) {}
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;
  ~ChunkPool();

  // A new lane's first chunk: never waits. nullptr once closed.
  [[nodiscard]] Chunk* take_first();
  // The next chunk of a lane whose chunk is full: waits while too many are queued. nullptr once closed.
  [[nodiscard]] Chunk* take_next();
  // A chunk the sender has finished with.
  void give(Chunk* chunk);
  // A lane went away; its chunks were given back.
  void lane_closed();
  // Wakes every waiting thread with nullptr; later takes return nullptr too.
  void close();

  // Chunks that exist (handed out or idle): what recording costs in memory.
  [[nodiscard]] std::size_t chunks_allocated() const;

 private:
  Chunk* reuse_or_allocate();

  const std::size_t max_queued_;
  const std::size_t max_idle_;
  mutable std::mutex mutex_;
  std::condition_variable returned_;
  std::vector<std::unique_ptr<Chunk>> idle_;
  std::size_t in_use_{0};      // handed out, not given back
  std::size_t lanes_{0};       // live lanes: each holds one chunk that does not count as queued
  bool closed_{false};
};

// One application thread's queue. The producer writes an event and publishes the new count with
// a release store (a plain store on x86); the sender reads the count with acquire.
struct Lane {
  explicit Lane(Chunk* first) : tail(first), head(first) {}
  // Producer side.
  alignas(64) Chunk* tail;
  std::atomic<std::uint64_t> queued{0};  // events handed to process() on this lane
  // Set by the producer's thread as it exits: nothing more will be published.
  std::atomic<bool> retired{false};
  // Set when the client is gone: the thread's binding forgets the lane at its next look-up.
  std::atomic<bool> orphaned{false};

  // Consumer (sender) side.
  alignas(64) Chunk* head;
  std::size_t consumed{0};
};

// A lane to write to for the length of one process() call. Threads being torn down (their
// thread_locals already gone) share one teardown lane per client, one at a time: `hold` keeps
// it theirs for the call.
struct LaneLease {
  Lane* lane{nullptr};
  std::unique_lock<std::mutex> hold;
};

// Every lane of one client. Application threads find theirs with for_this_thread(); the sender
// reads them all and reaps those whose thread has exited.
class EventLanes {
 public:
  // `wake_sender` is called when a thread has to wait for the sender to drain lanes.
  explicit EventLanes(std::function<void()> wake_sender = {}) : wake_sender_(std::move(wake_sender)) {}
  EventLanes(const EventLanes&) = delete;
  EventLanes& operator=(const EventLanes&) = delete;
  // Only once no thread records into this client and the sender has stopped.
  ~EventLanes();

  // This thread's lane, made on first use; no lane once closed. A new lane waits while more
  // than max_retired_lanes lanes of exited threads are still to be drained (the sender drains
  // them every round): so a starved sender bounds recording memory too, not only a busy one.
  [[nodiscard]] LaneLease for_this_thread();
  static constexpr std::size_t max_retired_lanes = 64;
  // The lanes now; the sender's only. Lanes are freed only by reap(), on the sender's thread.
  [[nodiscard]] std::vector<Lane*> current() const;
  // Frees `lane` (retired and drained by the caller): gives its last chunk back.
  void reap(Lane* lane);
  // A chunk the sender has finished with.
  void give(Chunk* chunk) { pool_.give(chunk); }
  [[nodiscard]] Chunk* take_next() { return pool_.take_next(); }
  // No new lanes or chunks; waiting producers return empty-handed.
  void close();

  [[nodiscard]] std::uint64_t events_queued() const;
  [[nodiscard]] std::size_t lane_count() const;
  [[nodiscard]] std::size_t chunks_allocated() const { return pool_.chunks_allocated(); }

 private:
  const std::uint64_t id_{next_id()};
  static std::uint64_t next_id();
  ChunkPool pool_;
  std::function<void()> wake_sender_;
  mutable std::mutex mutex_;
  std::condition_variable reaped_;  // a lane was reaped, or the lanes closed
  bool closed_{false};
  std::vector<std::shared_ptr<Lane>> lanes_;
  // Shared by threads in teardown (never retired: freed with the client), made on first use.
  std::mutex teardown_mutex_;
  Lane* teardown_lane_{nullptr};
  std::uint64_t queued_by_reaped_{0};  // events of lanes already freed, for events_queued()
};

}  // namespace meshrt::detail
