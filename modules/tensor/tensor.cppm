// meshrt.tensor — tensors distributed over a mesh, as ttnn users know them (ADR 0021).
//
// A Tensor is a logical shape (up to 4 dims), a data type and a layout, placed on a mesh by a
// mesh mapper: per mesh dimension, one tensor dimension is sharded over that dimension's devices,
// or the tensor is replicated along it. Each device holds its shard in one DRAM mesh buffer of
// category buffer, in pages interleaved over the DRAM banks: one 32x32 tile per page in the tile
// layout (the last two dims padded up to whole tiles), one row per page in the row-major layout.
// The tensor owns its buffer: deallocate() and the destructor free it, once.
module;
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

export module meshrt.tensor;

import meshrt.core;
import meshrt.mesh;

export namespace meshrt {

enum class DataType : std::uint8_t { bfloat16, float32 };
enum class Layout : std::uint8_t { row_major, tile };

[[nodiscard]] std::string_view to_string(DataType type);
[[nodiscard]] std::string_view to_string(Layout layout);
[[nodiscard]] constexpr std::uint32_t element_size(DataType type) { return type == DataType::bfloat16 ? 2 : 4; }

inline constexpr std::uint32_t tile_height = 32;
inline constexpr std::uint32_t tile_width = 32;
inline constexpr std::size_t max_tensor_rank = 4;

// bfloat16 is float's upper half, rounded to nearest even (NaN stays NaN). Inline: tensors
// convert every element, and a call per element across the module boundary costs more than this.
[[nodiscard]] inline std::uint16_t to_bfloat16(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  if (value != value) return static_cast<std::uint16_t>((bits >> 16U) | 0x40U);  // NaN: stays a (quiet) NaN
  const std::uint32_t rounding = 0x7FFFU + ((bits >> 16U) & 1U);
  return static_cast<std::uint16_t>((bits + rounding) >> 16U);
}
[[nodiscard]] inline float from_bfloat16(std::uint16_t bits) { return std::bit_cast<float>(std::uint32_t{bits} << 16U); }
[[nodiscard]] inline float round_to(DataType type, float value) {
  return type == DataType::bfloat16 ? from_bfloat16(to_bfloat16(value)) : value;
}

// 1 to 4 dimensions, each at least 1.
class TensorShape {
 public:
  TensorShape() = default;
  // Preconditions: 1 to 4 dims, none 0; user input goes through create().
  TensorShape(std::initializer_list<std::uint32_t> dims);
  [[nodiscard]] static Result<TensorShape> create(std::span<const std::uint32_t> dims);

  [[nodiscard]] std::size_t rank() const { return rank_; }
  [[nodiscard]] std::uint32_t operator[](std::size_t dim) const { return dims_.at(dim); }
  [[nodiscard]] std::span<const std::uint32_t> dims() const { return {dims_.data(), rank_}; }
  [[nodiscard]] std::uint64_t volume() const;
  // The last two dims (1 for a missing height) and the product of the others.
  [[nodiscard]] std::uint32_t height() const { return rank_ >= 2 ? dims_.at(rank_ - 2) : 1; }
  [[nodiscard]] std::uint32_t width() const { return dims_.at(rank_ - 1); }
  [[nodiscard]] std::uint64_t batch() const;
  // This shape with dim `dim` of `size`. Preconditions: dim < rank(), size > 0.
  [[nodiscard]] TensorShape with_dim(std::size_t dim, std::uint32_t size) const;
  friend bool operator==(const TensorShape& a, const TensorShape& b) { return a.rank_ == b.rank_ && a.dims_ == b.dims_; }

 private:
  std::array<std::uint32_t, max_tensor_rank> dims_{};
  std::size_t rank_{};
};

// "(8, 8, 512, 512)"
[[nodiscard]] std::string to_string(const TensorShape& shape);

// A tensor on the host: float values in row-major order (bfloat16 data as floats).
struct HostTensor {
  TensorShape shape;
  std::vector<float> values;
};

// Values uniform in [-1, 1), the same for the same shape and seed on every machine (as test
// inputs are: torch.rand with a manual seed).
[[nodiscard]] HostTensor random_host_tensor(const TensorShape& shape, std::uint32_t seed);

struct PlacementReplicate {
  friend bool operator==(const PlacementReplicate&, const PlacementReplicate&) = default;
};
struct PlacementShard {
  std::uint32_t dim{};
  friend bool operator==(const PlacementShard&, const PlacementShard&) = default;
};
using Placement = std::variant<PlacementReplicate, PlacementShard>;

// How a host tensor goes onto a mesh: placements[0] for the mesh's rows, placements[1] for its
// columns, as tt-metal's MeshMapperConfig. `mesh_shape` must be the mesh's.
struct MeshMapperConfig {
  std::vector<Placement> placements;
  MeshShape mesh_shape;
  [[nodiscard]] static MeshMapperConfig replicate(MeshShape mesh_shape);
};

// How shards come back: concatenated along dims[0] over the mesh's rows and dims[1] over its
// columns (a replicated tensor gives its copies side by side, as ttnn's composers do).
struct MeshComposerConfig {
  std::vector<std::uint32_t> dims;
  MeshShape mesh_shape;
};

// One device's part of a tensor and how it is stored.
struct TensorSpec {
  TensorShape shape;  // the shard's logical shape
  DataType dtype{DataType::bfloat16};
  Layout layout{Layout::tile};

