module;
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>

#include <pthread.h>

module meshrt.tracking_client;

import :fork_handling;
import :server_connection;

namespace meshrt::detail {

namespace {

std::atomic<std::uint64_t> fork_generation_count{0};

// The gates of live senders. Trivially destructible, so a client shut down during static
// destruction still finds them.
constexpr std::size_t max_gates = 64;
constinit std::mutex gates_mutex;  // held from before a fork to after it, in both processes
constinit std::array<ForkGate*, max_gates> gates{};

void before_fork() {
  gates_mutex.lock();  // NOLINT(*-lock*): released by after_fork_in_parent / after_fork_in_child
  const auto deadline = ForkGate::Clock::now() + fork_wait;
  for (ForkGate* gate : gates) {
    if (gate != nullptr) (void)gate->hold_until(deadline);
  }
}

void after_fork_in_parent() {
  for (ForkGate* gate : gates) {
    if (gate != nullptr) gate->release();
  }
  gates_mutex.unlock();
}

// Async-signal-safe but for the unlock of a normal mutex this thread locked (safe in glibc):
// the child may have been forked from any state.
void after_fork_in_child() {
  fork_generation_count.fetch_add(1, std::memory_order_relaxed);
  close_connections_in_child();
  gates.fill(nullptr);  // the parent's senders: their clients are inert here and never pass again
  gates_mutex.unlock();
}

std::once_flag fork_handlers_installed;

}  // namespace

std::uint64_t fork_generation() { return fork_generation_count.load(std::memory_order_relaxed); }

void install_fork_handlers() {
  std::call_once(fork_handlers_installed, [] { ::pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); });
}

ForkGate::ForkGate() {
  const std::scoped_lock lock(gates_mutex);
  for (ForkGate*& slot : gates) {
    if (slot == nullptr) {
      slot = this;
      return;
    }
  }
}

ForkGate::~ForkGate() {
  const std::scoped_lock lock(gates_mutex);
  for (ForkGate*& slot : gates) {
    if (slot == this) slot = nullptr;
  }
}

ForkGate::Pass::Pass(ForkGate& gate) : gate_(gate) {
  std::unique_lock lock(gate_.mutex_);
  gate_.changed_.wait(lock, [&] { return !gate_.held_; });
  gate_.in_pass_ = true;
}

ForkGate::Pass::~Pass() {
  {
    const std::scoped_lock lock(gate_.mutex_);
    gate_.in_pass_ = false;
  }
  gate_.changed_.notify_all();
}

bool ForkGate::hold_until(Clock::time_point deadline) {
  std::unique_lock lock(mutex_);
  held_ = true;
  return changed_.wait_until(lock, deadline, [&] { return !in_pass_; });
}

void ForkGate::release() {
  {
    const std::scoped_lock lock(mutex_);
    held_ = false;
  }
  changed_.notify_all();
}

}  // namespace meshrt::detail
