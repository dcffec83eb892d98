// The promise under the patterns real applications have: thread pools and thread churn, threads
// that record into two clients, a server that is absent, stopped, swamped or slow, a clean exit
// with a deep queue, named buffers across a server restart. Each test would have caught a case
// issue 11 saw: the application hanging, events lost, names leaking.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <variant>
#include <vector>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

import meshrt;
import meshrt.protocol;
import meshrt.testing;
import meshrt.testing.fixture;

using namespace meshrt;
using namespace meshrt::testing;
using namespace std::chrono_literals;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

const std::string bin = MESHRT_BIN_DIR;

MeshBuffer replicated(MeshDevice& mesh, std::uint64_t size, std::string name = {}) {
  return MeshBuffer::create(mesh,
                            ReplicatedBufferConfig{.size = size, .name = std::move(name)},
                            {.page_size = 32, .buffer_type = BufferType::dram})
      .value();
}

// A listening socket that plays a broken server: it never accepts (so its backlog fills), or it
// accepts one client and reads `bytes_per_second`, keeping what it read.
class FakeServer {
 public:
  FakeServer(std::string path, int backlog) : path_(std::move(path)) {
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, path_.c_str(), path_.size() + 1);
    REQUIRE(::bind(listener_, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
    REQUIRE(::listen(listener_, backlog) == 0);
  }
  FakeServer(const FakeServer&) = delete;
  FakeServer& operator=(const FakeServer&) = delete;
  ~FakeServer() {
    stop_ = true;
    if (reader_.joinable()) reader_.join();
    for (const int fd : squatters_) ::close(fd);
    ::close(listener_);
    ::unlink(path_.c_str());
  }

  // Connects until the backlog refuses: nobody else gets in now.
  void fill_backlog() {
    for (int i = 0; i < 1000; ++i) {
      const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      sockaddr_un address{};
      address.sun_family = AF_UNIX;
      std::memcpy(address.sun_path, path_.c_str(), path_.size() + 1);
      if (::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
        ::close(fd);
        return;
      }
      squatters_.push_back(fd);
    }
    FAIL("the backlog never filled");
  }

  // Accepts one client and reads it at `bytes_per_second` (in 10 ms steps) until destroyed.
  void serve_slowly(double bytes_per_second) {
    reader_ = std::thread([this, bytes_per_second] {
      int client = -1;
      auto next = Clock::now();
      double credit = 0;  // bytes it may read now
      std::vector<std::byte> buffer;
      while (!stop_) {
        if (client < 0) {
          pollfd poller{listener_, POLLIN, 0};
          if (::poll(&poller, 1, 10) > 0) client = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
          next = Clock::now();
          continue;
        }
        std::this_thread::sleep_until(next += 10ms);
        credit += bytes_per_second / 100;
        const auto take = static_cast<std::size_t>(credit);
        if (take == 0 || closed_) continue;
        buffer.resize(take);
        const ssize_t got = ::recv(client, buffer.data(), take, MSG_DONTWAIT);
        if (got > 0) {
          credit -= static_cast<double>(got);
          const std::scoped_lock lock(mutex_);
          received_.insert(received_.end(), buffer.begin(), buffer.begin() + got);
        } else if (got == 0) {
          closed_ = true;
        }
      }
      if (client >= 0) ::close(client);
    });
  }

  [[nodiscard]] std::vector<std::byte> received() const {
    const std::scoped_lock lock(mutex_);
    return received_;
  }
  [[nodiscard]] bool client_closed() const { return closed_; }

 private:
  std::string path_;
  int listener_{-1};
  std::vector<int> squatters_;
  std::thread reader_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> closed_{false};
  mutable std::mutex mutex_;
  std::vector<std::byte> received_;
};

// How long `work` took.
template <class Work>
std::chrono::milliseconds timed(Work work) {
  const auto start = Clock::now();
  work();
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
}

}  // namespace