  [[nodiscard]] std::uint32_t padded_height() const;
  [[nodiscard]] std::uint32_t padded_width() const;
  [[nodiscard]] std::uint64_t page_size() const;
  // The shard's bytes on its device: whole tiles in the tile layout.
  [[nodiscard]] std::uint64_t bytes() const;
  // Values as stored, padding included.
  [[nodiscard]] std::uint64_t stored_values() const { return bytes() / element_size(dtype); }
};

class Tensor {
 public:
  // Places `host` on `mesh` as `mapper` says. An Error (before anything is allocated) for values
  // that do not match the shape, a mapper for another mesh, a dim that is not the tensor's or
  // does not split evenly; memory errors as MeshBuffer::create gives them.
  [[nodiscard]] static Result<Tensor> from_host(MeshDevice& mesh, const HostTensor& host, DataType dtype, Layout layout,
                                                const MeshMapperConfig& mapper, std::string name = {});
  // A tensor of `shape` placed as `placements`, its contents unset: what operations write into.
  [[nodiscard]] static Result<Tensor> allocate(MeshDevice& mesh, const TensorShape& shape, DataType dtype, Layout layout,
                                               const std::vector<Placement>& placements, std::string name = {});
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ~Tensor() = default;  // the buffer frees itself, once

  // Gathers the shards as `composer` says; an Error once deallocated or after the mesh closed.
  [[nodiscard]] Result<HostTensor> to_host(const MeshComposerConfig& composer) const;
  // A tensor replicated on every device: device 0's copy. An Error for a sharded one.
  [[nodiscard]] Result<HostTensor> to_host() const;

  // Frees the tensor's memory on every device (each Free reported once). Idempotent.
  void deallocate() noexcept { buffer_.deallocate(); }
  [[nodiscard]] bool is_allocated() const { return buffer_.is_allocated(); }

  [[nodiscard]] const TensorShape& shape() const { return shape_; }
  [[nodiscard]] DataType dtype() const { return shard_.dtype; }
  [[nodiscard]] Layout layout() const { return shard_.layout; }
  [[nodiscard]] const TensorSpec& shard_spec() const { return shard_; }
  [[nodiscard]] const std::vector<Placement>& placements() const { return placements_; }
  [[nodiscard]] MeshShape mesh_shape() const { return buffer_.mesh_shape(); }
  [[nodiscard]] std::uint64_t bytes_per_device() const { return shard_.bytes(); }
  [[nodiscard]] const MeshBuffer& buffer() const { return buffer_; }

  // One device's shard in logical row-major order, and back.
  [[nodiscard]] Result<HostTensor> read_shard(DeviceId device) const;
  [[nodiscard]] Result<void> write_shard(DeviceId device, const HostTensor& shard);
  // One device's values as stored (tile order, padding included): what elementwise programs use.
  [[nodiscard]] Result<std::vector<float>> read_stored(DeviceId device) const;
  [[nodiscard]] Result<void> write_stored(DeviceId device, std::span<const float> values);

 private:
  Tensor(const TensorShape& shape, const TensorSpec& shard, std::vector<Placement> placements, MeshBuffer buffer);
  [[nodiscard]] Result<const DeviceBuffer*> device_buffer(DeviceId device) const;

  TensorShape shape_;
  TensorSpec shard_;
  std::vector<Placement> placements_;
  MeshBuffer buffer_;
};

// The shard shape each device holds, or an Error naming the shapes when `placements` cannot
// place `shape` on a mesh of `mesh_shape`.
[[nodiscard]] Result<TensorShape> shard_shape(const TensorShape& shape, const std::vector<Placement>& placements,
                                              MeshShape mesh_shape);

}  // namespace meshrt
