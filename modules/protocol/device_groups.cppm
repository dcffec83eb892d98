// Device groups: the device buffers of one Alloc record (ids [first, first + count) on devices
// [device, device + count), count at most 64) with a 64-bit mask of which are still live. The
// tracking client's live table (LiveGroups, below) and the server's Ledger both keep live
// buffers as groups; the arithmetic here is what they share, so that both read a Free of a
// range the same way.
module;
#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <absl/container/flat_hash_map.h>

export module meshrt.protocol:device_groups;

import :records;

export namespace meshrt::protocol {

// Bits [first, first + count) of a group's mask; none at or past bit 64.
constexpr std::uint64_t group_bits(std::uint64_t first, std::uint64_t count) {
  if (first >= 64 || count == 0) return 0;
  const std::uint64_t run = count >= 64 ? ~std::uint64_t{0} : ((std::uint64_t{1} << count) - 1);
  return run << first;
}

// visit(bit) for each set bit of `mask`, lowest first.
template <class Visit>
void for_each_bit(std::uint64_t mask, Visit visit) {
  while (mask != 0) {
    visit(static_cast<std::uint32_t>(std::countr_zero(mask)));
    mask &= mask - 1;
  }
}

// visit(start, length) for each run of consecutive set bits of `mask`, lowest first: the
// records that describe a group's still-live buffers.
template <class Visit>
void for_each_run(std::uint64_t mask, Visit visit) {
  while (mask != 0) {
    const auto start = static_cast<std::uint32_t>(std::countr_zero(mask));
    const auto length = static_cast<std::uint32_t>(std::countr_one(mask >> start));
    visit(start, length);
    mask &= ~group_bits(start, length);
  }
}

// The group of `groups` (a map keyed by each group's first id) that holds buffer `id`, or
// groups.end(). Groups do not overlap and span at most 64 ids, so its first id is at most 63
// below: at most 64 lookups, whatever the table's size. `count_of(value)` is a group's size.
template <class Map, class CountOf>
auto find_group(Map& groups, std::uint64_t id, CountOf count_of) -> decltype(groups.end()) {
  for (std::uint64_t back = 0; back < 64 && back <= id; ++back) {
    const auto found = groups.find(id - back);
    if (found != groups.end()) return id - found->first < count_of(found->second) ? found : groups.end();
  }
  return groups.end();
}

// A sender's table of what is live, in wire records: what a snapshot says when a session starts
// or resynchronises. The tracking client keeps one, connected or not. A Free may arrive before
// its Alloc (the two recorded on different threads): it waits here until the Alloc comes. Names
// live exactly as long as any buffer of their group. Not thread-safe: one owner.
class LiveGroups {
 public:
  // An Alloc, with its mesh buffer's name if it has one. Frees that overtook it come back, to be
  // sent after it; the buffers they free are not live.
  [[nodiscard]] std::vector<FreeRecord> allocate(const AllocRecord& record, std::optional<std::string> name);
  // A Free: true when its Alloc was seen and it applies now; false when it waits for its Alloc.
  [[nodiscard]] bool free(const FreeRecord& record);

  [[nodiscard]] std::uint64_t live_device_buffers() const { return live_device_buffers_; }
  [[nodiscard]] std::size_t group_count() const { return live_.size(); }
  [[nodiscard]] std::size_t name_count() const { return names_.size(); }
  [[nodiscard]] std::size_t frees_waiting() const { return early_frees_.size(); }
  // Frees whose Alloc never came (the server counts them as unknown frees), in no set order.
  [[nodiscard]] std::vector<FreeRecord> unmatched_frees() const;

  // What a snapshot carries: the names of live groups, and one record per run of still-live
  // device buffers of each group, visit(record).
  [[nodiscard]] const std::unordered_map<std::uint64_t, std::string>& live_names() const { return names_; }
  template <class Visit>
  void for_each_live_record(Visit visit) const {
    for (const auto& [id, group] : live_) {
      for_each_run(group.live_mask, [&](std::uint32_t start, std::uint32_t length) {
        AllocRecord run = group.record;
        run.buffer += start;
        run.device += start;
        run.device_count = static_cast<std::uint16_t>(length);
        visit(run);
      });
    }
  }

 private:
  struct LiveRecord {
    AllocRecord record;
    std::uint64_t live_mask{};
  };
  absl::flat_hash_map<std::uint64_t, LiveRecord> live_;  // first buffer id -> group
  std::uint64_t live_device_buffers_{};
  std::unordered_map<std::uint64_t, FreeRecord> early_frees_;  // by buffer id, never reused
  std::unordered_map<std::uint64_t, std::string> names_;       // by mesh buffer: one group each
};

}  // namespace meshrt::protocol
