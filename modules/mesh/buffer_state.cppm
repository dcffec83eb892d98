// The vocabulary shared by buffer handles and the state machine behind them.
module;
#include <cstdint>
#include <optional>
#include <string_view>

export module meshrt.mesh:buffer_state;

import meshrt.core;

export namespace meshrt {

// allocated: it owns memory. deallocated: its owner gave the memory back (deallocate(), a
// destructor, a move-assignment over it). device_closed: its mesh closed while it was allocated.
// The last two are final; each is reached once and reports the buffer's one Free (ADR 0005).
enum class DeviceBufferState : std::uint8_t { allocated, deallocated, device_closed };
[[nodiscard]] std::string_view to_string(DeviceBufferState state);

// How each device lays out its part of a buffer: interleaved pages of `page_size` bytes.
struct DeviceLocalBufferConfig {
  std::uint64_t page_size{};
  BufferType buffer_type{BufferType::dram};
  // What the memory is for (ADR 0020); the program and tensor modules set theirs.
  AllocationCategory category{AllocationCategory::buffer};
  // Which end of the banks the buffer grows from, as tt-metal's DeviceLocalBufferConfig::bottom_up:
  // unset takes the buffer type's default (DRAM and trace bottom-up, L1 and L1_SMALL top-down).
  std::optional<bool> bottom_up;
};

}  // namespace meshrt
