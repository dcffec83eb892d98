// meshrt.program — programs as tt-metal runs them: kernels with binaries, run on a mesh's worker
// cores with circular buffers in L1 (ADR 0021).
//
// Running a program takes, on every device, its circular buffers in the L1 of all worker cores
// for the time it runs (category circular_buffer: an Alloc when the run starts, a Free when it
// ends, however it ends) and its kernel binaries in DRAM (category program), loaded the first
// time and kept in the mesh's program cache. Both are mesh buffers over the one state machine,
// so the exactly-once rule covers them as it covers a user's buffers.
module;
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

export module meshrt.program;

import meshrt.core;
import meshrt.mesh;

export namespace meshrt {

// One kernel of a program (reader, compute, writer...) and the size of its compiled binary.
struct KernelDescriptor {
  std::string name;
  std::uint64_t binary_size{};
};

// A circular buffer: `total_size` bytes in the L1 of every worker core, in pages of `page_size`.
struct CircularBufferConfig {
  std::uint32_t index{};  // tt-metal's CB index (c_0, c_1, ...)
  std::uint64_t total_size{};
  std::uint64_t page_size{};
};

// Where a running program's circular buffer is: the same L1 address on every core of every device.
struct CircularBuffer {
  std::uint32_t index{};
  std::uint64_t address{};
  std::uint64_t total_size{};
};

// What a program's body sees on one device while it runs.
struct ProgramContext {
  DeviceId device;
  MeshCoordinate coordinate;
  std::uint32_t worker_cores{};
  const std::vector<CircularBuffer>* circular_buffers{};
};

struct Program {
  std::string name;  // the operation, e.g. "eltwise_binary_add"
  // Operation, shapes and data type: runs with the same key share one cached set of binaries.
  std::string cache_key;
  std::vector<KernelDescriptor> kernels;
  std::vector<CircularBufferConfig> circular_buffers;
  // The work, once per device in row-major mesh order; its first Error ends the run.
  std::function<Result<void>(const ProgramContext&)> body;

  [[nodiscard]] std::uint64_t binary_bytes() const;
};

// What one run used.
struct ProgramRun {
  bool cache_hit{false};
  std::uint64_t binary_address{};
  std::uint64_t binary_bytes_per_device{};
  std::vector<CircularBuffer> circular_buffers;
};

// Kernel binaries live in DRAM in pages of this size.
inline constexpr std::uint64_t program_binary_page_size = 2048;

// Runs `program` on every device of `mesh`. An Error (a program with no kernels or a kernel
// without a binary, binaries or circular buffers that do not fit, a closed mesh, the body's own
// Error) leaves nothing of the run allocated: its circular buffers are freed whatever happens,
// and so are binaries loaded while the cache is disabled.
[[nodiscard]] Result<ProgramRun> run_program(MeshDevice& mesh, const Program& program);

}  // namespace meshrt
