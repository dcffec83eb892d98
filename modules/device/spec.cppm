// What a simulated chip looks like: banks per buffer type, sizes, alignment, direction.
module;
#include <cstdint>
#include <string>
#include <string_view>

export module meshrt.device:spec;

import meshrt.core;
import meshrt.alloc;

export namespace meshrt {

// One buffer type's memory on a device: `bank_count` banks, each an address range
// [base_address, base_address + bank_size), allocated in lock-step (same address in every bank).
struct BankLayout {
  std::uint32_t bank_count{};
  std::uint64_t bank_size{};
  std::uint64_t base_address{};
  std::uint64_t alignment{};
  AllocationDirection direction{AllocationDirection::bottom_up};

  [[nodiscard]] std::uint64_t total_bytes() const { return std::uint64_t{bank_count} * bank_size; }
};

// Carve-outs of a device: L1_SMALL from the top of every L1 bank, the trace region from the top of
// every DRAM bank (sizes per bank). As in the runtime we model, they are chosen when the device is
// opened; our defaults are non-zero so that every buffer type works out of the box.
struct DeviceRegions {
  std::uint64_t l1_small_size{std::uint64_t{32} * 1024};
  std::uint64_t trace_region_size{std::uint64_t{32} * 1024 * 1024};
};

// The device's own buffers: a command queue and dispatch buffers, allocated when a mesh opens
// and freed when it closes, category system (ADR 0020). Bytes per device, whole pages of
// page_size, interleaved over every bank of their type; 0 allocates none. Every preset opens
// with `defaults`; `spec.system_buffers = {}` opens a mesh that holds only what its user makes.
struct SystemBuffers {
  std::uint64_t command_queue{};  // DRAM
  std::uint64_t dram_dispatch{};  // DRAM
  std::uint64_t l1_dispatch{};    // L1
  static constexpr std::uint64_t page_size = 4096;
  // 8 MiB of command queue and 6 MiB of dispatch buffers in DRAM (14 MiB), one page of
  // dispatch buffer in the L1 of each of `l1_banks` worker cores.
  [[nodiscard]] static SystemBuffers defaults(std::uint32_t l1_banks);
  [[nodiscard]] std::uint64_t dram_bytes() const { return command_queue + dram_dispatch; }
};

struct DeviceSpec {
  std::string name;
  std::uint32_t worker_rows{};
  std::uint32_t worker_cols{};
  BankLayout dram;
  BankLayout l1;
  BankLayout l1_small;
  BankLayout trace;
  SystemBuffers system_buffers;

  [[nodiscard]] const BankLayout& layout(BufferType type) const;

  // Wormhole B0: 12 DRAM banks of 1 GiB, 8x8 worker cores with 1,499,136 B of L1 each.
  [[nodiscard]] static DeviceSpec wormhole_b0(DeviceRegions regions = {});
  // Blackhole: 8 DRAM banks of 4,278,190,080 B, 14x10 worker cores with 1,499,136 B of L1 each.
  [[nodiscard]] static DeviceSpec blackhole(DeviceRegions regions = {});
  // "wormhole_b0" or "blackhole".
  [[nodiscard]] static Result<DeviceSpec> named(std::string_view name, DeviceRegions regions = {});
};

// The most banks one buffer type may have on a device (a Wormhole has 64 of L1).
inline constexpr std::uint32_t max_banks_per_type = 1U << 16U;

// Checks that every layout is usable: banks, aligned non-empty ranges, regions that fit.
[[nodiscard]] Result<void> validate(const DeviceSpec& spec);

// The interleaved page layout: page i of a buffer lives in bank i % banks, at
// buffer address + (i / banks) * aligned page size.
struct InterleavedLayout {
  std::uint32_t bank_count{};
  std::uint64_t page_size{};
  std::uint64_t aligned_page_size{};

  [[nodiscard]] static InterleavedLayout of(const BankLayout& banks, std::uint64_t page_size);
  [[nodiscard]] std::uint32_t bank_of(std::uint64_t page) const {
    return static_cast<std::uint32_t>(page % bank_count);
  }
  [[nodiscard]] std::uint64_t offset_of(std::uint64_t page) const { return (page / bank_count) * aligned_page_size; }
  // ceil(pages / banks) * aligned page size: what the buffer reserves in each bank.
  [[nodiscard]] std::uint64_t bytes_per_bank(std::uint64_t pages) const {
    return ((pages + bank_count - 1) / bank_count) * aligned_page_size;
  }
};

// Named mesh shapes of the systems users know: n150 1x1, n300 1x2, t3000 2x4, galaxy 8x4, tgg 8x8.
[[nodiscard]] Result<MeshShape> mesh_preset(std::string_view name);
// A preset name or "RxC".
[[nodiscard]] Result<MeshShape> parse_mesh(std::string_view text);

}  // namespace meshrt
