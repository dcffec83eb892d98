module;
#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include <gsl/gsl>

module meshrt.tracking;

import meshrt.core;

namespace meshrt {

std::string_view to_string(EventKind kind) { return kind == EventKind::allocate ? "allocate" : "free"; }

std::string_view to_string(FreeReason reason) {
  switch (reason) {
    case FreeReason::none: return "none";
    case FreeReason::explicit_deallocate: return "explicit deallocate";
    case FreeReason::destructor: return "destructor";
    case FreeReason::mesh_deallocate: return "mesh deallocate";
    case FreeReason::device_closed: return "device closed";
  }
  return "unknown";
}

std::shared_ptr<Tracker> Tracker::process_default() {
  static const std::shared_ptr<Tracker> tracker = [] {
    auto created = std::make_shared<Tracker>();
    if (tracking_enabled_by_environment()) created->add_processor(TrackingClient::start({}));
    return created;
  }();
  return tracker;
}

void Tracker::add_processor(std::shared_ptr<EventProcessor> processor) {
  Expects(processor != nullptr);
  const std::scoped_lock lock(mutex_);
  processors_.push_back(std::move(processor));
}

void Tracker::remove_processor(const EventProcessor& processor) {
  const std::scoped_lock lock(mutex_);
  std::erase_if(processors_, [&](const auto& p) { return p.get() == &processor; });
}

void Tracker::add_hook(std::shared_ptr<AllocationHook> hook) {
  Expects(hook != nullptr);
  const std::scoped_lock lock(mutex_);
  hooks_.push_back(std::move(hook));
}

void Tracker::remove_hook(const AllocationHook& hook) {
  const std::scoped_lock lock(mutex_);
  std::erase_if(hooks_, [&](const auto& h) { return h.get() == &hook; });
}

std::optional<std::uint64_t> Tracker::intercept(const AllocationRequest& request) const {
  const std::scoped_lock lock(mutex_);
  for (const auto& hook : hooks_) {
    if (auto address = hook->intercept(request)) return address;
  }
  return std::nullopt;
}

void Tracker::record(std::span<const AllocationEvent> events) const noexcept {
  if (events.empty()) return;
  const std::scoped_lock lock(mutex_);
  for (const auto& processor : processors_) processor->process(events);
}

void Tracker::describe_devices(std::span<const DeviceDescription> devices) const noexcept {
  const std::scoped_lock lock(mutex_);
  for (const auto& processor : processors_) processor->describe_devices(devices);
}

void Tracker::describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view name) const noexcept {
  const std::scoped_lock lock(mutex_);
  for (const auto& processor : processors_) processor->describe_mesh_buffer(mesh_buffer, name);
}

}  // namespace meshrt
