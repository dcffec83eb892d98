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

namespace meshrt {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Past this many chunks waiting in its lane an application thread wakes the sender early.
constexpr std::size_t wake_chunks = 4;

// Events travel in fixed chunks, linked one after the other, written by one application thread
// and read by the sender. Chunks are recycled, never freed while the client lives: after a
// warm-up, recording writes only into memory that is already mapped (ADR 0012).
struct Chunk {
  static constexpr std::size_t capacity = 1024;  // 64 KiB of events
  std::array<AllocationEvent, capacity> events;
  std::atomic<std::size_t> published{0};  // events[0, published) are written and visible
  std::atomic<Chunk*> next{nullptr};      // set once this chunk is full
};

// The pool is touched once per chunk (1,024 events), so a plain mutex serves. It is bounded:
// when application threads record faster than the sender can apply (tens of millions of events
// a second), take() waits for the sender to give a chunk back rather than grow without end.
class ChunkPool {
 public:
  static constexpr std::size_t max_chunks = 256;  // 16 MiB of queued events

  // nullptr once closed: the client is shutting down.
  Chunk* take() {
    std::unique_lock lock(mutex_);
    if (free_.empty() && owned_.size() < max_chunks) {
      owned_.push_back(std::make_unique<Chunk>());
      return owned_.back().get();
    }
    returned_.wait(lock, [&] { return !free_.empty() || closed_; });
    if (free_.empty()) return nullptr;
    Chunk* chunk = free_.front();  // the longest idle: least likely still in the sender's cache
    free_.pop_front();
    return chunk;
  }
  void give(Chunk* chunk) {
    chunk->published.store(0, std::memory_order_relaxed);
    chunk->next.store(nullptr, std::memory_order_relaxed);
    {
      const std::scoped_lock guard(mutex_);
      free_.push_back(chunk);
    }
    returned_.notify_one();
  }
  void close() {
    {
      const std::scoped_lock guard(mutex_);
      closed_ = true;
    }
    returned_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable returned_;
  std::vector<std::unique_ptr<Chunk>> owned_;
  std::deque<Chunk*> free_;
  bool closed_{false};
};

// One application thread's queue: single producer, single consumer, no lock. The producer
// writes an event and publishes the new count with a release store (a plain store on x86: it
// never waits for the write to reach memory); the sender reads the count with acquire.
struct Lane {
  explicit Lane(Chunk* first) : tail(first), head(first) {}
  // Producer side.
  alignas(64) Chunk* tail;
  std::atomic<std::uint64_t> queued{0};  // events handed to process() on this lane
  std::atomic<std::uint64_t> full_chunks{0};
  // Consumer (sender) side.
  alignas(64) Chunk* head;
  std::size_t consumed{0};
  std::uint64_t chunks_taken{0};
};

// Which lane this thread writes to, per client: a client id (never reused) and its lane.
struct LaneBinding {
  std::uint64_t client{0};
  Lane* lane{nullptr};
};
std::atomic<std::uint64_t> next_client_id{1};

// An Alloc and the Free of exactly its buffers.
bool cancels(const AllocationEvent& alloc, const AllocationEvent& free) {
  return alloc.kind == EventKind::allocate && free.kind == EventKind::free && alloc.buffer == free.buffer &&
         alloc.device_count == free.device_count;
}

// How long a clean exit may wait for a slow server to take the last events.

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

  // One lane per application thread that ever recorded through this client.
  const std::uint64_t client_id{next_client_id.fetch_add(1, std::memory_order_relaxed)};
  ChunkPool pool;
  std::mutex lanes_mutex;
  std::vector<std::unique_ptr<Lane>> lanes;

  // nullptr only while the client shuts down.
  Lane* lane_of_this_thread() {
    thread_local LaneBinding binding;
    if (binding.client != client_id) {
      Chunk* first = pool.take();
      if (first == nullptr) return nullptr;
      auto lane = std::make_unique<Lane>(first);
      const std::scoped_lock guard(lanes_mutex);
      lanes.push_back(std::move(lane));
      binding = {client_id, lanes.back().get()};
    }
    return binding.lane;
  }
  std::atomic<bool> stopping{false};

  // Shared with flush()/status()/describe_*, under `mutex`.
  mutable std::mutex mutex;
  std::condition_variable wake;
  std::condition_variable delivered_changed;
  std::vector<protocol::DeviceTotals> device_queue;
  std::vector<protocol::MeshBufferName> name_queue;
  std::uint64_t flush_requests{};  // flush() calls so far
  std::uint64_t flushed_through{};  // the last request whose events were all delivered
  Status status;

