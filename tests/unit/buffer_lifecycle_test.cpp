// The device buffer state machine, edge by edge, and the seed regression.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

// A mesh without system buffers: these tests count every event of the buffers they make.
struct Mesh {
  explicit Mesh(MeshShape shape = {2, 4}, DeviceSpec spec = testing::without_system_buffers(DeviceSpec::wormhole_b0()))
      : mesh(MeshDevice::create(shape, std::move(spec), tracker).value()) {}
  std::shared_ptr<Tracker> tracker = [] { return std::make_shared<Tracker>(); }();
  std::shared_ptr<testing::EventLog> log = [this] {
    auto l = std::make_shared<testing::EventLog>();
    tracker->add_processor(l);
    return l;
  }();
  std::shared_ptr<LiveBufferTable> live = [this] {
    auto t = std::make_shared<LiveBufferTable>();
    tracker->add_processor(t);
    return t;
  }();
  MeshDevice mesh;
};

constexpr DeviceLocalBufferConfig dram_pages{.page_size = 2048, .buffer_type = BufferType::dram};

MeshBuffer replicated(MeshDevice& mesh, std::uint64_t size, DeviceLocalBufferConfig config = dram_pages) {
  auto buffer = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = size}, config);
  REQUIRE(buffer.has_value());
  return std::move(*buffer);
}

DeviceBuffer single(MeshDevice& mesh, MeshCoordinate at, std::uint64_t size) {
  auto buffer = DeviceBuffer::create(mesh, at, size, dram_pages);
  REQUIRE(buffer.has_value());
  return std::move(*buffer);
}

std::size_t count_frees(const testing::EventLog& log, FreeReason reason) {
  return static_cast<std::size_t>(std::ranges::count_if(
      log.events(), [reason](const AllocationEvent& e) { return e.kind == EventKind::free && e.reason == reason; }));
}

}  // namespace

