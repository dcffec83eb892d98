// libFuzzer target: any bytes through the wire decoder. Every frame either decodes or fails with
// an Error; what decodes must encode back to the same message (no silent reinterpretation).
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

import meshrt.core;
import meshrt.protocol;

using namespace meshrt::protocol;

namespace {

void require(bool condition) {
  if (!condition) __builtin_trap();
}

Message decode_one(const std::vector<std::byte>& bytes) {
  auto frame = next_frame(bytes);
  require(frame.has_value() && frame->has_value() && (*frame)->frame_size == bytes.size());
  auto message = decode(**frame);
  require(message.has_value());
  return *message;
}

// Re-encodes a decoded message and checks it decodes to the same thing.
void round_trip(const Message& message) {
  std::vector<std::byte> bytes;
  if (const auto* hello = std::get_if<Hello>(&message)) {
    encode(*hello, bytes);
    const auto again = std::get<Hello>(decode_one(bytes));
    require(again.process_name == hello->process_name && again.claimed_pid == hello->claimed_pid &&
            again.role == hello->role && again.protocol_version == hello->protocol_version);
  } else if (const auto* batch = std::get_if<EventBatch>(&message)) {
    std::vector<EventRecord> records;
    for (std::size_t i = 0; i < batch->records.size(); ++i) records.push_back(batch->records[i]);
    encode_events(batch->first_sequence, records, bytes);
    const auto again = std::get<EventBatch>(decode_one(bytes));
    require(again.records.size() == records.size() && again.first_sequence == batch->first_sequence);
    for (std::size_t i = 0; i < records.size(); ++i) {
      const EventRecord record = again.records[i];
      require(record.is_free == records[i].is_free);
      require(record.is_free ? record.free == records[i].free : record.alloc == records[i].alloc);
    }
  } else if (const auto* query = std::get_if<Query>(&message)) {
    encode(*query, bytes);
    const auto again = std::get<Query>(decode_one(bytes));
    require(again.kind == query->kind && again.pid == query->pid);
  } else if (const auto* end = std::get_if<SnapshotEnd>(&message)) {
    encode(*end, bytes);
    const auto again = std::get<SnapshotEnd>(decode_one(bytes));
    require(again.next_sequence == end->next_sequence && again.record_count == end->record_count);
  } else if (const auto* info = std::get_if<DeviceInfo>(&message)) {
    encode(*info, bytes);
    const auto again = std::get<DeviceInfo>(decode_one(bytes));
    require(again.devices.size() == info->devices.size());
    for (std::size_t i = 0; i < again.devices.size(); ++i) {
      const DeviceTotals& a = again.devices[i];
      const DeviceTotals& b = info->devices[i];
      require(a.device == b.device && a.total_bytes == b.total_bytes && a.bank_count == b.bank_count &&
              a.base_address == b.base_address);
    }
  } else if (const auto* stack = std::get_if<CallStack>(&message)) {
    encode(*stack, bytes);
    require(std::get<CallStack>(decode_one(bytes)) == *stack);
  } else if (const auto* failure = std::get_if<OutOfMemory>(&message)) {
    encode(*failure, bytes);
    require(std::get<OutOfMemory>(decode_one(bytes)) == *failure);
  } else if (const auto* name = std::get_if<MeshBufferName>(&message)) {
    encode(*name, bytes);
    const auto again = std::get<MeshBufferName>(decode_one(bytes));
    require(again.name == name->name && again.mesh_buffer == name->mesh_buffer);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data), size);  // NOLINT: fuzzer input
  while (!input.empty()) {
    auto frame = next_frame(input);
    if (!frame) {
      require(!frame.error().message.empty());
      return 0;
    }
    if (!frame->has_value()) return 0;  // a partial frame: the server would wait for more
    const Frame whole = **frame;
    auto message = decode(whole);
    if (message) {
      round_trip(*message);
    } else {
      require(message.error().code == meshrt::ErrorCode::protocol_error && !message.error().message.empty());
    }
    input = input.subspan(whole.frame_size);
  }
  return 0;
}
