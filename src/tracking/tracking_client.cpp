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
import :server_connection;

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
void count_fork_in_child() {
  fork_generation.fetch_add(1, std::memory_order_relaxed);
  detail::close_connections_in_child();  // async-signal-safe
}
std::once_flag fork_handler_installed;

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

protocol::FreeRecord to_free_record(const AllocationEvent& event) {
  return protocol::FreeRecord{event.buffer.value(), event.time_ns, static_cast<std::uint8_t>(event.reason),
                              static_cast<std::uint16_t>(event.device_count)};
}

// An Alloc and the Free of exactly its buffers.
bool cancels(const AllocationEvent& alloc, const AllocationEvent& free) {
  return alloc.kind == EventKind::allocate && free.kind == EventKind::free && alloc.buffer == free.buffer &&
         alloc.device_count == free.device_count;
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
  detail::ServerConnection connection;
  protocol::OutboundFrames& outbound = connection.outbound();
  std::vector<std::byte>& out = outbound.frames();  // where encoders append
  // What is live, connected or not. A Free can overtake its Alloc when the two were recorded on
  // different threads' lanes: the table keeps it until the Alloc arrives.
  protocol::LiveGroups table;
  std::map<std::uint32_t, protocol::DeviceTotals> devices;
  // Names taken from name_queue whose Alloc has not been applied yet.
  std::unordered_map<std::uint64_t, std::string> arrived_names;
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

  // An Alloc goes out after its name (if any): the name frame between the events before it and it.
  void send_alloc(const protocol::AllocRecord& record, const std::optional<std::string>& name) {
    if (name) {
      flush_pending();
      protocol::encode(protocol::MeshBufferName{record.mesh_buffer, *name}, out);
    }
    encode(protocol::EventRecord::of(record));
  }

  // Applies one event to the live table; when `stream` is set, also encodes what the server must
  // hear, in an order it accepts (each Alloc before its Free).
  void apply(const AllocationEvent& event, bool stream) {
    if (event.kind == EventKind::allocate) {
      const protocol::AllocRecord record = to_record(event);
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

  void encode(const protocol::EventRecord& record) {
    pending.push_back(record);
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
    for (const auto& [mesh_buffer, name] : table.live_names()) {
      protocol::encode(protocol::MeshBufferName{mesh_buffer, name}, out);
    }
    protocol::encode(protocol::SnapshotBegin{}, out);
    std::vector<protocol::AllocRecord> chunk;
    chunk.reserve(std::min<std::uint64_t>(table.live_device_buffers(), protocol::max_records));
    std::uint64_t records = 0;
    table.for_each_live_record([&](const protocol::AllocRecord& record) {
      chunk.push_back(record);
      ++records;
      if (chunk.size() == protocol::max_records) {
        protocol::encode_snapshot_chunk(chunk, out);
        chunk.clear();
      }
    });
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

  [[nodiscard]] bool connected() const { return connection.connected(); }

  void disconnect(const Error& why) {
    connection.close();
    need_snapshot = true;
    next_connect = Clock::now() + options.reconnect_interval;
    if (why.code == ErrorCode::permission_denied) warned = false;  // a refusal matters more than "lost"
    if (!warned) {
      warn(fmt::format("meshrt: tracking: lost the allocation server at {} ({}); tracking continues in-process and "
                       "will resynchronise when it is back",
                       options.socket_path, why.message));
      warned = true;
    }
    const std::scoped_lock lock(mutex);
    status.connected = false;
  }

  // Never waits (ServerConnection::connect); a refusal is tried again after reconnect_interval.
  void try_connect() {
    if (Clock::now() < next_connect) return;
    next_connect = Clock::now() + options.reconnect_interval;
    if (auto connected = connection.connect(options.socket_path); !connected) {
      {
        const std::scoped_lock lock(mutex);
        ++status.connect_attempts_refused;
      }
      if (!warned) {
        const Error& error = connected.error();
        warn(error.code == ErrorCode::invalid_argument
                 ? fmt::format("meshrt: tracking: {}", error.message)
                 : fmt::format("meshrt: tracking: no allocation server at {} ({}); the application runs on with "
                               "in-process tracking and will connect when the server {}",
                               options.socket_path, error.message,
                               error.code == ErrorCode::limit_exceeded ? "accepts connections again" : "appears"));
        warned = true;
      }
      return;
    }
    encode_session_start();
    if (warned) {
      warn(fmt::format("meshrt: tracking: connected to the allocation server at {}; resynchronised {} live buffers",
                       options.socket_path, table.live_device_buffers()));
      warned = false;
    }
    const std::scoped_lock lock(mutex);
    status.connected = true;
    ++status.connections;
  }

  // Writes until `deadline` (ServerConnection::pump_until); false when the connection broke.
  bool pump_until(Clock::time_point deadline, std::size_t leave = 0) {
    if (!connected()) return false;
    auto pumped = connection.pump_until(deadline, leave);
    if (!pumped) disconnect(pumped.error());
    return pumped.has_value();
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
          if (i + 1 < published && cancels(event, chunk->events[i + 1]) && table.frees_waiting() == 0) {
            const std::optional<std::string> name = take_name(event.mesh_buffer.value());
            if (stream) {
              send_alloc(to_record(event), name);
              encode(protocol::EventRecord::of(to_free_record(chunk->events[i + 1])));
            }
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
      status.live_buffers = table.live_device_buffers();
      status.names = table.names() + arrived_names.size();
      status.pending_bytes = connected() ? outbound.pending() : 0;
      status.peak_pending_bytes = peak_pending_bytes;
      status.frees_waiting = table.frees_waiting();
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
      fresh->record(0, event);
      fresh->published.store(1, std::memory_order_release);
      continue;
    }
    chunk->record(at, event);
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
