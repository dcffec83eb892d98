module;
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

#include <fmt/format.h>
#include <gsl/gsl>

module meshrt.tracking;

import meshrt.core;
import meshrt.protocol;

namespace meshrt {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Past this many events in its lane an application thread wakes the sender early.
constexpr std::size_t wake_threshold = 4096;
// Application threads spread over this many lanes, each with its own tiny lock, so that
// recording an event never waits on the sender or (usually) on another thread.
constexpr std::size_t lane_count = 16;

std::atomic<std::size_t> next_lane{0};

std::size_t this_thread_lane() {
  thread_local const std::size_t lane = next_lane.fetch_add(1, std::memory_order_relaxed) % lane_count;
  return lane;
}

// One application-thread queue. The lock is held only to append or to swap the vector out.
struct alignas(64) Lane {
  std::atomic<bool> locked{false};
  std::vector<AllocationEvent> events;
  std::uint64_t queued{};

  void lock() {
    for (int spins = 0; locked.exchange(true, std::memory_order_acquire); ++spins) {
      while (locked.load(std::memory_order_relaxed)) {
        if (++spins > 64) std::this_thread::yield();  // the holder may be preempted: 2 cores
      }
    }
  }
  void unlock() { locked.store(false, std::memory_order_release); }
};
// How long a clean exit may wait for a slow server to take the last events.
constexpr auto final_flush_timeout = 2s;

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
  };
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

  // Written by application threads.
  std::array<Lane, lane_count> lanes;
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
  std::unordered_map<std::uint64_t, protocol::AllocRecord> live;
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

  // Applies one event to the live table and appends what the server must hear, in an order it
  // accepts (each Alloc before its Free), to `ordered`.
  void apply(const AllocationEvent& event, std::vector<AllocationEvent>& ordered) {
    const std::uint64_t id = event.buffer.value();
    if (event.kind == EventKind::allocate) {
      ordered.push_back(event);
      if (const auto early = early_frees.find(id); early != early_frees.end()) {
        ordered.push_back(early->second);  // its whole life fell between two drains
        early_frees.erase(early);
        return;
      }
      live.insert_or_assign(id, to_record(event));
      if (const auto name = names.find(event.mesh_buffer.value()); name != names.end()) ++name->second.live;
      return;
    }
    const auto found = live.find(id);
    if (found == live.end()) {
      early_frees.emplace(id, event);
      return;
    }
    ordered.push_back(event);
    if (const auto name = names.find(found->second.mesh_buffer); name != names.end() && --name->second.live == 0) {
      names.erase(name);
    }
    live.erase(found);
  }

  // ---- encoding ----

  void encode_events(std::span<const AllocationEvent> events) {
    std::vector<protocol::AllocRecord> allocs;
    std::vector<protocol::FreeRecord> frees;
    const auto flush_allocs = [&] {
      if (allocs.empty()) return;
      protocol::encode_alloc_batch(next_sequence, allocs, out);
      next_sequence += allocs.size();
      allocs.clear();
    };
    const auto flush_frees = [&] {
      if (frees.empty()) return;
      protocol::encode_free_batch(next_sequence, frees, out);
      next_sequence += frees.size();
      frees.clear();
    };
    // Runs of one kind become one frame; order between kinds is kept.
    for (const AllocationEvent& event : events) {
      if (event.kind == EventKind::allocate) {
        flush_frees();
        allocs.push_back(to_record(event));
        if (allocs.size() == protocol::max_alloc_records) flush_allocs();
      } else {
        flush_allocs();
        frees.push_back({event.buffer.value(), event.time_ns, static_cast<std::uint8_t>(event.reason)});
        if (frees.size() == protocol::max_free_records) flush_frees();
      }
    }
    flush_allocs();
    flush_frees();
  }

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
    chunk.reserve(std::min(live.size(), protocol::max_alloc_records));
    for (const auto& [id, record] : live) {
      chunk.push_back(record);
      if (chunk.size() == protocol::max_alloc_records) {
        protocol::encode_snapshot_chunk(chunk, out);
        chunk.clear();
      }
    }
    if (!chunk.empty()) protocol::encode_snapshot_chunk(chunk, out);
    protocol::encode(protocol::SnapshotEnd{next_sequence, live.size()}, out);
    out_keep = out.size();
    need_snapshot = false;
    const std::scoped_lock lock(mutex);
    ++status.snapshots;
  }

  // The server is not reading: drop the frames that wait, resynchronise when it reads again.
  // The frame being written stays whole (out_start may be inside it), or the stream would break.
  void drop_pending() {
    std::size_t boundary = 0;
    while (boundary < std::max(out_start, out_keep)) {
      std::uint32_t payload = 0;
      for (std::size_t i = 0; i < 4; ++i) payload |= std::to_integer<std::uint32_t>(out[boundary + i]) << (8U * i);
      boundary += protocol::header_size + payload;
    }
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
                       options.socket_path, live.size()));
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
      pollfd poller{fd, static_cast<short>(POLLIN | (out.size() > out_start ? POLLOUT : 0)), 0};
      const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      const int ready = ::poll(&poller, 1, static_cast<int>(std::max<std::int64_t>(remaining.count(), 0)));
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

  // Takes every lane's events (swapping vectors, so a lane is locked only for the swap).
  void drain_lanes(std::vector<AllocationEvent>& taken, std::vector<AllocationEvent>& spare) {
    for (Lane& lane : lanes) {
      lane.lock();
      spare.swap(lane.events);
      lane.unlock();
      taken.insert(taken.end(), spare.begin(), spare.end());
      spare.clear();
    }
  }

  void run() {
    try_connect();  // at once: a server that is there sees the first allocations as they happen
    std::vector<AllocationEvent> taken;
    std::vector<AllocationEvent> spare;
    std::vector<AllocationEvent> ordered;
    for (;;) {
      std::vector<protocol::DeviceTotals> new_devices;
      std::vector<protocol::MeshBufferName> new_names;
      std::uint64_t round{};
      bool stop = false;
      {
        std::unique_lock lock(mutex);
        wake.wait_for(lock, options.flush_interval);
        stop = stopping.load(std::memory_order_acquire);
        round = flush_requests;
      }
      // Lanes before names: a name is queued before its Allocs, so any Alloc taken now has its
      // name in the queue already.
      taken.clear();
      drain_lanes(taken, spare);
      {
        const std::scoped_lock lock(mutex);
        new_devices.swap(device_queue);
        new_names.swap(name_queue);
      }
      for (const protocol::DeviceTotals& device : new_devices) devices[device.device] = device;
      for (const protocol::MeshBufferName& name : new_names) remember(name);
      ordered.clear();
      for (const AllocationEvent& event : taken) apply(event, ordered);

      if (!connected()) {
        try_connect();  // a new session starts with a snapshot: it covers these events
      } else if (need_snapshot) {
        if (out.size() == out_start) encode_snapshot();
      } else {
        if (!new_devices.empty()) protocol::encode(protocol::DeviceInfo{new_devices}, out);
        for (const protocol::MeshBufferName& name : new_names) protocol::encode(name, out);
        encode_events(ordered);
      }
      if (connected()) pump(stop ? std::chrono::duration_cast<std::chrono::milliseconds>(final_flush_timeout) : 0ms);
      if (connected() && out.size() - out_start > options.max_pending_bytes) drop_pending();
      {
        const std::scoped_lock lock(mutex);
        status.events_taken += taken.size();
        if (connected() && out.size() == out_start && !need_snapshot) {
          status.events_delivered = status.events_taken;
          flushed_through = round;
        }
        status.live_buffers = live.size();
      }
      delivered_changed.notify_all();
      if (stop) break;
    }
    if (connected()) {
      // Frees whose Alloc never came are a runtime bug: the server counts them as unknown.
      std::vector<AllocationEvent> orphans;
      for (const auto& [id, event] : early_frees) orphans.push_back(event);
      encode_events(orphans);
      protocol::encode(protocol::Goodbye{}, out);
      pump(std::chrono::duration_cast<std::chrono::milliseconds>(final_flush_timeout));
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
}

void TrackingClient::process(std::span<const AllocationEvent> events) noexcept {
  if (state_->stopping.load(std::memory_order_relaxed)) return;
  Lane& lane = state_->lanes[this_thread_lane()];
  lane.lock();
  lane.events.insert(lane.events.end(), events.begin(), events.end());
  lane.queued += events.size();
  const bool kick = lane.events.size() >= wake_threshold && lane.events.size() - events.size() < wake_threshold;
  lane.unlock();
  if (kick) state_->wake.notify_one();  // a missed wake-up costs one flush interval, no more
}

void TrackingClient::describe_devices(std::span<const DeviceDescription> devices) noexcept {
  const std::scoped_lock lock(state_->mutex);
  for (const DeviceDescription& device : devices) {
    state_->device_queue.push_back({device.device.value(), device.total_bytes});
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
  for (Lane& lane : state_->lanes) {
    lane.lock();
    status.events_queued += lane.queued;
    lane.unlock();
  }
  return status;
}

}  // namespace meshrt
