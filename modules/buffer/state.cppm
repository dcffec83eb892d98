// The vocabulary shared by buffer handles and the state machine behind them.
module;
#include <cstdint>
#include <string_view>

export module meshrt.buffer:state;

import meshrt.core;

export namespace meshrt {

enum class DeviceBufferState : std::uint8_t { allocated, deallocated, released };
[[nodiscard]] std::string_view to_string(DeviceBufferState state);

// How each device lays out its part of a buffer: interleaved pages of `page_size` bytes.
struct DeviceLocalBufferConfig {
  std::uint64_t page_size{};
  BufferType buffer_type{BufferType::dram};
};

}  // namespace meshrt
