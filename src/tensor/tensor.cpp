module;
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.tensor;

import meshrt.core;
import meshrt.mesh;

namespace meshrt {

std::string_view to_string(DataType type) { return type == DataType::bfloat16 ? "bfloat16" : "float32"; }
std::string_view to_string(Layout layout) { return layout == Layout::tile ? "tile" : "row_major"; }

namespace {

// A tensor's elements must be countable in 64 bits with room for 4-byte values and tile padding.
constexpr std::uint64_t max_tensor_volume = std::uint64_t{1} << 48U;

std::optional<std::uint64_t> checked_volume(std::span<const std::uint32_t> dims) {
  std::uint64_t volume = 1;
  for (std::uint32_t d : dims) {
    auto next = checked_multiply(volume, d);
    if (!next || *next > max_tensor_volume) return std::nullopt;
    volume = *next;
  }
  return volume;
}

}  // namespace

TensorShape::TensorShape(std::initializer_list<std::uint32_t> dims) {
  Expects(!std::empty(dims) && dims.size() <= max_tensor_rank);
  std::ranges::copy(dims, dims_.begin());
  rank_ = dims.size();
  Expects(std::ranges::none_of(this->dims(), [](std::uint32_t d) { return d == 0; }));
  Expects(checked_volume(this->dims()).has_value());
}

Result<TensorShape> TensorShape::create(std::span<const std::uint32_t> dims) {
  if (dims.empty() || dims.size() > max_tensor_rank) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("a tensor has 1 to {} dims, not {}", max_tensor_rank, dims.size()));
  }
  if (std::ranges::any_of(dims, [](std::uint32_t d) { return d == 0; })) {
    return fail(ErrorCode::invalid_argument, fmt::format("tensor shape ({}) has a dim of 0", fmt::join(dims, ", ")));
  }
  if (!checked_volume(dims)) {
    return fail(ErrorCode::invalid_argument, fmt::format("tensor shape ({}) has more than 2^48 elements",
                                                         fmt::join(dims, ", ")));
  }
  TensorShape shape;
  std::ranges::copy(dims, shape.dims_.begin());
  shape.rank_ = dims.size();
  return shape;
}

std::uint64_t TensorShape::volume() const { return checked_volume(dims()).value_or(0); }

std::uint64_t TensorShape::batch() const {
  std::uint64_t batch = 1;
  for (std::size_t d = 0; d + 2 < rank_; ++d) batch *= dims_.at(d);
  return batch;
}

TensorShape TensorShape::with_dim(std::size_t dim, std::uint32_t size) const {
  Expects(dim < rank_ && size > 0);
  TensorShape shape = *this;
  shape.dims_.at(dim) = size;
  Expects(checked_volume(shape.dims()).has_value());
  return shape;
}

std::string to_string(const TensorShape& shape) {
  return shape.rank() == 1 ? fmt::format("({},)", shape[0]) : fmt::format("({})", fmt::join(shape.dims(), ", "));
}

HostTensor random_host_tensor(const TensorShape& shape, std::uint32_t seed) {
  // mt19937's sequence is fixed by the standard; the distributions are not, so scale by hand.
  std::mt19937 generator(seed);
  HostTensor host{.shape = shape, .values = std::vector<float>(shape.volume())};
  // The top 24 bits are exact in a float: k / 2^23 - 1 for k < 2^24 stays below 1.
  for (float& v : host.values) v = static_cast<float>(generator() >> 8U) / 8388608.0F - 1.0F;
  return host;
}

MeshMapperConfig MeshMapperConfig::replicate(MeshShape mesh_shape) {
  return {.placements = {PlacementReplicate{}, PlacementReplicate{}}, .mesh_shape = mesh_shape};
}

std::uint32_t TensorSpec::padded_height() const {
  const std::uint32_t h = shape.height();
  return layout == Layout::tile ? (h + tile_height - 1) / tile_height * tile_height : h;
}

