// find_in_all: one address free in several allocators at once, chosen by their own rules.
module;
#include <algorithm>
#include <cstdint>
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

}  // namespace

Result<std::uint64_t> find_in_all(std::span<const BankAllocator* const> allocators, std::uint64_t size,
                                  AllocationDirection direction) {
  Expects(!allocators.empty());
  const BankAllocator& first = *allocators.front();
  for (const BankAllocator* other : allocators) {
    Expects(other != nullptr && other->base() == first.base() && other->size() == first.size() &&
            other->alignment() == first.alignment() && other->policy() == first.policy());
  }
  auto chosen = first.find(size, direction);
  if (!chosen) return chosen;
  const auto free_in_all = [&](std::uint64_t address) {
    return std::ranges::all_of(allocators, [&](const BankAllocator* one) { return one->is_free(address, size); });
  };
  if (free_in_all(*chosen)) return chosen;

  // The ranges free in all of them, made into a bank of their own, so the same policy chooses.
  std::vector<Range> common = free_ranges(first);
  for (const BankAllocator* other : allocators.subspan(1)) {
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

}  // namespace meshrt
