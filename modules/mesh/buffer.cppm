// Device buffers as move-only RAII handles, and mesh buffers made of them.
//
// Every per-device buffer the runtime allocates reports exactly one Alloc and exactly one Free
// to its mesh's Tracker. The state machine that guarantees it lives in one place (the buffer's
// shared allocation record, src/mesh/allocation.cppm); handles, MeshBuffer and
// MeshDevice::close() all go through it. One verb per edge:
//
//   allocate      deallocate: deallocate(), MeshBuffer::deallocate(), destructor, move-assignment
//   --------> [allocated] ---------------------------------------------------------> [deallocated]
//                  |        close: MeshDevice::close() with the buffer allocated
//                  +-------------------------------------------------------------> [device_closed]
module;
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <gsl/gsl>

export module meshrt.mesh:buffer;

import meshrt.core;
import meshrt.tracking;
import :buffer_state;
import :mesh_device;

namespace meshrt::detail {
class BufferAllocation;  // the state machine: src/buffer/allocation.cppm
}

export namespace meshrt {

// The same bytes on every device of the mesh.
struct ReplicatedBufferConfig {
  std::uint64_t size{};
  std::string name;  // optional: shown by the tracker and the monitor
};

struct Shape2D {
  std::uint64_t height{};
  std::uint64_t width{};
  friend bool operator==(const Shape2D&, const Shape2D&) = default;
};

// The order in which shards are given to the devices of the mesh, as tt-metal's ShardOrientation.
enum class ShardOrientation : std::uint8_t { row_major, col_major };

// A row-major 2D tensor of `global_shape` elements (`global_size` bytes in all) cut into shards of
// `shard_shape`, at most one shard per device, as tt-metal's ShardedBufferConfig:
// - a 0 in a shard dimension replicates along it: the shard spans the whole global dimension;
// - with no 0, shard i (row-major over the shard grid) goes to device i of the mesh in row-major
//   order (col_major: column-major order); devices beyond the last shard hold nothing;
// - with one 0, shard i goes to every device of mesh column i (col_major: of mesh row i);
// - with both 0, the one shard goes to every device.
// The buffer takes its shard's size on every device of the mesh (lock-step), as tt-metal's does.
struct ShardedBufferConfig {
  std::uint64_t global_size{};
  Shape2D global_shape;
  Shape2D shard_shape;
  ShardOrientation shard_orientation{ShardOrientation::row_major};
  std::string name;
};

using MeshBufferConfig = std::variant<ReplicatedBufferConfig, ShardedBufferConfig>;

// One device's buffer. Move-only; owns its memory until deallocate() or destruction, and
// reports exactly one Free either way. A moved-from or default handle owns nothing.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // A buffer of `size` bytes on one device of `mesh`, from that device's allocators alone (as
  // tt-metal's Buffer on one device; mesh buffers stay lock-step across all of them, ADR 0004).
  [[nodiscard]] static Result<DeviceBuffer> create(MeshDevice& mesh, MeshCoordinate coordinate, std::uint64_t size,
                                                   const DeviceLocalBufferConfig& config, std::string name = {});
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  // Gives the memory back and reports the Free (state deallocated). Idempotent: later calls, and
  // the destructor, do nothing; after the mesh closed it does nothing (the Free was reported then).
  void deallocate() noexcept;

  [[nodiscard]] bool owns_buffer() const { return allocation_ != nullptr; }
  // Preconditions for the rest: owns_buffer().
  [[nodiscard]] DeviceBufferState state() const;
  [[nodiscard]] bool is_allocated() const { return owns_buffer() && state() == DeviceBufferState::allocated; }
  [[nodiscard]] BufferId id() const;
  [[nodiscard]] DeviceId device() const;
  [[nodiscard]] MeshBufferId mesh_buffer() const;
  [[nodiscard]] BufferType type() const;
  [[nodiscard]] AllocationCategory category() const;
  [[nodiscard]] std::uint64_t address() const;
  [[nodiscard]] std::uint64_t size() const;
  [[nodiscard]] std::uint64_t page_size() const;

  // Whole-buffer transfers: `bytes` must be exactly size() long.
  [[nodiscard]] Result<void> write(std::span<const std::byte> bytes);
  [[nodiscard]] Result<void> read(std::span<std::byte> bytes) const;

