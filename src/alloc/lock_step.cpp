// find_in_all and LockStepAllocator: one address free in several allocators at once, chosen by
// their own rules.
module;
#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.alloc;

import meshrt.core;

namespace meshrt {

namespace {

// Free ranges as [start, end), in address order.
using Range = std::pair<std::uint64_t, std::uint64_t>;

std::vector<Range> free_ranges(const BankAllocator& allocator) {
  std::vector<Range> ranges;
  for (const Block& block : allocator.block_table()) {
    if (!block.allocated) ranges.emplace_back(block.address, block.address + block.size);
  }
  return ranges;
}

std::vector<Range> intersect(const std::vector<Range>& one, const std::vector<Range>& other) {
  std::vector<Range> both;
  for (std::size_t a = 0, b = 0; a < one.size() && b < other.size();) {
    const std::uint64_t start = std::max(one[a].first, other[b].first);
    const std::uint64_t end = std::min(one[a].second, other[b].second);
    if (start < end) both.emplace_back(start, end);
    (one[a].second < other[b].second ? a : b) += 1;
  }
  return both;
}

// For const and mutable allocators alike: LockStepAllocator searches the ones it then changes.
template <class Allocator>
Result<std::uint64_t> find_in(std::span<Allocator* const> allocators, std::uint64_t size,
                              AllocationDirection direction) {
  Expects(!allocators.empty());
  const BankAllocator& first = *allocators.front();
  for (const Allocator* other : allocators) {
    Expects(other != nullptr && other->base() == first.base() && other->size() == first.size() &&
            other->alignment() == first.alignment() && other->policy() == first.policy());
  }
  auto chosen = first.find(size, direction);
  if (!chosen) return chosen;
  const auto free_in_all = [&](std::uint64_t address) {
    return std::ranges::all_of(allocators, [&](const Allocator* one) { return one->is_free(address, size); });
  };
  if (free_in_all(*chosen)) return chosen;

  // The ranges free in all of them, made into a bank of their own, so the same policy chooses.
  std::vector<Range> common = free_ranges(first);
  for (const Allocator* other : allocators.subspan(1)) {
    if (common.empty()) break;
    common = intersect(common, free_ranges(*other));
  }
  auto bank = BankAllocator::create(first.base(), first.size(), first.alignment(), first.policy());
  Ensures(bank.has_value());  // the same parameters made `first`
  std::uint64_t taken_from = first.base();
  const auto take_until = [&](std::uint64_t end) {
    if (end <= taken_from) return;
    const auto taken = bank->allocate_at(taken_from, end - taken_from);
    Ensures(taken.has_value());  // ranges taken on some allocator: granule-aligned, in the bank
  };
  for (const auto& [start, end] : common) {
    take_until(start);
    taken_from = end;
  }
  take_until(first.base() + first.size());
  auto found = bank->find(size, direction);
  if (found) return found;
  return fail(ErrorCode::out_of_memory,
              fmt::format("no address range of {} bytes is free in all {} of them at once (each one's largest free "
                          "block alone may be larger: lone allocations fragment them differently)",
                          size, allocators.size()));
}

}  // namespace

Result<std::uint64_t> find_in_all(std::span<const BankAllocator* const> allocators, std::uint64_t size,
                                  AllocationDirection direction) {
  return find_in(allocators, size, direction);
}

Result<LockStepAllocator> LockStepAllocator::create(std::uint32_t members, std::uint64_t base, std::uint64_t size,
                                                    std::uint64_t granule, AllocatorPolicy policy) {
  if (members == 0) return fail(ErrorCode::invalid_argument, "a lock-step allocator needs at least one member");
  auto shared = BankAllocator::create(base, size, granule, policy);
  if (!shared) return tl::unexpected(std::move(shared.error()));
  return LockStepAllocator(std::move(*shared), members);
}

LockStepAllocator::LockStepAllocator(BankAllocator shared, std::uint32_t members)
    : shared_(std::move(shared)), in_step_(members), own_(members) {}

const BankAllocator& LockStepAllocator::member(std::uint32_t index) const {
  Expects(index < own_.size());
  const std::optional<BankAllocator>& own = own_[index].allocator;
  return own ? *own : shared_;
}

Result<void> LockStepAllocator::check_range(std::uint32_t first, std::uint32_t count) const {
  if (count == 0 || first >= own_.size() || count > own_.size() - first) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("members [{}, +{}) are not a range of the {} members", first, count, own_.size()));
  }
  return {};
}

