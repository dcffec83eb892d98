// The allocation server's state: every live buffer of every client session, with aggregates kept
// per device, buffer type and process so that a summary costs O(devices + processes).
//
// Pure state: no I/O, no clock, no locking. Applying an event is O(1).
module;
#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>

export module meshrt.server:ledger;

import meshrt.core;
import meshrt.protocol;

export namespace meshrt::server {

using SessionId = std::uint64_t;

// How much of one buffer type is in use, and the most that ever was.
struct Usage {
  std::uint64_t bytes{};
  std::uint64_t buffers{};
  std::uint64_t peak_bytes{};
  friend bool operator==(const Usage&, const Usage&) = default;
};
using UsageByType = std::array<Usage, buffer_type_count>;
// One buffer type's usage broken down by allocation category (ADR 0020), indexed [type][category].
using UsageByCategory = std::array<std::array<Usage, allocation_category_count>, buffer_type_count>;

// Who a session is: identity from the kernel (SO_PEERCRED, /proc), never from the client.
struct SessionIdentity {
  std::uint32_t pid{};
  std::uint32_t uid{};
  std::uint64_t start_time{};  // process start time in clock ticks since boot: pid + this never repeats
  std::string name;
};

struct Counters {
  std::uint64_t allocations{};            // Alloc records applied
  std::uint64_t deallocations{};          // Free records that matched a live buffer
  std::uint64_t unknown_deallocations{};  // Free for a buffer the session never had live
  std::uint64_t double_deallocations{};   // Free for a buffer the session freed recently
  std::uint64_t duplicate_allocations{};  // Alloc for a buffer already live
  std::uint64_t reclaimed_allocations{};  // live buffers of sessions that ended without Goodbye
  std::uint64_t leaked_at_exit{};         // live buffers of sessions that said Goodbye with them
  std::uint64_t lost_at_exit{};           // live buffers of sessions whose client gave up on a slow server
  std::uint64_t refused_allocations{};    // Allocs refused because a total would pass 2^64 (session closed)
  std::uint64_t conflicting_device_info{};  // device totals that disagreed with another live session's
  std::uint64_t sequence_gaps{};          // Alloc/Free batches that did not follow the last one
  std::uint64_t resyncs{};                // snapshots applied
  std::uint64_t call_stacks_dropped{};    // CallStacks not kept: the session had its limit of them
  friend bool operator==(const Counters&, const Counters&) = default;
};

struct ProcessSummary {
  SessionId session{};
  SessionIdentity identity;
  std::uint64_t live_allocations{};
  std::uint64_t live_bytes{};
  std::uint64_t allocations{};
  std::uint64_t deallocations{};
  std::map<std::uint32_t, UsageByType> devices;  // device -> usage by type, devices it ever used
};

struct DeviceSummary {
  std::uint32_t device{};
  UsageByType usage{};          // all categories
  UsageByCategory categories{};  // the same, by category: they sum to `usage`
  std::array<std::uint64_t, buffer_type_count> total_bytes{};  // as reported by clients; 0 if unknown
  std::array<std::uint32_t, buffer_type_count> bank_count{};   // as reported by clients; 0 if unknown
  std::array<std::uint64_t, buffer_type_count> base_address{};
};

struct Summary {
  std::uint64_t active_allocations{};
  Counters counters;
  std::vector<DeviceSummary> devices;
  std::vector<ProcessSummary> processes;
};

struct LiveBuffer {
  std::uint32_t pid{};
  std::uint64_t buffer{};
  std::uint64_t mesh_buffer{};
  std::string mesh_buffer_name;
  std::uint32_t device{};
  BufferType type{};
  AllocationCategory category{};
  std::uint64_t address{};
  std::uint64_t size{};
  std::int64_t time_ns{};
  bool hooked{};
  std::uint32_t stack{};  // the session's call stack id; 0: none
  std::string call_site;  // that stack's call site, as "function (file:line)"; "" without one
};

// The live buffers at one instant, ordered as the buffer list shows them (pid, device, buffer
// id), rendered as the reply's JSON a page at a time. Copying and sorting a million buffers is
// one short step; rendering and sending them is spread over the event loop, so other clients
// are served while a large list goes out (issue 11).
class BufferListing {
 public:
  [[nodiscard]] std::size_t size() const { return entries_.size(); }
  [[nodiscard]] bool done() const { return closed_; }
  [[nodiscard]] std::size_t sent() const { return next_; }  // buffers rendered so far
  // Appends the next part of the document {"buffers":[...]} to `out`, at least one buffer (or
  // the closing bracket) and at most `max_bytes` (at least max_entry_bytes). `now_ns` gives the
  // ages. Renders nothing once done().
  void render(std::string& out, std::size_t max_bytes, std::int64_t now_ns);
  // The longest one buffer's JSON can be (its name escaped at worst, its stack at its limit).
  static constexpr std::size_t max_stack_json_bytes = std::size_t{64} << 10U;
  static constexpr std::size_t max_entry_bytes = 512 + 6 * protocol::max_name_size + max_stack_json_bytes;
  // The same buffers as values (tests and small answers).
  [[nodiscard]] std::vector<LiveBuffer> buffers() const;

