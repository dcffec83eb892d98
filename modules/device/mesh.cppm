// Devices and the mesh that owns them.
//
// A MeshDevice is a move-only handle on shared mesh state (detail::MeshMemory): lock-step bank
// allocators, simulated memory and the registry of live buffers. Buffers hold that state too, so
// a buffer that outlives its MeshDevice stays valid: it was released when the mesh closed.
module;
#include <array>
#include <atomic>
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

export module meshrt.device:mesh;

import meshrt.core;
import meshrt.alloc;
import meshrt.tracking;
import :spec;
import :simulated_memory;

export namespace meshrt {

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

class MeshMemory;

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

// Anything holding memory on a mesh that MeshDevice::close() must release. Enrolled while it
// holds memory; close() calls release_on_close() once and forgets it.
class MeshResident {
 public:
  MeshResident(const MeshResident&) = delete;
  MeshResident& operator=(const MeshResident&) = delete;
  MeshResident(MeshResident&&) = delete;
  MeshResident& operator=(MeshResident&&) = delete;
  virtual ~MeshResident() = default;
  virtual void release_on_close(const MeshLock& lock) noexcept = 0;
  // A reference that keeps the resident alive while close() releases it: its owners may drop
  // their last handle on another thread the moment they see it released.
  [[nodiscard]] virtual std::shared_ptr<const void> keep_alive() noexcept = 0;

 protected:
  MeshResident() = default;

 private:
  friend class MeshMemory;
  MeshResident* previous_{nullptr};
  MeshResident* next_{nullptr};
  bool enrolled_{false};
};

// The state a MeshDevice and its buffers share. Used by meshrt.buffer; not for applications.
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
  // Runs `work` on this thread once the operation that holds the lock lets it go: how a release
  // asked for from inside a callback happens, in order, without deadlock.
  void defer(std::function<void()> work) const;
  [[nodiscard]] bool is_open(const MeshLock& lock) const;
  [[nodiscard]] MeshShape shape() const { return shape_; }
  [[nodiscard]] const DeviceSpec& spec() const { return spec_; }
  [[nodiscard]] Tracker& tracker() const { return *tracker_; }

  // Reserves `bytes_per_bank` at one address in every bank of `type`, for every device at once.
  [[nodiscard]] Result<std::uint64_t> reserve(const MeshLock& lock, BufferType type, std::uint64_t bytes_per_bank);
  // Gives a reservation back and forgets its bytes on every device.
  void unreserve(const MeshLock& lock, BufferType type, std::uint64_t address, std::uint64_t bytes_per_bank);
  void enroll(const MeshLock& lock, MeshResident& resident);
  void withdraw(const MeshLock& lock, MeshResident& resident);
  [[nodiscard]] Device& device(const MeshLock& lock, std::uint32_t index);

  [[nodiscard]] AllocatorStatistics statistics(BufferType type) const;
  [[nodiscard]] std::vector<Block> block_table(BufferType type) const;
  [[nodiscard]] std::uint64_t resident_bytes(std::uint32_t device_index) const;
  // Releases every enrolled resident (each emits its Frees), then empties the allocators and
  // memory. Idempotent.
  void close();

 private:
  MeshMemory(MeshShape shape, DeviceSpec spec, std::shared_ptr<Tracker> tracker,
             std::array<std::optional<BankAllocator>, buffer_type_count> allocators);

  friend class MeshLock;
  void unlock(std::unique_lock<std::mutex>& lock) const;

  mutable std::mutex mutex_;
  mutable std::atomic<std::thread::id> owner_{};  // the thread holding mutex_, if any
  mutable std::vector<std::function<void()>> deferred_;  // under mutex_
  MeshShape shape_;
  DeviceSpec spec_;
  std::shared_ptr<Tracker> tracker_;
  bool open_{true};
  // Lock-step: one allocator per buffer type serves every device of the mesh (see ADR 0004).
  std::array<std::optional<BankAllocator>, buffer_type_count> allocators_;
  std::vector<Device> devices_;
  MeshResident* residents_{nullptr};
};

}  // namespace detail

// A mesh of simulated devices, from 1x1 up to 8x8. Closing (explicitly or by destruction)
// releases every live buffer through its state machine: each emits its Free, reason device_closed.
class MeshDevice {
 public:
  [[nodiscard]] static Result<MeshDevice> create(MeshShape shape, DeviceSpec spec = DeviceSpec::wormhole_b0(),
                                                 std::shared_ptr<Tracker> tracker = nullptr);
  MeshDevice(MeshDevice&& other) noexcept = default;
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
  // Allocator figures are per device; lock-step makes them the same on every device of the mesh.
  [[nodiscard]] AllocatorStatistics allocator_statistics(BufferType type) const;
  [[nodiscard]] std::vector<Block> block_table(BufferType type) const;
  // Bytes of simulated memory actually held by one device; an Error for a coordinate outside the mesh.
  [[nodiscard]] Result<std::uint64_t> resident_bytes(MeshCoordinate coordinate) const;
  [[nodiscard]] const std::shared_ptr<detail::MeshMemory>& memory() const { return memory_; }

 private:
  explicit MeshDevice(std::shared_ptr<detail::MeshMemory> memory) : memory_(std::move(memory)) {}
  std::shared_ptr<detail::MeshMemory> memory_;
};

}  // namespace meshrt