std::uint32_t TensorSpec::padded_width() const {
  const std::uint32_t w = shape.width();
  return layout == Layout::tile ? (w + tile_width - 1) / tile_width * tile_width : w;
}

std::uint64_t TensorSpec::page_size() const {
  return std::uint64_t{element_size(dtype)} * (layout == Layout::tile ? tile_height * tile_width : shape.width());
}

std::uint64_t TensorSpec::bytes() const {
  return shape.batch() * padded_height() * padded_width() * element_size(dtype);
}

namespace {

// Shapes and offsets as 4 dims, leading 1s (or 0s) added.
using Dims4 = std::array<std::uint64_t, 4>;

Dims4 dims4(const TensorShape& shape) {
  Dims4 dims{1, 1, 1, 1};
  const std::size_t pad = 4 - shape.rank();
  for (std::size_t d = 0; d < shape.rank(); ++d) dims.at(pad + d) = shape[d];
  return dims;
}

// Copies the box of `extent` at `from_at` in a row-major `from` of `from_shape` to `to_at` in a
// row-major `to` of `to_shape`, a run of the last dim at a time.
void copy_box(std::span<const float> from, const Dims4& from_shape, const Dims4& from_at, std::span<float> to,
              const Dims4& to_shape, const Dims4& to_at, const Dims4& extent) {
  const auto index = [](const Dims4& shape, const Dims4& at, std::uint64_t i0, std::uint64_t i1, std::uint64_t i2) {
    return (((at[0] + i0) * shape[1] + at[1] + i1) * shape[2] + at[2] + i2) * shape[3] + at[3];
  };
  for (std::uint64_t i0 = 0; i0 < extent[0]; ++i0) {
    for (std::uint64_t i1 = 0; i1 < extent[1]; ++i1) {
      for (std::uint64_t i2 = 0; i2 < extent[2]; ++i2) {
        const auto source = from.subspan(index(from_shape, from_at, i0, i1, i2), extent[3]);
        std::ranges::copy(source, to.subspan(index(to_shape, to_at, i0, i1, i2), extent[3]).begin());
      }
    }
  }
}

// Where the shard of the device at `at` starts in the global tensor.
Dims4 shard_origin(const TensorShape& shard, const std::vector<Placement>& placements, MeshCoordinate at) {
  Dims4 origin{0, 0, 0, 0};
  const std::size_t pad = 4 - shard.rank();
  const std::array<std::uint32_t, 2> coordinate{at.row, at.col};
  for (std::size_t m = 0; m < placements.size(); ++m) {
    if (const auto* shard_dim = std::get_if<PlacementShard>(&placements[m])) {
      origin.at(pad + shard_dim->dim) += std::uint64_t{coordinate.at(m)} * shard[shard_dim->dim];
    }
  }
  return origin;
}

// Calls visit(logical, stored) for every element of a tiled tensor: its index in row-major
// order, and in stored order (tiles of 32x32, row-major within and between tiles; the padding
// is never visited).
template <class Visit>
void for_each_tiled_element(const TensorSpec& spec, Visit visit) {
  const std::uint64_t h = spec.shape.height();
  const std::uint64_t w = spec.shape.width();
  const std::uint64_t hp = spec.padded_height();
  const std::uint64_t wp = spec.padded_width();
  const std::uint64_t tiles_per_row = wp / tile_width;
  constexpr std::uint64_t tile_values = std::uint64_t{tile_height} * tile_width;
  for (std::uint64_t b = 0; b < spec.shape.batch(); ++b) {
    for (std::uint64_t row = 0; row < h; ++row) {
      const std::uint64_t tile_row_base =
          b * hp * wp + (row / tile_height) * tiles_per_row * tile_values + (row % tile_height) * tile_width;
      for (std::uint64_t col = 0; col < w; ++col) {
        visit((b * h + row) * w + col, tile_row_base + (col / tile_width) * tile_values + col % tile_width);
      }
    }
  }
}

// Logical row-major values to stored order: tiles with zero padding, or rows as they are.
std::vector<float> to_stored(const TensorSpec& spec, std::span<const float> logical) {
  if (spec.layout == Layout::row_major) return {logical.begin(), logical.end()};
  std::vector<float> stored(spec.stored_values(), 0.0F);
  for_each_tiled_element(spec, [&](std::uint64_t at, std::uint64_t stored_at) { stored[stored_at] = logical[at]; });
  return stored;
}

std::vector<float> from_stored(const TensorSpec& spec, std::span<const float> stored) {
  if (spec.layout == Layout::row_major) return {stored.begin(), stored.end()};
  std::vector<float> logical(spec.shape.volume());
  for_each_tiled_element(spec, [&](std::uint64_t at, std::uint64_t stored_at) { logical[at] = stored[stored_at]; });
  return logical;
}

std::vector<std::byte> encode(DataType dtype, std::span<const float> values) {
  std::vector<std::byte> bytes(values.size() * element_size(dtype));
  if (dtype == DataType::float32) {
    std::memcpy(bytes.data(), values.data(), bytes.size());
    return bytes;
  }
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint16_t bits = to_bfloat16(values[i]);
    std::memcpy(&bytes[i * 2], &bits, 2);
  }
  return bytes;
}

