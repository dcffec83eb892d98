// The memory timeline (ADR 0025): the server's History sampling a ledger's summaries, and
// meshrt-smi's renderings of it (a Chrome trace, a page).
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

import meshrt.core;
import meshrt.server;
import meshrt.memory_map;

using namespace meshrt;
using namespace meshrt::server;
using nlohmann::json;

namespace {

// A summary with one process using `bytes` of DRAM (category buffer) on device 0.
Summary summary_of(std::uint32_t pid, std::uint64_t bytes) {
  Summary summary;
  DeviceSummary device{.device = 0};
  device.usage[index_of(BufferType::dram)].bytes = bytes;
  device.categories[index_of(BufferType::dram)][index_of(AllocationCategory::buffer)].bytes = bytes;
  summary.devices.push_back(device);
  if (bytes > 0) {
    ProcessSummary process{.identity = {.pid = pid, .name = "trainer"}};
    process.devices[0][index_of(BufferType::dram)].bytes = bytes;
    summary.processes.push_back(process);
  }
  return summary;
}

// What the server answers a timeline query: two processes on device 0, one crash.
std::string two_process_timeline() {
  History history;
  history.add({.time_ns = 1'000'000, .kind = MomentKind::process_start, .pid = 10, .process = "trainer"});
  Summary first = summary_of(10, 4096);
  history.sample(first, 1'000'000);
  Summary both = summary_of(10, 4096);
  ProcessSummary other{.identity = {.pid = 20, .name = "server"}};
  other.devices[0][index_of(BufferType::dram)].bytes = 1024;
  both.processes.push_back(other);
  both.devices[0].categories[index_of(BufferType::dram)][index_of(AllocationCategory::buffer)].bytes = 5120;
  history.sample(both, 2'000'000);
  history.sample(summary_of(10, 4096), 3'000'000);
  history.add({.time_ns = 3'000'000,
               .kind = MomentKind::crash_reclaim,
               .pid = 20,
               .process = "server",
               .buffers = 1,
               .bytes = 1024,
               .detail = "Device 0 dram 1024 B in 1"});
  json samples = json::array();
  for (const HistorySample& s : history.samples()) {
    samples.push_back({s.time_ns, s.pid, s.device, s.type == 0 ? "dram" : "l1",
                       s.category == all_categories ? "all" : "buffer", s.bytes});
  }
  json moments = json::array();
  for (const Moment& m : history.moments()) {
    moments.push_back({{"time_ns", m.time_ns}, {"kind", std::string(to_string(m.kind))}, {"pid", m.pid},
                       {"process", m.process}, {"buffers", m.buffers}, {"bytes", m.bytes}, {"detail", m.detail}});
  }
  return json{{"timeline",
               {{"now_ns", 4'000'000},
                {"samples_dropped", 0},
                {"processes", json::array({{{"pid", 10}, {"name", "trainer"}}, {{"pid", 20}, {"name", "server"}}})},
                {"samples", samples},
                {"moments", moments}}}}
      .dump();
}

}  // namespace

