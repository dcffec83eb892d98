module;
#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include <absl/container/flat_hash_map.h>
#include <gsl/gsl>

module meshrt.tracking_client;

import meshrt.protocol;
import meshrt.stacks;
import :call_stacks;

namespace meshrt::detail {

namespace {

// Each thread remembers the stacks it interned lately, per interner: a repeated call site costs
// the walk, a hash and one look-up here. Keyed by the whole stack's 64-bit hash (ADR 0024).
struct CachedStack {
  std::uint64_t key;
  std::uint32_t id;
};
struct ThreadStackCache {
  static constexpr std::size_t slots = 256;
  std::uint64_t instance{0};
  std::array<CachedStack, slots> entries{};
};
thread_local ThreadStackCache thread_stack_cache;

// Frames above the call site that are the tracking machinery itself: not worth a line.
bool is_capture_machinery(std::string_view function) {
  for (const std::string_view prefix : {"meshrt::TrackingClient::", "meshrt::Tracker::", "meshrt::detail::StackInterner",
                                        "meshrt::stacks::"}) {
    if (function.starts_with(prefix)) return true;
  }
  return false;
}

}  // namespace

std::uint64_t StackInterner::next_instance() {
  static std::atomic<std::uint64_t> count{0};
  return count.fetch_add(1, std::memory_order_relaxed) + 1;
}

std::uint32_t StackInterner::intern_current() noexcept {
  std::array<std::uintptr_t, stacks::max_frames> frames{};
  const std::size_t depth = stacks::capture(frames);
  const stacks::ScopedCallerFrames* interpreted = stacks::caller_frames();
  const std::span<const std::uintptr_t> native(frames.data(), depth);
  const std::uint64_t key = stacks::hash_frames(native, interpreted != nullptr ? interpreted->hash() : 0);
  ThreadStackCache& cache = thread_stack_cache;
  if (cache.instance != instance_) {
    cache.instance = instance_;
    cache.entries.fill({});
  }
  CachedStack& slot = cache.entries[key % ThreadStackCache::slots];
  if (slot.id != 0 && slot.key == key) return slot.id;
  const std::uint32_t id = intern_slow(key, native, interpreted);
  if (id != 0) slot = {key, id};
  return id;
}

std::uint32_t StackInterner::intern_slow(std::uint64_t key, std::span<const std::uintptr_t> native,
                                         const stacks::ScopedCallerFrames* interpreted) noexcept {
  try {
    const std::scoped_lock lock(mutex_);
    if (const auto found = ids_.find(key); found != ids_.end()) return found->second;
    if (ids_.size() >= max_stacks_) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      return 0;
    }
    const std::uint32_t id = next_id_++;
    ids_.emplace(key, id);
    CapturedStack stack{.id = id, .native = {native.begin(), native.end()}, .interpreted = {}};
    if (interpreted != nullptr) stack.interpreted.assign(interpreted->frames().begin(), interpreted->frames().end());
    new_.push_back(std::move(stack));
    return id;
  } catch (...) {  // out of memory: the allocation goes without its stack
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
}

std::vector<CapturedStack> StackInterner::take_new() {
  const std::scoped_lock lock(mutex_);
  return std::exchange(new_, {});
}

std::uint64_t StackInterner::size() const {
  const std::scoped_lock lock(mutex_);
  return ids_.size();
}

void StackBook::add(const CapturedStack& captured) {
  Expects(captured.id == stacks_.size() + 1);
  std::vector<stacks::Frame> named;
  named.reserve(captured.native.size() + captured.interpreted.size());
  for (const std::uintptr_t address : captured.native) {
    for (stacks::Frame& frame : symbolizer_.symbolize(address)) {
      if (named.empty() && is_capture_machinery(frame.function)) continue;  // above the call site
      named.push_back(std::move(frame));
    }
  }
  // The wire keeps max_stack_frames: when inlined calls make more, the outermost native frames
  // (the interpreter's own, under Python) go, not the interpreted ones that follow them.
  const std::size_t room = protocol::max_stack_frames - std::min(captured.interpreted.size(), protocol::max_stack_frames);
  if (named.size() > room) named.resize(room);
  for (stacks::Frame frame : captured.interpreted) {
    frame.address = 0;
    frame.interpreted = true;  // whatever the binding said: these are the interpreter's
    named.push_back(std::move(frame));
  }
  const std::size_t site = stacks::call_site(named);
  protocol::CallStack stack{.id = captured.id,
                            .frames = {},
                            .call_site = static_cast<std::uint16_t>(site < protocol::max_stack_frames ? site : 0)};
  stack.frames.reserve(named.size());
  for (stacks::Frame& frame : named) {
    stack.frames.push_back(
        {frame.address, std::move(frame.function), std::move(frame.file), frame.line, frame.interpreted});
  }
  stacks_.push_back(std::move(stack));
}

void StackBook::tell(std::vector<std::byte>& out) {
  for (; told_ < stacks_.size(); ++told_) protocol::encode(stacks_[told_], out);
}

}  // namespace meshrt::detail
