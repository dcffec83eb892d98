// A server that stops reading (SIGSTOP) while a client allocates hard: the client's queue must
// stay bounded, drop whole frames, mark itself out of sync, and resynchronise with a snapshot
// when the server reads again, so the final ledger is still exact.
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

import meshrt;
import meshrt.testing;
import meshrt.testing.fixture;

using namespace meshrt;
using namespace meshrt::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

const std::string bin = MESHRT_BIN_DIR;

}  // namespace

TEST_SUITE("slow server") {
  TEST_CASE("a server stopped with SIGSTOP under load: the client's queue stays bounded, it resyncs, the ledger ends exact") {
    ServerFixture fixture(bin);
    constexpr std::size_t limit = 256 * 1024;
    // The most one sender round can encode past the limit before it drops: 16 chunks of 1024
    // events of 48 bytes, from the one lane this test records on.
    constexpr std::size_t one_round = 16 * 1024 * 48;
    auto client = TrackingClient::start(
        {.socket_path = fixture.socket(), .max_pending_bytes = limit, .warn = [](std::string_view) {}});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({2, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    const auto create = [&] {
      return MeshBuffer::create(mesh,
                                ReplicatedBufferConfig{.size = 4096},
                                {.page_size = 1024, .buffer_type = BufferType::dram})
          .value();
    };
    std::vector<MeshBuffer> kept;
    for (int i = 0; i < 25; ++i) kept.push_back(create());
    REQUIRE(client->flush(60s));
    REQUIRE(eventually([&] { return fixture.active() == 100; }));

    fixture.server().signal(SIGSTOP);
    // 400,000 events, at least 48 bytes each: about 19 MB that an unbounded queue would hold.
    constexpr int pairs = 200'000;
    for (int i = 0; i < pairs; ++i) (void)create();
    REQUIRE(eventually([&] { return client->status().overflows > 0; }, 60s));
    const TrackingClient::Status stopped = client->status();
    CHECK(stopped.events_queued >= 2 * pairs);
    CHECK(stopped.peak_pending_bytes > limit);  // it did fill up...
    CHECK(stopped.peak_pending_bytes <= limit + one_round);  // ...and no further
    CHECK_FALSE(client->flush(200ms));  // nothing reaches a stopped server

    fixture.server().signal(SIGCONT);
    REQUIRE(client->flush(60s));
    REQUIRE(eventually([&] {
      const auto process = process_of(fixture.summary(), ::getpid());
      return process && (*process)["live_allocations"] == 100;
    }));
    const json resumed = fixture.summary();
    CHECK(resumed["active_allocations"] == 100);
    CHECK(resumed["resyncs"].get<std::uint64_t>() >= 2);  // the first session's snapshot, then the resync
    CHECK(client->status().snapshots >= 2);
    CHECK(resumed["unknown_deallocations"] == 0);
    CHECK(resumed["double_deallocations"] == 0);
    CHECK(resumed["reclaimed_allocations"] == 0);
    CHECK(used(resumed, 0, "dram") == 25 * 4096);

    kept.clear();
    REQUIRE(client->flush(60s));
    REQUIRE(eventually([&] { return fixture.active() == 0; }));
    CHECK(fixture.summary()["unknown_deallocations"] == 0);
  }
}