std::vector<float> decode(DataType dtype, std::span<const std::byte> bytes) {
  std::vector<float> values(bytes.size() / element_size(dtype));
  if (dtype == DataType::float32) {
    std::memcpy(values.data(), bytes.data(), values.size() * sizeof(float));
    return values;
  }
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::uint16_t bits = 0;
    std::memcpy(&bits, &bytes[i * 2], 2);
    values[i] = from_bfloat16(bits);
  }
  return values;
}

Result<void> check_mesh_shape(std::string_view what, MeshShape given, MeshShape mesh) {
  if (given == mesh) return {};
  return fail(ErrorCode::invalid_argument, fmt::format("the {} is for a {} mesh, but the tensor's mesh is {}", what,
                                                       to_string(given), to_string(mesh)));
}

}  // namespace

Result<TensorShape> shard_shape(const TensorShape& shape, const std::vector<Placement>& placements,
                                MeshShape mesh_shape) {
  if (placements.size() != 2) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("a mesh mapper has one placement per mesh dimension (rows, columns): 2, not {}",
                            placements.size()));
  }
  TensorShape shard = shape;
  const std::array<std::uint32_t, 2> devices{mesh_shape.rows, mesh_shape.cols};
  const std::array<std::string_view, 2> names{"rows", "columns"};
  std::optional<std::uint32_t> sharded_dim;
  for (std::size_t m = 0; m < 2; ++m) {
    const auto* placement = std::get_if<PlacementShard>(&placements[m]);
    if (placement == nullptr) continue;
    if (placement->dim >= shape.rank()) {
      return fail(ErrorCode::invalid_argument, fmt::format("cannot shard dim {} of a tensor of shape {}: it has {} dims",
                                                           placement->dim, to_string(shape), shape.rank()));
    }
    if (sharded_dim == placement->dim) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("both mesh dimensions shard dim {} of {}: shard distinct dims", placement->dim,
                              to_string(shape)));
    }
    sharded_dim = placement->dim;
    const std::uint32_t size = shape[placement->dim];
    if (size % devices.at(m) != 0) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("cannot shard dim {} of {} ({} elements) evenly over the {} {} of a {} mesh",
                              placement->dim, to_string(shape), size, devices.at(m), names.at(m),
                              to_string(mesh_shape)));
    }
    shard = shard.with_dim(placement->dim, size / devices.at(m));
  }
  return shard;
}

Tensor::Tensor(const TensorShape& shape, const TensorSpec& shard, std::vector<Placement> placements, MeshBuffer buffer)
    : shape_(shape), shard_(shard), placements_(std::move(placements)), buffer_(std::move(buffer)) {}

