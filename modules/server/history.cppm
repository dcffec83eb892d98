// The server's memory timeline (ADR 0025): a bounded ring of usage samples, taken when usage
// changed and at most every 10 ms, and the moments that explain them (a process started, exited,
// crashed, leaked, ran out of memory). meshrt-smi --timeline exports it for Perfetto, or as a page.
//
// Pure state, like the Ledger: the server's loop says when to sample and what time it is.
module;
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

export module meshrt.server:history;

import meshrt.core;
import :ledger;

export namespace meshrt::server {

// A series' category when it counts one process's buffers of every category.
inline constexpr std::uint8_t all_categories = 0xFF;

// One point of a usage series, valid from time_ns until the series' next point. A series is
// either one process's use of a buffer type on a device (pid set, category all_categories) or
// every process's use of one category of it (pid 0).
struct HistorySample {
  std::int64_t time_ns{};  // wall clock
  std::uint64_t bytes{};
  std::uint32_t pid{};
  std::uint16_t device{};
  std::uint8_t type{};      // BufferType
  std::uint8_t category{};  // AllocationCategory, or all_categories
  friend bool operator==(const HistorySample&, const HistorySample&) = default;
};

enum class MomentKind : std::uint8_t { process_start, process_exit, crash_reclaim, leak_at_exit, out_of_memory };
[[nodiscard]] std::string_view to_string(MomentKind kind);

// Something that happened at a point in time, for the timeline's markers.
struct Moment {
  std::int64_t time_ns{};
  MomentKind kind{};
  std::uint32_t pid{};
  std::string process;
  std::uint64_t buffers{};  // what was reclaimed or leaked; 0 otherwise
  std::uint64_t bytes{};    // what was reclaimed or leaked, or the allocation that failed
  std::string detail;       // e.g. the call site that leaked most, or the out-of-memory error
};

class History {
 public:
  // Usage is sampled at most this often: a burst of a million events costs a hundred samples a second.
  static constexpr std::chrono::milliseconds min_interval{10};
  static constexpr std::size_t default_max_samples = std::size_t{1} << 17U;
  static constexpr std::size_t default_max_moments = 4096;

  // Keeps the newest max_samples samples and max_moments moments; 0 samples turns sampling off.
  explicit History(std::size_t max_samples = default_max_samples, std::size_t max_moments = default_max_moments);

  // Appends a point for each series whose bytes differ from its last point (every series, the
  // first time); a series that went to nothing gets a last point at 0 and is then forgotten.
  void sample(const Summary& summary, std::int64_t now_ns);
  void add(Moment moment);

  [[nodiscard]] std::vector<HistorySample> samples() const;  // oldest first
  [[nodiscard]] const std::deque<Moment>& moments() const { return moments_; }
  // Process names by pid, as last seen (the timeline labels series with them).
  [[nodiscard]] const std::map<std::uint32_t, std::string>& process_names() const { return names_; }
  [[nodiscard]] std::uint64_t samples_taken() const { return taken_; }
  [[nodiscard]] std::uint64_t samples_dropped() const { return taken_ - ring_count_; }
  [[nodiscard]] std::uint64_t moments_dropped() const { return moments_dropped_; }
  [[nodiscard]] std::size_t max_samples() const { return ring_.size(); }
  // What the ring holds per sample, in memory.
  [[nodiscard]] static constexpr std::size_t bytes_per_sample() { return sizeof(HistorySample); }

 private:
  using SeriesKey = std::tuple<std::uint32_t, std::uint16_t, std::uint8_t, std::uint8_t>;  // pid, device, type, category
  void push(const HistorySample& sample);

  std::vector<HistorySample> ring_;
  std::size_t ring_next_{};
  std::size_t ring_count_{};
  std::uint64_t taken_{};
  std::map<SeriesKey, std::uint64_t> last_;  // the last point of each live series
  std::map<std::uint32_t, std::string> names_;
  std::deque<Moment> moments_;
  std::size_t max_moments_;
  std::uint64_t moments_dropped_{};
};

}  // namespace meshrt::server
