// Small I/O the tests and the benchmark share: a process's resident memory, and reading a
// socket until its peer closes it.
module;
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>

export module meshrt.testing:io;

export namespace meshrt::testing {

// VmRSS of `pid` in KiB, from /proc; 0 if it cannot be read.
std::uint64_t resident_kib(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with("VmRSS:")) return std::stoull(line.substr(6));
  }
  return 0;
}

// Everything `fd` delivers until its peer closes it, or until nothing arrives for `quiet`.
std::vector<std::byte> read_until_closed(int fd, std::chrono::milliseconds quiet) {
  std::vector<std::byte> received;
  std::array<std::byte, 65536> chunk{};
  for (;;) {
    pollfd poller{fd, POLLIN, 0};
    if (::poll(&poller, 1, static_cast<int>(quiet.count())) <= 0) break;
    const ssize_t got = ::recv(fd, chunk.data(), chunk.size(), 0);
    if (got <= 0) break;
    received.insert(received.end(), chunk.begin(), chunk.begin() + got);
  }
  return received;
}

}  // namespace meshrt::testing
