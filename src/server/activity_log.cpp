module;
#include <cstdint>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

module meshrt.server;

import meshrt.core;
import :activity_log;

namespace meshrt::server {

namespace {

// "16 buffers", "3 system buffers", "2 program binaries", "4 circular buffers".
std::string_view noun(AllocationCategory category) {
  switch (category) {
    case AllocationCategory::buffer: return "buffers";
    case AllocationCategory::system: return "system buffers";
    case AllocationCategory::program: return "program binaries";
    case AllocationCategory::circular_buffer: return "circular buffers";
  }
  return "buffers";
}

}  // namespace

void ActivityLog::allocated(AllocationCategory category, std::uint32_t device, std::uint64_t bytes) {
  Counts& counts = devices_[{category, device}];
  ++counts.allocated;
  counts.allocated_bytes += bytes;
}

void ActivityLog::freed(AllocationCategory category, std::uint32_t device, std::uint64_t bytes) {
  Counts& counts = devices_[{category, device}];
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
      const auto [category, first_device] = it->first;
      while (next != devices_.end() && next->first.first == category &&
             next->first.second == last->first.second + 1 && count_of(next->second) == count &&
             bytes_of(next->second) == bytes) {
        last = next++;
      }
      if (count > 0) {
        if (last == it) {
          lines.push_back(fmt::format("{}: {} {} {} on Device {} ({} bytes)", who, verb, count, noun(category),
                                      first_device, bytes));
        } else {
          lines.push_back(fmt::format("{}: {} {} {} on Devices {}-{} ({} bytes on each)", who, verb, count,
                                      noun(category), first_device, last->first.second, bytes));
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
