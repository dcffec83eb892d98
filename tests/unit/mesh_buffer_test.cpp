// MeshBuffer data paths: replicated and sharded writes and reads, with their checks.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

std::vector<std::byte> pattern(std::size_t size, std::uint32_t seed) {
  std::vector<std::byte> bytes(size);
  for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<std::byte>((i * 131 + seed * 7) & 0xFFU);
  return bytes;
}

MeshDevice open(MeshShape shape) {
  return MeshDevice::create(shape, testing::without_system_buffers(DeviceSpec::wormhole_b0()), std::make_shared<Tracker>()).value();
}

}  // namespace

TEST_SUITE("mesh buffer data") {
  TEST_CASE("replicated: every device holds the same bytes") {
    MeshDevice mesh = open({2, 4});
    auto buffer = MeshBuffer::create(mesh,
                                     ReplicatedBufferConfig{.size = 50 * 1024},
                                     {.page_size = 1024, .buffer_type = BufferType::dram})
                      .value();
    const auto data = pattern(50 * 1024, 1);
    REQUIRE(buffer.write(data).has_value());
    CHECK(buffer.read().value() == data);
    for (std::uint32_t i = 0; i < 8; ++i) {
      std::vector<std::byte> back(50 * 1024);
      REQUIRE(buffer.device_buffer(mesh.shape().coordinate_of(i)).value()->read(back).has_value());
      CHECK(back == data);
    }
  }

  TEST_CASE("sharded: each device holds its own tile of the row-major tensor") {
    MeshDevice mesh = open({2, 2});
    // A 4x6 tensor of 4-byte elements cut into 2x3 shards: device (r, c) holds rows 2r..2r+1,
    // columns 3c..3c+2.
    auto buffer = MeshBuffer::create(mesh,
                                     ShardedBufferConfig{.global_size = 4 * 6 * 4,
                                                         .global_shape = {4, 6},
                                                         .shard_shape = {2, 3}},
                                     {.page_size = 12, .buffer_type = BufferType::l1})
                      .value();
    CHECK(buffer.is_sharded());
    CHECK(buffer.size_per_device() == 24);
    std::vector<std::byte> data(96);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i);
    REQUIRE(buffer.write(data).has_value());
    CHECK(buffer.read().value() == data);

    std::vector<std::byte> shard(24);
    REQUIRE(buffer.device_buffer({1, 1}).value()->read(shard).has_value());
    // Element (2, 3) of the tensor is the first of shard (1, 1): byte offset (2 * 6 + 3) * 4 = 60.
    CHECK(shard[0] == std::byte{60});
    CHECK(shard[12] == std::byte{84});  // element (3, 3)
  }

  TEST_CASE("sharded shapes that do not fit the mesh are refused") {
    MeshDevice mesh = open({2, 4});
    const DeviceLocalBufferConfig config{.page_size = 4, .buffer_type = BufferType::dram};
    const auto too_many =
        MeshBuffer::create(mesh,
                           ShardedBufferConfig{.global_size = 64, .global_shape = {4, 4}, .shard_shape = {1, 1}},
                           config);
    REQUIRE_FALSE(too_many.has_value());
    CHECK(too_many.error().message ==
          "global shape 4x4 in shards of 1x1 (row_major): 16 shards (a 4x4 grid) need 16 devices, but the 2x4 "
          "mesh has 8");
    const auto ragged =
        MeshBuffer::create(mesh,
                           ShardedBufferConfig{.global_size = 64, .global_shape = {4, 4}, .shard_shape = {3, 1}},
                           config);
    CHECK(ragged.error().message.find("does not tile") != std::string::npos);
    const auto empty =
        MeshBuffer::create(mesh,
                           ShardedBufferConfig{.global_size = 64, .global_shape = {0, 4}, .shard_shape = {1, 1}},
                           config);
    CHECK(empty.error().code == ErrorCode::invalid_argument);
    const auto fractional =
        MeshBuffer::create(mesh,
                           ShardedBufferConfig{.global_size = 65, .global_shape = {2, 4}, .shard_shape = {1, 1}},
                           config);
    CHECK(fractional.error().message.find("per element") != std::string::npos);
  }

  TEST_CASE("transfers of the wrong size are refused and change nothing") {
    MeshDevice mesh = open({1, 2});
    auto buffer = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 4096}, {.page_size = 1024}).value();
    const auto data = pattern(4096, 3);
    REQUIRE(buffer.write(data).has_value());
    const auto short_write = buffer.write(std::span(data).first(100));
    REQUIRE_FALSE(short_write.has_value());
    CHECK(short_write.error().message.find("holds 4096 bytes, got a transfer of 100") != std::string::npos);
    CHECK(buffer.read().value() == data);
    std::vector<std::byte> too_long(5000);
    CHECK_FALSE(buffer.device_buffer({0, 1}).value()->read(too_long).has_value());
  }

  TEST_CASE("pages land in banks round-robin: memory is held only where pages were written") {
    MeshDevice mesh = open({1, 1});
    // 12 pages of 4096 bytes: one page per DRAM bank. Memory is held in 4 KiB chunks, so a page
    // off a chunk boundary (DRAM starts at 32 B, above tt-metal's reserved barrier) holds two.
    auto buffer = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 12 * 4096}, {.page_size = 4096}).value();
    CHECK(mesh.resident_bytes({0, 0}).value() == 0);
    REQUIRE(buffer.write(pattern(12 * 4096, 5)).has_value());
    const std::uint64_t chunks_per_page = buffer.address() % 4096 == 0 ? 1 : 2;
    CHECK(mesh.resident_bytes({0, 0}).value() == 12 * 4096 * chunks_per_page);
    buffer.deallocate();
    CHECK(mesh.resident_bytes({0, 0}).value() == 0);  // freed memory costs nothing again
  }

  TEST_CASE("a new buffer at a reused address reads zeros, not the last owner's bytes") {
    MeshDevice mesh = open({1, 1});
    const DeviceLocalBufferConfig config{.page_size = 1024};
    std::uint64_t address = 0;
    {
      auto first = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 8192}, config).value();
      REQUIRE(first.write(pattern(8192, 9)).has_value());
      address = first.address();
    }
    auto second = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 8192}, config).value();
    REQUIRE(second.address() == address);
    CHECK(second.read().value() == std::vector<std::byte>(8192));
  }

  TEST_CASE("names given in the config are kept") {
    MeshDevice mesh = open({1, 1});
    auto buffer =
        MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 1024, .name = "kv-cache"}, {.page_size = 1024}).value();
    CHECK(buffer.name() == "kv-cache");
  }
}
