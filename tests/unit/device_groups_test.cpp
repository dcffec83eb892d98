// Device groups: the mask arithmetic the client's live table and the server's Ledger share, and
// the client's table itself (protocol::LiveGroups), in wire records.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

import meshrt.core;
import meshrt.protocol;

using namespace meshrt;
using namespace meshrt::protocol;

namespace {

AllocRecord group_of(std::uint64_t first, std::uint16_t count, std::uint64_t mesh_buffer = 0) {
  return AllocRecord{.buffer = first, .mesh_buffer = mesh_buffer, .size = 64, .device = 0, .device_count = count};
}

FreeRecord free_of(std::uint64_t first, std::uint16_t count = 1) {
  return FreeRecord{.buffer = first, .device_count = count};
}

std::vector<std::pair<std::uint64_t, std::uint16_t>> live_runs(const LiveGroups& table) {
  std::vector<std::pair<std::uint64_t, std::uint16_t>> runs;
  table.for_each_live_record([&](const AllocRecord& r) { runs.emplace_back(r.buffer, r.device_count); });
  std::ranges::sort(runs);
  return runs;
}

}  // namespace

TEST_SUITE("device groups") {
  TEST_CASE("group bits: ranges inside 64 bits, nothing past bit 63") {
    CHECK(group_bits(0, 64) == ~std::uint64_t{0});
    CHECK(group_bits(0, 200) == ~std::uint64_t{0});
    CHECK(group_bits(63, 1) == std::uint64_t{1} << 63U);
    CHECK(group_bits(60, 8) == (std::uint64_t{0xF} << 60U));
    CHECK(group_bits(64, 1) == 0);
    CHECK(group_bits(std::numeric_limits<std::uint64_t>::max(), 5) == 0);
    CHECK(group_bits(3, 0) == 0);
    CHECK(group_bits(2, 3) == 0b11100);
  }

  TEST_CASE("bits and runs are visited lowest first") {
    std::vector<std::uint32_t> bits;
    for_each_bit(0b1011'0001, [&](std::uint32_t bit) { bits.push_back(bit); });
    CHECK(bits == std::vector<std::uint32_t>{0, 4, 5, 7});
    std::vector<std::pair<std::uint32_t, std::uint32_t>> runs;
    for_each_run((std::uint64_t{1} << 63U) | 0b110'1110, [&](std::uint32_t start, std::uint32_t length) {
      runs.emplace_back(start, length);
    });
    CHECK(runs == std::vector<std::pair<std::uint32_t, std::uint32_t>>{{1, 3}, {5, 2}, {63, 1}});
    runs.clear();
    for_each_run(~std::uint64_t{0}, [&](std::uint32_t start, std::uint32_t length) { runs.emplace_back(start, length); });
    CHECK(runs == std::vector<std::pair<std::uint32_t, std::uint32_t>>{{0, 64}});
  }

  TEST_CASE("find_group: the group that holds an id, none past its end, none near zero or 2^64") {
    std::map<std::uint64_t, std::uint16_t> groups{{10, 4}, {100, 64}, {std::numeric_limits<std::uint64_t>::max() - 1, 2}};
    const auto count = [](std::uint16_t n) { return n; };
    CHECK(find_group(groups, 10, count)->first == 10);
    CHECK(find_group(groups, 13, count)->first == 10);
    CHECK(find_group(groups, 14, count) == groups.end());
    CHECK(find_group(groups, 163, count)->first == 100);
    CHECK(find_group(groups, 164, count) == groups.end());
    CHECK(find_group(groups, 0, count) == groups.end());
    CHECK(find_group(groups, 9, count) == groups.end());
    CHECK(find_group(groups, std::numeric_limits<std::uint64_t>::max(), count)->first ==
          std::numeric_limits<std::uint64_t>::max() - 1);
  }

  TEST_CASE("live groups: partial frees leave runs, the name goes with the group's last buffer") {
    LiveGroups table;
    CHECK(table.allocate(group_of(100, 8, 7), "weights").empty());
    CHECK(table.live_device_buffers() == 8);
    CHECK(table.name_count() == 1);
    CHECK(table.free(free_of(102, 3)));  // 102..104
    CHECK(table.live_device_buffers() == 5);
    CHECK(live_runs(table) == std::vector<std::pair<std::uint64_t, std::uint16_t>>{{100, 2}, {105, 3}});
    table.for_each_live_record([](const AllocRecord& r) { CHECK(r.device == r.buffer - 100); });
    CHECK(table.live_names().at(7) == "weights");
    CHECK(table.free(free_of(100, 8)));  // the rest, and the already freed ones again: no change there
    CHECK(table.live_device_buffers() == 0);
    CHECK(table.group_count() == 0);
    CHECK(table.name_count() == 0);
    CHECK_FALSE(table.free(free_of(100)));  // no group now: it waits as if it came early
    CHECK(table.frees_waiting() == 1);
  }

  TEST_CASE("live groups: a Free that overtook its Alloc waits, then follows it, a group freed whole never lives") {
    LiveGroups table;
    CHECK_FALSE(table.free(free_of(11)));
    CHECK_FALSE(table.free(free_of(20, 2)));
    CHECK(table.frees_waiting() == 2);
    const std::vector<FreeRecord> overtaken = table.allocate(group_of(10, 4, 1), "a");
    REQUIRE(overtaken.size() == 1);
    CHECK(overtaken[0].buffer == 11);
    CHECK(table.live_device_buffers() == 3);
    CHECK(live_runs(table) == std::vector<std::pair<std::uint64_t, std::uint16_t>>{{10, 1}, {12, 2}});
    // Buffers 20 and 21 were freed before their Alloc: nothing of it is live, and its name is not kept.
    CHECK(table.allocate(group_of(20, 2, 2), "b").size() == 1);
    CHECK(table.group_count() == 1);
    CHECK(table.name_count() == 1);
    CHECK(table.frees_waiting() == 0);
    CHECK_FALSE(table.free(free_of(500)));
    const std::vector<FreeRecord> unmatched = table.unmatched_frees();
    REQUIRE(unmatched.size() == 1);
    CHECK(unmatched[0].buffer == 500);
  }
}
