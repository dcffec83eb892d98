module;
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

module meshrt.tracking;

import meshrt.core;

namespace meshrt {

void LiveBufferTable::process(std::span<const AllocationEvent> events) noexcept {
  const std::scoped_lock lock(mutex_);
  for (const AllocationEvent& range : events) {
    for (std::uint32_t i = 0; i < range.device_count; ++i) {
      const AllocationEvent event = device_buffer_event(range, i);
      if (event.kind == EventKind::allocate) {
        if (!live_.try_emplace(event.buffer, event).second) {
          ++duplicate_allocations_;
          continue;
        }
        LiveBufferSummary& summary = summaries_[{event.device.value(), event.type, event.category}];
        ++summary.buffers;
        summary.bytes += event.size;
        continue;
      }
      const auto found = live_.find(event.buffer);
      if (found == live_.end()) {
        ++unknown_frees_;
        continue;
      }
      // Account the free against what was allocated, whatever the free event claims.
      LiveBufferSummary& summary = summaries_[{found->second.device.value(), found->second.type, found->second.category}];
      --summary.buffers;
      summary.bytes -= found->second.size;
      live_.erase(found);
    }
  }
}

std::vector<AllocationEvent> LiveBufferTable::live_buffers(DeviceId device, BufferType type) const {
  const std::scoped_lock lock(mutex_);
  std::vector<AllocationEvent> result;
  for (const auto& [id, event] : live_) {
    if (event.device == device && event.type == type) result.push_back(event);
  }
  return result;
}

std::vector<AllocationEvent> LiveBufferTable::live_buffers_of(MeshBufferId mesh_buffer) const {
  const std::scoped_lock lock(mutex_);
  std::vector<AllocationEvent> result;
  for (const auto& [id, event] : live_) {
    if (event.mesh_buffer == mesh_buffer) result.push_back(event);
  }
  return result;
}

LiveBufferSummary LiveBufferTable::summary(DeviceId device, BufferType type, AllocationCategory category) const {
  const std::scoped_lock lock(mutex_);
  const auto found = summaries_.find({device.value(), type, category});
  return found == summaries_.end() ? LiveBufferSummary{} : found->second;
}

LiveBufferSummary LiveBufferTable::summary(DeviceId device, BufferType type) const {
  LiveBufferSummary total;
  for (const AllocationCategory category : all_allocation_categories) {
    const LiveBufferSummary one = summary(device, type, category);
    total.buffers += one.buffers;
    total.bytes += one.bytes;
  }
  return total;
}

std::uint64_t LiveBufferTable::active_allocations() const {
  const std::scoped_lock lock(mutex_);
  return live_.size();
}

std::uint64_t LiveBufferTable::active_allocations(AllocationCategory category) const {
  const std::scoped_lock lock(mutex_);
  std::uint64_t live = 0;
  for (const auto& [key, summary] : summaries_) {
    if (key.category == category) live += summary.buffers;
  }
  return live;
}

std::uint64_t LiveBufferTable::unknown_frees() const {
  const std::scoped_lock lock(mutex_);
  return unknown_frees_;
}

std::uint64_t LiveBufferTable::duplicate_allocations() const {
  const std::scoped_lock lock(mutex_);
  return duplicate_allocations_;
}

}  // namespace meshrt
