module;
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.buffer;

import meshrt.core;
import meshrt.tracking;
import meshrt.device;
import :allocation;

namespace meshrt::detail {

namespace {

// Process-unique, never reused. Id 0 means "none" (e.g. no mesh buffer).
std::atomic<std::uint64_t> next_buffer_id_value{1};
std::atomic<std::uint64_t> next_mesh_buffer_id_value{1};

BufferId reserve_buffer_ids(std::uint32_t count) {
  return BufferId{next_buffer_id_value.fetch_add(count, std::memory_order_relaxed)};
}

Error mesh_closed() { return Error{ErrorCode::device_closed, "cannot allocate: the mesh device is closed"}; }

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

MeshBufferId next_mesh_buffer_id() {
  return MeshBufferId{next_mesh_buffer_id_value.fetch_add(1, std::memory_order_relaxed)};
}

Result<BufferPlan> plan_buffer(const MeshDevice& mesh, std::uint64_t size_per_device,
                              const DeviceLocalBufferConfig& config, std::vector<std::uint32_t> devices,
                              MeshBufferId mesh_buffer, std::string name) {
  // Checked again under the lock when memory is taken; this catches zero-size buffers too.
  if (!mesh.is_open()) return tl::unexpected(mesh_closed());
  const BankLayout& banks = mesh.spec().layout(config.buffer_type);
  if (banks.bank_size == 0) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("device '{}' has no {} region: open the mesh with a non-zero size for it (DeviceRegions)",
                            mesh.spec().name, to_string(config.buffer_type)));
  }
  if (config.page_size == 0) {
    return fail(ErrorCode::invalid_argument, "page size 0: a buffer is made of pages of at least one byte");
  }
  if (size_per_device % config.page_size != 0) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("size {} bytes per device is not a whole number of {}-byte pages: pad it to {} bytes",
                            size_per_device, config.page_size,
                            (size_per_device / config.page_size + 1) * config.page_size));
  }
  if (config.page_size > banks.bank_size) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("page size {} bytes is larger than a {} bank of {} bytes", config.page_size,
                            to_string(config.buffer_type), banks.bank_size));
  }
  if (size_per_device > banks.total_bytes()) {
    return fail(ErrorCode::out_of_memory,
                fmt::format("{} bytes per device is more than all {} memory of a {} device ({} bytes)",
                            size_per_device, to_string(config.buffer_type), mesh.spec().name, banks.total_bytes()));
  }
  const InterleavedLayout layout = InterleavedLayout::of(banks, config.page_size);
  return BufferPlan{
      .type = config.buffer_type,
      .layout = layout,
      .size_per_device = size_per_device,
      .bytes_per_bank = layout.bytes_per_bank(size_per_device / config.page_size),
      .mesh_buffer = mesh_buffer,
      .devices = std::move(devices),
      .name = std::move(name),
  };
}

Result<std::shared_ptr<BufferAllocation>> BufferAllocation::allocate(const std::shared_ptr<MeshMemory>& memory,
                                                                     BufferPlan plan) {
  Expects(memory != nullptr && !plan.devices.empty() && plan.size_per_device > 0);
  const MeshLock lock = memory->lock();
  if (!memory->is_open(lock)) return tl::unexpected(mesh_closed());
  const AllocationRequest request{
      .type = plan.type,
      .mesh_buffer = plan.mesh_buffer,
      .device_count = static_cast<std::uint32_t>(plan.devices.size()),
      .size_per_device = plan.size_per_device,
      .bytes_per_bank = plan.bytes_per_bank,
  };
  std::uint64_t address = 0;
  const std::optional<std::uint64_t> intercepted = memory->tracker().intercept(request);
  if (intercepted) {
    address = *intercepted;
  } else {
    auto reserved = memory->reserve(lock, plan.type, plan.bytes_per_bank);
    if (!reserved) return tl::unexpected(std::move(reserved.error()));
    address = *reserved;
  }
  if (!plan.name.empty()) memory->tracker().describe_mesh_buffer(plan.mesh_buffer, plan.name);
  auto allocation = std::make_shared<BufferAllocation>(Token{}, memory, std::move(plan), address, intercepted.has_value());
  memory->enroll(lock, *allocation);
  const std::int64_t time = now_ns();
  EventBatch batch;
  batch.reserve(allocation->slot_count());
  for (std::uint32_t slot = 0; slot < allocation->slot_count(); ++slot) {
    batch.push_back(allocation->event(slot, EventKind::allocate, FreeReason::none, time));
  }
  memory->tracker().record(batch);
  return allocation;
}

BufferAllocation::BufferAllocation(Token /*token*/, std::shared_ptr<MeshMemory> memory, BufferPlan plan,
                                   std::uint64_t address, bool hooked)
    : memory_(std::move(memory)),
      plan_(std::move(plan)),
      address_(address),
      hooked_(hooked),
      first_id_(reserve_buffer_ids(static_cast<std::uint32_t>(plan_.devices.size()))),
      states_(std::make_unique<std::atomic<DeviceBufferState>[]>(plan_.devices.size())),
      live_slots_(static_cast<std::uint32_t>(plan_.devices.size())) {
  // make_unique value-initialises each atomic to its first enumerator: allocated.
  static_assert(DeviceBufferState{} == DeviceBufferState::allocated);
}

