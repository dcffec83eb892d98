// The tracking client against a real server (in this process, on a private socket): streaming,
// a server that appears late, a server that restarts, a clean goodbye.
#include <algorithm>
#include <array>
#include <span>
#include <atomic>
#include <chrono>
#include <functional>
#include <string_view>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

import meshrt;
import meshrt.protocol;
import meshrt.server;
import meshrt.monitor;
import meshrt.testing;

using namespace meshrt;
using namespace std::chrono_literals;

namespace {

// A server running on its own thread until destroyed.
class RunningServer {
 public:
  explicit RunningServer(std::string socket_path) {
    server::ServerConfig config;
    config.socket_path = std::move(socket_path);
    config.log = [this](std::string_view line) {
      const std::scoped_lock lock(mutex_);
      log_.emplace_back(line);
    };
    auto started = server::Server::start(std::move(config));
    REQUIRE(started.has_value());
    server_ = std::move(*started);
    thread_ = std::thread([this] { (void)server_->run(false); });
  }
  RunningServer(const RunningServer&) = delete;
  RunningServer& operator=(const RunningServer&) = delete;
  RunningServer(RunningServer&&) = delete;
  RunningServer& operator=(RunningServer&&) = delete;
  ~RunningServer() {
    server_->stop();
    thread_.join();
  }
  std::vector<std::string> log() const {
    const std::scoped_lock lock(mutex_);
    return log_;
  }

 private:
  std::unique_ptr<server::Server> server_;
  std::thread thread_;
  mutable std::mutex mutex_;
  std::vector<std::string> log_;
};

nlohmann::json summary(const std::string& socket) {
  auto monitor = server::Monitor::connect(socket);
  REQUIRE(monitor.has_value());
  auto reply = monitor->query(protocol::QueryKind::summary);
  REQUIRE(reply.has_value());
  return nlohmann::json::parse(*reply);
}

std::uint64_t dram_used(const nlohmann::json& summary, std::uint32_t device) {
  for (const auto& d : summary["devices"]) {
    if (d["id"] == device) return d["dram"]["used_bytes"];
  }
  return 0;
}

struct Warnings {
  std::shared_ptr<std::mutex> mutex = std::make_shared<std::mutex>();
  std::shared_ptr<std::vector<std::string>> lines = std::make_shared<std::vector<std::string>>();
  std::function<void(std::string_view)> sink() const {
    return [mutex = mutex, lines = lines](std::string_view line) {
      const std::scoped_lock lock(*mutex);
      lines->emplace_back(line);
    };
  }
  std::vector<std::string> get() const {
    const std::scoped_lock lock(*mutex);
    return *lines;
  }
};

MeshBuffer replicated(MeshDevice& mesh, std::uint64_t size, BufferType type = BufferType::dram) {
  return MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = size}, {.page_size = 1024, .buffer_type = type}).value();
}

}  // namespace

