// TrackingClient — a processor that streams every allocation and free to the allocation server.
module;
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

export module meshrt.tracking_client:client;

import meshrt.core;
import meshrt.tracking;

export namespace meshrt {

// True when MESHRT_ALLOC_STACKS=1: tracked allocations carry their call stacks (ADR 0024).
[[nodiscard]] bool stacks_enabled_by_environment();

// A processor that forwards events to the allocation server (meshrt-alloc-server).
//
// The allocation path never waits on the socket: process() appends to the calling thread's lane;
// a background thread keeps the client's own table of live buffers and sends batches. Connecting
// never blocks either (a server with a full backlog is tried again later). When the server is
// absent, or restarts, the client connects when it can and sends a snapshot of its live table,
// so nothing is lost. On destruction it sends everything and says Goodbye, within
// shutdown_timeout; a server too slow for that hears that the client gave up.
//
// Threads may come and go freely: a thread's lane is returned when it exits. In the child of a
// fork() the inherited client is inert (ADR 0017): it records and sends nothing, and its
// destruction neither waits nor says Goodbye for the parent.
class TrackingClient final : public EventProcessor {
 public:
  struct Options {
    std::string socket_path;   // default: protocol::default_socket_path()
    std::string process_name;  // a label; the server identifies processes by the kernel's word
    std::chrono::milliseconds flush_interval{5};
    std::chrono::milliseconds reconnect_interval{100};
    // Encoded bytes waiting for a slow server beyond this are dropped; the client is then out
    // of sync and sends a snapshot of its live table as soon as the server reads again.
    std::size_t max_pending_bytes{std::size_t{16} << 20U};
    // How long shutdown (and so a clean exit) waits for a slow server to take the last events.
    std::chrono::milliseconds shutdown_timeout{2000};
    // Where the client's few messages go (server absent, lost, back). stderr when empty.
    std::function<void(std::string_view)> warn;
    // Capture each tracked allocation's call stack (ADR 0024): the server then shows who
    // allocated every live buffer and groups leaks by call site. Off unless MESHRT_ALLOC_STACKS=1.
    bool capture_stacks{stacks_enabled_by_environment()};
    // Distinct call stacks the client keeps (and names); allocations from further ones carry none.
    std::size_t max_stacks{16384};
  };

  struct Status {
    bool connected{};
    std::uint64_t events_queued{};     // handed to process()
    std::uint64_t events_taken{};      // taken from the queues by the sender
    std::uint64_t events_delivered{};  // of those, written to a connected server (as records or in a snapshot)
    std::uint64_t live_buffers{};     // in the client's own table
    std::uint64_t connections{};      // successful connects (1 + reconnects)
    std::uint64_t snapshots{};        // snapshots sent
    std::uint64_t overflows{};        // times pending bytes were dropped for a slow server
    std::uint64_t frees_waiting{};    // Frees that overtook their Alloc and wait for it
    std::uint64_t pending_bytes{};      // encoded, waiting for the server to read them
    std::uint64_t peak_pending_bytes{};  // the most that ever waited: max_pending_bytes + one round
    std::uint64_t names{};               // mesh buffer names held: those of live (or about to be) buffers
    std::uint64_t lanes{};               // per-thread event lanes: one per thread alive that recorded
    std::uint64_t chunks{};              // event chunks allocated (64 KiB each): recording's memory
    std::uint64_t connect_attempts_refused{};  // connects that failed at once (absent, or backlog full)
    std::uint64_t stacks{};              // distinct call stacks captured (with capture_stacks)
    std::uint64_t stacks_dropped{};      // allocations that went without a stack: max_stacks was reached
    bool gave_up{};                      // shutdown gave up on a server too slow for shutdown_timeout
    bool said_goodbye{};                 // shutdown's Goodbye was written to the server
  };

  [[nodiscard]] static std::shared_ptr<TrackingClient> start(Options options);
  TrackingClient(const TrackingClient&) = delete;
  TrackingClient& operator=(const TrackingClient&) = delete;
  TrackingClient(TrackingClient&&) = delete;
  TrackingClient& operator=(TrackingClient&&) = delete;
  ~TrackingClient() override;

  void process(std::span<const AllocationEvent> events) noexcept override;
  void describe_devices(std::span<const DeviceDescription> devices) noexcept override;
  void describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view name) noexcept override;

  // Waits until every event queued before the call has been written to a connected server.
  // False when that did not happen within `timeout` (server absent or slow), or after shutdown.
  bool flush(std::chrono::milliseconds timeout);
  // Flushes, says Goodbye and stops the background thread. Idempotent; the destructor calls it.
  void shutdown();
  [[nodiscard]] Status status() const;
  void report_out_of_memory(const OutOfMemoryReport& report) noexcept override;

  // True when tracked allocations carry their call stacks (Options::capture_stacks).
  [[nodiscard]] bool captures_stacks() const noexcept;

  struct Engine;  // what the sender thread runs and shares: src/tracking_client/client_engine.cppm

 private:
  explicit TrackingClient(std::unique_ptr<Engine> engine);
  std::unique_ptr<Engine> engine_;
};

// True when MESHRT_ALLOC_TRACKING=1 (or TT_ALLOC_TRACKING_ENABLED=1, for users of tt-metal).
[[nodiscard]] bool tracking_enabled_by_environment();

// The client Tracker::process_default() streams to, when the environment turned tracking on;
// null otherwise. For flushing before asking the server what is live (the pytest plugin does).
[[nodiscard]] std::shared_ptr<TrackingClient> process_tracking_client();

}  // namespace meshrt
