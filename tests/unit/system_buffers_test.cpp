// System buffers (ADR 0020): a mesh opened with a spec that has them allocates each device's
// command queue and dispatch buffers at open, as category system, through the one state machine,
// and frees them at close (reason device_closed), after every other buffer.
#include <cstdint>
#include <memory>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

TEST_SUITE("system buffers") {
  TEST_CASE("the defaults: 8 MiB of command queue and 6 MiB of dispatch buffers in DRAM, a page of L1 per core") {
    const SystemBuffers wormhole = SystemBuffers::defaults(DeviceSpec::wormhole_b0().l1.bank_count);
    CHECK(wormhole.command_queue == 8 * 1024 * 1024);
    CHECK(wormhole.dram_dispatch == 6 * 1024 * 1024);
    CHECK(wormhole.dram_bytes() == 14 * 1024 * 1024);
    CHECK(wormhole.l1_dispatch == 64 * SystemBuffers::page_size);
    CHECK(SystemBuffers::defaults(DeviceSpec::blackhole().l1.bank_count).l1_dispatch == 140 * 4096);
    // Every preset opens with them (ADR 0020).
    for (const DeviceSpec& preset : {DeviceSpec::wormhole_b0(), DeviceSpec::blackhole()}) {
      const SystemBuffers defaults = SystemBuffers::defaults(preset.l1.bank_count);
      CHECK(preset.system_buffers.command_queue == defaults.command_queue);
      CHECK(preset.system_buffers.dram_dispatch == defaults.dram_dispatch);
      CHECK(preset.system_buffers.l1_dispatch == defaults.l1_dispatch);
      CHECK(validate(preset).has_value());
    }

    DeviceSpec ragged = DeviceSpec::wormhole_b0();
    ragged.system_buffers.command_queue = 4096 * 3 + 1;
    const auto refused = validate(ragged);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message.find("command queue of 12289 bytes is not a whole number of 4096-byte pages") !=
          std::string::npos);
  }

  TEST_CASE("opening a 2x4 mesh reports each device's system buffers, category system, and close frees them last") {
    testing::Observed observed;
    const DeviceSpec spec = DeviceSpec::wormhole_b0();
    auto mesh = MeshDevice::create({2, 4}, spec, observed.tracker).value();
    // Three system buffers per device: command queue and DRAM dispatch, L1 dispatch.
    CHECK(observed.table->active_allocations() == 3 * 8);
    for (std::uint32_t device = 0; device < 8; ++device) {
      CAPTURE(device);
      CHECK(observed.table->summary(DeviceId{device}, BufferType::dram, AllocationCategory::system) ==
            LiveBufferSummary{2, spec.system_buffers.dram_bytes()});
      CHECK(observed.table->summary(DeviceId{device}, BufferType::l1, AllocationCategory::system) ==
            LiveBufferSummary{1, spec.system_buffers.l1_dispatch});
      CHECK(observed.table->summary(DeviceId{device}, BufferType::dram, AllocationCategory::buffer) ==
            LiveBufferSummary{});
    }
    // They hold real memory: each bank's allocator shows its pages (2048 and 1536 pages of 4 KiB
    // over 12 DRAM banks, rounded up per bank; one page in each of the 64 L1 banks).
    const std::uint64_t dram_per_bank = ((2048 + 11) / 12 + (1536 + 11) / 12) * 4096;
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == dram_per_bank);
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::l1).value().allocated_bytes == 4096);

    auto user = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 1 << 20},
                                   {.page_size = 2048, .buffer_type = BufferType::dram})
                    .value();
    user.deallocate();
    CHECK(observed.table->active_allocations() == 3 * 8);  // the user's buffers are gone, the system's stay
    auto left_open = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 4096},
                                        {.page_size = 4096, .buffer_type = BufferType::l1})
                         .value();
    observed.log->clear();
    mesh.close();
    const auto frees = observed.log->of_kind(EventKind::free);
    REQUIRE(frees.size() == 8 + 3 * 8);
    for (std::size_t i = 0; i < frees.size(); ++i) {
      CAPTURE(i);
      CHECK(frees[i].reason == FreeReason::device_closed);
      // The user's buffer first, then the system buffers: the mesh's own memory goes last.
      CHECK(frees[i].category == (i < 8 ? AllocationCategory::buffer : AllocationCategory::system));
    }
    CHECK(observed.table->active_allocations() == 0);
    CHECK(observed.table->unknown_frees() == 0);
    CHECK(left_open.device_buffer({0, 0}).value()->state() == DeviceBufferState::device_closed);
  }

  TEST_CASE("successive meshes in one process leave nothing behind, and every id is allocated and freed once") {
    testing::Observed observed;
    for (int run = 0; run < 3; ++run) {
      auto mesh = MeshDevice::create({1, 2}, DeviceSpec::blackhole(), observed.tracker).value();
      CHECK(observed.table->active_allocations() == 3 * 2);
    }  // each run's MeshDevice closes as it goes
    const auto audit = observed.log->audit();
    CHECK(audit.buffers == 3 * 3 * 2);
    CHECK(audit.still_live == 0);
    CHECK(audit.double_allocs == 0);
    CHECK(audit.double_frees == 0);
    CHECK(audit.unknown_frees == 0);
  }

  TEST_CASE("system buffers that do not fit are an Error that names them, and nothing is left allocated") {
    testing::Observed observed;
    DeviceSpec spec = DeviceSpec::wormhole_b0();
    spec.system_buffers.l1_dispatch = spec.l1.total_bytes() + 4096 * 64;  // more than all of L1
    const auto refused = MeshDevice::create({2, 2}, spec, observed.tracker);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code == ErrorCode::out_of_memory);
    CHECK(refused.error().message.find("opening a 2x2 mesh of wormhole_b0: its system dispatch buffer (L1) of") !=
          std::string::npos);
    // The DRAM ones had been reported: they were freed as the half-open mesh closed.
    CHECK(observed.table->active_allocations() == 0);
    const auto audit = observed.log->audit();
    CHECK(audit.buffers == 2 * 4);
    CHECK(audit.still_live == 0);
    CHECK(audit.unknown_frees == 0);
  }
}
