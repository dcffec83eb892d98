// Call stacks (ADR 0024): capture and naming in the process, their wire form, and the server's
// leak reports grouped by call site.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

import meshrt.core;
import meshrt.protocol;
import meshrt.server;
import meshrt.stacks;

using namespace meshrt;

namespace {

// Not inlined, so that each level is a frame of its own.
[[gnu::noinline]] std::size_t capture_at_depth(int depth, std::span<std::uintptr_t> out) {
  if (depth > 0) {
    const std::size_t count = capture_at_depth(depth - 1, out);
    asm volatile("" ::: "memory");  // no tail call: the frame stays
    return count;
  }
  return stacks::capture(out);
}

// Two calls of this are two captures from one call site inside it.
[[gnu::noinline]] std::size_t capture_from_one_site(std::span<std::uintptr_t> out) {
  const std::size_t count = capture_at_depth(20, out);
  asm volatile("" ::: "memory");
  return count;
}

[[gnu::always_inline]] inline std::size_t inlined_capture(std::span<std::uintptr_t> out) {
  return stacks::capture(out);
}

constexpr std::uint32_t inlined_call_line = __LINE__ + 3;  // the line of the inlined call below
[[gnu::noinline]] std::size_t capture_through_inlined_call(std::span<std::uintptr_t> out) {
  const std::size_t count =
      inlined_capture(out);
  asm volatile("" ::: "memory");
  return count;
}

protocol::Message round_trip(const std::vector<std::byte>& bytes) {
  auto frame = protocol::next_frame(bytes);
  REQUIRE(frame.has_value());
  REQUIRE(frame->has_value());
  auto message = protocol::decode(**frame);
  REQUIRE(message.has_value());
  return *message;
}

protocol::CallStack stack_at(std::uint32_t id, const std::string& function, std::uint32_t line) {
  return protocol::CallStack{.id = id,
                             .frames = {{.address = 0x10, .function = "meshrt::MeshBuffer::create", .file = "mesh.cpp"},
                                        {.address = 0x20, .function = function, .file = "test.cpp", .line = line}},
                             .call_site = 1};
}

}  // namespace

