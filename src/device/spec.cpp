module;
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.device;

import meshrt.core;
import meshrt.alloc;

namespace meshrt {

namespace {

// A device's banks as tt-metal lays them out (its allocator's bank managers, ADR 0006):
//   DRAM bank: [reserved | DRAM buffers | trace region]
//   L1 bank:   [reserved | L1 buffers | L1_SMALL]
// Every bank allocates in steps of the DRAM alignment; pages pad to their type's alignment.
struct Chip {
  std::string name;
  std::uint32_t worker_rows{};
  std::uint32_t worker_cols{};
  std::uint32_t dram_banks{};
  std::uint64_t dram_bank_size{};
  std::uint64_t dram_alignment{};
  std::uint64_t dram_unreserved_base{};
  std::uint64_t l1_bank_size{};
  std::uint64_t l1_unreserved_base{};
};

constexpr std::uint64_t l1_alignment = 16;

constexpr std::uint64_t round_up(std::uint64_t value, std::uint64_t alignment) {
  return value > std::numeric_limits<std::uint64_t>::max() - alignment ? value
                                                                        : (value + alignment - 1) / alignment * alignment;
}

DeviceSpec make_spec(Chip chip, DeviceRegions regions) {
  const std::uint64_t granule = chip.dram_alignment;
  const std::uint32_t l1_banks = chip.worker_rows * chip.worker_cols;
  // Oversized regions leave DRAM or L1 empty, which validate() refuses; clamp so the arithmetic
  // stays defined.
  const std::uint64_t dram_room = chip.dram_bank_size - chip.dram_unreserved_base;
  const std::uint64_t l1_room = chip.l1_bank_size - chip.l1_unreserved_base;
  const std::uint64_t trace = std::min(round_up(regions.trace_region_size, granule), dram_room);
  const std::uint64_t l1_small = std::min(round_up(regions.l1_small_size, granule), l1_room);
  return DeviceSpec{
      .name = std::move(chip.name),
      .worker_rows = chip.worker_rows,
      .worker_cols = chip.worker_cols,
      .dram = {chip.dram_banks, dram_room - trace, chip.dram_unreserved_base, chip.dram_alignment, granule,
               AllocationDirection::bottom_up},
      .l1 = {l1_banks, l1_room - l1_small, chip.l1_unreserved_base, l1_alignment, granule,
             AllocationDirection::top_down},
      .l1_small = {l1_banks, l1_small, chip.l1_bank_size - l1_small, l1_alignment, granule,
                   AllocationDirection::top_down},
      .trace = {chip.dram_banks, trace, chip.dram_bank_size - trace, chip.dram_alignment, granule,
                AllocationDirection::bottom_up},
      .system_buffers = SystemBuffers::defaults(l1_banks),
      .allocator_policy = AllocatorPolicy::first_fit,
  };
}

}  // namespace

SystemBuffers SystemBuffers::defaults(std::uint32_t l1_banks) {
  constexpr std::uint64_t mib = std::uint64_t{1} << 20U;
  return SystemBuffers{.command_queue = 8 * mib, .dram_dispatch = 6 * mib, .l1_dispatch = l1_banks * page_size};
}

const BankLayout& DeviceSpec::layout(BufferType type) const {
  switch (type) {
    case BufferType::dram: return dram;
    case BufferType::l1: return l1;
    case BufferType::l1_small: return l1_small;
    case BufferType::trace: return trace;
  }
  return dram;
}

// Figures and their tt-metal sources are in ADR 0006.
DeviceSpec DeviceSpec::wormhole_b0(DeviceRegions regions) {
  return make_spec(Chip{.name = "wormhole_b0",
                        .worker_rows = 8,
                        .worker_cols = 8,
                        .dram_banks = 12,
                        .dram_bank_size = 1'073'741'824,
                        .dram_alignment = 32,
                        .dram_unreserved_base = 32,
                        .l1_bank_size = 1'499'136,
                        .l1_unreserved_base = 100'416},
                   regions);
}

DeviceSpec DeviceSpec::blackhole(DeviceRegions regions) {
  return make_spec(Chip{.name = "blackhole",
                        .worker_rows = 14,
                        .worker_cols = 10,
                        .dram_banks = 8,
                        .dram_bank_size = 4'278'190'080,
                        .dram_alignment = 64,
                        .dram_unreserved_base = 64,
                        .l1_bank_size = 1'572'864,
                        .l1_unreserved_base = 100'416},
                   regions);
}

Result<DeviceSpec> DeviceSpec::named(std::string_view name, DeviceRegions regions) {
  if (name == "wormhole_b0") return wormhole_b0(regions);
  if (name == "blackhole") return blackhole(regions);
  return fail(ErrorCode::not_found, fmt::format("unknown device '{}': expected wormhole_b0 or blackhole", name));
}

Result<void> validate(const DeviceSpec& spec) {
  for (const BufferType type : all_buffer_types) {
    const BankLayout& banks = spec.layout(type);
    // DRAM and L1 must exist; the carve-outs (L1_SMALL, trace) may be empty, and then a buffer of
    // that type is refused with an error that names the region.
    const bool required = type == BufferType::dram || type == BufferType::l1;
    if (banks.bank_count == 0 || (required && banks.bank_size == 0)) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("device spec '{}': {} has no memory ({} banks of {} bytes)", spec.name,
                              to_string(type), banks.bank_count, banks.bank_size));
    }
    if (banks.bank_count > max_banks_per_type) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("device spec '{}': {} has {} banks, more than the {} a device may have", spec.name,
                              to_string(type), banks.bank_count, max_banks_per_type));
    }
    if (!checked_multiply(banks.bank_count, banks.bank_size) ||
        banks.base_address > std::numeric_limits<std::uint64_t>::max() - banks.bank_size) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("device spec '{}': {} banks [{:#x}, +{}) x {} pass the end of a 64-bit address space",
                              spec.name, to_string(type), banks.base_address, banks.bank_size, banks.bank_count));
    }
    if (!std::has_single_bit(banks.alignment) || !std::has_single_bit(banks.granule)) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("device spec '{}': {} has page alignment {} and allocation granule {}: both must be "
                              "powers of two",
                              spec.name, to_string(type), banks.alignment, banks.granule));
    }
    if (banks.bank_size % banks.granule != 0 || banks.base_address % banks.granule != 0) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("device spec '{}': {} banks [{:#x}, +{}) are not aligned to their {}-byte granule",
                              spec.name, to_string(type), banks.base_address, banks.bank_size, banks.granule));
    }
  }
  if (spec.allocator_policy != AllocatorPolicy::first_fit && spec.allocator_policy != AllocatorPolicy::best_fit) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("device spec '{}': allocator policy {} is not first_fit or best_fit", spec.name,
                            static_cast<unsigned>(spec.allocator_policy)));
  }
  const SystemBuffers& system = spec.system_buffers;
  for (const auto& [what, size] : {std::pair{"command queue", system.command_queue},
                                   std::pair{"DRAM dispatch buffer", system.dram_dispatch},
                                   std::pair{"L1 dispatch buffer", system.l1_dispatch}}) {
    if (size % SystemBuffers::page_size != 0) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("device spec '{}': its {} of {} bytes is not a whole number of {}-byte pages", spec.name,
                              what, size, SystemBuffers::page_size));
    }
  }
  return {};
}

InterleavedLayout InterleavedLayout::of(const BankLayout& banks, std::uint64_t page_size) {
  const std::uint64_t aligned = (page_size + banks.alignment - 1) / banks.alignment * banks.alignment;
  return InterleavedLayout{banks.bank_count, page_size, aligned};
}

Result<MeshShape> mesh_preset(std::string_view name) {
  struct Preset {
    std::string_view name;
    MeshShape shape;
  };
  static constexpr std::array presets{
      Preset{"n150", {1, 1}}, Preset{"n300", {1, 2}}, Preset{"t3000", {2, 4}},
      Preset{"galaxy", {8, 4}}, Preset{"tgg", {8, 8}},
  };
  for (const Preset& preset : presets) {
    if (preset.name == name) return preset.shape;
  }
  return fail(ErrorCode::not_found,
              fmt::format("unknown mesh preset '{}': expected n150, n300, t3000, galaxy, tgg or RxC", name));
}

Result<MeshShape> parse_mesh(std::string_view text) {
  if (text.find('x') != std::string_view::npos) return parse_mesh_shape(text);
  return mesh_preset(text);
}

}  // namespace meshrt