TEST_SUITE("client and server") {
  TEST_CASE("the server sees every allocation and free the client streams") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    RunningServer server(socket);
    auto client = TrackingClient::start({.socket_path = socket});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({2, 4}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::vector<MeshBuffer> buffers;
    for (int i = 0; i < 8; ++i) buffers.push_back(replicated(mesh, 13'107'200));
    REQUIRE(client->flush(5s));
    auto live = summary(socket);
    CHECK(live["active_allocations"] == 64);
    CHECK(dram_used(live, 0) == 104'857'600);
    CHECK(live["devices"][0]["dram"]["total_bytes"] == mesh.spec().dram.total_bytes());
    buffers.clear();
    REQUIRE(client->flush(5s));
    auto after = summary(socket);
    CHECK(after["active_allocations"] == 0);
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(after["total_deallocations"] == 64);
    CHECK(after["sequence_gaps"] == 0);
  }

  TEST_CASE("out of memory tells all: the Error names the largest consumers there, the server's timeline the moment") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    RunningServer server(socket);
    auto client = TrackingClient::start({.socket_path = socket, .capture_stacks = true});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    const auto pages = [](std::uint64_t bytes) { return bytes / 2048 * 2048; };  // whole 2 KiB pages
    const std::uint64_t dram = mesh.spec().dram.total_bytes();
    auto big = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = pages(dram / 2), .name = "weights"},
                                  {.page_size = 2048, .buffer_type = BufferType::dram});
    REQUIRE(big.has_value());
    auto small = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = pages(dram / 8), .name = "activations"},
                                    {.page_size = 2048, .buffer_type = BufferType::dram});
    REQUIRE(small.has_value());
    auto same_size = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = pages(dram / 8), .name = "later"},
                                        {.page_size = 2048, .buffer_type = BufferType::dram});
    REQUIRE(same_size.has_value());
    auto failed = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = pages(dram / 2), .name = "too much"},
                                     {.page_size = 2048, .buffer_type = BufferType::dram});
    REQUIRE_FALSE(failed.has_value());
    CHECK(failed.error().code == ErrorCode::out_of_memory);
    const std::string& message = failed.error().message;
    CHECK(message.find("largest free block") != std::string::npos);
    // The largest first: the half, then the eighth.
    const auto weights = message.find("'weights' (buffer, ");
    const auto activations = message.find("'activations' (buffer, ");
    CHECK(message.find("largest on device 0 (bytes on the device):") != std::string::npos);
    CHECK(message.find("(devices 0-1, 12 banks each; bytes per bank): out of memory") != std::string::npos);
    REQUIRE(weights != std::string::npos);
    REQUIRE(activations != std::string::npos);
    CHECK(weights < activations);
    const auto later = message.find("'later' (buffer, ");
    REQUIRE(later != std::string::npos);
    CHECK(activations < later);  // of equal ones, the older first
    REQUIRE(client->flush(5s));
    nlohmann::json moments;
    REQUIRE(testing::eventually([&] {
      auto monitor = server::Monitor::connect(socket);
      if (!monitor) return false;
      auto reply = monitor->query(protocol::QueryKind::timeline);
      if (!reply) return false;
      moments = nlohmann::json::parse(*reply)["timeline"]["moments"];
      return std::ranges::any_of(moments, [](const nlohmann::json& m) { return m["kind"] == "out of memory"; });
    }));
    for (const nlohmann::json& moment : moments) {
      if (moment["kind"] != "out of memory") continue;
      CHECK(moment["pid"] == ::getpid());
      CHECK(moment["detail"].get<std::string>().find("'weights'") != std::string::npos);
      CHECK(moment["detail"].get<std::string>().find("largest free block") != std::string::npos);
      // The server's own account: who holds device 0's DRAM across processes, and from where.
      const std::string detail = moment["detail"].get<std::string>();
      const auto holders = detail.find("; largest holders of device 0 dram: pid ");
      REQUIRE(holders != std::string::npos);
      const auto held_weights = detail.find("'weights' ", holders);
      const auto held_activations = detail.find("'activations' ", holders);
      REQUIRE(held_weights != std::string::npos);
      REQUIRE(held_activations != std::string::npos);
      CHECK(held_weights < held_activations);
      CHECK(detail.find("client_server_test.cpp:", holders) != std::string::npos);
    }
    const auto log = server.log();
    CHECK(std::ranges::any_of(log, [](const std::string& line) { return line.find("out of memory on device 0 dram") != std::string::npos &&
                                                       line.find("largest holders of device 0 dram") != std::string::npos; }));
  }

  TEST_CASE("server absent at start: one warning, then it appears and gets the live table") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    Warnings warnings;
    auto client = TrackingClient::start({.socket_path = socket, .reconnect_interval = 20ms, .warn = warnings.sink()});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    MeshBuffer kept = replicated(mesh, 4096);
    { MeshBuffer gone = replicated(mesh, 8192); }
    CHECK_FALSE(client->flush(100ms));
    REQUIRE(warnings.get().size() == 1);
    CHECK(warnings.get()[0].find("no allocation server") != std::string::npos);

    RunningServer server(socket);
    REQUIRE(client->flush(5s));
    auto live = summary(socket);
    CHECK(live["active_allocations"] == 2);
    CHECK(dram_used(live, 1) == 4096);
    CHECK(live["resyncs"] == 1);
    CHECK(warnings.get().size() == 2);  // "connected ... resynchronised 2 live buffers"
    CHECK(client->status().snapshots == 1);
  }

  TEST_CASE("categories reach the server's summary and buffer list, through a snapshot and through events") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    auto client = TrackingClient::start({.socket_path = socket, .reconnect_interval = 20ms, .warn = [](std::string_view) {}});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    const auto of_category = [&](std::uint64_t size, BufferType type, AllocationCategory category) {
      return MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = size},
                                {.page_size = 1024, .buffer_type = type, .category = category})
          .value();
    };
    // Allocated before the server exists: it learns of these from the snapshot.
    MeshBuffer system = of_category(8192, BufferType::dram, AllocationCategory::system);
    MeshBuffer binaries = of_category(3072, BufferType::dram, AllocationCategory::program);
    CHECK_FALSE(client->flush(100ms));
    RunningServer server(socket);
    REQUIRE(client->flush(5s));
    // And of these from events.
    MeshBuffer user = of_category(4096, BufferType::dram, AllocationCategory::buffer);
    MeshBuffer cbs = of_category(2048, BufferType::l1, AllocationCategory::circular_buffer);
    REQUIRE(client->flush(5s));
    auto live = summary(socket);
    const auto category = [&](const nlohmann::json& s, const char* type, const char* name) {
      return s["devices"][1][type]["categories"][name];
    };
    CHECK(category(live, "dram", "buffer")["used_bytes"] == 4096);
    CHECK(category(live, "dram", "system")["used_bytes"] == 8192);
    CHECK(category(live, "dram", "program")["used_bytes"] == 3072);
    CHECK(category(live, "dram", "program")["buffers"] == 1);
    CHECK(category(live, "dram", "circular_buffer")["used_bytes"] == 0);
    CHECK(category(live, "l1", "circular_buffer")["used_bytes"] == 2048);
    CHECK(live["devices"][1]["dram"]["used_bytes"] == 4096 + 8192 + 3072);  // all categories

    auto monitor = server::Monitor::connect(socket);
    REQUIRE(monitor.has_value());
    const auto listing = nlohmann::json::parse(monitor->query(protocol::QueryKind::buffers).value());
    std::map<std::string, int> seen;
    for (const auto& b : listing["buffers"]) ++seen[b["category"].get<std::string>()];
    CHECK(seen == std::map<std::string, int>{{"buffer", 2}, {"circular_buffer", 2}, {"program", 2}, {"system", 2}});

    binaries.deallocate();
    cbs.deallocate();
    REQUIRE(client->flush(5s));
    live = summary(socket);
    CHECK(category(live, "dram", "program")["used_bytes"] == 0);
    CHECK(category(live, "l1", "circular_buffer")["used_bytes"] == 0);
    CHECK(category(live, "dram", "system")["used_bytes"] == 8192);
  }

  TEST_CASE("server restarted while buffers live: after resync its figures match the client exactly") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    auto first = std::make_unique<RunningServer>(socket);
    Warnings warnings;
    auto client = TrackingClient::start({.socket_path = socket, .reconnect_interval = 20ms, .warn = warnings.sink()});
    auto tracker = std::make_shared<Tracker>();
    auto table = std::make_shared<LiveBufferTable>();
    tracker->add_processor(client);
    tracker->add_processor(table);
    auto mesh = MeshDevice::create({2, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::vector<MeshBuffer> buffers;
    for (int i = 0; i < 6; ++i) buffers.push_back(replicated(mesh, 2048));
    REQUIRE(client->flush(5s));
    CHECK(summary(socket)["active_allocations"] == 24);
    first.reset();  // the server goes away
    buffers.erase(buffers.begin(), buffers.begin() + 3);
    buffers.push_back(replicated(mesh, 4096, BufferType::l1));
    RunningServer second(socket);
    REQUIRE(client->flush(5s));
    const auto live = summary(socket);
    CHECK(live["active_allocations"] == table->active_allocations());
    CHECK(live["active_allocations"] == 16);
    CHECK(dram_used(live, 0) == table->summary(DeviceId{0}, BufferType::dram).bytes);
    buffers.clear();
    REQUIRE(client->flush(5s));
    const auto after = summary(socket);
    CHECK(after["active_allocations"] == 0);
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(after["sequence_gaps"] == 0);
    // A connect may slip in while the first server shuts down (then "connected" and "lost" come
    // twice); the story always starts with the loss and ends with the resync.
    const auto lines = warnings.get();
    REQUIRE(lines.size() >= 2);
    CHECK(lines.front().find("lost the allocation server") != std::string::npos);
    CHECK(lines.back().find("resynchronised 16 live buffers") != std::string::npos);
  }

  TEST_CASE("a clean exit flushes everything and says goodbye, live buffers count as leaked at exit") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    RunningServer server(socket);
    {
      auto client = TrackingClient::start({.socket_path = socket});
      auto tracker = std::make_shared<Tracker>();
      tracker->add_processor(client);
      auto mesh = MeshDevice::create({1, 1}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
      auto leaked = new MeshBuffer(replicated(mesh, 1024));  // never freed: an application leak
      (void)leaked;
      for (int i = 0; i < 1000; ++i) (void)replicated(mesh, 1024);
      client->shutdown();
      delete leaked;  // after the client left: the server never hears of this Free
    }
    for (int attempt = 0; attempt < 200 && summary(socket)["processes"].size() != 0; ++attempt) {
      std::this_thread::sleep_for(10ms);
    }
    const auto after = summary(socket);
    CHECK(after["total_allocations"] == 1001);
    CHECK(after["total_deallocations"] == 1000);
    CHECK(after["leaked_at_exit"] == 1);
    CHECK(after["reclaimed_allocations"] == 0);
    CHECK(after["active_allocations"] == 0);
  }

  TEST_CASE("a clean exit with everything already flushed does not wait for the shutdown timeout") {
    // Regression: with nothing left to send, shutdown waited for replies the server never sends,
    // so every tracked application's exit took the whole timeout (2 s by default).
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    RunningServer server(socket);
    auto client = TrackingClient::start({.socket_path = socket, .shutdown_timeout = 30s});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    (void)replicated(mesh, 4096);
    REQUIRE(client->flush(60s));
    const auto started = std::chrono::steady_clock::now();
    client->shutdown();
    CHECK(std::chrono::steady_clock::now() - started < 15s);  // the bug waits the whole 30 s
    for (int attempt = 0; attempt < 500 && !summary(socket)["processes"].empty(); ++attempt) {
      std::this_thread::sleep_for(10ms);
    }
    const auto after = summary(socket);
    CHECK(after["processes"].empty());  // left with Goodbye, not reclaimed as crashed
    CHECK(after["reclaimed_allocations"] == 0);
    CHECK(after["total_deallocations"] == 2);
  }

  TEST_CASE("names given to mesh buffers reach the server's buffer list") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    RunningServer server(socket);
    auto client = TrackingClient::start({.socket_path = socket});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    auto named = MeshBuffer::create(mesh,
                                    ReplicatedBufferConfig{.size = 1024, .name = "kv-cache"},
                                    {.page_size = 1024})
                     .value();
    REQUIRE(client->flush(5s));
    auto monitor = server::Monitor::connect(socket).value();
    const auto list = nlohmann::json::parse(monitor.query(protocol::QueryKind::buffers).value());
    REQUIRE(list["buffers"].size() == 2);
    CHECK(list["buffers"][0]["name"] == "kv-cache");
    CHECK(list["buffers"][1]["device"] == 1);
  }
}

