module;
#include <algorithm>
#include <atomic>
#include <iterator>
#include <thread>
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
import :read_sections;

namespace meshrt {

std::string_view to_string(EventKind kind) { return kind == EventKind::allocate ? "allocate" : "free"; }

std::string_view to_string(FreeReason reason) {
  switch (reason) {
    case FreeReason::none: return "none";
    case FreeReason::explicit_deallocate: return "explicit deallocate";
    case FreeReason::destructor: return "destructor";
    case FreeReason::mesh_deallocate: return "mesh deallocate";
    case FreeReason::device_closed: return "device closed";
    case FreeReason::move_assigned: return "move assigned";
  }
  return "unknown";
}

namespace {

// Registered while modules are initialized (one thread, before main) and read once, when the
// default tracker is made; the mutex covers a provider initialized later, on another thread.
std::mutex default_sources_mutex;
std::vector<Tracker::DefaultProcessorSource>& default_sources() {
  static std::vector<Tracker::DefaultProcessorSource> sources;
  return sources;
}

}  // namespace

void Tracker::provide_default_processor(DefaultProcessorSource source) {
  Expects(source != nullptr);
  const std::scoped_lock lock(default_sources_mutex);
  // A module's initializer may run in more than one unit that imports it: one source, once.
  if (std::ranges::find(default_sources(), source) == default_sources().end()) default_sources().push_back(source);
}

std::shared_ptr<Tracker> Tracker::process_default() {
  static const std::shared_ptr<Tracker> tracker = [] {
    auto created = std::make_shared<Tracker>();
    std::vector<DefaultProcessorSource> sources;
    {
      const std::scoped_lock lock(default_sources_mutex);
      sources = default_sources();
    }
    for (const DefaultProcessorSource source : sources) {
      if (auto processor = source()) created->add_processor(std::move(processor));
    }
    return created;
  }();
  return tracker;
}

Tracker::Tracker() : owned_(std::make_unique<const Listeners>()) {
  current_.store(owned_.get(), std::memory_order_seq_cst);
}

template <class Change, class Published>
void Tracker::publish(Change change, Published published) {
  std::vector<std::unique_ptr<const Listeners>> replaced;
  {
    const std::scoped_lock lock(mutex_);
    auto next = std::make_unique<Listeners>(*owned_);
    change(*next);
    // seq_cst: a reader that announced its read after this store sees the new list.
    current_.store(next.get(), std::memory_order_seq_cst);
    retired_.push_back(std::move(owned_));
    owned_ = std::move(next);
    // From inside a callback this thread's own read would never end: the old lists wait.
    if (!detail::inside_read_section()) replaced.swap(retired_);
  }
  published();
  if (replaced.empty()) return;
  if (!detail::wait_for_read_sections()) {
    // Without the fence no read can be proven over: keeping the old lists is safe, freeing is not.
    const std::scoped_lock lock(mutex_);
    std::ranges::move(replaced, std::back_inserter(retired_));
    return;
  }
  replaced.clear();  // the removed listeners go here, outside the lock (a client may take a while)
}

std::size_t Tracker::lists_waiting() const {
  const std::scoped_lock lock(mutex_);
  return retired_.size();
}

void Tracker::add_processor(std::shared_ptr<EventProcessor> processor) {
  Expects(processor != nullptr);
  auto member = std::make_shared<Member>(std::move(processor), joining, detail::forks_seen());
  std::vector<DeviceDescription> devices;
  publish(
      [&](Listeners& listeners) {
        listeners.processors.push_back(member);
        devices = described_;
      },
      [&] {
        // Readers that reach the new member wait until it knows where its view starts.
        if (!devices.empty()) member->processor->describe_devices(devices);
        // Until this tracker recorded an Alloc there is nothing to hide (ids may be anyone's then).
        // The high water first: its scan synchronises with every read announced so far, so the
        // flag read after it is set if any of those reads was an Alloc of this tracker.
        const std::uint64_t high_water = detail::announced_high_water();
        const bool recorded = recorded_allocations_.load(std::memory_order_seq_cst);
        member->first_buffer.store(recorded ? high_water : 0, std::memory_order_release);
      });
}

void Tracker::remove_processor(const EventProcessor& processor) {
  publish([&](Listeners& listeners) {
    std::erase_if(listeners.processors, [&](const auto& m) { return m->processor.get() == &processor; });
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
  const detail::ReadSection read;
  for (const auto& hook : current_.load(std::memory_order_seq_cst)->hooks) {
    if (auto address = hook->intercept(request)) return address;
  }
  return std::nullopt;
}

std::uint64_t Tracker::view_start(Member& member) {
  std::uint64_t first = member.first_buffer.load(std::memory_order_acquire);
  while (first == joining) {
    if (detail::forks_seen() != member.forks_at_join) {
      // A fork's child, forked while the processor joined: the joining thread stayed in the
      // parent, so the child works out where the view starts itself.
      std::uint64_t expected = joining;
      (void)member.first_buffer.compare_exchange_strong(expected, detail::announced_high_water(),
                                                        std::memory_order_acq_rel);
      return member.first_buffer.load(std::memory_order_acquire);
    }
    std::this_thread::yield();
    first = member.first_buffer.load(std::memory_order_acquire);
  }
  return first;
}

void Tracker::deliver(Member& member, std::span<const AllocationEvent> events, std::string_view name) noexcept {
  // A name comes with its mesh buffer's Alloc alone (record_named_allocation): it goes to the
  // processors shown that Alloc, in the same read, and to no other.
  const auto show = [&](std::span<const AllocationEvent> shown) {
    if (!name.empty()) member.processor->describe_mesh_buffer(shown.front().mesh_buffer, name);
    member.processor->process(shown);
  };
  const std::uint64_t first = view_start(member);
  const auto visible = [first](const AllocationEvent& event) { return event.buffer.value() >= first; };
  if (first == 0 || std::ranges::all_of(events, visible)) return show(events);
  // Events of buffers allocated before it joined are not its to see (rare: only while those live).
  std::vector<AllocationEvent> seen;
  std::ranges::copy_if(events, std::back_inserter(seen), visible);
  if (!seen.empty()) show(seen);
}

void Tracker::record(std::span<const AllocationEvent> events) const noexcept { record_events(events, {}); }

void Tracker::record_named_allocation(const AllocationEvent& allocated, std::string_view name) const noexcept {
  Expects(allocated.kind == EventKind::allocate);
  record_events(std::span(&allocated, 1), name);
}

void Tracker::record_events(std::span<const AllocationEvent> events, std::string_view name) const noexcept {
  if (events.empty()) return;
  std::uint64_t allocated_end = 0;
  for (const AllocationEvent& event : events) {
    if (event.kind == EventKind::allocate) {
      allocated_end = std::max(allocated_end, event.buffer.value() + event.device_count);
    }
  }
  if (allocated_end > 0 && !recorded_allocations_.load(std::memory_order_relaxed)) {
    recorded_allocations_.store(true, std::memory_order_seq_cst);  // before the read announces itself
  }
  const detail::ReadSection read(allocated_end);
  for (const auto& member : current_.load(std::memory_order_seq_cst)->processors) deliver(*member, events, name);
}

void Tracker::report_out_of_memory(const OutOfMemoryReport& report) const noexcept {
  const detail::ReadSection read;
  for (const auto& member : current_.load(std::memory_order_seq_cst)->processors) {
    member->processor->report_out_of_memory(report);
  }
}

void Tracker::describe_devices(std::span<const DeviceDescription> devices) const noexcept {
  {
    const std::scoped_lock lock(mutex_);
    for (const DeviceDescription& device : devices) {
      std::erase_if(described_, [&](const DeviceDescription& d) { return d.device == device.device; });
      described_.push_back(device);
    }
  }
  const detail::ReadSection read;
  for (const auto& member : current_.load(std::memory_order_seq_cst)->processors) {
    member->processor->describe_devices(devices);
  }
}


}  // namespace meshrt