TEST_SUITE("timeline") {
  TEST_CASE("usage is sampled when it changes: a point per changed series, a last point at zero, then nothing") {
    History history(100);
    history.sample(summary_of(7, 4096), 10);
    // Device 0 DRAM: process 7 (all categories) and the buffer category (pid 0).
    REQUIRE(history.samples().size() == 2);
    history.sample(summary_of(7, 4096), 20);  // nothing changed
    CHECK(history.samples().size() == 2);
    history.sample(summary_of(7, 8192), 30);
    REQUIRE(history.samples().size() == 4);
    CHECK(history.samples()[2].time_ns == 30);
    history.sample(summary_of(7, 0), 40);  // freed: both series end at 0
    const std::vector<HistorySample> all = history.samples();
    REQUIRE(all.size() == 6);
    CHECK(all[4].bytes == 0);
    CHECK(all[5].bytes == 0);
    std::set<std::uint32_t> pids;
    for (const HistorySample& s : all) pids.insert(s.pid);
    CHECK(pids == std::set<std::uint32_t>{0, 7});
    history.sample(summary_of(7, 0), 50);  // gone series stay gone
    CHECK(history.samples().size() == 6);
    CHECK(history.process_names().at(7) == "trainer");
  }

  TEST_CASE("the history is a ring: the oldest samples and moments go first, and are counted") {
    History history(4, 2);
    for (std::uint64_t i = 1; i <= 5; ++i) history.sample(summary_of(7, i * 2048), static_cast<std::int64_t>(i));
    const std::vector<HistorySample> kept = history.samples();
    REQUIRE(kept.size() == 4);
    CHECK(history.samples_taken() == 10);
    CHECK(history.samples_dropped() == 6);
    CHECK(kept.front().time_ns == 4);  // oldest first
    CHECK(kept.back().time_ns == 5);
    for (int i = 0; i < 3; ++i) history.add({.time_ns = i, .kind = MomentKind::process_start, .pid = 7});
    CHECK(history.moments().size() == 2);
    CHECK(history.moments().front().time_ns == 1);
    CHECK(history.moments_dropped() == 1);
    History off(0);
    off.sample(summary_of(7, 4096), 1);
    CHECK(off.samples().empty());
    static_assert(History::bytes_per_sample() <= 64);
  }

  TEST_CASE("a Chrome trace of the timeline: counters per device and type that state every process, instants for moments") {
    const auto trace = render_timeline_trace(two_process_timeline());
    REQUIRE(trace.has_value());
    const json events = json::parse(*trace).at("traceEvents");
    std::vector<json> counters;
    std::vector<json> instants;
    for (const json& event : events) {
      // The format's required fields: a phase, a name, a pid (and a tid); timestamps but on metadata.
      REQUIRE(event.contains("ph"));
      REQUIRE(event.contains("name"));
      REQUIRE(event.contains("pid"));
      REQUIRE(event.contains("tid"));
      if (event["ph"] != "M") REQUIRE(event["ts"].is_number());
      if (event["ph"] == "C" && event["name"] == "DRAM used bytes, by process") counters.push_back(event);
      if (event["ph"] == "i") instants.push_back(event);
    }
    // Changes at 1, 2 and 3 ms and the end at 4 ms; timestamps in microseconds from the first.
    REQUIRE(counters.size() == 4);
    CHECK(counters[0]["ts"] == 0.0);
    CHECK(counters[1]["ts"] == 1000.0);
    CHECK(counters[1]["args"]["trainer (pid 10)"] == 4096);
    CHECK(counters[1]["args"]["server (pid 20)"] == 1024);
    CHECK(counters[2]["args"]["server (pid 20)"] == 0);  // gone, and said so
    for (const json& counter : counters) CHECK(counter["args"].size() == 2);
    REQUIRE(instants.size() == 2);
    CHECK(instants[1]["s"] == "g");
    CHECK(instants[1]["args"]["kind"] == "crash reclaim");
    CHECK(instants[1]["name"].get<std::string>().find("server (pid 20), 1 buffers") != std::string::npos);
  }

  TEST_CASE("a timeline page stacks each device's use by process and marks the moments") {
    const auto page = render_timeline_page(two_process_timeline());
    REQUIRE(page.has_value());
    CHECK(page->starts_with("<!DOCTYPE html>"));
    CHECK(page->find("<svg class=\"chart\" data-chart=\"0\" data-device=\"0\" data-type=\"dram\"") != std::string::npos);
    CHECK(page->find("<path class=\"area\" data-pid=\"10\"") != std::string::npos);
    CHECK(page->find("<path class=\"area\" data-pid=\"20\"") != std::string::npos);
    CHECK(page->find("<line class=\"moment\" data-kind=\"crash reclaim\"") != std::string::npos);
    CHECK(page->find("trainer (pid 10): at most 4.0 KiB") != std::string::npos);
    CHECK(page->find("id=\"timeline-data\"") != std::string::npos);
  }

  TEST_CASE("what is not a timeline is an error that says so, never a crash") {
    for (const std::string bad : {"", "[]", "{\"timeline\": 3}", "{\"timeline\": {\"now_ns\": 1}}",
                                  R"({"timeline": {"now_ns": 1, "processes": [], "samples": [[1, 2]], "moments": []}})",
                                  R"({"timeline": {"now_ns": 1, "processes": [], "samples": [["x", 1, 0, "dram", "all", 5]], "moments": []}})"}) {
      const auto trace = render_timeline_trace(bad);
      REQUIRE_FALSE(trace.has_value());
      CHECK(trace.error().code == ErrorCode::invalid_argument);
      CHECK(trace.error().message.find("timeline") != std::string::npos);
      CHECK_FALSE(render_timeline_page(bad).has_value());
    }
  }
}
