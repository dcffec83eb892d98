// Events, and the Tracker that hands them to processors and hooks.
module;
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <array>
#include <atomic>
#include <unordered_map>
#include <vector>

export module meshrt.tracking:events;

import meshrt.core;

export namespace meshrt {

enum class EventKind : std::uint8_t { allocate, free };

// How a buffer went away. Every Free carries one, so a report can say how each buffer ended.
enum class FreeReason : std::uint8_t {
  none,                 // on allocate events
  explicit_deallocate,  // DeviceBuffer::deallocate()
  destructor,           // a handle died while still owning its buffer
  mesh_deallocate,      // MeshBuffer::deallocate()
  device_closed,        // MeshDevice::close() with the buffer live
  move_assigned,        // a handle was move-assigned over while it still owned its buffer
};

[[nodiscard]] std::string_view to_string(EventKind kind);
[[nodiscard]] std::string_view to_string(FreeReason reason);

// Allocates or frees `device_count` device buffers at once: buffer ids [buffer, buffer + count)
// on devices [device, device + count), one each, all alike (one mesh buffer, one address). A
// replicated buffer on 64 devices is one event, not 64 (ADR 0012); the invariant still holds per
// device buffer: each id is covered by exactly one allocate event and exactly one free event.
// `size` is each buffer's size on its device (what the user asked for); `footprint` what the
// banks reserve after page rounding.
struct AllocationEvent {
  EventKind kind{EventKind::allocate};
  FreeReason reason{FreeReason::none};
  BufferType type{BufferType::dram};
  AllocationCategory category{AllocationCategory::buffer};
  bool hooked{false};  // a hook intercepted the allocation: reported, but took no device memory
  DeviceId device{};
  BufferId buffer{};
  std::uint32_t device_count{1};
  MeshBufferId mesh_buffer{};  // the buffer's group: its MeshBuffer, or its own for a lone DeviceBuffer
  std::uint64_t address{};
  std::uint64_t size{};
  std::uint64_t footprint{};
  std::int64_t time_ns{};  // system clock, nanoseconds since the Unix epoch
};

// The most device buffers one event covers: a whole 8x8 mesh.
inline constexpr std::uint32_t max_devices_per_event = 64;

// The event narrowed to its i-th device buffer.
[[nodiscard]] constexpr AllocationEvent device_buffer_event(const AllocationEvent& event, std::uint32_t i) {
  AllocationEvent one = event;
  one.device = DeviceId{event.device.value() + i};
  one.buffer = BufferId{event.buffer.value() + i};
  one.device_count = 1;
  return one;
}

// A device of a mesh that was opened, with the bytes each buffer type offers on it.
// A device's memory per buffer type: total bytes, and its banks (so a monitor can draw them).
struct DeviceDescription {
  DeviceId device{};
  std::array<std::uint64_t, buffer_type_count> total_bytes{};
  std::array<std::uint32_t, buffer_type_count> bank_count{};
  std::array<std::uint64_t, buffer_type_count> base_address{};  // first address of every bank
};

// What a hook sees before an allocation takes memory.
struct AllocationRequest {
  BufferType type{};
  AllocationCategory category{};
  MeshBufferId mesh_buffer{};
  std::uint32_t device_count{};
  std::uint64_t size_per_device{};
  std::uint64_t bytes_per_bank{};
};

// An allocation that failed for lack of memory (ADR 0025): what was asked, what there was, and
// the runtime's Error message (which names the largest consumers there). Strings live only for the call.
struct OutOfMemoryReport {
  DeviceId device{};
  BufferType type{};
  std::uint64_t requested{};           // bytes per device
  std::uint64_t largest_free_block{};  // in each bank of that device
  std::string_view message;
};

class EventProcessor {
 public:
  EventProcessor() = default;
  EventProcessor(const EventProcessor&) = delete;
  EventProcessor& operator=(const EventProcessor&) = delete;
  virtual ~EventProcessor() = default;
  // Called with the owning mesh device's lock held, possibly from many threads (one per mesh):
  // be quick, be thread-safe, never call back into the runtime. The same holds for the
  // describe_* notifications, which processors may ignore.
  virtual void process(std::span<const AllocationEvent> events) noexcept = 0;
  // A mesh device opened these devices.
  virtual void describe_devices(std::span<const DeviceDescription> devices) noexcept { (void)devices; }
  // A buffer group was given a name; called before its Allocs. `name` lives only for the call.
  virtual void describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view name) noexcept {
    (void)mesh_buffer;
    (void)name;
  }
  // An allocation failed for lack of memory (nothing was allocated, no event follows).
  virtual void report_out_of_memory(const OutOfMemoryReport& report) noexcept { (void)report; }
};

