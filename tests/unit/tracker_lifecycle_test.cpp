// Processors and hooks over their whole life: removed ones are destroyed once no event is in
// flight, churn keeps memory bounded, callbacks that call back into their mesh get a defined
// outcome, and a processor that joins late never sees a Free without its Alloc.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <functional>
#include <string_view>
#include <utility>
#include <memory>
#include <optional>
#include <set>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

// Counts its own life and what reached it; says if it was called after it was removed.
class Witness final : public EventProcessor {
 public:
  explicit Witness(std::atomic<int>& destroyed) : destroyed_(destroyed) {}
  Witness(const Witness&) = delete;
  Witness& operator=(const Witness&) = delete;
  ~Witness() override { destroyed_.fetch_add(1); }
  void process(std::span<const AllocationEvent> events) noexcept override {
    if (removed.load()) late_calls.fetch_add(1);
    seen.fetch_add(events.size());
  }
  std::atomic<bool> removed{false};
  std::atomic<int> late_calls{0};
  std::atomic<std::uint64_t> seen{0};

 private:
  std::atomic<int>& destroyed_;
};

MeshBuffer replicated(MeshDevice& mesh, std::uint64_t size) {
  return MeshBuffer::create(mesh,
                            ReplicatedBufferConfig{.size = size},
                            {.page_size = 1024, .buffer_type = BufferType::dram})
      .value();
}

// Runs `callback` from inside the processor call for each Alloc.
class OnAlloc final : public EventProcessor {
 public:
  explicit OnAlloc(std::function<void()> callback) : callback_(std::move(callback)) {}
  void process(std::span<const AllocationEvent> events) noexcept override {
    for (const AllocationEvent& event : events) {
      if (event.kind == EventKind::allocate && armed) {
        armed = false;
        callback_();
      }
    }
  }
  bool armed{false};

 private:
  std::function<void()> callback_;
};

}  // namespace