 private:
  friend class Ledger;
  struct Entry {
    std::uint64_t buffer;
    std::uint64_t mesh_buffer;
    std::uint64_t address;
    std::uint64_t size;
    std::int64_t time_ns;
    std::uint32_t pid;
    std::uint32_t device;
    std::uint32_t name;   // index into names_; 0: none
    std::uint32_t stack;  // index into stacks_; 0: none
    BufferType type;
    AllocationCategory category;
    bool hooked;
  };
  std::vector<Entry> entries_;
  std::vector<std::string> names_{std::string{}};  // as given; [0] is no name
  std::vector<std::string> quoted_names_;           // the same as JSON strings, made as needed
  // Call stacks of the listed buffers ([0] is none), and their JSON (the call site, and with
  // with_stacks_ every frame), made as needed.
  std::vector<protocol::CallStack> stacks_{protocol::CallStack{}};
  std::vector<std::string> stack_json_;
  bool with_stacks_{false};
  std::size_t next_{0};
  bool opened_{false};
  bool closed_{false};
};

// A stack's call site, as "function (file:line)"; "" for a stack without frames.
[[nodiscard]] std::string call_site_of(const protocol::CallStack& stack);

// What a session left behind from one call site: its buffers, grouped as heaptrack groups leaks.
struct LeakSite {
  protocol::CallStack stack;  // one stack through the site (the first seen); no frames: none was captured
  std::uint64_t stacks{};     // distinct call stacks through this site
  std::uint64_t bytes{};
  std::uint64_t buffers{};
  std::vector<std::uint32_t> devices;  // sorted
  std::vector<std::string> names;      // mesh buffer names, the first few
  [[nodiscard]] std::string call_site() const;  // "function (file:line)", or "" without a stack
};

// One mesh buffer's share of a device's memory of one type, across every live session: what an
// out-of-memory moment names as the largest consumers.
struct Holding {
  std::uint32_t pid{};
  std::string process;
  std::uint64_t mesh_buffer{};
  std::string mesh_buffer_name;  // "" when unnamed
  std::uint64_t bytes{};         // on that device, of that type
  std::string call_site;         // "function (file:line)"; "" without a stack
};

// How a session ended: Goodbye with everything delivered, Goodbye from a client that gave up on a
// server too slow for its shutdown timeout, or no Goodbye at all (it crashed, or was cut off).
enum class SessionEnd : std::uint8_t { goodbye, gave_up, disconnected };
[[nodiscard]] std::string_view to_string(SessionEnd how);

// What a session still held when it ended, per device and type, and by call site.
struct Reclaim {
  SessionIdentity identity;
  std::uint64_t buffers{};
  std::uint64_t bytes{};
  std::map<std::uint32_t, UsageByType> devices;
  std::vector<LeakSite> sites;  // largest first (bytes, then buffers, then devices)
  std::uint64_t sites_omitted{};  // call sites past max_sites_per_report, folded into none
};

// A Reclaim kept after its session ended, for `meshrt-smi --leaks`.
struct LeakReport {
  SessionId session{};
  SessionEnd how{};
  std::int64_t ended_ns{};
  Reclaim reclaim;
};

// The result of cross-checking every aggregate against the live buffers themselves.
struct Verification {
  bool consistent{true};
  std::vector<std::string> differences;  // one line per mismatch, with both figures
};

// What a Free record did: which of its device buffers it freed (bit i: device first_device + i),
// and how many it named that were not live (double: freed before; unknown: never seen).
struct FreeOutcome {
  std::uint64_t freed_mask{};
  std::uint32_t first_device{};
  BufferType type{};
  AllocationCategory category{};
  std::uint64_t size{};  // per device buffer
  std::uint64_t double_frees{};
  std::uint64_t unknown_frees{};
};

class Ledger {
 public:
  // Past this many recent frees a session forgets which ids it freed: a later Free of one of
  // them counts as unknown rather than double.
  static constexpr std::size_t recent_frees_remembered = 4096;

