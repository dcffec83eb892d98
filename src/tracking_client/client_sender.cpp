// The sender thread: takes events off every lane, keeps the live table, and drives the
// session (client_session.cpp) round by round; a clean exit drains within shutdown_timeout.
module;
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>
#include <gsl/gsl>

module meshrt.tracking_client;

import meshrt.core;
import meshrt.protocol;
import :client_engine;
import :event_lanes;
import :server_connection;

namespace meshrt {

namespace {

protocol::AllocRecord to_record(const AllocationEvent& event, std::uint32_t stack) {
  return protocol::AllocRecord{
      .buffer = event.buffer.value(),
      .mesh_buffer = event.mesh_buffer.value(),
      .address = event.address,
      .size = event.size,
      .time_ns = event.time_ns,
      .device = event.device.value(),
      .type = event.type,
      .hooked = event.hooked,
      .device_count = static_cast<std::uint16_t>(event.device_count),
      .category = event.category,
      .stack = stack,
  };
}

protocol::FreeRecord to_free_record(const AllocationEvent& event) {
  return protocol::FreeRecord{event.buffer.value(), event.time_ns, static_cast<std::uint8_t>(event.reason),
                              static_cast<std::uint16_t>(event.device_count)};
}

// An Alloc and the Free of exactly its buffers.
bool cancels(const AllocationEvent& alloc, const AllocationEvent& free) {
  return alloc.kind == EventKind::allocate && free.kind == EventKind::free && alloc.buffer == free.buffer &&
         alloc.device_count == free.device_count;
}

}  // namespace

std::optional<std::string> TrackingClient::Engine::take_name(std::uint64_t id) {
  if (arrived_names.empty() && names_queued.load(std::memory_order_acquire) == 0) return std::nullopt;
  auto found = arrived_names.find(id);
  if (found == arrived_names.end() && names_queued.load(std::memory_order_acquire) > 0) {
    const std::scoped_lock lock(mutex);
    for (auto& [id_queued, text] : name_queue) arrived_names.insert_or_assign(id_queued, std::move(text));
    name_queue.clear();
    names_queued.store(0, std::memory_order_release);
    found = arrived_names.find(id);
  }
  if (found == arrived_names.end()) return std::nullopt;
  std::string name = std::move(found->second);
  arrived_names.erase(found);
  return name;
}

void TrackingClient::Engine::take_new_stacks(bool stream) {
  if (!interner) return;
  for (const detail::CapturedStack& stack : interner->take_new()) stack_book->add(stack);
  if (stream) stack_book->tell(out);
}

void TrackingClient::Engine::apply(const AllocationEvent& event, std::uint32_t stack, bool stream) {
  if (event.kind == EventKind::allocate) {
    const protocol::AllocRecord record = to_record(event, stack);
    std::optional<std::string> name = take_name(record.mesh_buffer);
    if (stream) send_alloc(record, name);
    // Frees that overtook this Alloc (recorded on another thread's lane) follow it now.
    for (const protocol::FreeRecord& free : table.allocate(record, std::move(name))) {
      if (stream) encode(protocol::EventRecord::of(free));
    }
    return;
  }
  const protocol::FreeRecord record = to_free_record(event);
  if (table.free(record) && stream) encode(protocol::EventRecord::of(record));
}

std::uint64_t TrackingClient::Engine::apply_lanes(bool stream) {
  more_waiting = false;
  std::uint64_t taken = 0;
  for (detail::Lane* lane : lanes.current()) {
    // Read before the lane's events: once retired, what is published now is all there will be.
    const bool retired = lane->retired.load(std::memory_order_acquire);
    bool drained = false;
    for (std::uint64_t chunks = 0;; ++chunks) {
      if (chunks == chunks_per_round) {
        more_waiting = true;
        break;
      }
      detail::Chunk* chunk = lane->head;
      const std::size_t published = chunk->published.load(std::memory_order_acquire);
      for (std::size_t i = lane->consumed; i < published; ++i) {
        // A buffer whose whole life is two neighbours in one lane (a short-lived buffer) never
        // needs the live table: only the server hears of it.
        const AllocationEvent& event = chunk->events[i].event;
        const std::uint32_t stack = chunk->events[i].stack;
        if (i + 1 < published && cancels(event, chunk->events[i + 1].event) && table.frees_waiting() == 0) {
          const std::optional<std::string> name = take_name(event.mesh_buffer.value());
          if (stream) {
            send_alloc(to_record(event, stack), name);
            encode(protocol::EventRecord::of(to_free_record(chunk->events[i + 1].event)));
          }
          ++i;
          continue;
        }
        apply(event, stack, stream);
      }
      taken += published - lane->consumed;
      lane->consumed = published;
      detail::Chunk* next = chunk->next.load(std::memory_order_acquire);
      if (published < detail::Chunk::capacity || next == nullptr) {
        drained = true;
        break;
      }
      lane->head = next;  // the producer has moved on: this chunk is done
      lane->consumed = 0;
      lanes.give(chunk);
    }
    if (retired && drained) lanes.reap(lane);
  }
  return taken;
}

std::uint64_t TrackingClient::Engine::round() {
  std::vector<protocol::DeviceTotals> new_devices;
  std::vector<protocol::OutOfMemory> failures;
  {
    const std::scoped_lock lock(mutex);
    new_devices.swap(device_queue);
    failures.swap(out_of_memory_queue);
  }
  for (const protocol::DeviceTotals& device : new_devices) devices[device.device] = device;
  // Streaming: events go out as they are applied. Otherwise the live table alone takes them
  // and the snapshot of the next session (or of the resync) carries their effect.
  const bool stream = connected() && !need_snapshot;
  if (stream && !new_devices.empty()) protocol::encode(protocol::DeviceInfo{new_devices}, out);
  // Before the lanes: a stack is interned before the event that names it is published, so every
  // record read below names a stack already told.
  take_new_stacks(stream);
  const std::uint64_t taken = apply_lanes(stream);
  if (stream) flush_pending();
  // A moment of the timeline, after the events: every allocation made before the failure was
  // published before it was queued, so once the lanes are drained the server's account of who
  // holds the device includes them (until then it waits a round). While not connected it has no
  // timeline to be in, and is dropped.
  if (stream && more_waiting && !failures.empty()) {
    const std::scoped_lock lock(mutex);
    out_of_memory_queue.insert(out_of_memory_queue.begin(), failures.begin(), failures.end());
    if (out_of_memory_queue.size() > max_out_of_memory_queued) {  // reports made meanwhile: keep the newest
      out_of_memory_queue.erase(out_of_memory_queue.begin(),
                                out_of_memory_queue.end() - static_cast<std::ptrdiff_t>(max_out_of_memory_queued));
    }
  } else if (stream) {
    for (const protocol::OutOfMemory& failure : failures) protocol::encode(failure, out);
  }
  if (!connected()) {
    try_connect();  // a new session starts with a snapshot: it covers these events
  } else if (need_snapshot && outbound.all_sent()) {
    encode_snapshot();
  }
  if (connected()) peak_pending_bytes = std::max<std::uint64_t>(peak_pending_bytes, outbound.pending());
  return taken;
}

void TrackingClient::Engine::publish_status(std::uint64_t taken, std::uint64_t flush_round) {
  {
    const std::scoped_lock lock(mutex);
    status.events_taken += taken;
    // Every event queued before flush request `flush_round` was taken (no lane has more) and
    // written: the request is met.
    if (connected() && outbound.all_sent() && !need_snapshot && !more_waiting) {
      status.events_delivered = status.events_taken;
      flushed_through = flush_round;
    }
    status.live_buffers = table.live_device_buffers();
    status.names = table.name_count() + arrived_names.size();
    status.pending_bytes = connected() ? outbound.pending() : 0;
    status.peak_pending_bytes = peak_pending_bytes;
    status.frees_waiting = table.frees_waiting();
    status.lanes = lanes.lane_count();
    status.chunks = lanes.chunks_allocated();
    if (interner) {
      status.stacks = interner->size();
      status.stacks_dropped = interner->dropped();
    }
  }
  delivered_changed.notify_all();
}

// Each pass of the loop runs through the fork gate, never the wait for work: a fork waits for
// the pass in progress, so a child never inherits memory only this thread's stack held.
void TrackingClient::Engine::run() {
  {
    const detail::ForkGate::Pass pass(fork_gate);
    try_connect();  // at once: a server that is there sees the first allocations as they happen
  }
  std::uint64_t flush_round{};
  std::uint64_t kicks_seen{};
  for (;;) {
    {
      std::unique_lock lock(mutex);
      if (!more_waiting) {
        // A flush or a shutdown asked while the last round ran is not missed.
        wake.wait_for(lock, options.flush_interval, [&] {
          return flush_requests != flush_round || stopping.load(std::memory_order_relaxed) ||
                 kicks.load(std::memory_order_relaxed) != kicks_seen;
        });
      }
      kicks_seen = kicks.load(std::memory_order_relaxed);
      flush_round = flush_requests;
    }
    if (stopping.load(std::memory_order_acquire)) break;
    const detail::ForkGate::Pass pass(fork_gate);
    const std::uint64_t taken = round();
    if (connected()) pump_until(Clock::now());
    // Only what can be dropped counts: a session start larger than the limit (a big live
    // table) is sent whole, never dropped and re-sent for ever.
    if (connected() && outbound.droppable() > options.max_pending_bytes) drop_pending();
    if (connected()) outbound.compact();
    publish_status(taken, flush_round);
  }
  finish();
}

void TrackingClient::Engine::finish() {
  const auto start = Clock::now();
  const auto deadline = start + options.shutdown_timeout;
  // The last fifth of the time is kept for the Goodbye after a give-up.
  const auto give_up_at = start + options.shutdown_timeout * 4 / 5;
  std::uint64_t flush_round{};
  {
    const std::scoped_lock lock(mutex);
    flush_round = flush_requests;
  }
  bool complete = true;
  frame_records = exit_frame_records;
  for (;;) {
    const detail::ForkGate::Pass pass(fork_gate);
    const std::uint64_t taken = round();
    if (connected()) {
      // Keep the queue short while draining: the socket paces the drain, nothing is dropped.
      pump_until(more_waiting ? give_up_at : Clock::now(), options.max_pending_bytes / 2);
      outbound.compact();
    }
    publish_status(taken, flush_round);
    if (!connected()) return;  // nobody to tell: the next session (there is none) would resync
    if (!more_waiting) break;
    if (Clock::now() >= give_up_at) {
      complete = false;
      break;
    }
  }
  const detail::ForkGate::Pass pass(fork_gate);  // like the drain's, it may wait for the server: a fork waits fork_wait at most
  // Frees whose Alloc never came are a runtime bug: the server counts them as unknown.
  if (complete && !need_snapshot) {
    for (const protocol::FreeRecord& free : table.unmatched_frees()) encode(protocol::EventRecord::of(free));
    flush_pending();
  }
  if (need_snapshot && outbound.all_sent()) encode_snapshot();  // the last word on what is live
  complete = complete && !need_snapshot && pump_until(give_up_at);
  if (!connected()) return;
  if (!complete || !outbound.all_sent()) {
    complete = false;
    (void)outbound.cut_unsent();
  }
  protocol::encode(protocol::Goodbye{.complete = complete}, out);
  pump_until(deadline);
  {
    const std::scoped_lock lock(mutex);
    status.gave_up = !complete;
    if (outbound.all_sent()) status.said_goodbye = true;
  }
  connection.close();
}

}  // namespace meshrt
