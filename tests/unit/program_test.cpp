// Programs (ADR 0021): a run takes its circular buffers in every worker core's L1 for the run
// alone (category circular_buffer) and its kernel binaries in DRAM from the mesh's program cache
// (category program). Each is reported once, freed once, whatever the run's outcome.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

Program sample_program(std::string key = "sample (32, 32) bfloat16") {
  return Program{.name = "sample",
                 .cache_key = std::move(key),
                 .kernels = {{"reader", 4096}, {"compute", 6144}, {"writer", 2048}},
                 .circular_buffers = {{.index = 0, .total_size = 4096, .page_size = 2048},
                                      {.index = 16, .total_size = 8192, .page_size = 2048}},
                 .body = [](const ProgramContext&) -> Result<void> { return {}; }};
}

}  // namespace

TEST_SUITE("programs") {
  TEST_CASE("a run takes its circular buffers on every core while it runs, and caches its binaries") {
    testing::Observed observed;
    auto mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), observed.tracker).value();
    Program program = sample_program();
    std::vector<LiveBufferSummary> seen_during_run;
    std::vector<std::uint32_t> devices_run;
    program.body = [&](const ProgramContext& context) -> Result<void> {
      devices_run.push_back(context.device.value());
      CHECK(context.worker_cores == 64);
      REQUIRE(context.circular_buffers->size() == 2);
      seen_during_run.push_back(observed.on(context.device.value(), BufferType::l1, AllocationCategory::circular_buffer));
      return {};
    };
    const auto run = run_program(mesh, program);
    REQUIRE(run.has_value());
    CHECK_FALSE(run->cache_hit);
    CHECK(devices_run == std::vector<std::uint32_t>{0, 1, 2, 3, 4, 5, 6, 7});
    // Two circular buffers, each one page per core on all 64 cores: (4096 + 8192) bytes * 64.
    for (const LiveBufferSummary& during : seen_during_run) CHECK(during == LiveBufferSummary{2, (4096 + 8192) * 64});
    // Distinct addresses in L1, as tt-metal places them.
    CHECK(run->circular_buffers[0].address != run->circular_buffers[1].address);
    for (std::uint32_t device = 0; device < 8; ++device) {
      CAPTURE(device);
      CHECK(observed.on(device, BufferType::l1, AllocationCategory::circular_buffer) == LiveBufferSummary{});
      CHECK(observed.on(device, BufferType::dram, AllocationCategory::program) == LiveBufferSummary{1, 12288});
    }
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::l1).value().allocated_bytes == 0);
    const ProgramCacheStatistics cache = mesh.program_cache().statistics();
    CHECK(cache.entries == 1);
    CHECK(cache.bytes_per_device == 12288);
    CHECK(cache.misses == 1);

    // The second run of the same program hits the cache: no new binaries.
    const auto again = run_program(mesh, program);
    REQUIRE(again.has_value());
    CHECK(again->cache_hit);
    CHECK(again->binary_address == run->binary_address);
    CHECK(observed.log->of_kind(EventKind::allocate).size() == 8 * (1 + 2 + 2));  // binaries once, CBs twice
    CHECK(mesh.program_cache().statistics().hits == 1);

    // Clearing frees exactly the binaries: one Free per device, category program.
    const auto frees_before = observed.log->of_kind(EventKind::free).size();
    mesh.clear_program_cache();
    const auto frees = observed.log->of_kind(EventKind::free);
    REQUIRE(frees.size() == frees_before + 8);
    for (std::size_t i = frees_before; i < frees.size(); ++i) {
      CHECK(frees[i].category == AllocationCategory::program);
      CHECK(frees[i].reason == FreeReason::mesh_deallocate);
    }
    CHECK(mesh.program_cache().statistics().entries == 0);
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
    const auto audit = observed.log->audit();
    CHECK(audit.still_live == 0);
    CHECK(audit.double_frees == 0);
  }

  TEST_CASE("a program that fails midway frees its circular buffers, and its Error names the device") {
    testing::Observed observed;
    auto mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), observed.tracker).value();
    Program program = sample_program();
    program.body = [](const ProgramContext& context) -> Result<void> {
      if (context.device.value() == 5) return fail(ErrorCode::io_error, "the simulated core hung");
      return {};
    };
    const auto run = run_program(mesh, program);
    REQUIRE_FALSE(run.has_value());
    CHECK(run.error().code == ErrorCode::io_error);
    CHECK(run.error().message == "program sample on device 5: the simulated core hung");
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::l1).value().allocated_bytes == 0);
    for (std::uint32_t device = 0; device < 8; ++device) {
      CHECK(observed.on(device, BufferType::l1, AllocationCategory::circular_buffer) == LiveBufferSummary{});
    }
    // The binaries were loaded before the run began: they stay cached.
    CHECK(mesh.program_cache().statistics().entries == 1);
  }

  TEST_CASE("circular buffers that do not fit beside the live L1 buffers are an Error with the figures") {
    testing::Observed observed;
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), observed.tracker).value();
    const std::uint64_t bank = mesh.spec().l1.bank_size;
    // Leave 6 KiB free per core: the first circular buffer (4 KiB) fits, the second (8 KiB) does not.
    auto filler = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = (bank - 6144) * 64, .name = "filler"},
                                     {.page_size = bank - 6144, .buffer_type = BufferType::l1})
                      .value();
    const auto run = run_program(mesh, sample_program());
    REQUIRE_FALSE(run.has_value());
    CHECK(run.error().code == ErrorCode::out_of_memory);
    CAPTURE(run.error().message);
    CHECK(run.error().message.find("program sample: circular buffer 16 of 8192 bytes per core does not fit beside the "
                                   "live L1 buffers") == 0);
    CHECK(run.error().message.find("largest free block 2048 bytes") != std::string::npos);
    // Nothing of the run is left: the first circular buffer was freed; only the filler remains in L1.
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::l1).value().allocated_bytes == bank - 6144);
    CHECK(observed.on(0, BufferType::l1, AllocationCategory::circular_buffer) == LiveBufferSummary{});
    filler.deallocate();
    CHECK(run_program(mesh, sample_program()).has_value());
  }

  TEST_CASE("a disabled cache loads binaries per run and frees them after, keeping what it holds") {
    testing::Observed observed;
    auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), observed.tracker).value();
    REQUIRE(run_program(mesh, sample_program("first")).has_value());
    mesh.disable_program_cache();
    CHECK_FALSE(mesh.program_cache().is_enabled());
    const auto uncached = run_program(mesh, sample_program("second"));
    REQUIRE(uncached.has_value());
    CHECK_FALSE(uncached->cache_hit);
    // Only "first" is still cached; "second"'s binaries came and went.
    CHECK(observed.on(0, BufferType::dram, AllocationCategory::program) == LiveBufferSummary{1, 12288});
    CHECK(mesh.program_cache().statistics().entries == 1);
    // Disabled: even a cached program loads its own copy.
    CHECK_FALSE(run_program(mesh, sample_program("first"))->cache_hit);
    mesh.disable_and_clear_program_cache();
    CHECK(observed.on(0, BufferType::dram, AllocationCategory::program) == LiveBufferSummary{});
    mesh.enable_program_cache();
    REQUIRE(run_program(mesh, sample_program("first")).has_value());
    CHECK(run_program(mesh, sample_program("first"))->cache_hit);
    CHECK(observed.log->audit().double_frees == 0);
  }

  TEST_CASE("closing a mesh frees the cached binaries once, reason device_closed") {
    testing::Observed observed;
    auto mesh = MeshDevice::create({2, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), observed.tracker).value();
    REQUIRE(run_program(mesh, sample_program("a")).has_value());
    REQUIRE(run_program(mesh, sample_program("b")).has_value());
    mesh.close();
    const auto frees = observed.log->of_kind(EventKind::free);
    std::size_t program_frees = 0;
    for (const AllocationEvent& free : frees) {
      if (free.category != AllocationCategory::program) continue;
      ++program_frees;
      CHECK(free.reason == FreeReason::device_closed);
    }
    CHECK(program_frees == 2 * 4);
    CHECK(mesh.program_cache().statistics().entries == 0);
    mesh.clear_program_cache();  // nothing left to free: no second Free
    const auto audit = observed.log->audit();
    CHECK(audit.still_live == 0);
    CHECK(audit.double_frees == 0);
    const auto closed = run_program(mesh, sample_program("a"));
    REQUIRE_FALSE(closed.has_value());
    CHECK(closed.error().code == ErrorCode::device_closed);
  }

  TEST_CASE("malformed programs are Errors before anything is allocated") {
    testing::Observed observed;
    auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), observed.tracker).value();
    Program no_kernels = sample_program();
    no_kernels.kernels.clear();
    CHECK(run_program(mesh, no_kernels).error().message == "program sample has no kernels");
    Program empty_binary = sample_program();
    empty_binary.kernels[1].binary_size = 0;
    CHECK(run_program(mesh, empty_binary).error().message == "program sample: kernel compute has an empty binary");
    Program twice = sample_program();
    twice.circular_buffers[1].index = 0;
    CHECK(run_program(mesh, twice).error().message == "program sample: circular buffer 0 is configured twice");
    Program ragged = sample_program();
    ragged.circular_buffers[0].total_size = 3000;
    CHECK(run_program(mesh, ragged).error().message ==
          "program sample: circular buffer 0 of 3000 bytes is not a whole number of 2048-byte pages");
    Program huge = sample_program();
    huge.circular_buffers[0] = {.index = 0, .total_size = std::uint64_t{1} << 60U, .page_size = 2048};
    CHECK(run_program(mesh, huge).error().code == ErrorCode::invalid_argument);
    Program no_body = sample_program();
    no_body.body = nullptr;
    CHECK(run_program(mesh, no_body).error().message == "program sample has no body");
    CHECK(observed.log->events().empty());
  }
}
