module;
#include <array>
#include <functional>
#include <thread>
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

namespace meshrt {

Result<MeshDevice> MeshDevice::create(MeshShape shape, DeviceSpec spec, std::shared_ptr<Tracker> tracker) {
  auto memory = detail::MeshMemory::create(shape, std::move(spec),
                                           tracker != nullptr ? std::move(tracker) : Tracker::process_default());
  if (!memory) return tl::unexpected(std::move(memory.error()));
  return MeshDevice(std::move(*memory));
}

MeshDevice& MeshDevice::operator=(MeshDevice&& other) noexcept {
  if (this != &other) {
    close();
    memory_ = std::move(other.memory_);
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

AllocatorStatistics MeshDevice::allocator_statistics(BufferType type) const {
  Expects(memory_ != nullptr);
  return memory_->statistics(type);
}

std::vector<Block> MeshDevice::block_table(BufferType type) const {
  Expects(memory_ != nullptr);
  return memory_->block_table(type);
}

Result<std::uint64_t> MeshDevice::resident_bytes(MeshCoordinate coordinate) const {
  return checked_index(shape(), coordinate).map([this](std::uint32_t index) { return memory_->resident_bytes(index); });
}

}  // namespace meshrt