BufferAllocation::~BufferAllocation() {
  // Handles deallocate before they let go, so the last one leaves nothing live.
  Ensures(live_slots_ == 0);
}

DeviceBufferState BufferAllocation::state(std::uint32_t slot) const {
  Expects(slot < slot_count());
  return states_[slot].load(std::memory_order_acquire);
}

AllocationEvent BufferAllocation::event(std::uint32_t slot, EventKind kind, FreeReason reason,
                                        std::int64_t time_ns) const {
  return AllocationEvent{
      .kind = kind,
      .reason = reason,
      .type = plan_.type,
      .hooked = hooked_,
      .device = device(slot),
      .buffer = id(slot),
      .mesh_buffer = plan_.mesh_buffer,
      .address = address_,
      .size = plan_.size_per_device,
      .footprint = plan_.bytes_per_bank * plan_.layout.bank_count,
      .time_ns = time_ns,
  };
}

void BufferAllocation::release_slots(std::span<const std::uint32_t> slots, FreeReason reason) noexcept {
  // Fast path without the lock: nothing here is still allocated (a terminal state is final).
  const bool any_live = std::ranges::any_of(slots, [this](std::uint32_t s) {
    return state(s) == DeviceBufferState::allocated;
  });
  if (!any_live) return;
  const MeshLock lock = memory_->lock();
  EventBatch batch;
  batch.reserve(slots.size());
  for (const std::uint32_t slot : slots) {
    if (state(slot) == DeviceBufferState::allocated) mark_deallocated(lock, slot, reason, batch);
  }
  memory_->tracker().record(batch);
}

void BufferAllocation::release_on_close(const MeshLock& lock) noexcept {
  EventBatch batch;
  batch.reserve(slot_count());
  for (std::uint32_t slot = 0; slot < slot_count(); ++slot) {
    if (state(slot) == DeviceBufferState::allocated) mark_released(lock, slot, batch);
  }
  memory_->tracker().record(batch);
}

void BufferAllocation::mark_deallocated(const MeshLock& lock, std::uint32_t slot, FreeReason reason,
                                        EventBatch& batch) {
  Expects(state(slot) == DeviceBufferState::allocated);
  states_[slot].store(DeviceBufferState::deallocated, std::memory_order_release);
  batch.push_back(event(slot, EventKind::free, reason, now_ns()));
  slot_freed(lock);
}

void BufferAllocation::mark_released(const MeshLock& lock, std::uint32_t slot, EventBatch& batch) {
  Expects(state(slot) == DeviceBufferState::allocated);
  states_[slot].store(DeviceBufferState::released, std::memory_order_release);
  batch.push_back(event(slot, EventKind::free, FreeReason::device_closed, now_ns()));
  slot_freed(lock);
}

void BufferAllocation::slot_freed(const MeshLock& lock) {
  Expects(live_slots_ > 0);
  if (--live_slots_ != 0) return;
  // The last device let go: give the lock-step reservation back (a closed mesh already did, and
  // a hooked buffer never took one) and leave the mesh's registry.
  if (!hooked_) memory_->unreserve(lock, plan_.type, address_, plan_.bytes_per_bank);
  memory_->withdraw(lock, *this);
}

Result<void> BufferAllocation::check_transfer(const MeshLock& lock, std::uint32_t slot, std::size_t bytes) const {
  if (state(slot) != DeviceBufferState::allocated) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("buffer {} on device {} is {}: it has no memory to read or write", id(slot).value(),
                            device(slot).value(), to_string(state(slot))));
  }
  if (hooked_) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("buffer {} was intercepted by an allocation hook: it has no device memory",
                            id(slot).value()));
  }
  if (bytes != plan_.size_per_device) {
    return fail(ErrorCode::invalid_argument, fmt::format("buffer {} holds {} bytes on device {}, got a transfer of {}",
                                                         id(slot).value(), plan_.size_per_device,
                                                         device(slot).value(), bytes));
  }
  Ensures(memory_->is_open(lock));  // allocated implies the mesh is open: close() releases everything
  return {};
}

Result<void> BufferAllocation::write(std::uint32_t slot, std::span<const std::byte> bytes) {
  Expects(slot < slot_count());
  const MeshLock lock = memory_->lock();
  if (auto ok = check_transfer(lock, slot, bytes.size()); !ok) return ok;
  memory_->device(lock, plan_.devices[slot]).write_pages(plan_.type, plan_.layout, address_, bytes);
  return {};
}

Result<void> BufferAllocation::read(std::uint32_t slot, std::span<std::byte> bytes) const {
  Expects(slot < slot_count());
  const MeshLock lock = memory_->lock();
  if (auto ok = check_transfer(lock, slot, bytes.size()); !ok) return ok;
  memory_->device(lock, plan_.devices[slot]).read_pages(plan_.type, plan_.layout, address_, bytes);
  return {};
}

}  // namespace meshrt::detail
