// What fork() does to the tracking clients of a process (ADR 0017). Before the fork it waits, at
// most fork_wait, for each client's sender thread to finish the pass it is in, so that the child
// inherits every client at rest: all a client owns is reachable from its engine, none of it held
// only on the sender's stack, a stack the child does not have (LeakSanitizer reports such memory
// at the child's exit). In the child it bumps the fork generation, which makes every inherited
// client inert, and closes the child's copies of their sockets.
module;
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

module meshrt.tracking_client:fork_handling;

namespace meshrt::detail {

// Bumped in every child of fork(): a client started in an earlier generation is a parent's copy.
[[nodiscard]] std::uint64_t fork_generation();

// Installs the fork handlers; once per process, whoever calls first.
void install_fork_handlers();

// The longest a fork waits for a sender's pass in progress. A running pass is short (it never
// waits for the server); a pass of the shutdown drain may, and past this the fork goes on, as it
// would without the gate.
inline constexpr std::chrono::milliseconds fork_wait{100};

// Where a sender's passes and fork() meet. The sender brackets each pass of its loop with a
// Pass; a fork waits until no pass is running, and no pass begins until the fork is over. A
// gate is known to the fork handlers from construction to destruction (64 at most: past that a
// fork does not wait for the extra ones).
class ForkGate {
 public:
  using Clock = std::chrono::steady_clock;

  ForkGate();
  ~ForkGate();
  ForkGate(const ForkGate&) = delete;
  ForkGate& operator=(const ForkGate&) = delete;
  ForkGate(ForkGate&&) = delete;
  ForkGate& operator=(ForkGate&&) = delete;

  class Pass {
   public:
    explicit Pass(ForkGate& gate);
    ~Pass();
    Pass(const Pass&) = delete;
    Pass& operator=(const Pass&) = delete;
    Pass(Pass&&) = delete;
    Pass& operator=(Pass&&) = delete;

   private:
    ForkGate& gate_;
  };

  // The fork's side: no pass begins until release(); waits until `deadline` for the one running.
  // True when none runs.
  bool hold_until(Clock::time_point deadline);
  void release();

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  bool in_pass_{false};
  bool held_{false};
};

}  // namespace meshrt::detail
