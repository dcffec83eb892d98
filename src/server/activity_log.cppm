// What one session allocated and freed since the server last said: lines such as "Allocated 16
// buffers on Devices 0-7 (1048576 bytes on each)", logged every activity interval. Each category
// has lines of its own ("Allocated 3 system buffers on Devices 0-7 ..."), so that the buffers a
// user made read as they did before the runtime reported its own memory (ADR 0020).
module;
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

module meshrt.server:activity_log;

import meshrt.core;

namespace meshrt::server {

class ActivityLog {
 public:
  void allocated(AllocationCategory category, std::uint32_t device, std::uint64_t bytes);
  void freed(AllocationCategory category, std::uint32_t device, std::uint64_t bytes);
  // The lines for what happened since the last call, each starting with `who`; then forgets it.
  // Devices in a row with the same figures share one line, so a buffer replicated on 64 devices
  // logs one line, not 64.
  [[nodiscard]] std::vector<std::string> take_lines(std::string_view who);
  [[nodiscard]] bool empty() const { return devices_.empty(); }

 private:
  struct Counts {
    std::uint64_t allocated{};
    std::uint64_t allocated_bytes{};
    std::uint64_t freed{};
    std::uint64_t freed_bytes{};
  };
  // By category, then device: a category's devices in a row share a line.
  std::map<std::pair<AllocationCategory, std::uint32_t>, Counts> devices_;
};

}  // namespace meshrt::server
