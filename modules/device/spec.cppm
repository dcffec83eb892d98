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
  std::uint64_t alignment{};  // pages are padded to this: the buffer type's alignment
  // Every address and size the bank's allocator hands out is a multiple of this. On the devices
  // we model it is the DRAM alignment for every bank, L1 included (ADR 0006).
  std::uint64_t granule{};
  AllocationDirection direction{AllocationDirection::bottom_up};  // unless a buffer asks otherwise

  [[nodiscard]] std::uint64_t total_bytes() const { return std::uint64_t{bank_count} * bank_size; }
};

// Carve-outs chosen when a device is opened, in bytes per bank, rounded up to the DRAM alignment:
// L1_SMALL from the top of every L1 bank, the trace region from the top of every DRAM bank. Zero
// by default, as tt-metal's DEFAULT_L1_SMALL_SIZE and DEFAULT_TRACE_REGION_SIZE; buffers of an
// empty region are refused with an error that names it.
struct DeviceRegions {
  std::uint64_t l1_small_size{};
  std::uint64_t trace_region_size{};
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
  // How every bank's allocator chooses a free block; tt-metal's bank managers use first fit.
  AllocatorPolicy allocator_policy{AllocatorPolicy::first_fit};

  [[nodiscard]] const BankLayout& layout(BufferType type) const;

  // The presets start their banks above the reserved regions tt-metal keeps (ADR 0006).
  // Wormhole B0: 12 DRAM banks of 1 GiB (usable from 32 B), 8x8 worker cores with 1,499,136 B of
  // L1 each (usable from 100,416 B); DRAM alignment 32 B, L1 16 B.
  [[nodiscard]] static DeviceSpec wormhole_b0(DeviceRegions regions = {});
  // Blackhole: 8 DRAM banks of 4,278,190,080 B (usable from 64 B), 14x10 worker cores with
  // 1,572,864 B of L1 each (usable from 100,416 B); DRAM alignment 64 B, L1 16 B.
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
