// meshrt.protocol — the allocation server's wire format. Pure: no I/O, no globals.
//
// A frame is an 8-byte header (u32 payload size, u16 message type, u16 flags = 0), then the
// payload. Every integer is little-endian with an explicit size. Decoding checks every bound:
// a malformed frame is an Error with a message, never undefined behaviour.
module;
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

export module meshrt.protocol;

import meshrt.core;
export import :outbound;
export import :records;
export import :device_groups;

export namespace meshrt::protocol {

// 2: DeviceInfo carries bank counts and base addresses. 3: Goodbye says whether the client
// delivered everything; records with sizes over max_buffer_size or ids that wrap are malformed.
// 4: a Free's reason may be 5, move_assigned (a version-3 server would refuse it as malformed).
// 5: an Alloc's flags carry its allocation category in bits 2-3 (ADR 0020).
// 6: CallStack frames; an Events or SnapshotChunk frame's record format says whether its records
// carry a call stack id (ADR 0024); a Query may ask for stacks, or for the leak reports.
inline constexpr std::uint16_t version = 6;
inline constexpr std::size_t header_size = 8;
// Banks of one buffer type on one device that a DeviceInfo may describe (a Wormhole has 64 of L1).
inline constexpr std::uint32_t max_banks = 1U << 16U;
// Largest payload either side sends or accepts: large enough for ~20,000 events per frame,
// small enough that a hostile length prefix costs nothing.
inline constexpr std::uint32_t max_payload_size = 1U << 20U;
inline constexpr std::size_t max_name_size = 255;

// NOLINTNEXTLINE(performance-enum-size): as wide as its field on the wire
enum class MessageType : std::uint16_t {
  hello = 1,             // client -> server: first message of every session
  device_info = 2,       // client -> server: device totals of a mesh it opened
  mesh_buffer_name = 3,  // client -> server: a mesh buffer's name, before its allocations
  events = 4,            // client -> server: allocations and frees, in order, with sequence numbers
  snapshot_begin = 5,    // client -> server: the session's live table follows, replacing it
  snapshot_chunk = 6,    // client -> server: part of the live table
  snapshot_end = 7,      // client -> server: end of the live table, and the next sequence
  goodbye = 8,           // client -> server: clean exit
  query = 9,             // monitor -> server
  reply = 10,            // server -> monitor: JSON, in chunks
  error = 11,            // server -> client: why the session is being closed
  call_stack = 12,       // client -> server: a call stack's frames, before the first record naming it
  out_of_memory = 13,    // client -> server: an allocation failed for lack of memory (a timeline moment)
};

[[nodiscard]] std::string_view to_string(MessageType type);

enum class ClientRole : std::uint8_t { tracker = 1, monitor = 2 };
// timeline: the server's usage history and moments (ADR 0025), as JSON.
enum class QueryKind : std::uint8_t { summary = 1, buffers = 2, verify = 3, leaks = 4, timeline = 5 };

struct Hello {
  std::uint16_t protocol_version{version};
  ClientRole role{ClientRole::tracker};
  // What the client says its pid is. The server trusts only SO_PEERCRED and rejects a mismatch.
  std::uint32_t claimed_pid{};
  std::string process_name;
};

struct DeviceTotals {
  std::uint32_t device{};
  std::array<std::uint64_t, buffer_type_count> total_bytes{};  // indexed by BufferType
  std::array<std::uint32_t, buffer_type_count> bank_count{};   // 0 when unknown
  std::array<std::uint64_t, buffer_type_count> base_address{};
};

struct DeviceInfo {
  std::vector<DeviceTotals> devices;
};

struct MeshBufferName {
  std::uint64_t mesh_buffer{};
  std::string name;
};

inline constexpr std::size_t record_size = 8 + 8 + 8 + 8 + 8 + 4 + 1 + 1 + 2;
// A record that carries its call stack's id: 4 bytes more (ADR 0024).
inline constexpr std::size_t stack_record_size = record_size + 4;
inline constexpr std::size_t device_totals_size = 4 + 4 + (8 + 4 + 8) * buffer_type_count;
inline constexpr std::size_t batch_prefix_size = 8 + 4 + 4;  // first sequence, count, record format
static_assert(record_size == 48 && device_totals_size == 88);
inline constexpr std::size_t max_records = (max_payload_size - batch_prefix_size) / stack_record_size;

// What the records of one Events or SnapshotChunk frame look like: the batch prefix says.
enum class RecordFormat : std::uint8_t {
  plain = 0,       // 48 bytes
  with_stack = 1,  // 52 bytes: the call stack id follows
};
[[nodiscard]] constexpr std::size_t size_of(RecordFormat format) {
  return format == RecordFormat::with_stack ? stack_record_size : record_size;
}

// Decodes one record from exactly size_of(format) bytes (checked when the frame was decoded).
[[nodiscard]] EventRecord decode_record(std::span<const std::byte> bytes, RecordFormat format = RecordFormat::plain);

// Records are decoded on access from the frame's bytes: no copy of a whole batch.
class RecordView {
 public:
  RecordView() = default;
  explicit RecordView(std::span<const std::byte> bytes, RecordFormat format = RecordFormat::plain)
      : bytes_(bytes), format_(format) {}
  [[nodiscard]] std::size_t size() const { return bytes_.size() / size_of(format_); }
  [[nodiscard]] bool empty() const { return bytes_.empty(); }
  [[nodiscard]] RecordFormat format() const { return format_; }
  [[nodiscard]] EventRecord operator[](std::size_t index) const {
    return decode_record(bytes_.subspan(index * size_of(format_), size_of(format_)), format_);
  }

