module;
#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.mesh;

import meshrt.core;
import meshrt.alloc;
import meshrt.tracking;
import meshrt.device;
import :mesh_memory;
import :allocation;

namespace meshrt::detail {

namespace {

// Process-unique, never reused. Id 0 means "none" (e.g. no mesh buffer).
std::atomic<std::uint64_t> next_buffer_id_value{1};
std::atomic<std::uint64_t> next_mesh_buffer_id_value{1};

BufferId reserve_buffer_ids(std::uint32_t count) {
  return BufferId{next_buffer_id_value.fetch_add(count, std::memory_order_relaxed)};
}

// A processor or hook called back into the mesh whose operation called it.
Error reentered(std::string_view what) {
  return Error{ErrorCode::invalid_argument,
               fmt::format("cannot {} from a tracker processor or hook of the same mesh while it reports an "
                           "operation: do it after the callback returns (deallocations asked for there are deferred "
                           "until then)",
                           what)};
}

Error mesh_closed() { return Error{ErrorCode::device_closed, "cannot allocate: the mesh device is closed"}; }

}  // namespace

MeshBufferId next_mesh_buffer_id() {
  return MeshBufferId{next_mesh_buffer_id_value.fetch_add(1, std::memory_order_relaxed)};
}

Result<BufferPlan> plan_buffer(const MeshDevice& mesh, std::uint64_t size_per_device,
                              const DeviceLocalBufferConfig& config, std::uint32_t first_device,
                              std::uint32_t device_count, MeshBufferId mesh_buffer, std::string name) {
  Expects(device_count >= 1 && device_count <= max_devices_per_event &&
          first_device + device_count <= mesh.device_count());
  // Checked again under the lock when memory is taken; this catches zero-size buffers too.
  if (!mesh.is_open()) return tl::unexpected(mesh_closed());
  if (index_of(config.buffer_type) >= buffer_type_count) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("buffer type {} is not one of dram, l1, l1_small, trace",
                            static_cast<unsigned>(config.buffer_type)));
  }
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
    const std::optional<std::uint64_t> padded = checked_multiply(size_per_device / config.page_size + 1, config.page_size);
    return fail(ErrorCode::invalid_argument,
                fmt::format("size {} bytes per device is not a whole number of {}-byte pages{}", size_per_device,
                            config.page_size, padded ? fmt::format(": pad it to {} bytes", *padded) : std::string{}));
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
  // The banks hand out whole granules: what each reserves is its pages rounded up to one.
  const std::uint64_t pages_per_bank = layout.bytes_per_bank(size_per_device / config.page_size);
  AllocationDirection direction = banks.direction;
  if (config.bottom_up) direction = *config.bottom_up ? AllocationDirection::bottom_up : AllocationDirection::top_down;
  return BufferPlan{
      .type = config.buffer_type,
      .category = config.category,
      .direction = direction,
      .layout = layout,
      .size_per_device = size_per_device,
      .bytes_per_bank = (pages_per_bank + banks.granule - 1) / banks.granule * banks.granule,
      .mesh_buffer = mesh_buffer,
      .first_device = first_device,
      .device_count = device_count,
      .name = std::move(name),
  };
}

