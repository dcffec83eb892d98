module;
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <variant>
#include <vector>

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

namespace {

struct ShardGeometry {
  std::uint64_t element_size{};
  std::uint64_t size_per_device{};
  Shape2D shard;  // physical: replicated dimensions span the global one
  std::vector<std::optional<MeshCoordinate>> shard_of_slot;
};

std::string describe(const ShardedBufferConfig& config) {
  const auto dimension = [](std::uint64_t value) { return value == 0 ? std::string("0 (replicated)") : std::to_string(value); };
  return fmt::format("global shape {}x{} in shards of {}x{} ({})", config.global_shape.height,
                     config.global_shape.width, dimension(config.shard_shape.height),
                     dimension(config.shard_shape.width),
                     config.shard_orientation == ShardOrientation::row_major ? "row_major" : "col_major");
}

// tt-metal's rules (distributed/mesh_buffer.cpp validate_mesh_buffer_config and the mesh
// command queue's write_sharded_buffer): see ShardedBufferConfig.
Result<ShardGeometry> shard_geometry(const ShardedBufferConfig& config, MeshShape mesh) {
  const Shape2D global = config.global_shape;
  if (config.shard_orientation != ShardOrientation::row_major && config.shard_orientation != ShardOrientation::col_major) {
    return fail(ErrorCode::invalid_argument, fmt::format("shard orientation {} is not row_major or col_major",
                                                         static_cast<unsigned>(config.shard_orientation)));
  }
  if (global.height == 0 || global.width == 0) {
    return fail(ErrorCode::invalid_argument, fmt::format("{}: the global shape must be non-empty", describe(config)));
  }
  const bool height_replicated = config.shard_shape.height == 0;
  const bool width_replicated = config.shard_shape.width == 0;
  const Shape2D shard{height_replicated ? global.height : config.shard_shape.height,
                      width_replicated ? global.width : config.shard_shape.width};
  if (global.height % shard.height != 0 || global.width % shard.width != 0) {
    return fail(ErrorCode::invalid_argument, fmt::format("{}: the shard shape does not tile the global shape",
                                                         describe(config)));
  }
  const std::uint64_t grid_rows = global.height / shard.height;
  const std::uint64_t grid_cols = global.width / shard.width;
  const bool row_major = config.shard_orientation == ShardOrientation::row_major;
  // How many devices the shards take: one each, or a mesh column (row) each along a replicated
  // dimension, or every device for a wholly replicated buffer.
  const std::uint64_t shards = grid_rows * grid_cols;  // each side <= its global dimension: no overflow
  std::uint64_t devices_needed = shards;
  if (height_replicated && width_replicated) devices_needed = mesh.device_count();
  else if (height_replicated || width_replicated) devices_needed = shards * (row_major ? mesh.rows : mesh.cols);
  if (shards > mesh.device_count() || devices_needed > mesh.device_count()) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("{}: {} shards (a {}x{} grid) need {} devices, but the {} mesh has {}", describe(config),
                            shards, grid_rows, grid_cols, shards > mesh.device_count() ? shards : devices_needed,
                            to_string(mesh), mesh.device_count()));
  }
  const std::optional<std::uint64_t> elements = checked_multiply(global.height, global.width);
  if (!elements || *elements > config.global_size) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("global shape {}x{} has more elements than the global size of {} bytes (each element "
                            "takes at least one byte)",
                            global.height, global.width, config.global_size));
  }
  if (config.global_size % *elements != 0) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("global size {} bytes is not a whole number of bytes per element for {}x{} elements",
                            config.global_size, global.height, global.width));
  }
  const std::uint64_t element_size = config.global_size / *elements;

  std::vector<std::optional<MeshCoordinate>> shard_of_slot(mesh.device_count());
  const auto give = [&](std::uint32_t row, std::uint32_t col, std::uint64_t shard_index) {
    shard_of_slot[mesh.index_of({row, col})] =
        MeshCoordinate{static_cast<std::uint32_t>(shard_index / grid_cols), static_cast<std::uint32_t>(shard_index % grid_cols)};
  };
  for (std::uint64_t index = 0; index < shards; ++index) {
    const auto at = static_cast<std::uint32_t>(index);
    if (height_replicated && width_replicated) {
      for (std::uint32_t slot = 0; slot < mesh.device_count(); ++slot) give(slot / mesh.cols, slot % mesh.cols, index);
    } else if (height_replicated || width_replicated) {
      if (row_major) {
        for (std::uint32_t row = 0; row < mesh.rows; ++row) give(row, at, index);  // mesh column `at`
      } else {
        for (std::uint32_t col = 0; col < mesh.cols; ++col) give(at, col, index);  // mesh row `at`
      }
    } else if (row_major) {
      give(at / mesh.cols, at % mesh.cols, index);
    } else {
      give(at % mesh.rows, at / mesh.rows, index);
    }
  }
  // A shard is at most the global shape, so this is at most global_size.
  return ShardGeometry{element_size, shard.height * shard.width * element_size, shard, std::move(shard_of_slot)};
}

