// fork() in a tracked process (ADR 0017): a child that allocates and exits, one that execs a
// tracked program, one that outlives its parent, and children forked at every point of the
// sender's pass. The parent's session stays exact, no child hangs, and a child's exit finds
// nothing leaked (under LeakSanitizer, whose check runs at every child's exit).
#include <chrono>
#include <csignal>
#include <cstdint>
#include <optional>
#include <string>

#include <signal.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

import meshrt.testing;
import meshrt.testing.fixture;

using namespace meshrt::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

const std::string bin = MESHRT_BIN_DIR;

TEST_SUITE("fork") {
  TEST_CASE("fork: a child that allocates and exits never hangs and never touches the parent's session") {
    ServerFixture fixture(bin);
    auto parent = fixture.client({bin + "/meshrt-fork-client", "allocate"});
    REQUIRE(eventually([&] { return parent->standard_output().find("holding") != std::string::npos; }));
    CHECK(parent->standard_output().find(" exited 0") != std::string::npos);
    // Exactly the parent's 3 buffers on 2 devices: nothing of the child's, none of its copies' Frees.
    REQUIRE(eventually([&] {
      const auto process = process_of(fixture.summary(), parent->pid());
      return process && (*process)["live_allocations"] == 6 && (*process)["allocations"] == 8;
    }));
    json during = fixture.summary();
    CHECK(during["processes"].size() == 1);  // the child is untracked (ADR 0017)
    CHECK(during["unknown_deallocations"] == 0);
    CHECK(during["double_deallocations"] == 0);
    parent->signal(SIGUSR1);
    REQUIRE(parent->wait_for(60s) == 0);
    REQUIRE(eventually([&] { return fixture.summary()["processes"].empty(); }));
    const json after = fixture.summary();
    CHECK(after["active_allocations"] == 0);
    CHECK(after["total_deallocations"] == 8);
    CHECK(after["reclaimed_allocations"] == 0);
    CHECK(after["leaked_at_exit"] == 0);
    CHECK(after["unknown_deallocations"] == 0);
  }

  TEST_CASE("fork and exec: the new program is tracked as its own process, the parent's session is intact") {
    ServerFixture fixture(bin);
    auto parent = fixture.client({bin + "/meshrt-fork-client", "exec", bin + "/meshrt-demo", "--mesh", "1x1",
                                  "--buffers", "2", "--no-verify"});
    REQUIRE(eventually([&] { return parent->standard_output().find("holding") != std::string::npos; }));
    CHECK(parent->standard_output().find(" exited 0") != std::string::npos);
    REQUIRE(eventually([&] {
      const auto process = process_of(fixture.summary(), parent->pid());
      return process && (*process)["live_allocations"] == 6;
    }));
    const json during = fixture.summary();
    // The demo's own session came and went: its allocations were counted, all freed.
    CHECK(during["total_allocations"].get<std::uint64_t>() > 8);
    CHECK(during["total_deallocations"].get<std::uint64_t>() == during["total_allocations"].get<std::uint64_t>() - 6);
    CHECK(during["unknown_deallocations"] == 0);
    CHECK(during["reclaimed_allocations"] == 0);
    parent->signal(SIGUSR1);
    REQUIRE(parent->wait_for(60s) == 0);
    REQUIRE(eventually([&] { return fixture.summary()["active_allocations"] == 0; }));
  }

  TEST_CASE("fork: the parent's session ends when the parent exits, even while its child lives on") {
    ServerFixture fixture(bin);
    auto parent = fixture.client({bin + "/meshrt-fork-client", "linger"});
    REQUIRE(eventually([&] { return parent->standard_output().find("holding") != std::string::npos; }));
    REQUIRE(eventually([&] {
      const auto process = process_of(fixture.summary(), parent->pid());
      return process && (*process)["live_allocations"] == 6;
    }));
    const std::string out = parent->standard_output();
    const int child = std::stoi(out.substr(out.find("child ") + 6));
    parent->signal(SIGUSR1);
    REQUIRE(parent->wait_for(60s) == 0);
    // The child still holds a copy of the socket only if the fork did not close it.
    REQUIRE(eventually([&] { return fixture.summary()["processes"].empty(); }, 30s));
    CHECK(::kill(child, 0) == 0);  // the child is still alive: the session ended anyway
    CHECK(fixture.summary()["reclaimed_allocations"] == 0);
    ::kill(child, SIGKILL);
  }

  TEST_CASE("fork: 60 children forked at every point of the sender's pass all exit cleanly, the parent's session exact") {
    ServerFixture fixture(bin);
    auto parent = fixture.client({bin + "/meshrt-fork-client", "storm"});
    const std::optional<int> code = parent->wait_for(120s);
    INFO(parent->standard_output());
    CHECK(parent->standard_output().find("storm: 0 of 60 children failed") != std::string::npos);
    REQUIRE(code == 0);
    REQUIRE(eventually([&] { return fixture.summary()["processes"].empty(); }));
    const json after = fixture.summary();
    // The parent's 3 buffers and, before each fork, 200 more, all on 1x2 meshes: nothing of the children's.
    CHECK(after["total_allocations"] == 2 * (3 + 60 * 200));
    CHECK(after["total_deallocations"] == after["total_allocations"]);
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(after["double_deallocations"] == 0);
    CHECK(after["leaked_at_exit"] == 0);
    CHECK(after["reclaimed_allocations"] == 0);
  }
}

}  // namespace