  // A leak report names at most this many call sites; the rest are counted.
  static constexpr std::size_t max_sites_per_report = 256;

  SessionId open_session(SessionIdentity identity);
  // Ends a session: its live buffers are reclaimed (and reported, by call site) and it is
  // forgotten; when it held any, its report is kept among the last leak_report_limit().
  Reclaim close_session(SessionId session, SessionEnd how, std::int64_t ended_ns = 0);
  // Reports of ended sessions that left buffers behind, oldest first (of one pid, or all when 0).
  [[nodiscard]] std::vector<LeakReport> leak_reports(std::uint32_t pid = 0) const;
  void set_leak_report_limit(std::size_t limit);
  [[nodiscard]] std::size_t leak_report_limit() const { return leak_report_limit_; }
  // A call stack of the session, named by its id. False (and counted) when the session already
  // holds `limit` stacks; a stack told again replaces the one it had.
  bool add_call_stack(SessionId session, protocol::CallStack stack, std::size_t limit);
  [[nodiscard]] std::uint64_t call_stack_count(SessionId session) const;
  [[nodiscard]] bool has_session(SessionId session) const { return sessions_.contains(session); }
  [[nodiscard]] const SessionIdentity& identity(SessionId session) const;

  // Sequence numbers: each Alloc/Free batch must start where the previous one ended. A gap is
  // counted (and returned as false) but the batch is still applied.
  bool check_sequence(SessionId session, std::uint64_t first_sequence, std::uint64_t count);
  // False when the record was refused: a total it adds to would pass 2^64 (no well-behaved client
  // gets near it; the server closes such a session). Nothing was applied then.
  bool apply_alloc(SessionId session, const protocol::AllocRecord& record);
  FreeOutcome apply_free(SessionId session, const protocol::FreeRecord& record);
  void name_mesh_buffer(SessionId session, std::uint64_t mesh_buffer, std::string name);
  // A device's totals as one session reports them. The first session to describe a device sets
  // them; while it (or another that agrees) lives, a session reporting other figures is counted
  // in conflicting_device_info and ignored, so no peer can rewrite what another reported.
  void set_device_totals(SessionId session, const protocol::DeviceTotals& totals);

  // Snapshots replace a session's live table: begin drops it (no frees counted), the chunks are
  // applied as allocations, end sets the next expected sequence number.
  void begin_snapshot(SessionId session);
  bool apply_snapshot_record(SessionId session, const protocol::AllocRecord& record);  // as apply_alloc
  void end_snapshot(SessionId session, std::uint64_t next_sequence);

  [[nodiscard]] std::uint64_t active_allocations() const { return active_allocations_; }
  [[nodiscard]] const Counters& counters() const { return counters_; }
  [[nodiscard]] std::uint64_t live_allocations(SessionId session) const;
  [[nodiscard]] std::uint64_t name_count(SessionId session) const;
  [[nodiscard]] Summary summary() const;
  // Every live buffer (of one pid, or all when pid is 0). O(live buffers), sorted once.
  // With `with_stacks`, each buffer's whole call stack too, not only its call site.
  [[nodiscard]] BufferListing list_buffers(std::uint32_t pid = 0, bool with_stacks = false) const;
  [[nodiscard]] std::vector<LiveBuffer> live_buffers(std::uint32_t pid = 0) const { return list_buffers(pid).buffers(); }
  // The `count` mesh buffers holding most of `type` on `device`, largest first, over every live
  // session. O(live allocations): asked for when a client reports running out of memory.
  [[nodiscard]] std::vector<Holding> largest_holdings(std::uint32_t device, BufferType type, std::size_t count) const;
  // Recomputes every aggregate from the live buffers and compares. O(live buffers).
  [[nodiscard]] Verification verify() const;

