// meshrt.monitor — a monitor's side of the server's query protocol: what meshrt-smi and tests
// use to ask. Small on purpose: it needs neither the ledger nor the runtime.
module;
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

export module meshrt.monitor;

import meshrt.core;
import meshrt.protocol;

export namespace meshrt::server {

class Monitor {
 public:
  // Connects and says Hello as a monitor. Errors name the socket and the reason.
  [[nodiscard]] static Result<Monitor> connect(const std::string& socket_path);
  Monitor(Monitor&& other) noexcept;
  Monitor& operator=(Monitor&& other) noexcept;
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;
  ~Monitor();

  // The server's JSON answer (chunks joined), or its refusal as an Error.
  [[nodiscard]] Result<std::string> query(protocol::QueryKind kind, std::uint32_t pid = 0);

 private:
  explicit Monitor(int fd) : fd_(fd) {}
  [[nodiscard]] Result<void> write(std::span<const std::byte> bytes) const;
  [[nodiscard]] Result<protocol::Message> read_message();

  int fd_{-1};
  std::vector<std::byte> buffer_;
  std::size_t start_{};
};

}  // namespace meshrt::server
