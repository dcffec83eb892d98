// White-box tests of the tracking client's internal pieces (ADR 0008): the chunk pool, the
// per-thread lanes and the server connection. They are module partitions users cannot import,
// so this file is an implementation unit of meshrt.tracking_client itself, built into a test program of
// its own with a private copy of the module (tests/CMakeLists.txt).
module;
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <doctest/doctest.h>

module meshrt.tracking_client;

import meshrt.core;
import meshrt.protocol;
import meshrt.tracking;
import :event_lanes;
import :server_connection;

namespace meshrt::detail {
namespace {

using namespace std::chrono_literals;

// A listening Unix socket in a private directory; accepts on demand.
class Listener {
 public:
  explicit Listener(int backlog = 16) {
    std::array<char, 64> dir_template{};
    std::strncpy(dir_template.data(), "/tmp/meshrt-pieces-XXXXXX", dir_template.size() - 1);
    dir_ = ::mkdtemp(dir_template.data());
    path_ = dir_ + "/s.sock";
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, path_.c_str(), path_.size() + 1);
    REQUIRE(::bind(fd_, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
    REQUIRE(::listen(fd_, backlog) == 0);
  }
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  ~Listener() {
    ::close(fd_);
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  [[nodiscard]] const std::string& path() const { return path_; }
  [[nodiscard]] int accept() const { return ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC); }

 private:
  std::string dir_;
  std::string path_;
  int fd_{-1};
};

std::vector<std::byte> read_some(int fd, std::size_t at_least) {
  std::vector<std::byte> bytes;
  std::array<std::byte, 4096> chunk{};
  while (bytes.size() < at_least) {
    const ssize_t got = ::recv(fd, chunk.data(), chunk.size(), 0);
    if (got <= 0) break;
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + got);
  }
  return bytes;
}

}  // namespace

TEST_SUITE("tracking pieces") {
  TEST_CASE("chunk pool: first chunks never wait, the queue beyond them is bounded, idle chunks are capped") {
    ChunkPool pool(/*max_queued=*/2, /*max_idle=*/1);
    std::vector<Chunk*> firsts;
    for (int i = 0; i < 10; ++i) firsts.push_back(pool.take_first());  // ten lanes: none waits
    Chunk* a = pool.take_next();
    Chunk* b = pool.take_next();
    CHECK(pool.chunks_allocated() == 12);
    // A third queued chunk waits until the sender gives one back.
    std::atomic<bool> got{false};
    Chunk* c = nullptr;
    std::thread waiter([&] {
      c = pool.take_next();
      got = true;
    });
    std::this_thread::sleep_for(50ms);
    CHECK_FALSE(got.load());
    pool.give(a);
    waiter.join();
    CHECK(got.load());
    CHECK(c != nullptr);
    pool.give(b);
    pool.give(c);
    CHECK(pool.chunks_allocated() == 11);  // ten in lanes, one idle: the rest were freed
    for (Chunk* first : firsts) {
      pool.give(first);
      pool.lane_closed();
    }
    CHECK(pool.chunks_allocated() == 1);
    // Closed: a waiting producer is let go empty-handed, and nothing more is handed out.
    ChunkPool full(/*max_queued=*/0, /*max_idle=*/0);
    Chunk* only = full.take_first();
    std::thread blocked([&] { CHECK(full.take_next() == nullptr); });
    std::this_thread::sleep_for(20ms);
    full.close();
    blocked.join();
    CHECK(full.take_first() == nullptr);
    full.give(only);
  }

  TEST_CASE("chunks hold what was recorded below the published count") {
    ChunkPool pool;
    Chunk* chunk = pool.take_first();
    for (std::size_t i = 0; i < Chunk::capacity; ++i) {
      chunk->record(i, AllocationEvent{.buffer = BufferId{i}, .size = i * 2}, static_cast<std::uint32_t>(i));
    }
    chunk->published.store(Chunk::capacity, std::memory_order_release);
    std::uint64_t sum = 0;
    std::uint64_t stacks = 0;
    for (std::size_t i = 0; i < chunk->published.load(std::memory_order_acquire); ++i) {
      sum += chunk->events[i].event.size;
      stacks += chunk->events[i].stack;
    }
    CHECK(sum == Chunk::capacity * (Chunk::capacity - 1));
    CHECK(stacks == Chunk::capacity * (Chunk::capacity - 1) / 2);
    pool.give(chunk);
    pool.lane_closed();
  }

  TEST_CASE("lanes: one per thread and client, retired when the thread exits, freed when reaped") {
    EventLanes lanes;
    Lane* mine = lanes.for_this_thread().lane;
    REQUIRE(mine != nullptr);
    CHECK(lanes.for_this_thread().lane == mine);  // the same thread finds the same lane
    EventLanes other;
    Lane* in_other = other.for_this_thread().lane;
    CHECK(in_other != mine);                      // another client: a lane of its own
    CHECK(lanes.for_this_thread().lane == mine);  // and switching back finds the first again
    Lane* theirs = nullptr;
    std::thread([&] { theirs = lanes.for_this_thread().lane; }).join();
    REQUIRE(theirs != nullptr);
    CHECK(theirs != mine);
    CHECK(theirs->retired.load());  // its thread is gone
    CHECK(lanes.lane_count() == 2);
    lanes.reap(theirs);
    CHECK(lanes.lane_count() == 1);
    lanes.close();
    other.close();
  }

  TEST_CASE("lanes: past 64 undrained lanes of exited threads a new thread waits for the sender, who is woken") {
    std::atomic<int> wakes{0};
    EventLanes lanes([&] { wakes.fetch_add(1); });
    for (std::size_t i = 0; i <= EventLanes::max_retired_lanes; ++i) {
      std::thread([&] { (void)lanes.for_this_thread(); }).join();
    }
    CHECK(lanes.lane_count() == EventLanes::max_retired_lanes + 1);
    std::atomic<bool> recorded{false};
    std::thread late([&] {
      (void)lanes.for_this_thread();
      recorded = true;
    });
    std::this_thread::sleep_for(50ms);
    CHECK_FALSE(recorded.load());  // it waits: more than 64 wait to be drained
    CHECK(wakes.load() > 0);       // and it woke the sender
    // The sender drains one: the late thread goes on.
    for (Lane* lane : lanes.current()) {
      if (lane->retired.load()) {
        lanes.reap(lane);
        break;
      }
    }
    late.join();
    CHECK(recorded.load());
    lanes.close();
  }

  TEST_CASE("server connection: a clear Error for a missing server, a path too long and a full backlog") {
    ServerConnection connection;
    auto missing = connection.connect("/nonexistent/meshrt/alloc.sock");
    REQUIRE_FALSE(missing.has_value());
    CHECK(missing.error().code == ErrorCode::io_error);
    CHECK(missing.error().message.find("No such file") != std::string::npos);
    auto too_long = connection.connect("/tmp/" + std::string(200, 'x'));
    REQUIRE_FALSE(too_long.has_value());
    CHECK(too_long.error().code == ErrorCode::invalid_argument);
    CHECK(too_long.error().message.find("too long") != std::string::npos);
    CHECK_FALSE(connection.connected());

    // A server that accepts nothing: its backlog fills, then connecting is refused at once.
    const Listener stopped(/*backlog=*/0);
    std::vector<std::unique_ptr<ServerConnection>> queued;
    std::optional<Error> refusal;
    for (int i = 0; i < 64 && !refusal; ++i) {
      auto waiting = std::make_unique<ServerConnection>();
      const auto started = std::chrono::steady_clock::now();
      auto connected = waiting->connect(stopped.path());
      CHECK(std::chrono::steady_clock::now() - started < 1s);  // never waits
      if (connected) {
        queued.push_back(std::move(waiting));
      } else {
        refusal = connected.error();
      }
    }
    REQUIRE(refusal.has_value());
    CHECK(refusal->code == ErrorCode::limit_exceeded);
  }

  TEST_CASE("server connection: frames go out whole, the server's refusal and its close are Errors that close it") {
    const Listener server;
    ServerConnection connection;
    REQUIRE(connection.connect(server.path()).has_value());
    const int peer = server.accept();
    REQUIRE(peer >= 0);
    protocol::encode(protocol::Hello{.claimed_pid = 1, .process_name = "pieces"}, connection.outbound().frames());
    const std::size_t hello = connection.outbound().pending();
    REQUIRE(connection.pump_until(std::chrono::steady_clock::now() + 5s).has_value());
    CHECK(connection.outbound().all_sent());
    const std::vector<std::byte> received = read_some(peer, hello);
    auto frame = protocol::next_frame(received);
    REQUIRE(frame.has_value());
    REQUIRE(frame->has_value());
    auto message = protocol::decode(**frame);
    REQUIRE(message.has_value());
    CHECK(std::get<protocol::Hello>(*message).process_name == "pieces");

    // The server refuses the session and says why.
    std::vector<std::byte> refusal;
    protocol::encode(protocol::ErrorMessage{ErrorCode::limit_exceeded, "too many sessions"}, refusal);
    REQUIRE(::send(peer, refusal.data(), refusal.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(refusal.size()));
    std::this_thread::sleep_for(20ms);
    protocol::encode(protocol::Goodbye{}, connection.outbound().frames());
    auto refused = connection.pump_until(std::chrono::steady_clock::now() + 5s);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code == ErrorCode::permission_denied);
    CHECK(refused.error().message == "the server refused: too many sessions");
    CHECK_FALSE(connection.connected());
    CHECK(connection.outbound().pending() == 0);  // what waited went with the connection
    ::close(peer);

    // A server that closes the session.
    REQUIRE(connection.connect(server.path()).has_value());
    ::close(server.accept());
    std::this_thread::sleep_for(20ms);
    protocol::encode(protocol::Goodbye{}, connection.outbound().frames());
    auto closed = connection.pump_until(std::chrono::steady_clock::now() + 5s);
    REQUIRE_FALSE(closed.has_value());
    CHECK(closed.error().code == ErrorCode::io_error);
    CHECK_FALSE(connection.connected());
  }
}

}  // namespace meshrt::detail
