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
  TEST_CASE("wormhole_b0 has the figures of the chip") {
    const DeviceSpec spec = DeviceSpec::wormhole_b0();
    CHECK(spec.dram.bank_count == 12);
    CHECK(spec.dram.bank_size + spec.trace.bank_size == 1'073'741'824);
    CHECK(spec.dram.alignment == 32);
    CHECK(spec.l1.bank_count == 64);
    CHECK(spec.l1.bank_size + spec.l1_small.bank_size == 1'499'136);
    CHECK(spec.l1.alignment == 16);
    CHECK(spec.dram.direction == AllocationDirection::bottom_up);
    CHECK(spec.l1.direction == AllocationDirection::top_down);
    CHECK(validate(spec).has_value());
  }

  TEST_CASE("blackhole has the figures of the chip") {
    const DeviceSpec spec = DeviceSpec::blackhole();
    CHECK(spec.dram.bank_count == 8);
    CHECK(spec.dram.bank_size + spec.trace.bank_size == 4'278'190'080);
    CHECK(spec.dram.alignment == 64);
    CHECK(spec.l1.bank_count == 140);
    CHECK(spec.l1.bank_size + spec.l1_small.bank_size == 1'499'136);
    CHECK(validate(spec).has_value());
  }

  TEST_CASE("regions can be resized, and an empty carve-out is allowed") {
    const DeviceSpec spec = DeviceSpec::wormhole_b0({.l1_small_size = 0, .trace_region_size = 0});
    CHECK(spec.dram.bank_size == 1'073'741'824);
    CHECK(spec.l1.bank_size == 1'499'136);
    CHECK(validate(spec).has_value());
    const DeviceSpec unaligned = DeviceSpec::wormhole_b0({.l1_small_size = 100, .trace_region_size = 0});
    CHECK(validate(unaligned).error().code == ErrorCode::invalid_argument);
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

    memory.discard(BufferType::dram, 12, 4096 * 10 + 100, 10000);
    CHECK(memory.resident_bytes() == 2 * SimulatedMemory::chunk_size);  // chunk 11 was wholly inside
    memory.read(BufferType::dram, 3, 4096 * 10 + 100, back);
    CHECK(back == std::vector<std::byte>(10000, std::byte{0}));
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
    CHECK(empty.block_table == std::vector<Block>{{.address = 0, .size = bank, .allocated = false}});

    // 25 pages of 2 KiB over 12 banks: 3 pages (6 KiB) in every bank, bottom-up from address 0.
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
    CHECK(view.block_table == std::vector<Block>{{.address = 0, .size = 6144, .allocated = false},
                                                 {.address = 6144, .size = 1024, .allocated = true},
                                                 {.address = 7168, .size = bank - 7168, .allocated = false}});
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
    const AllocatorStatistics dram = mesh.allocator_statistics(BufferType::dram);
    CHECK(dram.allocated_bytes == 0);
    CHECK(dram.total_bytes == mesh.spec().dram.bank_size);
    CHECK(mesh.block_table(BufferType::l1).size() == 1);
    mesh.close();
    CHECK_FALSE(mesh.is_open());
    mesh.close();  // idempotent
    CHECK_FALSE(mesh.is_open());
  }
}
