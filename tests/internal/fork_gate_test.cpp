// White-box tests of the fork gate (ADR 0017): a fork waits for the sender's pass in progress,
// no pass begins while a fork waits or runs, and a pass that does not end holds a fork back
// no longer than fork_wait. An implementation unit of meshrt.tracking_client, like
// tracking_pieces_test.cpp.
module;
#include <array>
#include <atomic>
#include <csignal>
#include <chrono>
#include <thread>

#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

module meshrt.tracking_client;

import :fork_handling;

namespace meshrt::detail {
namespace {

using namespace std::chrono_literals;
using Clock = ForkGate::Clock;

// Runs a pass on its own thread until `end` is set.
class PassThread {
 public:
  explicit PassThread(ForkGate& gate)
      : thread_([this, &gate] {
          const ForkGate::Pass pass(gate);
          began_.store(true);
          while (!end_.load()) std::this_thread::sleep_for(1ms);
          ended_.store(true);
        }) {
    while (!began_.load()) std::this_thread::sleep_for(1ms);
  }
  PassThread(const PassThread&) = delete;
  PassThread& operator=(const PassThread&) = delete;
  ~PassThread() {
    end_.store(true);
    thread_.join();
  }
  void end() { end_.store(true); }
  [[nodiscard]] bool ended() const { return ended_.load(); }

 private:
  std::atomic<bool> began_{false};
  std::atomic<bool> end_{false};
  std::atomic<bool> ended_{false};
  std::jthread thread_;
};

TEST_SUITE("fork gate") {
  TEST_CASE("a fork's hold waits for the pass in progress, and no pass begins until it is released") {
    ForkGate gate;
    std::atomic<bool> held{false};
    {
      PassThread pass(gate);
      std::jthread fork_side([&] { held.store(gate.hold_until(Clock::now() + 30s)); });
      std::this_thread::sleep_for(50ms);
      CHECK_FALSE(held.load());  // the pass still runs
      pass.end();
      fork_side.join();
      CHECK(pass.ended());
      CHECK(held.load());
    }
    std::atomic<bool> began{false};
    std::jthread sender([&] {
      const ForkGate::Pass pass(gate);
      began.store(true);
    });
    std::this_thread::sleep_for(50ms);
    CHECK_FALSE(began.load());  // held: the next pass waits for the fork to be over
    gate.release();
    sender.join();
    CHECK(began.load());
  }

  TEST_CASE("a pass that does not end holds the fork back until the deadline, no longer") {
    ForkGate gate;
    PassThread pass(gate);
    const auto start = Clock::now();
    CHECK_FALSE(gate.hold_until(start + 50ms));
    const auto waited = Clock::now() - start;
    CHECK(waited >= 50ms);
    CHECK(waited < 10s);  // the deadline, not the pass, ended it (slack for a loaded machine)
    CHECK_FALSE(pass.ended());
    gate.release();
  }

  TEST_CASE("fork() itself waits for a sender's pass: the parent returns from it after the pass ended") {
    install_fork_handlers();
    ForkGate gate;
    PassThread pass(gate);
    std::jthread ender([&] {
      std::this_thread::sleep_for(5ms);  // well inside fork_wait, even on a loaded machine
      pass.end();
    });
    std::array<int, 2> pipe_ends{};
    REQUIRE(::pipe(pipe_ends.data()) == 0);
    const pid_t child = ::fork();
    if (child == 0) {
      // What the child's copy of memory says, then no exit handlers (ThreadSanitizer's would
      // report the parent's threads, which the child does not have).
      const char seen = pass.ended() ? 'y' : 'n';
      (void)::write(pipe_ends[1], &seen, 1);
      ::raise(SIGKILL);
    }
    REQUIRE(child > 0);
    ::close(pipe_ends[1]);
    CHECK(pass.ended());
    char seen = '?';
    CHECK(::read(pipe_ends[0], &seen, 1) == 1);
    ::close(pipe_ends[0]);
    CHECK(seen == 'y');
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
  }

  TEST_CASE("fork() waits no longer than fork_wait for a pass that does not end") {
    install_fork_handlers();
    ForkGate gate;
    PassThread pass(gate);
    const auto start = Clock::now();
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    REQUIRE(child > 0);
    const auto waited = Clock::now() - start;
    CHECK(waited >= fork_wait);
    CHECK(waited < fork_wait + 10s);  // slack for a loaded machine, not the pass's end
    CHECK_FALSE(pass.ended());
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    CHECK(WIFEXITED(status));
  }
}

}  // namespace
}  // namespace meshrt::detail
