// The state a MeshDevice and its buffers share, and what the buffer state machine relies on:
// the mesh lock, the registry of residents that close() moves to device_closed, the lock-step
// allocators and the simulated chips. An internal partition: no importer of meshrt.mesh can name
// any of it; the runtime's own partitions reach a mesh's memory through MeshAccess.
module;
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

module meshrt.mesh:mesh_memory;

import meshrt.core;
import meshrt.alloc;
import meshrt.tracking;
import meshrt.device;
import :mesh_device;

namespace meshrt {

// One chip of a mesh: its id, place and simulated memory.
class Device {
 public:
  Device(DeviceId id, MeshCoordinate coordinate) : id_(id), coordinate_(coordinate) {}

  [[nodiscard]] DeviceId id() const { return id_; }
  [[nodiscard]] MeshCoordinate coordinate() const { return coordinate_; }

  // Whole pages of an interleaved buffer at `address`: page i goes to bank i % banks.
  void write_pages(BufferType type, const InterleavedLayout& layout, std::uint64_t address,
                   std::span<const std::byte> bytes);
  void read_pages(BufferType type, const InterleavedLayout& layout, std::uint64_t address,
                  std::span<std::byte> bytes) const;
  [[nodiscard]] const SimulatedMemory& memory() const { return memory_; }
  [[nodiscard]] SimulatedMemory& memory() { return memory_; }

 private:
  DeviceId id_;
  MeshCoordinate coordinate_;
  SimulatedMemory memory_;
};

namespace detail {

// Proof that the caller holds a mesh's lock: functions that need it take one. A lock asked for
// by the thread that already holds it (a tracker processor or hook calling back into its mesh)
// is borrowed: it proves the same and unlocks nothing.
class MeshLock {
 public:
  MeshLock(const MeshLock&) = delete;
  MeshLock& operator=(const MeshLock&) = delete;
  MeshLock(MeshLock&&) = delete;
  MeshLock& operator=(MeshLock&&) = delete;
  ~MeshLock();
  [[nodiscard]] bool holds(const MeshMemory& memory) const { return owner_ == &memory && (borrowed_ || lock_.owns_lock()); }
  [[nodiscard]] bool borrowed() const { return borrowed_; }

 private:
  friend class MeshMemory;
  MeshLock(const MeshMemory& owner, std::mutex& mutex, bool borrowed);
  const MeshMemory* owner_;
  std::unique_lock<std::mutex> lock_;
  bool borrowed_;
};

// What a resident holds on one device, for an out-of-memory report's "largest there".
struct ResidentHolding {
  BufferType type{};
  AllocationCategory category{};
  std::uint64_t bytes{};  // on that device, as the tracker reports it (the size asked for)
  MeshBufferId mesh_buffer{};
  std::string_view name;  // lives as long as the resident
};

// Anything holding memory on a mesh that MeshDevice::close() must give back. A resident of the
// mesh while it holds memory; close() removes it and calls on_mesh_close() once.
class MeshResident {
 public:
  MeshResident(const MeshResident&) = delete;
  MeshResident& operator=(const MeshResident&) = delete;
  MeshResident(MeshResident&&) = delete;
  MeshResident& operator=(MeshResident&&) = delete;
  virtual ~MeshResident() = default;
  virtual void on_mesh_close(const MeshLock& lock) noexcept = 0;
  // A reference that keeps the resident alive while close() tells it: its owners may drop their
  // last handle on another thread the moment they see its state change.
  [[nodiscard]] virtual std::shared_ptr<const void> keep_alive() noexcept = 0;
  // What it holds live on `device` (with the mesh's lock held), or nothing.
  [[nodiscard]] virtual std::optional<ResidentHolding> holding(std::uint32_t device) const noexcept {
    (void)device;
    return std::nullopt;
  }

 protected:
  MeshResident() = default;

 private:
  friend class MeshMemory;
  MeshResident* previous_{nullptr};
  MeshResident* next_{nullptr};
  bool resident_{false};
};

// The state a MeshDevice and its buffers share.
class MeshMemory {
 public:
  [[nodiscard]] static Result<std::shared_ptr<MeshMemory>> create(MeshShape shape, DeviceSpec spec,
                                                                  std::shared_ptr<Tracker> tracker);
  MeshMemory(const MeshMemory&) = delete;
  MeshMemory& operator=(const MeshMemory&) = delete;
  ~MeshMemory() = default;

