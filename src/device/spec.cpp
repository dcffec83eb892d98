module;
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

constexpr std::uint64_t l1_bank_size = 1'499'136;

DeviceSpec make_spec(std::string name, std::uint32_t worker_rows, std::uint32_t worker_cols,
                     std::uint32_t dram_banks, std::uint64_t dram_bank_size, std::uint64_t dram_alignment,
                     DeviceRegions regions) {
  constexpr std::uint64_t l1_alignment = 16;
  const std::uint32_t l1_banks = worker_rows * worker_cols;
  // Oversized regions are caught by validate(); clamp here so the arithmetic stays defined.
  const std::uint64_t trace = regions.trace_region_size <= dram_bank_size ? regions.trace_region_size : dram_bank_size;
  const std::uint64_t l1_small = regions.l1_small_size <= l1_bank_size ? regions.l1_small_size : l1_bank_size;
  return DeviceSpec{
      .name = std::move(name),
      .worker_rows = worker_rows,
      .worker_cols = worker_cols,
      .dram = {dram_banks, dram_bank_size - trace, 0, dram_alignment, AllocationDirection::bottom_up},
      .l1 = {l1_banks, l1_bank_size - l1_small, 0, l1_alignment, AllocationDirection::top_down},
      .l1_small = {l1_banks, l1_small, l1_bank_size - l1_small, l1_alignment, AllocationDirection::top_down},
      .trace = {dram_banks, trace, dram_bank_size - trace, dram_alignment, AllocationDirection::bottom_up},
      .system_buffers = SystemBuffers::defaults(l1_banks),
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

DeviceSpec DeviceSpec::wormhole_b0(DeviceRegions regions) {
  return make_spec("wormhole_b0", 8, 8, 12, 1'073'741'824, 32, regions);
}

DeviceSpec DeviceSpec::blackhole(DeviceRegions regions) {
  return make_spec("blackhole", 14, 10, 8, 4'278'190'080, 64, regions);
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
    if (!std::has_single_bit(banks.alignment) || banks.bank_size % banks.alignment != 0 ||
        banks.base_address % banks.alignment != 0) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("device spec '{}': {} banks [{:#x}, +{}) are not aligned to {} bytes", spec.name,
                              to_string(type), banks.base_address, banks.bank_size, banks.alignment));
    }
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
