module;
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include <fcntl.h>
#include <pthread.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <absl/container/flat_hash_map.h>
#include <fmt/format.h>
#include <gsl/gsl>

module meshrt.tracking;

import meshrt.core;
import meshrt.protocol;
import :event_lanes;

namespace meshrt {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Past this many chunks waiting in its lane an application thread wakes the sender early.
constexpr std::size_t wake_chunks = 4;

// Bumped in every child of fork(): a client started in an earlier generation belongs to the
// parent. In the child it records nothing, sends nothing and its exit neither waits nor says
// Goodbye (ADR 0017): the child's copy of the parent's session must not speak for the parent.
std::atomic<std::uint64_t> fork_generation{0};
// The sockets of connected clients, so that a fork's child closes its copies: a parent's session
// must end when the parent does, not when its last child exits.
// Each slot holds a socket + 1 (0: empty), so that zero-initialisation empties them all.
constexpr std::size_t max_tracked_sockets = 64;
std::array<std::atomic<int>, max_tracked_sockets> tracked_sockets{};
void remember_socket(int fd) {
  for (auto& slot : tracked_sockets) {
    int empty = 0;
    if (slot.compare_exchange_strong(empty, fd + 1)) return;
  }
}
void forget_socket(int fd) {
  for (auto& slot : tracked_sockets) {
    int held = fd + 1;
    if (slot.compare_exchange_strong(held, 0)) return;
  }
}
void count_fork_in_child() {
  fork_generation.fetch_add(1, std::memory_order_relaxed);
  for (auto& slot : tracked_sockets) {
    const int held = slot.exchange(0);
    if (held > 0) ::close(held - 1);  // async-signal-safe; only the child's copy
  }
}
std::once_flag fork_handler_installed;

// An Alloc and the Free of exactly its buffers.
bool cancels(const AllocationEvent& alloc, const AllocationEvent& free) {
  return alloc.kind == EventKind::allocate && free.kind == EventKind::free && alloc.buffer == free.buffer &&
         alloc.device_count == free.device_count;
}

protocol::AllocRecord to_record(const AllocationEvent& event) {
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
  };
}

// Bits [first, first + count) of a 64-bit live mask.
constexpr std::uint64_t bits(std::uint32_t first, std::uint32_t count) {
  return (count >= 64 ? ~std::uint64_t{0} : ((std::uint64_t{1} << count) - 1)) << first;
}

std::string own_process_name() {
  std::ifstream file("/proc/self/comm");
  std::string name;
  std::getline(file, name);
  return name.substr(0, protocol::max_name_size);
}

}  // namespace

bool tracking_enabled_by_environment() {
  for (const char* variable : {"MESHRT_ALLOC_TRACKING", "TT_ALLOC_TRACKING_ENABLED"}) {
    if (const char* value = std::getenv(variable); value != nullptr && std::string_view(value) == "1") return true;
  }
  return false;
}

struct TrackingClient::State {
  Options options;
  // The fork generation this client was started in: in any later one it is a parent's copy.
  const std::uint64_t generation{fork_generation.load(std::memory_order_relaxed)};
  [[nodiscard]] bool forked_away() const { return fork_generation.load(std::memory_order_relaxed) != generation; }

  detail::EventLanes lanes;
  std::atomic<bool> stopping{false};

  // Shared with flush()/status()/describe_*, under `mutex`.
  mutable std::mutex mutex;
  std::condition_variable wake;
  std::condition_variable delivered_changed;
  std::vector<protocol::DeviceTotals> device_queue;
  // Names wait here until the sender applies their mesh buffer's Alloc (they are described just
  // before it is recorded), so a name lives exactly as long as its buffer, in the client and on
  // the server.
  std::unordered_map<std::uint64_t, std::string> name_queue;
  std::atomic<std::size_t> names_queued{0};
  std::uint64_t flush_requests{};   // flush() calls so far
  std::uint64_t flushed_through{};  // the last request whose events were all delivered
  Status status;

