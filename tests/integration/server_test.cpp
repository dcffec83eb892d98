// Real processes: the bundled server on a private socket, real meshrt-demo and meshrt-loadgen
// clients, and meshrt-smi asking the questions a user would.
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

import meshrt.core;
import meshrt.protocol;
import meshrt.testing;
import meshrt.testing.fixture;

using namespace meshrt;
using namespace meshrt::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

const std::string programs = MESHRT_BIN_DIR;

// The tests below grew up with this name.
class Fixture : public ServerFixture {
 public:
  Fixture() : ServerFixture(programs) {}
};

std::uint64_t active(Fixture& fixture) { return fixture.active(); }

constexpr std::uint64_t system_buffers = seed_system_buffers;
constexpr std::uint64_t system_dram = system_dram_per_device;
constexpr std::uint64_t system_l1 = system_l1_per_device;

}  // namespace

TEST_SUITE("integration") {
  TEST_CASE("the seed scenario through the server: 100 MiB DRAM and 12 MiB L1 on device 0, five runs, no residue") {
    Fixture fixture;
    for (std::uint64_t run = 1; run <= 5; ++run) {
      CAPTURE(run);
      std::vector<std::string> flags{"--hold", "120"};
      if (run > 1) flags.emplace_back("--no-verify");
      auto demo = fixture.demo(flags);
      // The seed's 128 device buffers, and each device's 3 system buffers (ADR 0020): a command
      // queue and a dispatch buffer in DRAM (8 + 6 MiB), a 4 KiB page of L1 on each of 64 cores.
      REQUIRE(eventually([&] { return active(fixture) == 128 + system_buffers; }));
      const json live = fixture.summary();
      CHECK(used(live, 0, "dram") == 104'857'600 + system_dram);
      CHECK(used(live, 0, "l1") == 12'582'912 + system_l1);
      CHECK(live["devices"][0]["dram"]["categories"]["system"]["used_bytes"] == system_dram);
      CHECK(live["devices"][0]["dram"]["categories"]["system"]["buffers"] == 2);
      // The seed's figures are its buffers' (ADR 0020), shown per category by --json and the table.
      CHECK(live["devices"][0]["dram"]["categories"]["buffer"]["used_bytes"] == 104'857'600);
      CHECK(live["devices"][0]["l1"]["categories"]["buffer"]["used_bytes"] == 12'582'912);
      if (run == 1) {
        const auto [code, table] = fixture.smi({});
        CHECK(code == 0);
        // Under device 0's row: "|        |   buffer          104,857,600 B          | 12,582,912 B ... |      16 |".
        const auto device_row = table.find("|      0 | ");
        REQUIRE(device_row != std::string::npos);
        const auto line_start = table.find('\n', device_row) + 1;
        const std::string line = table.substr(line_start, table.find('\n', line_start) - line_start);
        CAPTURE(line);
        CHECK(line.starts_with("|        |   buffer "));
        CHECK(line.find(" 104,857,600 B ") != std::string::npos);
        CHECK(line.find("| 12,582,912 B ") != std::string::npos);
        CHECK(line.ends_with("|      16 |"));
      }
      CHECK(live["processes"].size() == 1);
      CHECK(live["processes"][0]["pid"] == demo->pid());
      demo->signal(SIGUSR1);
      REQUIRE(demo->wait_for(120s) == 0);
      CHECK(demo->standard_output().find("Active allocations: 0") != std::string::npos);
      REQUIRE(eventually([&] { return fixture.summary()["processes"].empty(); }));
      const json after = fixture.summary();
      check_ledger_clean(after);
      CHECK(after["total_allocations"] == (128 + system_buffers) * run);
      CHECK(after["total_deallocations"] == (128 + system_buffers) * run);
    }
    const std::string log = fixture.server_log();
    CHECK(log.find("Allocated 16 buffers on Devices 0-7") != std::string::npos);
    CHECK(log.find("Freed 16 buffers on Devices 0-7") != std::string::npos);
    CHECK(log.find("Allocated 3 system buffers on Devices 0-7") != std::string::npos);  // their own line
    CHECK(log.find("Freed 3 system buffers on Devices 0-7") != std::string::npos);
    CHECK(fixture.smi({"--verify"}).first == 0);
  }

  TEST_CASE("the seed's tensor test through the server: each step's figures in meshrt-smi follow from the layout") {
    // Shapes divided by 4 (sanitizer builds run this too): a and b are (8, 8, 128, 128), x is
    // (8, 8, 64, 32), y (8, 8, 32, 64), sharded on dims 0 and 1 over 2x4: a batch of 4 * 2 per device.
    constexpr std::uint64_t bf16 = 2;
    constexpr std::uint64_t batch = 4 * 2;
    constexpr std::uint64_t side = 512 / 4;
    constexpr std::uint64_t outer = 256 / 4;
    constexpr std::uint64_t inner = 128 / 4;
    constexpr std::uint64_t ab = batch * side * side * bf16;  // whole 32x32 tiles: no padding
    constexpr std::uint64_t x = batch * outer * inner * bf16;
    constexpr std::uint64_t y = batch * inner * outer * bf16;
    constexpr std::uint64_t product = batch * outer * outer * bf16;
    constexpr std::uint64_t binaries = 6144 + 8192 + 4096;  // reader, compute, writer of one operation
    struct Step {
      std::uint64_t tensors;   // DRAM of category buffer
      std::uint64_t programs;  // DRAM of category program
      std::uint64_t system_dram;
      std::uint64_t system_l1;
    };
    const std::vector<Step> steps{
        {0, 0, system_dram, system_l1},                                    // opened
        {ab, 0, system_dram, system_l1},                                   // a
        {2 * ab, 0, system_dram, system_l1},                               // b
        {3 * ab, binaries, system_dram, system_l1},                        // a + b
        {3 * ab + x + y + product, 2 * binaries, system_dram, system_l1},  // x, y, x @ y
        {2 * ab + x + y + product, 2 * binaries, system_dram, system_l1},  // deallocated a
        {ab + x + y + product, 2 * binaries, system_dram, system_l1},      // b
        {x + y + product, 2 * binaries, system_dram, system_l1},           // a + b
        {y + product, 2 * binaries, system_dram, system_l1},               // x
        {product, 2 * binaries, system_dram, system_l1},                   // y
        {0, 2 * binaries, system_dram, system_l1},                         // x @ y
        {0, 0, system_dram, system_l1},                                    // the program cache cleared
        {0, 0, 0, 0},                                                      // the mesh closed
    };
    Fixture fixture;
    auto demo = fixture.demo({"--scenario", "tensors", "--scale-down", "4", "--hold", "120"});
    for (std::size_t step = 1; step <= steps.size(); ++step) {
      CAPTURE(step);
      const std::string holding = fmt::format("holding after step {} ", step);
      REQUIRE(eventually([&] { return demo->standard_output().find(holding) != std::string::npos; }, 120s));
      const Step& want = steps[step - 1];
      // The demo's events reach the server a moment after its own figures: wait for the last.
      const auto matches = [&](const json& summary) {
        for (std::uint32_t device = 0; device < 8; ++device) {
          if (used(summary, device, "dram", "buffer") != want.tensors ||
              used(summary, device, "dram", "program") != want.programs ||
              used(summary, device, "dram", "system") != want.system_dram ||
              used(summary, device, "l1", "system") != want.system_l1 ||
              used(summary, device, "l1", "circular_buffer") != 0 ||  // a program's, for its run alone
              used(summary, device, "dram") != want.tensors + want.programs + want.system_dram) {
            return false;
          }
        }
        return true;
      };
      const bool reached = eventually([&] { return matches(fixture.summary()); }, 30s);
      CHECK_MESSAGE(reached, fixture.summary().dump(1));
      demo->signal(SIGUSR1);
    }
    REQUIRE(demo->wait_for(120s) == 0);
    CHECK(demo->standard_output().find("Active allocations: 0") != std::string::npos);
    REQUIRE(eventually([&] { return fixture.summary()["processes"].empty(); }));
    check_ledger_clean(fixture.summary());
  }

  TEST_CASE("8 clients at once, each with several threads: the ledger ends exact") {
    Fixture fixture;
    std::vector<std::unique_ptr<ChildProcess>> clients;
    for (int i = 0; i < 8; ++i) {
      clients.push_back(fixture.client({programs + "/meshrt-loadgen", "--threads", "4", "--operations", "300", "--seed",
                                        std::to_string(100 + i)}));
    }
    std::uint64_t allocated = 0;
    for (auto& client : clients) {
      REQUIRE(client->wait_for(300s) == 0);
      const std::string output = client->standard_output();
      const auto at = output.find("device buffers allocated: ");
      REQUIRE(at != std::string::npos);
      allocated += std::stoull(output.substr(at + 26));
    }
    CHECK(allocated > 8 * 4 * 100);
    REQUIRE(eventually([&] { return fixture.summary()["processes"].empty(); }));
    const json after = fixture.summary();
    CHECK(after["total_allocations"] == allocated);
    CHECK(after["total_deallocations"] == allocated);
    CHECK(after["active_allocations"] == 0);
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(after["double_deallocations"] == 0);
    CHECK(after["sequence_gaps"] == 0);
    CHECK(after["reclaimed_allocations"] == 0);
    CHECK(fixture.smi({"--verify"}).first == 0);
  }

  TEST_CASE("a client killed with SIGKILL while holding buffers: reclaimed, reported, server still answering") {
    Fixture fixture;
    auto demo = fixture.demo({"--hold", "300", "--no-verify"});
    REQUIRE(eventually([&] { return fixture.active("buffer") == 128; }));
    demo->signal(SIGKILL);
    REQUIRE(demo->wait_for(30s) == 128 + SIGKILL);
    // Its system buffers die with it too: the mesh never closed.
    REQUIRE(eventually([&] { return fixture.summary()["reclaimed_allocations"] == 128 + system_buffers; }));
    const json after = fixture.summary();
    CHECK(after["active_allocations"] == 0);
    CHECK(after["processes"].empty());
    CHECK(used(after, 0, "dram") == 0);
    const std::string log = fixture.server_log();
    CHECK(log.find(std::to_string(demo->pid()) + " (meshrt-demo): disconnected without Goodbye") != std::string::npos);
    CHECK(log.find(fmt::format("reclaimed {} leaked buffers", 128 + system_buffers)) != std::string::npos);
    CHECK(log.find(fmt::format("Device 0 dram {} B in {}", 104'857'600 + system_dram, 8 + 2)) != std::string::npos);
  }

  TEST_CASE("with MESHRT_ALLOC_STACKS=1 every live buffer has its call site, and a crash's leaks are grouped by it") {
    Fixture fixture;
    auto demo = fixture.client({fixture.bin() + "/meshrt-demo", "--hold", "300", "--no-verify"},
                               {{"MESHRT_ALLOC_STACKS", "1"}});
    REQUIRE(eventually([&] { return fixture.active("buffer") == 128; }));
    const auto [listed, listing] = fixture.smi({"--buffers", "--stacks", "--json"});
    REQUIRE(listed == 0);
    const json buffers = json::parse(listing)["buffers"];
    REQUIRE(buffers.size() == 128 + system_buffers);
    for (const json& buffer : buffers) {
      const bool seed = buffer["category"] == "buffer";
      // The seed's buffers come from the demo's loop, the system buffers from opening the mesh.
      CHECK(buffer["call_site"].get<std::string>().find(seed ? "run_iteration" : "run(int, char**)") != std::string::npos);
      CHECK(buffer["call_site"].get<std::string>().find("programs/demo/main.cpp:") != std::string::npos);
      CHECK(buffer["stack"].size() >= 3);
    }
    const auto [shown, table] = fixture.smi({"--buffers", "--stacks"});
    CHECK(shown == 0);
    CHECK(table.find("allocated at (anonymous namespace)::run_iteration(") != std::string::npos);
    CHECK(table.find("meshrt::MeshBuffer::create(") != std::string::npos);

    demo->signal(SIGKILL);
    REQUIRE(demo->wait_for(30s) == 128 + SIGKILL);
    REQUIRE(eventually([&] { return fixture.summary()["reclaimed_allocations"] == 128 + system_buffers; }));
    const auto [code, text] = fixture.smi({"--leaks", "--json", "--pid", std::to_string(demo->pid())});
    REQUIRE(code == 0);
    const json leaks = json::parse(text)["leaks"];
    REQUIRE(leaks.size() == 1);
    CHECK(leaks[0]["how"] == "reclaimed after a crash");
    CHECK(leaks[0]["buffers"] == 128 + system_buffers);
    const json sites = leaks[0]["sites"];
    REQUIRE(sites.size() == 2);  // the loop's 16 mesh buffers, and the mesh's system buffers
    CHECK(sites[0]["call_site"].get<std::string>().find("run_iteration") != std::string::npos);
    CHECK(sites[0]["buffers"] == 128);
    CHECK(sites[0]["bytes"] == 8 * (104'857'600 + 12'582'912));
    CHECK(sites[0]["devices"].size() == 8);
    CHECK(sites[1]["buffers"] == system_buffers);
    CHECK(sites[0]["bytes"].get<std::uint64_t>() > sites[1]["bytes"].get<std::uint64_t>());
    const auto [shown_leaks, leak_table] = fixture.smi({"--leaks"});
    CHECK(shown_leaks == 0);
    CHECK(leak_table.find("reclaimed after a crash") != std::string::npos);
    CHECK(leak_table.find("run_iteration") != std::string::npos);
    CHECK(fixture.server_log().find("B in 128 buffers on 8 devices from (anonymous namespace)::run_iteration") !=
          std::string::npos);
    CHECK(fixture.smi({"--leaks", "--pid", "999999"}).second.find("no leaks") != std::string::npos);
  }

  TEST_CASE("the server killed and restarted while clients hold buffers: after resync it matches them exactly") {
    Fixture fixture;
    auto demo = fixture.demo({"--hold", "300", "--no-verify"});
    const std::string report = fixture.file("loadgen.json");
    auto loadgen = fixture.client({programs + "/meshrt-loadgen", "--threads", "3", "--operations", "200", "--keep", "20",
                                   "--hold", "300", "--seed", "7", "--mesh", "2x2", "--report", report});
    REQUIRE(eventually([&] { return loadgen_report(report, "hold").has_value(); }));
    const json account = *loadgen_report(report, "hold");
    const std::uint64_t expected = 128 + system_buffers + account["live_buffers"].get<std::uint64_t>();
    REQUIRE(eventually([&] { return active(fixture) == expected; }));

    fixture.server().signal(SIGKILL);
    REQUIRE(fixture.server().wait_for(30s).has_value());
    fixture.start_server();
    REQUIRE(eventually([&] { return active(fixture) == expected; }));
    const json resynced = fixture.summary();
    CHECK(resynced["resyncs"] == 2);
    CHECK(used(resynced, 0, "dram") ==
          104'857'600 + system_dram + account["devices"][0]["dram"]["bytes"].get<std::uint64_t>());
    CHECK(used(resynced, 3, "l1") == 12'582'912 + system_l1 + account["devices"][3]["l1"]["bytes"].get<std::uint64_t>());
    CHECK(used(resynced, 5, "dram", "system") == system_dram);  // categories survive the resync
    for (const json& process : resynced["processes"]) {
      if (process["pid"] == loadgen->pid()) CHECK(process["live_allocations"] == account["live_buffers"]);
      else CHECK(process["live_allocations"] == 128 + system_buffers);
    }
    demo->signal(SIGUSR1);
    loadgen->signal(SIGUSR1);
    REQUIRE(demo->wait_for(120s) == 0);
    REQUIRE(loadgen->wait_for(120s) == 0);
    REQUIRE(eventually([&] { return fixture.summary()["processes"].empty(); }));
    const json after = fixture.summary();
    CHECK(after["active_allocations"] == 0);
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(after["reclaimed_allocations"] == 0);
  }

  TEST_CASE("malformed frames and a client that claims another pid: rejected, counted, others unaffected") {
    Fixture fixture;
    auto demo = fixture.demo({"--hold", "300", "--no-verify"});
    REQUIRE(eventually([&] { return fixture.active("buffer") == 128; }));

    const auto raw_session = [&](const std::vector<std::byte>& bytes) {
      const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un address{};
      address.sun_family = AF_UNIX;
      const std::string path = fixture.socket();
      std::copy(path.begin(), path.end(), address.sun_path);
      REQUIRE(::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
      REQUIRE(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
      std::vector<std::byte> reply(4096);
      std::size_t got = 0;
      for (ssize_t n = 1; n > 0 && got < reply.size();) {
        n = ::recv(fd, reply.data() + got, reply.size() - got, 0);  // until the server closes
        if (n > 0) got += static_cast<std::size_t>(n);
      }
      ::close(fd);
      reply.resize(got);
      auto frame = protocol::next_frame(reply);
      REQUIRE(frame.has_value());
      REQUIRE(frame->has_value());
      auto message = protocol::decode(**frame);
      REQUIRE(message.has_value());
      return std::get<protocol::ErrorMessage>(*message);
    };

    const std::string garbage = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    std::vector<std::byte> bytes;
    for (const char c : garbage) bytes.push_back(static_cast<std::byte>(c));
    const auto garbage_error = raw_session(bytes);
    CHECK(garbage_error.code == ErrorCode::protocol_error);

    bytes.clear();
    protocol::encode(protocol::Hello{.claimed_pid = static_cast<std::uint32_t>(demo->pid()), .process_name = "liar"},
                     bytes);
    protocol::encode_events(0, std::vector{protocol::EventRecord::of(protocol::FreeRecord{.buffer = 1})}, bytes);
    const auto liar_error = raw_session(bytes);
    CHECK(liar_error.code == ErrorCode::permission_denied);
    CHECK(liar_error.message.find("claims pid " + std::to_string(demo->pid())) != std::string::npos);

    bytes.clear();
    protocol::encode(protocol::Hello{.claimed_pid = static_cast<std::uint32_t>(::getpid())}, bytes);
    protocol::encode(protocol::SnapshotEnd{0, 5}, bytes);  // out of order: no snapshot begun
    const auto order_error = raw_session(bytes);
    CHECK(order_error.message.find("out of order") != std::string::npos);

    const json after = fixture.summary();
    CHECK(after["malformed_messages"] == 2);
    CHECK(after["rejected_sessions"] == 1);
    CHECK(after["active_allocations"] == 128 + system_buffers);  // the demo's buffers are untouched
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(used(after, 0, "dram", "buffer") == 104'857'600);
    demo->signal(SIGUSR1);
    REQUIRE(demo->wait_for(120s) == 0);
    REQUIRE(eventually([&] { return active(fixture) == 0; }));
  }

  TEST_CASE("server absent: the demo runs, says once that tracking is off, and ends clean") {
    Fixture fixture;
    fixture.server().signal(SIGTERM);
    REQUIRE(fixture.server().wait_for(30s) == 0);
    CHECK(fixture.server_log().find("Active allocations: 0") != std::string::npos);
    auto demo = fixture.demo({"--buffers", "4"});
    REQUIRE(demo->wait_for(120s) == 0);
    const std::string errors = demo->standard_error();
    std::size_t warnings = 0;
    for (std::size_t at = errors.find("meshrt: tracking:"); at != std::string::npos;
         at = errors.find("meshrt: tracking:", at + 1)) {
      ++warnings;
    }
    CHECK(warnings == 1);
    CHECK(errors.find("no allocation server at " + fixture.socket()) != std::string::npos);
    CHECK(demo->standard_output().find("Active allocations: 0") != std::string::npos);
  }

  TEST_CASE("meshrt-smi --map: an SVG with one block per live device buffer, an unwritable path is a clear error") {
    Fixture fixture;
    auto demo = fixture.demo({"--hold", "300", "--no-verify"});
    REQUIRE(eventually([&] { return active(fixture) == 128 + system_buffers; }));
    const std::string svg_path = fixture.file("map.svg");
    const auto [code, output] = fixture.smi({"--map", svg_path});
    REQUIRE(code == 0);
    CHECK(output.find(fmt::format("wrote the memory map of {} live buffers", 128 + system_buffers)) != std::string::npos);
    const std::string svg = read_text(svg_path);
    CHECK(svg.starts_with("<?xml"));
    std::size_t blocks = 0;
    for (auto at = svg.find("<rect class=\"block\""); at != std::string::npos; at = svg.find("<rect class=\"block\"", at + 1)) {
      ++blocks;
    }
    CHECK(blocks == 128 + system_buffers);
    const auto blocks_of = [&](std::string_view category) {
      std::size_t n = 0;
      const std::string marker = fmt::format("data-category=\"{}\"", category);
      for (auto at = svg.find(marker); at != std::string::npos; at = svg.find(marker, at + 1)) ++n;
      return n;
    };
    CHECK(blocks_of("buffer") == 128);
    CHECK(blocks_of("system") == system_buffers);
    CHECK(svg.find("Device 0 · dram · 12 banks") != std::string::npos);
    CHECK(svg.find("Device 7 · l1 · 64 banks") != std::string::npos);
    CHECK(svg.find(fmt::format("pid {} (meshrt-demo)", demo->pid())) != std::string::npos);  // hover text
    CHECK(svg.find("114.0 MiB used") != std::string::npos);  // device 0's DRAM: the seed's 100 MiB, 14 MiB system

    const auto [bad_code, bad_output] = fixture.smi({"--map", "/proc/no/such/dir/map.svg"});
    CHECK(bad_code == 1);
    CHECK(bad_output.find("cannot write the memory map to /proc/no/such/dir/map.svg") != std::string::npos);
    demo->signal(SIGUSR1);
    REQUIRE(demo->wait_for(120s) == 0);
  }
}