Result<std::shared_ptr<BufferAllocation>> BufferAllocation::allocate(const std::shared_ptr<MeshMemory>& memory,
                                                                     BufferPlan plan) {
  Expects(memory != nullptr && plan.device_count > 0 && plan.size_per_device > 0);
  if (memory->held_by_this_thread()) return tl::unexpected(reentered("allocate"));
  const MeshLock lock = memory->lock();
  if (!memory->is_open(lock)) return tl::unexpected(mesh_closed());
  const AllocationRequest request{
      .type = plan.type,
      .category = plan.category,
      .mesh_buffer = plan.mesh_buffer,
      .device_count = plan.device_count,
      .size_per_device = plan.size_per_device,
      .bytes_per_bank = plan.bytes_per_bank,
  };
  std::uint64_t address = 0;
  const std::optional<std::uint64_t> intercepted = memory->tracker().intercept(request);
  if (intercepted) {
    address = *intercepted;
  } else {
    auto reserved =
        memory->allocate(lock, plan.type, plan.bytes_per_bank, plan.direction, plan.first_device, plan.device_count);
    if (!reserved) return tl::unexpected(std::move(reserved.error()));
    address = *reserved;
  }
  auto allocation = std::make_shared<BufferAllocation>(Token{}, memory, std::move(plan), address, intercepted.has_value());
  memory->add_resident(lock, *allocation);
  const AllocationEvent allocated =
      allocation->event(0, allocation->slot_count(), EventKind::allocate, FreeReason::none, wall_clock_ns());
  if (allocation->plan().name.empty()) {
    memory->tracker().record(std::span(&allocated, 1));
  } else {
    memory->tracker().record_named_allocation(allocated, allocation->plan().name);
  }
  return allocation;
}

