// Limits that keep one client from exhausting the server (ADR 0013): who may connect and how
// many at once, how fast a session may send, and what to do when descriptors run out.
module;
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include <sys/types.h>

module meshrt.server:admission;

import meshrt.core;
import meshrt.unix_socket;
import :server;
import :peer;

namespace meshrt::server {

// Why a connection is refused at the door, for the client (one Error frame) and the log.
struct Refusal {
  ErrorCode code{};
  std::string message;
};

// Connections at once, all processes together and per process, and who may connect at all.
class Admission {
 public:
  Admission(const ServerConfig& config, std::optional<gid_t> group) : config_(config), group_(group) {}

  // Counts the peer in, or says why not (then nothing is counted).
  [[nodiscard]] std::optional<Refusal> admit(const Peer& peer, std::size_t sessions_open);
  // The peer's connection closed.
  void leave(std::uint32_t pid);

 private:
  const ServerConfig& config_;
  std::optional<gid_t> group_;
  std::map<std::uint32_t, std::size_t> per_process_;  // open connections by peer pid
};

// A token bucket: refilled at the limit per second, holding at most one second's worth.
class MessageRate {
 public:
  using Clock = std::chrono::steady_clock;
  explicit MessageRate(std::uint64_t per_second, Clock::time_point now = Clock::now())
      : per_second_(static_cast<double>(per_second)), tokens_(per_second_), at_(now) {}
  // False when the session sends faster than the limit.
  [[nodiscard]] bool take(Clock::time_point now = Clock::now());

 private:
  double per_second_;
  double tokens_;
  Clock::time_point at_;
};

// When the process runs out of descriptors, the connection waiting on a listener is accepted
// with a spare one and closed at once, so that the listener does not stay readable forever (a
// busy loop).
class DescriptorReserve {
 public:
  DescriptorReserve();
  // False when even the spare is gone (it could not be reopened last time): then the caller
  // stops accepting until the next wake-up instead of retrying in a loop.
  [[nodiscard]] bool shed_one_connection(int listener);
  [[nodiscard]] std::uint64_t shortages() const { return shortages_; }

 private:
  FileDescriptor spare_;
  std::uint64_t shortages_{};
};

}  // namespace meshrt::server
