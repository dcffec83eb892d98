// The buffer state machine: one record per mesh buffer (or standalone device buffer), shared by
// its DeviceBuffer handles and a resident of its mesh, so that handles, MeshBuffer and
// MeshDevice::close() all change a device buffer's state through the same two functions, one
// per edge: mark_deallocated and mark_device_closed.
module;
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

module meshrt.mesh:allocation;

import meshrt.core;
import meshrt.alloc;
import meshrt.tracking;
import meshrt.device;
import :buffer_state;
import :mesh_device;
import :mesh_memory;

namespace meshrt::detail {

// Everything decided about a buffer before it takes memory.
struct BufferPlan {
  BufferType type{};
  AllocationCategory category{};
  AllocationDirection direction{};
  InterleavedLayout layout{};
  std::uint64_t size_per_device{};
  std::uint64_t bytes_per_bank{};
  MeshBufferId mesh_buffer{};
  std::uint32_t first_device{};  // slot s is the device buffer on device first_device + s
  std::uint32_t device_count{};
  std::string name;
};

[[nodiscard]] MeshBufferId next_mesh_buffer_id();

// Checks a request against the mesh's device spec and works out its page layout. A size of 0
// gives a plan with size_per_device 0: such a buffer takes no memory and reports nothing.
[[nodiscard]] Result<BufferPlan> plan_buffer(const MeshDevice& mesh, std::uint64_t size_per_device,
                                             const DeviceLocalBufferConfig& config, std::uint32_t first_device,
                                             std::uint32_t device_count, MeshBufferId mesh_buffer, std::string name);

class BufferAllocation final : public MeshResident, public std::enable_shared_from_this<BufferAllocation> {
 public:
  // Allocates the memory (unless a hook intercepts), becomes a resident of the mesh and reports
  // one Alloc per device, all under the mesh lock.
  [[nodiscard]] static Result<std::shared_ptr<BufferAllocation>> allocate(const std::shared_ptr<MeshMemory>& memory,
                                                                          BufferPlan plan);
  BufferAllocation(const BufferAllocation&) = delete;
  BufferAllocation& operator=(const BufferAllocation&) = delete;
  BufferAllocation(BufferAllocation&&) = delete;
  BufferAllocation& operator=(BufferAllocation&&) = delete;
  ~BufferAllocation() override;

  // Lock-free: a state only ever moves from allocated to a terminal state, never back.
  [[nodiscard]] DeviceBufferState state(std::uint32_t slot) const;
  [[nodiscard]] std::uint32_t slot_count() const { return plan_.device_count; }
  [[nodiscard]] BufferId id(std::uint32_t slot) const { return BufferId{first_id_.value() + slot}; }
  [[nodiscard]] DeviceId device(std::uint32_t slot) const { return DeviceId{plan_.first_device + slot}; }
  [[nodiscard]] const BufferPlan& plan() const { return plan_; }
  [[nodiscard]] std::uint64_t address() const { return address_; }

  // Deallocates those of `slots` (ascending) still allocated and reports their Frees as one
  // batch, one event per run of consecutive slots.
  void deallocate_slots(std::span<const std::uint32_t> slots, FreeReason reason) noexcept;
  [[nodiscard]] Result<void> write(std::uint32_t slot, std::span<const std::byte> bytes);
  [[nodiscard]] Result<void> read(std::uint32_t slot, std::span<std::byte> bytes) const;

  // The mesh closes: every slot still allocated becomes device_closed.
  void on_mesh_close(const MeshLock& lock) noexcept override;
  [[nodiscard]] std::shared_ptr<const void> keep_alive() noexcept override { return shared_from_this(); }
  [[nodiscard]] std::optional<ResidentHolding> holding(std::uint32_t device) const noexcept override;

 private:
  struct Token {};  // keeps construction inside allocate()

 public:
  BufferAllocation(Token token, std::shared_ptr<MeshMemory> memory, BufferPlan plan, std::uint64_t address,
                   bool hooked);

 private:
  using EventBatch = std::vector<AllocationEvent>;
  // The transitions, each for a run of consecutive allocated slots, each emitting the run's one
  // event. Nothing else writes states_ (the meshrt-state-transition check enforces it).
  void mark_deallocated(const MeshLock& lock, std::uint32_t first, std::uint32_t count, FreeReason reason,
                        std::int64_t time_ns, EventBatch& batch);
  void mark_device_closed(const MeshLock& lock, std::uint32_t first, std::uint32_t count, std::int64_t time_ns,
                          EventBatch& batch);
  // Slots [first, first + count) left `allocated`: their devices' memory is freed, and after the
  // last one the mesh forgets this resident.
  void count_freed_slots(const MeshLock& lock, std::uint32_t first, std::uint32_t count);
  // Calls `transition(first, count)` for each run of consecutive allocated slots among `slots`.
  template <class Transition>
  void for_each_allocated_run(std::span<const std::uint32_t> slots, Transition transition) const;
  [[nodiscard]] AllocationEvent event(std::uint32_t first, std::uint32_t count, EventKind kind, FreeReason reason,
                                      std::int64_t time_ns) const;
  [[nodiscard]] Result<void> check_transfer(const MeshLock& lock, std::uint32_t slot, std::size_t bytes) const;

  std::shared_ptr<MeshMemory> memory_;
  BufferPlan plan_;
  std::uint64_t address_;
  bool hooked_;
  BufferId first_id_;
  std::unique_ptr<std::atomic<DeviceBufferState>[]> states_;
  std::uint32_t live_slots_;
};

}  // namespace meshrt::detail
