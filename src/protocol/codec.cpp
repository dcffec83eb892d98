module;
#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.protocol;

import meshrt.core;

namespace meshrt::protocol {

namespace {

constexpr std::uint16_t last_message_type = static_cast<std::uint16_t>(MessageType::out_of_memory);
constexpr std::uint8_t hooked_flag = 1U;
constexpr std::uint8_t free_flag = 2U;
constexpr unsigned category_shift = 2U;
constexpr std::uint8_t category_bits = 3U << category_shift;
static_assert(allocation_category_count <= 4, "the category has two bits of a record's flags");
constexpr std::uint8_t max_free_reason = 5;  // FreeReason::move_assigned

// Appends little-endian integers, whatever the host's byte order (on little-endian hosts, the
// usual case, one memcpy each).
class Writer {
 public:
  explicit Writer(std::vector<std::byte>& out) : out_(out) {}
  template <class T>
  void integer(T value) {
    const std::size_t at = out_.size();
    out_.resize(at + sizeof(T));
    if constexpr (std::endian::native == std::endian::little) {
      std::memcpy(out_.data() + at, &value, sizeof(T));
    } else {
      auto bits = static_cast<std::make_unsigned_t<T>>(value);
      for (std::size_t i = 0; i < sizeof(T); ++i) {
        out_[at + i] = static_cast<std::byte>(bits & 0xFFU);
        if constexpr (sizeof(T) > 1) bits = static_cast<decltype(bits)>(bits >> 8U);
      }
    }
  }
  void zeros(std::size_t count) { out_.insert(out_.end(), count, std::byte{0}); }
  void text(std::string_view value) {
    const auto* bytes = reinterpret_cast<const std::byte*>(value.data());  // NOLINT: byte view of chars
    out_.insert(out_.end(), bytes, bytes + value.size());
  }

 private:
  std::vector<std::byte>& out_;
};

// Reads little-endian integers; every read is bounds-checked and a short read sticks.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) : bytes_(bytes) {}
  template <class T>
  T integer() {
    if (bytes_.size() < sizeof(T)) {
      short_ = true;
      bytes_ = {};
      return T{};
    }
    std::make_unsigned_t<T> bits = 0;
    if constexpr (std::endian::native == std::endian::little) {
      std::memcpy(&bits, bytes_.data(), sizeof(T));
    } else {
      for (std::size_t i = sizeof(T); i-- > 0;) {
        bits = static_cast<decltype(bits)>((bits << 8U) | std::to_integer<std::uint8_t>(bytes_[i]));
      }
    }
    bytes_ = bytes_.subspan(sizeof(T));
    return static_cast<T>(bits);
  }
  std::string text(std::size_t size) {
    if (bytes_.size() < size) {
      short_ = true;
      bytes_ = {};
      return {};
    }
    std::string value(size, '\0');
    if (size > 0) std::memcpy(value.data(), bytes_.data(), size);  // an empty span may hold a null pointer
    bytes_ = bytes_.subspan(size);
    return value;
  }
  std::span<const std::byte> rest() {
    return std::exchange(bytes_, {});
  }
  [[nodiscard]] bool ok() const { return !short_; }
  [[nodiscard]] std::size_t remaining() const { return bytes_.size(); }

