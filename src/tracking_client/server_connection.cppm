// The tracking client's connection to the allocation server: a non-blocking Unix socket, the
// frames waiting to go out on it, and the writing that never waits longer than its caller
// allows. Only the sender thread uses it. Sockets it holds are known to a fork handler, so that
// a fork's child closes its copies (ADR 0017).
module;
#include <chrono>
#include <cstddef>
#include <string>

module meshrt.tracking_client:server_connection;

import meshrt.core;
import meshrt.protocol;

namespace meshrt::detail {

class ServerConnection {
 public:
  using Clock = std::chrono::steady_clock;

  ServerConnection() = default;
  ServerConnection(const ServerConnection&) = delete;
  ServerConnection& operator=(const ServerConnection&) = delete;
  ~ServerConnection() { close(); }

  // Connects without waiting: a server whose listen backlog is full (stopped, or swamped)
  // refuses at once. The Error says why, for a person (limit_exceeded when it was the backlog).
  [[nodiscard]] Result<void> connect(const std::string& socket_path);
  [[nodiscard]] bool connected() const { return fd_ >= 0; }
  // Closes the socket; what waited to be sent is dropped.
  void close();

  [[nodiscard]] protocol::OutboundFrames& outbound() { return outbound_; }
  [[nodiscard]] const protocol::OutboundFrames& outbound() const { return outbound_; }

  // Writes what it can until `deadline`, waiting for the socket only while there is something to
  // send (waiting for replies the server never sends would hold every clean exit for the whole
  // timeout); returns early once at most `leave` bytes wait. An Error (the connection broke, or
  // the server refused the session and said why) closes the connection first.
  [[nodiscard]] Result<void> pump_until(Clock::time_point deadline, std::size_t leave = 0);

 private:
  // What the server said: only an Error (before it closes the session) is expected.
  [[nodiscard]] Result<void> read_server();
  Error broken(std::string why);

  int fd_{-1};
  protocol::OutboundFrames outbound_;
};

// In a fork's child: closes the child's copies of every connection's socket. Async-signal-safe.
void close_connections_in_child();

}  // namespace meshrt::detail