TEST_SUITE("call stacks") {
  TEST_CASE("a frame-pointer walk sees every level of a deep stack, the same each time from one call site") {
    std::array<std::uintptr_t, stacks::max_frames> first{};
    std::array<std::uintptr_t, stacks::max_frames> second{};
    const std::size_t depth_first = capture_from_one_site(first);
    const std::size_t depth_second = capture_from_one_site(second);
    CHECK(depth_first >= 22);
    CHECK(depth_first == depth_second);
    // The recursion's 21 frames and capture_from_one_site's are the same; the frames past them
    // return to this test's two calls, at two addresses.
    constexpr std::size_t same = 22;
    CHECK(std::equal(first.begin(), first.begin() + same, second.begin()));
    CHECK(stacks::hash_frames(std::span(first).first(same)) == stacks::hash_frames(std::span(second).first(same)));
    CHECK(first[same] != second[same]);
    CHECK(stacks::hash_frames(std::span(first).first(depth_first)) !=
          stacks::hash_frames(std::span(second).first(depth_second)));
    std::array<std::uintptr_t, 4> short_out{};
    CHECK(capture_at_depth(20, short_out) == 4);
  }

  TEST_CASE("a return address is named: demangled function, this file and a line") {
    std::array<std::uintptr_t, 8> frames{};
    REQUIRE(capture_at_depth(0, frames) >= 2);
    stacks::Symbolizer symbolizer;
    const std::vector<stacks::Frame> named = symbolizer.symbolize(frames[0]);
    REQUIRE(named.size() == 1);  // capture_at_depth is not inlined
    const stacks::Frame& innermost = named[0];
    CHECK(innermost.function.find("capture_at_depth") != std::string::npos);
    CHECK(innermost.file.find("call_stacks_test.cpp") != std::string::npos);
    CHECK(innermost.line > 0);
    CHECK(stacks::describe(innermost).find("call_stacks_test.cpp:") != std::string::npos);
    CHECK(symbolizer.symbolize(frames[0]) == named);  // cached, and the same
  }

  TEST_CASE("a call the optimizer inlined is named as its own frame, at the line it was called from") {
    std::array<std::uintptr_t, 8> frames{};
    const std::size_t count = capture_through_inlined_call(frames);
    REQUIRE(count >= 1);
    stacks::Symbolizer symbolizer;
    const std::vector<stacks::Frame> named = symbolizer.symbolize(frames[0]);
    // always_inline is inlined at every optimization level, -O0 too.
    REQUIRE(named.size() == 2);
    CHECK(named[0].function.find("inlined_capture") != std::string::npos);
    CHECK(named[0].file.find("call_stacks_test.cpp") != std::string::npos);
    CHECK(named[1].function.find("capture_through_inlined_call") != std::string::npos);
    CHECK(named[1].file.find("call_stacks_test.cpp") != std::string::npos);
    CHECK(named[1].line == inlined_call_line);
    CHECK(named[0].address == named[1].address);
  }

  TEST_CASE("the call site is the first frame outside meshrt and the libraries, unless an interpreted frame is there") {
    std::vector<stacks::Frame> frames{{.function = "meshrt::TrackingClient::process(...)"},
                                      {.function = "auto tl::detail::and_then_impl<int>(int&&)"},
                                      {.function = "decltype(std::forward<int>(fp)) tl::detail::invoke<int>(int&&)"},
                                      {.function = "meshrt::MeshBuffer::create(...)"},
                                      {.function = "(anonymous namespace)::run(int, char**)"},
                                      {.function = "main"}};
    CHECK(stacks::call_site(frames) == 4);
    frames.push_back({.function = "test_leaks", .file = "test_x.py", .line = 12, .interpreted = true});
    CHECK(stacks::call_site(frames) == 6);
    const std::vector<stacks::Frame> inside{{.function = "meshrt::a()"}, {.function = "std::b()"}};
    CHECK(stacks::call_site(inside) == 0);
  }

  TEST_CASE("interpreter frames given for a scope are this thread's while it lasts, innermost scope first") {
    CHECK(stacks::caller_frames() == nullptr);
    {
      const stacks::ScopedCallerFrames outer({{.function = "f", .file = "a.py", .line = 1, .interpreted = true}});
      {
        const stacks::ScopedCallerFrames inner({{.function = "g", .file = "a.py", .line = 2, .interpreted = true}});
        REQUIRE(stacks::caller_frames() == &inner);
        CHECK(inner.hash() != outer.hash());
      }
      CHECK(stacks::caller_frames() == &outer);
    }
    CHECK(stacks::caller_frames() == nullptr);
  }

  TEST_CASE("a CallStack round-trips, records with stacks carry the id and plain records none") {
    std::vector<std::byte> bytes;
    const protocol::CallStack stack = stack_at(7, "test_fn()", 42);
    protocol::encode(stack, bytes);
    CHECK(std::get<protocol::CallStack>(round_trip(bytes)) == stack);

    const protocol::AllocRecord alloc{.buffer = 5, .size = 64, .device_count = 2, .stack = 7};
    const protocol::FreeRecord free{.buffer = 5, .reason = 1, .device_count = 2};
    for (const auto format : {protocol::RecordFormat::plain, protocol::RecordFormat::with_stack}) {
      bytes.clear();
      protocol::encode_events(0, std::vector{protocol::EventRecord::of(alloc), protocol::EventRecord::of(free)}, bytes,
                              format);
      CHECK(bytes.size() == protocol::header_size + protocol::batch_prefix_size + 2 * protocol::size_of(format));
      const auto batch = std::get<protocol::EventBatch>(round_trip(bytes));
      REQUIRE(batch.records.size() == 2);
      CHECK(batch.records[0].alloc.stack == (format == protocol::RecordFormat::with_stack ? 7U : 0U));
      CHECK(batch.records[1].is_free);
      bytes.clear();
      protocol::encode_snapshot_chunk(std::vector{alloc}, bytes, format);
      const auto chunk = std::get<protocol::SnapshotChunk>(round_trip(bytes));
      REQUIRE(chunk.records.size() == 1);
      CHECK(chunk.records[0].alloc.stack == (format == protocol::RecordFormat::with_stack ? 7U : 0U));
    }
  }

  TEST_CASE("malformed CallStacks and stack records are refused with a reason") {
    const auto refusal = [](const std::vector<std::byte>& bytes) {
      auto frame = protocol::next_frame(bytes);
      REQUIRE(frame.has_value());
      REQUIRE(frame->has_value());
      auto message = protocol::decode(**frame);
      REQUIRE_FALSE(message.has_value());
      return message.error().message;
    };
    std::vector<std::byte> bytes;
    protocol::encode(stack_at(3, "f()", 1), bytes);
    bytes[protocol::header_size + 6] = std::byte{9};  // call site frame 9 of 2
    CHECK(refusal(bytes).find("call site frame 9 of 2 frames") != std::string::npos);
    bytes[protocol::header_size + 6] = std::byte{0};
    bytes[protocol::header_size] = std::byte{0};  // id 0
    CHECK(refusal(bytes).find("stack id 0") != std::string::npos);

    bytes.clear();
    protocol::encode_events(0, std::vector{protocol::EventRecord::of(protocol::FreeRecord{.buffer = 1})}, bytes,
                            protocol::RecordFormat::with_stack);
    bytes.back() = std::byte{1};  // a free's stack id
    CHECK(refusal(bytes).find("a free carries no call stack") != std::string::npos);
    bytes.clear();
    protocol::encode_events(0, std::vector{protocol::EventRecord::of(protocol::AllocRecord{.buffer = 1})}, bytes);
    bytes[protocol::header_size + 12] = std::byte{2};  // record format 2
    CHECK(refusal(bytes).find("unknown record format 2") != std::string::npos);
  }

  TEST_CASE("an OutOfMemory frame round-trips, long messages are cut, hostile ones refused with a reason") {
    const protocol::OutOfMemory failure{.device = 3,
                                        .type = BufferType::l1,
                                        .requested = 1 << 20,
                                        .largest_free_block = 4096,
                                        .message = "l1 on wormhole_b0: out of memory"};
    std::vector<std::byte> bytes;
    protocol::encode(failure, bytes);
    CHECK(std::get<protocol::OutOfMemory>(round_trip(bytes)) == failure);
    protocol::OutOfMemory long_one = failure;
    long_one.message.assign(10'000, 'x');
    bytes.clear();
    protocol::encode(long_one, bytes);
    CHECK(std::get<protocol::OutOfMemory>(round_trip(bytes)).message.size() == protocol::max_out_of_memory_message);
    bytes.clear();
    protocol::encode(failure, bytes);
    bytes[protocol::header_size + 4] = std::byte{9};  // buffer type 9
    auto frame = protocol::next_frame(bytes);
    REQUIRE(frame.has_value());
    REQUIRE(frame->has_value());
    auto refused = protocol::decode(**frame);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message.find("unknown buffer type 9") != std::string::npos);
  }

  TEST_CASE("a session's leak report groups its buffers by call site, largest first, and is kept after it ends") {
    server::Ledger ledger;
    ledger.set_leak_report_limit(2);
    const server::SessionId a = ledger.open_session({.pid = 10, .name = "a"});
    // Stacks 1 and 2 reach one call site by two paths; stack 3 is another site.
    CHECK(ledger.add_call_stack(a, stack_at(1, "run()", 5), 16));
    protocol::CallStack other_path = stack_at(2, "run()", 5);
    other_path.frames[0].function = "meshrt::Tensor::allocate";
    CHECK(ledger.add_call_stack(a, other_path, 16));
    CHECK(ledger.add_call_stack(a, stack_at(3, "small()", 9), 16));
    CHECK(ledger.apply_alloc(a, {.buffer = 1, .mesh_buffer = 1, .size = 100, .device = 0, .device_count = 4, .stack = 1}));
    CHECK(ledger.apply_alloc(a, {.buffer = 10, .mesh_buffer = 2, .size = 50, .device = 2, .stack = 2}));
    CHECK(ledger.apply_alloc(a, {.buffer = 20, .mesh_buffer = 3, .size = 1000, .device = 1, .stack = 3}));
    CHECK(ledger.apply_alloc(a, {.buffer = 30, .mesh_buffer = 4, .size = 1, .device = 0}));  // no stack
    (void)ledger.apply_free(a, {.buffer = 20, .device_count = 1});
    ledger.name_mesh_buffer(a, 1, "weights");
    const server::Reclaim reclaim = ledger.close_session(a, server::SessionEnd::disconnected, 1'000);
    REQUIRE(reclaim.sites.size() == 2);
    CHECK(reclaim.sites[0].call_site() == "run() (test.cpp:5)");
    CHECK(reclaim.sites[0].bytes == 450);
    CHECK(reclaim.sites[0].buffers == 5);
    CHECK(reclaim.sites[0].stacks == 2);
    CHECK(reclaim.sites[0].devices == std::vector<std::uint32_t>{0, 1, 2, 3});
    CHECK(reclaim.sites[1].call_site().empty());  // the buffer without a stack
    CHECK(reclaim.sites[1].bytes == 1);
    const auto reports = ledger.leak_reports();
    REQUIRE(reports.size() == 1);
    CHECK(reports[0].how == server::SessionEnd::disconnected);
    CHECK(reports[0].ended_ns == 1'000);
    CHECK(reports[0].reclaim.identity.pid == 10);
    CHECK(ledger.leak_reports(11).empty());

    // Only the last two sessions that left something are kept; one that left nothing makes none.
    for (std::uint32_t pid = 11; pid <= 13; ++pid) {
      const server::SessionId s = ledger.open_session({.pid = pid});
      CHECK(ledger.apply_alloc(s, {.buffer = 1, .size = 8}));
      (void)ledger.close_session(s, server::SessionEnd::goodbye);
    }
    (void)ledger.close_session(ledger.open_session({.pid = 14}), server::SessionEnd::goodbye);
    const auto kept = ledger.leak_reports();
    REQUIRE(kept.size() == 2);
    CHECK(kept[0].reclaim.identity.pid == 12);
    CHECK(kept[1].reclaim.identity.pid == 13);
  }

  TEST_CASE("the largest holdings of a device and type span every session, sum a mesh buffer's groups and name call sites") {
    server::Ledger ledger;
    const server::SessionId a = ledger.open_session({.pid = 10, .name = "trainer"});
    const server::SessionId b = ledger.open_session({.pid = 20, .name = "server"});
    CHECK(ledger.add_call_stack(a, stack_at(1, "load_weights()", 7), 16));
    // Mesh buffer 1 of a: two records on device 2 (200 + 300), one of them also on devices 0..3.
    CHECK(ledger.apply_alloc(a, {.buffer = 1, .mesh_buffer = 1, .size = 200, .device = 0, .device_count = 4, .stack = 1}));
    CHECK(ledger.apply_alloc(a, {.buffer = 5, .mesh_buffer = 1, .size = 300, .device = 2, .stack = 1}));
    ledger.name_mesh_buffer(a, 1, "weights");
    // Another process's buffer on device 2, larger than any one record of a's but not their sum.
    CHECK(ledger.apply_alloc(b, {.buffer = 1, .mesh_buffer = 9, .size = 400, .device = 2}));
    // Not counted: L1 on device 2, DRAM on device 3 only, and a freed buffer on device 2.
    CHECK(ledger.apply_alloc(b, {.buffer = 2, .mesh_buffer = 10, .size = 9000, .device = 2, .type = BufferType::l1}));
    CHECK(ledger.apply_alloc(b, {.buffer = 3, .mesh_buffer = 11, .size = 9000, .device = 3}));
    CHECK(ledger.apply_alloc(b, {.buffer = 4, .mesh_buffer = 12, .size = 9000, .device = 1, .device_count = 2}));
    (void)ledger.apply_free(b, {.buffer = 5, .device_count = 1});  // its device 2 buffer
    CHECK(ledger.apply_alloc(a, {.buffer = 6, .mesh_buffer = 2, .size = 10, .device = 2}));

    const auto holdings = ledger.largest_holdings(2, BufferType::dram, 5);
    REQUIRE(holdings.size() == 3);
    CHECK(holdings[0].pid == 10);
    CHECK(holdings[0].process == "trainer");
    CHECK(holdings[0].mesh_buffer == 1);
    CHECK(holdings[0].mesh_buffer_name == "weights");
    CHECK(holdings[0].bytes == 500);
    CHECK(holdings[0].call_site == "load_weights() (test.cpp:7)");
    CHECK(holdings[1].pid == 20);
    CHECK(holdings[1].mesh_buffer == 9);
    CHECK(holdings[1].bytes == 400);
    CHECK(holdings[1].call_site.empty());  // b captured no stacks
    CHECK(holdings[2].mesh_buffer == 2);
    CHECK(holdings[2].bytes == 10);
    const auto largest = ledger.largest_holdings(2, BufferType::dram, 1);
    REQUIRE(largest.size() == 1);
    CHECK(largest[0].mesh_buffer == 1);
    const auto other_device = ledger.largest_holdings(1, BufferType::dram, 5);  // mesh buffer 12 still holds device 1
    REQUIRE(other_device.size() == 2);
    CHECK(other_device[0].mesh_buffer == 12);
    CHECK(other_device[0].bytes == 9000);
    CHECK(ledger.largest_holdings(2, BufferType::dram, 0).empty());
    // Equal shares: the lower pid first, then the older session, then the lower mesh buffer id.
    // Groups without a mesh buffer (id 0) stand alone, never summed.
    server::Ledger equal;
    const server::SessionId late = equal.open_session({.pid = 30});
    const server::SessionId early_pid = equal.open_session({.pid = 5});
    const server::SessionId same_pid = equal.open_session({.pid = 30});
    CHECK(equal.apply_alloc(late, {.buffer = 1, .mesh_buffer = 7, .size = 64}));
    CHECK(equal.apply_alloc(same_pid, {.buffer = 1, .mesh_buffer = 7, .size = 64}));
    CHECK(equal.apply_alloc(same_pid, {.buffer = 2, .mesh_buffer = 3, .size = 64}));
    CHECK(equal.apply_alloc(early_pid, {.buffer = 1, .mesh_buffer = 9, .size = 64}));
    CHECK(equal.apply_alloc(early_pid, {.buffer = 2, .mesh_buffer = 0, .size = 40}));
    CHECK(equal.apply_alloc(early_pid, {.buffer = 3, .mesh_buffer = 0, .size = 30}));
    const auto ties = equal.largest_holdings(0, BufferType::dram, 8);
    REQUIRE(ties.size() == 6);
    CHECK(ties[0].pid == 5);
    CHECK(ties[0].mesh_buffer == 9);
    CHECK(ties[1].pid == 30);
    CHECK(ties[1].mesh_buffer == 7);  // session `late`: opened first
    CHECK(ties[2].pid == 30);
    CHECK(ties[2].mesh_buffer == 3);  // session `same_pid`, lower id first
    CHECK(ties[3].mesh_buffer == 7);
    CHECK(ties[4].mesh_buffer == 0);
    CHECK(ties[4].bytes == 40);
    CHECK(ties[5].mesh_buffer == 0);
    CHECK(ties[5].bytes == 30);
    CHECK(ledger.largest_holdings(40, BufferType::dram, 5).empty());
    CHECK(ledger.largest_holdings(2, BufferType::l1, 5).size() == 1);
  }

  TEST_CASE("a session's stacks are bounded: one over the limit is counted, one told again replaces its own") {
    server::Ledger ledger;
    const server::SessionId a = ledger.open_session({.pid = 10});
    CHECK(ledger.add_call_stack(a, stack_at(1, "f()", 1), 2));
    CHECK(ledger.add_call_stack(a, stack_at(2, "g()", 2), 2));
    CHECK_FALSE(ledger.add_call_stack(a, stack_at(3, "h()", 3), 2));
    CHECK(ledger.counters().call_stacks_dropped == 1);
    CHECK(ledger.add_call_stack(a, stack_at(1, "f2()", 1), 2));
    CHECK(ledger.call_stack_count(a) == 2);
    CHECK(ledger.apply_alloc(a, {.buffer = 1, .size = 8, .stack = 1}));
    CHECK(ledger.apply_alloc(a, {.buffer = 2, .size = 8, .stack = 3}));  // a stack never kept
    const auto buffers = ledger.live_buffers();
    REQUIRE(buffers.size() == 2);
    CHECK(buffers[0].call_site == "f2() (test.cpp:1)");
    CHECK(buffers[1].stack == 3);
    CHECK(buffers[1].call_site.empty());
  }
}
