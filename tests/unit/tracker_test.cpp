#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

AllocationEvent alloc_event(std::uint64_t id, std::uint32_t device, BufferType type, std::uint64_t size) {
  return AllocationEvent{.kind = EventKind::allocate, .type = type, .device = DeviceId{device},
                         .buffer = BufferId{id}, .size = size};
}

AllocationEvent free_event(std::uint64_t id, std::uint32_t device, BufferType type) {
  return AllocationEvent{.kind = EventKind::free, .reason = FreeReason::destructor, .type = type,
                         .device = DeviceId{device}, .buffer = BufferId{id}};
}

struct FixedAddressHook final : AllocationHook {
  std::optional<std::uint64_t> intercept(const AllocationRequest& request) noexcept override {
    seen.push_back(request);
    return 0xC0FFEE0;
  }
  std::vector<AllocationRequest> seen;
};

}  // namespace

TEST_SUITE("tracking") {
  TEST_CASE("every processor sees every batch, in order") {
    Tracker tracker;
    auto first = std::make_shared<testing::EventLog>();
    auto second = std::make_shared<testing::EventLog>();
    tracker.add_processor(first);
    tracker.add_processor(second);
    const std::vector<AllocationEvent> batch{alloc_event(1, 0, BufferType::dram, 64), free_event(1, 0, BufferType::dram)};
    tracker.record(batch);
    CHECK(first->events().size() == 2);
    CHECK(second->events().size() == 2);
    CHECK(first->events()[1].kind == EventKind::free);
    tracker.remove_processor(*second);
    tracker.record(batch);
    CHECK(first->events().size() == 4);
    CHECK(second->events().size() == 2);
  }

  TEST_CASE("the first hook that intercepts decides") {
    Tracker tracker;
    CHECK_FALSE(tracker.intercept({}).has_value());
    auto hook = std::make_shared<FixedAddressHook>();
    tracker.add_hook(hook);
    CHECK(tracker.intercept({.type = BufferType::l1, .size_per_device = 64}).value() == 0xC0FFEE0);
    REQUIRE(hook->seen.size() == 1);
    CHECK(hook->seen[0].type == BufferType::l1);
    tracker.remove_hook(*hook);
    CHECK_FALSE(tracker.intercept({}).has_value());
  }

  TEST_CASE("a buffer's category goes with its Alloc, its hook request and its Free") {
    auto tracker = std::make_shared<Tracker>();
    auto table = std::make_shared<LiveBufferTable>();
    tracker->add_processor(table);
    MeshDevice mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    auto user = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 4096},
                                   {.page_size = 1024, .buffer_type = BufferType::dram})
                    .value();
    auto cached = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 2048},
                                     {.page_size = 1024, .buffer_type = BufferType::dram,
                                      .category = AllocationCategory::program})
                      .value();
    CHECK(user.category() == AllocationCategory::buffer);
    CHECK(cached.category() == AllocationCategory::program);
    CHECK(cached.device_buffer({0, 1}).value()->category() == AllocationCategory::program);
    const auto summary = [&](std::uint32_t device, AllocationCategory category) {
      return table->summary(DeviceId{device}, BufferType::dram, category);
    };
    CHECK(summary(1, AllocationCategory::buffer) == LiveBufferSummary{1, 4096});
    CHECK(summary(1, AllocationCategory::program) == LiveBufferSummary{1, 2048});
    CHECK(table->summary(DeviceId{1}, BufferType::dram) == LiveBufferSummary{2, 6144});
    REQUIRE(table->live_buffers_of(cached.id()).size() == 2);
    CHECK(table->live_buffers_of(cached.id())[0].category == AllocationCategory::program);
    cached.deallocate();
    CHECK(summary(0, AllocationCategory::program) == LiveBufferSummary{});
    CHECK(summary(0, AllocationCategory::buffer) == LiveBufferSummary{1, 4096});

    auto hook = std::make_shared<FixedAddressHook>();
    tracker->add_hook(hook);
    auto hooked = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 1024},
                                     {.page_size = 1024, .buffer_type = BufferType::l1,
                                      .category = AllocationCategory::circular_buffer});
    REQUIRE(hooked.has_value());
    REQUIRE(hook->seen.size() == 1);
    CHECK(hook->seen[0].category == AllocationCategory::circular_buffer);
    tracker->remove_hook(*hook);
    mesh.close();
    CHECK(table->active_allocations() == 0);
    CHECK(table->unknown_frees() == 0);
  }

  TEST_CASE("the live table answers per device and type, and counts impossible events") {
    LiveBufferTable table;
    const std::vector<AllocationEvent> events{
        alloc_event(1, 0, BufferType::dram, 100), alloc_event(2, 0, BufferType::dram, 50),
        alloc_event(3, 1, BufferType::l1, 10),    free_event(1, 0, BufferType::dram),
        free_event(99, 0, BufferType::dram),      alloc_event(2, 0, BufferType::dram, 50),
    };
    table.process(events);
    CHECK(table.active_allocations() == 2);
    CHECK(table.summary(DeviceId{0}, BufferType::dram) == LiveBufferSummary{1, 50});
    CHECK(table.summary(DeviceId{1}, BufferType::l1) == LiveBufferSummary{1, 10});
    CHECK(table.summary(DeviceId{1}, BufferType::dram) == LiveBufferSummary{});
    CHECK(table.live_buffers(DeviceId{0}, BufferType::dram).size() == 1);
    CHECK(table.unknown_frees() == 1);
    CHECK(table.duplicate_allocations() == 1);
  }

  TEST_CASE("the event log's audit finds every breach of one Alloc then one Free") {
    testing::EventLog log;
    const std::vector<AllocationEvent> events{
        alloc_event(1, 0, BufferType::dram, 1), free_event(1, 0, BufferType::dram), free_event(1, 0, BufferType::dram),
        free_event(2, 0, BufferType::dram),     alloc_event(3, 0, BufferType::dram, 1), alloc_event(3, 0, BufferType::dram, 1),
        alloc_event(4, 0, BufferType::dram, 1),
    };
    log.process(events);
    const auto audit = log.audit();
    CHECK(audit.buffers == 4);
    CHECK(audit.double_frees == 1);
    CHECK(audit.unknown_frees == 1);
    CHECK(audit.double_allocs == 1);
    CHECK(audit.still_live == 2);
  }
}
