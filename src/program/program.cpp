module;
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.program;

import meshrt.core;
import meshrt.alloc;
import meshrt.mesh;

namespace meshrt {

std::uint64_t Program::binary_bytes() const {
  return std::accumulate(kernels.begin(), kernels.end(), std::uint64_t{0},
                         [](std::uint64_t sum, const KernelDescriptor& kernel) { return sum + kernel.binary_size; });
}

namespace {

Result<void> check(const MeshDevice& mesh, const Program& program) {
  if (program.kernels.empty()) return fail(ErrorCode::invalid_argument, fmt::format("program {} has no kernels", program.name));
  for (const KernelDescriptor& kernel : program.kernels) {
    if (kernel.binary_size == 0) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("program {}: kernel {} has an empty binary", program.name, kernel.name));
    }
  }
  std::set<std::uint32_t> indices;
  for (const CircularBufferConfig& cb : program.circular_buffers) {
    if (!indices.insert(cb.index).second) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("program {}: circular buffer {} is configured twice", program.name, cb.index));
    }
    if (cb.total_size > mesh.spec().l1.bank_size) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("program {}: circular buffer {} of {} bytes per core is larger than a core's L1 ({} bytes)",
                              program.name, cb.index, cb.total_size, mesh.spec().l1.bank_size));
    }
    if (cb.total_size == 0 || cb.page_size == 0 || cb.total_size % cb.page_size != 0) {
      return fail(ErrorCode::invalid_argument,
                  fmt::format("program {}: circular buffer {} of {} bytes is not a whole number of {}-byte pages",
                              program.name, cb.index, cb.total_size, cb.page_size));
    }
  }
  if (!program.body) return fail(ErrorCode::invalid_argument, fmt::format("program {} has no body", program.name));
  return {};
}

// The binaries as a DRAM mesh buffer of category program, filled with the bytes a compiler
// would have produced (a pattern of the key: the simulator runs no device code).
Result<MeshBuffer> load_binaries(MeshDevice& mesh, const Program& program) {
  const std::uint64_t bytes = program.binary_bytes();
  auto binaries = MeshBuffer::create(
      mesh, ReplicatedBufferConfig{.size = bytes, .name = fmt::format("program {} binaries", program.name)},
      DeviceLocalBufferConfig{.page_size = program_binary_page_size,
                              .buffer_type = BufferType::dram,
                              .category = AllocationCategory::program});
  if (!binaries) {
    return fail(binaries.error().code, fmt::format("program {}: loading its kernel binaries ({} bytes per device): {}",
                                                   program.name, bytes, binaries.error().message));
  }
  std::vector<std::byte> image(bytes);
  const std::size_t seed = std::hash<std::string>{}(program.cache_key);
  for (std::size_t i = 0; i < image.size(); ++i) image[i] = static_cast<std::byte>((seed >> ((i % 8) * 8)) + i);
  if (auto written = binaries->write(image); !written) return tl::unexpected(std::move(written.error()));
  return std::move(*binaries);
}

// A circular buffer of every worker core: one L1 page of `total_size` bytes per bank. (Allocator
// figures are per bank, and every core's L1 is one bank.)
Result<MeshBuffer> allocate_circular_buffer(MeshDevice& mesh, const Program& program, const CircularBufferConfig& cb) {
  // check() bounds total_size by one core's L1, so this is at most the device's whole L1.
  const std::uint64_t bytes = cb.total_size * mesh.spec().l1.bank_count;
  auto buffer = MeshBuffer::create(
      mesh, ReplicatedBufferConfig{.size = bytes, .name = fmt::format("{} cb {}", program.name, cb.index)},
      DeviceLocalBufferConfig{.page_size = cb.total_size,
                              .buffer_type = BufferType::l1,
                              .category = AllocationCategory::circular_buffer});
  if (buffer) return buffer;
  if (buffer.error().code != ErrorCode::out_of_memory) return tl::unexpected(std::move(buffer.error()));
  // Circular buffers are lock-step across the mesh: device 0's figures stand for the rest.
  const AllocatorStatistics l1 = mesh.allocator_statistics(DeviceId{0}, BufferType::l1).value();
  return fail(ErrorCode::out_of_memory,
              fmt::format("program {}: circular buffer {} of {} bytes per core does not fit beside the live L1 "
                          "buffers ({} of {} bytes per core in use in {} blocks, largest free block {} bytes): {}",
                          program.name, cb.index, cb.total_size, l1.allocated_bytes, l1.total_bytes, l1.allocated_blocks,
                          l1.largest_free_block, buffer.error().message));
}

}  // namespace

Result<ProgramRun> run_program(MeshDevice& mesh, const Program& program) {
  if (auto valid = check(mesh, program); !valid) return tl::unexpected(std::move(valid.error()));
  if (!mesh.is_open()) {
    return fail(ErrorCode::device_closed, fmt::format("program {}: the mesh is closed", program.name));
  }
  auto binaries = mesh.program_cache().get_or_load(program.cache_key, [&] { return load_binaries(mesh, program); });
  if (!binaries) return tl::unexpected(std::move(binaries.error()));

  ProgramRun run{.cache_hit = binaries->cache_hit,
                 .binary_address = binaries->address,
                 .binary_bytes_per_device = binaries->bytes_per_device};
  // Held for the run alone: each frees itself (reason destructor) when this function returns.
  std::vector<MeshBuffer> circular_buffers;
  circular_buffers.reserve(program.circular_buffers.size());
  for (const CircularBufferConfig& config : program.circular_buffers) {
    auto cb = allocate_circular_buffer(mesh, program, config);
    if (!cb) return tl::unexpected(std::move(cb.error()));
    run.circular_buffers.push_back({.index = config.index, .address = cb->address(), .total_size = config.total_size});
    circular_buffers.push_back(std::move(*cb));
  }

  const MeshShape shape = mesh.shape();
  for (std::uint32_t index = 0; index < shape.device_count(); ++index) {
    const ProgramContext context{.device = DeviceId{index},
                                 .coordinate = shape.coordinate_of(index),
                                 .worker_cores = mesh.spec().l1.bank_count,
                                 .circular_buffers = &run.circular_buffers};
    if (auto done = program.body(context); !done) {
      return fail(done.error().code, fmt::format("program {} on device {}: {}", program.name, index, done.error().message));
    }
  }
  for (MeshBuffer& cb : circular_buffers) cb.deallocate();
  return run;
}

}  // namespace meshrt
