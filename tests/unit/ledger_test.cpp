// The server's ledger: O(1) events, aggregates that always agree with the buffers behind them.
#include <bit>
#include <cstdint>
#include <string>

#include <doctest/doctest.h>

import meshrt.core;
import meshrt.protocol;
import meshrt.server;

using namespace meshrt;
using namespace meshrt::server;
using protocol::AllocRecord;
using protocol::FreeRecord;

namespace {

AllocRecord alloc(std::uint64_t id, std::uint32_t device, BufferType type, std::uint64_t size,
                  std::uint64_t mesh_buffer = 0) {
  return AllocRecord{.buffer = id, .mesh_buffer = mesh_buffer, .size = size, .device = device, .type = type};
}

FreeRecord free_of(std::uint64_t id) { return FreeRecord{.buffer = id}; }

const Usage& usage_of(const Summary& summary, std::uint32_t device, BufferType type) {
  for (const DeviceSummary& d : summary.devices) {
    if (d.device == device) return d.usage[index_of(type)];
  }
  FAIL("no such device");
  return summary.devices.front().usage[0];
}

}  // namespace

TEST_SUITE("ledger") {
  TEST_CASE("allocations and frees move the per-device, per-type and per-process figures") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10, .name = "a"});
    const SessionId b = ledger.open_session({.pid = 11, .name = "b"});
    ledger.apply_alloc(a, alloc(1, 0, BufferType::dram, 100));
    ledger.apply_alloc(a, alloc(2, 0, BufferType::l1, 10));
    ledger.apply_alloc(b, alloc(1, 0, BufferType::dram, 50));  // ids are per process: no clash
    Summary summary = ledger.summary();
    CHECK(summary.active_allocations == 3);
    CHECK(usage_of(summary, 0, BufferType::dram) == Usage{150, 2, 150});
    CHECK(usage_of(summary, 0, BufferType::l1) == Usage{10, 1, 10});
    REQUIRE(summary.processes.size() == 2);
    CHECK(summary.processes[0].live_bytes == 110);
    CHECK(summary.processes[1].live_allocations == 1);

    CHECK(ledger.apply_free(a, free_of(1)).freed_mask == 1);
    summary = ledger.summary();
    CHECK(usage_of(summary, 0, BufferType::dram) == Usage{50, 1, 150});  // the peak stays
    CHECK(summary.counters.deallocations == 1);
    CHECK(ledger.verify().consistent);
  }

  TEST_CASE("one record covers a range of device buffers, frees may take all or part of it") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    // Buffers 100..107 on devices 0..7, 1000 bytes each: one replicated mesh buffer.
    ledger.apply_alloc(a, AllocRecord{.buffer = 100, .mesh_buffer = 1, .size = 1000, .device = 0, .type = BufferType::dram,
                                      .device_count = 8});
    CHECK(ledger.active_allocations() == 8);
    CHECK(usage_of(ledger.summary(), 7, BufferType::dram) == Usage{1000, 1, 1000});
    CHECK(ledger.live_buffers().size() == 8);
    const FreeOutcome part = ledger.apply_free(a, FreeRecord{.buffer = 102, .device_count = 3});
    CHECK(part.freed_mask == 0b11100);
    CHECK(part.first_device == 0);
    CHECK(ledger.active_allocations() == 5);
    CHECK(usage_of(ledger.summary(), 3, BufferType::dram) == Usage{0, 0, 1000});
    const FreeOutcome again = ledger.apply_free(a, FreeRecord{.buffer = 103, .device_count = 2});
    CHECK(again.freed_mask == 0);
    CHECK(again.double_frees == 2);
    CHECK(ledger.verify().consistent);
    const FreeOutcome rest = ledger.apply_free(a, FreeRecord{.buffer = 100, .device_count = 8});
    CHECK(std::popcount(rest.freed_mask) == 5);
    CHECK(rest.double_frees == 3);
    CHECK(ledger.active_allocations() == 0);
    CHECK(ledger.counters().allocations == 8);
    CHECK(ledger.counters().deallocations == 8);
    CHECK(ledger.apply_free(a, FreeRecord{.buffer = 100, .device_count = 8}).double_frees == 8);
    CHECK(ledger.verify().consistent);
  }

  TEST_CASE("unknown and double frees are counted, never applied") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    const SessionId b = ledger.open_session({.pid = 11});
    ledger.apply_alloc(a, alloc(1, 0, BufferType::dram, 100));
    CHECK(ledger.apply_free(b, free_of(1)).unknown_frees == 1);  // another process's buffer
    CHECK(ledger.apply_free(a, free_of(99)).unknown_frees == 1);
    CHECK(ledger.apply_free(a, free_of(1)).freed_mask == 1);
    CHECK(ledger.apply_free(a, free_of(1)).double_frees == 1);
    CHECK(ledger.counters().unknown_deallocations == 2);
    CHECK(ledger.counters().double_deallocations == 1);
    CHECK(ledger.active_allocations() == 0);
    ledger.apply_alloc(a, alloc(5, 0, BufferType::dram, 1));
    ledger.apply_alloc(a, alloc(5, 0, BufferType::dram, 1));
    CHECK(ledger.counters().duplicate_allocations == 1);
    CHECK(ledger.active_allocations() == 1);
    CHECK(ledger.verify().consistent);
  }

  TEST_CASE("each device and type is broken down by category, and the parts sum to the whole") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    const SessionId b = ledger.open_session({.pid = 11});
    const auto with = [](AllocRecord record, AllocationCategory category) {
      record.category = category;
      return record;
    };
    ledger.apply_alloc(a, with(alloc(1, 0, BufferType::dram, 100), AllocationCategory::buffer));
    ledger.apply_alloc(a, with(alloc(2, 0, BufferType::dram, 30), AllocationCategory::system));
    ledger.apply_alloc(b, with(alloc(1, 0, BufferType::dram, 7), AllocationCategory::program));
    ledger.apply_alloc(b, with(AllocRecord{.buffer = 10, .size = 5, .type = BufferType::l1, .device_count = 4},
                               AllocationCategory::circular_buffer));
    const auto category_of = [](const Summary& summary, std::uint32_t device, BufferType type,
                                AllocationCategory category) {
      for (const DeviceSummary& d : summary.devices) {
        if (d.device == device) return d.categories[index_of(type)][index_of(category)];
      }
      FAIL("no such device");
      return Usage{};
    };
    Summary summary = ledger.summary();
    CHECK(usage_of(summary, 0, BufferType::dram) == Usage{137, 3, 137});
    CHECK(category_of(summary, 0, BufferType::dram, AllocationCategory::buffer) == Usage{100, 1, 100});
    CHECK(category_of(summary, 0, BufferType::dram, AllocationCategory::system) == Usage{30, 1, 30});
    CHECK(category_of(summary, 0, BufferType::dram, AllocationCategory::program) == Usage{7, 1, 7});
    CHECK(category_of(summary, 0, BufferType::dram, AllocationCategory::circular_buffer) == Usage{});
    CHECK(category_of(summary, 3, BufferType::l1, AllocationCategory::circular_buffer) == Usage{5, 1, 5});
    CHECK(ledger.live_buffers(11).front().category == AllocationCategory::program);
    CHECK(ledger.verify().consistent);
    // A Free says no category: the ledger takes it from the buffer it frees.
    ledger.apply_free(a, free_of(2));
    ledger.apply_free(b, FreeRecord{.buffer = 11, .device_count = 2});
    summary = ledger.summary();
    CHECK(category_of(summary, 0, BufferType::dram, AllocationCategory::system) == Usage{0, 0, 30});
    CHECK(category_of(summary, 1, BufferType::l1, AllocationCategory::circular_buffer) == Usage{0, 0, 5});
    CHECK(category_of(summary, 2, BufferType::l1, AllocationCategory::circular_buffer) == Usage{0, 0, 5});
    CHECK(category_of(summary, 3, BufferType::l1, AllocationCategory::circular_buffer) == Usage{5, 1, 5});
    CHECK(usage_of(summary, 0, BufferType::dram) == Usage{107, 2, 137});
    CHECK(ledger.verify().consistent);
    // A crash reclaims every category.
    ledger.close_session(b, SessionEnd::disconnected);
    summary = ledger.summary();
    CHECK(category_of(summary, 0, BufferType::dram, AllocationCategory::program).bytes == 0);
    CHECK(category_of(summary, 3, BufferType::l1, AllocationCategory::circular_buffer).bytes == 0);
    CHECK(ledger.verify().consistent);
  }

  TEST_CASE("a session that ends without Goodbye has its buffers reclaimed, with the figures") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10, .name = "crashy"});
    for (std::uint64_t id = 1; id <= 16; ++id) ledger.apply_alloc(a, alloc(id, id % 2, BufferType::dram, 1000));
    const Reclaim reclaim = ledger.close_session(a, SessionEnd::disconnected);
    CHECK(reclaim.buffers == 16);
    CHECK(reclaim.bytes == 16000);
    CHECK(reclaim.devices.at(0)[index_of(BufferType::dram)].buffers == 8);
    CHECK(reclaim.identity.name == "crashy");
    CHECK(ledger.counters().reclaimed_allocations == 16);
    CHECK(ledger.active_allocations() == 0);
    CHECK_FALSE(ledger.has_session(a));
    CHECK(ledger.summary().processes.empty());
  }

  TEST_CASE("buffers left at Goodbye count as leaked at exit, not as a crash") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    ledger.apply_alloc(a, alloc(1, 0, BufferType::l1, 8));
    (void)ledger.close_session(a, SessionEnd::goodbye);
    CHECK(ledger.counters().leaked_at_exit == 1);
    CHECK(ledger.counters().reclaimed_allocations == 0);
  }

  TEST_CASE("a snapshot replaces the session's live table and resets its sequence") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    CHECK(ledger.check_sequence(a, 0, 3));
    for (std::uint64_t id = 1; id <= 3; ++id) ledger.apply_alloc(a, alloc(id, 0, BufferType::dram, 10));
    ledger.begin_snapshot(a);
    ledger.apply_snapshot_record(a, alloc(3, 0, BufferType::dram, 10));
    ledger.apply_snapshot_record(a, alloc(7, 1, BufferType::l1, 5));
    ledger.end_snapshot(a, 42);
    CHECK(ledger.active_allocations() == 2);
    CHECK(ledger.counters().deallocations == 0);  // replaced, not freed
    CHECK(ledger.counters().resyncs == 1);
    CHECK(ledger.check_sequence(a, 42, 1));
    CHECK(ledger.verify().consistent);
  }

  TEST_CASE("a sequence gap is counted, never absorbed") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    CHECK(ledger.check_sequence(a, 0, 10));
    CHECK_FALSE(ledger.check_sequence(a, 15, 1));
    CHECK(ledger.counters().sequence_gaps == 1);
    CHECK(ledger.check_sequence(a, 16, 1));
  }

  TEST_CASE("names follow their mesh buffer and go with its last buffer") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    ledger.name_mesh_buffer(a, 5, "weights");
    ledger.apply_alloc(a, alloc(1, 0, BufferType::dram, 10, 5));
    ledger.apply_alloc(a, alloc(2, 1, BufferType::dram, 10, 5));
    auto buffers = ledger.live_buffers();
    REQUIRE(buffers.size() == 2);
    CHECK(buffers[0].mesh_buffer_name == "weights");
    (void)ledger.apply_free(a, free_of(1));
    (void)ledger.apply_free(a, free_of(2));
    ledger.apply_alloc(a, alloc(3, 0, BufferType::dram, 10, 5));
    CHECK(ledger.live_buffers()[0].mesh_buffer_name.empty());
  }

  TEST_CASE("live buffers can be listed for one pid") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    const SessionId b = ledger.open_session({.pid = 11});
    ledger.apply_alloc(a, alloc(1, 0, BufferType::dram, 10));
    ledger.apply_alloc(b, alloc(1, 0, BufferType::dram, 10));
    ledger.apply_alloc(b, alloc(2, 0, BufferType::dram, 10));
    CHECK(ledger.live_buffers(11).size() == 2);
    CHECK(ledger.live_buffers().size() == 3);
  }

  TEST_CASE("device totals reported by clients appear in the summary") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    ledger.set_device_totals(a, {.device = 3, .total_bytes = {1000, 100, 10, 1}});
    const Summary summary = ledger.summary();
    REQUIRE(summary.devices.size() == 1);
    CHECK(summary.devices[0].total_bytes[index_of(BufferType::l1)] == 100);
  }

  TEST_CASE("one session's device totals cannot overwrite what another live session reported") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    const SessionId b = ledger.open_session({.pid = 11});
    ledger.set_device_totals(a, {.device = 0, .total_bytes = {1000, 100, 10, 1}});
    ledger.set_device_totals(b, {.device = 0, .total_bytes = {1, 1, 1, 1}});
    CHECK(ledger.summary().devices[0].total_bytes[0] == 1000);
    CHECK(ledger.counters().conflicting_device_info == 1);
    ledger.set_device_totals(b, {.device = 0, .total_bytes = {1000, 100, 10, 1}});  // agreeing is fine
    CHECK(ledger.counters().conflicting_device_info == 1);
    ledger.set_device_totals(a, {.device = 0, .total_bytes = {3, 3, 3, 3}});  // a may not change it under b
    CHECK(ledger.summary().devices[0].total_bytes[0] == 1000);
    CHECK(ledger.counters().conflicting_device_info == 2);
    (void)ledger.close_session(a, SessionEnd::goodbye);
    ledger.set_device_totals(b, {.device = 0, .total_bytes = {5, 5, 5, 5}});  // the only voice left may
    CHECK(ledger.summary().devices[0].total_bytes[0] == 5);
    (void)ledger.close_session(b, SessionEnd::goodbye);
    const SessionId c = ledger.open_session({.pid = 12});
    ledger.set_device_totals(c, {.device = 0, .total_bytes = {2000, 200, 20, 2}});  // nobody left to disagree
    CHECK(ledger.summary().devices[0].total_bytes[0] == 2000);
  }

  TEST_CASE("an allocation whose totals would pass 2^64 is refused and changes nothing") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    const std::uint64_t huge = std::uint64_t{1} << 63U;
    CHECK(ledger.apply_alloc(a, alloc(1, 0, BufferType::dram, huge)));
    CHECK_FALSE(ledger.apply_alloc(a, alloc(2, 0, BufferType::dram, huge)));  // the device total would wrap
    CHECK(ledger.counters().refused_allocations == 1);
    CHECK(ledger.active_allocations() == 1);
    const FreeOutcome freed = ledger.apply_free(a, FreeRecord{.buffer = 1});
    CHECK(freed.freed_mask == 1);
    CHECK(ledger.active_allocations() == 0);
    CHECK(ledger.verify().consistent);
    // Many devices of one record: the session's total wraps even where no device's does.
    CHECK_FALSE(ledger.apply_alloc(a, AllocRecord{.buffer = 10, .size = huge, .device = 0, .device_count = 2}));
    CHECK(ledger.active_allocations() == 0);
  }

  TEST_CASE("a session whose client gave up at exit counts its buffers as lost, not leaked") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    ledger.apply_alloc(a, alloc(1, 0, BufferType::l1, 8));
    (void)ledger.close_session(a, SessionEnd::gave_up);
    CHECK(ledger.counters().lost_at_exit == 1);
    CHECK(ledger.counters().leaked_at_exit == 0);
    CHECK(ledger.counters().reclaimed_allocations == 0);
  }
}