void LockStepAllocator::split_off(std::uint32_t first, std::uint32_t count) {
  std::uint32_t in_step_inside = 0;
  for (std::uint32_t index = first; index < first + count; ++index) in_step_inside += own_[index].allocator ? 0 : 1;
  if (in_step_inside == 0 || in_step_inside == in_step_) return;  // the shared allocator serves them all
  for (std::uint32_t index = first; index < first + count; ++index) {
    Own& own = own_[index];
    if (own.allocator) continue;
    own.allocator.emplace(shared_);  // O(n) in the shared blocks: repaid by as many operations of its own
    own.operations = 0;
    own.copy_cost = shared_.statistics().allocated_blocks + 1;
    own.differing = 0;
    --in_step_;
  }
}

// The shared allocator first (when a member in step is in the range), then each member that
// differs. Into a kept vector: no allocation per operation.
std::span<BankAllocator* const> LockStepAllocator::targets(std::uint32_t first, std::uint32_t count) {
  targets_.clear();
  targets_.push_back(&shared_);
  bool shared = false;
  for (std::uint32_t index = first; index < first + count; ++index) {
    std::optional<BankAllocator>& own = own_[index].allocator;
    if (own) targets_.push_back(&*own);
    else shared = true;
  }
  return std::span<BankAllocator* const>(targets_).subspan(shared ? 0 : 1);
}

// After one block (address, size) was taken (or given back) on some of the allocators: each
// member's count of blocks held by it or by the shared allocator but not both moves by one where
// the change reached only one side. A member at 0 holds what the shared allocator holds, and
// rejoins it at once when the shared allocator was the side that caught up (the devices that
// had not yet freed a range now have), else once its own operations have repaid its copy.
void LockStepAllocator::note_change(std::uint32_t first, std::uint32_t count, std::uint64_t address,
                                    std::uint64_t size, bool allocated, bool shared_changed) {
  for (std::uint32_t index = 0; index < own_.size(); ++index) {
    Own& own = own_[index];
    if (!own.allocator) continue;
    const bool own_changed = index >= first && index - first < count;
    if (own_changed) ++own.operations;
    if (own_changed != shared_changed) {
      const BankAllocator& unchanged = own_changed ? shared_ : *own.allocator;
      const auto held = unchanged.allocated_size(address);
      const bool unchanged_holds = held.has_value() && *held == size;
      // Taken on one side: a difference fewer if the other held it already, else one more.
      if (allocated == unchanged_holds) {
        Expects(own.differing > 0);
        --own.differing;
      } else {
        ++own.differing;
      }
    }
    const bool caught_up = shared_changed && !own_changed;
    if (own.differing == 0 && (caught_up || own.operations >= own.copy_cost)) {
      own.allocator.reset();
      ++in_step_;
    }
  }
}

Result<std::uint64_t> LockStepAllocator::allocate(std::uint32_t first, std::uint32_t count, std::uint64_t size,
                                                  AllocationDirection direction) {
  if (auto valid = check_range(first, count); !valid) return tl::unexpected(std::move(valid.error()));
  auto address = find_in(targets(first, count), size, direction);
  if (!address) return address;
  split_off(first, count);  // only now: a refused request changes nothing
  const std::span<BankAllocator* const> chosen = targets(first, count);
  for (BankAllocator* allocator : chosen) {
    const auto taken = allocator->allocate_at(*address, size);
    Ensures(taken.has_value());  // find_in_all() found it free in every one of them
  }
  const auto taken_size = chosen.front()->allocated_size(*address);
  Ensures(taken_size.has_value());
  note_change(first, count, *address, *taken_size, true, chosen.front() == &shared_);
  return address;
}

Result<void> LockStepAllocator::free(std::uint32_t first, std::uint32_t count, std::uint64_t address) {
  if (auto valid = check_range(first, count); !valid) return valid;
  for (BankAllocator* allocator : targets(first, count)) {
    if (auto held = allocator->allocated_size(address); !held) return tl::unexpected(std::move(held.error()));
  }
  split_off(first, count);
  const std::span<BankAllocator* const> chosen = targets(first, count);
  const auto freed_size = chosen.front()->allocated_size(address);
  Ensures(freed_size.has_value());  // checked above
  for (BankAllocator* allocator : chosen) {
    const auto freed = allocator->free(address);
    Ensures(freed.has_value());  // each of them holds a block there, checked above
  }
  note_change(first, count, address, *freed_size, false, chosen.front() == &shared_);
  return {};
}

void LockStepAllocator::reset() {
  shared_.reset();
  for (Own& own : own_) own = Own{};
  in_step_ = static_cast<std::uint32_t>(own_.size());
}

}  // namespace meshrt
