// libFuzzer target: random sequences of sessions, allocations, frees and snapshots applied to the
// server's Ledger, with its invariants checked after every step.
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <span>
#include <vector>

import meshrt.core;
import meshrt.protocol;
import meshrt.server;

using namespace meshrt;
using namespace meshrt::server;

namespace {

void require(bool condition) {
  if (!condition) __builtin_trap();
}

class Input {
 public:
  explicit Input(std::span<const std::uint8_t> bytes) : bytes_(bytes) {}
  [[nodiscard]] bool done() const { return at_ >= bytes_.size(); }
  std::uint8_t byte() { return done() ? 0 : bytes_[at_++]; }
  // A 64-bit value from the whole range, weighted to the edges where sums wrap: small, near 2^63,
  // near 2^64, or any.
  std::uint64_t wide() {
    const std::uint8_t kind = byte() % 4;
    const std::uint64_t low = byte();
    switch (kind) {
      case 0: return low;
      case 1: return (std::uint64_t{1} << 63U) - 128 + low;
      case 2: return ~std::uint64_t{0} - low;
      default: {
        std::uint64_t any = 0;
        for (int i = 0; i < 8; ++i) any = (any << 8U) | byte();
        return any;
      }
    }
  }

 private:
  std::span<const std::uint8_t> bytes_;
  std::size_t at_{0};
};

std::uint64_t total_live(const Summary& summary) {
  std::uint64_t live = 0;
  for (const ProcessSummary& process : summary.processes) live += process.live_allocations;
  return live;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Input input(std::span(data, size));
  Ledger ledger;
  std::vector<SessionId> sessions;
  Counters before = ledger.counters();
  while (!input.done()) {
    const std::uint8_t op = input.byte() % 10;
    if (op == 0 || sessions.empty()) {
      sessions.push_back(ledger.open_session({.pid = input.byte(), .name = "fuzz"}));
      continue;
    }
    const std::size_t which = input.byte() % sessions.size();
    const SessionId session = sessions[which];
    const std::uint64_t active = ledger.active_allocations();
    switch (op) {
      case 1:
      case 2: {
        const std::uint64_t live = ledger.live_allocations(session);
        const SessionEnd how = op == 2 ? SessionEnd::disconnected : input.byte() % 2 == 0 ? SessionEnd::goodbye : SessionEnd::gave_up;
        const Reclaim reclaim = ledger.close_session(session, how);
        require(reclaim.buffers == live && ledger.active_allocations() == active - live);
        sessions.erase(sessions.begin() + static_cast<std::ptrdiff_t>(which));
        break;
      }
      case 3:
      case 6: {
        // Anything the decoder lets through: sizes to 2^64 - 1, devices to the protocol's last id,
        // buffer ids up to where they would wrap.
        const auto count = static_cast<std::uint16_t>(1 + input.byte() % protocol::max_devices_per_record);
        const bool far_device = input.byte() % 4 == 0;
        const std::uint32_t device = far_device ? protocol::max_device_id + 1 - count : input.byte() % 16U;
        const std::uint64_t bytes = input.byte() % 2 == 0 ? std::uint64_t{input.byte()} * 64 : input.wide();
        const std::uint64_t buffer = std::min(input.wide(), ~std::uint64_t{0} - count);
        const protocol::AllocRecord record{.buffer = buffer,
                                           .mesh_buffer = input.byte() % 4U,
                                           .size = bytes,
                                           .device = device,
                                           .type = all_buffer_types[input.byte() % buffer_type_count],
                                           .device_count = count};
        const bool applied = op == 3 ? ledger.apply_alloc(session, record) : ledger.apply_snapshot_record(session, record);
        require(applied ? ledger.active_allocations() >= active : ledger.active_allocations() == active);
        break;
      }
      case 4: {
        const auto count = static_cast<std::uint16_t>(1 + input.byte() % protocol::max_devices_per_record);
        const std::uint64_t buffer = input.byte() % 2 == 0 ? input.byte() : std::min(input.wide(), ~std::uint64_t{0} - count);
        const protocol::FreeRecord record{.buffer = buffer, .device_count = count};
        const FreeOutcome outcome = ledger.apply_free(session, record);
        // What was not live is counted, never applied.
        require(ledger.active_allocations() == active - static_cast<std::uint64_t>(__builtin_popcountll(outcome.freed_mask)));
        require(outcome.unknown_frees + outcome.double_frees + static_cast<std::uint64_t>(__builtin_popcountll(outcome.freed_mask)) ==
                record.device_count);
        break;
      }
      case 5:
        ledger.begin_snapshot(session);
        require(ledger.live_allocations(session) == 0);
        break;
      case 7:
        ledger.end_snapshot(session, input.byte());
        break;
      case 8:
        ledger.name_mesh_buffer(session, input.byte() % 4, "name");
        break;
      case 9: {
        // One session's device totals never overwrite another live session's.
        const protocol::DeviceTotals totals{.device = input.byte() % 4U,
                                            .total_bytes = {input.wide(), input.wide(), input.byte(), input.byte()}};
        ledger.set_device_totals(session, totals);
        break;
      }
      default:
        break;
    }
    // After every step: totals agree at every level, and no counter went backwards.
    require(ledger.verify().consistent);
    const Summary summary = ledger.summary();
    require(summary.active_allocations == total_live(summary));
    const Counters& now = ledger.counters();
    require(now.allocations >= before.allocations && now.deallocations >= before.deallocations &&
            now.unknown_deallocations >= before.unknown_deallocations &&
            now.double_deallocations >= before.double_deallocations &&
            now.reclaimed_allocations >= before.reclaimed_allocations && now.lost_at_exit >= before.lost_at_exit &&
            now.refused_allocations >= before.refused_allocations);
    before = now;
  }
  return 0;
}
