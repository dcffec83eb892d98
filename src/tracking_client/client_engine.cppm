// The inside of a TrackingClient: what application threads, flush() and status() share with
// the sender thread, and the sender thread's own world. Its parts are pieces of their own: the
// lanes events arrive on (event_lanes), the live table (protocol::LiveGroups), the frames
// waiting to go out and the socket (server_connection). The sender ties them: client_sender.cpp
// takes events off the lanes, client_session.cpp says them to the server (ADR 0008).
module;
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

module meshrt.tracking_client:client_engine;

import meshrt.core;
import meshrt.protocol;
import meshrt.tracking;
import :client;
import :call_stacks;
import :event_lanes;
import :fork_handling;
import :server_connection;

namespace meshrt {

struct TrackingClient::Engine {
  using Clock = std::chrono::steady_clock;

  Options options;
  // The fork generation this client was started in: in any later one it is a parent's copy.
  const std::uint64_t generation{detail::fork_generation()};
  [[nodiscard]] bool forked_away() const { return detail::fork_generation() != generation; }
  // The sender runs each pass of its loop through it, so a fork finds the client at rest.
  detail::ForkGate fork_gate;

  // An application thread wakes the sender early (without the mutex: a wake-up missed costs one
  // flush interval, no more) when too many lanes of exited threads wait to be drained.
  std::atomic<std::uint64_t> kicks{0};
  void kick() {
    kicks.fetch_add(1, std::memory_order_relaxed);
    wake.notify_one();
  }
  detail::EventLanes lanes{[this] { kick(); }};
  // With capture_stacks: application threads intern stacks here; the sender names them in `stack_book`.
  std::unique_ptr<detail::StackInterner> interner;
  std::unique_ptr<detail::StackBook> stack_book;
  [[nodiscard]] protocol::RecordFormat record_format() const {
    return interner ? protocol::RecordFormat::with_stack : protocol::RecordFormat::plain;
  }
  // Names the stacks interned since the last round; tells them to the server when `stream`.
  void take_new_stacks(bool stream);
  std::atomic<bool> stopping{false};

  // Shared with flush()/status()/describe_*, under `mutex`.
  mutable std::mutex mutex;
  std::condition_variable wake;
  std::condition_variable delivered_changed;
  std::vector<protocol::DeviceTotals> device_queue;
  // Out-of-memory reports for the server's timeline, the newest max_out_of_memory_queued: a loop
  // of failing allocations must not grow it (past it, the oldest are dropped).
  static constexpr std::size_t max_out_of_memory_queued = 64;
  std::vector<protocol::OutOfMemory> out_of_memory_queue;
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

  void warn(const std::string& line) const;

  // ---- the live table, names and devices: updated for every event, connected or not ----

  // The name of mesh buffer `id` if it has one, taken out of the queues. A name is queued before
  // its Alloc is published, so once the Alloc is read the name is in name_queue or arrived_names.
  std::optional<std::string> take_name(std::uint64_t id);

  // An Alloc goes out after its name (if any): the name frame between the events before it and it.
  void send_alloc(const protocol::AllocRecord& record, const std::optional<std::string>& name);

  // Applies one event to the live table; when `stream` is set, also encodes what the server must
  // hear, in an order it accepts (each Alloc before its Free).
  void apply(const AllocationEvent& event, std::uint32_t stack, bool stream);

  // ---- encoding: runs of events become one frame; order between kinds is kept ----

  std::vector<protocol::EventRecord> pending;
  // Records per Events frame: 4,096 (192 KiB) while running, 1,024 at exit. A frame in progress
  // must be finished before anything else is said, so after a give-up a short one lets the
  // Goodbye through; the server's cost per frame is small against 4,096 records.
  static constexpr std::size_t running_frame_records = 4096;
  static constexpr std::size_t exit_frame_records = 1024;
  std::size_t frame_records = running_frame_records;

  void flush_pending();

  void encode(const protocol::EventRecord& record);

  // Hello, what the server must know, and the whole live table.
  void encode_session_start();

  void encode_snapshot();

  // The server is not reading: drop the frames that wait, resynchronise when it reads again.
  void drop_pending();

  // ---- the socket ----

  [[nodiscard]] bool connected() const { return connection.connected(); }

  void disconnect(const Error& why);

  // Never waits (ServerConnection::connect); a refusal is tried again after reconnect_interval.
  void try_connect();

  // Writes until `deadline` (ServerConnection::pump_until); false when the connection broke.
  bool pump_until(Clock::time_point deadline, std::size_t leave = 0);

  // ---- the sender thread ----

  // Applies the events published on every lane since the last round, recycling the chunks it
  // has finished and reaping lanes whose thread has exited; returns how many events that was. A
  // round takes at most a few chunks from each lane, so that sending is never starved by a
  // thread that records without pause.
  static constexpr std::uint64_t chunks_per_round = 16;
  bool more_waiting = false;
  std::uint64_t peak_pending_bytes = 0;  // the most encoded bytes ever waiting for the server

  std::uint64_t apply_lanes(bool stream);

  // One round: what came in since the last, applied and (when connected) sent without waiting.
  // Returns the events taken.
  std::uint64_t round();

  void publish_status(std::uint64_t taken, std::uint64_t flush_round);

  void run();

  // A clean exit, within shutdown_timeout: every lane drained and sent, then Goodbye. A server
  // too slow for that gets what fits, then a Goodbye that says the client gave up, so the
  // server reports what it still holds of this process as lost at exit, not leaked.
  void finish();
};

}  // namespace meshrt
