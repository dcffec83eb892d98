module;
#include <algorithm>
#include <atomic>
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

Tracker::Tracker() {
  published_.push_back(std::make_unique<const Listeners>());
  current_.store(published_.back().get(), std::memory_order_release);
}

template <class Change>
void Tracker::publish(Change change) {
  const std::scoped_lock lock(mutex_);
  auto next = std::make_unique<Listeners>(*current_.load(std::memory_order_relaxed));
  change(*next);
  published_.push_back(std::move(next));
  current_.store(published_.back().get(), std::memory_order_release);
}

void Tracker::add_processor(std::shared_ptr<EventProcessor> processor) {
  Expects(processor != nullptr);
  publish([&](Listeners& listeners) { listeners.processors.push_back(std::move(processor)); });
}

void Tracker::remove_processor(const EventProcessor& processor) {
  publish([&](Listeners& listeners) {
    std::erase_if(listeners.processors, [&](const auto& p) { return p.get() == &processor; });
  });
}

void Tracker::add_hook(std::shared_ptr<AllocationHook> hook) {
  Expects(hook != nullptr);
  publish([&](Listeners& listeners) { listeners.hooks.push_back(std::move(hook)); });
}

void Tracker::remove_hook(const AllocationHook& hook) {
  publish([&](Listeners& listeners) { std::erase_if(listeners.hooks, [&](const auto& h) { return h.get() == &hook; }); });
}

std::optional<std::uint64_t> Tracker::intercept(const AllocationRequest& request) const {
  for (const auto& hook : current_.load(std::memory_order_acquire)->hooks) {
    if (auto address = hook->intercept(request)) return address;
  }
  return std::nullopt;
}

void Tracker::record(std::span<const AllocationEvent> events) const noexcept {
  if (events.empty()) return;
  for (const auto& processor : current_.load(std::memory_order_acquire)->processors) processor->process(events);
}

void Tracker::describe_devices(std::span<const DeviceDescription> devices) const noexcept {
  for (const auto& processor : current_.load(std::memory_order_acquire)->processors) processor->describe_devices(devices);
}

void Tracker::describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view name) const noexcept {
  for (const auto& processor : current_.load(std::memory_order_acquire)->processors) {
    processor->describe_mesh_buffer(mesh_buffer, name);
  }
}

}  // namespace meshrt
