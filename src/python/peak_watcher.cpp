// The peak watcher behind meshrt_limit (peak_watcher.hpp).
#include "peak_watcher.hpp"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>

import meshrt;

using namespace meshrt;

namespace {

// Each device's bytes in use and the most held at once since the last reset, per buffer type:
// what meshrt_limit checks, for this process's meshes (device ids are per mesh: two meshes open
// at once share their figures). Hooked buffers took no memory and are not counted.
class PeakWatcher final : public EventProcessor {
 public:
  void process(std::span<const AllocationEvent> events) noexcept override {
    const std::scoped_lock lock(mutex_);
    for (const AllocationEvent& event : events) {
      if (event.hooked) continue;
      for (std::uint32_t i = 0; i < event.device_count; ++i) {
        Usage& usage = usage_[{event.device.value() + i, event.type}];
        if (event.kind == EventKind::allocate) {
          usage.current += event.size;
          usage.peak = std::max(usage.peak, usage.current);
        } else {
          usage.current -= std::min(usage.current, event.size);
        }
      }
    }
  }
  void reset() {
    const std::scoped_lock lock(mutex_);
    for (auto& [key, usage] : usage_) usage.peak = usage.base = usage.current;
  }
  // {device: {"dram": bytes, "l1": bytes, ...}}: the peak above what was live at the last reset.
  [[nodiscard]] std::map<std::uint32_t, std::map<std::string, std::uint64_t>> peaks() const {
    const std::scoped_lock lock(mutex_);
    std::map<std::uint32_t, std::map<std::string, std::uint64_t>> out;
    for (const auto& [key, usage] : usage_) {
      out[key.first][std::string(to_string(key.second))] = usage.peak - std::min(usage.peak, usage.base);
    }
    return out;
  }

 private:
  struct Usage {
    std::uint64_t current{};
    std::uint64_t peak{};
    std::uint64_t base{};  // live at the last reset
  };
  mutable std::mutex mutex_;
  std::map<std::pair<std::uint32_t, BufferType>, Usage> usage_;
};

PeakWatcher& peak_watcher() {
  static const std::shared_ptr<PeakWatcher> watcher = [] {
    auto made = std::make_shared<PeakWatcher>();
    Tracker::process_default()->add_processor(made);
    return made;
  }();
  return *watcher;
}

}  // namespace

void meshrt_python::watch_device_peaks() { (void)peak_watcher(); }
void meshrt_python::reset_device_peaks() { peak_watcher().reset(); }
std::map<std::uint32_t, std::map<std::string, std::uint64_t>> meshrt_python::device_peaks() {
  return peak_watcher().peaks();
}
