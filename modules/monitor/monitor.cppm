// meshrt.monitor — a monitor's side of the server's query protocol: what meshrt-smi and tests
// use to ask. Small on purpose: it needs neither the ledger nor the runtime.
module;
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

export module meshrt.monitor;

import meshrt.core;
import meshrt.protocol;
import meshrt.unix_socket;

export namespace meshrt::server {

class Monitor {
 public:
  // Connects and says Hello as a monitor. Errors name the socket and the reason.
  [[nodiscard]] static Result<Monitor> connect(const std::string& socket_path);
  Monitor(Monitor&& other) noexcept = default;
  Monitor& operator=(Monitor&& other) noexcept = default;
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;
  ~Monitor() = default;

  // The server's JSON answer (chunks joined), or its refusal as an Error.
  // `with_stacks`: a buffer list with each buffer's whole call stack.
  [[nodiscard]] Result<std::string> query(protocol::QueryKind kind, std::uint32_t pid = 0, bool with_stacks = false);

 private:
  explicit Monitor(FileDescriptor fd) : fd_(std::move(fd)) {}
  [[nodiscard]] Result<void> write(std::span<const std::byte> bytes) const;
  [[nodiscard]] Result<protocol::Message> read_message();

  FileDescriptor fd_;
  std::vector<std::byte> buffer_;
  std::size_t start_{};
};

}  // namespace meshrt::server
