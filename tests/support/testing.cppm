// meshrt.testing — helpers the tests share.
module;
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <mutex>
#include <span>
#include <vector>

export module meshrt.testing;

export import :process;
export import :io;
import meshrt;

export namespace meshrt::testing {

// True in the asan and tsan presets: tests scale their counts down there, never their checks.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
inline constexpr bool sanitized_build = true;
#else
inline constexpr bool sanitized_build = false;
#endif
#else
inline constexpr bool sanitized_build = false;
#endif

// A spec whose meshes open without the device's own system buffers (ADR 0020): for tests of the
// buffer state machine, the tracker and the client, which count every event of the buffers they
// make. What system buffers do is tested in system_buffers_test.cpp and wherever a test opens
// a mesh with a preset as it is.
[[nodiscard]] inline DeviceSpec without_system_buffers(DeviceSpec spec) {
  spec.system_buffers = {};
  return spec;
}

// tt-metal opens a device with no L1_SMALL and no trace region unless asked (so do the presets);
// tests that make buffers of every type open theirs with both.
inline constexpr DeviceRegions every_region{.l1_small_size = std::uint64_t{32} * 1024,
                                            .trace_region_size = std::uint64_t{32} * 1024 * 1024};

// Records every event a tracker reports, one per device buffer (range events are split), and
// checks the invariant of DESIGN.md over them: each buffer id has exactly one Alloc followed by
// exactly one Free.
class EventLog final : public EventProcessor {
 public:
  void process(std::span<const AllocationEvent> events) noexcept override {
    const std::scoped_lock lock(mutex_);
    ++batches_;
    for (const AllocationEvent& range : events) {
      ++ranges_;
      for (std::uint32_t i = 0; i < range.device_count; ++i) events_.push_back(device_buffer_event(range, i));
    }
  }

  // How many record() calls, and how many events before splitting, reached this log.
  [[nodiscard]] std::uint64_t batches() const {
    const std::scoped_lock lock(mutex_);
    return batches_;
  }
  [[nodiscard]] std::uint64_t ranges() const {
    const std::scoped_lock lock(mutex_);
    return ranges_;
  }

  [[nodiscard]] std::vector<AllocationEvent> events() const {
    const std::scoped_lock lock(mutex_);
    return events_;
  }

  [[nodiscard]] std::vector<AllocationEvent> of_kind(EventKind kind) const {
    std::vector<AllocationEvent> result;
    for (const AllocationEvent& event : events()) {
      if (event.kind == kind) result.push_back(event);
    }
    return result;
  }

  [[nodiscard]] std::vector<AllocationEvent> of_buffer(BufferId id) const {
    std::vector<AllocationEvent> result;
    for (const AllocationEvent& event : events()) {
      if (event.buffer == id) result.push_back(event);
    }
    return result;
  }

  void clear() {
    const std::scoped_lock lock(mutex_);
    events_.clear();
    batches_ = 0;
    ranges_ = 0;
  }

  struct Audit {
    std::uint64_t buffers{};          // distinct ids seen
    std::uint64_t still_live{};       // allocated, not (yet) freed
    std::uint64_t double_allocs{};    // an id allocated twice
    std::uint64_t double_frees{};     // an id freed twice
    std::uint64_t unknown_frees{};    // a Free before any Alloc of its id
  };

  // Walks the log in order and counts every breach of "one Alloc, then one Free".
  [[nodiscard]] Audit audit() const {
    Audit audit;
    std::map<BufferId, int> state;  // 1 allocated, 2 freed
    for (const AllocationEvent& event : events()) {
      int& s = state[event.buffer];
      if (event.kind == EventKind::allocate) {
        if (s != 0) ++audit.double_allocs;
        s = 1;
      } else if (s == 0) {
        ++audit.unknown_frees;
      } else if (s == 2) {
        ++audit.double_frees;
      } else {
        s = 2;
      }
    }
    audit.buffers = state.size();
    for (const auto& [id, s] : state) {
      if (s == 1) ++audit.still_live;
    }
    return audit;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<AllocationEvent> events_;
  std::uint64_t batches_{};
  std::uint64_t ranges_{};
};

// A tracker with an EventLog (the exactly-once check) and a LiveBufferTable (the figures per
// device, type and category) behind it: what a test of a mesh's buffers observes.
struct Observed {
  std::shared_ptr<Tracker> tracker = std::make_shared<Tracker>();
  std::shared_ptr<EventLog> log = std::make_shared<EventLog>();
  std::shared_ptr<LiveBufferTable> table = std::make_shared<LiveBufferTable>();
  Observed() {
    tracker->add_processor(log);
    tracker->add_processor(table);
  }
  [[nodiscard]] LiveBufferSummary on(std::uint32_t device, BufferType type, AllocationCategory category) const {
    return table->summary(DeviceId{device}, type, category);
  }
};

// A private directory under /tmp, removed with everything in it.
class TempDirectory {
 public:
  TempDirectory() {
    std::string pattern = (std::filesystem::temp_directory_path() / "meshrt-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    path_ = pattern;
  }
  TempDirectory(const TempDirectory&) = delete;
  TempDirectory& operator=(const TempDirectory&) = delete;
  TempDirectory(TempDirectory&&) = delete;
  TempDirectory& operator=(TempDirectory&&) = delete;
  ~TempDirectory() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  [[nodiscard]] std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace meshrt::testing
