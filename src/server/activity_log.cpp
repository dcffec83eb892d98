module;
#include <cstdint>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

module meshrt.server;

import :activity_log;

namespace meshrt::server {

void ActivityLog::allocated(std::uint32_t device, std::uint64_t bytes) {
  Counts& counts = devices_[device];
  ++counts.allocated;
  counts.allocated_bytes += bytes;
}

void ActivityLog::freed(std::uint32_t device, std::uint64_t bytes) {
  Counts& counts = devices_[device];
  ++counts.freed;
  counts.freed_bytes += bytes;
}

std::vector<std::string> ActivityLog::take_lines(std::string_view who) {
  std::vector<std::string> lines;
  const auto emit = [&](std::string_view verb, auto count_of, auto bytes_of) {
    auto it = devices_.begin();
    while (it != devices_.end()) {
      const std::uint64_t count = count_of(it->second);
      const std::uint64_t bytes = bytes_of(it->second);
      auto last = it;
      auto next = std::next(it);
      while (next != devices_.end() && next->first == last->first + 1 && count_of(next->second) == count &&
             bytes_of(next->second) == bytes) {
        last = next++;
      }
      if (count > 0) {
        if (last == it) {
          lines.push_back(fmt::format("{}: {} {} buffers on Device {} ({} bytes)", who, verb, count, it->first, bytes));
        } else {
          lines.push_back(fmt::format("{}: {} {} buffers on Devices {}-{} ({} bytes on each)", who, verb, count,
                                      it->first, last->first, bytes));
        }
      }
      it = next;
    }
  };
  emit("Allocated", [](const Counts& c) { return c.allocated; }, [](const Counts& c) { return c.allocated_bytes; });
  emit("Freed", [](const Counts& c) { return c.freed; }, [](const Counts& c) { return c.freed_bytes; });
  devices_.clear();
  return lines;
}

}  // namespace meshrt::server
