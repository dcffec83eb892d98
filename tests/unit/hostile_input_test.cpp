// The public API fed extreme values: every call returns an Error (with a message) or succeeds,
// never crashes, never aborts on a precondition. Under the asan preset UBSan also proves that
// no arithmetic on a user-given size wrapped or divided by zero on the way.
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

// Values where arithmetic breaks: zero, small, powers of two and their neighbours, 2^32, 2^63,
// 2^64 - 1, and anything at all.
class Extremes {
 public:
  explicit Extremes(std::uint64_t seed) : random_(seed) {}

  std::uint64_t next() {
    static constexpr std::array<std::uint64_t, 16> edges{
        0, 1, 2, 3, 31, 32, 33, 1024, 4096, (1ULL << 31U), (1ULL << 32U) - 1, 1ULL << 32U, 1ULL << 48U,
        (1ULL << 63U) - 1, 1ULL << 63U, std::numeric_limits<std::uint64_t>::max()};
    switch (random_() % 4) {
      case 0: return edges[random_() % edges.size()];
      case 1: return edges[random_() % edges.size()] + (random_() % 3) - 1;  // around an edge (wraps too)
      case 2: return random_() % 100'000;
      default: return random_();
    }
  }
  std::uint32_t next32() { return static_cast<std::uint32_t>(random_() % 2 == 0 ? next() : next() % 20); }
  BufferType type() { return static_cast<BufferType>(random_() % (buffer_type_count + 2)); }  // some invalid
  bool coin() { return random_() % 2 == 0; }

 private:
  std::mt19937_64 random_;
};

void require_explained(const Error& error) { CHECK_FALSE(error.message.empty()); }

constexpr int rounds = testing::sanitized_build ? 5'000 : 40'000;

}  // namespace

TEST_SUITE("hostile input") {
  TEST_CASE("extreme sizes, shapes, pages and coordinates: an Error or a buffer, never a crash") {
    Extremes values(11);
    auto tracker = std::make_shared<Tracker>();
    auto table = std::make_shared<LiveBufferTable>();
    tracker->add_processor(table);
    auto mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::uint64_t created = 0;
    for (int round = 0; round < rounds; ++round) {
      const DeviceLocalBufferConfig config{.page_size = values.next(), .buffer_type = values.type()};
      switch (round % 4) {
        case 0: {
          auto buffer = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = values.next()}, config);
          if (!buffer) require_explained(buffer.error());
          created += buffer.has_value() ? 1 : 0;
          break;
        }
        case 1: {
          const ShardedBufferConfig sharded{.global_size = values.next(),
                                            .global_shape = {values.next(), values.next()},
                                            .shard_shape = {values.next(), values.next()}};
          auto buffer = MeshBuffer::create(mesh, sharded, config);
          if (!buffer) require_explained(buffer.error());
          created += buffer.has_value() ? 1 : 0;
          break;
        }
        case 2: {
          auto buffer = DeviceBuffer::create(mesh, {values.next32(), values.next32()}, values.next(), config);
          if (!buffer) require_explained(buffer.error());
          break;
        }
        default: {
          const MeshCoordinate at{values.next32(), values.next32()};
          auto kept = MeshBuffer::create(mesh,
                                         ReplicatedBufferConfig{.size = 4096},
                                         {.page_size = 1024, .buffer_type = BufferType::dram});
          REQUIRE(kept.has_value());
          const auto handle = kept->device_buffer(at);
          const bool inside = at.row < 2 && at.col < 4;
          CHECK(handle.has_value() == inside);
          if (!handle) require_explained(handle.error());
          const auto id = mesh.device_id(at);
          CHECK(id.has_value() == handle.has_value());
          const auto resident = mesh.resident_bytes(at);
          CHECK(resident.has_value() == handle.has_value());
          break;
        }
      }
    }
    // Random sizes do make valid buffers now and then: the invariant held for all of them.
    CHECK(created > 0);
    CHECK(table->active_allocations() == 0);
    CHECK(table->unknown_frees() == 0);
    CHECK(table->duplicate_allocations() == 0);
  }

  TEST_CASE("extreme mesh shapes and device specs: an Error or a mesh, never a crash") {
    Extremes values(12);
    for (int round = 0; round < rounds / 10; ++round) {
      DeviceSpec spec = values.coin() ? DeviceSpec::wormhole_b0() : DeviceSpec::blackhole();
      BankLayout& banks = values.coin() ? spec.dram : spec.l1;
      if (values.coin()) banks.bank_count = values.next32();
      if (values.coin()) banks.bank_size = values.next();
      if (values.coin()) banks.base_address = values.next();
      if (values.coin()) banks.alignment = values.next();
      auto mesh = MeshDevice::create({values.next32() % 12, values.next32() % 12}, spec, std::make_shared<Tracker>());
      if (!mesh) {
        require_explained(mesh.error());
        continue;
      }
      auto buffer = MeshBuffer::create(*mesh,
                                       ReplicatedBufferConfig{.size = values.next()},
                                       {.page_size = values.next(), .buffer_type = values.type()});
      if (!buffer) require_explained(buffer.error());
    }
  }

  TEST_CASE("allocator requests near 2^64: an Error or an address inside the range, never a crash") {
    Extremes values(13);
    for (int round = 0; round < rounds / 10; ++round) {
      auto allocator = BankAllocator::create(values.next(), values.next(), values.next());
      if (!allocator) {
        require_explained(allocator.error());
        continue;
      }
      for (int i = 0; i < 8; ++i) {
        const auto direction = values.coin() ? AllocationDirection::bottom_up : AllocationDirection::top_down;
        const std::uint64_t size = values.next();
        auto address = allocator->allocate(size, direction, values.next());
        if (!address) {
          require_explained(address.error());
          continue;
        }
        CHECK(*address >= allocator->base());
        CHECK(*address - allocator->base() + size <= allocator->size());
        if (values.coin()) CHECK(allocator->free(*address).has_value());
        if (allocator->alignment() > 1) CHECK_FALSE(allocator->free(values.next() | 1U).has_value());  // no block starts there
      }
    }
  }
}
