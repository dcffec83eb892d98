// The tracking client's call stacks (ADR 0024): application threads capture and intern them
// (each distinct stack gets an id once; a thread's repeated call site is a look-up in its own
// cache, no lock), the sender thread names their frames and says each to the server once per
// session, before the first record that carries its id.
module;
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include <absl/container/flat_hash_map.h>

module meshrt.tracking_client:call_stacks;

import meshrt.protocol;
import meshrt.stacks;

namespace meshrt::detail {

// A stack as an application thread captured it: return addresses, and the frames an
// interpreter gave around them (Python's), both innermost first.
struct CapturedStack {
  std::uint32_t id{};
  std::vector<std::uintptr_t> native;
  std::vector<stacks::Frame> interpreted;
};

class StackInterner {
 public:
  explicit StackInterner(std::size_t max_stacks) : max_stacks_(max_stacks) {}
  StackInterner(const StackInterner&) = delete;
  StackInterner& operator=(const StackInterner&) = delete;
  StackInterner(StackInterner&&) = delete;
  StackInterner& operator=(StackInterner&&) = delete;
  ~StackInterner() = default;

  // Application thread: the id of the calling thread's stack now; 0 once max_stacks distinct
  // stacks are known (counted in dropped()).
  [[nodiscard]] std::uint32_t intern_current() noexcept;
  // Sender: the stacks interned since the last call, in id order.
  [[nodiscard]] std::vector<CapturedStack> take_new();

  [[nodiscard]] std::uint64_t size() const;
  [[nodiscard]] std::uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  std::uint32_t intern_slow(std::uint64_t key, std::span<const std::uintptr_t> native,
                            const stacks::ScopedCallerFrames* interpreted) noexcept;

  const std::uint64_t instance_{next_instance()};  // never reused: names this interner in thread caches
  static std::uint64_t next_instance();
  const std::size_t max_stacks_;
  mutable std::mutex mutex_;
  absl::flat_hash_map<std::uint64_t, std::uint32_t> ids_;  // stack key -> id
  std::vector<CapturedStack> new_;
  std::uint32_t next_id_{1};
  std::atomic<std::uint64_t> dropped_{0};
};

// The sender's book of stacks: their frames named, kept for every session to come, and how many
// the current session has been told.
class StackBook {
 public:
  // Names a captured stack's frames (the slow part: DWARF look-ups, cached per address).
  void add(const CapturedStack& captured);
  // Appends a CallStack frame for every stack this session has not heard of yet.
  void tell(std::vector<std::byte>& out);
  // A new session knows none; after dropped output, those told since `keep()` may be lost.
  void new_session() { told_ = 0; kept_ = 0; }
  void keep() { kept_ = told_; }
  void forget_unkept() { told_ = kept_; }
  [[nodiscard]] std::size_t size() const { return stacks_.size(); }

 private:
  stacks::Symbolizer symbolizer_;
  std::vector<protocol::CallStack> stacks_;  // id i at [i - 1]
  std::size_t told_{0};
  std::size_t kept_{0};
};

}  // namespace meshrt::detail
