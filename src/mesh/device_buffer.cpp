module;
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.mesh;

import meshrt.core;
import meshrt.tracking;
import meshrt.device;
import :mesh_memory;
import :allocation;

namespace meshrt {

std::string_view to_string(DeviceBufferState state) {
  switch (state) {
    case DeviceBufferState::allocated: return "allocated";
    case DeviceBufferState::deallocated: return "deallocated";
    case DeviceBufferState::device_closed: return "device_closed";
  }
  return "unknown";
}

Result<DeviceBuffer> DeviceBuffer::create(MeshDevice& mesh, MeshCoordinate coordinate, std::uint64_t size,
                                          const DeviceLocalBufferConfig& config, std::string name) {
  const auto index = checked_index(mesh.shape(), coordinate);
  if (!index) return tl::unexpected(index.error());
  auto plan = detail::plan_buffer(mesh, size, config, *index, 1,
                                  detail::next_mesh_buffer_id(), std::move(name));
  if (!plan) return tl::unexpected(std::move(plan.error()));
  if (plan->size_per_device == 0) return DeviceBuffer{};  // zero-size buffers take and report nothing
  auto allocation = detail::BufferAllocation::allocate(detail::MeshAccess::memory(mesh), std::move(*plan));
  if (!allocation) return tl::unexpected(std::move(allocation.error()));
  return DeviceBuffer(std::move(*allocation), 0);
}

DeviceBuffer::DeviceBuffer(std::shared_ptr<detail::BufferAllocation> allocation, std::uint32_t slot)
    : allocation_(std::move(allocation)), slot_(slot) {}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : allocation_(std::move(other.allocation_)), slot_(std::exchange(other.slot_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    deallocate_for(FreeReason::move_assigned);  // the buffer this handle owned is dropped
    allocation_ = std::move(other.allocation_);
    slot_ = std::exchange(other.slot_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() { deallocate_for(FreeReason::destructor); }

void DeviceBuffer::deallocate() noexcept { deallocate_for(FreeReason::explicit_deallocate); }

void DeviceBuffer::deallocate_for(FreeReason reason) noexcept {
  if (allocation_) allocation_->deallocate_slots(std::array{slot_}, reason);
}

DeviceBufferState DeviceBuffer::state() const {
  Expects(owns_buffer());
  return allocation_->state(slot_);
}

BufferId DeviceBuffer::id() const {
  Expects(owns_buffer());
  return allocation_->id(slot_);
}

DeviceId DeviceBuffer::device() const {
  Expects(owns_buffer());
  return allocation_->device(slot_);
}

MeshBufferId DeviceBuffer::mesh_buffer() const {
  Expects(owns_buffer());
  return allocation_->plan().mesh_buffer;
}

BufferType DeviceBuffer::type() const {
  Expects(owns_buffer());
  return allocation_->plan().type;
}

AllocationCategory DeviceBuffer::category() const {
  Expects(owns_buffer());
  return allocation_->plan().category;
}

std::uint64_t DeviceBuffer::address() const {
  Expects(owns_buffer());
  return allocation_->address();
}

std::uint64_t DeviceBuffer::size() const {
  Expects(owns_buffer());
  return allocation_->plan().size_per_device;
}

std::uint64_t DeviceBuffer::page_size() const {
  Expects(owns_buffer());
  return allocation_->plan().layout.page_size;
}

Result<void> DeviceBuffer::write(std::span<const std::byte> bytes) {
  if (!owns_buffer()) return fail(ErrorCode::invalid_argument, "write to an empty (moved-from) device buffer");
  return allocation_->write(slot_, bytes);
}

Result<void> DeviceBuffer::read(std::span<std::byte> bytes) const {
  if (!owns_buffer()) return fail(ErrorCode::invalid_argument, "read from an empty (moved-from) device buffer");
  return allocation_->read(slot_, bytes);
}

}  // namespace meshrt