 private:
  std::span<const std::byte> bytes_;
  bool short_{false};
};

// Writes a header with a placeholder size, lets `body` append the payload, then patches the size.
template <class Body>
void frame(MessageType type, std::vector<std::byte>& out, Body body) {
  const std::size_t start = out.size();
  Writer writer(out);
  writer.integer(std::uint32_t{0});
  writer.integer(static_cast<std::uint16_t>(type));
  writer.integer(std::uint16_t{0});
  body(writer);
  const auto payload = static_cast<std::uint32_t>(out.size() - start - header_size);
  Expects(payload <= max_payload_size);
  for (std::size_t i = 0; i < 4; ++i) out[start + i] = static_cast<std::byte>((payload >> (8U * i)) & 0xFFU);
}

tl::unexpected<Error> malformed(MessageType type, std::string_view what) {
  return fail(ErrorCode::protocol_error, fmt::format("malformed {} frame: {}", to_string(type), what));
}

struct BatchHeader {
  std::size_t count;
  RecordFormat format;
};

Result<BatchHeader> batch_header(MessageType type, Reader& reader) {
  const auto count = reader.integer<std::uint32_t>();
  const auto format = reader.integer<std::uint32_t>();
  if (!reader.ok()) return malformed(type, "shorter than its batch header");
  if (format > static_cast<std::uint32_t>(RecordFormat::with_stack)) {
    return malformed(type, fmt::format("unknown record format {}", format));
  }
  const auto record_format = static_cast<RecordFormat>(format);
  const std::size_t size = size_of(record_format);
  if (reader.remaining() != std::size_t{count} * size) {
    return malformed(type, fmt::format("says {} records of {} bytes but carries {} bytes", count, size,
                                       reader.remaining()));
  }
  return BatchHeader{count, record_format};
}

tl::unexpected<Error> bad_range(MessageType type, std::size_t index, std::uint32_t first, std::uint32_t count) {
  return malformed(type, fmt::format("record {}: {} devices from device {} (1 to {} devices, ids up to {})", index, count,
                                     first, max_devices_per_record, max_device_id));
}

// Checks every record of an Events or SnapshotChunk frame once, so that views may decode them
// later without checks; snapshots carry allocations only.
Result<RecordView> records(MessageType type, Reader& reader) {
  auto header = batch_header(type, reader);
  if (!header) return tl::unexpected(std::move(header.error()));
  const auto bytes = reader.rest();
  const RecordView view(bytes, header->format);
  const std::size_t size = size_of(header->format);
  for (std::size_t i = 0; i < header->count; ++i) {
    const auto raw = bytes.subspan(i * size, size);
    const auto type_or_reason = std::to_integer<std::uint8_t>(raw[44]);
    const auto flags = std::to_integer<std::uint8_t>(raw[45]);
    if ((flags & ~(hooked_flag | free_flag | category_bits)) != 0) {
      return malformed(type, fmt::format("record {}: unknown flags", i));
    }
    const bool is_free = (flags & free_flag) != 0;
    if (is_free && (flags & (category_bits | hooked_flag)) != 0) {
      return malformed(type, fmt::format("record {}: a free carries no category or hooked flag", i));
    }
    if (is_free && type == MessageType::snapshot_chunk) {
      return malformed(type, fmt::format("record {}: a snapshot holds allocations only", i));
    }
    if (!is_free && type_or_reason >= buffer_type_count) {
      return malformed(type, fmt::format("record {}: buffer type {}", i, type_or_reason));
    }
    if (is_free && type_or_reason > max_free_reason) {
      return malformed(type, fmt::format("record {}: unknown free reason {}", i, type_or_reason));
    }
    const EventRecord record = view[i];
    const std::uint32_t device = is_free ? 0 : record.alloc.device;
    const std::uint16_t devices = is_free ? record.free.device_count : record.alloc.device_count;
    if (devices == 0 || devices > max_devices_per_record || device + devices > max_device_id + 1) {
      return bad_range(type, i, device, devices);
    }
    const std::uint64_t buffer = is_free ? record.free.buffer : record.alloc.buffer;
    if (buffer > std::numeric_limits<std::uint64_t>::max() - devices) {
      return malformed(type, fmt::format("record {}: buffer ids {} + {} wrap around", i, buffer, devices));
    }
    if (is_free && header->format == RecordFormat::with_stack &&
        std::to_integer<std::uint8_t>(raw[48]) + std::to_integer<std::uint8_t>(raw[49]) +
                std::to_integer<std::uint8_t>(raw[50]) + std::to_integer<std::uint8_t>(raw[51]) != 0) {
      return malformed(type, fmt::format("record {}: a free carries no call stack", i));
    }
    if (!is_free && record.alloc.size > max_buffer_size) {
      return malformed(type, fmt::format("record {}: size {} bytes is over the limit of {} bytes per device buffer",
                                         i, record.alloc.size, max_buffer_size));
    }
  }
  return view;
}

// Writes little-endian integers into memory already sized for them (one resize per frame, not
// one per field: encoding runs millions of records a second).
class PlacedWriter {
 public:
  explicit PlacedWriter(std::byte* at) : at_(at) {}
  template <class T>
  void integer(T value) {
    if constexpr (std::endian::native == std::endian::little) {
      std::memcpy(at_, &value, sizeof(T));
    } else {
      auto bits = static_cast<std::make_unsigned_t<T>>(value);
      for (std::size_t i = 0; i < sizeof(T); ++i) {
        at_[i] = static_cast<std::byte>(bits & 0xFFU);
        if constexpr (sizeof(T) > 1) bits = static_cast<decltype(bits)>(bits >> 8U);
      }
    }
    at_ += sizeof(T);
  }
  void zeros(std::size_t count) {
    std::memset(at_, 0, count);
    at_ += count;
  }

