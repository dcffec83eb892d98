// Large answers (issue 11, item 8): the buffer list rendered a page at a time from one sorted
// copy, and a memory map that groups what is too small to see.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

import meshrt.core;
import meshrt.memory_map;
import meshrt.protocol;
import meshrt.server;

using namespace meshrt;
using namespace meshrt::server;
using nlohmann::json;

namespace {

// Renders the whole listing in pages of at most `page` bytes; every page within its bound.
std::string render_all(BufferListing& listing, std::size_t page, std::size_t& pages) {
  std::string document;
  pages = 0;
  while (!listing.done()) {
    std::string part;
    listing.render(part, page, 2'000'000'000);
    CHECK(part.size() <= std::max(page, BufferListing::max_entry_bytes));
    REQUIRE_FALSE(part.empty());
    document += part;
    ++pages;
  }
  std::string after;
  listing.render(after, page, 0);
  CHECK(after.empty());  // nothing once done
  return document;
}

}  // namespace

TEST_SUITE("large answers") {
  TEST_CASE("an empty ledger lists as an empty array in one page") {
    Ledger ledger;
    BufferListing listing = ledger.list_buffers();
    std::size_t pages = 0;
    CHECK(render_all(listing, 4096, pages) == R"({"buffers":[]})");
    CHECK(pages == 1);
  }

  TEST_CASE("pages join into one document: every buffer once, sorted by pid, device and id, names escaped") {
    Ledger ledger;
    const SessionId later = ledger.open_session({.pid = 20, .name = "later"});
    const SessionId first = ledger.open_session({.pid = 10, .name = "first"});
    // pid 10: a replicated buffer on devices 0..3 (ids 100..103), named with JSON's special
    // characters and a byte that is not UTF-8; then a single buffer on device 1.
    ledger.name_mesh_buffer(first, 7, "w\"eights\\\n\xff");
    ledger.apply_alloc(first, protocol::AllocRecord{.buffer = 100, .mesh_buffer = 7, .address = 4096, .size = 2048,
                                                    .time_ns = 1'000'000'000, .device = 0, .type = BufferType::dram,
                                                    .device_count = 4});
    ledger.apply_alloc(first, protocol::AllocRecord{.buffer = 5, .mesh_buffer = 8, .address = 64, .size = 32,
                                                    .time_ns = 1'500'000'000, .device = 1, .type = BufferType::l1,
                                                    .hooked = true});
    for (std::uint64_t id = 1; id <= 300; ++id) {
      ledger.apply_alloc(later, protocol::AllocRecord{.buffer = id, .mesh_buffer = id, .address = id * 64, .size = 64,
                                                      .device = static_cast<std::uint32_t>(id % 3),
                                                      .type = BufferType::dram});
    }
    (void)ledger.apply_free(first, protocol::FreeRecord{.buffer = 102});  // a hole in the group

    BufferListing listing = ledger.list_buffers();
    CHECK(listing.size() == 304);
    std::size_t pages = 0;
    const std::string document = render_all(listing, BufferListing::max_entry_bytes, pages);
    CHECK(pages > 1);
    CHECK(listing.sent() == 304);
    const json parsed = json::parse(document);
    const json& buffers = parsed["buffers"];
    REQUIRE(buffers.size() == 304);

    // pid 10 first: device 0 has 100; device 1 has 5 and 101; device 3 has 103 (102 was freed).
    CHECK(buffers[0]["pid"] == 10);
    CHECK(buffers[0]["buffer"] == 100);
    CHECK(buffers[0]["device"] == 0);
    CHECK(buffers[0]["address"] == 4096);
    CHECK(buffers[0]["size"] == 2048);
    CHECK(buffers[0]["type"] == "dram");
    CHECK(buffers[0]["hooked"] == false);
    CHECK(buffers[0]["mesh_buffer"] == 7);
    CHECK(buffers[0]["age_seconds"].get<double>() == doctest::Approx(1.0));
    CHECK(buffers[0]["name"] == "w\"eights\\\n\xef\xbf\xbd");  // the bad byte replaced, the rest kept
    CHECK(buffers[1]["buffer"] == 5);
    CHECK(buffers[1]["type"] == "l1");
    CHECK(buffers[1]["hooked"] == true);
    CHECK(buffers[1]["name"] == "");
    CHECK(buffers[2]["buffer"] == 101);
    CHECK(buffers[3]["buffer"] == 103);
    CHECK(buffers[3]["device"] == 3);
    // Then pid 20, device by device, ids ascending within each.
    std::uint32_t last_device = 0;
    std::uint64_t last_id = 0;
    for (std::size_t i = 4; i < buffers.size(); ++i) {
      CHECK(buffers[i]["pid"] == 20);
      const auto device = buffers[i]["device"].get<std::uint32_t>();
      const auto id = buffers[i]["buffer"].get<std::uint64_t>();
      CHECK(device >= last_device);
      if (device == last_device && i > 4) CHECK(id > last_id);
      CHECK(id % 3 == device);
      last_device = device;
      last_id = id;
    }
    // The values form agrees with the rendered one.
    const std::vector<LiveBuffer> values = ledger.list_buffers().buffers();
    REQUIRE(values.size() == 304);
    CHECK(values[0].mesh_buffer_name == "w\"eights\\\n\xff");
    CHECK(values[4].pid == 20);
  }

  TEST_CASE("the listing is a copy: the ledger may change while it goes out") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    for (std::uint64_t id = 1; id <= 50; ++id) {
      ledger.apply_alloc(a, protocol::AllocRecord{.buffer = id, .size = 16, .type = BufferType::dram});
    }
    BufferListing listing = ledger.list_buffers(10);
    std::string part;
    listing.render(part, BufferListing::max_entry_bytes, 0);
    for (std::uint64_t id = 1; id <= 50; ++id) (void)ledger.apply_free(a, protocol::FreeRecord{.buffer = id});
    (void)ledger.close_session(a, SessionEnd::goodbye);
    while (!listing.done()) listing.render(part, BufferListing::max_entry_bytes, 0);
    CHECK(json::parse(part)["buffers"].size() == 50);
    CHECK(ledger.list_buffers(10).size() == 0);
  }