  // The sender thread's own world.
  int fd{-1};
  protocol::OutboundFrames outbound;
  std::vector<std::byte>& out = outbound.frames();  // where encoders append
  // Live device buffers by group (one Alloc event's range), keyed by its first buffer id; the
  // mask says which of its device buffers are still live.
  struct Group {
    protocol::AllocRecord record;
    std::uint64_t live_mask{};
  };
  absl::flat_hash_map<std::uint64_t, Group> live;
  std::uint64_t live_device_buffers{};
  // A Free can overtake its Alloc when the two were recorded on different threads' lanes: it
  // waits here (keyed by buffer id, never reused) until the Alloc arrives.
  std::unordered_map<std::uint64_t, AllocationEvent> early_frees;
  std::map<std::uint32_t, protocol::DeviceTotals> devices;
  // Names taken from name_queue whose Alloc has not been applied yet.
  std::unordered_map<std::uint64_t, std::string> arrived_names;
  // Names of live groups (a mesh buffer is one group: one Alloc event).
  std::unordered_map<std::uint64_t, std::string> names;
  std::uint64_t next_sequence{};
  bool need_snapshot{true};
  bool warned{false};  // a warning is out; the next connect says so
  Clock::time_point next_connect{};
  std::unique_ptr<std::thread> sender;