class AllocationHook {
 public:
  AllocationHook() = default;
  AllocationHook(const AllocationHook&) = delete;
  AllocationHook& operator=(const AllocationHook&) = delete;
  virtual ~AllocationHook() = default;
  // Return an address to intercept the allocation (a capture mode that plans memory without
  // taking it): the buffer gets that address, takes no device memory, and its events are
  // flagged `hooked`. Return nullopt to let the allocation proceed.
  virtual std::optional<std::uint64_t> intercept(const AllocationRequest& request) noexcept = 0;
};

// Hands events to processors and asks hooks. record() and intercept() take no lock: they read an
// immutable list published by add/remove inside a read section (ADR 0012).
//
// - remove_processor() and remove_hook() return once no record() still uses the old list, and
//   the removed listener is destroyed then (unless its owner holds it too). Called from inside a
//   callback, they do not wait: the old list goes at the next change or with the Tracker.
// - A processor added while buffers are live sees the devices described so far (replayed to it
//   first), and the events of buffers allocated after it joined: never a Free without its Alloc.
//   Buffers that were already live when it joined stay invisible to it, Alloc and Free alike.
class Tracker {
 public:
  Tracker();
  Tracker(const Tracker&) = delete;
  Tracker& operator=(const Tracker&) = delete;
  Tracker(Tracker&&) = delete;
  Tracker& operator=(Tracker&&) = delete;
  ~Tracker() = default;

  // The tracker mesh devices use unless given another, made on first use with the processors
  // that providers gave (meshrt.tracking_client provides the allocation-server client when the
  // environment asks for it, MESHRT_ALLOC_TRACKING=1).
  [[nodiscard]] static std::shared_ptr<Tracker> process_default();
  // A source of one processor for process_default(): called once, when that tracker is made; it
  // may return null (nothing to add). A module registers its source while it is initialized,
  // before main(); a source given twice counts once, and one registered after process_default()
  // was first called is not used.
  using DefaultProcessorSource = std::shared_ptr<EventProcessor> (*)();
  static void provide_default_processor(DefaultProcessorSource source);

  void add_processor(std::shared_ptr<EventProcessor> processor);
  void remove_processor(const EventProcessor& processor);
  void add_hook(std::shared_ptr<AllocationHook> hook);
  void remove_hook(const AllocationHook& hook);

  // The first hook that intercepts wins.
  [[nodiscard]] std::optional<std::uint64_t> intercept(const AllocationRequest& request) const;
  void record(std::span<const AllocationEvent> events) const noexcept;
  void describe_devices(std::span<const DeviceDescription> devices) const noexcept;
  void report_out_of_memory(const OutOfMemoryReport& report) const noexcept;
  // One Alloc of a named mesh buffer: each processor that sees the Alloc hears the name just
  // before it (and one that does not, having joined while it was made, hears neither).
  void record_named_allocation(const AllocationEvent& allocated, std::string_view name) const noexcept;

  // Listener lists replaced but not yet freed (called from inside callbacks): for tests.
  [[nodiscard]] std::size_t lists_waiting() const;