  TEST_CASE("a memory map of 100,000 tiny interleaved buffers of two processes draws a bounded number of blocks") {
    const json summary = {
        {"devices", json::array({{{"id", 0},
                                  {"dram", {{"banks", 12}, {"total_bytes", 12ull << 30U}, {"base_address", 0},
                                            {"used_bytes", 0}}}}})},
        {"processes", json::array({{{"pid", 1}, {"name", "one"}}, {{"pid", 2}, {"name", "two"}}})}};
    json list = json::array();
    constexpr std::uint64_t count = 100'000;
    for (std::uint64_t i = 0; i < count; ++i) {
      // 12 banks × 64 B each, one after another: 64 B of a 1 GiB bank is far below a pixel.
      list.push_back({{"pid", 1 + i % 2}, {"buffer", i}, {"mesh_buffer", i}, {"name", ""}, {"device", 0},
                      {"type", "dram"}, {"address", i * 64}, {"size", 768}});
    }
    const auto svg = render_memory_map(summary.dump(), json{{"buffers", list}}.dump(), std::nullopt);
    REQUIRE(svg.has_value());
    std::size_t blocks = 0;
    for (auto at = svg->find("<rect class=\"block\""); at != std::string::npos; at = svg->find("<rect class=\"block\"", at + 1)) {
      ++blocks;
    }
    CHECK(blocks >= 1);
    CHECK(blocks <= 2 * 960 + 2);  // at most a few per pixel column of the 960-pixel bank
    CHECK(svg->find("meshrt memory map: 100000 live buffers") != std::string::npos);
    CHECK(svg->find("small buffers of 2 processes") != std::string::npos);
    CHECK(svg->find("in 100000 buffers") != std::string::npos);  // the panel still counts every buffer
  }