  [[nodiscard]] MeshLock lock() const { return MeshLock(*this, mutex_, held_by_this_thread()); }
  // True while this thread holds the lock: a processor or hook has called back into the mesh.
  [[nodiscard]] bool held_by_this_thread() const {
    return owner_.load(std::memory_order_relaxed) == std::this_thread::get_id();
  }
  // Runs `work` on this thread once the operation that holds the lock lets it go: how a
  // deallocation or close asked for from inside a callback happens, in order, without deadlock.
  void defer(std::function<void()> work) const;
  [[nodiscard]] bool is_open(const MeshLock& lock) const;
  [[nodiscard]] MeshShape shape() const { return shape_; }
  [[nodiscard]] const DeviceSpec& spec() const { return spec_; }
  [[nodiscard]] Tracker& tracker() const { return *tracker_; }

  // Allocates `bytes_per_bank` at one address in every bank of `type` on devices
  // [first_device, first_device + device_count): lock-step across them (ADR 0004).
  [[nodiscard]] Result<std::uint64_t> allocate(const MeshLock& lock, BufferType type, std::uint64_t bytes_per_bank,
                                               AllocationDirection direction, std::uint32_t first_device,
                                               std::uint32_t device_count);
  // Frees what allocate() gave on those devices, and forgets those bytes of simulated memory.
  void free(const MeshLock& lock, BufferType type, std::uint64_t address, std::uint64_t bytes_per_bank,
            std::uint32_t first_device, std::uint32_t device_count);
  void add_resident(const MeshLock& lock, MeshResident& resident);
  void remove_resident(const MeshLock& lock, MeshResident& resident);
  // Keeps a system buffer (ADR 0020) until the mesh closes: the mesh owns it, no handle does.
  // It is a resident like any buffer, so close() frees it through the same state machine; being
  // the first residents, system buffers are the last close() tells.
  void keep_system_buffer(const MeshLock& lock, std::shared_ptr<MeshResident> buffer);
  [[nodiscard]] Device& device(const MeshLock& lock, std::uint32_t index);

  // One device's allocator (Expects a device of the mesh).
  [[nodiscard]] AllocatorStatistics statistics(std::uint32_t device_index, BufferType type) const;
  // Figures and block table taken under one lock, so they agree; nullopt once closed.
  [[nodiscard]] std::optional<MemoryView> memory_view(std::uint32_t device_index, BufferType type) const;
  [[nodiscard]] std::uint64_t resident_bytes(std::uint32_t device_index) const;
  // Closes the mesh: tells every resident (each moves its live buffers to device_closed and
  // emits their Frees), then empties the allocators and memory. Idempotent.
  void close();

 private:
  using TypeAllocators = std::array<std::optional<LockStepAllocator>, buffer_type_count>;
  [[nodiscard]] std::string largest_holdings(BufferType type, std::uint32_t device) const;
  MeshMemory(MeshShape shape, DeviceSpec spec, std::shared_ptr<Tracker> tracker, TypeAllocators allocators);
  [[nodiscard]] LockStepAllocator& allocator(BufferType type);

  friend class MeshLock;
  void unlock(std::unique_lock<std::mutex>& lock) const;

  mutable std::mutex mutex_;
  mutable std::atomic<std::thread::id> owner_{};  // the thread holding mutex_, if any
  mutable std::vector<std::function<void()>> deferred_;  // under mutex_
  MeshShape shape_;
  DeviceSpec spec_;
  std::shared_ptr<Tracker> tracker_;
  bool open_{true};
  // Per buffer type, one allocator per device, shared while the devices hold the same blocks: a
  // mesh buffer takes one address on all of them, a lone device buffer only its own (ADR 0004).
  TypeAllocators allocators_;
  std::vector<Device> devices_;
  MeshResident* residents_{nullptr};
  // Owned until close(), which lets them go after releasing the lock. They hold this memory too:
  // the cycle ends at close(), which every MeshDevice handle's destructor calls.
  std::vector<std::shared_ptr<MeshResident>> system_buffers_;
};

// What the runtime's partitions (buffers today; programs and tensors next) use to reach a mesh's
// memory. MeshDevice grants it alone that access.
struct MeshAccess {
  [[nodiscard]] static const std::shared_ptr<MeshMemory>& memory(const MeshDevice& mesh) { return mesh.memory_; }
};

}  // namespace detail

}  // namespace meshrt