// Copies shard (r, c) of the shard grid between the row-major global layout and a device's
// contiguous shard.
template <class Copy>
void for_each_shard_row(Shape2D global, Shape2D shard, std::uint64_t element_size, MeshCoordinate at, Copy copy) {
  const std::uint64_t row_bytes = shard.width * element_size;
  for (std::uint64_t row = 0; row < shard.height; ++row) {
    const std::uint64_t global_offset = ((at.row * shard.height + row) * global.width + at.col * shard.width) *
                                        element_size;
    copy(global_offset, row * row_bytes, row_bytes);
  }
}

}  // namespace

Result<MeshBuffer> MeshBuffer::create(MeshDevice& mesh, const MeshBufferConfig& config,
                                      const DeviceLocalBufferConfig& device_config) {
  MeshBuffer buffer;
  buffer.mesh_shape_ = mesh.shape();
  buffer.device_config_ = device_config;
  if (const auto* replicated = std::get_if<ReplicatedBufferConfig>(&config)) {
    buffer.name_ = replicated->name;
    buffer.global_size_ = replicated->size;
    buffer.size_per_device_ = replicated->size;
  } else {
    const auto& sharded = std::get<ShardedBufferConfig>(config);
    auto geometry = shard_geometry(sharded, buffer.mesh_shape_);
    if (!geometry) return tl::unexpected(std::move(geometry.error()));
    buffer.name_ = sharded.name;
    buffer.sharded_ = true;
    buffer.global_size_ = sharded.global_size;
    buffer.size_per_device_ = geometry->size_per_device;
    buffer.element_size_ = geometry->element_size;
    buffer.global_shape_ = sharded.global_shape;
    buffer.shard_shape_ = geometry->shard;
    buffer.shard_of_slot_ = std::move(geometry->shard_of_slot);
  }
  const std::uint32_t devices = buffer.mesh_shape_.device_count();
  buffer.id_ = detail::next_mesh_buffer_id();
  auto plan = detail::plan_buffer(mesh, buffer.size_per_device_, device_config, 0, devices, buffer.id_, buffer.name_);
  if (!plan) return tl::unexpected(std::move(plan.error()));
  buffer.device_buffers_.resize(devices);
  if (buffer.size_per_device_ == 0) return buffer;  // zero-size: no memory, no events

  auto allocation = detail::BufferAllocation::allocate(detail::MeshAccess::memory(mesh), std::move(*plan));
  if (!allocation) return tl::unexpected(std::move(allocation.error()));
  buffer.allocation_ = std::move(*allocation);
  for (std::uint32_t slot = 0; slot < devices; ++slot) {
    buffer.device_buffers_[slot] = DeviceBuffer(buffer.allocation_, slot);
  }
  return buffer;
}

MeshBuffer::MeshBuffer(MeshBuffer&& other) noexcept { *this = std::move(other); }

MeshBuffer& MeshBuffer::operator=(MeshBuffer&& other) noexcept {
  if (this != &other) {
    deallocate_for(FreeReason::move_assigned);  // the buffer this one held is dropped
    id_ = other.id_;
    name_ = std::move(other.name_);
    mesh_shape_ = other.mesh_shape_;
    device_config_ = other.device_config_;
    sharded_ = other.sharded_;
    global_size_ = other.global_size_;
    size_per_device_ = other.size_per_device_;
    global_shape_ = other.global_shape_;
    shard_shape_ = other.shard_shape_;
    element_size_ = other.element_size_;
    shard_of_slot_ = std::move(other.shard_of_slot_);
    allocation_ = std::move(other.allocation_);
    device_buffers_ = std::move(other.device_buffers_);
    other.allocation_.reset();
    other.device_buffers_.clear();
  }
  return *this;
}

MeshBuffer::~MeshBuffer() { deallocate_for(FreeReason::destructor); }

void MeshBuffer::deallocate() noexcept { deallocate_for(FreeReason::mesh_deallocate); }

