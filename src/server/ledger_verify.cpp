// Ledger::verify(): every aggregate recomputed from the live buffers and compared, for
// meshrt-smi --verify and the tests. O(live buffers); the ledger's hot paths are in ledger.cpp.
module;
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>
#include <fmt/format.h>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;

namespace meshrt::server {

using protocol::for_each_bit;

Verification Ledger::verify() const {
  Verification result;
  const auto differ = [&](std::string line) {
    result.consistent = false;
    result.differences.push_back(std::move(line));
  };
  std::map<std::uint32_t, UsageByType> device_sums_from_buffers;
  std::map<std::uint32_t, UsageByType> device_sums_from_processes;
  std::map<std::uint32_t, UsageByCategory> device_categories_from_buffers;
  std::uint64_t live = 0;
  for (const auto& [id, s] : sessions_) {
    std::map<std::uint32_t, UsageByType> process_from_buffers;
    std::uint64_t bytes = 0;
    std::uint64_t buffers = 0;
    for (const auto& [first, slot] : s.live) {
      const AllocationGroup& g = s.slab[slot];
      for_each_bit(g.live_mask, [&](std::uint32_t bit) {
        for (auto* sums : {&process_from_buffers, &device_sums_from_buffers}) {
          Usage& u = (*sums)[g.first_device + bit][index_of(g.type)];
          u.bytes += g.size;
          ++u.buffers;
        }
        Usage& c = device_categories_from_buffers[g.first_device + bit][index_of(g.type)][index_of(g.category)];
        c.bytes += g.size;
        ++c.buffers;
        bytes += g.size;
        ++buffers;
      });
    }
    live += buffers;
    if (bytes != s.live_bytes || buffers != s.live_buffers) {
      differ(fmt::format("pid {}: live {} buffers of {} bytes, but its buffers are {} of {} bytes", s.identity.pid,
                         s.live_buffers, s.live_bytes, buffers, bytes));
    }
    for (std::uint32_t device = 0; device < s.devices.size(); ++device) {
      for (const BufferType type : all_buffer_types) {
        const Usage& kept = s.devices[device][index_of(type)];
        const Usage& summed = process_from_buffers[device][index_of(type)];
        if (kept.bytes != summed.bytes || kept.buffers != summed.buffers) {
          differ(fmt::format("pid {} device {} {}: process total {} bytes in {} buffers, its buffers sum to {} in {}",
                             s.identity.pid, device, to_string(type), kept.bytes, kept.buffers, summed.bytes,
                             summed.buffers));
        }
        Usage& d = device_sums_from_processes[device][index_of(type)];
        d.bytes += kept.bytes;
        d.buffers += kept.buffers;
      }
    }
  }
  if (live != active_allocations_) {
    differ(fmt::format("active allocations {} but {} buffers are live", active_allocations_, live));
  }
  for (std::uint32_t device = 0; device < devices_.size(); ++device) {
    for (const BufferType type : all_buffer_types) {
      const Usage& kept = devices_[device][index_of(type)];
      const Usage& by_buffers = device_sums_from_buffers[device][index_of(type)];
      const Usage& by_processes = device_sums_from_processes[device][index_of(type)];
      if (kept.bytes != by_buffers.bytes || kept.bytes != by_processes.bytes || kept.buffers != by_buffers.buffers) {
        differ(fmt::format("device {} {}: device total {} bytes, buffers sum to {}, processes sum to {}", device,
                           to_string(type), kept.bytes, by_buffers.bytes, by_processes.bytes));
      }
      for (const AllocationCategory category : all_allocation_categories) {
        const Usage kept_category = device < device_categories_.size()
                                        ? device_categories_[device][index_of(type)][index_of(category)]
                                        : Usage{};
        const Usage& summed = device_categories_from_buffers[device][index_of(type)][index_of(category)];
        if (kept_category.bytes != summed.bytes || kept_category.buffers != summed.buffers) {
          differ(fmt::format("device {} {} {}: category total {} bytes in {} buffers, its buffers sum to {} in {}",
                             device, to_string(type), to_string(category), kept_category.bytes,
                             kept_category.buffers, summed.bytes, summed.buffers));
        }
      }
    }
  }
  return result;
}

}  // namespace meshrt::server