Result<Tensor> Tensor::allocate(MeshDevice& mesh, const TensorShape& shape, DataType dtype, Layout layout,
                                const std::vector<Placement>& placements, std::string name) {
  auto shard = shard_shape(shape, placements, mesh.shape());
  if (!shard) return tl::unexpected(std::move(shard.error()));
  TensorSpec spec{.shape = *shard, .dtype = dtype, .layout = layout};
  auto buffer = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = spec.bytes(), .name = std::move(name)},
                                   DeviceLocalBufferConfig{.page_size = spec.page_size(),
                                                           .buffer_type = BufferType::dram,
                                                           .category = AllocationCategory::buffer});
  if (!buffer) {
    return fail(buffer.error().code, fmt::format("tensor of shape {} ({}, {}): {}", to_string(shape), to_string(dtype),
                                                 to_string(layout), buffer.error().message));
  }
  return Tensor(shape, spec, placements, std::move(*buffer));
}

Result<Tensor> Tensor::from_host(MeshDevice& mesh, const HostTensor& host, DataType dtype, Layout layout,
                                 const MeshMapperConfig& mapper, std::string name) {
  if (host.shape.rank() == 0) return fail(ErrorCode::invalid_argument, "a host tensor without a shape");
  if (host.values.size() != host.shape.volume()) {
    return fail(ErrorCode::invalid_argument, fmt::format("a host tensor of shape {} has {} values, not {}",
                                                         to_string(host.shape), host.shape.volume(),
                                                         host.values.size()));
  }
  if (auto same = check_mesh_shape("mesh mapper", mapper.mesh_shape, mesh.shape()); !same) {
    return tl::unexpected(std::move(same.error()));
  }
  auto tensor = allocate(mesh, host.shape, dtype, layout, mapper.placements, std::move(name));
  if (!tensor) return tensor;
  const TensorShape& shard = tensor->shard_.shape;
  const Dims4 global = dims4(host.shape);
  const Dims4 extent = dims4(shard);
  std::vector<float> values(shard.volume());
  for (std::uint32_t index = 0; index < mesh.shape().device_count(); ++index) {
    const Dims4 origin = shard_origin(shard, tensor->placements_, mesh.shape().coordinate_of(index));
    copy_box(host.values, global, origin, values, extent, Dims4{}, extent);
    if (auto written = tensor->write_stored(DeviceId{index}, to_stored(tensor->shard_, values)); !written) {
      return tl::unexpected(std::move(written.error()));
    }
  }
  return tensor;
}

Result<HostTensor> Tensor::to_host(const MeshComposerConfig& composer) const {
  if (auto same = check_mesh_shape("mesh composer", composer.mesh_shape, mesh_shape()); !same) {
    return tl::unexpected(std::move(same.error()));
  }
  if (composer.dims.size() != 2) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("a mesh composer has one dim per mesh dimension (rows, columns): 2, not {}",
                            composer.dims.size()));
  }
  const TensorShape& shard = shard_.shape;
  for (std::uint32_t dim : composer.dims) {
    if (dim >= shard.rank()) {
      return fail(ErrorCode::invalid_argument, fmt::format("cannot concatenate along dim {} of a tensor of shape {}",
                                                           dim, to_string(shape_)));
    }
  }
  const MeshShape mesh = mesh_shape();
  TensorShape gathered = shard;
  const std::uint32_t row_dim = composer.dims[0];
  const std::uint32_t col_dim = composer.dims[1];
  // Concatenating along the same dim twice lays the devices out in row-major mesh order.
  const auto scaled = [&](std::uint32_t dim, std::uint64_t devices) -> Result<void> {
    const auto size = checked_multiply(gathered[dim], devices);
    if (!size || *size > UINT32_MAX || !checked_multiply(gathered.volume(), devices) ||
        gathered.volume() * devices > (std::uint64_t{1} << 48U)) {
      return fail(ErrorCode::invalid_argument, fmt::format("concatenating dim {} of {} over {} devices overflows", dim,
                                                           to_string(shard), devices));
    }
    gathered = gathered.with_dim(dim, static_cast<std::uint32_t>(*size));
    return {};
  };
  if (auto grown = scaled(row_dim, mesh.rows).and_then([&] { return scaled(col_dim, mesh.cols); }); !grown) {
    return tl::unexpected(std::move(grown.error()));
  }
  HostTensor host{.shape = gathered, .values = std::vector<float>(gathered.volume())};
  const Dims4 to_shape = dims4(gathered);
  const Dims4 extent = dims4(shard);
  const std::size_t pad = 4 - shard.rank();
  for (std::uint32_t index = 0; index < mesh.device_count(); ++index) {
    auto part = read_shard(DeviceId{index});
    if (!part) return tl::unexpected(std::move(part.error()));
    const MeshCoordinate at = mesh.coordinate_of(index);
    Dims4 origin{0, 0, 0, 0};
    if (row_dim == col_dim) {
      origin.at(pad + row_dim) = std::uint64_t{index} * shard[row_dim];
    } else {
      origin.at(pad + row_dim) = std::uint64_t{at.row} * shard[row_dim];
      origin.at(pad + col_dim) = std::uint64_t{at.col} * shard[col_dim];
    }
    copy_box(part->values, extent, Dims4{}, host.values, to_shape, origin, extent);
  }
  return host;
}