TEST_SUITE("client and server") {
  TEST_CASE("buffers allocated on some threads and freed on others: every Alloc reaches the server before its Free") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    RunningServer server(socket);
    auto client = TrackingClient::start({.socket_path = socket});
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    auto table = std::make_shared<LiveBufferTable>();
    tracker->add_processor(table);
    auto mesh = MeshDevice::create({1, 2}, testing::without_system_buffers(DeviceSpec::wormhole_b0()), tracker).value();
    std::mutex handoff_mutex;
    std::vector<MeshBuffer> handoff;
    std::atomic<int> producers_left{3};
    std::vector<std::thread> threads;
    for (int p = 0; p < 3; ++p) {
      threads.emplace_back([&] {
        for (int i = 0; i < 2000; ++i) {
          auto buffer = replicated(mesh, 1024);
          const std::scoped_lock lock(handoff_mutex);
          handoff.push_back(std::move(buffer));
        }
        producers_left.fetch_sub(1);
      });
    }
    for (int c = 0; c < 3; ++c) {
      threads.emplace_back([&] {
        for (;;) {
          // Read "done" before taking: when it was already true, this take gets the last buffers.
          const bool producers_done = producers_left.load() == 0;
          std::vector<MeshBuffer> taken;
          {
            const std::scoped_lock lock(handoff_mutex);
            taken.swap(handoff);
          }
          if (taken.empty() && producers_done) return;
          taken.clear();  // freed here, on a thread that did not allocate them
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    REQUIRE(client->flush(10s));
    const auto after = summary(socket);
    CHECK(table->active_allocations() == 0);
    CHECK(client->status().events_queued == client->status().events_taken);
    CHECK(client->status().frees_waiting == 0);
    CHECK(client->status().live_buffers == 0);
    CHECK(after["total_allocations"] == 3 * 2000 * 2);
    CHECK(after["total_deallocations"] == 3 * 2000 * 2);
    CHECK(after["unknown_deallocations"] == 0);
    CHECK(after["double_deallocations"] == 0);
    CHECK(after["active_allocations"] == 0);
    CHECK(after["sequence_gaps"] == 0);
  }
}

TEST_SUITE("server socket") {
  TEST_CASE("socket 0600 in a 0700 directory by default, 0660 and 0750 with --group") {
    testing::TempDirectory dir;
    {
      const std::string socket = dir.file("private/alloc.sock");
      RunningServer server(socket);
      struct stat info {};
      REQUIRE(::stat(socket.c_str(), &info) == 0);
      CHECK((info.st_mode & 07777) == 0600);
      REQUIRE(::stat(dir.file("private").c_str(), &info) == 0);
      CHECK((info.st_mode & 07777) == 0700);
    }
    const ::group* shared = ::getgrnam("nogroup");
    if (shared == nullptr) shared = ::getgrgid(::getgid());
    REQUIRE(shared != nullptr);
    server::ServerConfig config;
    config.socket_path = dir.file("shared/alloc.sock");
    config.group = shared->gr_name;
    config.log = [](std::string_view) {};
    auto server = server::Server::start(config);
    REQUIRE(server.has_value());
    struct stat info {};
    REQUIRE(::stat(config.socket_path.c_str(), &info) == 0);
    CHECK((info.st_mode & 07777) == 0660);
    CHECK(info.st_gid == shared->gr_gid);
    REQUIRE(::stat(dir.file("shared").c_str(), &info) == 0);
    CHECK((info.st_mode & 07777) == 0750);
  }

  TEST_CASE("a second server on a live socket is refused, a stale socket file is replaced") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("alloc.sock");
    {
      RunningServer first(socket);
      server::ServerConfig config;
      config.socket_path = socket;
      const auto second = server::Server::start(config);
      REQUIRE_FALSE(second.has_value());
      CHECK(second.error().message.find("already listening") != std::string::npos);
    }
    // A socket file with nobody behind it, as a killed server leaves.
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::copy(socket.begin(), socket.end(), address.sun_path);
    REQUIRE(::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
    ::close(fd);
    RunningServer replacement(socket);
    CHECK(summary(socket)["active_allocations"] == 0);
  }
}

TEST_SUITE("client and server") {
  TEST_CASE("a server that stops reading: waiting frames are dropped whole, then a snapshot follows") {
    testing::TempDirectory dir;
    const std::string socket = dir.file("slow.sock");
    // A "server" that accepts and then reads nothing until told to.
    const int listener = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::copy(socket.begin(), socket.end(), address.sun_path);
    REQUIRE(::bind(listener, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
    REQUIRE(::listen(listener, 4) == 0);
    auto client = TrackingClient::start(
        {.socket_path = socket, .flush_interval = 1ms, .max_pending_bytes = 64 * 1024, .warn = [](std::string_view) {}});
    const int session = ::accept(listener, nullptr, nullptr);
    REQUIRE(session >= 0);
    auto tracker = std::make_shared<Tracker>();
    tracker->add_processor(client);
    AllocationEvent event{.type = BufferType::dram, .size = 64};
    for (std::uint64_t id = 1; client->status().overflows == 0 && id < 50'000'000; ++id) {
      event.kind = EventKind::allocate;
      event.buffer = BufferId{id};
      tracker->record(std::span(&event, 1));
      event.kind = EventKind::free;
      tracker->record(std::span(&event, 1));
    }
    REQUIRE(client->status().overflows > 0);

    // Now read everything: every frame must decode, and a second snapshot must come.
    const std::vector<std::byte> stream = testing::read_until_closed(session, 300ms);
    int snapshots = 0;
    int event_frames = 0;
    std::size_t frames = 0;
    bool hello_first = false;
    std::span<const std::byte> rest(stream);
    while (!rest.empty()) {
      auto next = protocol::next_frame(rest);
      REQUIRE(next.has_value());
      if (!next->has_value()) break;  // a frame still on its way
      const protocol::Frame frame = **next;
      REQUIRE(protocol::decode(frame).has_value());
      if (frame.type == protocol::MessageType::snapshot_end) ++snapshots;
      if (frame.type == protocol::MessageType::events) ++event_frames;
      if (frames == 0) hello_first = frame.type == protocol::MessageType::hello;
      ++frames;
      rest = rest.subspan(frame.frame_size);
    }
    CHECK(hello_first);
    CHECK(event_frames >= 1);  // events streamed before the server stopped reading
    CHECK(snapshots >= 2);     // the session's and the resync's
    client->shutdown();
    ::close(session);
    ::close(listener);
  }
}