 private:
  std::byte* at_;
};

template <class W>
void write_record(W& w, const EventRecord& record) {
  if (!record.is_free) {
    const AllocRecord& r = record.alloc;
    w.integer(r.buffer);
    w.integer(r.mesh_buffer);
    w.integer(r.address);
    w.integer(r.size);
    w.integer(r.time_ns);
    w.integer(r.device);
    w.integer(static_cast<std::uint8_t>(r.type));
    w.integer(static_cast<std::uint8_t>((r.hooked ? hooked_flag : 0U) | (index_of(r.category) << category_shift)));
    w.integer(r.device_count);
    return;
  }
  const FreeRecord& r = record.free;
  w.integer(r.buffer);
  w.zeros(24);
  w.integer(r.time_ns);
  w.integer(std::uint32_t{0});
  w.integer(r.reason);
  w.integer(free_flag);
  w.integer(r.device_count);
}

template <class W>
void write_record(W& w, const EventRecord& record, RecordFormat format) {
  write_record(w, record);
  if (format == RecordFormat::with_stack) w.integer(record.is_free ? std::uint32_t{0} : record.alloc.stack);
}

}  // namespace

std::string default_socket_path() {
  if (const char* path = std::getenv("MESHRT_ALLOC_SERVER"); path != nullptr && *path != '\0') return path;
  if (const char* runtime = std::getenv("XDG_RUNTIME_DIR"); runtime != nullptr && *runtime != '\0') {
    return fmt::format("{}/meshrt/alloc.sock", runtime);
  }
  return fmt::format("/tmp/meshrt-{}/alloc.sock", ::getuid());
}

std::string_view to_string(MessageType type) {
  switch (type) {
    case MessageType::hello: return "Hello";
    case MessageType::device_info: return "DeviceInfo";
    case MessageType::mesh_buffer_name: return "MeshBufferName";
    case MessageType::events: return "Events";
    case MessageType::snapshot_begin: return "SnapshotBegin";
    case MessageType::snapshot_chunk: return "SnapshotChunk";
    case MessageType::snapshot_end: return "SnapshotEnd";
    case MessageType::goodbye: return "Goodbye";
    case MessageType::query: return "Query";
    case MessageType::reply: return "Reply";
    case MessageType::error: return "Error";
    case MessageType::call_stack: return "CallStack";
    case MessageType::out_of_memory: return "OutOfMemory";
  }
  return "unknown";
}

EventRecord decode_record(std::span<const std::byte> bytes, RecordFormat format) {
  Expects(bytes.size() == size_of(format));
  Reader reader(bytes);
  const auto buffer = reader.integer<std::uint64_t>();
  const auto mesh_buffer = reader.integer<std::uint64_t>();
  const auto address = reader.integer<std::uint64_t>();
  const auto size = reader.integer<std::uint64_t>();
  const auto time_ns = reader.integer<std::int64_t>();
  const auto device = reader.integer<std::uint32_t>();
  const auto type_or_reason = reader.integer<std::uint8_t>();
  const auto flags = reader.integer<std::uint8_t>();
  const auto device_count = reader.integer<std::uint16_t>();
  if ((flags & free_flag) != 0) return EventRecord::of(FreeRecord{buffer, time_ns, type_or_reason, device_count});
  const std::uint32_t stack = format == RecordFormat::with_stack ? reader.integer<std::uint32_t>() : 0;
  return EventRecord::of(AllocRecord{buffer, mesh_buffer, address, size, time_ns, device,
                                     static_cast<BufferType>(type_or_reason), (flags & hooked_flag) != 0, device_count,
                                     static_cast<AllocationCategory>((flags & category_bits) >> category_shift), stack});
}

