module;
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

module meshrt.server;

import meshrt.core;

namespace meshrt::server {

std::string_view to_string(MomentKind kind) {
  switch (kind) {
    case MomentKind::process_start: return "process start";
    case MomentKind::process_exit: return "process exit";
    case MomentKind::crash_reclaim: return "crash reclaim";
    case MomentKind::leak_at_exit: return "leak at exit";
    case MomentKind::out_of_memory: return "out of memory";
  }
  return "moment";
}

History::History(std::size_t max_samples, std::size_t max_moments) : ring_(max_samples), max_moments_(max_moments) {}

void History::push(const HistorySample& sample) {
  ++taken_;
  if (ring_.empty()) return;
  ring_[ring_next_] = sample;
  ring_next_ = (ring_next_ + 1) % ring_.size();
  if (ring_count_ < ring_.size()) ++ring_count_;
}

void History::sample(const Summary& summary, std::int64_t now_ns) {
  if (ring_.empty()) return;
  std::map<SeriesKey, std::uint64_t> now;
  for (const ProcessSummary& process : summary.processes) {
    names_[process.identity.pid] = process.identity.name;
    for (const auto& [device, usage] : process.devices) {
      for (const BufferType type : all_buffer_types) {
        const std::uint64_t bytes = usage[index_of(type)].bytes;
        if (bytes == 0) continue;
        // Two sessions of one process (two trackers) add up: the timeline is per process.
        now[{process.identity.pid, static_cast<std::uint16_t>(device), static_cast<std::uint8_t>(index_of(type)),
             all_categories}] += bytes;
      }
    }
  }
  for (const DeviceSummary& device : summary.devices) {
    for (const BufferType type : all_buffer_types) {
      for (const AllocationCategory category : all_allocation_categories) {
        const std::uint64_t bytes = device.categories[index_of(type)][index_of(category)].bytes;
        if (bytes == 0) continue;
        now[{0, static_cast<std::uint16_t>(device.device), static_cast<std::uint8_t>(index_of(type)),
             static_cast<std::uint8_t>(index_of(category))}] = bytes;
      }
    }
  }
  const auto point = [&](const SeriesKey& key, std::uint64_t bytes) {
    push({.time_ns = now_ns,
          .bytes = bytes,
          .pid = std::get<0>(key),
          .device = std::get<1>(key),
          .type = std::get<2>(key),
          .category = std::get<3>(key)});
  };
  for (const auto& [key, bytes] : last_) {
    if (!now.contains(key)) point(key, 0);
  }
  for (const auto& [key, bytes] : now) {
    const auto found = last_.find(key);
    if (found == last_.end() || found->second != bytes) point(key, bytes);
  }
  last_ = std::move(now);
}

void History::add(Moment moment) {
  if (max_moments_ == 0) {
    ++moments_dropped_;
    return;
  }
  if (moments_.size() == max_moments_) {
    moments_.pop_front();
    ++moments_dropped_;
  }
  if (!moment.process.empty()) names_[moment.pid] = moment.process;
  moments_.push_back(std::move(moment));
}

std::vector<HistorySample> History::samples() const {
  std::vector<HistorySample> out;
  out.reserve(ring_count_);
  const std::size_t first = ring_count_ < ring_.size() ? 0 : ring_next_;
  for (std::size_t i = 0; i < ring_count_; ++i) out.push_back(ring_[(first + i) % ring_.size()]);
  return out;
}

}  // namespace meshrt::server
