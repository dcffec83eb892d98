// What one session allocated and freed since the server last said: lines such as "Allocated 16
// buffers on Devices 0-7 (1048576 bytes on each)", logged every activity interval.
module;
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

module meshrt.server:activity_log;

namespace meshrt::server {

class ActivityLog {
 public:
  void allocated(std::uint32_t device, std::uint64_t bytes);
  void freed(std::uint32_t device, std::uint64_t bytes);
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
  std::map<std::uint32_t, Counts> devices_;
};

}  // namespace meshrt::server
