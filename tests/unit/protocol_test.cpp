// The wire format: every message round-trips; every malformed frame is an Error, never UB.
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

using namespace meshrt;
using namespace meshrt::protocol;

namespace {

Message round_trip(const std::vector<std::byte>& bytes) {
  auto frame = next_frame(bytes);
  REQUIRE(frame.has_value());
  REQUIRE(frame->has_value());
  CHECK((*frame)->frame_size == bytes.size());
  auto message = decode(**frame);
  REQUIRE(message.has_value());
  return *message;
}

std::string decode_error(const std::vector<std::byte>& bytes) {
  auto frame = next_frame(bytes);
  if (!frame) return frame.error().message;
  REQUIRE(frame->has_value());
  auto message = decode(**frame);
  REQUIRE_FALSE(message.has_value());
  CHECK(message.error().code == ErrorCode::protocol_error);
  return message.error().message;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const AllocRecord sample_alloc{.buffer = 0x1122334455667788ULL,
                               .mesh_buffer = 7,
                               .address = 0xABCDEF,
                               .size = 104857600,
                               .time_ns = -5,
                               .device = 63,
                               .type = BufferType::l1_small,
                               .hooked = true};

}  // namespace

TEST_SUITE("protocol") {
  TEST_CASE("every message round-trips") {
    std::vector<std::byte> bytes;
    encode(Hello{.protocol_version = version, .role = ClientRole::monitor, .claimed_pid = 4242, .process_name = "demo"},
           bytes);
    const auto hello = std::get<Hello>(round_trip(bytes));
    CHECK(hello.role == ClientRole::monitor);
    CHECK(hello.claimed_pid == 4242);
    CHECK(hello.process_name == "demo");

    bytes.clear();
    const FreeRecord sample_free{.buffer = 9, .time_ns = 123, .reason = 4, .device_count = 8};
    encode_events(17, std::vector{EventRecord::of(sample_alloc), EventRecord::of(sample_free),
                                  EventRecord::of(AllocRecord{.buffer = 2})},
                  bytes);
    const auto events = std::get<EventBatch>(round_trip(bytes));
    CHECK(events.first_sequence == 17);
    REQUIRE(events.records.size() == 3);
    CHECK_FALSE(events.records[0].is_free);
    CHECK(events.records[0].alloc == sample_alloc);
    CHECK(events.records[1].is_free);
    CHECK(events.records[1].free == sample_free);
    CHECK(events.records[2].alloc.buffer == 2);

    bytes.clear();
    encode(DeviceInfo{{{3, {1, 2, 3, 4}, {12, 64, 64, 12}, {0, 0x19000, 0x150000, 0x3e000000}}}}, bytes);
    CHECK(bytes.size() == header_size + 4 + device_totals_size);
    const DeviceTotals device = std::get<DeviceInfo>(round_trip(bytes)).devices[0];
    CHECK(device.device == 3);
    CHECK(device.total_bytes[3] == 4);
    CHECK(device.bank_count == std::array<std::uint32_t, 4>{12, 64, 64, 12});
    CHECK(device.base_address[1] == 0x19000);
    CHECK(device.base_address[3] == 0x3e000000);

    bytes.clear();
    encode(MeshBufferName{99, "kv-cache"}, bytes);
    CHECK(std::get<MeshBufferName>(round_trip(bytes)).name == "kv-cache");

    bytes.clear();
    encode(SnapshotBegin{}, bytes);
    encode_snapshot_chunk(std::vector{sample_alloc}, bytes);
    encode(SnapshotEnd{100, 1}, bytes);
    auto first = next_frame(bytes).value().value();
    CHECK(std::holds_alternative<SnapshotBegin>(decode(first).value()));
    std::span<const std::byte> rest = std::span(bytes).subspan(first.frame_size);
    auto second = next_frame(rest).value().value();
    CHECK(std::get<SnapshotChunk>(decode(second).value()).records[0].alloc == sample_alloc);
    rest = rest.subspan(second.frame_size);
    CHECK(std::get<SnapshotEnd>(decode(next_frame(rest).value().value()).value()).next_sequence == 100);

    bytes.clear();
    encode(Query{QueryKind::buffers, 77}, bytes);
    CHECK(std::get<Query>(round_trip(bytes)).pid == 77);
    bytes.clear();
    encode(Reply{false, R"({"a":1})"}, bytes);
    CHECK_FALSE(std::get<Reply>(round_trip(bytes)).last);
    bytes.clear();
    encode(ErrorMessage{ErrorCode::limit_exceeded, "too many"}, bytes);
    CHECK(std::get<ErrorMessage>(round_trip(bytes)).message == "too many");
    bytes.clear();
    encode(Goodbye{}, bytes);
    CHECK(std::get<Goodbye>(round_trip(bytes)).complete);
    bytes.clear();
    encode(Goodbye{.complete = false}, bytes);
    CHECK_FALSE(std::get<Goodbye>(round_trip(bytes)).complete);
  }

  TEST_CASE("an Alloc's category rides bits 2-3 of its flags, and a Free carries none") {
    const auto record_byte = header_size + batch_prefix_size;
    for (const AllocationCategory category : all_allocation_categories) {
      CAPTURE(to_string(category));
      AllocRecord alloc = sample_alloc;
      alloc.category = category;
      std::vector<std::byte> bytes;
      encode_events(0, std::vector{EventRecord::of(alloc)}, bytes);
      CHECK(std::to_integer<unsigned>(bytes[record_byte + 45]) == (1U | (index_of(category) << 2U)));  // hooked too
      const auto events = std::get<EventBatch>(round_trip(bytes));
      REQUIRE(events.records.size() == 1);
      CHECK(events.records[0].alloc == alloc);
    }
    std::vector<std::byte> bytes;
    encode_events(0, std::vector{EventRecord::of(FreeRecord{.buffer = 1, .reason = 1})}, bytes);
    CHECK(std::to_integer<unsigned>(bytes[record_byte + 45]) == 2U);
    bytes[record_byte + 45] = std::byte{2U | (1U << 2U)};  // a free that claims a category
    CHECK(contains(decode_error(bytes), "a free carries no category"));
  }

  TEST_CASE("integers are little-endian on the wire with the documented sizes") {
    std::vector<std::byte> bytes;
    encode_events(1, std::vector{EventRecord::of(sample_alloc)}, bytes);
    REQUIRE(bytes.size() == header_size + batch_prefix_size + record_size);
    CHECK(bytes[0] == std::byte{64});  // payload size 16 + 48, low byte first
    CHECK(bytes[4] == std::byte{4});   // type: events
    CHECK(bytes[header_size + batch_prefix_size] == std::byte{0x88});  // buffer id, low byte first
  }

  TEST_CASE("a partial frame asks for more bytes, at every cut") {
    std::vector<std::byte> bytes;
    encode(Hello{.process_name = "partial"}, bytes);
    for (std::size_t cut = 0; cut < bytes.size(); ++cut) {
      auto frame = next_frame(std::span(bytes).first(cut));
      REQUIRE(frame.has_value());
      CHECK_FALSE(frame->has_value());
    }
  }

  TEST_CASE("bad headers: unknown type, flags, oversized length") {
    std::vector<std::byte> bytes(header_size, std::byte{0});
    bytes[4] = std::byte{0xEE};
    CHECK(contains(next_frame(bytes).error().message, "unknown message type 238"));
    bytes[4] = std::byte{9};
    bytes[6] = std::byte{1};
    CHECK(contains(next_frame(bytes).error().message, "flags"));
    bytes[6] = std::byte{0};
    bytes[3] = std::byte{0x80};  // a 2 GiB length prefix
    const auto oversized = next_frame(bytes);
    REQUIRE_FALSE(oversized.has_value());
    CHECK(contains(oversized.error().message, "over the limit"));
  }

  TEST_CASE("bad payloads: sizes, counts, fields and reserved bits") {
    std::vector<std::byte> bytes;
    encode(Hello{.process_name = "x"}, bytes);
    bytes.push_back(std::byte{0});
    bytes[0] = std::byte{static_cast<unsigned char>(std::to_integer<unsigned>(bytes[0]) + 1)};
    CHECK(contains(decode_error(bytes), "name length"));

    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(sample_alloc)}, bytes);
    bytes[header_size + 8] = std::byte{2};  // claims two records, carries one
    CHECK(contains(decode_error(bytes), "says 2 records"));