Result<std::optional<Frame>> next_frame(std::span<const std::byte> input, std::uint32_t max_payload) {
  if (input.size() < header_size) return std::optional<Frame>{};
  Reader reader(input.first(header_size));
  const auto payload_size = reader.integer<std::uint32_t>();
  const auto type = reader.integer<std::uint16_t>();
  const auto flags = reader.integer<std::uint16_t>();
  if (type == 0 || type > last_message_type) {
    return fail(ErrorCode::protocol_error, fmt::format("unknown message type {}", type));
  }
  const auto message_type = static_cast<MessageType>(type);
  if (flags != 0) return malformed(message_type, fmt::format("header flags {:#x} are not zero", flags));
  if (payload_size > max_payload) {
    return fail(ErrorCode::protocol_error, fmt::format("{} frame of {} bytes is over the limit of {} bytes",
                                                       to_string(message_type), payload_size, max_payload));
  }
  if (input.size() - header_size < payload_size) return std::optional<Frame>{};
  return std::optional<Frame>{Frame{message_type, input.subspan(header_size, payload_size), header_size + payload_size}};
}

Result<Message> decode(const Frame& frame) {
  Reader reader(frame.payload);
  const MessageType type = frame.type;
  const auto exact = [&](std::size_t size) { return frame.payload.size() == size; };
  switch (type) {
    case MessageType::hello: {
      Hello hello;
      hello.protocol_version = reader.integer<std::uint16_t>();
      const auto role = reader.integer<std::uint8_t>();
      const auto reserved = reader.integer<std::uint8_t>();
      hello.claimed_pid = reader.integer<std::uint32_t>();
      const auto name_size = reader.integer<std::uint16_t>();
      hello.process_name = reader.text(name_size);
      if (!reader.ok() || reader.remaining() != 0) return malformed(type, "size does not match its name length");
      if (role != 1 && role != 2) return malformed(type, fmt::format("unknown role {}", role));
      if (reserved != 0) return malformed(type, "reserved field is not zero");
      if (name_size > max_name_size) return malformed(type, fmt::format("process name of {} bytes", name_size));
      hello.role = static_cast<ClientRole>(role);
      return hello;
    }
    case MessageType::device_info: {
      const auto count = reader.integer<std::uint32_t>();
      if (!reader.ok() || reader.remaining() != std::size_t{count} * device_totals_size) {
        return malformed(type, "size does not match its device count");
      }
      DeviceInfo info;
      info.devices.resize(count);
      for (DeviceTotals& device : info.devices) {
        device.device = reader.integer<std::uint32_t>();
        if (device.device > max_device_id) {
          return malformed(type, fmt::format("device id {} is over the limit of {}", device.device, max_device_id));
        }
        if (reader.integer<std::uint32_t>() != 0) return malformed(type, "reserved field is not zero");
        for (std::uint64_t& total : device.total_bytes) total = reader.integer<std::uint64_t>();
        for (std::uint32_t& banks : device.bank_count) banks = reader.integer<std::uint32_t>();
        for (std::uint64_t& base : device.base_address) base = reader.integer<std::uint64_t>();
        for (std::size_t t = 0; t < buffer_type_count; ++t) {
          if (device.bank_count[t] > max_banks) {
            return malformed(type, fmt::format("{} banks, over the limit of {}", device.bank_count[t], max_banks));
          }
          if (device.bank_count[t] > 0 && device.total_bytes[t] / device.bank_count[t] >
                                               std::numeric_limits<std::uint64_t>::max() - device.base_address[t]) {
            return malformed(type, "banks end past the end of the address space");
          }
        }
      }
      return info;
    }
    case MessageType::mesh_buffer_name: {
      MeshBufferName name;
      name.mesh_buffer = reader.integer<std::uint64_t>();
      const auto size = reader.integer<std::uint16_t>();
      name.name = reader.text(size);
      if (!reader.ok() || reader.remaining() != 0 || size > max_name_size) {
        return malformed(type, "size does not match its name length (at most 255 bytes)");
      }
      return name;
    }
    case MessageType::events:
    case MessageType::snapshot_chunk: {
      const auto first_sequence = reader.integer<std::uint64_t>();
      if (type == MessageType::snapshot_chunk && first_sequence != 0) {
        return malformed(type, "snapshot chunks carry no sequence number");
      }
      auto checked = records(type, reader);
      if (!checked) return tl::unexpected(std::move(checked.error()));
      if (type == MessageType::events) return EventBatch{first_sequence, *checked};
      return SnapshotChunk{*checked};
    }
    case MessageType::snapshot_begin:
      if (!exact(0)) return malformed(type, "carries a payload");
      return SnapshotBegin{};
    case MessageType::snapshot_end: {
      if (!exact(16)) return malformed(type, "payload is not 16 bytes");
      const auto next_sequence = reader.integer<std::uint64_t>();
      const auto record_count = reader.integer<std::uint64_t>();
      return SnapshotEnd{next_sequence, record_count};
    }
    case MessageType::goodbye: {
      if (!exact(8)) return malformed(type, "payload is not 8 bytes");
      const auto complete = reader.integer<std::uint8_t>();
      if (complete > 1) return malformed(type, fmt::format("completeness {} is neither 0 nor 1", complete));
      for (int i = 0; i < 7; ++i) {
        if (reader.integer<std::uint8_t>() != 0) return malformed(type, "reserved field is not zero");
      }
      return Goodbye{complete == 1};
    }
    case MessageType::query: {
      if (!exact(8)) return malformed(type, "payload is not 8 bytes");
      const auto kind = reader.integer<std::uint8_t>();
      if (kind < 1 || kind > 5) return malformed(type, fmt::format("unknown query kind {}", kind));
      const auto options = reader.integer<std::uint8_t>();
      if (options > 1) return malformed(type, fmt::format("unknown query options {:#x}", options));
      if (reader.integer<std::uint16_t>() != 0) return malformed(type, "reserved field is not zero");
      const auto pid = reader.integer<std::uint32_t>();
      return Query{static_cast<QueryKind>(kind), pid, options == 1};
    }
    case MessageType::reply: {
      const auto last = reader.integer<std::uint8_t>();
      reader.integer<std::uint8_t>();
      reader.integer<std::uint16_t>();
      if (!reader.ok() || last > 1) return malformed(type, "bad chunk header");
      return Reply{last == 1, reader.text(reader.remaining())};
    }
    case MessageType::error: {
      const auto code = reader.integer<std::uint16_t>();
      const auto size = reader.integer<std::uint16_t>();
      auto message = reader.text(size);
      if (!reader.ok() || reader.remaining() != 0) return malformed(type, "size does not match its message length");
      if (code > static_cast<std::uint16_t>(ErrorCode::permission_denied)) {
        return malformed(type, fmt::format("unknown error code {}", code));
      }
      return ErrorMessage{static_cast<ErrorCode>(code), std::move(message)};
    }
    case MessageType::out_of_memory: {
      OutOfMemory oom;
      oom.device = reader.integer<std::uint32_t>();
      const auto buffer_type = reader.integer<std::uint8_t>();
      const auto reserved = reader.integer<std::uint8_t>();
      const auto size = reader.integer<std::uint16_t>();
      oom.requested = reader.integer<std::uint64_t>();
      oom.largest_free_block = reader.integer<std::uint64_t>();
      oom.message = reader.text(size);
      if (!reader.ok() || reader.remaining() != 0) return malformed(type, "size does not match its message length");
      if (reserved != 0) return malformed(type, "reserved field is not zero");
      if (buffer_type >= buffer_type_count) return malformed(type, fmt::format("unknown buffer type {}", buffer_type));
      if (size > max_out_of_memory_message) {
        return malformed(type, fmt::format("a message over {} bytes", max_out_of_memory_message));
      }
      oom.type = all_buffer_types.at(buffer_type);
      return oom;
    }
    case MessageType::call_stack: {
      CallStack stack;
      stack.id = reader.integer<std::uint32_t>();
      const auto count = reader.integer<std::uint16_t>();
      stack.call_site = reader.integer<std::uint16_t>();
      if (!reader.ok()) return malformed(type, "shorter than its header");
      if (stack.id == 0) return malformed(type, "stack id 0 means no stack");
      if (stack.call_site >= std::max<std::uint16_t>(count, 1)) {
        return malformed(type, fmt::format("call site frame {} of {} frames", stack.call_site, count));
      }
      if (count > max_stack_frames) {
        return malformed(type, fmt::format("{} frames, over the limit of {}", count, max_stack_frames));
      }
      stack.frames.resize(count);
      for (std::size_t i = 0; i < count; ++i) {
        StackFrame& entry = stack.frames[i];
        entry.address = reader.integer<std::uint64_t>();
        entry.line = reader.integer<std::uint32_t>();
        const auto interpreted = reader.integer<std::uint8_t>();
        const auto frame_reserved = reader.integer<std::uint8_t>();
        const auto function_size = reader.integer<std::uint16_t>();
        const auto file_size = reader.integer<std::uint16_t>();
        const auto frame_reserved_2 = reader.integer<std::uint16_t>();
        if (!reader.ok()) return malformed(type, fmt::format("frame {}: shorter than its header", i));
        if (interpreted > 1 || frame_reserved != 0 || frame_reserved_2 != 0) {
          return malformed(type, fmt::format("frame {}: reserved bits are not zero", i));
        }
        if (function_size > max_symbol_size || file_size > max_symbol_size) {
          return malformed(type, fmt::format("frame {}: a name over {} bytes", i, max_symbol_size));
        }
        entry.interpreted = interpreted == 1;
        entry.function = reader.text(function_size);
        entry.file = reader.text(file_size);
        if (!reader.ok()) return malformed(type, fmt::format("frame {}: shorter than its names", i));
      }
      if (reader.remaining() != 0) return malformed(type, "bytes after its last frame");
      return stack;
    }
  }
  return fail(ErrorCode::protocol_error, "unknown message type");
}