// One lock and one batch of Frees for every device buffer this mesh buffer still owns (a handle
// moved out of it owns its buffer itself).
void MeshBuffer::deallocate_for(FreeReason reason) noexcept {
  if (!allocation_) return;
  std::array<std::uint32_t, std::size_t{max_mesh_dimension} * max_mesh_dimension> slots{};
  std::size_t count = 0;
  for (const DeviceBuffer& device_buffer : device_buffers_) {
    if (device_buffer.allocation_ == allocation_) slots.at(count++) = device_buffer.slot_;
  }
  allocation_->deallocate_slots(std::span(slots.data(), count), reason);
}

bool MeshBuffer::is_allocated() const {
  if (!allocation_) return false;
  return std::ranges::all_of(device_buffers_, [this](const DeviceBuffer& device_buffer) {
    return device_buffer.allocation_ == allocation_ && device_buffer.is_allocated();
  });
}

std::uint64_t MeshBuffer::address() const { return allocation_ ? allocation_->address() : 0; }

Result<std::uint32_t> MeshBuffer::slot_of(MeshCoordinate coordinate) const {
  if (device_buffers_.empty()) {
    return fail(ErrorCode::not_found,
                fmt::format("mesh buffer {} was moved from: it has no device buffers", id_.value()));
  }
  return checked_index(mesh_shape_, coordinate);
}

Result<gsl::not_null<DeviceBuffer*>> MeshBuffer::device_buffer(MeshCoordinate coordinate) {
  return slot_of(coordinate).map([this](std::uint32_t slot) { return gsl::not_null(&device_buffers_[slot]); });
}

Result<gsl::not_null<const DeviceBuffer*>> MeshBuffer::device_buffer(MeshCoordinate coordinate) const {
  return slot_of(coordinate).map([this](std::uint32_t slot) { return gsl::not_null(&device_buffers_[slot]); });
}

Result<void> MeshBuffer::check_readable(std::uint64_t bytes) const {
  if (bytes != global_size_) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("mesh buffer {} holds {} bytes, got a transfer of {}", id_.value(), global_size_, bytes));
  }
  for (std::uint32_t slot = 0; slot < device_buffers_.size(); ++slot) {
    if (allocation_ && device_buffers_[slot].allocation_ != allocation_) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("mesh buffer {}: the device buffer at {} was moved out of it", id_.value(),
                              to_string(mesh_shape_.coordinate_of(slot))));
    }
  }
  return {};
}

Result<void> MeshBuffer::write(std::span<const std::byte> bytes) {
  if (auto ok = check_readable(bytes.size()); !ok || !allocation_) return ok;
  std::vector<std::byte> shard(sharded_ ? size_per_device_ : 0);
  for (std::uint32_t slot = 0; slot < device_buffers_.size(); ++slot) {
    if (!sharded_) {
      if (auto ok = allocation_->write(slot, bytes); !ok) return ok;
      continue;
    }
    const std::optional<MeshCoordinate> shard_index = shard_of_slot_[slot];
    if (!shard_index) continue;  // a device past the last shard holds nothing
    for_each_shard_row(global_shape_, shard_shape_, element_size_,
                       *shard_index, [&](std::uint64_t from, std::uint64_t to, std::uint64_t n) {
                         std::copy_n(bytes.subspan(from, n).begin(), n, shard.begin() + static_cast<std::ptrdiff_t>(to));
                       });
    if (auto ok = allocation_->write(slot, shard); !ok) return ok;
  }
  return {};
}

Result<std::vector<std::byte>> MeshBuffer::read() const {
  std::vector<std::byte> bytes(global_size_);
  if (auto ok = check_readable(bytes.size()); !ok) return tl::unexpected(std::move(ok.error()));
  if (!allocation_) return bytes;
  if (!sharded_) {
    // Replicated: every device holds the same bytes; the first device answers.
    if (auto ok = allocation_->read(0, bytes); !ok) return tl::unexpected(std::move(ok.error()));
    return bytes;
  }
  // Each shard from the first device that holds it (a replicated one is on several).
  std::vector<std::byte> shard(size_per_device_);
  std::set<MeshCoordinate> read_already;
  for (std::uint32_t slot = 0; slot < device_buffers_.size(); ++slot) {
    const std::optional<MeshCoordinate> shard_index = shard_of_slot_[slot];
    if (!shard_index || !read_already.insert(*shard_index).second) continue;
    if (auto ok = allocation_->read(slot, shard); !ok) return tl::unexpected(std::move(ok.error()));
    for_each_shard_row(global_shape_, shard_shape_, element_size_,
                       *shard_index, [&](std::uint64_t to, std::uint64_t from, std::uint64_t n) {
                         std::copy_n(shard.begin() + static_cast<std::ptrdiff_t>(from), n,
                                     bytes.begin() + static_cast<std::ptrdiff_t>(to));
                       });
  }
  return bytes;
}

}  // namespace meshrt
