// The records of the wire format: what one allocation or free says. The messages that carry
// them, and their encoding, are in the primary interface.
module;
#include <cstdint>

export module meshrt.protocol:records;

import meshrt.core;

export namespace meshrt::protocol {

// Device ids a record may name: a bound, so that no record makes the server size a table by it.
inline constexpr std::uint32_t max_device_id = 1023;
// The most device buffers one record covers (a whole 8x8 mesh).
inline constexpr std::uint16_t max_devices_per_record = 64;

// The largest device buffer a record may describe (256 TiB, far above any device's memory): a
// bound, so that no sum of sizes the server keeps can wrap.
inline constexpr std::uint64_t max_buffer_size = std::uint64_t{1} << 48U;

// Live device buffers: ids [buffer, buffer + device_count) on devices [device, device + count).
struct AllocRecord {
  std::uint64_t buffer{};
  std::uint64_t mesh_buffer{};
  std::uint64_t address{};
  std::uint64_t size{};  // per device buffer
  std::int64_t time_ns{};
  std::uint32_t device{};
  BufferType type{};
  bool hooked{};
  std::uint16_t device_count{1};
  AllocationCategory category{AllocationCategory::buffer};  // ADR 0020
  std::uint32_t stack{};  // the session's id of the allocating call stack (a CallStack frame); 0: none
  friend bool operator==(const AllocRecord&, const AllocRecord&) = default;
};

// Frees of device buffers [buffer, buffer + device_count). The reason is FreeReason's value; the
// server keeps it opaque.
struct FreeRecord {
  std::uint64_t buffer{};
  std::int64_t time_ns{};
  std::uint8_t reason{};
  std::uint16_t device_count{1};
  friend bool operator==(const FreeRecord&, const FreeRecord&) = default;
};

// One record of an Events frame: an allocation or a free, in the order they happened. On the
// wire every record is 48 bytes, so a frame is a plain array:
//   0 u64 buffer | 8 u64 mesh buffer | 16 u64 address | 24 u64 size | 32 i64 time
//   40 u32 device | 44 u8 type (alloc) or reason (free) | 45 u8 flags: bit 0 hooked, bit 1 free,
//   bits 2-3 the allocation category (alloc only; 0 on a free)
//   46 u16 device count
// and, in frames whose records carry stacks (ADR 0024), 4 bytes more:
//   48 u32 call stack id (an Alloc's; 0 on a free)
struct EventRecord {
  bool is_free{};
  AllocRecord alloc;  // when !is_free
  FreeRecord free;    // when is_free

  static EventRecord of(const AllocRecord& record) { return {false, record, {}}; }
  static EventRecord of(const FreeRecord& record) { return {true, {}, record}; }
};

}  // namespace meshrt::protocol
