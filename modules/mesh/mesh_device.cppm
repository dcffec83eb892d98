// The mesh of devices.
//
// A MeshDevice is a move-only handle on shared mesh state (detail::MeshMemory, internal): lock-step
// bank allocators, simulated memory and the registry of live buffers. Buffers hold that state
// too, so a buffer that outlives its MeshDevice stays valid: its state became device_closed when
// the mesh closed.
module;
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

export module meshrt.mesh:mesh_device;

import meshrt.core;
import meshrt.alloc;
import meshrt.tracking;
import meshrt.device;

// Not exported: importers cannot name either (the test in tests/package shows it).
namespace meshrt::detail {
class MeshMemory;   // the state a MeshDevice and its buffers share: src/mesh/mesh_memory.cppm
struct MeshAccess;  // how the runtime's own partitions reach it
}  // namespace meshrt::detail

export namespace meshrt {

class ProgramCache;  // the mesh's cache of kernel binaries: :program_cache

// One device's memory of one buffer type, as tt-metal's MemoryView shows it: figures per bank
// (every bank of a type holds the same ranges: lock-step, ADR 0004) and the block table.
struct MemoryView {
  std::uint32_t num_banks{};
  std::uint64_t total_bytes_per_bank{};
  std::uint64_t total_bytes_allocated_per_bank{};
  std::uint64_t total_bytes_free_per_bank{};
  std::uint64_t largest_contiguous_bytes_free_per_bank{};
  std::vector<Block> block_table;  // ascending addresses, free and allocated
};

// A mesh of simulated devices, from 1x1 up to 8x8. Closing (explicitly or by destruction) moves
// every live buffer to device_closed through its state machine: each emits its Free, reason
// device_closed.
class MeshDevice {
 public:
  [[nodiscard]] static Result<MeshDevice> create(MeshShape shape, DeviceSpec spec = DeviceSpec::wormhole_b0(),
                                                 std::shared_ptr<Tracker> tracker = nullptr);
  MeshDevice(MeshDevice&& other) noexcept;
  MeshDevice& operator=(MeshDevice&& other) noexcept;
  MeshDevice(const MeshDevice&) = delete;
  MeshDevice& operator=(const MeshDevice&) = delete;
  ~MeshDevice();

  void close();
  [[nodiscard]] bool is_open() const;
  [[nodiscard]] MeshShape shape() const;
  [[nodiscard]] std::uint32_t device_count() const { return shape().device_count(); }
  // An Error for a coordinate outside the mesh.
  [[nodiscard]] Result<DeviceId> device_id(MeshCoordinate coordinate) const;
  [[nodiscard]] const DeviceSpec& spec() const;
  [[nodiscard]] Tracker& tracker() const;
  // One device's allocator figures: an Error for a device outside the mesh. Mesh buffers take
  // the same range on every device; a lone DeviceBuffer only on its own.
  [[nodiscard]] Result<AllocatorStatistics> allocator_statistics(DeviceId device, BufferType type) const;
  // The memory view of one device: an Error for a device outside the mesh or a closed mesh.
  [[nodiscard]] Result<MemoryView> memory_view(DeviceId device, BufferType type) const;
  // Bytes of simulated memory actually held by one device; an Error for a coordinate outside the mesh.
  [[nodiscard]] Result<std::uint64_t> resident_bytes(MeshCoordinate coordinate) const;

  // The program cache (ADR 0021): kernel binaries of the programs that ran here, category
  // program. Enabled when the mesh opens; closing the mesh frees what it holds (device_closed).
  [[nodiscard]] ProgramCache& program_cache() const;
  void enable_program_cache();
  // Later programs load their binaries per run; what is cached stays until cleared.
  void disable_program_cache();
  // Frees every cached binary, each reporting its Free.
  void clear_program_cache();
  void disable_and_clear_program_cache();

 private:
  friend struct detail::MeshAccess;
  explicit MeshDevice(std::shared_ptr<detail::MeshMemory> memory);
  std::shared_ptr<detail::MeshMemory> memory_;
  std::unique_ptr<ProgramCache> program_cache_;
};

}  // namespace meshrt