void encode(const Hello& message, std::vector<std::byte>& out) {
  Expects(message.process_name.size() <= max_name_size);
  frame(MessageType::hello, out, [&](Writer& w) {
    w.integer(message.protocol_version);
    w.integer(static_cast<std::uint8_t>(message.role));
    w.integer(std::uint8_t{0});
    w.integer(message.claimed_pid);
    w.integer(static_cast<std::uint16_t>(message.process_name.size()));
    w.text(message.process_name);
  });
}

void encode(const DeviceInfo& message, std::vector<std::byte>& out) {
  Expects(message.devices.size() * device_totals_size + 4 <= max_payload_size);
  frame(MessageType::device_info, out, [&](Writer& w) {
    w.integer(static_cast<std::uint32_t>(message.devices.size()));
    for (const DeviceTotals& device : message.devices) {
      w.integer(device.device);
      w.integer(std::uint32_t{0});
      for (const std::uint64_t total : device.total_bytes) w.integer(total);
      for (const std::uint32_t banks : device.bank_count) w.integer(banks);
      for (const std::uint64_t base : device.base_address) w.integer(base);
    }
  });
}

void encode(const MeshBufferName& message, std::vector<std::byte>& out) {
  const std::string_view name = std::string_view(message.name).substr(0, max_name_size);
  frame(MessageType::mesh_buffer_name, out, [&](Writer& w) {
    w.integer(message.mesh_buffer);
    w.integer(static_cast<std::uint16_t>(name.size()));
    w.text(name);
  });
}