  // The sender thread's own world.
  int fd{-1};
  std::vector<std::byte> out;
  std::size_t out_start{};
  std::size_t out_keep{};  // out[0, out_keep) starts a session or resynchronises it: never dropped
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
  struct Name {
    std::string text;
    std::uint64_t live{};
  };
  std::unordered_map<std::uint64_t, Name> names;
  std::uint64_t next_sequence{};
  bool need_snapshot{true};
  bool warned{false};  // a warning is out; the next connect says so
  Clock::time_point next_connect{};
  std::thread sender;

  void warn(const std::string& line) const {
    if (options.warn) {
      options.warn(line);
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  }

  // ---- the live table, names and devices: updated for every event, connected or not ----

  void remember(const protocol::MeshBufferName& name) {
    if (!name.name.empty()) names[name.mesh_buffer].text = name.name;
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
    if (const auto name = names.find(group->second.record.mesh_buffer); name != names.end() && --name->second.live == 0) {
      names.erase(name);
    }
    live.erase(group);
  }

  // Applies one event to the live table; when `stream` is set, also encodes what the server must
  // hear, in an order it accepts (each Alloc before its Free).
  void apply(const AllocationEvent& event, bool stream) {
    const std::uint64_t id = event.buffer.value();
    if (event.kind == EventKind::allocate) {
      if (stream) encode(event);
      std::uint64_t mask = bits(0, event.device_count);
      // Frees that overtook this Alloc (recorded on another thread's lane) follow it now.
      for (auto early = early_frees.begin(); early != early_frees.end();) {
        const std::uint64_t first = early->first;
        if (first >= id && first < id + event.device_count) {
          if (stream) encode(early->second);
          mask &= ~bits(static_cast<std::uint32_t>(first - id), early->second.device_count);
          early_frees.erase(early++);
        } else {
          ++early;
        }
      }
      if (mask == 0) return;
      live.insert_or_assign(id, Group{to_record(event), mask});
      live_device_buffers += static_cast<std::uint64_t>(std::popcount(mask));
      if (!names.empty()) {
        if (const auto name = names.find(event.mesh_buffer.value()); name != names.end()) ++name->second.live;
      }
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

  // ---- encoding: runs of one kind become one frame; order between kinds is kept ----

  std::vector<protocol::EventRecord> pending;

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
    if (pending.size() == protocol::max_records) flush_pending();
  }

  void finish_encoding() { flush_pending(); }

  // Hello, what the server must know, and the whole live table.
  void encode_session_start() {
    out.clear();
    out_start = 0;
    out_keep = 0;
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
    for (const auto& [mesh_buffer, name] : names) protocol::encode(protocol::MeshBufferName{mesh_buffer, name.text}, out);
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
    out_keep = out.size();
    need_snapshot = false;
    const std::scoped_lock lock(mutex);
    ++status.snapshots;
  }

  // Where the whole frame that starts at `at` in `out` ends.
  [[nodiscard]] std::size_t frame_end(std::size_t at) const {
    std::uint32_t payload = 0;
    for (std::size_t i = 0; i < 4; ++i) payload |= std::to_integer<std::uint32_t>(out[at + i]) << (8U * i);
    return at + protocol::header_size + payload;
  }

  // Sent bytes stay at the front of `out` until it empties. A server that reads steadily but never
  // catches up would let them grow without bound, so whole sent frames are cut off now and then.
  void compact_sent() {
    if (out_start >= out.size() || out_start < (std::size_t{1} << 20U) || out_start < out.size() / 2) return;
    std::size_t boundary = 0;
    for (std::size_t next = frame_end(0); next <= out_start; next = frame_end(next)) boundary = next;
    out.erase(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(boundary));
    out_start -= boundary;
    out_keep = out_keep > boundary ? out_keep - boundary : 0;
  }

  // The server is not reading: drop the frames that wait, resynchronise when it reads again.
  // The frame being written stays whole (out_start may be inside it), or the stream would break.
  void drop_pending() {
    std::size_t boundary = 0;
    while (boundary < std::max(out_start, out_keep)) boundary = frame_end(boundary);
    out.resize(boundary);
    need_snapshot = true;
    const std::scoped_lock lock(mutex);
    ++status.overflows;
  }

  // ---- the socket ----

  [[nodiscard]] bool connected() const { return fd >= 0; }

  void disconnect(const std::string& why) {
    if (fd >= 0) ::close(fd);
    fd = -1;
    out.clear();
    out_start = 0;
    out_keep = 0;
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
    const int candidate = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (candidate < 0) return;
    if (::connect(candidate, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
      const int error = errno;
      ::close(candidate);
      if (!warned) {
        warn(fmt::format("meshrt: tracking: no allocation server at {} ({}); the application runs on with "
                         "in-process tracking and will connect when the server appears",
                         options.socket_path, std::system_category().message(error)));
        warned = true;
      }
      return;
    }
    ::fcntl(candidate, F_SETFL, ::fcntl(candidate, F_GETFL) | O_NONBLOCK);
    fd = candidate;
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

  // Writes what it can without blocking; false when the connection broke.
  bool pump(std::chrono::milliseconds wait) {
    const auto deadline = Clock::now() + wait;
    while (connected()) {
      // Waits only while there is something to send: with nothing pending, a wait for replies
      // the server never sends would hold every clean exit for the whole shutdown timeout.
      const bool sending = out.size() > out_start;
      pollfd poller{fd, static_cast<short>(POLLIN | (sending ? POLLOUT : 0)), 0};
      const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      const int ready = ::poll(&poller, 1, sending ? static_cast<int>(std::max<std::int64_t>(remaining.count(), 0)) : 0);
      if (ready < 0 && errno != EINTR) {
        disconnect(std::system_category().message(errno));
        return false;
      }
      if ((poller.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
        read_server();
        if (!connected()) return false;
      }
      while (out.size() > out_start) {
        const ssize_t sent = ::send(fd, out.data() + out_start, out.size() - out_start, MSG_NOSIGNAL);
        if (sent < 0) {
          if (errno == EINTR) continue;
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          disconnect(std::system_category().message(errno));
          return false;
        }
        out_start += static_cast<std::size_t>(sent);
      }
      if (out.size() == out_start) {
        out.clear();
        out_start = 0;
        out_keep = 0;
        return true;
      }
      if (Clock::now() >= deadline) return true;
    }
    return false;
  }

  // ---- the sender thread ----

  // Applies the events published on every lane since the last round, recycling the chunks it
  // has finished; returns how many events that was. A round takes at most a few chunks from
  // each lane, so that sending is never starved by a thread that records without pause.
  static constexpr std::uint64_t chunks_per_round = 16;
  bool more_waiting = false;
  std::uint64_t peak_pending_bytes = 0;  // the most encoded bytes ever waiting for the server

  std::uint64_t apply_lanes(bool stream) {
    more_waiting = false;
    std::vector<Lane*> current;
    {
      const std::scoped_lock guard(lanes_mutex);
      current.reserve(lanes.size());
      for (const auto& lane : lanes) current.push_back(lane.get());
    }
    std::uint64_t taken = 0;
    for (Lane* lane : current) {
      for (std::uint64_t chunks = 0;; ++chunks) {
        if (chunks == chunks_per_round) {
          more_waiting = true;
          break;
        }
        Chunk* chunk = lane->head;
        const std::size_t published = chunk->published.load(std::memory_order_acquire);
        for (std::size_t i = lane->consumed; i < published; ++i) {
          // A buffer whose whole life is two neighbours in one lane (a short-lived buffer) never
          // needs the live table: only the server hears of it.
          const AllocationEvent& event = chunk->events[i];
          if (i + 1 < published && cancels(event, chunk->events[i + 1]) && early_frees.empty()) {
            if (stream) {
              encode(event);
              encode(chunk->events[i + 1]);
            }
            ++i;
            continue;
          }
          apply(event, stream);
        }
        taken += published - lane->consumed;
        lane->consumed = published;
        Chunk* next = chunk->next.load(std::memory_order_acquire);
        if (published < Chunk::capacity || next == nullptr) break;
        lane->head = next;  // the producer has moved on: this chunk is done
        lane->consumed = 0;
        ++lane->chunks_taken;
        pool.give(chunk);
      }
    }
    return taken;
  }

  void run() {
    try_connect();  // at once: a server that is there sees the first allocations as they happen
    for (;;) {
      std::vector<protocol::DeviceTotals> new_devices;
      std::vector<protocol::MeshBufferName> new_names;
      std::uint64_t round{};
      bool stop = false;
      {
        std::unique_lock lock(mutex);
        if (!more_waiting) wake.wait_for(lock, options.flush_interval);
        stop = stopping.load(std::memory_order_acquire);
        round = flush_requests;
      }
      // Names before the lanes' events: a name is queued before its Allocs are published, so
      // every Alloc read after this finds its name.
      {
        const std::scoped_lock lock(mutex);
        new_devices.swap(device_queue);
        new_names.swap(name_queue);
      }
      for (const protocol::DeviceTotals& device : new_devices) devices[device.device] = device;
      for (const protocol::MeshBufferName& name : new_names) remember(name);
      // Streaming: events go out as they are applied. Otherwise the live table alone takes them
      // and the snapshot of the next session (or of the resync) carries their effect.
      const bool stream = connected() && !need_snapshot;
      if (stream) {
        if (!new_devices.empty()) protocol::encode(protocol::DeviceInfo{new_devices}, out);
        for (const protocol::MeshBufferName& name : new_names) protocol::encode(name, out);
      }
      const std::uint64_t taken = apply_lanes(stream);
      if (stream) finish_encoding();

      if (!connected()) {
        try_connect();  // a new session starts with a snapshot: it covers these events
      } else if (need_snapshot && out.size() == out_start) {
        encode_snapshot();
      }
      if (connected()) peak_pending_bytes = std::max<std::uint64_t>(peak_pending_bytes, out.size() - out_start);
      if (connected()) pump(stop ? options.shutdown_timeout : 0ms);
      if (connected() && out.size() - out_start > options.max_pending_bytes) drop_pending();
      if (connected()) compact_sent();
      {
        const std::scoped_lock lock(mutex);
        status.events_taken += taken;
        if (connected() && out.size() == out_start && !need_snapshot) {
          status.events_delivered = status.events_taken;
          flushed_through = round;
        }
        status.live_buffers = live_device_buffers;
        status.pending_bytes = connected() ? out.size() - out_start : 0;
        status.peak_pending_bytes = peak_pending_bytes;
        status.frees_waiting = early_frees.size();
      }
      delivered_changed.notify_all();
      if (stop) break;
    }
    if (connected()) {
      // Frees whose Alloc never came are a runtime bug: the server counts them as unknown.
      for (const auto& [id, event] : early_frees) encode(event);
      finish_encoding();
      protocol::encode(protocol::Goodbye{}, out);
      pump(options.shutdown_timeout);
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
  }
};

std::shared_ptr<TrackingClient> TrackingClient::start(Options options) {
  if (options.socket_path.empty()) options.socket_path = protocol::default_socket_path();
  if (options.process_name.empty()) options.process_name = own_process_name();
  auto state = std::make_unique<State>();
  state->options = std::move(options);
  State& s = *state;
  auto client = std::shared_ptr<TrackingClient>(new TrackingClient(std::move(state)));
  s.sender = std::thread([&s] { s.run(); });
  return client;
}

TrackingClient::TrackingClient(std::unique_ptr<State> state) : state_(std::move(state)) {}

TrackingClient::~TrackingClient() { shutdown(); }

void TrackingClient::shutdown() {
  {
    const std::scoped_lock lock(state_->mutex);
    state_->stopping.store(true, std::memory_order_release);
  }
  state_->wake.notify_one();
  if (state_->sender.joinable()) state_->sender.join();
  state_->pool.close();  // no thread may wait for a chunk the sender will never give back
}

void TrackingClient::process(std::span<const AllocationEvent> events) noexcept {
  if (state_->stopping.load(std::memory_order_relaxed)) return;
  Lane* const found = state_->lane_of_this_thread();
  if (found == nullptr) return;
  Lane& lane = *found;
  bool kick = false;
  for (const AllocationEvent& event : events) {
    Chunk* chunk = lane.tail;
    const std::size_t at = chunk->published.load(std::memory_order_relaxed);  // only we write it
    if (at == Chunk::capacity) {
      Chunk* fresh = state_->pool.take();
      if (fresh == nullptr) return;  // shutting down: the last events go unrecorded
      chunk->next.store(fresh, std::memory_order_release);
      lane.tail = fresh;
      const std::uint64_t waiting = lane.full_chunks.load(std::memory_order_relaxed) + 1;
      lane.full_chunks.store(waiting, std::memory_order_relaxed);
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
  const std::scoped_lock lock(state_->mutex);
  for (const DeviceDescription& device : devices) {
    state_->device_queue.push_back({device.device.value(), device.total_bytes, device.bank_count, device.base_address});
  }
}

void TrackingClient::describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view name) noexcept {
  const std::scoped_lock lock(state_->mutex);
  state_->name_queue.push_back({mesh_buffer.value(), std::string(name.substr(0, protocol::max_name_size))});
}

bool TrackingClient::flush(std::chrono::milliseconds timeout) {
  std::unique_lock lock(state_->mutex);
  const std::uint64_t request = ++state_->flush_requests;
  state_->wake.notify_one();
  return state_->delivered_changed.wait_for(lock, timeout, [&] { return state_->flushed_through >= request; });
}

TrackingClient::Status TrackingClient::status() const {
  Status status;
  {
    const std::scoped_lock lock(state_->mutex);
    status = state_->status;
  }
  status.events_queued = 0;
  const std::scoped_lock guard(state_->lanes_mutex);
  for (const auto& lane : state_->lanes) status.events_queued += lane->queued.load(std::memory_order_relaxed);
  return status;
}

}  // namespace meshrt
