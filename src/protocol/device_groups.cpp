module;
#include <bit>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <absl/container/flat_hash_map.h>

module meshrt.protocol;

namespace meshrt::protocol {

std::vector<FreeRecord> LiveGroups::allocate(const AllocRecord& record, std::optional<std::string> name) {
  const std::uint64_t id = record.buffer;
  std::uint64_t mask = group_bits(0, record.device_count);
  std::vector<FreeRecord> overtaken;
  for (auto early = early_frees_.begin(); early != early_frees_.end();) {
    const std::uint64_t first = early->first;
    if (first >= id && first - id < record.device_count) {
      mask &= ~group_bits(first - id, early->second.device_count);
      overtaken.push_back(early->second);
      early = early_frees_.erase(early);
    } else {
      ++early;
    }
  }
  if (mask == 0) return overtaken;  // freed before it was seen: never live here
  live_.insert_or_assign(id, LiveRecord{record, mask});
  live_device_buffers_ += static_cast<std::uint64_t>(std::popcount(mask));
  if (name) names_.insert_or_assign(record.mesh_buffer, std::move(*name));
  return overtaken;
}

bool LiveGroups::free(const FreeRecord& record) {
  const auto group = find_group(live_, record.buffer, [](const LiveRecord& g) { return g.record.device_count; });
  if (group == live_.end()) {
    early_frees_.emplace(record.buffer, record);  // not yet: it waits for its Alloc
    return false;
  }
  LiveRecord& g = group->second;
  const std::uint64_t freed = g.live_mask & group_bits(record.buffer - group->first, record.device_count);
  g.live_mask &= ~freed;
  live_device_buffers_ -= static_cast<std::uint64_t>(std::popcount(freed));
  if (g.live_mask == 0) {
    names_.erase(g.record.mesh_buffer);
    live_.erase(group);
  }
  return true;
}

std::vector<FreeRecord> LiveGroups::unmatched_frees() const {
  std::vector<FreeRecord> frees;
  frees.reserve(early_frees_.size());
  for (const auto& [id, record] : early_frees_) frees.push_back(record);
  return frees;
}

}  // namespace meshrt::protocol
