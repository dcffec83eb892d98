// The allocation server: one epoll loop on a Unix socket, many client sessions, one Ledger.
module;
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

export module meshrt.server:server;

import meshrt.core;
import meshrt.protocol;
import :ledger;

export namespace meshrt::server {

struct ServerConfig {
  std::string socket_path;
  // Lets one group connect (socket 0660, directory 0750, both owned by the group).
  std::optional<std::string> group;
  std::chrono::milliseconds activity_interval{1000};  // how often allocation activity is logged
  std::chrono::milliseconds summary_interval{10000};  // periodic summary (only when something changed)
  bool log_activity{true};
  // Limits, so that no client can exhaust the server (ADR 0013). Each is an option of the program.
  std::size_t max_sessions{1024};             // connections at once, all processes together
  std::size_t max_sessions_per_process{16};   // connections at once from one pid
  std::chrono::milliseconds hello_timeout{10'000};  // a connection must say Hello within this
  std::uint64_t max_live_per_session{std::uint64_t{1} << 24U};
  std::uint64_t max_names_per_session{std::uint64_t{1} << 20U};
  // Call stacks kept per session (ADR 0024); more are dropped and counted, their buffers then
  // show no call site.
  std::uint64_t max_stacks_per_session{std::uint64_t{1} << 16U};
  // Leak reports kept: those of the last this many sessions that ended with live buffers.
  std::size_t leak_reports{64};
  // Usage samples the timeline keeps (ADR 0025), 24 bytes each; the oldest go first. 0: no timeline.
  std::size_t history_samples{std::size_t{1} << 17U};
  std::uint64_t max_messages_per_second{200'000};  // frames per second per session (with a 1 s burst)
  std::uint32_t max_payload{protocol::max_payload_size};
  std::size_t max_pending_output{std::size_t{64} << 20U};  // a monitor that stops reading is dropped
  // A buffer list goes out a page at a time; a monitor that takes none of it for this long is dropped.
  std::chrono::milliseconds reply_stall_timeout{30'000};
  // Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics ("127.0.0.1:9464"; port 0
  // picks a free one). Loopback unless the address says otherwise (ADR 0014).
  std::optional<std::string> metrics_address;
  std::function<void(std::string_view)> log;  // one line at a time; stdout when empty
};

// Server-level counters: what went wrong at the connection level.
struct ConnectionCounters {
  std::uint64_t sessions_opened{};
  std::uint64_t malformed_messages{};    // sessions closed for bad or out-of-order frames
  std::uint64_t truncated_sessions{};    // connections closed in the middle of a frame (a killed client)
  std::uint64_t rejected_sessions{};     // wrong version, claimed another pid, not allowed, over a limit
  std::uint64_t timed_out_sessions{};    // connections that never said Hello
  std::uint64_t dropped_slow_readers{};  // monitors that stopped reading replies
  std::uint64_t monitors{};              // monitor sessions served
};

class Server {
 public:
  // Creates the socket directory (0700, or 0750 for a group) and binds the socket (0600/0660).
  // Refuses to start when another server answers on the path; a stale socket file is replaced.
  [[nodiscard]] static Result<std::unique_ptr<Server>> start(ServerConfig config);
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  Server(Server&&) = delete;
  Server& operator=(Server&&) = delete;
  ~Server();

  // Serves until stop() or, with handle_signals, SIGINT/SIGTERM; then logs the final summary
  // (last line "Active allocations: N") and removes the socket.
  Result<void> run(bool handle_signals);
  // Thread-safe; run() returns soon after.
  void stop();
  [[nodiscard]] const std::string& socket_path() const;
  // The TCP port /metrics is served on, once started with a metrics_address.
  [[nodiscard]] std::optional<std::uint16_t> metrics_port() const;

 private:
  struct Loop;  // the event loop and all it owns: src/server/server.cpp
  explicit Server(std::unique_ptr<Loop> loop);
  std::unique_ptr<Loop> loop_;
};

}  // namespace meshrt::server
