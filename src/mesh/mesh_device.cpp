module;
#include <array>
#include <functional>
#include <thread>
#include <tuple>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
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

namespace meshrt {

namespace {

// Allocates each device's system buffers (ADR 0020) through the same state machine as every
// buffer; the mesh keeps them until it closes. An Error names the buffer that did not fit.
Result<void> open_system_buffers(const MeshDevice& mesh) {
  const SystemBuffers& sizes = mesh.spec().system_buffers;
  const std::uint32_t devices = mesh.shape().device_count();
  const std::shared_ptr<detail::MeshMemory>& memory = detail::MeshAccess::memory(mesh);
  for (const auto& [name, type, size] : {std::tuple{"command queue", BufferType::dram, sizes.command_queue},
                                         std::tuple{"dispatch buffer (DRAM)", BufferType::dram, sizes.dram_dispatch},
                                         std::tuple{"dispatch buffer (L1)", BufferType::l1, sizes.l1_dispatch}}) {
    if (size == 0) continue;
    const DeviceLocalBufferConfig config{.page_size = SystemBuffers::page_size,
                                         .buffer_type = type,
                                         .category = AllocationCategory::system};
    auto plan = detail::plan_buffer(mesh, size, config, 0, devices, detail::next_mesh_buffer_id(), name);
    auto allocation = plan.and_then([&](detail::BufferPlan& p) { return detail::BufferAllocation::allocate(memory, std::move(p)); });
    if (!allocation) {
      return fail(allocation.error().code, fmt::format("opening a {} mesh of {}: its system {} of {} bytes per device: {}",
                                                       to_string(mesh.shape()), mesh.spec().name, name, size,
                                                       allocation.error().message));
    }
    memory->keep_system_buffer(memory->lock(), std::move(*allocation));
  }
  return {};
}

}  // namespace

Result<MeshDevice> MeshDevice::create(MeshShape shape, DeviceSpec spec, std::shared_ptr<Tracker> tracker) {
  auto memory = detail::MeshMemory::create(shape, std::move(spec),
                                           tracker != nullptr ? std::move(tracker) : Tracker::process_default());
  if (!memory) return tl::unexpected(std::move(memory.error()));
  MeshDevice mesh(std::move(*memory));
  // On an Error, `mesh` closes as it goes: what was allocated is reported freed.
  if (auto opened = open_system_buffers(mesh); !opened) return tl::unexpected(std::move(opened.error()));
  return mesh;
}

MeshDevice::MeshDevice(std::shared_ptr<detail::MeshMemory> memory)
    : memory_(std::move(memory)), program_cache_(std::make_unique<ProgramCache>()) {}

MeshDevice::MeshDevice(MeshDevice&& other) noexcept
    : memory_(std::move(other.memory_)), program_cache_(std::move(other.program_cache_)) {}

MeshDevice& MeshDevice::operator=(MeshDevice&& other) noexcept {
  if (this != &other) {
    close();
    memory_ = std::move(other.memory_);
    program_cache_ = std::move(other.program_cache_);
  }
  return *this;
}

MeshDevice::~MeshDevice() { close(); }

void MeshDevice::close() {
  if (!memory_) return;
  if (memory_->held_by_this_thread()) {
    // Called from a callback of this mesh (a processor, a hook): it closes when that returns.
    memory_->defer([memory = memory_] { memory->close(); });
    return;
  }
  memory_->close();
  // Its binaries were freed by the close (device_closed, with every other buffer): drop the handles.
  program_cache_->clear();
}

bool MeshDevice::is_open() const { return memory_ && memory_->is_open(memory_->lock()); }

MeshShape MeshDevice::shape() const {
  Expects(memory_ != nullptr);
  return memory_->shape();
}

Result<DeviceId> MeshDevice::device_id(MeshCoordinate coordinate) const {
  return checked_index(shape(), coordinate).map([](std::uint32_t index) { return DeviceId{index}; });
}

const DeviceSpec& MeshDevice::spec() const {
  Expects(memory_ != nullptr);
  return memory_->spec();
}

Tracker& MeshDevice::tracker() const {
  Expects(memory_ != nullptr);
  return memory_->tracker();
}

namespace {

Result<void> check_device(DeviceId device, MeshShape shape) {
  if (device.value() < shape.device_count()) return {};
  return fail(ErrorCode::not_found, fmt::format("device {} is not on this {} mesh (devices 0 to {})", device.value(),
                                                to_string(shape), shape.device_count() - 1));
}

Result<void> check_type(BufferType type) {
  if (index_of(type) < buffer_type_count) return {};
  return fail(ErrorCode::invalid_argument, fmt::format("buffer type {} is not one of dram, l1, l1_small, trace",
                                                       static_cast<unsigned>(type)));
}

}  // namespace

Result<AllocatorStatistics> MeshDevice::allocator_statistics(DeviceId device, BufferType type) const {
  Expects(memory_ != nullptr);
  if (auto ok = check_device(device, shape()); !ok) return tl::unexpected(std::move(ok.error()));
  if (auto ok = check_type(type); !ok) return tl::unexpected(std::move(ok.error()));
  return memory_->statistics(device.value(), type);
}

Result<MemoryView> MeshDevice::memory_view(DeviceId device, BufferType type) const {
  Expects(memory_ != nullptr);
  if (auto ok = check_device(device, shape()); !ok) return tl::unexpected(std::move(ok.error()));
  if (auto ok = check_type(type); !ok) return tl::unexpected(std::move(ok.error()));
  auto view = memory_->memory_view(device.value(), type);
  if (!view) {
    return fail(ErrorCode::device_closed, fmt::format("memory view of device {}: the mesh is closed", device.value()));
  }
  return std::move(*view);
}

Result<std::uint64_t> MeshDevice::resident_bytes(MeshCoordinate coordinate) const {
  return checked_index(shape(), coordinate).map([this](std::uint32_t index) { return memory_->resident_bytes(index); });
}

ProgramCache& MeshDevice::program_cache() const {
  Expects(program_cache_ != nullptr);
  return *program_cache_;
}

void MeshDevice::enable_program_cache() { program_cache().enable(); }
void MeshDevice::disable_program_cache() { program_cache().disable(); }
void MeshDevice::clear_program_cache() { program_cache().clear(); }

void MeshDevice::disable_and_clear_program_cache() {
  disable_program_cache();
  clear_program_cache();
}

}  // namespace meshrt