 private:
  struct Member {
    std::shared_ptr<EventProcessor> processor;
    // It sees events of buffers from this id up (it joined after the others were allocated);
    // joining while add_processor works the id out: readers wait the moment it takes.
    std::atomic<std::uint64_t> first_buffer;
    std::uint64_t forks_at_join{};  // a fork after this: the joining thread is the parent's
  };
  static constexpr std::uint64_t joining = ~std::uint64_t{0};
  struct Listeners {
    std::vector<std::shared_ptr<Member>> processors;
    std::vector<std::shared_ptr<AllocationHook>> hooks;
  };
  // Under mutex_: copies the current list, lets `change` edit it, publishes the result; then
  // `published()` runs, and the lists replaced are freed once no read uses them.
  template <class Change, class Published>
  void publish(Change change, Published published);
  template <class Change>
  void publish(Change change) {
    publish(change, [] {});
  }
  // Records `events` (with the name of their mesh buffer when it is one named Alloc).
  void record_events(std::span<const AllocationEvent> events, std::string_view name) const noexcept;
  static void deliver(Member& member, std::span<const AllocationEvent> events, std::string_view name) noexcept;
  // The first buffer id `member` sees, once its join is complete.
  static std::uint64_t view_start(Member& member);

  mutable std::mutex mutex_;
  std::unique_ptr<const Listeners> owned_;  // the current list
  std::vector<std::unique_ptr<const Listeners>> retired_;
  std::atomic<const Listeners*> current_{nullptr};
  // Set (seq_cst) before the first Alloc is recorded: until then a new processor sees everything.
  mutable std::atomic<bool> recorded_allocations_{false};
  // The latest description of every device described through this tracker: what a late
  // processor is told.
  mutable std::vector<DeviceDescription> described_;
};

struct LiveBufferSummary {
  std::uint64_t buffers{};
  std::uint64_t bytes{};
  friend bool operator==(const LiveBufferSummary&, const LiveBufferSummary&) = default;
};

// A processor that keeps every live buffer and answers "what is live on device D, type T?".
// It also counts what must never happen: a Free for an id it never saw allocated, an id
// allocated twice.
class LiveBufferTable final : public EventProcessor {
 public:
  void process(std::span<const AllocationEvent> events) noexcept override;

  [[nodiscard]] std::vector<AllocationEvent> live_buffers(DeviceId device, BufferType type) const;
  [[nodiscard]] std::vector<AllocationEvent> live_buffers_of(MeshBufferId mesh_buffer) const;
  // All categories, or one (ADR 0020).
  [[nodiscard]] LiveBufferSummary summary(DeviceId device, BufferType type) const;
  [[nodiscard]] LiveBufferSummary summary(DeviceId device, BufferType type, AllocationCategory category) const;
  [[nodiscard]] std::uint64_t active_allocations() const;
  // Live device buffers of one category, on every device.
  [[nodiscard]] std::uint64_t active_allocations(AllocationCategory category) const;
  [[nodiscard]] std::uint64_t unknown_frees() const;
  [[nodiscard]] std::uint64_t duplicate_allocations() const;

 private:
  struct DeviceTypeKey {
    std::uint32_t device;
    BufferType type;
    AllocationCategory category;
    friend bool operator==(const DeviceTypeKey&, const DeviceTypeKey&) = default;
  };
  struct DeviceTypeKeyHash {
    std::size_t operator()(DeviceTypeKey key) const noexcept {
      return (std::size_t{key.device} << 4U) ^ (index_of(key.type) << 2U) ^ index_of(key.category);
    }
  };

  mutable std::mutex mutex_;
  std::unordered_map<BufferId, AllocationEvent> live_;
  std::unordered_map<DeviceTypeKey, LiveBufferSummary, DeviceTypeKeyHash> summaries_;
  std::uint64_t unknown_frees_{};
  std::uint64_t duplicate_allocations_{};
};

}  // namespace meshrt