TEST_SUITE("tracker lifecycle") {
  TEST_CASE("a removed processor is destroyed when remove_processor returns, and never called after") {
    Tracker tracker;
    std::atomic<int> destroyed{0};
    auto witness = std::make_shared<Witness>(destroyed);
    Witness* const raw = witness.get();
    tracker.add_processor(std::move(witness));
    const AllocationEvent event{.kind = EventKind::allocate, .buffer = BufferId{1}};
    tracker.record(std::span(&event, 1));
    CHECK(raw->seen == 1);
    tracker.remove_processor(*raw);
    CHECK(destroyed == 1);
    CHECK(tracker.lists_waiting() == 0);
  }

  TEST_CASE("10,000 add/remove cycles while another thread records: every processor destroyed, none called late") {
    auto tracker = std::make_shared<Tracker>();
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::atomic<int> destroyed{0};
    std::atomic<int> late{0};
    std::atomic<bool> done{false};
    std::thread recorder([&] {
      while (!done) (void)replicated(mesh, 1024);
    });
    constexpr int cycles = 10'000;
    for (int i = 0; i < cycles; ++i) {
      auto witness = std::make_shared<Witness>(destroyed);
      Witness* const raw = witness.get();
      tracker->add_processor(witness);
      std::this_thread::yield();
      // Held here so that "removed" is set before the tracker lets go; what is called after this
      // point, before remove_processor returns, is a call that began earlier (allowed).
      tracker->remove_processor(*raw);
      raw->removed = true;
      late += raw->late_calls.load();
      witness.reset();
    }
    done = true;
    recorder.join();
    CHECK(destroyed == cycles);
    CHECK(late == 0);
    CHECK(tracker->lists_waiting() == 0);
  }

  TEST_CASE("a removed TrackingClient stops its thread and ends its session") {
    const testing::TempDirectory dir;
    auto tracker = std::make_shared<Tracker>();
    auto client = TrackingClient::start({.socket_path = dir.file("absent.sock"), .warn = [](std::string_view) {}});
    std::weak_ptr<TrackingClient> watch = client;
    tracker->add_processor(client);
    client.reset();
    CHECK_FALSE(watch.expired());  // the tracker holds it
    tracker->remove_processor(*watch.lock());
    CHECK(watch.expired());  // destroyed: its sender thread joined
  }

  TEST_CASE("a processor that removes itself from inside its callback: no deadlock, freed at the next change") {
    Tracker tracker;
    std::atomic<int> destroyed{0};
    struct SelfRemover final : EventProcessor {
      Tracker* tracker{};
      std::atomic<int>* destroyed{};
      SelfRemover() = default;
      SelfRemover(const SelfRemover&) = delete;
      SelfRemover& operator=(const SelfRemover&) = delete;
      ~SelfRemover() override { destroyed->fetch_add(1); }
      void process(std::span<const AllocationEvent> /*events*/) noexcept override { tracker->remove_processor(*this); }
    };
    auto remover = std::make_shared<SelfRemover>();
    remover->tracker = &tracker;
    remover->destroyed = &destroyed;
    tracker.add_processor(std::move(remover));
    const AllocationEvent event{.kind = EventKind::allocate, .buffer = BufferId{1}};
    tracker.record(std::span(&event, 1));
    CHECK(destroyed == 0);  // it was still running; its list waits
    CHECK(tracker.lists_waiting() > 0);
    auto other = std::make_shared<testing::EventLog>();
    tracker.add_processor(other);
    CHECK(destroyed == 1);
    CHECK(tracker.lists_waiting() == 0);
  }

  TEST_CASE("callbacks that call back into their mesh: allocation refused, releases deferred, reads answered") {
    auto tracker = std::make_shared<Tracker>();
    auto log = std::make_shared<testing::EventLog>();
    tracker->add_processor(log);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::optional<MeshBuffer> victim = replicated(mesh, 4096);
    const BufferId victim_id = victim->device_buffers()[0].id();
    std::optional<Error> refused;
    std::optional<std::uint64_t> allocated_seen;
    auto reentrant = std::make_shared<OnAlloc>([&] {
      auto nested = MeshBuffer::create(mesh,
                                       ReplicatedBufferConfig{.size = 1024},
                                       {.page_size = 1024, .buffer_type = BufferType::dram});
      if (!nested) refused = nested.error();
      allocated_seen = mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes;  // a read: answered
      victim.reset();  // a release: deferred until the allocation that called us returns
      CHECK(log->of_buffer(victim_id).size() == 1);  // not yet freed
    });
    tracker->add_processor(reentrant);
    reentrant->armed = true;
    MeshBuffer trigger = replicated(mesh, 2048);
    REQUIRE(refused.has_value());
    CHECK(refused->message.find("from a tracker processor or hook") != std::string::npos);
    CHECK(allocated_seen.has_value());
    CHECK(log->of_buffer(victim_id).size() == 2);  // freed exactly once, right after
    testing::EventLog::Audit audit = log->audit();
    CHECK(audit.double_frees == 0);
    CHECK(audit.unknown_frees == 0);

    // close() from a callback: the mesh closes once the operation returns; every buffer gets its Free.
    reentrant = nullptr;
    auto closer = std::make_shared<OnAlloc>([&] { mesh.close(); });
    tracker->add_processor(closer);
    closer->armed = true;
    MeshBuffer last = replicated(mesh, 1024);
    CHECK_FALSE(mesh.is_open());
    CHECK(last.device_buffers()[0].state() == DeviceBufferState::device_closed);
    CHECK(log->audit().still_live == 0);
  }

  TEST_CASE("a processor added while buffers live: devices replayed, only buffers after it, never a Free without its Alloc") {
    auto tracker = std::make_shared<Tracker>();
    auto mesh = MeshDevice::create({2, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::vector<MeshBuffer> before;
    for (int i = 0; i < 3; ++i) before.push_back(replicated(mesh, 1024));
    struct Late final : EventProcessor {
      LiveBufferTable table;
      std::vector<DeviceDescription> devices;
      void process(std::span<const AllocationEvent> events) noexcept override { table.process(events); }
      void describe_devices(std::span<const DeviceDescription> described) noexcept override {
        devices.assign(described.begin(), described.end());
      }
    };
    auto late = std::make_shared<Late>();
    tracker->add_processor(late);
    CHECK(late->devices.size() == 4);
    MeshBuffer after = replicated(mesh, 2048);
    CHECK(late->table.active_allocations() == 4);
    before.clear();  // Frees of buffers it never saw allocated: not its to see
    CHECK(late->table.unknown_frees() == 0);
    after.deallocate();
    CHECK(late->table.active_allocations() == 0);
    CHECK(late->table.unknown_frees() == 0);
  }

  TEST_CASE("a fork while a processor joins: the child records without waiting for the parent's joining thread") {
    // The processor's describe_devices runs while it joins (readers that reach it wait until
    // its view's start is known). A fork there leaves a child whose joining thread is gone:
    // before, every record() in the child waited for it forever.
    auto tracker = std::make_shared<Tracker>();
    auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    struct ForksWhileJoining final : EventProcessor {
      std::shared_ptr<Tracker> tracker;
      std::atomic<std::uint64_t> seen{0};
      pid_t child{-1};
      void process(std::span<const AllocationEvent> events) noexcept override { seen.fetch_add(events.size()); }
      void describe_devices(std::span<const DeviceDescription> /*described*/) noexcept override {
        if (child != -1) return;
        child = ::fork();
        if (child != 0) return;
        // The first record completes the join in the child: like any Alloc concurrent with a
        // join, it may be left out of the view; the next one is in it.
        const AllocationEvent first{.kind = EventKind::allocate, .buffer = BufferId{1u << 30U}, .size = 64};
        tracker->record(std::span(&first, 1));
        const AllocationEvent next{.kind = EventKind::allocate, .buffer = BufferId{(1u << 30U) + 8}, .size = 64};
        tracker->record(std::span(&next, 1));
        ::_exit(seen.load() >= 1 ? 0 : 3);
      }
    };
    auto joiner = std::make_shared<ForksWhileJoining>();
    joiner->tracker = tracker;
    tracker->add_processor(joiner);
    REQUIRE(joiner->child > 0);
    int status = 0;
    pid_t done = 0;
    for (int waited = 0; waited < 1000 && done == 0; ++waited) {
      done = ::waitpid(joiner->child, &status, WNOHANG);
      if (done == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (done == 0) {
      ::kill(joiner->child, SIGKILL);
      (void)::waitpid(joiner->child, &status, 0);
    }
    CHECK(done == joiner->child);  // it exited by itself, within 10 s
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);  // and its event reached the processor
    tracker->remove_processor(*joiner);
  }

  TEST_CASE("processors joining while named buffers are made: each hears a name only with its buffer's Alloc") {
    // A name goes to exactly the processors that see its mesh buffer's Alloc, in the same read:
    // a processor that joins while a buffer is made, and is not shown its Alloc, must not be
    // left holding its name (in a TrackingClient, a name that would outlive its buffer).
    auto tracker = std::make_shared<Tracker>();
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    struct NameAudit final : EventProcessor {
      std::mutex mutex;
      std::set<std::uint64_t> named;      // mesh buffers whose name came
      std::set<std::uint64_t> allocated;  // mesh buffers whose Alloc came
      void describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view /*name*/) noexcept override {
        const std::scoped_lock lock(mutex);
        named.insert(mesh_buffer.value());
      }
      void process(std::span<const AllocationEvent> events) noexcept override {
        const std::scoped_lock lock(mutex);
        for (const AllocationEvent& event : events) {
          if (event.kind == EventKind::allocate) allocated.insert(event.mesh_buffer.value());
        }
      }
    };
    std::atomic<bool> done{false};
    std::thread maker([&] {
      while (!done) {
        (void)MeshBuffer::create(mesh,
                                 ReplicatedBufferConfig{.size = 1024, .name = "named"},
                                 {.page_size = 1024, .buffer_type = BufferType::dram})
            .value();
      }
    });
    std::uint64_t names_without_alloc = 0;
    std::uint64_t names_heard = 0;
    for (int i = 0; i < 2000; ++i) {
      auto audit = std::make_shared<NameAudit>();
      tracker->add_processor(audit);
      std::this_thread::yield();
      tracker->remove_processor(*audit);
      const std::scoped_lock lock(audit->mutex);
      names_heard += audit->named.size();
      for (const std::uint64_t mesh_buffer : audit->named) names_without_alloc += audit->allocated.contains(mesh_buffer) ? 0 : 1;
    }
    done = true;
    maker.join();
    CHECK(names_heard > 0);
    CHECK(names_without_alloc == 0);
  }
}