 private:
  friend class MeshBuffer;
  DeviceBuffer(std::shared_ptr<detail::BufferAllocation> allocation, std::uint32_t slot);
  void deallocate_for(FreeReason reason) noexcept;

  std::shared_ptr<detail::BufferAllocation> allocation_;
  std::uint32_t slot_{};
};

// A buffer across a whole mesh: one DeviceBuffer per device, at one address on every device.
class MeshBuffer {
 public:
  // The mesh comes first, as in every factory of the runtime (DeviceBuffer::create too).
  [[nodiscard]] static Result<MeshBuffer> create(MeshDevice& mesh, const MeshBufferConfig& config,
                                                 const DeviceLocalBufferConfig& device_config);
  // A moved-from MeshBuffer owns nothing and has no device buffers.
  MeshBuffer(MeshBuffer&& other) noexcept;
  MeshBuffer& operator=(MeshBuffer&& other) noexcept;
  MeshBuffer(const MeshBuffer&) = delete;
  MeshBuffer& operator=(const MeshBuffer&) = delete;
  ~MeshBuffer();

  // Deallocates every per-device buffer it owns, whatever the state of the mesh device, and
  // reports each Free (reason mesh_deallocate). Idempotent.
  void deallocate() noexcept;

  // True while every device buffer is allocated, i.e. the buffer can be read and written.
  [[nodiscard]] bool is_allocated() const;
  [[nodiscard]] MeshBufferId id() const { return id_; }
  [[nodiscard]] std::string_view name() const { return name_; }
  [[nodiscard]] bool is_sharded() const { return sharded_; }
  [[nodiscard]] MeshShape mesh_shape() const { return mesh_shape_; }
  [[nodiscard]] std::uint64_t size() const { return global_size_; }
  [[nodiscard]] std::uint64_t size_per_device() const { return size_per_device_; }
  [[nodiscard]] BufferType type() const { return device_config_.buffer_type; }
  [[nodiscard]] AllocationCategory category() const { return device_config_.category; }
  [[nodiscard]] std::uint64_t page_size() const { return device_config_.page_size; }
  // The lock-step address, the same on every device; 0 for an empty buffer.
  [[nodiscard]] std::uint64_t address() const;

  // One handle per device, in row-major mesh order; empty once moved from.
  [[nodiscard]] std::span<DeviceBuffer> device_buffers() { return device_buffers_; }
  [[nodiscard]] std::span<const DeviceBuffer> device_buffers() const { return device_buffers_; }
  // The handle at `coordinate`; an Error for a coordinate outside the mesh, or once moved from.
  [[nodiscard]] Result<gsl::not_null<DeviceBuffer*>> device_buffer(MeshCoordinate coordinate);
  [[nodiscard]] Result<gsl::not_null<const DeviceBuffer*>> device_buffer(MeshCoordinate coordinate) const;

  // Whole-buffer transfers of size() bytes: replicated buffers write the same bytes to every
  // device; sharded buffers give each device its shard (row-major global layout).
  [[nodiscard]] Result<void> write(std::span<const std::byte> bytes);
  [[nodiscard]] Result<std::vector<std::byte>> read() const;

 private:
  MeshBuffer() = default;
  void deallocate_for(FreeReason reason) noexcept;
  [[nodiscard]] Result<void> check_readable(std::uint64_t bytes) const;
  [[nodiscard]] Result<std::uint32_t> slot_of(MeshCoordinate coordinate) const;

  MeshBufferId id_{};
  std::string name_;
  MeshShape mesh_shape_{};
  DeviceLocalBufferConfig device_config_{};
  bool sharded_{false};
  std::uint64_t global_size_{};
  std::uint64_t size_per_device_{};
  Shape2D global_shape_{};
  Shape2D shard_shape_{};  // physical: a replicated (0) dimension spans the global one
  std::uint64_t element_size_{};
  // Per device slot, the shard grid coordinate it holds, if any (sharded buffers only).
  std::vector<std::optional<MeshCoordinate>> shard_of_slot_;
  std::shared_ptr<detail::BufferAllocation> allocation_;  // null for a zero-size buffer
  std::vector<DeviceBuffer> device_buffers_;
};

}  // namespace meshrt