BufferAllocation::BufferAllocation(Token /*token*/, std::shared_ptr<MeshMemory> memory, BufferPlan plan,
                                   std::uint64_t address, bool hooked)
    : memory_(std::move(memory)),
      plan_(std::move(plan)),
      address_(address),
      hooked_(hooked),
      first_id_(reserve_buffer_ids(plan_.device_count)),
      states_(std::make_unique<std::atomic<DeviceBufferState>[]>(plan_.device_count)),
      live_slots_(plan_.device_count) {
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

AllocationEvent BufferAllocation::event(std::uint32_t first, std::uint32_t count, EventKind kind, FreeReason reason,
                                        std::int64_t time_ns) const {
  return AllocationEvent{
      .kind = kind,
      .reason = reason,
      .type = plan_.type,
      .category = plan_.category,
      .hooked = hooked_,
      .device = device(first),
      .buffer = id(first),
      .device_count = count,
      .mesh_buffer = plan_.mesh_buffer,
      .address = address_,
      .size = plan_.size_per_device,
      .footprint = plan_.bytes_per_bank * plan_.layout.bank_count,
      .time_ns = time_ns,
  };
}

template <class Transition>
void BufferAllocation::for_each_allocated_run(std::span<const std::uint32_t> slots, Transition transition) const {
  for (std::size_t i = 0; i < slots.size();) {
    if (state(slots[i]) != DeviceBufferState::allocated) {
      ++i;
      continue;
    }
    std::size_t end = i + 1;
    while (end < slots.size() && slots[end] == slots[end - 1] + 1 && state(slots[end]) == DeviceBufferState::allocated) {
      ++end;
    }
    transition(slots[i], static_cast<std::uint32_t>(end - i));
    i = end;
  }
}

void BufferAllocation::deallocate_slots(std::span<const std::uint32_t> slots, FreeReason reason) noexcept {
  // Fast path without the lock: nothing here is still allocated (a terminal state is final).
  const bool any_live = std::ranges::any_of(slots, [this](std::uint32_t s) {
    return state(s) == DeviceBufferState::allocated;
  });
  if (!any_live) return;
  if (memory_->held_by_this_thread()) {
    // From a callback of this mesh: the deallocation happens, in full, as soon as it returns.
    memory_->defer([self = shared_from_this(), owned = std::vector(slots.begin(), slots.end()), reason] {
      self->deallocate_slots(owned, reason);
    });
    return;
  }
  const MeshLock lock = memory_->lock();
  const std::int64_t time = wall_clock_ns();
  EventBatch batch;
  for_each_allocated_run(slots, [&](std::uint32_t first, std::uint32_t count) {
    mark_deallocated(lock, first, count, reason, time, batch);
  });
  memory_->tracker().record(batch);
}

std::optional<ResidentHolding> BufferAllocation::holding(std::uint32_t device) const noexcept {
  if (device < plan_.first_device || device >= plan_.first_device + plan_.device_count) return std::nullopt;
  if (state(device - plan_.first_device) != DeviceBufferState::allocated) return std::nullopt;
  return ResidentHolding{.type = plan_.type,
                         .category = plan_.category,
                         .bytes = plan_.size_per_device,  // as the tracker, the server and meshrt-smi show it
                         .mesh_buffer = plan_.mesh_buffer,
                         .name = plan_.name};
}

void BufferAllocation::on_mesh_close(const MeshLock& lock) noexcept {
  std::array<std::uint32_t, max_devices_per_event> all{};
  std::iota(all.begin(), all.end(), 0U);
  const std::int64_t time = wall_clock_ns();
  EventBatch batch;
  for_each_allocated_run(std::span(all).first(slot_count()), [&](std::uint32_t first, std::uint32_t count) {
    mark_device_closed(lock, first, count, time, batch);
  });
  memory_->tracker().record(batch);
}

void BufferAllocation::mark_deallocated(const MeshLock& lock, std::uint32_t first, std::uint32_t count,
                                        FreeReason reason, std::int64_t time_ns, EventBatch& batch) {
  for (std::uint32_t slot = first; slot < first + count; ++slot) {
    Expects(state(slot) == DeviceBufferState::allocated);
    states_[slot].store(DeviceBufferState::deallocated, std::memory_order_release);
  }
  batch.push_back(event(first, count, EventKind::free, reason, time_ns));
  count_freed_slots(lock, first, count);
}

void BufferAllocation::mark_device_closed(const MeshLock& lock, std::uint32_t first, std::uint32_t count,
                                          std::int64_t time_ns, EventBatch& batch) {
  for (std::uint32_t slot = first; slot < first + count; ++slot) {
    Expects(state(slot) == DeviceBufferState::allocated);
    states_[slot].store(DeviceBufferState::device_closed, std::memory_order_release);
  }
  batch.push_back(event(first, count, EventKind::free, FreeReason::device_closed, time_ns));
  count_freed_slots(lock, first, count);
}

void BufferAllocation::count_freed_slots(const MeshLock& lock, std::uint32_t first, std::uint32_t count) {
  Expects(live_slots_ >= count);
  live_slots_ -= count;
  // Those devices' memory goes back now, so each allocator holds exactly what the tracker does
  // (a closed mesh already emptied them, and a hooked buffer never took any).
  if (!hooked_) memory_->free(lock, plan_.type, address_, plan_.bytes_per_bank, plan_.first_device + first, count);
  // The last device let go: stop being a resident of the mesh.
  if (live_slots_ == 0) memory_->remove_resident(lock, *this);
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
  Ensures(memory_->is_open(lock));  // allocated implies the mesh is open: close() leaves nothing allocated
  return {};
}

Result<void> BufferAllocation::write(std::uint32_t slot, std::span<const std::byte> bytes) {
  Expects(slot < slot_count());
  if (memory_->held_by_this_thread()) return tl::unexpected(reentered("write a buffer"));
  const MeshLock lock = memory_->lock();
  if (auto ok = check_transfer(lock, slot, bytes.size()); !ok) return ok;
  memory_->device(lock, plan_.first_device + slot).write_pages(plan_.type, plan_.layout, address_, bytes);
  return {};
}

Result<void> BufferAllocation::read(std::uint32_t slot, std::span<std::byte> bytes) const {
  Expects(slot < slot_count());
  if (memory_->held_by_this_thread()) return tl::unexpected(reentered("read a buffer"));
  const MeshLock lock = memory_->lock();
  if (auto ok = check_transfer(lock, slot, bytes.size()); !ok) return ok;
  memory_->device(lock, plan_.first_device + slot).read_pages(plan_.type, plan_.layout, address_, bytes);
  return {};
}

}  // namespace meshrt::detail