void encode_events(std::uint64_t first_sequence, std::span<const EventRecord> records, std::vector<std::byte>& out,
                   RecordFormat format) {
  Expects(records.size() <= max_records);
  const std::size_t payload = batch_prefix_size + records.size() * size_of(format);
  const std::size_t start = out.size();
  out.resize(start + header_size + payload);
  PlacedWriter w(out.data() + start);
  w.integer(static_cast<std::uint32_t>(payload));
  w.integer(static_cast<std::uint16_t>(MessageType::events));
  w.integer(std::uint16_t{0});
  w.integer(first_sequence);
  w.integer(static_cast<std::uint32_t>(records.size()));
  w.integer(static_cast<std::uint32_t>(format));
  for (const EventRecord& record : records) write_record(w, record, format);
}

void encode(const SnapshotBegin& /*message*/, std::vector<std::byte>& out) {
  frame(MessageType::snapshot_begin, out, [](Writer&) {});
}

void encode_snapshot_chunk(std::span<const AllocRecord> records, std::vector<std::byte>& out, RecordFormat format) {
  Expects(records.size() <= max_records);
  frame(MessageType::snapshot_chunk, out, [&](Writer& w) {
    w.integer(std::uint64_t{0});
    w.integer(static_cast<std::uint32_t>(records.size()));
    w.integer(static_cast<std::uint32_t>(format));
    for (const AllocRecord& record : records) write_record(w, EventRecord::of(record), format);
  });
}

