// Who is on the other end of a connection: the kernel's word (SO_PEERCRED), completed from
// /proc. Identity never comes from what a client says (ADR 0013).
module;
#include <cstdint>
#include <string>
#include <string_view>

module meshrt.server:peer;

import meshrt.core;

namespace meshrt::server {

struct Peer {
  std::uint32_t pid{};
  std::uint32_t uid{};
  // Field 22 of /proc/PID/stat (clock ticks since boot): with the pid it names a process
  // uniquely, as a reused pid has a later start time. 0 when /proc could not say.
  std::uint64_t start_time{};
  std::string name;  // /proc/PID/comm, made printable; a Hello may fill it when /proc had none
};

// The peer of a connected Unix socket.
[[nodiscard]] Result<Peer> identify_peer(int fd);

// Names reach JSON, Prometheus labels and SVG: valid UTF-8 without control characters, whatever
// a client sent or /proc cut (comm is cut at 15 bytes, maybe inside a character). Each invalid
// byte and each control character becomes '?'.
[[nodiscard]] std::string printable(std::string_view text);

}  // namespace meshrt::server
