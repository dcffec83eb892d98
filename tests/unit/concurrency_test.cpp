// Many threads on one mesh, and a close racing the buffers' own frees: still one Alloc and one
// Free per buffer (run under the tsan preset to catch data races).
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

TEST_SUITE("concurrency") {
  TEST_CASE("threads allocating and freeing on one mesh keep the tracker exact") {
    auto tracker = std::make_shared<Tracker>();
    auto log = std::make_shared<testing::EventLog>();
    tracker->add_processor(log);
    auto mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::vector<MeshBuffer> held;
        for (int i = 0; i < 200; ++i) {
          const BufferType type = (i + t) % 2 == 0 ? BufferType::dram : BufferType::l1;
          auto buffer = MeshBuffer::create(mesh,
                                           ReplicatedBufferConfig{.size = 1024U * static_cast<std::uint64_t>(1 + i % 7)},
                                           {.page_size = 1024, .buffer_type = type});
          if (!buffer) {
            failures.fetch_add(1);
            continue;
          }
          held.push_back(std::move(*buffer));
          if (i % 3 == 0) held.erase(held.begin());
          if (i % 5 == 0 && !held.empty()) held.back().deallocate();
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    CHECK(failures.load() == 0);
    const auto audit = log->audit();
    CHECK(audit.buffers == 4 * 200 * 8);
    CHECK(audit.double_frees == 0);
    CHECK(audit.unknown_frees == 0);
    CHECK(audit.still_live == 0);
    CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
  }

  TEST_CASE("close() racing with buffers being freed on other threads: one Free each") {
    for (int round = 0; round < 20; ++round) {
      auto tracker = std::make_shared<Tracker>();
      auto log = std::make_shared<testing::EventLog>();
      tracker->add_processor(log);
      auto mesh = MeshDevice::create({2, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
      std::vector<std::vector<MeshBuffer>> per_thread(3);
      for (auto& buffers : per_thread) {
        for (int i = 0; i < 30; ++i) {
          buffers.push_back(MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 2048}, {.page_size = 1024}).value());
        }
      }
      std::vector<std::thread> threads;
      for (auto& buffers : per_thread) {
        threads.emplace_back([&buffers] {
          while (!buffers.empty()) buffers.pop_back();
        });
      }
      mesh.close();
      for (std::thread& thread : threads) thread.join();
      const auto audit = log->audit();
      CHECK(audit.buffers == 3 * 30 * 4);
      CHECK(audit.double_frees == 0);
      CHECK(audit.still_live == 0);
    }
  }
}
