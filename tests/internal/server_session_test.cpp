// White-box tests of the server's session handling, with no socket anywhere: frames go in as
// bytes, the Ledger and the replies are checked. Session is an internal partition of
// meshrt.server, so this file is an implementation unit of that module, built with a private
// copy of it (tests/CMakeLists.txt).
module;
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <sys/types.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;
import :session;
import :peer;
import :admission;
import :activity_log;

namespace meshrt::server {
namespace {

using namespace std::chrono_literals;

constexpr std::uint32_t peer_pid = 4242;

// One server's shared state without the server: a Ledger, its counters and a log to read.
struct Harness {
  ServerConfig config{.socket_path = "/nowhere/alloc.sock"};
  Ledger ledger;
  ConnectionCounters counters;
  std::vector<std::string> lines;
  SessionContext context{ledger, counters, config, [this](std::string_view line) { lines.emplace_back(line); },
                         [] { return ServerInfo{.pid = 1, .socket = "/nowhere/alloc.sock"}; }};

  [[nodiscard]] bool logged(std::string_view text) const {
    for (const std::string& line : lines) {
      if (line.find(text) != std::string::npos) return true;
    }
    return false;
  }
};

Peer peer() { return Peer{.pid = peer_pid, .uid = 1000, .start_time = 77, .name = "trainer"}; }

std::vector<std::byte> hello(protocol::ClientRole role = protocol::ClientRole::tracker,
                             std::uint32_t claimed_pid = peer_pid) {
  std::vector<std::byte> out;
  protocol::encode(protocol::Hello{.role = role, .claimed_pid = claimed_pid, .process_name = "trainer"}, out);
  return out;
}

protocol::AllocRecord alloc(std::uint64_t buffer, std::uint16_t devices, std::uint64_t size = 1 << 20) {
  return protocol::AllocRecord{.buffer = buffer, .mesh_buffer = 9, .address = 4096, .size = size, .time_ns = 1,
                               .device = 0, .type = BufferType::dram, .hooked = false, .device_count = devices};
}

std::vector<std::byte> events(std::uint64_t first_sequence, const std::vector<protocol::EventRecord>& records) {
  std::vector<std::byte> out;
  protocol::encode_events(first_sequence, records, out);
  return out;
}

std::vector<std::byte> query(protocol::QueryKind kind) {
  std::vector<std::byte> out;
  protocol::encode(protocol::Query{kind, 0}, out);
  return out;
}

std::vector<std::byte> goodbye() {
  std::vector<std::byte> out;
  protocol::encode(protocol::Goodbye{true}, out);
  return out;
}

// What the session has sent so far, decoded: replies joined into documents, and errors.
struct Sent {
  std::vector<std::string> documents;
  std::vector<protocol::ErrorMessage> errors;
};

// Takes everything the session has to send, as a reader that keeps up would.
Sent drain(Session& session) {
  std::vector<std::byte> bytes;
  for (int rounds = 0; rounds < 100000 && !session.unsent().empty(); ++rounds) {
    const auto unsent = session.unsent();
    bytes.insert(bytes.end(), unsent.begin(), unsent.end());
    session.sent(unsent.size());
    session.after_write();
  }
  REQUIRE(session.unsent().empty());
  Sent sent;
  std::string document;
  std::span<const std::byte> input(bytes);
  while (!input.empty()) {
    auto frame = protocol::next_frame(input);
    REQUIRE(frame.has_value());
    REQUIRE(frame->has_value());
    auto message = protocol::decode(**frame);
    REQUIRE(message.has_value());
    if (const auto* reply = std::get_if<protocol::Reply>(&*message)) {
      document += reply->json;
      if (reply->last) sent.documents.push_back(std::exchange(document, {}));
    } else if (const auto* error = std::get_if<protocol::ErrorMessage>(&*message)) {
      sent.errors.push_back(*error);
    }
    input = input.subspan((*frame)->frame_size);
  }
  CHECK(document.empty());  // no reply left half sent
  return sent;
}

TEST_SUITE("server session, without sockets") {
  TEST_CASE("a tracker's events reach the ledger, and a crash reclaims what it held") {
    Harness h;
    Session session(h.context, peer());
    session.receive(hello());
    REQUIRE(session.greeted());
    CHECK(h.counters.sessions_opened == 1);
    CHECK(h.logged("pid 4242 (trainer): connected (uid 1000"));
    session.receive(events(0, {protocol::EventRecord::of(alloc(100, 8)), protocol::EventRecord::of(alloc(200, 8))}));
    CHECK(h.ledger.active_allocations() == 16);
    CHECK(h.ledger.live_allocations(session.id()) == 16);
    session.receive(events(2, {protocol::EventRecord::of(protocol::FreeRecord{.buffer = 100, .device_count = 8})}));
    CHECK(h.ledger.active_allocations() == 8);
    CHECK(drain(session).documents.empty());  // a tracker is never answered
    session.end();  // the connection went without Goodbye
    CHECK(h.ledger.active_allocations() == 0);
    CHECK(h.ledger.counters().reclaimed_allocations == 8);
    CHECK(h.logged("disconnected without Goodbye (crashed?): reclaimed 8 leaked buffers"));
  }

  TEST_CASE("out of memory: the log names the largest holders, and the ledger is scanned at most once a second over all sessions") {
    Harness h;
    const auto out_of_memory = [] {
      std::vector<std::byte> out;
      protocol::encode(protocol::OutOfMemory{.device = 0, .type = BufferType::dram, .requested = 1 << 30,
                                             .largest_free_block = 4096, .message = "no room"},
                       out);
      return out;
    };
    const auto holders_logged = [&] {
      return std::ranges::count_if(h.lines, [](const std::string& line) { return line.find("largest holders of device 0 dram") != std::string::npos; });
    };
    Session first(h.context, peer());
    first.receive(hello());
    first.receive(events(0, {protocol::EventRecord::of(alloc(100, 2))}));
    first.receive(out_of_memory());
    CHECK(h.logged("pid 4242 (trainer): out of memory on device 0 dram: no room; largest holders of device 0 dram: pid 4242 (trainer) mesh buffer 9 1048576 bytes"));
    CHECK(holders_logged() == 1);
    // Another session's report within the second: logged, without a second scan.
    Session second(h.context, Peer{.pid = 4343, .uid = 1000, .start_time = 78, .name = "other"});
    second.receive(hello(protocol::ClientRole::tracker, 4343));
    second.receive(out_of_memory());
    CHECK(h.logged("pid 4343 (other): out of memory on device 0 dram: no room"));
    CHECK(holders_logged() == 1);
    // A second later the next report scans again.
    REQUIRE(h.context.holdings_scanned.has_value());
    h.context.holdings_scanned = h.context.holdings_scanned.value() - 1s;
    second.receive(out_of_memory());
    CHECK(holders_logged() == 2);
  }

  TEST_CASE("frames split anywhere are applied once whole, and a half frame at the end is a truncated session") {
    Harness h;
    Session session(h.context, peer());
    std::vector<std::byte> stream = hello();
    const auto batch = events(0, {protocol::EventRecord::of(alloc(1, 4))});
    stream.insert(stream.end(), batch.begin(), batch.end());
    for (const std::byte byte : stream) {  // one byte per read, through the zero-copy door
      const std::span<std::byte> space = session.input_space(64);
      space[0] = byte;
      session.received(1);
    }
    CHECK(h.ledger.active_allocations() == 4);
    CHECK(session.partial_frame_bytes() == 0);
    const auto next = events(1, {protocol::EventRecord::of(alloc(10, 1))});
    session.receive(std::span(next).first(next.size() - 5));
    CHECK(h.ledger.active_allocations() == 4);  // not applied: incomplete
    session.peer_closed();
    CHECK(h.counters.truncated_sessions == 1);
    CHECK(h.logged("closed the connection in the middle of a frame"));
    session.end();
  }

  TEST_CASE("ordering rules: Hello first, a monitor only queries, nothing after Goodbye") {
    Harness h;
    SUBCASE("events before Hello") {
      Session session(h.context, peer());
      session.receive(events(0, {protocol::EventRecord::of(alloc(1, 1))}));
      CHECK(session.closing());
      const Sent sent = drain(session);
      REQUIRE(sent.errors.size() == 1);
      CHECK(sent.errors[0].code == ErrorCode::protocol_error);
      CHECK(sent.errors[0].message.find("the first message must be Hello") != std::string::npos);
      CHECK(h.counters.malformed_messages == 1);
      CHECK(h.ledger.active_allocations() == 0);
      session.end();
    }
    SUBCASE("a monitor that sends events") {
      Session session(h.context, peer());
      session.receive(hello(protocol::ClientRole::monitor));
      CHECK(h.counters.monitors == 1);
      session.receive(events(0, {protocol::EventRecord::of(alloc(1, 1))}));
      const Sent sent = drain(session);
      REQUIRE(sent.errors.size() == 1);
      CHECK(sent.errors[0].message.find("a monitor may only query") != std::string::npos);
      CHECK(h.ledger.active_allocations() == 0);
      session.end();
    }
    SUBCASE("events after Goodbye") {
      Session session(h.context, peer());
      session.receive(hello());
      session.receive(goodbye());
      session.receive(events(0, {protocol::EventRecord::of(alloc(1, 1))}));
      const Sent sent = drain(session);
      REQUIRE(sent.errors.size() == 1);
      CHECK(sent.errors[0].message.find("already said Goodbye") != std::string::npos);
      session.end();
      CHECK(h.ledger.active_allocations() == 0);
    }
    SUBCASE("a pid the kernel does not confirm") {
      Session session(h.context, peer());
      session.receive(hello(protocol::ClientRole::tracker, peer_pid + 1));
      const Sent sent = drain(session);
      REQUIRE(sent.errors.size() == 1);
      CHECK(sent.errors[0].code == ErrorCode::permission_denied);
      CHECK(h.counters.rejected_sessions == 1);
      CHECK_FALSE(session.greeted());
      session.end();
    }
  }

  TEST_CASE("a Goodbye with buffers still live is a leak at exit, logged with its figures") {
    Harness h;
    Session session(h.context, peer());
    session.receive(hello());
    session.receive(events(0, {protocol::EventRecord::of(alloc(1, 2, 4096))}));
    session.receive(goodbye());
    session.end();
    CHECK(h.logged("exited with 2 live buffers (8192 bytes), leaked"));
    CHECK(h.ledger.active_allocations() == 0);
  }

  TEST_CASE("limits: the live-allocation cap and the message rate close the session with the flag to raise") {
    Harness h;
    SUBCASE("live allocations") {
      h.config.max_live_per_session = 4;
      Session session(h.context, peer());
      session.receive(hello());
      session.receive(events(0, {protocol::EventRecord::of(alloc(1, 8))}));
      const Sent sent = drain(session);
      REQUIRE(sent.errors.size() == 1);
      CHECK(sent.errors[0].code == ErrorCode::limit_exceeded);
      CHECK(sent.errors[0].message.find("--max-live-per-process") != std::string::npos);
      CHECK(h.ledger.active_allocations() == 0);
      session.end();
    }
    SUBCASE("message rate") {
      h.config.max_messages_per_second = 2;
      Session session(h.context, peer());
      session.receive(hello());
      session.receive(events(0, {protocol::EventRecord::of(alloc(1, 1))}));
      session.receive(events(1, {protocol::EventRecord::of(alloc(2, 1))}));  // the third frame in a second
      const Sent sent = drain(session);
      REQUIRE(sent.errors.size() == 1);
      CHECK(sent.errors[0].message.find("--max-messages-per-second") != std::string::npos);
      CHECK(h.ledger.active_allocations() == 1);
      session.end();
    }
  }

  TEST_CASE("a monitor's summary is JSON from the ledger") {
    Harness h;
    Session tracker(h.context, peer());
    tracker.receive(hello());
    tracker.receive(events(0, {protocol::EventRecord::of(alloc(1, 8))}));
    Session monitor(h.context, Peer{.pid = 7, .uid = 1000, .name = "smi"});
    monitor.receive(hello(protocol::ClientRole::monitor, 7));
    monitor.receive(query(protocol::QueryKind::summary));
    const Sent sent = drain(monitor);
    REQUIRE(sent.documents.size() == 1);
    CHECK(sent.documents[0].find("\"active_allocations\":8") != std::string::npos);
    monitor.end();
    tracker.end();
  }

  TEST_CASE("a buffer list goes out a window at a time, and what was asked after it waits its turn") {
    Harness h;
    Session tracker(h.context, peer());
    tracker.receive(hello());
    std::vector<protocol::EventRecord> records;
    constexpr std::uint64_t buffers = 20000;  // about 4 MB of JSON: several windows
    for (std::uint64_t i = 0; i < buffers; ++i) records.push_back(protocol::EventRecord::of(alloc(1 + i, 1)));
    tracker.receive(events(0, records));
    REQUIRE(h.ledger.active_allocations() == buffers);

    Session monitor(h.context, Peer{.pid = 7, .uid = 1000, .name = "smi"});
    monitor.receive(hello(protocol::ClientRole::monitor, 7));
    std::vector<std::byte> asks = query(protocol::QueryKind::buffers);
    const auto summary = query(protocol::QueryKind::summary);
    asks.insert(asks.end(), summary.begin(), summary.end());
    monitor.receive(asks);
    CHECK_FALSE(monitor.wants_input());                          // the list is going out
    CHECK(monitor.unsent().size() <= (std::size_t{1} << 20U) + protocol::max_payload_size);  // one window
    const Sent sent = drain(monitor);
    REQUIRE(sent.documents.size() == 2);                         // the list, then the summary
    CHECK(sent.documents[0].size() > (std::size_t{2} << 20U));
    const auto listed = nlohmann::json::parse(sent.documents[0]);
    CHECK(listed["buffers"].size() == buffers);
    CHECK(sent.documents[1].find("\"active_allocations\":20000") != std::string::npos);
    CHECK(monitor.wants_input());
    monitor.end();
    tracker.end();
  }

  TEST_CASE("time limits: a silent connection and a stalled list expire") {
    Harness h;
    const auto start = Session::Clock::now();
    Session silent(h.context, peer(), start);
    CHECK_FALSE(silent.expired(start + h.config.hello_timeout / 2));
    CHECK(silent.expired(start + h.config.hello_timeout + 1ms));
    CHECK(h.counters.timed_out_sessions == 1);
    silent.end();

    Session tracker(h.context, peer());
    tracker.receive(hello());
    std::vector<protocol::EventRecord> records;
    for (std::uint64_t i = 0; i < 20000; ++i) records.push_back(protocol::EventRecord::of(alloc(1 + i, 1)));
    tracker.receive(events(0, records));
    CHECK_FALSE(tracker.expired(Session::Clock::now() + h.config.hello_timeout * 2));  // it said Hello
    Session monitor(h.context, Peer{.pid = 7, .uid = 1000, .name = "smi"});
    monitor.receive(hello(protocol::ClientRole::monitor, 7));
    monitor.receive(query(protocol::QueryKind::buffers));
    REQUIRE_FALSE(monitor.wants_input());  // a list is going out, and nobody reads it
    const auto now = Session::Clock::now();
    CHECK_FALSE(monitor.expired(now + h.config.reply_stall_timeout / 2));
    CHECK(monitor.expired(now + h.config.reply_stall_timeout + 1ms));
    CHECK(h.counters.dropped_slow_readers == 1);
    CHECK(h.logged("stopped reading its buffer list"));
    monitor.end();
    tracker.end();
  }
}

TEST_SUITE("server admission") {
  TEST_CASE("per-process and total session caps refuse with the flag to raise, and leave() frees a place") {
    ServerConfig config{.max_sessions = 3, .max_sessions_per_process = 2};
    Admission admission(config, std::nullopt);
    Peer same = peer();
    same.uid = static_cast<std::uint32_t>(::getuid());
    CHECK_FALSE(admission.admit(same, 0).has_value());
    CHECK_FALSE(admission.admit(same, 1).has_value());
    const auto third = admission.admit(same, 2);
    REQUIRE(third.has_value());
    CHECK(third->message.find("--max-sessions-per-process") != std::string::npos);
    admission.leave(same.pid);
    CHECK_FALSE(admission.admit(same, 1).has_value());
    Peer other = same;
    other.pid = same.pid + 1;
    const auto full = admission.admit(other, 3);
    REQUIRE(full.has_value());
    CHECK(full->code == ErrorCode::limit_exceeded);
    CHECK(full->message.find("--max-sessions)") != std::string::npos);
  }

  TEST_CASE("another user is refused unless the server serves a group") {
    ServerConfig config;
    Peer stranger = peer();
    stranger.uid = static_cast<std::uint32_t>(::getuid()) + 1;
    if (::getuid() == 0) stranger.uid = 4321;
    const auto refused = Admission(config, std::nullopt).admit(stranger, 0);
    REQUIRE(refused.has_value());
    CHECK(refused->code == ErrorCode::permission_denied);
    CHECK_FALSE(Admission(config, gid_t{1234}).admit(stranger, 0).has_value());
  }

  TEST_CASE("the message rate allows a second's burst, then refills with time") {
    const auto start = MessageRate::Clock::now();
    MessageRate rate(3, start);
    CHECK(rate.take(start));
    CHECK(rate.take(start));
    CHECK(rate.take(start));
    CHECK_FALSE(rate.take(start));
    CHECK(rate.take(start + 400ms));  // 1.2 tokens back
    CHECK_FALSE(rate.take(start + 400ms));
  }
}

TEST_SUITE("server activity log and names") {
  TEST_CASE("devices in a row with the same figures share one line") {
    ActivityLog log;
    constexpr auto buffer = AllocationCategory::buffer;
    for (std::uint32_t device = 0; device < 8; ++device) log.allocated(buffer, device, 1024);
    log.allocated(buffer, 9, 1024);
    log.freed(buffer, 0, 1024);
    const auto lines = log.take_lines("pid 1 (x)");
    REQUIRE(lines.size() == 3);
    CHECK(lines[0] == "pid 1 (x): Allocated 1 buffers on Devices 0-7 (1024 bytes on each)");
    CHECK(lines[1] == "pid 1 (x): Allocated 1 buffers on Device 9 (1024 bytes)");
    CHECK(lines[2] == "pid 1 (x): Freed 1 buffers on Device 0 (1024 bytes)");
    CHECK(log.take_lines("pid 1 (x)").empty());
  }

  TEST_CASE("each category has lines of its own: a user's buffers read apart from the runtime's") {
    ActivityLog log;
    for (std::uint32_t device = 0; device < 4; ++device) {
      log.allocated(AllocationCategory::system, device, 4096);
      log.allocated(AllocationCategory::buffer, device, 1024);
      log.allocated(AllocationCategory::buffer, device, 1024);
    }
    log.allocated(AllocationCategory::program, 0, 512);
    log.freed(AllocationCategory::circular_buffer, 3, 2048);
    const auto lines = log.take_lines("pid 1 (x)");
    REQUIRE(lines.size() == 4);
    CHECK(lines[0] == "pid 1 (x): Allocated 2 buffers on Devices 0-3 (2048 bytes on each)");
    CHECK(lines[1] == "pid 1 (x): Allocated 1 system buffers on Devices 0-3 (4096 bytes on each)");
    CHECK(lines[2] == "pid 1 (x): Allocated 1 program binaries on Device 0 (512 bytes)");
    CHECK(lines[3] == "pid 1 (x): Freed 1 circular buffers on Device 3 (2048 bytes)");
  }

  TEST_CASE("printable keeps valid UTF-8 and replaces control characters and broken sequences") {
    CHECK(printable("trainer") == "trainer");
    CHECK(printable("gr\xC3\xBC\xC3\x9F") == "gr\xC3\xBC\xC3\x9F");
    CHECK(printable("a\nb\x7F") == "a?b?");
    CHECK(printable("cut\xE2\x82") == "cut??");
    CHECK(printable("\xED\xA0\x80") == "???");  // a surrogate
  }
}

}  // namespace
}  // namespace meshrt::server