  TEST_CASE("a memory map of a few buffers still draws each one") {
    const json summary = {
        {"devices", json::array({{{"id", 0},
                                  {"dram", {{"banks", 1}, {"total_bytes", 1 << 20}, {"base_address", 0}, {"used_bytes", 0}}}}})},
        {"processes", json::array({{{"pid", 1}, {"name", "one"}}})}};
    json list = json::array();
    for (std::uint64_t i = 0; i < 10; ++i) {
      list.push_back({{"pid", 1}, {"buffer", i}, {"mesh_buffer", i}, {"name", ""}, {"device", 0}, {"type", "dram"},
                      {"address", i * 64}, {"size", 64}});
    }
    const auto svg = render_memory_map(summary.dump(), json{{"buffers", list}}.dump(), std::nullopt);
    REQUIRE(svg.has_value());
    std::size_t blocks = 0;
    for (auto at = svg->find("<rect class=\"block\""); at != std::string::npos; at = svg->find("<rect class=\"block\"", at + 1)) {
      ++blocks;
    }
    CHECK(blocks == 10);
  }

  TEST_CASE("a memory map says each buffer's category, in its hover text and as data-category") {
    const json summary = {
        {"devices", json::array({{{"id", 0},
                                  {"l1", {{"banks", 1}, {"total_bytes", 1 << 20}, {"base_address", 0}, {"used_bytes", 0}}}}})},
        {"processes", json::array({{{"pid", 1}, {"name", "one"}}})}};
    const json list = json::array(
        {{{"pid", 1}, {"buffer", 1}, {"mesh_buffer", 1}, {"name", ""}, {"device", 0}, {"type", "l1"},
          {"category", "circular_buffer"}, {"address", 0}, {"size", 4096}},
         {{"pid", 1}, {"buffer", 2}, {"mesh_buffer", 2}, {"name", "weights"}, {"device", 0}, {"type", "l1"},
          {"category", "buffer"}, {"address", 8192}, {"size", 4096}}});
    const auto svg = render_memory_map(summary.dump(), json{{"buffers", list}}.dump(), std::nullopt);
    REQUIRE(svg.has_value());
    CHECK(svg->find("data-category=\"circular_buffer\"") != std::string::npos);
    CHECK(svg->find("data-category=\"buffer\"") != std::string::npos);
    CHECK(svg->find("buffer 1 (circular_buffer) · mesh buffer 1") != std::string::npos);
    CHECK(svg->find("buffer 2 (buffer) · mesh buffer 2 'weights'") != std::string::npos);
  }
}

TEST_SUITE("large answers") {
  TEST_CASE("a session that ends holding 100,000 groups, some partly freed, gives each buffer back once") {
    Ledger ledger;
    const SessionId a = ledger.open_session({.pid = 10});
    const SessionId b = ledger.open_session({.pid = 11});
    ledger.apply_alloc(b, protocol::AllocRecord{.buffer = 1, .size = 8, .device = 0, .type = BufferType::dram});
    constexpr std::uint64_t groups = 100'000;
    for (std::uint64_t g = 0; g < groups; ++g) {
      ledger.apply_alloc(a, protocol::AllocRecord{.buffer = 1 + 4 * g, .size = 16, .device = 0, .type = BufferType::dram,
                                                  .device_count = 4});
    }
    for (std::uint64_t g = 0; g < groups; g += 3) (void)ledger.apply_free(a, protocol::FreeRecord{.buffer = 2 + 4 * g});
    const std::uint64_t live = 4 * groups - (groups + 2) / 3;
    CHECK(ledger.live_allocations(a) == live);
    const Reclaim reclaim = ledger.close_session(a, SessionEnd::disconnected);
    CHECK(reclaim.buffers == live);
    CHECK(reclaim.bytes == 16 * live);
    CHECK(ledger.active_allocations() == 1);  // b's buffer stays
    CHECK(ledger.counters().reclaimed_allocations == live);
    for (const DeviceSummary& device : ledger.summary().devices) {
      CHECK(device.usage[index_of(BufferType::dram)].buffers == (device.device == 0 ? 1U : 0U));
    }
    CHECK(ledger.verify().consistent);
  }
}