 private:
  // One Alloc record's device buffers: ids [first, first + count) on devices
  // [first_device, first_device + count); bit i of live_mask says whether the i-th is live.
  struct AllocationGroup {
    std::uint64_t mesh_buffer;
    std::uint64_t address;
    std::uint64_t size;
    std::int64_t time_ns;
    std::uint64_t live_mask;
    std::uint32_t first_device;
    std::uint8_t count;  // at most 64 (protocol::max_devices_per_record): a byte, so the category fits
    AllocationCategory category;
    BufferType type;
    bool hooked;
  };
  // Groups live in a slab; the map from first buffer id to slot is small (12 bytes a slot), so a
  // million live allocations cost about 80 bytes each (ADR 0012).
  using GroupIndex = absl::flat_hash_map<std::uint64_t, std::uint32_t>;  // first buffer id -> slab slot
  struct SessionRecord {
    SessionIdentity identity;
    GroupIndex live;
    std::vector<AllocationGroup> slab;
    std::vector<std::uint32_t> free_slots;
    // The call stack of each slab slot's group; empty while the session sent none (ADR 0024).
    std::vector<std::uint32_t> stacks;
    absl::flat_hash_map<std::uint32_t, protocol::CallStack> call_stacks;
    std::vector<UsageByType> devices;  // by device id
    std::uint64_t live_buffers{};
    std::uint64_t live_bytes{};
    std::uint64_t allocations{};
    std::uint64_t deallocations{};
    std::uint64_t next_sequence{};
    struct Name {
      std::string text;
      std::uint64_t live{};  // live groups of that mesh buffer: the name goes with the last one
    };
    absl::flat_hash_map<std::uint64_t, Name> names;
    std::vector<std::uint32_t> described_devices;  // devices whose totals this session vouches for
    // First ids of the groups freed lately: a set to ask, a ring to forget the oldest.
    absl::flat_hash_set<std::uint64_t> recent_frees;
    std::vector<std::uint64_t> recent_free_ring;
    std::size_t recent_free_next{};
  };

  SessionRecord& session(SessionId id);
  static GroupIndex::iterator find_group(SessionRecord& session, std::uint64_t buffer);
  bool add(SessionRecord& session, const protocol::AllocRecord& record);
  // Frees the `mask` bits of a group, adjusting every aggregate; forgets the group when empty.
  void remove(SessionRecord& session, GroupIndex::iterator group, std::uint64_t mask);
  // Frees every live buffer of a session in one pass. Not remove(begin()) until empty: a flat hash
  // map's begin() skips the slots erased before it, so that loop is quadratic (a minute of a
  // stalled server for a crashed process that held 200,000 buffers).
  void remove_all(SessionRecord& session);
  void remember_free(SessionRecord& session, std::uint64_t first_id);
  static std::uint32_t stack_of(const SessionRecord& session, std::uint32_t slot) {
    return slot < session.stacks.size() ? session.stacks[slot] : 0;
  }
  static std::vector<LeakSite> leak_sites(const SessionRecord& session, std::uint64_t& omitted);
  static UsageByType& usage_of(std::vector<UsageByType>& devices, std::uint32_t device);

  SessionId next_session_{1};
  std::map<SessionId, SessionRecord> sessions_;
  // Events come in runs from one session: the last one looked up is kept at hand.
  SessionId cached_id_{0};
  SessionRecord* cached_{nullptr};
  std::vector<UsageByType> devices_;  // by device id (ids are bounded by the protocol)
  std::vector<UsageByCategory> device_categories_;  // the same by category, kept beside it
  std::vector<protocol::DeviceTotals> device_totals_;
  std::vector<std::uint32_t> device_reporters_;  // live sessions vouching for device_totals_[d]
  std::vector<bool> device_known_;
  std::uint64_t active_allocations_{};
  Counters counters_;
  std::deque<LeakReport> leak_reports_;
  std::size_t leak_report_limit_{64};
};

}  // namespace meshrt::server
