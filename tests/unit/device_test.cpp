#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

TEST_SUITE("device") {
  // tt-metal: the DRAM bank starts at the unreserved base (hal: DRAM_BARRIER_SIZE aligned to the
  // DRAM alignment, 32 B on Wormhole), the trace region takes the top of each DRAM bank; the L1
  // bank starts at the L1 unreserved base (100,416 B, tests/tt_metal/.../test_overlapped_bank_
  // manager.cpp's Wormhole figures) and L1_SMALL takes its top (l1_banking_allocator.cpp). Both
  // carve-outs default to 0 (hostdevcommon/common_values.hpp); every bank allocates in steps of
  // the DRAM alignment (bank_manager.cpp), pages pad to their type's (buffer.cpp).
  TEST_CASE("wormhole_b0 has the figures of the chip") {
    const DeviceSpec spec = DeviceSpec::wormhole_b0();
    CHECK(spec.dram.bank_count == 12);
    CHECK(spec.dram.base_address == 32);
    CHECK(spec.dram.bank_size == 1'073'741'824 - 32);
    CHECK(spec.trace.bank_size == 0);
    CHECK(spec.dram.alignment == 32);
    CHECK(spec.dram.granule == 32);
    CHECK(spec.l1.bank_count == 64);
    CHECK(spec.l1.base_address == 100'416);
    CHECK(spec.l1.bank_size == 1'499'136 - 100'416);  // 1,398,720: tt-metal's allocatable L1
    CHECK(spec.l1_small.bank_size == 0);
    CHECK(spec.l1.alignment == 16);
    CHECK(spec.l1.granule == 32);  // L1 too allocates in DRAM-alignment steps
    CHECK(spec.dram.direction == AllocationDirection::bottom_up);
    CHECK(spec.l1.direction == AllocationDirection::top_down);
    CHECK(spec.allocator_policy == AllocatorPolicy::first_fit);
    CHECK(validate(spec).has_value());
  }

  TEST_CASE("blackhole has the figures of the chip") {
    const DeviceSpec spec = DeviceSpec::blackhole();
    CHECK(spec.dram.bank_count == 8);
    CHECK(spec.dram.base_address == 64);
    CHECK(spec.dram.bank_size == 4'278'190'080 - 64);
    CHECK(spec.dram.alignment == 64);
    CHECK(spec.l1.bank_count == 140);
    CHECK(spec.l1.base_address + spec.l1.bank_size == 1'572'864);
    CHECK(spec.l1.alignment == 16);
    CHECK(spec.l1.granule == 64);
    CHECK(validate(spec).has_value());
  }

  TEST_CASE("regions are carved from the top of their banks and rounded up to the DRAM alignment") {
    const DeviceSpec spec = DeviceSpec::wormhole_b0({.l1_small_size = 32 * 1024, .trace_region_size = 32 << 20});
    CHECK(spec.dram.base_address + spec.dram.bank_size == spec.trace.base_address);
    CHECK(spec.trace.base_address + spec.trace.bank_size == 1'073'741'824);
    CHECK(spec.trace.bank_size == 32 << 20);
    CHECK(spec.l1.base_address + spec.l1.bank_size == spec.l1_small.base_address);
    CHECK(spec.l1_small.base_address + spec.l1_small.bank_size == 1'499'136);
    CHECK(validate(spec).has_value());
    const DeviceSpec odd = DeviceSpec::wormhole_b0({.l1_small_size = 100, .trace_region_size = 1});
    CHECK(odd.l1_small.bank_size == 128);
    CHECK(odd.trace.bank_size == 32);
    CHECK(validate(odd).has_value());
    const DeviceSpec oversized = DeviceSpec::wormhole_b0({.l1_small_size = 2'000'000});
    const auto refused = validate(oversized);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message.find("l1 has no memory") != std::string::npos);
    DeviceSpec unaligned = DeviceSpec::wormhole_b0();
    unaligned.l1.base_address = 100'400;  // on the 16-byte page alignment, off the 32-byte granule
    CHECK(validate(unaligned).error().message.find("32-byte granule") != std::string::npos);
    CHECK(DeviceSpec::named("blackhole").value().name == "blackhole");
    CHECK(DeviceSpec::named("grayskull").error().code == ErrorCode::not_found);
  }

  TEST_CASE("mesh presets name the systems users know") {
    CHECK(mesh_preset("n150").value() == MeshShape{1, 1});
    CHECK(mesh_preset("n300").value() == MeshShape{1, 2});
    CHECK(mesh_preset("t3000").value() == MeshShape{2, 4});
    CHECK(mesh_preset("galaxy").value() == MeshShape{8, 4});
    CHECK(mesh_preset("tgg").value() == MeshShape{8, 8});
    CHECK(parse_mesh("3x5").value() == MeshShape{3, 5});
    const auto unknown = parse_mesh("t9000");
    REQUIRE_FALSE(unknown.has_value());
    CHECK(unknown.error().message.find("t9000") != std::string::npos);
  }

  TEST_CASE("interleaved pages go round-robin over banks at page-aligned offsets") {
    const InterleavedLayout layout = InterleavedLayout::of(DeviceSpec::wormhole_b0().dram, 100);
    CHECK(layout.aligned_page_size == 128);
    CHECK(layout.bank_of(0) == 0);
    CHECK(layout.bank_of(11) == 11);
    CHECK(layout.bank_of(12) == 0);
    CHECK(layout.offset_of(11) == 0);
    CHECK(layout.offset_of(12) == 128);
    CHECK(layout.bytes_per_bank(12) == 128);
    CHECK(layout.bytes_per_bank(13) == 256);
  }

  TEST_CASE("simulated memory is sparse, zero until written, and forgets discarded ranges") {
    SimulatedMemory memory;
    CHECK(memory.resident_bytes() == 0);
    std::vector<std::byte> out(16, std::byte{0xFF});
    memory.read(BufferType::dram, 3, 1'000'000'000, out);
    CHECK(out == std::vector<std::byte>(16, std::byte{0}));

    const std::vector<std::byte> data(10000, std::byte{0xAB});
    memory.write(BufferType::dram, 3, 4096 * 10 + 100, data);  // spans chunks 10, 11, 12
    CHECK(memory.resident_bytes() == 3 * SimulatedMemory::chunk_size);
    std::vector<std::byte> back(10000);
    memory.read(BufferType::dram, 3, 4096 * 10 + 100, back);
    CHECK(back == data);

    const std::vector<std::byte> neighbour(8, std::byte{0xCD});
    memory.write(BufferType::dram, 3, 4096 * 10, neighbour);  // another buffer shares chunk 10
    memory.discard(BufferType::dram, 12, 4096 * 10 + 100, 10000);
    // Chunk 11 was wholly inside; chunk 12 is all zeros once discarded; chunk 10 holds the neighbour.
    CHECK(memory.resident_bytes() == 1 * SimulatedMemory::chunk_size);
    memory.read(BufferType::dram, 3, 4096 * 10 + 100, back);
    CHECK(back == std::vector<std::byte>(10000, std::byte{0}));
    std::vector<std::byte> kept(8);
    memory.read(BufferType::dram, 3, 4096 * 10, kept);
    CHECK(kept == neighbour);
  }

  TEST_CASE("a mesh of every shape from 1x1 to 8x8 opens with one device per coordinate") {
    for (std::uint32_t rows = 1; rows <= 8; ++rows) {
      for (std::uint32_t cols = 1; cols <= 8; ++cols) {
        auto mesh = MeshDevice::create({rows, cols}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), std::make_shared<Tracker>());
        REQUIRE(mesh.has_value());
        CHECK(mesh->device_count() == rows * cols);
        CHECK(mesh->device_id({rows - 1, cols - 1}).value() == DeviceId{rows * cols - 1});
        CHECK(mesh->device_id({rows, 0}).error().code == ErrorCode::invalid_argument);
        CHECK(mesh->resident_bytes({0, cols}).error().code == ErrorCode::invalid_argument);
        CHECK(mesh->is_open());
      }
    }
  }

  TEST_CASE("bad meshes are refused with a reason") {
    const auto tracker = std::make_shared<Tracker>();
    CHECK(MeshDevice::create({0, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).error().code == ErrorCode::invalid_argument);
    CHECK(MeshDevice::create({9, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).error().code == ErrorCode::invalid_argument);
    DeviceSpec broken = DeviceSpec::wormhole_b0();
    broken.dram.bank_count = 0;
    const auto result = MeshDevice::create({1, 1}, broken, tracker);
    REQUIRE_FALSE(result.has_value());
    CHECK(result.error().message.find("dram") != std::string::npos);
  }

  TEST_CASE("a memory view shows one device's banks as tt-metal's MemoryView does") {
    auto mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), std::make_shared<Tracker>()).value();
    const std::uint64_t bank = mesh.spec().dram.bank_size;
    auto empty = mesh.memory_view(DeviceId{7}, BufferType::dram).value();
    CHECK(empty.num_banks == 12);
    CHECK(empty.total_bytes_per_bank == bank);
    CHECK(empty.total_bytes_allocated_per_bank == 0);
    CHECK(empty.total_bytes_free_per_bank == bank);
    CHECK(empty.largest_contiguous_bytes_free_per_bank == bank);
    const std::uint64_t base = 32;  // tt-metal's DRAM unreserved base on a Wormhole
    CHECK(empty.block_table == std::vector<Block>{{.address = base, .size = bank, .allocated = false}});

    // 25 pages of 2 KiB over 12 banks: 3 pages (6 KiB) in every bank, bottom-up from the base.
    auto first = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 25 * 2048},
                                    {.page_size = 2048, .buffer_type = BufferType::dram})
                     .value();
    auto second = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 1024},
                                     {.page_size = 1024, .buffer_type = BufferType::dram})
                      .value();
    first.deallocate();  // a hole below the second buffer
    const auto view = mesh.memory_view(DeviceId{0}, BufferType::dram).value();
    CHECK(view.total_bytes_allocated_per_bank == 1024);
    CHECK(view.total_bytes_free_per_bank == bank - 1024);
    CHECK(view.largest_contiguous_bytes_free_per_bank == bank - 6144 - 1024);
    CHECK(view.block_table == std::vector<Block>{{.address = base, .size = 6144, .allocated = false},
                                                 {.address = base + 6144, .size = 1024, .allocated = true},
                                                 {.address = base + 7168, .size = bank - 7168, .allocated = false}});
    CHECK(mesh.memory_view(DeviceId{3}, BufferType::dram).value().block_table == view.block_table);  // lock-step
    CHECK(mesh.memory_view(DeviceId{0}, BufferType::l1).value().num_banks == 64);

    const auto outside = mesh.memory_view(DeviceId{8}, BufferType::dram);
    REQUIRE_FALSE(outside.has_value());
    CHECK(outside.error().code == ErrorCode::not_found);
    CHECK(outside.error().message == "device 8 is not on this 2x4 mesh (devices 0 to 7)");
    mesh.close();
    const auto closed = mesh.memory_view(DeviceId{0}, BufferType::dram);
    REQUIRE_FALSE(closed.has_value());
    CHECK(closed.error().code == ErrorCode::device_closed);
  }

  TEST_CASE("allocator figures of a new mesh: everything free") {
    auto mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), std::make_shared<Tracker>()).value();
    const AllocatorStatistics dram = mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value();
    CHECK(dram.allocated_bytes == 0);
    CHECK(dram.total_bytes == mesh.spec().dram.bank_size);
    CHECK(mesh.memory_view(DeviceId{0}, BufferType::l1).value().block_table.size() == 1);
    mesh.close();
    CHECK_FALSE(mesh.is_open());
    mesh.close();  // idempotent
    CHECK_FALSE(mesh.is_open());
  }
}
