// What a user restating tt-metal's allocator and MeshBuffer tests against meshrt sees: the same
// addresses and figures. The tt-metal source of each figure is named above its test (ADR 0006).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

MeshDevice open(MeshShape shape, DeviceSpec spec = testing::without_system_buffers(DeviceSpec::wormhole_b0())) {
  return MeshDevice::create(shape, std::move(spec), std::make_shared<Tracker>()).value();
}

std::uint64_t allocated(const MeshDevice& mesh, std::uint32_t device, BufferType type) {
  return mesh.allocator_statistics(DeviceId{device}, type).value().allocated_bytes;
}

}  // namespace

TEST_SUITE("tt-metal fidelity") {
  // tt-metal: bank_manager.cpp builds each bank's free list with the DRAM alignment (32 B on
  // Wormhole) as granule, L1 included; buffer.cpp pads L1 pages to 16 B. So a one-page 16 B L1
  // buffer takes 32 B at the top of every L1 bank (1,499,136 - 32), the next one 32 B under it.
  TEST_CASE("small L1 buffers land in 32-byte steps from the top of L1") {
    MeshDevice mesh = open({1, 1});
    const DeviceLocalBufferConfig l1{.page_size = 16, .buffer_type = BufferType::l1};
    const auto first = DeviceBuffer::create(mesh, {0, 0}, 16, l1).value();
    const auto second = DeviceBuffer::create(mesh, {0, 0}, 16, l1).value();
    CHECK(first.address() == 1'499'136 - 32);
    CHECK(second.address() == 1'499'136 - 64);
    CHECK(allocated(mesh, 0, BufferType::l1) == 64);
  }

  // tt-metal: allocator.cpp starts the DRAM bank manager at the unreserved base (32 B on
  // Wormhole); DRAM grows bottom-up.
  TEST_CASE("the first DRAM buffer sits at the DRAM unreserved base") {
    MeshDevice mesh = open({1, 1});
    const auto buffer =
        MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 2048}, {.page_size = 2048}).value();
    CHECK(buffer.address() == 32);
    MeshDevice blackhole = open({1, 1}, testing::without_system_buffers(DeviceSpec::blackhole()));
    CHECK(MeshBuffer::create(blackhole, ReplicatedBufferConfig{.size = 8 * 2048}, {.page_size = 2048})
              .value()
              .address() == 64);
  }

  // tt-metal: test_free_list_opt_allocator.cpp, FirstFit, restated on a device: first fit (the
  // presets' policy) takes the 3-page hole at the bottom; best fit the exact hole above it.
  TEST_CASE("a new DRAM buffer takes the first hole that holds it") {
    for (const AllocatorPolicy policy : {AllocatorPolicy::first_fit, AllocatorPolicy::best_fit}) {
      CAPTURE(to_string(policy));
      DeviceSpec spec = testing::without_system_buffers(DeviceSpec::wormhole_b0());
      spec.allocator_policy = policy;
      MeshDevice mesh = open({1, 1}, spec);
      // One 1 KiB page per bank: 12 KiB buffers take 1 KiB of every bank.
      const DeviceLocalBufferConfig dram{.page_size = 1024};
      const auto make = [&](std::uint64_t pages_per_bank) {
        return MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 1024 * pages_per_bank}, dram).value();
      };
      MeshBuffer a = make(1);
      MeshBuffer b = make(3);
      MeshBuffer c = make(1);
      MeshBuffer d = make(1);
      MeshBuffer e = make(1);
      CHECK(b.address() == 32 + 1024);
      CHECK(d.address() == 32 + 5 * 1024);
      b.deallocate();
      d.deallocate();
      const MeshBuffer f = make(1);
      CHECK(f.address() == (policy == AllocatorPolicy::first_fit ? 32 + 1024 : 32 + 5 * 1024));
    }
  }

  // tt-metal: DeviceLocalBufferConfig::bottom_up (std::optional<bool>); buffer.cpp defaults it to
  // is_dram(): DRAM and trace bottom-up, L1 and L1_SMALL top-down.
  TEST_CASE("a buffer can choose its direction, and unset keeps its type's") {
    MeshDevice mesh = open({1, 2});
    const std::uint64_t dram_top = mesh.spec().dram.base_address + mesh.spec().dram.bank_size;
    const std::uint64_t l1_base = mesh.spec().l1.base_address;
    const auto top_down_dram =
        MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 1024}, {.page_size = 1024, .bottom_up = false})
            .value();
    CHECK(top_down_dram.address() == dram_top - 1024);
    const auto bottom_up_l1 = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 64 * 64},
                                                 {.page_size = 64, .buffer_type = BufferType::l1, .bottom_up = true})
                                  .value();
    CHECK(bottom_up_l1.address() == l1_base);
    const auto default_l1 = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 64 * 64},
                                               {.page_size = 64, .buffer_type = BufferType::l1})
                                .value();
    CHECK(default_l1.address() == mesh.spec().l1.base_address + mesh.spec().l1.bank_size - 64);
    const auto default_dram =
        MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 1024}, {.page_size = 1024}).value();
    CHECK(default_dram.address() == mesh.spec().dram.base_address);
  }

  // tt-metal allocates a lone device's buffer from that device's allocator alone; mesh buffers
  // take one address on every device (distributed/mesh_buffer.cpp, lock-step).
  TEST_CASE("a lone device buffer takes memory on its own device only") {
    MeshDevice mesh = open({2, 2});
    const DeviceLocalBufferConfig dram{.page_size = 1024};
    const DeviceBuffer lone = DeviceBuffer::create(mesh, {1, 0}, 12 * 1024, dram).value();
    CHECK(allocated(mesh, 2, BufferType::dram) == 1024);
    CHECK(allocated(mesh, 0, BufferType::dram) == 0);
    CHECK(allocated(mesh, 3, BufferType::dram) == 0);
    // Device 0 chooses the bottom of its DRAM for the mesh buffer, taken on device 2: the mesh
    // buffer goes where all four have room, above the lone buffer.
    const MeshBuffer everywhere = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 1024}, dram).value();
    CHECK(lone.address() == 32);
    CHECK(everywhere.address() == 32 + 1024);
    for (std::uint32_t device = 0; device < 4; ++device) {
      CAPTURE(device);
      CHECK(allocated(mesh, device, BufferType::dram) == (device == 2 ? 2048 : 1024));
    }
    // A buffer on another device fits under the mesh buffer, where device 2's lone buffer is.
    const DeviceBuffer other = DeviceBuffer::create(mesh, {0, 1}, 12 * 1024, dram).value();
    CHECK(other.address() == 32);
  }

  TEST_CASE("a mesh buffer with no range free on every device at once is refused, naming why") {
    DeviceSpec spec = testing::without_system_buffers(DeviceSpec::wormhole_b0());
    MeshDevice mesh = open({1, 2}, spec);
    const std::uint64_t pages = mesh.spec().dram.bank_size / 1024;
    const DeviceLocalBufferConfig dram{.page_size = 1024};
    // Device 0 full in its lower half, device 1 in its upper half: each has half its DRAM free,
    // no address is free on both.
    const DeviceBuffer low = DeviceBuffer::create(mesh, {0, 0}, 12 * 1024 * (pages / 2), dram).value();
    const DeviceBuffer high =
        DeviceBuffer::create(mesh, {0, 1}, 12 * 1024 * (pages - pages / 2), {.page_size = 1024, .bottom_up = false})
            .value();
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().largest_free_block >= 1024);
    const auto refused = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 1024}, dram);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code == ErrorCode::out_of_memory);
    CHECK(refused.error().message.find("free in all 2 of them at once") != std::string::npos);
    CHECK(refused.error().message.find("devices 0-1") != std::string::npos);
  }

  // tt-metal: distributed/mesh_buffer.cpp (ShardedBufferConfig: replicated_dims, physical_shard_
  // shape, "The sharded tensor does not fit on the Mesh") and the mesh command queue's
  // write_sharded_buffer (which device gets which shard).
  TEST_CASE("sharding: any grid of at most one shard per device, in row- or column-major order") {
    MeshDevice mesh = open({2, 4});
    const DeviceLocalBufferConfig config{.page_size = 1, .buffer_type = BufferType::dram};
    std::vector<std::byte> data(2 * 3);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(10 + i);
    // A 1x6 tensor of bytes in 1x1 shards: six shards on a mesh of eight.
    const auto first_byte = [&](const MeshBuffer& buffer, MeshCoordinate at) {
      std::vector<std::byte> shard(buffer.size_per_device());
      REQUIRE(buffer.device_buffer(at).value()->read(shard).has_value());
      return std::to_integer<int>(shard[0]);
    };
    for (const ShardOrientation orientation : {ShardOrientation::row_major, ShardOrientation::col_major}) {
      CAPTURE(static_cast<int>(orientation));
      MeshBuffer buffer = MeshBuffer::create(mesh,
                                             ShardedBufferConfig{.global_size = 6,
                                                                 .global_shape = {1, 6},
                                                                 .shard_shape = {1, 1},
                                                                 .shard_orientation = orientation},
                                             config)
                              .value();
      REQUIRE(buffer.write(data).has_value());
      CHECK(buffer.read().value() == data);
      if (orientation == ShardOrientation::row_major) {
        CHECK(first_byte(buffer, {0, 3}) == 13);  // shard 3: device 3 in row-major order
        CHECK(first_byte(buffer, {1, 1}) == 15);  // shard 5: device 5
        CHECK(first_byte(buffer, {1, 3}) == 0);   // past the last shard: nothing written
      } else {
        CHECK(first_byte(buffer, {1, 0}) == 11);  // shard 1: down the first column
        CHECK(first_byte(buffer, {0, 2}) == 14);  // shard 4: top of the third column
        CHECK(first_byte(buffer, {1, 3}) == 0);
      }
    }
  }

  TEST_CASE("sharding: a 0 in a shard dimension replicates along it") {
    MeshDevice mesh = open({2, 4});
    const DeviceLocalBufferConfig config{.page_size = 1, .buffer_type = BufferType::dram};
    std::vector<std::byte> data(2 * 4);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(20 + i);
    // A 2x4 tensor in shards of 2 rows x 1 column, height replicated: shard c (column c of the
    // tensor) goes to every device of mesh column c (row_major).
    MeshBuffer columns = MeshBuffer::create(mesh,
                                            ShardedBufferConfig{.global_size = 8,
                                                                .global_shape = {2, 4},
                                                                .shard_shape = {0, 1}},
                                            config)
                             .value();
    CHECK(columns.size_per_device() == 2);
    REQUIRE(columns.write(data).has_value());
    CHECK(columns.read().value() == data);
    std::vector<std::byte> shard(2);
    for (std::uint32_t row = 0; row < 2; ++row) {
      REQUIRE(columns.device_buffer({row, 2}).value()->read(shard).has_value());
      CHECK(shard == std::vector<std::byte>{std::byte{22}, std::byte{26}});  // column 2: elements 2 and 6
    }
    // Both replicated: the whole tensor on every device.
    MeshBuffer everywhere = MeshBuffer::create(mesh,
                                               ShardedBufferConfig{.global_size = 8,
                                                                   .global_shape = {2, 4},
                                                                   .shard_shape = {0, 0}},
                                               config)
                                .value();
    REQUIRE(everywhere.write(data).has_value());
    std::vector<std::byte> whole(8);
    REQUIRE(everywhere.device_buffer({1, 3}).value()->read(whole).has_value());
    CHECK(whole == data);
    // Height replicated, column-major: shard r goes to every device of mesh row r, so 4 column
    // shards need 4 mesh rows; the mesh has 2.
    const auto refused = MeshBuffer::create(mesh,
                                            ShardedBufferConfig{.global_size = 8,
                                                                .global_shape = {2, 4},
                                                                .shard_shape = {0, 1},
                                                                .shard_orientation = ShardOrientation::col_major},
                                            config);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message ==
          "global shape 2x4 in shards of 0 (replicated)x1 (col_major): 4 shards (a 1x4 grid) need 16 devices, but "
          "the 2x4 mesh has 8");
  }
}