  void warn(const std::string& line) const {
    if (options.warn) {
      options.warn(line);
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  }

  // ---- the live table, names and devices: updated for every event, connected or not ----

  // The name of mesh buffer `id` if it has one, taken out of the queues. A name is queued before
  // its Alloc is published, so once the Alloc is read the name is in name_queue or arrived_names.
  std::optional<std::string> take_name(std::uint64_t id) {
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

  // The group holding buffer `id`: its first id is at most 63 below (a group covers up to 64).
  absl::flat_hash_map<std::uint64_t, Group>::iterator find_group(std::uint64_t id) {
    for (std::uint64_t back = 0; back < max_devices_per_event && back <= id; ++back) {
      const auto found = live.find(id - back);
      if (found != live.end()) {
        return id < found->first + found->second.record.device_count ? found : live.end();
      }
    }
    return live.end();
  }

  void forget_group(absl::flat_hash_map<std::uint64_t, Group>::iterator group) {
    names.erase(group->second.record.mesh_buffer);
    live.erase(group);
  }

  // An Alloc: its name (if any) goes out first, then the Alloc.
  void allocated(const AllocationEvent& event, bool stream, bool stays_live) {
    std::optional<std::string> name = take_name(event.mesh_buffer.value());
    if (stream) {
      if (name) {
        flush_pending();  // the name frame goes between the events before and this Alloc
        protocol::encode(protocol::MeshBufferName{event.mesh_buffer.value(), *name}, out);
      }
      encode(event);
    }
    if (name && stays_live) names.insert_or_assign(event.mesh_buffer.value(), std::move(*name));
  }

  // Applies one event to the live table; when `stream` is set, also encodes what the server must
  // hear, in an order it accepts (each Alloc before its Free).
  void apply(const AllocationEvent& event, bool stream) {
    const std::uint64_t id = event.buffer.value();
    if (event.kind == EventKind::allocate) {
      std::uint64_t mask = bits(0, event.device_count);
      // Frees that overtook this Alloc (recorded on another thread's lane) follow it now.
      std::vector<AllocationEvent> overtaken;
      for (auto early = early_frees.begin(); early != early_frees.end();) {
        const std::uint64_t first = early->first;
        if (first >= id && first < id + event.device_count) {
          mask &= ~bits(static_cast<std::uint32_t>(first - id), early->second.device_count);
          overtaken.push_back(early->second);
          early_frees.erase(early++);
        } else {
          ++early;
        }
      }
      allocated(event, stream, mask != 0);
      if (stream) {
        for (const AllocationEvent& free : overtaken) encode(free);
      }
      if (mask == 0) return;
      live.insert_or_assign(id, Group{to_record(event), mask});
      live_device_buffers += static_cast<std::uint64_t>(std::popcount(mask));
      return;
    }
    const auto group = find_group(id);
    if (group == live.end()) {
      early_frees.emplace(id, event);  // not yet: it waits for its Alloc
      return;
    }
    if (stream) encode(event);
    const std::uint64_t freed = group->second.live_mask & bits(static_cast<std::uint32_t>(id - group->first), event.device_count);
    group->second.live_mask &= ~freed;
    live_device_buffers -= static_cast<std::uint64_t>(std::popcount(freed));
    if (group->second.live_mask == 0) forget_group(group);
  }

  // ---- encoding: runs of events become one frame; order between kinds is kept ----

  std::vector<protocol::EventRecord> pending;
  // Records per Events frame: 4,096 (192 KiB) while running, 1,024 at exit. A frame in progress
  // must be finished before anything else is said, so after a give-up a short one lets the
  // Goodbye through; the server's cost per frame is small against 4,096 records.
  static constexpr std::size_t running_frame_records = 4096;
  static constexpr std::size_t exit_frame_records = 1024;
  std::size_t frame_records = running_frame_records;

  void flush_pending() {
    if (pending.empty()) return;
    protocol::encode_events(next_sequence, pending, out);
    next_sequence += pending.size();
    pending.clear();
  }

  void encode(const AllocationEvent& event) {
    if (event.kind == EventKind::allocate) {
      pending.push_back(protocol::EventRecord::of(to_record(event)));
    } else {
      pending.push_back(protocol::EventRecord::of(
          protocol::FreeRecord{event.buffer.value(), event.time_ns, static_cast<std::uint8_t>(event.reason),
                               static_cast<std::uint16_t>(event.device_count)}));
    }
    if (pending.size() >= frame_records) flush_pending();
  }

  // Hello, what the server must know, and the whole live table.
  void encode_session_start() {
    outbound.clear();
    protocol::encode(protocol::Hello{.protocol_version = protocol::version,
                                     .role = protocol::ClientRole::tracker,
                                     .claimed_pid = static_cast<std::uint32_t>(::getpid()),
                                     .process_name = options.process_name},
                     out);
    encode_snapshot();
  }

  void encode_snapshot() {
    if (!devices.empty()) {
      protocol::DeviceInfo info;
      for (const auto& [id, totals] : devices) info.devices.push_back(totals);
      protocol::encode(info, out);
    }
    // Only live groups have names here: the snapshot carries exactly the names still in use.
    for (const auto& [mesh_buffer, name] : names) protocol::encode(protocol::MeshBufferName{mesh_buffer, name}, out);
    protocol::encode(protocol::SnapshotBegin{}, out);
    std::vector<protocol::AllocRecord> chunk;
    chunk.reserve(std::min(live.size(), protocol::max_records));
    std::uint64_t records = 0;
    for (const auto& [id, group] : live) {
      // One record per run of still-live device buffers of the group.
      std::uint64_t mask = group.live_mask;
      while (mask != 0) {
        const auto start = static_cast<std::uint32_t>(std::countr_zero(mask));
        const auto length = static_cast<std::uint32_t>(std::countr_one(mask >> start));
        protocol::AllocRecord run = group.record;
        run.buffer += start;
        run.device += start;
        run.device_count = static_cast<std::uint16_t>(length);
        chunk.push_back(run);
        ++records;
        mask &= ~bits(start, length);
        if (chunk.size() == protocol::max_records) {
          protocol::encode_snapshot_chunk(chunk, out);
          chunk.clear();
        }
      }
    }
    if (!chunk.empty()) protocol::encode_snapshot_chunk(chunk, out);
    protocol::encode(protocol::SnapshotEnd{next_sequence, records}, out);
    outbound.keep_what_is_queued();
    need_snapshot = false;
    const std::scoped_lock lock(mutex);
    ++status.snapshots;
  }

  // The server is not reading: drop the frames that wait, resynchronise when it reads again.
  void drop_pending() {
    if (!outbound.cut_unsent()) return;
    need_snapshot = true;
    const std::scoped_lock lock(mutex);
    ++status.overflows;
  }

  // ---- the socket ----

  [[nodiscard]] bool connected() const { return fd >= 0; }

  void close_socket() {
    if (fd < 0) return;
    forget_socket(fd);
    ::close(fd);
    fd = -1;
  }

  void disconnect(const std::string& why) {
    close_socket();
    outbound.clear();
    need_snapshot = true;
    next_connect = Clock::now() + options.reconnect_interval;
    if (!warned) {
      warn(fmt::format("meshrt: tracking: lost the allocation server at {} ({}); tracking continues in-process and "
                       "will resynchronise when it is back",
                       options.socket_path, why));
      warned = true;
    }
    const std::scoped_lock lock(mutex);
    status.connected = false;
  }

  // Never waits: a server whose listen backlog is full (stopped, or swamped) refuses at once with
  // EAGAIN, and the client tries again after reconnect_interval.
  void try_connect() {
    if (Clock::now() < next_connect) return;
    next_connect = Clock::now() + options.reconnect_interval;
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    if (options.socket_path.size() >= sizeof(address.sun_path)) {
      if (!warned) warn(fmt::format("meshrt: tracking: socket path {} is too long", options.socket_path));
      warned = true;
      return;
    }
    std::memcpy(address.sun_path, options.socket_path.c_str(), options.socket_path.size() + 1);
    const int candidate = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (candidate < 0) return;
    if (::connect(candidate, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
      const int error = errno;
      ::close(candidate);
      {
        const std::scoped_lock lock(mutex);
        ++status.connect_attempts_refused;
      }
      if (!warned) {
        warn(fmt::format("meshrt: tracking: no allocation server at {} ({}); the application runs on with "
                         "in-process tracking and will connect when the server {}",
                         options.socket_path, std::system_category().message(error),
                         error == EAGAIN ? "accepts connections again" : "appears"));
        warned = true;
      }
      return;
    }
    fd = candidate;
    remember_socket(fd);
    encode_session_start();
    if (warned) {
      warn(fmt::format("meshrt: tracking: connected to the allocation server at {}; resynchronised {} live buffers",
                       options.socket_path, live_device_buffers));
      warned = false;
    }
    const std::scoped_lock lock(mutex);
    status.connected = true;
    ++status.connections;
  }

  // Reads what the server said: only an Error (before it closes the session) is expected.
  void read_server() {
    std::array<std::byte, 4096> buffer{};
    std::vector<std::byte> input;
    for (;;) {
      const ssize_t got = ::recv(fd, buffer.data(), buffer.size(), 0);
      if (got == 0) return disconnect("the server closed the session");
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return disconnect(std::system_category().message(errno));
      }
      input.insert(input.end(), buffer.begin(), buffer.begin() + got);
    }
    const auto next = protocol::next_frame(input);
    if (!next) return;
    if (const std::optional<protocol::Frame>& frame = *next) {
      if (auto message = protocol::decode(*frame)) {
        if (const auto* error = std::get_if<protocol::ErrorMessage>(&*message)) {
          warned = false;  // this reason matters more than "lost"
          return disconnect(fmt::format("the server refused: {}", error->message));
        }
      }
    }
  }

  // Writes what it can until `deadline`, waiting for the socket only while there is something to
  // send (a wait for replies the server never sends would hold every clean exit for the whole
  // timeout); stops early once at most `leave` bytes wait. False when the connection broke.
  bool pump_until(Clock::time_point deadline, std::size_t leave = 0) {
    while (connected()) {
      const bool sending = !outbound.all_sent();
      pollfd poller{fd, static_cast<short>(POLLIN | (sending ? POLLOUT : 0)), 0};
      const auto remaining = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
      const int ready = ::poll(&poller, 1, sending ? static_cast<int>(std::max<std::int64_t>(remaining.count(), 0)) : 0);
      if (ready < 0 && errno != EINTR) {
        disconnect(std::system_category().message(errno));
        return false;
      }
      if ((poller.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
        read_server();
        if (!connected()) return false;
      }
      while (!outbound.all_sent()) {
        const auto unsent = outbound.unsent();
        const ssize_t sent = ::send(fd, unsent.data(), unsent.size(), MSG_NOSIGNAL);
        if (sent < 0) {
          if (errno == EINTR) continue;
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          disconnect(std::system_category().message(errno));
          return false;
        }
        outbound.sent(static_cast<std::size_t>(sent));
      }
      if (outbound.all_sent()) return true;
      if (outbound.pending() <= leave || Clock::now() >= deadline) return true;
    }
    return false;
  }

  // ---- the sender thread ----

  // Applies the events published on every lane since the last round, recycling the chunks it
  // has finished and reaping lanes whose thread has exited; returns how many events that was. A
  // round takes at most a few chunks from each lane, so that sending is never starved by a
  // thread that records without pause.
  static constexpr std::uint64_t chunks_per_round = 16;
  bool more_waiting = false;
  std::uint64_t peak_pending_bytes = 0;  // the most encoded bytes ever waiting for the server

  std::uint64_t apply_lanes(bool stream) {
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
          const AllocationEvent& event = chunk->events[i];
          if (i + 1 < published && cancels(event, chunk->events[i + 1]) && early_frees.empty()) {
            allocated(event, stream, false);
            if (stream) encode(chunk->events[i + 1]);
            ++i;
            continue;
          }
          apply(event, stream);
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

  // One round: what came in since the last, applied and (when connected) sent without waiting.
  // Returns the events taken.
  std::uint64_t round() {
    std::vector<protocol::DeviceTotals> new_devices;
    {
      const std::scoped_lock lock(mutex);
      new_devices.swap(device_queue);
    }
    for (const protocol::DeviceTotals& device : new_devices) devices[device.device] = device;
    // Streaming: events go out as they are applied. Otherwise the live table alone takes them
    // and the snapshot of the next session (or of the resync) carries their effect.
    const bool stream = connected() && !need_snapshot;
    if (stream && !new_devices.empty()) protocol::encode(protocol::DeviceInfo{new_devices}, out);
    const std::uint64_t taken = apply_lanes(stream);
    if (stream) flush_pending();
    if (!connected()) {
      try_connect();  // a new session starts with a snapshot: it covers these events
    } else if (need_snapshot && outbound.all_sent()) {
      encode_snapshot();
    }
    if (connected()) peak_pending_bytes = std::max<std::uint64_t>(peak_pending_bytes, outbound.pending());
    return taken;
  }

  void publish_status(std::uint64_t taken, std::uint64_t flush_round) {
    {
      const std::scoped_lock lock(mutex);
      status.events_taken += taken;
      // Every event queued before flush request `flush_round` was taken (no lane has more) and
      // written: the request is met.
      if (connected() && outbound.all_sent() && !need_snapshot && !more_waiting) {
        status.events_delivered = status.events_taken;
        flushed_through = flush_round;
      }
      status.live_buffers = live_device_buffers;
      status.names = names.size() + arrived_names.size();
      status.pending_bytes = connected() ? outbound.pending() : 0;
      status.peak_pending_bytes = peak_pending_bytes;
      status.frees_waiting = early_frees.size();
      status.lanes = lanes.lane_count();
      status.chunks = lanes.chunks_allocated();
    }
    delivered_changed.notify_all();
  }

  void run() {
    try_connect();  // at once: a server that is there sees the first allocations as they happen
    std::uint64_t flush_round{};
    for (;;) {
      {
        std::unique_lock lock(mutex);
        if (!more_waiting) {
          // A flush or a shutdown asked while the last round ran is not missed.
          wake.wait_for(lock, options.flush_interval, [&] {
            return flush_requests != flush_round || stopping.load(std::memory_order_relaxed);
          });
        }
        flush_round = flush_requests;
      }
      if (stopping.load(std::memory_order_acquire)) break;
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

  // A clean exit, within shutdown_timeout: every lane drained and sent, then Goodbye. A server
  // too slow for that gets what fits, then a Goodbye that says the client gave up, so the
  // server reports what it still holds of this process as lost at exit, not leaked.
  void finish() {
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
    // Frees whose Alloc never came are a runtime bug: the server counts them as unknown.
    if (complete && !need_snapshot) {
      for (const auto& [id, event] : early_frees) encode(event);
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
    close_socket();
  }
};

std::shared_ptr<TrackingClient> TrackingClient::start(Options options) {
  std::call_once(fork_handler_installed, [] { ::pthread_atfork(nullptr, nullptr, count_fork_in_child); });
  if (options.socket_path.empty()) options.socket_path = protocol::default_socket_path();
  if (options.process_name.empty()) options.process_name = own_process_name();
  auto state = std::make_unique<State>();
  state->options = std::move(options);
  State& s = *state;
  auto client = std::shared_ptr<TrackingClient>(new TrackingClient(std::move(state)));
  s.sender = std::make_unique<std::thread>([&s] { s.run(); });
  return client;
}

TrackingClient::TrackingClient(std::unique_ptr<State> state) : state_(std::move(state)) {}

TrackingClient::~TrackingClient() {
  if (state_->forked_away()) {
    // A fork's child: the sender thread is the parent's (its std::thread would terminate the
    // process if destroyed joinable), and any lock may have been held by one of the parent's
    // threads at the fork. The child's copy is left as it is, never freed.
    (void)state_.release();  // NOLINT(bugprone-unused-return-value): deliberately never freed
    return;
  }
  shutdown();
}

void TrackingClient::shutdown() {
  if (state_->forked_away()) return;  // the parent's to do
  {
    const std::scoped_lock lock(state_->mutex);
    state_->stopping.store(true, std::memory_order_release);
  }
  state_->wake.notify_one();
  if (state_->sender && state_->sender->joinable()) state_->sender->join();
  state_->lanes.close();  // no thread may wait for a chunk the sender will never give back
}

void TrackingClient::process(std::span<const AllocationEvent> events) noexcept {
  if (state_->stopping.load(std::memory_order_relaxed) || state_->forked_away()) return;
  const detail::LaneLease lease = state_->lanes.for_this_thread();
  if (lease.lane == nullptr) return;
  detail::Lane& lane = *lease.lane;
  bool kick = false;
  for (const AllocationEvent& event : events) {
    detail::Chunk* chunk = lane.tail;
    const std::size_t at = chunk->published.load(std::memory_order_relaxed);  // only we write it
    if (at == detail::Chunk::capacity) {
      detail::Chunk* fresh = state_->lanes.take_next();
      if (fresh == nullptr) return;  // shutting down: the last events go unrecorded
      chunk->next.store(fresh, std::memory_order_release);
      lane.tail = fresh;
      const std::uint64_t waiting = ++lane.full_chunks;
      kick = kick || waiting % wake_chunks == 0;
      fresh->events[0] = event;
      fresh->published.store(1, std::memory_order_release);
      continue;
    }
    chunk->events[at] = event;
    chunk->published.store(at + 1, std::memory_order_release);
  }
  lane.queued.store(lane.queued.load(std::memory_order_relaxed) + events.size(), std::memory_order_relaxed);
  if (kick) state_->wake.notify_one();  // a missed wake-up costs one flush interval, no more
}

void TrackingClient::describe_devices(std::span<const DeviceDescription> devices) noexcept {
  if (state_->forked_away()) return;
  const std::scoped_lock lock(state_->mutex);
  for (const DeviceDescription& device : devices) {
    state_->device_queue.push_back({device.device.value(), device.total_bytes, device.bank_count, device.base_address});
  }
}

void TrackingClient::describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view name) noexcept {
  if (state_->forked_away()) return;
  const std::scoped_lock lock(state_->mutex);
  state_->name_queue.insert_or_assign(mesh_buffer.value(), std::string(name.substr(0, protocol::max_name_size)));
  state_->names_queued.store(state_->name_queue.size(), std::memory_order_release);
}

bool TrackingClient::flush(std::chrono::milliseconds timeout) {
  if (state_->forked_away()) return false;
  std::unique_lock lock(state_->mutex);
  if (state_->stopping.load(std::memory_order_relaxed)) return false;
  const std::uint64_t request = ++state_->flush_requests;
  state_->wake.notify_one();
  return state_->delivered_changed.wait_for(lock, timeout, [&] { return state_->flushed_through >= request; });
}

TrackingClient::Status TrackingClient::status() const {
  if (state_->forked_away()) return Status{};
  Status status;
  {
    const std::scoped_lock lock(state_->mutex);
    status = state_->status;
  }
  status.events_queued = state_->lanes.events_queued();
  return status;
}

}  // namespace meshrt