TEST_SUITE("application patterns") {
  TEST_CASE("10,000 short-lived threads, 8 alive at a time, each allocating and freeing: it finishes, "
            "recording memory stays bounded, the ledger ends exact") {
    ServerFixture fixture(bin);
    auto client = TrackingClient::start({.socket_path = fixture.socket()});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    constexpr int threads = 10'000;
    constexpr int alive = 8;
    std::atomic<std::uint64_t> most_lanes{0};
    std::atomic<std::uint64_t> most_chunks{0};
    for (int started = 0; started < threads; started += alive) {
      std::vector<std::thread> batch;
      for (int i = 0; i < alive; ++i) {
        batch.emplace_back([&] {
          MeshBuffer buffer = replicated(mesh, 4096);
          buffer.deallocate();
        });
      }
      for (std::thread& thread : batch) thread.join();
      if (started % 1000 == 0) {
        const TrackingClient::Status status = client->status();
        most_lanes = std::max<std::uint64_t>(most_lanes, status.lanes);
        most_chunks = std::max<std::uint64_t>(most_chunks, status.chunks);
      }
    }
    REQUIRE(client->flush(60s));
    const TrackingClient::Status status = client->status();
    // Lanes of threads that exited are reaped once drained: memory follows the threads alive.
    CHECK(status.lanes == 0);
    // The live threads' lanes, and at most 64 of exited threads not drained yet (a new thread
    // waits past that: a sender starved of CPU bounds them too; ADR 0012).
    constexpr std::uint64_t most_retired = 64;
    CHECK(most_lanes.load() <= alive + most_retired + 1);
    CHECK(most_chunks.load() <= alive + most_retired + 1 + 16);  // one chunk a lane, the pool's few idle ones
    CHECK(status.chunks <= 16);
    CHECK(status.events_queued == 2 * threads);
    REQUIRE(eventually([&] { return fixture.summary()["total_deallocations"] == threads; }));
    const json after = fixture.summary();
    CHECK(after["total_allocations"] == threads);
    CHECK(after["active_allocations"] == 0);
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(after["sequence_gaps"] == 0);
  }

  TEST_CASE("a thread recording into two clients in turn keeps one lane in each, a replaced client's lane goes") {
    ServerFixture fixture(bin);
    const auto tracked_mesh = [&](const std::shared_ptr<TrackingClient>& client) {
      auto tracker = std::make_shared<Tracker>();
      tracker->add_processor(client);
      return MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    };
    auto first = TrackingClient::start({.socket_path = fixture.socket()});
    auto second = TrackingClient::start({.socket_path = fixture.socket()});
    auto a = tracked_mesh(first);
    auto b = tracked_mesh(second);
    std::thread worker([&] {
      for (int i = 0; i < 2000; ++i) {
        MeshBuffer on_a = replicated(a, 64);
        MeshBuffer on_b = replicated(b, 64);
      }
    });
    worker.join();
    REQUIRE(first->flush(60s));
    REQUIRE(second->flush(60s));
    CHECK(first->status().events_queued == 4000);
    CHECK(second->status().events_queued == 4000);
    CHECK(first->status().chunks <= 16);
    CHECK(first->status().lanes == 0);  // the worker exited: its lane was reaped

    // This thread records into a client that is then replaced: the new one works, the old one's
    // lane does not linger in this thread (ASan would see a use after free if it were touched).
    { MeshBuffer kept = replicated(a, 64); }
    a.close();
    first.reset();
    auto third = TrackingClient::start({.socket_path = fixture.socket()});
    auto c = tracked_mesh(third);
    { MeshBuffer on_c = replicated(c, 64); }
    REQUIRE(third->flush(60s));
    CHECK(third->status().events_queued == 2);
    CHECK(third->status().lanes == 1);
  }

  TEST_CASE("tracking never blocks the application: server absent, stopped, with a full backlog, or reading a byte a second") {
    const TempDirectory dir;
    constexpr auto timeout = 500ms;
    // Generous: the bound under test is shutdown_timeout; the margin is for a loaded machine.
    constexpr auto bound = timeout + 5s;
    const auto workload = [](const std::string& socket, std::chrono::milliseconds shutdown_timeout, int count = 1000) {
      auto client = TrackingClient::start(
          {.socket_path = socket, .shutdown_timeout = shutdown_timeout, .warn = [](std::string_view) {}});
      auto tracker = std::make_shared<Tracker>();
      tracker->add_processor(client);
      auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
      std::vector<MeshBuffer> buffers;
      for (int i = 0; i < count; ++i) buffers.push_back(replicated(mesh, 4096));
      buffers.clear();
      return client;
    };

    SUBCASE("absent") {
      auto client = workload(dir.file("nobody.sock"), timeout);
      CHECK(timed([&] { client->shutdown(); }) < bound);
      CHECK_FALSE(client->status().connected);
    }
    SUBCASE("accepting nothing, its backlog full") {
      FakeServer swamped(dir.file("swamped.sock"), 1);
      swamped.fill_backlog();
      std::shared_ptr<TrackingClient> client;
      // Connecting was where the application hung: the whole workload must not wait for it.
      CHECK(timed([&] { client = workload(dir.file("swamped.sock"), timeout); }) < bound);
      CHECK(timed([&] { client->shutdown(); }) < bound);
      CHECK(client->status().connect_attempts_refused >= 1);
      CHECK(client->status().connections == 0);
    }
    SUBCASE("reading one byte a second") {
      FakeServer slow(dir.file("slow.sock"), 16);
      slow.serve_slowly(1);
      // More than the socket's buffer holds (about 200 KiB): some events cannot be delivered.
      auto client = workload(dir.file("slow.sock"), timeout, 20'000);
      REQUIRE(eventually([&] { return client->status().connected; }, 10s));
      CHECK(timed([&] { client->shutdown(); }) < bound);
      CHECK(client->status().gave_up);
    }
    SUBCASE("stopped with SIGSTOP") {
      ServerFixture fixture(bin);
      fixture.server().signal(SIGSTOP);
      auto client = workload(fixture.socket(), timeout);
      CHECK(timed([&] { client->shutdown(); }) < bound);
      fixture.server().signal(SIGCONT);
      // What it could not deliver is never counted as this process's leak at exit.
      REQUIRE(eventually([&] { return !process_of(fixture.summary(), ::getpid()).has_value(); }));
      CHECK(fixture.summary()["leaked_at_exit"] == 0);
    }
  }

  TEST_CASE("a server too slow for the shutdown timeout hears that the client gave up, in whole frames") {
    const TempDirectory dir;
    FakeServer slow(dir.file("slow.sock"), 16);
    auto client = TrackingClient::start({.socket_path = dir.file("slow.sock"),
                                         .shutdown_timeout = 2000ms,
                                         .warn = [](std::string_view) {}});
    {
      auto tracker = std::make_shared<Tracker>();
      tracker->add_processor(client);
      auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
      // Connected (the backlog took it), then about 10 MB queued while the server reads nothing.
      REQUIRE(eventually([&] { return client->status().connected; }, 10s));
      for (int i = 0; i < 100'000; ++i) (void)replicated(mesh, 32);
      // Reading 1 MiB/s from now on: the queue would take 10 s, the timeout gives 2.
      slow.serve_slowly(1 << 20);
      CHECK(timed([&] { client->shutdown(); }) < 7s);
    }
    CHECK(client->status().gave_up);
    CHECK(client->status().said_goodbye);
    REQUIRE(eventually([&] { return slow.client_closed(); }, 10s));
    // The stream decodes frame by frame (no frame was cut) and ends with Goodbye{complete=false}.
    const std::vector<std::byte> stream = slow.received();
    std::span<const std::byte> rest(stream);
    std::optional<protocol::Message> last;
    while (!rest.empty()) {
      auto frame = protocol::next_frame(rest);
      REQUIRE(frame.has_value());
      REQUIRE(frame->has_value());
      auto message = protocol::decode(**frame);
      REQUIRE(message.has_value());
      last = *message;
      rest = rest.subspan((*frame)->frame_size);
    }
    REQUIRE(last.has_value());
    REQUIRE(std::holds_alternative<protocol::Goodbye>(*last));
    CHECK_FALSE(std::get<protocol::Goodbye>(*last).complete);
  }

  TEST_CASE("a clean exit with a deep queue of Frees delivers every one before Goodbye") {
    ServerFixture fixture(bin);
    const int buffers = sanitized_build ? 100'000 : 1'000'000;
    auto client = TrackingClient::start({.socket_path = fixture.socket(), .shutdown_timeout = 60s});
    {
      auto tracker = std::make_shared<Tracker>();
      tracker->add_processor(client);
      auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
      std::vector<MeshBuffer> live;
      live.reserve(static_cast<std::size_t>(buffers));
      for (int i = 0; i < buffers; ++i) live.push_back(replicated(mesh, 32));
      REQUIRE(client->flush(120s));
      live.clear();  // every Free queued at once, then straight to exit
      client->shutdown();
    }
    CHECK_FALSE(client->status().gave_up);
    REQUIRE(eventually([&] { return !process_of(fixture.summary(), ::getpid()).has_value(); }, 120s));
    const json after = fixture.summary();
    CHECK(after["total_allocations"] == buffers);
    CHECK(after["total_deallocations"] == buffers);
    CHECK(after["leaked_at_exit"] == 0);
    CHECK(after["lost_at_exit"] == 0);
    CHECK(after["reclaimed_allocations"] == 0);
    CHECK(after["active_allocations"] == 0);
  }

  TEST_CASE("names live exactly as long as their buffers, across a server restart") {
    // A low name limit: a client that kept dead names would be refused long before the end.
    ServerFixture fixture(bin, {"--max-names-per-process", "1000"});
    const int named = sanitized_build ? 30'000 : 300'000;
    auto client = TrackingClient::start(
        {.socket_path = fixture.socket(), .reconnect_interval = 20ms, .warn = [](std::string_view) {}});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::vector<MeshBuffer> kept;
    for (int i = 0; i < 4; ++i) kept.push_back(replicated(mesh, 64, "kept " + std::to_string(i)));
    for (int i = 0; i < named; ++i) (void)replicated(mesh, 64, "short-lived " + std::to_string(i));
    REQUIRE(client->flush(120s));
    CHECK(client->status().names == 4);

    fixture.start_server();  // a restart: the client resynchronises with a snapshot
    REQUIRE(eventually([&] { return client->flush(1s); }, 60s));
    CHECK(client->status().names == 4);
    const auto [code, output] = fixture.smi({"--buffers", "--json"});
    REQUIRE(code == 0);
    const json buffers = json::parse(output);
    std::size_t with_names = 0;
    for (const json& buffer : buffers["buffers"]) with_names += buffer["name"].get<std::string>().starts_with("kept ") ? 1 : 0;
    CHECK(with_names == 8);  // 4 mesh buffers on 2 devices
    const json after = fixture.summary();
    CHECK(after["rejected_sessions"] == 0);
    CHECK(after["reclaimed_allocations"] == 0);
    CHECK(process_of(after, ::getpid()).value()["live_allocations"] == 8);
    kept.clear();
    REQUIRE(client->flush(60s));
    CHECK(client->status().names == 0);
  }

  TEST_CASE("a snapshot larger than max_pending_bytes is sent whole once, not dropped and resent for ever") {
    ServerFixture fixture(bin);
    auto client = TrackingClient::start({.socket_path = fixture.socket(),
                                         .reconnect_interval = 20ms,
                                         .max_pending_bytes = 64 * 1024,
                                         .warn = [](std::string_view) {}});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::vector<MeshBuffer> kept;
    for (int i = 0; i < 5000; ++i) kept.push_back(replicated(mesh, 32));  // a 240 KB snapshot
    REQUIRE(client->flush(60s));
    fixture.start_server();  // the resync snapshot is nearly four times the limit
    REQUIRE(eventually([&] { return client->flush(1s); }, 60s));
    CHECK(client->status().snapshots <= 3);
    CHECK(process_of(fixture.summary(), ::getpid()).value()["live_allocations"] == 5000);
  }

  TEST_CASE("buffers freed by a thread_local's destructor after the thread's lane is gone: all delivered, memory bounded") {
    ServerFixture fixture(bin);
    auto client = TrackingClient::start({.socket_path = fixture.socket()});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    constexpr int buffers = 2000;
    std::thread worker([&] {
      // Constructed before the first event, so destroyed after the thread's lanes: each of its
      // Frees is recorded by a thread in teardown.
      thread_local std::vector<MeshBuffer> held;
      for (int i = 0; i < buffers; ++i) held.push_back(replicated(mesh, 32));
    });
    worker.join();
    REQUIRE(client->flush(60s));
    CHECK(client->status().chunks <= 24);  // one teardown lane, not a chunk per Free
    REQUIRE(eventually([&] { return fixture.summary()["total_deallocations"] == buffers; }));
    CHECK(fixture.summary()["active_allocations"] == 0);
    CHECK(fixture.summary()["unknown_deallocations"] == 0);
  }
}