 private:
  std::span<const std::byte> bytes_;
  RecordFormat format_{RecordFormat::plain};
};

// Bounds of a CallStack frame.
inline constexpr std::size_t max_stack_frames = 128;
inline constexpr std::size_t max_symbol_size = 1024;  // a function's name or a file's path, cut there

struct StackFrame {
  std::uint64_t address{};  // 0 for an interpreted frame
  std::string function;
  std::string file;
  std::uint32_t line{};
  bool interpreted{};
  friend bool operator==(const StackFrame&, const StackFrame&) = default;
};

// One call stack of the session, innermost frame first: records name it by `id` (never 0).
struct CallStack {
  std::uint32_t id{};
  std::vector<StackFrame> frames;
  std::uint16_t call_site{};  // the frame people mean by "who allocated it" (the client chooses)
  friend bool operator==(const CallStack&, const CallStack&) = default;
};

// An allocation that failed for lack of memory, with the runtime's Error message (cut at
// max_out_of_memory_message bytes).
inline constexpr std::size_t max_out_of_memory_message = 4096;
struct OutOfMemory {
  std::uint32_t device{};
  BufferType type{};
  std::uint64_t requested{};           // bytes per device
  std::uint64_t largest_free_block{};  // in each bank of that device
  std::string message;
  friend bool operator==(const OutOfMemory&, const OutOfMemory&) = default;
};

struct EventBatch {
  std::uint64_t first_sequence{};
  RecordView records;
};

struct SnapshotBegin {};
struct SnapshotChunk {
  RecordView records;  // allocations only
};
struct SnapshotEnd {
  std::uint64_t next_sequence{};  // the sequence number of the first event after the snapshot
  std::uint64_t record_count{};   // how many records the chunks carried
};
// A clean exit. `complete` is false when the client gave up on a server too slow for its shutdown
// timeout: what it still held on the server's books is then "lost at exit", not its leak.
struct Goodbye {
  bool complete{true};
};

struct Query {
  QueryKind kind{QueryKind::summary};
  std::uint32_t pid{};  // 0: every process
  bool with_stacks{};   // buffers: each buffer's whole call stack, not only its call site
};

struct Reply {
  bool last{true};
  std::string json;
};

struct ErrorMessage {
  ErrorCode code{ErrorCode::protocol_error};
  std::string message;
};

using Message = std::variant<Hello, DeviceInfo, MeshBufferName, EventBatch, SnapshotBegin, SnapshotChunk, SnapshotEnd,
                             Goodbye, Query, Reply, ErrorMessage, CallStack, OutOfMemory>;

struct Frame {
  MessageType type{};
  std::span<const std::byte> payload;
  std::size_t frame_size{};  // header + payload: how far to advance the input
};

// The first complete frame at the start of `input`, nullopt when more bytes are needed, or an
// Error for a header no valid peer sends (unknown type, non-zero flags, payload over the limit).
[[nodiscard]] Result<std::optional<Frame>> next_frame(std::span<const std::byte> input,
                                                      std::uint32_t max_payload = max_payload_size);
// The message in a frame; record views point into the frame's bytes.
[[nodiscard]] Result<Message> decode(const Frame& frame);

// Where clients and monitors find the server: $MESHRT_ALLOC_SERVER, else
// $XDG_RUNTIME_DIR/meshrt/alloc.sock, else /tmp/meshrt-$UID/alloc.sock.
[[nodiscard]] std::string default_socket_path();

// Encoders append one whole frame to `out`.
void encode(const Hello& message, std::vector<std::byte>& out);
void encode(const DeviceInfo& message, std::vector<std::byte>& out);
void encode(const MeshBufferName& message, std::vector<std::byte>& out);
void encode_events(std::uint64_t first_sequence, std::span<const EventRecord> records, std::vector<std::byte>& out,
                   RecordFormat format = RecordFormat::plain);
void encode(const SnapshotBegin& message, std::vector<std::byte>& out);
void encode_snapshot_chunk(std::span<const AllocRecord> records, std::vector<std::byte>& out,
                           RecordFormat format = RecordFormat::plain);
// Frames past max_stack_frames and symbols past max_symbol_size are cut off.
void encode(const CallStack& message, std::vector<std::byte>& out);
void encode(const OutOfMemory& message, std::vector<std::byte>& out);
void encode(const SnapshotEnd& message, std::vector<std::byte>& out);
void encode(const Goodbye& message, std::vector<std::byte>& out);
void encode(const Query& message, std::vector<std::byte>& out);
void encode(const Reply& message, std::vector<std::byte>& out);
void encode(const ErrorMessage& message, std::vector<std::byte>& out);

}  // namespace meshrt::protocol
