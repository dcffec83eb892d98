module;
#include <algorithm>
#include <array>
#include <functional>
#include <thread>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
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

namespace meshrt {

void Device::write_pages(BufferType type, const InterleavedLayout& layout, std::uint64_t address,
                         std::span<const std::byte> bytes) {
  Expects(layout.page_size > 0 && bytes.size() % layout.page_size == 0);
  const std::uint64_t pages = bytes.size() / layout.page_size;
  for (std::uint64_t page = 0; page < pages; ++page) {
    memory_.write(type, layout.bank_of(page), address + layout.offset_of(page),
                  bytes.subspan(page * layout.page_size, layout.page_size));
  }
}

void Device::read_pages(BufferType type, const InterleavedLayout& layout, std::uint64_t address,
                        std::span<std::byte> bytes) const {
  Expects(layout.page_size > 0 && bytes.size() % layout.page_size == 0);
  const std::uint64_t pages = bytes.size() / layout.page_size;
  for (std::uint64_t page = 0; page < pages; ++page) {
    memory_.read(type, layout.bank_of(page), address + layout.offset_of(page),
                 bytes.subspan(page * layout.page_size, layout.page_size));
  }
}

namespace detail {

MeshLock::MeshLock(const MeshMemory& owner, std::mutex& mutex, bool borrowed)
    : owner_(&owner), lock_(mutex, std::defer_lock), borrowed_(borrowed) {
  if (borrowed_) return;
  lock_.lock();
  owner.owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
}

MeshLock::~MeshLock() {
  if (lock_.owns_lock()) owner_->unlock(lock_);
}

void MeshMemory::defer(std::function<void()> work) const {
  Expects(held_by_this_thread());
  deferred_.push_back(std::move(work));
}

// The outermost lock goes: then what callbacks deferred runs, each taking the lock anew (and
// perhaps deferring more, which runs in turn).
void MeshMemory::unlock(std::unique_lock<std::mutex>& lock) const {
  std::vector<std::function<void()>> work;
  work.swap(deferred_);
  owner_.store(std::thread::id{}, std::memory_order_relaxed);
  lock.unlock();
  for (const auto& item : work) item();
}

Result<std::shared_ptr<MeshMemory>> MeshMemory::create(MeshShape shape, DeviceSpec spec,
                                                       std::shared_ptr<Tracker> tracker) {
  if (shape.rows == 0 || shape.cols == 0 || shape.rows > max_mesh_dimension || shape.cols > max_mesh_dimension) {
    return fail(ErrorCode::invalid_argument, fmt::format("mesh shape {} is not supported: each side must be 1 to {}",
                                                         to_string(shape), max_mesh_dimension));
  }
  if (auto valid = validate(spec); !valid) return tl::unexpected(std::move(valid.error()));
  TypeAllocators allocators;
  for (const BufferType type : all_buffer_types) {
    const BankLayout& banks = spec.layout(type);
    if (banks.bank_size == 0) continue;  // an empty carve-out: buffers of this type are refused
    auto allocator = LockStepAllocator::create(shape.device_count(), banks.base_address, banks.bank_size,
                                               banks.granule, spec.allocator_policy);
    if (!allocator) return tl::unexpected(std::move(allocator.error()));
    allocators[index_of(type)].emplace(std::move(*allocator));
  }
  Expects(tracker != nullptr);
  std::vector<DeviceDescription> devices(shape.device_count());
  for (std::uint32_t index = 0; index < shape.device_count(); ++index) {
    devices[index].device = DeviceId{index};
    for (const BufferType type : all_buffer_types) {
      const BankLayout& banks = spec.layout(type);
      devices[index].total_bytes[index_of(type)] = banks.total_bytes();
      devices[index].bank_count[index_of(type)] = banks.bank_count;
      devices[index].base_address[index_of(type)] = banks.base_address;
    }
  }
  tracker->describe_devices(devices);
  return std::shared_ptr<MeshMemory>(new MeshMemory(shape, std::move(spec), std::move(tracker), std::move(allocators)));
}

MeshMemory::MeshMemory(MeshShape shape, DeviceSpec spec, std::shared_ptr<Tracker> tracker,
                       TypeAllocators allocators)
    : shape_(shape), spec_(std::move(spec)), tracker_(std::move(tracker)), allocators_(std::move(allocators)) {
  devices_.reserve(shape_.device_count());
  for (std::uint32_t index = 0; index < shape_.device_count(); ++index) {
    devices_.emplace_back(DeviceId{index}, shape_.coordinate_of(index));
  }
}

bool MeshMemory::is_open(const MeshLock& lock) const {
  Expects(lock.holds(*this));
  return open_;
}

LockStepAllocator& MeshMemory::allocator(BufferType type) {
  auto& allocator = allocators_[index_of(type)];
  Expects(allocator.has_value());  // buffers of an empty region are refused when planned
  return *allocator;
}

Result<std::uint64_t> MeshMemory::allocate(const MeshLock& lock, BufferType type, std::uint64_t bytes_per_bank,
                                           AllocationDirection direction, std::uint32_t first_device,
                                           std::uint32_t device_count) {
  Expects(lock.holds(*this));
  Expects(device_count >= 1 && first_device + device_count <= devices_.size());
  if (!open_) return fail(ErrorCode::device_closed, "the mesh device is closed: open a new one to allocate");
  auto address = allocator(type).allocate(first_device, device_count, bytes_per_bank, direction);
  if (!address) {
    const std::string devices = device_count == 1 ? fmt::format("device {}", first_device)
                                                  : fmt::format("devices {}-{}", first_device,
                                                                first_device + device_count - 1);
    // The allocator's figures are per bank (every bank of the devices takes the same share);
    // the holdings that follow are per device.
    std::string message = fmt::format("{} on {} ({}, {} banks each; bytes per bank): {}", to_string(type), spec_.name,
                                      devices, spec_.layout(type).bank_count, address.error().message);
    if (address.error().code == ErrorCode::out_of_memory) {
      message += largest_holdings(type, first_device);
      const AllocatorStatistics there = allocator(type).member(first_device).statistics();
      tracker_->report_out_of_memory({.device = DeviceId{first_device},
                                      .type = type,
                                      .requested = bytes_per_bank * spec_.layout(type).bank_count,
                                      .largest_free_block = there.largest_free_block,
                                      .message = message});
    }
    return fail(address.error().code, std::move(message));
  }
  return *address;
}

void MeshMemory::free(const MeshLock& lock, BufferType type, std::uint64_t address, std::uint64_t bytes_per_bank,
                      std::uint32_t first_device, std::uint32_t device_count) {
  Expects(lock.holds(*this));
  Expects(device_count >= 1 && first_device + device_count <= devices_.size());
  if (!open_) return;  // close() already emptied everything
  const auto freed = allocator(type).free(first_device, device_count, address);
  Ensures(freed.has_value());  // the buffer state machine frees each reservation exactly once
  const std::uint32_t banks = spec_.layout(type).bank_count;
  for (std::uint32_t device = first_device; device < first_device + device_count; ++device) {
    devices_[device].memory().discard(type, banks, address, bytes_per_bank);
  }
}

// "; largest there: ..." — the mesh buffers holding most of `type` on `device`, for an
// out-of-memory Error: who to free, or who leaked.
std::string MeshMemory::largest_holdings(BufferType type, std::uint32_t device) const {
  constexpr std::size_t named = 5;
  std::vector<ResidentHolding> holdings;
  for (const MeshResident* resident = residents_; resident != nullptr; resident = resident->next_) {
    const std::optional<ResidentHolding> holding = resident->holding(device);
    if (holding && holding->type == type) holdings.push_back(*holding);
  }
  if (holdings.empty()) return {};
  // Largest first; of equal ones, the oldest (the lowest id) first, so the list reads the same each time.
  const auto larger = [](const ResidentHolding& a, const ResidentHolding& b) {
    return a.bytes != b.bytes ? a.bytes > b.bytes : a.mesh_buffer.value() < b.mesh_buffer.value();
  };
  const std::size_t shown = std::min(named, holdings.size());
  std::partial_sort(holdings.begin(), holdings.begin() + static_cast<std::ptrdiff_t>(shown), holdings.end(), larger);
  std::string text = fmt::format("; largest on device {} (bytes on the device):", device);
  for (std::size_t i = 0; i < shown; ++i) {
    const ResidentHolding& h = holdings[i];
    text += fmt::format("{} mesh buffer {}{} ({}, {} bytes)", i == 0 ? "" : ",", h.mesh_buffer.value(),
                        h.name.empty() ? std::string{} : fmt::format(" '{}'", h.name), to_string(h.category), h.bytes);
  }
  if (holdings.size() > shown) text += fmt::format(" and {} more", holdings.size() - shown);
  return text;
}

void MeshMemory::add_resident(const MeshLock& lock, MeshResident& resident) {
  Expects(lock.holds(*this) && !resident.resident_ && open_);
  resident.previous_ = nullptr;
  resident.next_ = residents_;
  if (residents_ != nullptr) residents_->previous_ = &resident;
  residents_ = &resident;
  resident.resident_ = true;
}

void MeshMemory::remove_resident(const MeshLock& lock, MeshResident& resident) {
  Expects(lock.holds(*this));
  if (!resident.resident_) return;
  if (resident.previous_ != nullptr) resident.previous_->next_ = resident.next_;
  else residents_ = resident.next_;
  if (resident.next_ != nullptr) resident.next_->previous_ = resident.previous_;
  resident.previous_ = resident.next_ = nullptr;
  resident.resident_ = false;
}

Device& MeshMemory::device(const MeshLock& lock, std::uint32_t index) {
  Expects(lock.holds(*this) && index < devices_.size());
  return devices_[index];
}

AllocatorStatistics MeshMemory::statistics(std::uint32_t device_index, BufferType type) const {
  const MeshLock lock = this->lock();
  Expects(device_index < devices_.size());
  const auto& allocator = allocators_[index_of(type)];
  return allocator ? allocator->member(device_index).statistics() : AllocatorStatistics{};
}

std::optional<MemoryView> MeshMemory::memory_view(std::uint32_t device_index, BufferType type) const {
  const MeshLock lock = this->lock();
  Expects(device_index < devices_.size());
  if (!open_) return std::nullopt;
  const auto& lock_step = allocators_[index_of(type)];
  const BankAllocator* allocator = lock_step ? &lock_step->member(device_index) : nullptr;
  const AllocatorStatistics figures = allocator != nullptr ? allocator->statistics() : AllocatorStatistics{};
  return MemoryView{
      .num_banks = spec_.layout(type).bank_count,
      .total_bytes_per_bank = figures.total_bytes,
      .total_bytes_allocated_per_bank = figures.allocated_bytes,
      .total_bytes_free_per_bank = figures.free_bytes,
      .largest_contiguous_bytes_free_per_bank = figures.largest_free_block,
      .block_table = allocator != nullptr ? allocator->block_table() : std::vector<Block>{},
  };
}

std::uint64_t MeshMemory::resident_bytes(std::uint32_t device_index) const {
  const MeshLock lock = this->lock();
  Expects(device_index < devices_.size());
  return devices_[device_index].memory().resident_bytes();
}

void MeshMemory::keep_system_buffer(const MeshLock& /*lock*/, std::shared_ptr<MeshResident> buffer) {
  Expects(buffer != nullptr);
  system_buffers_.push_back(std::move(buffer));
}

void MeshMemory::close() {
  // Declared before the lock, so the residents kept alive here are let go after it is released.
  std::vector<std::shared_ptr<const void>> kept_alive;
  std::vector<std::shared_ptr<MeshResident>> system_buffers;
  const MeshLock lock = this->lock();
  if (!open_) return;
  open_ = false;  // from here no reservation is made or given back one by one
  system_buffers.swap(system_buffers_);
  // Each resident reports its Frees before the memory is gone; it is unlinked before it is told,
  // so it cannot re-enter the registry.
  while (residents_ != nullptr) {
    MeshResident& resident = *residents_;
    remove_resident(lock, resident);
    kept_alive.push_back(resident.keep_alive());
    resident.on_mesh_close(lock);
  }
  for (auto& allocator : allocators_) {
    if (allocator) allocator->reset();
  }
  for (Device& device : devices_) device.memory().clear();
}

}  // namespace detail

}  // namespace meshrt