Result<HostTensor> Tensor::to_host() const {
  if (std::ranges::any_of(placements_, [](const Placement& p) { return std::holds_alternative<PlacementShard>(p); })) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("tensor of shape {} is sharded over the mesh: give a MeshComposerConfig to gather it",
                            to_string(shape_)));
  }
  return read_shard(DeviceId{0});
}

Result<const DeviceBuffer*> Tensor::device_buffer(DeviceId device) const {
  const auto buffers = buffer_.device_buffers();
  if (device.value() >= buffers.size()) {
    return fail(ErrorCode::not_found, fmt::format("device {} is not on the tensor's {} mesh", device.value(),
                                                  to_string(mesh_shape())));
  }
  const DeviceBuffer& buffer = buffers[device.value()];
  if (!buffer.is_allocated()) {
    const bool closed = buffer.owns_buffer() && buffer.state() == DeviceBufferState::device_closed;
    return fail(closed ? ErrorCode::device_closed : ErrorCode::invalid_argument,
                fmt::format("tensor of shape {} on device {}: {}", to_string(shape_), device.value(),
                            closed ? "its mesh was closed" : "it was deallocated"));
  }
  return &buffer;
}

Result<std::vector<float>> Tensor::read_stored(DeviceId device) const {
  auto buffer = device_buffer(device);
  if (!buffer) return tl::unexpected(std::move(buffer.error()));
  std::vector<std::byte> bytes(shard_.bytes());
  if (auto read = (*buffer)->read(bytes); !read) return tl::unexpected(std::move(read.error()));
  return decode(shard_.dtype, bytes);
}

Result<void> Tensor::write_stored(DeviceId device, std::span<const float> values) {
  if (values.size() != shard_.stored_values()) {
    return fail(ErrorCode::invalid_argument, fmt::format("tensor shard stores {} values, not {}",
                                                         shard_.stored_values(), values.size()));
  }
  if (auto usable = device_buffer(device); !usable) return tl::unexpected(std::move(usable.error()));
  return buffer_.device_buffers()[device.value()].write(encode(shard_.dtype, values));
}

Result<HostTensor> Tensor::read_shard(DeviceId device) const {
  auto stored = read_stored(device);
  if (!stored) return tl::unexpected(std::move(stored.error()));
  return HostTensor{.shape = shard_.shape, .values = from_stored(shard_, *stored)};
}

Result<void> Tensor::write_shard(DeviceId device, const HostTensor& shard) {
  if (!(shard.shape == shard_.shape) || shard.values.size() != shard_.shape.volume()) {
    return fail(ErrorCode::invalid_argument, fmt::format("device {}'s shard is of shape {}, not {} ({} values)",
                                                         device.value(), to_string(shard_.shape),
                                                         to_string(shard.shape), shard.values.size()));
  }
  return write_stored(device, to_stored(shard_, shard.values));
}

}  // namespace meshrt