void encode(const SnapshotEnd& message, std::vector<std::byte>& out) {
  frame(MessageType::snapshot_end, out, [&](Writer& w) {
    w.integer(message.next_sequence);
    w.integer(message.record_count);
  });
}

void encode(const Goodbye& message, std::vector<std::byte>& out) {
  frame(MessageType::goodbye, out, [&](Writer& w) {
    w.integer(static_cast<std::uint8_t>(message.complete ? 1 : 0));
    for (int i = 0; i < 7; ++i) w.integer(std::uint8_t{0});
  });
}

void encode(const Query& message, std::vector<std::byte>& out) {
  frame(MessageType::query, out, [&](Writer& w) {
    w.integer(static_cast<std::uint8_t>(message.kind));
    w.integer(static_cast<std::uint8_t>(message.with_stacks ? 1U : 0U));
    w.integer(std::uint16_t{0});
    w.integer(message.pid);
  });
}

void encode(const Reply& message, std::vector<std::byte>& out) {
  Expects(message.json.size() + 4 <= max_payload_size);
  frame(MessageType::reply, out, [&](Writer& w) {
    w.integer(static_cast<std::uint8_t>(message.last ? 1U : 0U));
    w.zeros(3);
    w.text(message.json);
  });
}

void encode(const CallStack& message, std::vector<std::byte>& out) {
  Expects(message.id != 0);
  const std::size_t count = std::min(message.frames.size(), max_stack_frames);
  frame(MessageType::call_stack, out, [&](Writer& w) {
    w.integer(message.id);
    w.integer(static_cast<std::uint16_t>(count));
    w.integer(static_cast<std::uint16_t>(message.call_site < count ? message.call_site : 0));
    for (std::size_t i = 0; i < count; ++i) {
      const StackFrame& frame = message.frames[i];
      const std::string_view function = std::string_view(frame.function).substr(0, max_symbol_size);
      const std::string_view file = std::string_view(frame.file).substr(0, max_symbol_size);
      w.integer(frame.address);
      w.integer(frame.line);
      w.integer(static_cast<std::uint8_t>(frame.interpreted ? 1U : 0U));
      w.integer(std::uint8_t{0});
      w.integer(static_cast<std::uint16_t>(function.size()));
      w.integer(static_cast<std::uint16_t>(file.size()));
      w.integer(std::uint16_t{0});
      w.text(function);
      w.text(file);
    }
  });
}

void encode(const OutOfMemory& message, std::vector<std::byte>& out) {
  const std::string_view text = std::string_view(message.message).substr(0, max_out_of_memory_message);
  frame(MessageType::out_of_memory, out, [&](Writer& w) {
    w.integer(message.device);
    w.integer(static_cast<std::uint8_t>(index_of(message.type)));
    w.integer(std::uint8_t{0});
    w.integer(static_cast<std::uint16_t>(text.size()));
    w.integer(message.requested);
    w.integer(message.largest_free_block);
    w.text(text);
  });
}

void encode(const ErrorMessage& message, std::vector<std::byte>& out) {
  const std::string_view text = std::string_view(message.message).substr(0, 4096);
  frame(MessageType::error, out, [&](Writer& w) {
    w.integer(static_cast<std::uint16_t>(message.code));
    w.integer(static_cast<std::uint16_t>(text.size()));
    w.text(text);
  });
}

}  // namespace meshrt::protocol