TEST_SUITE("buffer lifecycle") {
  TEST_CASE("allocate: one Alloc per device, same address everywhere, full details") {
    Mesh m;
    MeshBuffer buffer = replicated(m.mesh, 64 * 2048);
    const auto allocs = m.log->of_kind(EventKind::allocate);
    REQUIRE(allocs.size() == 8);
    std::set<std::uint32_t> devices;
    std::set<BufferId> ids;
    for (const AllocationEvent& event : allocs) {
      devices.insert(event.device.value());
      ids.insert(event.buffer);
      CHECK(event.address == buffer.address());
      CHECK(event.size == 64 * 2048);
      CHECK(event.footprint == 6 * 2048 * 12);  // ceil(64 / 12) pages per bank, 12 banks
      CHECK(event.type == BufferType::dram);
      CHECK(event.mesh_buffer == buffer.id());
      CHECK(event.reason == FreeReason::none);
      CHECK_FALSE(event.hooked);
      CHECK(event.time_ns > 0);
    }
    CHECK(devices.size() == 8);
    CHECK(ids.size() == 8);
    CHECK(buffer.is_allocated());
    CHECK(buffer.device_buffer({1, 3}).value()->state() == DeviceBufferState::allocated);
    CHECK(m.log->of_kind(EventKind::free).empty());
  }

  TEST_CASE("allocated -> deallocated by DeviceBuffer::deallocate(): one Free, reason explicit") {
    Mesh m;
    DeviceBuffer buffer = single(m.mesh, {1, 2}, 4096);
    const BufferId id = buffer.id();
    buffer.deallocate();
    CHECK(buffer.state() == DeviceBufferState::deallocated);
    const auto events = m.log->of_buffer(id);
    REQUIRE(events.size() == 2);
    CHECK(events[1].kind == EventKind::free);
    CHECK(events[1].reason == FreeReason::explicit_deallocate);
    CHECK(events[1].device == DeviceId{6});
    CHECK(m.mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
  }

  TEST_CASE("allocated -> deallocated by the destructor: one Free, reason destructor") {
    Mesh m;
    BufferId id{};
    {
      DeviceBuffer buffer = single(m.mesh, {0, 0}, 4096);
      id = buffer.id();
    }
    const auto events = m.log->of_buffer(id);
    REQUIRE(events.size() == 2);
    CHECK(events[1].reason == FreeReason::destructor);
    CHECK(m.mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
  }

  TEST_CASE("deallocate() twice, then the destructor: still exactly one Free") {
    Mesh m;
    {
      DeviceBuffer buffer = single(m.mesh, {0, 1}, 4096);
      buffer.deallocate();
      buffer.deallocate();
    }
    CHECK(m.log->of_kind(EventKind::free).size() == 1);
    const auto audit = m.log->audit();
    CHECK(audit.double_frees == 0);
    CHECK(audit.still_live == 0);
  }

  TEST_CASE("a moved-from handle owns nothing and reports nothing") {
    Mesh m;
    {
      DeviceBuffer first = single(m.mesh, {0, 0}, 4096);
      const BufferId id = first.id();
      DeviceBuffer second = std::move(first);
      CHECK_FALSE(first.owns_buffer());  // NOLINT(bugprone-use-after-move): the point of the test
      first.deallocate();                // NOLINT(bugprone-use-after-move)
      CHECK(m.log->of_kind(EventKind::free).empty());
      CHECK(second.id() == id);
      CHECK(second.is_allocated());
    }
    CHECK(m.log->of_kind(EventKind::free).size() == 1);
    CHECK(m.log->audit().still_live == 0);
  }

  TEST_CASE("move-assigning over a live handle frees what it held, once, reason move_assigned") {
    Mesh m;
    DeviceBuffer a = single(m.mesh, {0, 0}, 4096);
    DeviceBuffer b = single(m.mesh, {0, 1}, 4096);
    const BufferId old_id = a.id();
    const BufferId kept_id = b.id();
    a = std::move(b);
    const auto old_events = m.log->of_buffer(old_id);
    REQUIRE(old_events.size() == 2);
    CHECK(old_events[1].reason == FreeReason::move_assigned);
    CHECK(a.id() == kept_id);
    CHECK(m.log->of_buffer(kept_id).size() == 1);
  }

  TEST_CASE("allocated -> device_closed by MeshDevice::close(): one Free each, nothing when the handles die") {
    Mesh m;
    {
      MeshBuffer mesh_buffer = replicated(m.mesh, 8 * 2048);
      DeviceBuffer lone = single(m.mesh, {1, 1}, 2048);
      m.mesh.close();
      CHECK(count_frees(*m.log, FreeReason::device_closed) == 9);
      CHECK(lone.state() == DeviceBufferState::device_closed);
      CHECK(mesh_buffer.device_buffer({0, 0}).value()->state() == DeviceBufferState::device_closed);
      CHECK_FALSE(mesh_buffer.is_allocated());
      lone.deallocate();
      mesh_buffer.deallocate();
    }
    CHECK(m.log->of_kind(EventKind::free).size() == 9);
    const auto audit = m.log->audit();
    CHECK(audit.still_live == 0);
    CHECK(audit.double_frees == 0);
    CHECK(m.live->active_allocations() == 0);
  }

  TEST_CASE("a mesh device destroyed before its buffers closes them, the buffers stay safe") {
    auto tracker = std::make_shared<Tracker>();
    auto log = std::make_shared<testing::EventLog>();
    tracker->add_processor(log);
    std::optional<MeshDevice> mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    MeshBuffer buffer = replicated(*mesh, 4 * 2048);
    mesh.reset();
    CHECK(log->of_kind(EventKind::free).size() == 8);
    CHECK(buffer.device_buffer({0, 2}).value()->state() == DeviceBufferState::device_closed);
    std::vector<std::byte> bytes(4 * 2048);
    const auto write = buffer.write(bytes);
    REQUIRE_FALSE(write.has_value());
    CHECK(write.error().message.find("device_closed") != std::string::npos);
    buffer.deallocate();
    CHECK(log->of_kind(EventKind::free).size() == 8);
    CHECK(log->audit().still_live == 0);
  }

  TEST_CASE("allocating on a closed mesh is an error and reports nothing") {
    Mesh m;
    m.mesh.close();
    const auto buffer = MeshBuffer::create(m.mesh, ReplicatedBufferConfig{.size = 2048}, dram_pages);
    REQUIRE_FALSE(buffer.has_value());
    CHECK(buffer.error().code == ErrorCode::device_closed);
    CHECK(m.log->events().empty());
  }

  TEST_CASE("seed regression: MeshBuffer::deallocate() with the mesh alive frees all 8 device buffers") {
    Mesh m;
    MeshBuffer buffer = replicated(m.mesh, 16 * 2048);
    REQUIRE(m.live->live_buffers_of(buffer.id()).size() == 8);
    REQUIRE(m.mesh.is_open());
    buffer.deallocate();
    CHECK(m.live->live_buffers_of(buffer.id()).empty());
    for (std::uint32_t device = 0; device < 8; ++device) {
      CAPTURE(device);
      CHECK(m.live->summary(DeviceId{device}, BufferType::dram) == LiveBufferSummary{});
      CHECK(buffer.device_buffer(m.mesh.shape().coordinate_of(device)).value()->state() == DeviceBufferState::deallocated);
    }
    CHECK(count_frees(*m.log, FreeReason::mesh_deallocate) == 8);
    CHECK(m.mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
    CHECK_FALSE(buffer.is_allocated());
    buffer.deallocate();  // idempotent
    CHECK(m.log->of_kind(EventKind::free).size() == 8);
  }

  TEST_CASE("the seed scenario: 16 buffers, DRAM 100 MiB and L1 12 MiB on device 0, then nothing") {
    // The preset as it is: its system buffers are open beside the seed's (ADR 0006, 0020).
    Mesh m({2, 4}, DeviceSpec::wormhole_b0());
    const SystemBuffers& system = m.mesh.spec().system_buffers;
    std::vector<MeshBuffer> buffers;
    for (int i = 0; i < 8; ++i) buffers.push_back(replicated(m.mesh, 13'107'200));
    for (int i = 0; i < 8; ++i) {
      buffers.push_back(replicated(m.mesh, 1'572'864, {.page_size = 2048, .buffer_type = BufferType::l1}));
    }
    CHECK(m.live->summary(DeviceId{0}, BufferType::dram, AllocationCategory::buffer) == LiveBufferSummary{8, 104'857'600});
    CHECK(m.live->summary(DeviceId{0}, BufferType::l1, AllocationCategory::buffer) == LiveBufferSummary{8, 12'582'912});
    // The device totals hold the command queue and dispatch buffers too.
    CHECK(m.live->summary(DeviceId{0}, BufferType::dram) == LiveBufferSummary{8 + 2, 104'857'600 + system.dram_bytes()});
    CHECK(m.live->summary(DeviceId{0}, BufferType::l1) == LiveBufferSummary{8 + 1, 12'582'912 + system.l1_dispatch});
    CHECK(m.live->active_allocations() == 128 + 3 * 8);
    for (MeshBuffer& buffer : buffers) buffer.deallocate();
    CHECK(m.live->active_allocations() == 3 * 8);  // the system buffers stay until the mesh closes
    CHECK(m.live->summary(DeviceId{0}, BufferType::dram, AllocationCategory::buffer) == LiveBufferSummary{});
    CHECK(m.live->unknown_frees() == 0);
    buffers.clear();
    CHECK(m.log->of_kind(EventKind::free).size() == 128);
    m.mesh.close();
    CHECK(m.live->active_allocations() == 0);
    CHECK(m.log->of_kind(EventKind::free).size() == 128 + 3 * 8);
  }

  TEST_CASE("a device buffer deallocated alone gives its own device's range back at once") {
    Mesh m;
    MeshBuffer buffer = replicated(m.mesh, 2048);
    const auto dram_of = [&](std::uint32_t device) {
      return m.mesh.allocator_statistics(DeviceId{device}, BufferType::dram).value().allocated_bytes;
    };
    const std::uint64_t reserved = dram_of(0);
    CHECK(reserved > 0);
    buffer.device_buffer({0, 0}).value()->deallocate();
    CHECK(m.live->live_buffers_of(buffer.id()).size() == 7);
    CHECK(dram_of(0) == 0);  // the allocator agrees with the tracker, device by device
    CHECK(dram_of(1) == reserved);
    CHECK_FALSE(buffer.is_allocated());
    buffer.deallocate();
    CHECK(m.live->live_buffers_of(buffer.id()).empty());
    CHECK(dram_of(1) == 0);
    CHECK(count_frees(*m.log, FreeReason::explicit_deallocate) == 1);
    CHECK(count_frees(*m.log, FreeReason::mesh_deallocate) == 7);
  }

  TEST_CASE("a device buffer moved out of its mesh buffer is freed by its new owner only") {
    Mesh m;
    DeviceBuffer taken;
    BufferId taken_id{};
    {
      MeshBuffer buffer = replicated(m.mesh, 2048);
      taken = std::move(*buffer.device_buffer({1, 0}).value());
      taken_id = taken.id();
      const auto read = buffer.read();
      REQUIRE_FALSE(read.has_value());
      CHECK(read.error().message.find("moved out") != std::string::npos);
    }
    CHECK(m.log->of_kind(EventKind::free).size() == 7);
    CHECK(taken.is_allocated());
    taken.deallocate();
    CHECK(m.log->of_buffer(taken_id).back().reason == FreeReason::explicit_deallocate);
    CHECK(m.log->audit().still_live == 0);
    CHECK(m.mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
  }

  TEST_CASE("a failed allocation creates no handle and reports nothing") {
    Mesh m;
    const auto too_big = MeshBuffer::create(m.mesh,
                                            ReplicatedBufferConfig{.size = 2048ULL * 1024 * 1024 * 1024},
                                            dram_pages);
    REQUIRE_FALSE(too_big.has_value());
    CHECK(too_big.error().code == ErrorCode::out_of_memory);
    // All of DRAM but one page per bank, in whole 2 KiB pages per bank.
    MeshBuffer big = replicated(m.mesh, (m.mesh.spec().dram.bank_size / 2048 - 1) * 12 * 2048);
    const auto no_room = MeshBuffer::create(m.mesh, ReplicatedBufferConfig{.size = 24 * 2048}, dram_pages);
    REQUIRE_FALSE(no_room.has_value());
    CHECK(no_room.error().code == ErrorCode::out_of_memory);
    CHECK(no_room.error().message.find("largest free block") != std::string::npos);
    CHECK(m.log->events().size() == 8);  // only big's Allocs
  }

  TEST_CASE("zero-size buffers take nothing and report nothing") {
    Mesh m;
    {
      MeshBuffer empty = replicated(m.mesh, 0);
      CHECK(empty.size() == 0);
      CHECK(empty.read().value().empty());
      CHECK(empty.write({}).has_value());
      CHECK_FALSE(empty.device_buffer({0, 0}).value()->owns_buffer());
      auto lone = DeviceBuffer::create(m.mesh, {0, 0}, 0, dram_pages);
      REQUIRE(lone.has_value());
      CHECK_FALSE(lone->owns_buffer());
    }
    CHECK(m.log->events().empty());
  }

  TEST_CASE("a hooked allocation is reported, flagged, and takes no device memory") {
    struct PlanOnly final : AllocationHook {
      std::optional<std::uint64_t> intercept(const AllocationRequest&) noexcept override { return 0x4000; }
    };
    Mesh m;
    m.tracker->add_hook(std::make_shared<PlanOnly>());
    {
      MeshBuffer buffer = replicated(m.mesh, 4 * 2048);
      CHECK(buffer.address() == 0x4000);
      CHECK(m.mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
      const auto allocs = m.log->of_kind(EventKind::allocate);
      REQUIRE(allocs.size() == 8);
      CHECK(std::ranges::all_of(allocs, &AllocationEvent::hooked));
      std::vector<std::byte> bytes(4 * 2048);
      const auto write = buffer.write(bytes);
      REQUIRE_FALSE(write.has_value());
      CHECK(write.error().message.find("hook") != std::string::npos);
    }
    const auto frees = m.log->of_kind(EventKind::free);
    REQUIRE(frees.size() == 8);
    CHECK(std::ranges::all_of(frees, &AllocationEvent::hooked));
  }

  TEST_CASE("bad buffer requests get clear errors") {
    Mesh m;
    const auto zero_page = MeshBuffer::create(m.mesh, ReplicatedBufferConfig{.size = 64}, {.page_size = 0});
    CHECK(zero_page.error().message.find("page size 0") != std::string::npos);
    const auto ragged = MeshBuffer::create(m.mesh, ReplicatedBufferConfig{.size = 3000}, dram_pages);
    CHECK(ragged.error().message.find("pad it to 4096") != std::string::npos);
    const auto outside = DeviceBuffer::create(m.mesh, {2, 0}, 2048, dram_pages);
    CHECK(outside.error().message.find("outside") != std::string::npos);
    const auto no_region = [&] {
      auto spec = testing::without_system_buffers(DeviceSpec::wormhole_b0({.l1_small_size = 0, .trace_region_size = 0}));
      auto mesh = MeshDevice::create({1, 1}, spec, m.tracker).value();
      return MeshBuffer::create(mesh,
                                ReplicatedBufferConfig{.size = 64},
                                {.page_size = 64, .buffer_type = BufferType::trace});
    }();
    REQUIRE_FALSE(no_region.has_value());
    CHECK(no_region.error().message.find("no trace region") != std::string::npos);
    CHECK(m.log->events().empty());
  }
}
