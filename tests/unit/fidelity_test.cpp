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
  TEST_CASE("a buffer can choose its direction; unset keeps its type's") {
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
    CHECK(refused.error().message.find("free on all 2 devices at once") != std::string::npos);
    CHECK(refused.error().message.find("devices 0-1") != std::string::npos);
  }
}