    const auto record_byte = header_size + batch_prefix_size;
    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(sample_alloc)}, bytes);
    bytes[record_byte + 44] = std::byte{9};  // buffer type 9
    CHECK(contains(decode_error(bytes), "buffer type 9"));

    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(FreeRecord{1, 1, 1})}, bytes);
    bytes[record_byte + 44] = std::byte{77};
    CHECK(contains(decode_error(bytes), "free reason"));

    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(sample_alloc)}, bytes);
    bytes[record_byte + 46] = std::byte{65};  // 65 devices in one record
    CHECK(contains(decode_error(bytes), "65 devices"));

    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(AllocRecord{.device = 1020, .device_count = 8})}, bytes);
    CHECK(contains(decode_error(bytes), "from device 1020"));

    // Sizes no device has, and ids that wrap, are malformed: no sum the server keeps can wrap.
    for (const std::uint64_t size : {max_buffer_size + 1, std::uint64_t{1} << 63U, ~std::uint64_t{0}}) {
      bytes.clear();
      encode_events(0, std::vector{EventRecord::of(AllocRecord{.size = size})}, bytes);
      CHECK(contains(decode_error(bytes), "over the limit"));
    }
    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(AllocRecord{.size = max_buffer_size})}, bytes);
    CHECK(decode(*next_frame(bytes).value()).has_value());
    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(FreeRecord{.buffer = ~std::uint64_t{0} - 1, .device_count = 2})}, bytes);
    CHECK(contains(decode_error(bytes), "wrap around"));

    bytes.clear();
    encode_events(0, std::vector{EventRecord::of(sample_alloc)}, bytes);
    bytes[record_byte + 45] = std::byte{0x80};
    CHECK(contains(decode_error(bytes), "unknown flags"));

    bytes.clear();
    encode(Query{}, bytes);
    bytes[header_size] = std::byte{9};
    CHECK(contains(decode_error(bytes), "query kind"));

    bytes.clear();
    encode(Goodbye{}, bytes);
    bytes[0] = std::byte{9};
    bytes.push_back(std::byte{0});
    CHECK(contains(decode_error(bytes), "payload is not 8 bytes"));
    bytes.clear();
    encode(Goodbye{}, bytes);
    bytes[header_size] = std::byte{2};
    CHECK(contains(decode_error(bytes), "neither 0 nor 1"));
    bytes.clear();
    encode(Goodbye{}, bytes);
    bytes[header_size + 7] = std::byte{1};
    CHECK(contains(decode_error(bytes), "reserved field"));

    bytes.clear();
    encode_snapshot_chunk(std::vector{sample_alloc}, bytes);
    bytes[header_size] = std::byte{1};
    CHECK(contains(decode_error(bytes), "no sequence number"));

    bytes.clear();
    encode_snapshot_chunk(std::vector{sample_alloc}, bytes);
    bytes[header_size + batch_prefix_size + 45] = std::byte{2};  // a free inside a snapshot
    CHECK(contains(decode_error(bytes), "allocations only"));
  }

  TEST_CASE("outbound frames: a cut never splits a frame or drops the session start, compacting keeps the unsent bytes") {
    OutboundFrames queue;
    encode(Hello{.claimed_pid = 1, .process_name = "p"}, queue.frames());
    queue.keep_what_is_queued();
    const std::size_t hello = queue.pending();
    std::vector<std::byte> frames_only;
    for (std::uint64_t i = 0; i < 3; ++i) {
      encode(SnapshotEnd{i, i}, queue.frames());
      encode(SnapshotEnd{i, i}, frames_only);
    }
    const std::size_t one = frames_only.size() / 3;
    CHECK(queue.pending() == hello + 3 * one);

    // Nothing sent: the cut keeps the session start, drops the rest.
    OutboundFrames copy = queue;
    CHECK(copy.cut_unsent());
    CHECK(copy.pending() == hello);

    // Part of the first frame after the session start sent: it stays whole, the two after it go.
    queue.sent(hello + 3);
    CHECK(queue.cut_unsent());
    CHECK(queue.pending() == one - 3);
    // What is left decodes once joined to what was sent: the frame is whole.
    std::vector<std::byte> stream(queue.frames().begin(), queue.frames().end());
    auto frame = next_frame(std::span(stream).subspan(hello));
    REQUIRE(frame.has_value());
    REQUIRE(frame->has_value());
    CHECK(std::holds_alternative<SnapshotEnd>(decode(**frame).value()));
    CHECK_FALSE(queue.cut_unsent());  // nothing more to cut
    queue.sent(queue.pending());
    CHECK(queue.all_sent());
    CHECK(queue.frames().empty());  // emptied once everything went

    // A long steady stream: sent frames are compacted away, unsent bytes stay exactly.
    OutboundFrames steady;
    std::vector<std::byte> record;
    encode_events(0, std::vector{EventRecord::of(sample_alloc)}, record);
    while (steady.frames().size() < (std::size_t{3} << 20U)) {
      steady.frames().insert(steady.frames().end(), record.begin(), record.end());
    }
    steady.sent(steady.pending() - 5);  // all but the last frame's last five bytes
    const std::vector<std::byte> before(steady.unsent().begin(), steady.unsent().end());
    steady.compact();
    CHECK(steady.frames().size() == record.size());  // only the frame in progress is left
    CHECK(std::vector<std::byte>(steady.unsent().begin(), steady.unsent().end()) == before);
  }

  TEST_CASE("random bytes never crash the decoder: they decode or fail with an error") {
    std::uint64_t state = 12345;
    int header_errors = 0;
    int payload_errors = 0;
    int decoded = 0;
    for (int round = 0; round < 20000; ++round) {
      std::vector<std::byte> bytes(static_cast<std::size_t>(8 + (round % 200)));
      for (auto& b : bytes) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        b = static_cast<std::byte>(state >> 56U);
      }
      bytes[0] = static_cast<std::byte>(bytes.size() - 8);  // often a plausible length
      for (const std::size_t i : {1U, 2U, 3U, 5U, 6U, 7U}) bytes[i] = std::byte{0};
      // Half the rounds get a known type, so payload decoding is exercised too.
      if (round % 2 == 0) bytes[4] = static_cast<std::byte>(1 + std::to_integer<int>(bytes[4]) % 11);
      auto frame = next_frame(bytes);
      if (!frame) {
        ++header_errors;
        CHECK_FALSE(frame.error().message.empty());
        continue;
      }
      REQUIRE(frame->has_value());  // the length always fits: a whole frame is there
      if (auto message = decode(**frame)) ++decoded;
      else ++payload_errors;
    }
    // Under the asan preset this also proves there is no out-of-bounds read on any path.
    CHECK(header_errors > 0);
    CHECK(payload_errors > 0);
    CHECK(header_errors + payload_errors + decoded == 20000);
  }
}
